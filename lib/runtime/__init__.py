"""How long runs run: additive jobs (:mod:`.jobs`), worker processes and torchrun ranks (:mod:`.parallel`,
:mod:`.worker_boot`, :mod:`.ranks`), atomic checkpoints and pass logs (:mod:`.checkpoint`, :mod:`.passlog`),
threads (:mod:`.threads`) and the library calls' defaults (:mod:`.library_defaults`)."""
