"""K-FAC restricted to the subset: ``A (x) G``, zero between layers.

``A = sum_positions x x^T / P`` (the layer inputs) and ``G = sum_positions E[delta delta^T] / N`` with ``delta`` the
gradient of the sampled-label summed NLL w.r.t. the layer's outputs (``fisher_samples`` draws), the "expand" form for
weight sharing over positions. For a single output row ``o`` it is ``gptq * G[o, o] / 2``. References: Martens &
Grosse 2015, "Optimizing neural networks with Kronecker-factored approximate curvature", ICML; Eschenhagen et al.
2023, "Kronecker-factored approximate curvature for modern neural network architectures", NeurIPS.

Cost: one forward and ``fisher_samples`` backwards per batch (hooks on the subset's layers, shared with ``gptq``).
Plan: ``input_gram`` and ``kfac_g_sum`` (:meth:`LayerUnit.output_gram`). Finish: the entrywise product of the
normalized factors on the subset's entries.
"""

from __future__ import annotations

import torch

from ...runtime.jobs import Partial
from .base import LAYER_STATISTICS, Approximation, LayerUnit, MatrixContext, register


@register
class KFAC(Approximation):
    name = "kfac"
    order = 50
    source = LAYER_STATISTICS
    sampled = True
    output_grads = True
    cost = "one forward and fisher_samples backwards per batch (the layers' inputs and output gradients)"
    normalization = "A (x) G with A = sum x x^T / (b*seqlen) and G divided by b*(seqlen-1), so on a single row kfac = gptq * G[o, o] / 2"

    def layer_sums(self, unit: LayerUnit) -> Partial:
        return {"input_gram": unit.input_gram(), "kfac_g_sum": unit.output_gram()}

    def matrix(self, sums: Partial, ctx: MatrixContext) -> torch.Tensor:
        return (sums["input_gram"] / ctx.positions) * (
            sums["kfac_g_sum"] / (ctx.fisher_samples * ctx.n_tokens)
        )
