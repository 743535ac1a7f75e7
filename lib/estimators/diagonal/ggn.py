"""Hutchinson on the generalized Gauss-Newton matrix: ``diag(G) ~ (1/K) sum_j z_j * (G z_j)``.

``G = sum_t J_t^T (diag p_t - p_t p_t^T) J_t`` with ``J_t`` the Jacobian of position ``t``'s logits (the softmax's
inputs) w.r.t. ``x`` and ``p_t`` their softmax; the probes are Hutchinson's (the same ``z_j``). An unbiased estimate
of ``diag(G)``, not of ``diag(H)``: ``H = G +`` the terms with the network's second derivatives. References:
Schraudolph 2002, "Fast curvature matrix-vector products for second-order gradient descent"; Martens 2020, "New
insights and perspectives on the natural gradient method", JMLR 21.

Cost: ``K`` Gauss-Newton-vector products per sample and weight, each one Jacobian-vector product (forward mode where it
runs and measures faster, else a double backward: :class:`lib.objective.forward.JVPPolicy`; probes in blocks of
:data:`GGN_BLOCK`) and one vector-Jacobian product of the network: no second backward through it. Plan:
:class:`GGNProbes` (its own work: it needs the model, not the Hessian's products). Finish: ``ggn / K``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn.functional as F

from ...objective.forward import JVPPolicy
from ...objective.loss import SubsetLoss
from ...runtime.jobs import Partial
from .base import (
    DiagonalEstimator,
    Finish,
    ParamPlan,
    Progress,
    Target,
    Unit,
    Work,
    rademacher_probes,
    register,
)

GGN_BLOCK = 16
"""Hutchinson probes of the GGN diagonal per block of Jacobian-vector products."""


def jvp_on_graph_kept(jt_u: torch.Tensor, u: torch.Tensor, vectors: torch.Tensor) -> torch.Tensor:
    """``J v`` for the rows of ``vectors`` (``(m, n)``) on a kept double-backward graph ``jt_u = J^T u`` (kept after)."""
    return torch.stack(
        [torch.autograd.grad(jt_u, u, grad_outputs=v, retain_graph=True)[0] for v in vectors]
    )


class GGNOperator:
    """``v -> G v`` with ``G = sum_t J_t^T (diag p_t - p_t p_t^T) J_t`` the GGN of ``objective``'s summed NLL on one batch at ``x0``.

    Built once per batch (one forward and one ``create_graph`` VJP ``J^T u`` for a dummy ``u``); each product is
    one JVP ``J v`` (:meth:`matmat`: by a :class:`lib.objective.forward.JVPPolicy`; :meth:`matvec`: double backward), the
    softmax Hessian through the head, and one VJP:
    no Hessian of the network is formed. ``J`` is the Jacobian of the softmax's inputs (the head's inputs
    with the fused head). :attr:`nll` is the batch's summed NLL.
    """

    def __init__(self, objective: SubsetLoss, x0: torch.Tensor, input_ids: torch.Tensor):
        self.x = x0.detach().clone().requires_grad_(True)
        self.feats, self.weight, bias = objective.features(self.x, input_ids)
        f = self.feats.detach()
        logits = (
            f
            if self.weight is None
            else f @ self.weight.detach().T + (0 if bias is None else bias.detach())
        )
        self.p = torch.softmax(logits, -1)
        labels = input_ids[:, 1:].reshape(-1).to(logits.device)
        self.nll = F.cross_entropy(logits, labels, reduction="sum")
        self.u = torch.zeros_like(self.feats, requires_grad=True)
        (self.jt_u,) = torch.autograd.grad(
            self.feats, self.x, grad_outputs=self.u, create_graph=True
        )
        self._fn = lambda z: objective.features(z, input_ids)[0]  # noqa: E731 -- for forward-mode J v
        n = self.x.numel()
        self.shape, self.dtype, self.device = (n, n), self.x.dtype, self.x.device

    def matmat(self, v: torch.Tensor, jvp: JVPPolicy | None = None) -> torch.Tensor:
        """``G V`` for ``V`` of shape ``(n, p)`` (:class:`lib.products.linop.CurvatureOperator`); :meth:`matmat_rows` on
        ``V^T``."""
        return self.matmat_rows(v.T, jvp).T

    def matmat_rows(self, vs: torch.Tensor, jvp: JVPPolicy | None = None) -> torch.Tensor:
        """``G v`` for the rows ``v`` of ``vs`` (``(m, n)``): the ``J v`` by ``jvp`` (:class:`lib.objective.forward.JVPPolicy`;
        default double backward on this operator's graph), then one batched VJP; ``(m, n)``."""
        x = self.x.detach()
        back = lambda v: jvp_on_graph_kept(self.jt_u, self.u, v.to(x))  # noqa: E731
        jv = (jvp or JVPPolicy("double-backward")).columns(self._fn, x, vs.to(x), back)
        w = self.weight.detach() if self.weight is not None else None
        a = jv if w is None else jv @ w.T
        k = self.p * (a - (self.p * a).sum(-1, keepdim=True))
        grads = k if w is None else k @ w
        (gv,) = torch.autograd.grad(
            self.feats, self.x, grad_outputs=grads, retain_graph=True, is_grads_batched=True
        )
        return gv

    def matvec(self, v: torch.Tensor) -> torch.Tensor:
        """``G v`` for ``v``: ``(n,)``."""
        (jv,) = torch.autograd.grad(self.jt_u, self.u, grad_outputs=v.to(self.x), retain_graph=True)
        w = self.weight.detach() if self.weight is not None else None
        a = jv if w is None else jv @ w.T
        k = self.p * (a - (self.p * a).sum(-1, keepdim=True))
        (gv,) = torch.autograd.grad(
            self.feats, self.x, grad_outputs=k if w is None else k @ w, retain_graph=True
        )
        return gv


@dataclass
class GGNProbes(Work):
    """Hutchinson probes ``z_0..z_{count-1}`` on the batch's GGN: ``sum_j z_j * (G z_j)`` as ``ggn`` (``(n,)``)."""

    count: int
    order: ClassVar[int] = 0  # first: its forward gives the batch's NLL

    def merge(self, other: Work) -> None:
        self.count = max(self.count, other.count)

    def steps(self) -> int:
        return self.count

    def entries(self, numel: int) -> int:
        return numel

    def config(self) -> dict[str, Any]:
        return {"count": self.count}

    def run(self, unit: Unit, progress: Progress | None) -> Partial:
        if unit.objective is None:
            raise ValueError(
                "the GGN estimator needs a model (its Jacobians), not only Hessian-vector products"
            )
        op = GGNOperator(unit.objective, unit.x0, unit.batch)
        x0 = unit.x0
        jvp = unit.jvp if unit.jvp is not None else JVPPolicy()
        out = torch.zeros_like(x0)
        for a in range(
            0, self.count, GGN_BLOCK
        ):  # J z by forward mode where it measures faster (lib.objective.forward)
            z = rademacher_probes(
                unit.numel, unit.seed, unit.param_name, a, min(self.count, a + GGN_BLOCK), x0.dtype
            )
            z = z.to(x0.device)
            out += (z * op.matmat_rows(z, jvp)).sum(0)
            if progress is not None:
                progress(len(z))
        unit.offer_nll(op.nll)
        return {"ggn": out}


@register
class GGNDiagonal(DiagonalEstimator):
    name = "ggn"
    order = 40
    summary = "Hutchinson on the Gauss-Newton matrix: K probes of one JVP + one VJP each, no second backward"
    cost = "K Gauss-Newton-vector products per sample and weight (one JVP + one VJP each)"
    normalization = (
        "the diagonal of the Gauss-Newton matrix sum_t J_t^T (diag p_t - p_t p_t^T) J_t / {n}"
    )
    estimates_hessian = False
    min_k = 1

    def hvps_per_sample(self, numel: int, k: int) -> int:
        return k

    def plan(self, plan: ParamPlan, target: Target, k: int, seed: int) -> None:
        plan.add(GGNProbes(k))

    def finish(self, fin: Finish) -> torch.Tensor:
        return fin.get("ggn") / fin.k
