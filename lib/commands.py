"""The scripts as commands: each top-level script (and each console entry point of the installed package) is a
:class:`Command` -- its flags (:mod:`lib.app.cli`), its run spec (:mod:`lib.app.spec`) and its family of the pipeline
(:mod:`lib.app.pipeline`).

Parsing imports neither torch nor transformers; :func:`execute` imports the pipeline (and so torch) only
once the flags are parsed and checked.
"""

from __future__ import annotations

import importlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from .app import cli
from .app.spec import RunSpec

FAMILY_MODULES = {
    "exact": "app.exact_family",
    "diagonal": "app.diagonal_family",
    "spectrum": "app.spectrum_family",
    "sweep": "app.sweep_family",
}
"""The module holding each family's ``FAMILY`` (a :class:`lib.app.pipeline.Family`)."""


def check_subset_on_disk(spec: RunSpec) -> None:
    """Refuse a subset that the model's weights on disk rule out (wrong layer, block, counts or ``t``), before
    torch is imported (:mod:`lib.app.early_checks`); silent when the model's files cannot tell."""
    from .app.early_checks import check_subset, layout
    from .errors import ParamError, UserError

    s = spec.subset
    if getattr(s, "params", None):
        return
    found = layout(spec.model.model, spec.model.cache_dir)
    if found is None:
        return
    try:
        check_subset(
            found,
            layer_name=s.layer_name,
            block_index=s.block_index,
            num_blocks=getattr(s, "num_blocks", None),
            num_layers=getattr(s, "num_layers", None),
            t=getattr(s, "t", None),
        )
    except ParamError as e:
        raise UserError(cli.flag_message(e)) from None


def check_inputs_on_disk(spec: RunSpec) -> None:
    """Refuse, before torch is imported, the sequence length, the samples, the dataset file and the output names
    that :mod:`lib.app.early_checks` can rule out from the config, the text's size and the output folder."""
    from .app.early_checks import check_data, check_outputs
    from .app.spec import PAPER_SEQLEN
    from .errors import ParamError, UserError

    d, o = spec.data, spec.output
    try:
        check_data(spec.model.model, spec.model.cache_dir, d.dataset, d.seqlen, d.b, PAPER_SEQLEN)
    except ParamError as e:
        raise UserError(cli.flag_message(e)) from None
    check_outputs(o.output_dir, o.name, o.overwrite, o.skip_existing, spec.script, spec.digest())


def execute(spec: RunSpec) -> dict[str, Any]:
    """Run ``spec`` through the pipeline; returns the saved metadata (``{}`` on torchrun ranks other than 0)."""
    check_subset_on_disk(spec)
    check_inputs_on_disk(spec)
    from .app.pipeline import execute as run_pipeline

    family = importlib.import_module(f"{__package__}.{FAMILY_MODULES[spec.family]}").FAMILY
    return run_pipeline(spec, family)


@dataclass(frozen=True)
class Command:
    """One script: ``script`` (its file name without ``.py``) and ``description`` (its ``--help`` text)."""

    script: str
    description: str

    def parser(self) -> cli.Parser:
        """Its flags (also used by ``reproduce.py`` to check passed-on flags before any run)."""
        return cli.build_parser(self.script, self.description)

    def spec(
        self, argv: Sequence[str] | None = None, presets: dict[str, Any] | None = None
    ) -> RunSpec:
        """The validated run spec of ``argv`` (``None``: the process's arguments); ``presets``: defaults
        that ``argv`` overrides."""
        return cli.parse(self.script, argv, self.description, presets)

    def run(self, argv: Sequence[str] | None = None) -> dict[str, Any]:
        """Parse, check, compute, save; returns the saved metadata."""
        from .errors import UserError

        try:
            spec = self.spec(argv)
        except UserError as e:
            # from the arguments alone: under torchrun, each node's local rank 0 prints it
            e.same_on_node = True  # type: ignore[attr-defined]
            raise
        return execute(spec)

    def main(self) -> None:
        """The console entry point: one-line errors and exit statuses (:func:`lib.app.cli.main`)."""
        cli.main(self.run)


single_layer_single_block = Command(
    "single_layer_single_block",
    (
        "Exact Hessian of perplexity for the first t weights of row 0 of one linear layer in one block "
        "(paper Sec. 4.1, Fig. 1a)."
    ),
)
single_layer_several_blocks = Command(
    "single_layer_several_blocks",
    (
        "Exact Hessian of perplexity for the first t weights of row 0 of one linear layer in each of "
        "blocks 0..N-1 (paper Sec. 4.3, Fig. 1c)."
    ),
)
several_layers_several_blocks = Command(
    "several_layers_several_blocks",
    (
        "Exact Hessian of perplexity for the first t weights of row 0 of the first K linear layers of "
        "each of blocks 0..N-1 (paper Sec. 4.2/4.4, Figs. 1b, 1d)."
    ),
)
hessian_diagonal = Command(
    "hessian_diagonal",
    (
        "Diagonal of the Hessian of perplexity for all entries of a weight (paper Sec. 5, Fig. 3): XDiag, "
        "Hutchinson, GGN, empirical Fisher or exact."
    ),
)
hessian_spectrum = Command(
    "hessian_spectrum",
    (
        "Hessian spectrum of perplexity for any weight subset: top eigenvalues (Lanczos), trace (Hutchinson, "
        "Hutch++) and spectral density (SLQ), or exact eigvalsh for small subsets."
    ),
)

hessian_sweep = Command(
    "hessian_sweep",
    (
        "Whole-model Hessian sweep: trace, top/bottom eigenvalues, density, Frobenius norm and diagonal statistics "
        "of every layer, block or attention head's Hessian block, across checkpoints, in one tidy table."
    ),
)

COMMANDS = {
    c.script: c
    for c in (
        single_layer_single_block,
        single_layer_several_blocks,
        several_layers_several_blocks,
        hessian_diagonal,
        hessian_spectrum,
        hessian_sweep,
    )
}
"""Every script by name."""
