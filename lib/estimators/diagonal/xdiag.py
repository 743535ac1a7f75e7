"""XDiag: ``diag(H)`` from a sketch ``H Omega`` whose probes, each left out of the basis in turn, also correct it.

With ``s = K/2`` Rademacher probes ``Omega = [w_1..w_s]``, ``Y = H Omega = QR`` and ``Q_i`` an orthonormal basis of
``H Omega`` without column ``i``, XDiag averages over ``i`` the estimates ``diag(Q_i Q_i^T H) + w_i * ((I - Q_i Q_i^T) H w_i)``:
the low-rank part is exact and each probe is used both to build the basis and, left out of it, to correct it
(closed form in :func:`xdiag_estimate`). Unbiased. Reference: Epperly, Tropp & Webber 2024, "XTrace: making the most
of every sample in stochastic trace estimation", SIAM J. Matrix Anal. Appl. 45(1), Sec. 2.4.

Cost: ``K`` HVPs per sample and weight, in two passes over the samples: ``Q`` depends on the sum over *all* samples of
``H Omega``. Plan: phase 1, the first ``K/2`` probes with their products kept (``Y^T``, shared with Hutchinson's
probes); phase 2, ``H Q`` (:class:`Rows`). Finish: the closed form; its estimate after ``s' <= s`` probes comes from
prefixes of ``Omega, Q, R, Z`` (a QR of the first ``s'`` columns of ``Y`` is the prefix of the QR of ``Y``), so its
convergence curve costs no extra HVPs.
"""

from __future__ import annotations

import torch

from ...errors import ParamError
from .base import (
    DiagonalEstimator,
    Finish,
    ParamPlan,
    Probes,
    Rows,
    Target,
    convergence_curve,
    log_grid,
    monitor_entries,
    rademacher_probes,
    register,
)


def xdiag_basis(y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``Q, R`` (reduced QR, float64) of the sketch ``Y = H Omega`` given as rows ``y = Y^T`` (``(s, n)``).

    Raises :class:`~lib.errors.ParamError` (a ``ValueError``) if ``Y`` is numerically rank deficient (``H`` of rank below ``s``).

    Args:
        y: ``(s, n)`` the sketch's transpose, rows ``H omega_i``.

    Returns:
        ``(Q, R)``: ``Q`` ``(n, s)`` with orthonormal columns and ``R`` ``(s, s)`` upper triangular, float64.

    Raises:
        ParamError: ``Y`` is numerically rank deficient or not finite (parameter ``hvps``).
    """
    q, r = torch.linalg.qr(y.to(torch.float64).T)
    d = r.diagonal().abs()
    if not bool(torch.isfinite(r).all()) or (d.numel() > 0 and bool((d <= 1e-12 * d.max()).any())):
        raise ParamError(
            "hvps",
            f"the XDiag sketch H*Omega has rank below {y.shape[0]}: the Hessian's rank is smaller than hvps/2; use the exact estimator or fewer HVPs",
        )
    return q, r


def xdiag_estimate(
    omega: torch.Tensor, q: torch.Tensor, z: torch.Tensor, r: torch.Tensor, s: int | None = None
) -> torch.Tensor:
    """XDiag estimate of ``diag(H)`` from its first ``s`` probes, on the rows given (any subset of entries).

    ``omega``: ``(m, S)`` Rademacher probes; ``q``: ``(m, S)`` rows of ``Q`` (``H Omega = Q R``); ``z``: ``(m, S)``
    rows of ``Z = H Q``; ``r``: ``(S, S)``. Uses the prefixes ``[:, :s]`` / ``[:s, :s]`` (default ``s = S``),
    which are exactly XDiag with ``s`` probes. Closed form of the average over ``i`` of
    ``diag(Q_i Q_i^T H) + w_i * (I - Q_i Q_i^T) H w_i``: with ``t_i`` the ``i``-th column of ``R^{-T}`` normalized,
    ``Q_i Q_i^T = Q (I - t_i t_i^T) Q^T`` and ``(I - Q_i Q_i^T) H w_i = Q t_i (t_i^T R e_i)``, so

        est = rowsum(Q * Z) + (1/s) sum_i [ -(Q t_i) * (Z t_i) + (t_i^T R e_i) w_i * (Q t_i) ].

    Args:
        omega: ``(m, S)`` the probes' rows for the ``m`` entries.
        q: ``(m, S)`` the same rows of ``Q``.
        z: ``(m, S)`` the same rows of ``Z = H Q``.
        r: ``(S, S)`` upper triangular ``R``.
        s: probes used, ``1 <= s <= S``; ``None``: ``S``.

    Returns:
        ``(m,)`` float64: the estimated diagonal entries.
    """
    s = r.shape[0] if s is None else s
    om, qs, zs, rs = (a.to(torch.float64) for a in (omega[:, :s], q[:, :s], z[:, :s], r[:s, :s]))
    eye = torch.eye(s, dtype=torch.float64)
    t = torch.linalg.solve_triangular(rs, eye, upper=True).T  # R^{-T}
    t = t / t.norm(dim=0, keepdim=True)
    c = (t * rs).sum(0)  # t_i . R e_i
    qt, zt = qs @ t, zs @ t
    return (qs * zs).sum(1) + ((om * qt * c) - qt * zt).mean(1)


@register
class XDiag(DiagonalEstimator):
    """The XDiag estimator of the diagonal (module docstring): ``K/2`` probes, then ``K/2`` products ``H Q``."""

    name = "xdiag"
    order = 20
    summary = "variance-reduced, unbiased"
    cost = "K HVPs per sample and weight: K/2 probes (phase 1), K/2 basis vectors (phase 2)"
    min_k = 2
    k_multiple = 2
    k_reason = "uses K/2 probes and K/2 basis vectors"
    max_k_per_entry = 2
    curve = True
    phases = 2

    def hvps_per_sample(self, numel: int, k: int) -> int:
        return 2 * (k // 2)

    def plan(self, plan: ParamPlan, target: Target, k: int, seed: int) -> None:
        plan.add(Probes(k // 2, keep=k // 2))

    def plan_next(self, phase: int, plan: ParamPlan, fin: Finish) -> None:
        q, r = xdiag_basis(fin.get("hz"))
        t = fin.target
        omega = rademacher_probes(t.numel, fin.seed, t.param_name, 0, fin.k // 2).T
        fin.state[self.name] = (omega, q, r)
        plan.add(Rows(q.T.to(fin.dtype).contiguous(), what="hq"))

    def finish(self, fin: Finish) -> torch.Tensor:
        omega, q, r = fin.state[self.name]
        return xdiag_estimate(omega, q, fin.get("hq", phase=2).T, r)

    def convergence(self, fin: Finish, exact: torch.Tensor) -> tuple[dict[str, list], int]:
        t = fin.target
        omega, q, r = fin.state[self.name]
        s = r.shape[0]
        monitor = monitor_entries(t.numel, s, fin.seed)
        rows = torch.cat([t.tracked, monitor]).unique()
        pos = lambda idx: torch.searchsorted(rows, idx)  # noqa: E731
        om, qr_, z = omega[rows], q[rows], fin.get("hq", phase=2).T[rows]
        est = lambda j: xdiag_estimate(om, qr_, z, r, j // 2) / fin.n_tokens  # noqa: E731
        return convergence_curve(
            est, log_grid(2 * s, step=2), pos(t.tracked), pos(monitor), exact
        ), len(monitor)
