"""The questions answered with products: the exact block (:mod:`.exact`), the diagonal of whole weights
(:mod:`.diagonal`), the curvature approximations beside it (:mod:`.curvature`), the diagonality and batch
studies, and whole-model sweeps over layers, blocks, heads and checkpoints (:mod:`.sweep`)."""
