"""The application layer of the scripts: flags (:mod:`.cli`, no torch), the frozen run spec (:mod:`.spec`), the one
pipeline (:mod:`.pipeline`) and its families (``*_family``), checks before any weight loads (:mod:`.early_checks`,
:mod:`.preflight`), outputs, results, figures and console lines. Library errors name parameters; only this layer
names flags."""
