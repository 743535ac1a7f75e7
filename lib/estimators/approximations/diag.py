"""The Hessian's own diagonal as a matrix, ``diag(H)``: what a diagonal preconditioner keeps of the exact Hessian.

Cost: nothing beyond the exact Hessian. Plan: none. Finish: ``torch.diag(H.diagonal())``.
"""

from __future__ import annotations

import torch

from ...runtime.jobs import Partial
from .base import Approximation, MatrixContext, register


@register
class Diagonal(Approximation):
    name = "diag"
    order = 60
    cost = "none beyond the exact Hessian"
    normalization = "diag(H)"

    def matrix(self, sums: Partial, ctx: MatrixContext) -> torch.Tensor:
        return torch.diag(ctx.exact.diagonal())
