"""The generalized Gauss-Newton matrix: ``G = sum_t J_t^T (diag p_t - p_t p_t^T) J_t / N``.

The Hessian without the network's second derivatives (positive semi-definite). References: Schraudolph 2002, "Fast
curvature matrix-vector products for second-order gradient descent", Neural Comput. 14; Martens 2020, "New insights
and perspectives on the natural gradient method", JMLR 21.

Cost: ``n`` Jacobian-vector products per batch (the logit Jacobian, shared with ``fisher`` and ``empirical_fisher``).
Plan: per token chunk ``C = J_t``, add :func:`ggn_sum` as ``ggn_sum``. Finish: divide by ``N``.
"""

from __future__ import annotations

import torch

from ...runtime.jobs import Partial
from .base import LOGIT_JACOBIAN, Approximation, JacobianUnit, MatrixContext, register


def ggn_sum(c: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
    """``sum_t C_t^T (diag p_t - p_t p_t^T) C_t`` for logit Jacobians ``c`` (``(T, V, n)``) and ``p`` (``(T, V)``); ``(n, n)``."""
    u = torch.bmm(p.unsqueeze(1), c).squeeze(1)
    flat = c.reshape(-1, c.shape[-1])
    return (flat * p.reshape(-1, 1)).T @ flat - u.T @ u


class _Sum:
    def __init__(self, n: int):
        self.total = torch.zeros(n, n, dtype=torch.float64)

    def add(self, tokens: slice, c: torch.Tensor, p: torch.Tensor) -> None:
        self.total += ggn_sum(c, p).cpu()

    def result(self) -> Partial:
        return {"ggn_sum": self.total}


@register
class GGN(Approximation):
    name = "ggn"
    order = 10
    source = LOGIT_JACOBIAN
    cost = "n Jacobian-vector products per batch (the logit Jacobian, shared with fisher and empirical_fisher)"
    normalization = "sum_t J_t^T (diag p_t - p_t p_t^T) J_t / (b*(seqlen-1))"

    def jacobian_accumulator(self, unit: JacobianUnit) -> _Sum:
        return _Sum(unit.n)

    def matrix(self, sums: Partial, ctx: MatrixContext) -> torch.Tensor:
        return sums["ggn_sum"] / ctx.n_tokens
