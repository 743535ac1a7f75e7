"""The sampled ("true") Fisher: ``F = sum_t E_{y ~ p_t}[g_t g_t^T] / N`` with ``g_t = J_t^T (p_t - e_y)``.

Estimated with ``S`` = ``fisher_samples`` labels drawn from the model per position (:func:`sample_labels`). Since
``E_y[(p - e_y)(p - e_y)^T] = diag p - p p^T`` it is an unbiased estimate of the GGN for softmax cross-entropy (its
error falls like ``1/sqrt(S)``). Reference: Martens 2020, "New insights and perspectives on the natural gradient
method", JMLR 21, Sec. 9; Kunstner, Hennig & Balles 2019, "Limitations of the empirical Fisher approximation".

Cost: the logit Jacobian (``n`` JVPs per batch, shared) and ``S`` label draws per position. Plan: per chunk, add
``sum_t g_t g_t^T`` for each draw as ``fisher_sum``. Finish: divide by ``S * N``.
"""

from __future__ import annotations

import torch

from ...runtime.jobs import Partial
from .base import (
    LOGIT_JACOBIAN,
    Approximation,
    JacobianUnit,
    MatrixContext,
    label_gradients,
    register,
    sample_labels,
)


class _Sum:
    def __init__(self, unit: JacobianUnit):
        b, p, r = unit.inputs, unit.p, unit.per_row
        rows = range(b.batch.shape[0])
        self.labels = [
            torch.cat([sample_labels(p[i * r : (i + 1) * r], b.seed, b.first + i, j) for i in rows])
            for j in range(b.fisher_samples)
        ]
        self.total = torch.zeros(unit.n, unit.n, dtype=torch.float64)

    def add(self, tokens: slice, c: torch.Tensor, p: torch.Tensor) -> None:
        for y in self.labels:
            g = label_gradients(c, p, y[tokens])
            self.total += (g.T @ g).cpu()

    def result(self) -> Partial:
        return {"fisher_sum": self.total}


@register
class SampledFisher(Approximation):
    name = "fisher"
    order = 20
    source = LOGIT_JACOBIAN
    sampled = True
    cost = "the logit Jacobian (n Jacobian-vector products per batch, shared) and fisher_samples label draws per position"
    normalization = (
        "sum_t E_y[g_t g_t^T] / (b*(seqlen-1)), the expectation over fisher_samples draws"
    )

    def jacobian_accumulator(self, unit: JacobianUnit) -> _Sum:
        return _Sum(unit)

    def matrix(self, sums: Partial, ctx: MatrixContext) -> torch.Tensor:
        return sums["fisher_sum"] / (ctx.fisher_samples * ctx.n_tokens)
