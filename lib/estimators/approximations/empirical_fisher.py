"""The empirical Fisher: ``sum_s g_s g_s^T / N`` with ``g_s`` the gradient of sample ``s``'s summed NLL at its true labels.

The outer products whose diagonal the diagonal script's ``empirical_fisher`` estimator sums. Not the Fisher
information unless the model generated the data. Reference: Kunstner, Hennig & Balles 2019, "Limitations of the
empirical Fisher approximation for natural gradient descent", NeurIPS.

Cost: the logit Jacobian (``n`` JVPs per batch, shared). Plan: per chunk, add each position's true-label gradient
``J_t^T (p_t - e_{y_t})`` to its sample's gradient; per batch, ``sum_s g_s g_s^T`` as ``empirical_fisher_sum``.
Finish: divide by ``N``.
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
)


class _Sum:
    def __init__(self, unit: JacobianUnit):
        self.unit = unit
        self.grads = torch.zeros(unit.inputs.batch.shape[0], unit.n, dtype=torch.float64)

    def add(self, tokens: slice, c: torch.Tensor, p: torch.Tensor) -> None:
        self.grads.index_add_(
            0, self.unit.rows[tokens], label_gradients(c, p, self.unit.true[tokens]).cpu()
        )

    def result(self) -> Partial:
        return {"empirical_fisher_sum": self.grads.T @ self.grads}


@register
class EmpiricalFisher(Approximation):
    name = "empirical_fisher"
    order = 30
    source = LOGIT_JACOBIAN
    cost = "the logit Jacobian (n Jacobian-vector products per batch, shared)"
    normalization = "sum_s g_s g_s^T / (b*(seqlen-1))"

    def jacobian_accumulator(self, unit: JacobianUnit) -> _Sum:
        return _Sum(unit)

    def matrix(self, sums: Partial, ctx: MatrixContext) -> torch.Tensor:
        return sums["empirical_fisher_sum"] / ctx.n_tokens
