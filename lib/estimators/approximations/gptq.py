"""The layer-wise proxy of OBS / GPTQ / SparseGPT: ``2/P * sum_positions x x^T``, one block per (layer, output row).

``x`` is the input of each entry's layer at the entry's input index; entries of different layers or different
output rows are zero. References: Frantar & Alistarh 2022, "Optimal Brain Compression", NeurIPS; Frantar et al.
2023, "GPTQ: accurate post-training quantization for generative pre-trained transformers", ICLR.

Cost: one forward per batch (hooks on the subset's layers, shared with ``kfac``). Plan: ``input_gram``
(:meth:`LayerUnit.input_gram`). Finish: ``2 * input_gram * same_row / P``.
"""

from __future__ import annotations

import torch

from ...runtime.jobs import Partial
from .base import LAYER_STATISTICS, Approximation, LayerUnit, MatrixContext, register


@register
class GPTQ(Approximation):
    name = "gptq"
    order = 40
    source = LAYER_STATISTICS
    cost = "one forward per batch (the layers' inputs, shared with kfac)"
    normalization = "2/(b*seqlen) sum x x^T"

    def layer_sums(self, unit: LayerUnit) -> Partial:
        return {"input_gram": unit.input_gram()}

    def matrix(self, sums: Partial, ctx: MatrixContext) -> torch.Tensor:
        return 2 * sums["input_gram"] * ctx.layout.same_row() / ctx.positions
