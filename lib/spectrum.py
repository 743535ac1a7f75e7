"""Spectrum of a symmetric operator given only as a block product ``matmat(V) = H V``: pure functions.

``matmat`` maps ``V`` (``(n, p)``, float64, CPU) to ``H V`` (same shape); each call is one *pass* (for
:class:`lib.operator.HessianOperator`, one pass over the samples serves the whole block). Everything
here is deterministic given ``seed`` and tested on dense float64 matrices.

* :func:`lanczos` -- (block) Lanczos with full reorthogonalization for the extreme eigenvalues.
* :func:`hutchinson_trace`, :func:`hutchpp_trace` -- stochastic trace estimates with standard errors.
* :func:`slq` -- stochastic Lanczos quadrature: Ritz values and weights per probe, and the
  Gaussian-broadened spectral density.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch

MatMat = Callable[[torch.Tensor], torch.Tensor]
"""``V`` ``(n, p)`` -> ``H V`` ``(n, p)`` for a symmetric ``H`` (float64)."""
WHICH = ("largest", "smallest", "both")
F64 = torch.float64


def rademacher(n: int, p: int, seed: int) -> torch.Tensor:
    """``(n, p)`` i.i.d. +-1 entries (float64, CPU) from a generator seeded by ``seed``."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 2, (n, p), generator=g).to(F64).mul_(2).sub_(1)


def _orthogonalize(w: torch.Tensor, q: torch.Tensor | None) -> torch.Tensor:
    """``w - Q (Q^T w)`` twice ("twice is enough", Parlett 1980), ``q``: ``(n, m)`` orthonormal columns or None."""
    if q is None or q.shape[1] == 0:
        return w
    for _ in range(2):
        w = w - q @ (q.T @ w)
    return w


# ----------------------------------------------------------------------------- extreme eigenvalues


@dataclass
class EigResult:
    """Ritz approximations of the wanted eigenpairs of ``H``.

    ``eigenvalues`` ``(k',)`` (largest: descending; smallest: ascending; both: the ``k`` largest then the
    ``k`` smallest); ``eigenvectors`` ``(n, k')`` orthonormal Ritz vectors; ``residuals`` ``||H y - theta y||``
    per pair (the Lanczos residual ``||B_m S_{m,i}||``, equal to it in exact arithmetic); ``converged``:
    ``residual <= tol * max |theta|``; ``ritz_values``: all Ritz values of the last step (ascending);
    ``hvps``: products ``H v``; ``passes``: ``matmat`` calls; ``breakdown``: an invariant subspace was found.
    """

    eigenvalues: torch.Tensor
    eigenvectors: torch.Tensor
    residuals: torch.Tensor
    converged: torch.Tensor
    ritz_values: torch.Tensor
    hvps: int
    passes: int
    breakdown: bool = False


def wanted(theta: torch.Tensor, k: int, which: str) -> torch.Tensor:
    """Indices into ascending ``theta`` of the wanted Ritz values, in the order of :class:`EigResult`."""
    m = theta.numel()
    top = torch.arange(m - 1, max(m - k, 0) - 1, -1)
    bottom = torch.arange(min(k, m))
    return {"largest": top, "smallest": bottom, "both": torch.cat([top, bottom])}[which]


def _block_tridiagonal(alphas: list[torch.Tensor], betas: list[torch.Tensor]) -> torch.Tensor:
    """``T`` with diagonal blocks ``A_j`` (``(p, p)``, symmetric) and sub-diagonal blocks ``B_j`` (``B_j`` below, ``B_j^T`` above)."""
    p = alphas[0].shape[0]
    m = len(alphas)
    t = torch.zeros(m * p, m * p, dtype=F64)
    for j, a in enumerate(alphas):
        t[j * p : (j + 1) * p, j * p : (j + 1) * p] = a
        if j + 1 < m:
            b = betas[j]
            t[(j + 1) * p : (j + 2) * p, j * p : (j + 1) * p] = b
            t[j * p : (j + 1) * p, (j + 1) * p : (j + 2) * p] = b.T
    return t


def lanczos(matmat: MatMat, n: int, k: int, which: str = "largest", block_size: int = 1, tol: float = 1e-8, max_iter: int = 100, seed: int = 0, on_pass: Callable[[int, torch.Tensor], None] | None = None) -> EigResult:
    """Extreme eigenpairs of a symmetric ``H`` (``n x n``) by block Lanczos with full reorthogonalization.

    With ``Q_0`` the orthonormalized seeded Gaussian ``(n, p)`` start block (``p = block_size``), step ``j`` is
    one pass ``W = H Q_j``; ``A_j = Q_j^T W`` (symmetrized); ``R = W - Q_j A_j - Q_{j-1} B_{j-1}^T``, made
    orthogonal to every previous block twice (full reorthogonalization, so no "ghost" copies of converged
    eigenvalues appear); ``R = Q_{j+1} B_j`` (QR). After ``m`` steps ``H Q = Q T_m + Q_m B_{m-1} E_m^T`` with ``T_m``
    block tridiagonal; a Ritz pair ``(theta_i, y_i = Q s_i)`` of ``T_m`` has residual
    ``||H y_i - theta_i y_i|| = ||B_{m-1} s_i[last block]||`` (Golub & Van Loan, *Matrix Computations*, 4th ed.,
    Sec. 10.1 and 10.3; Parlett, *The Symmetric Eigenvalue Problem*, Ch. 13). Stops when the ``k``
    wanted pairs (per end for ``which="both"``) satisfy ``residual <= tol * max|theta|``, after
    ``max_iter`` passes, when the Krylov space fills ``R^n``, or on breakdown (an invariant subspace:
    the Ritz values are then exact). ``on_pass(j, theta)`` is called after each pass.
    """
    if which not in WHICH:
        raise ValueError(f"which must be one of {WHICH}, got {which!r}")
    p = max(1, min(block_size, n))
    g = torch.Generator().manual_seed(seed)
    q_j, _ = torch.linalg.qr(torch.randn(n, p, generator=g, dtype=F64))
    basis = q_j
    alphas: list[torch.Tensor] = []
    betas: list[torch.Tensor] = []
    prev: tuple[torch.Tensor, torch.Tensor] | None = None
    breakdown = False
    passes = 0
    while True:
        w = matmat(q_j).to(F64)
        passes += 1
        a = q_j.T @ w
        a = (a + a.T) / 2
        alphas.append(a)
        r = w - q_j @ a
        if prev is not None:
            r = r - prev[0] @ prev[1].T
        r = _orthogonalize(r, basis)
        q_next, b = torch.linalg.qr(r)
        theta, s = torch.linalg.eigh(_block_tridiagonal(alphas, betas))
        res = (b @ s[-p:, :]).norm(dim=0)
        idx = wanted(theta, k, which)
        scale = float(theta.abs().max()) if theta.numel() else 0.0
        conv = res[idx] <= tol * scale
        if on_pass is not None:
            on_pass(passes, theta)
        full = basis.shape[1] + p > n
        breakdown = bool(b.diagonal().abs().min() <= 1e-13 * max(scale, 1e-300) * math.sqrt(n))
        if bool(conv.all()) and theta.numel() >= min(k, n) or passes >= max_iter or full or breakdown:
            if breakdown or full:  # Q spans an invariant subspace: the Ritz pairs are exact
                res = torch.zeros_like(res)
                conv = torch.ones_like(conv)
            vecs = basis @ s[:, idx]
            return EigResult(theta[idx], vecs, res[idx], conv, theta, passes * p, passes, breakdown or full)
        betas.append(b)
        prev = (q_j, b)
        q_j = q_next
        basis = torch.cat([basis, q_j], dim=1)


# ----------------------------------------------------------------------------- trace


@dataclass
class TraceEstimate:
    """A stochastic trace estimate, its standard error, and its cost (``hvps`` products in ``passes`` passes)."""

    estimate: float
    stderr: float
    hvps: int
    passes: int

    def as_dict(self) -> dict[str, float]:
        return {"estimate": self.estimate, "stderr": self.stderr, "hvps": self.hvps, "passes": self.passes}


def _mean_stderr(samples: torch.Tensor) -> tuple[float, float]:
    """Sample mean and its standard error ``std / sqrt(K)`` (NaN for one sample)."""
    k = samples.numel()
    mean = float(samples.mean())
    return mean, float(samples.std() / math.sqrt(k)) if k > 1 else float("nan")


def hutchinson_trace(matmat: MatMat, n: int, num_hvps: int, seed: int = 0) -> TraceEstimate:
    """Hutchinson's estimator ``tr(H) ~ (1/K) sum_j z_j^T H z_j`` with ``K = num_hvps`` Rademacher probes (one pass).

    Unbiased; ``Var = (2/K) sum_{i != j} H_ij^2``; the stderr is the sample standard deviation over the
    probes divided by ``sqrt(K)`` (Hutchinson 1989, Commun. Stat. Simul. Comput. 18(3); Avron & Toledo 2011, J. ACM 58(2)).
    """
    z = rademacher(n, num_hvps, seed)
    samples = (z * matmat(z)).sum(0)
    mean, se = _mean_stderr(samples)
    return TraceEstimate(mean, se, num_hvps, 1)


def hutchpp_trace(matmat: MatMat, n: int, num_hvps: int, seed: int = 0) -> TraceEstimate:
    """Hutch++ (Meyer, Musco, Musco & Woodruff 2021, SOSA, "Hutch++: optimal stochastic trace estimation"), two passes.

    With ``s = num_hvps // 3`` Rademacher ``S`` and ``g = num_hvps - 2 s`` Rademacher ``G``: ``Q = orth(H S)`` (pass 1),
    ``G' = (I - Q Q^T) G``, then ``[H Q, H G']`` (pass 2) and

        tr(H) ~ tr(Q^T H Q) + (1/g) sum_j g'_j^T H g'_j,

    unbiased; exact low-rank part plus Hutchinson on the deflated remainder, whose standard error is
    reported (the low-rank part has none given ``Q``). Needs ``num_hvps >= 3``.
    """
    if num_hvps < 3:
        raise ValueError(f"Hutch++ needs at least 3 HVPs, got {num_hvps}")
    s = num_hvps // 3
    gcount = num_hvps - 2 * s
    omega = rademacher(n, s + gcount, seed)
    q, _ = torch.linalg.qr(matmat(omega[:, :s]))
    g = _orthogonalize(omega[:, s:], q)
    hv = matmat(torch.cat([q, g], dim=1))
    low = float((q * hv[:, :s]).sum())
    mean, se = _mean_stderr((g * hv[:, s:]).sum(0))
    return TraceEstimate(low + mean, se, num_hvps, 2)


# ----------------------------------------------------------------------------- spectral density


@dataclass
class SLQResult:
    """Stochastic Lanczos quadrature: per probe ``i`` the Ritz values ``ritz_values[i]`` (``(P, m)``) and weights
    ``ritz_weights[i]`` (sum 1; ``NaN``-padded past a breakdown), the broadened density ``values`` on ``grid``,
    the Gaussian width ``sigma``, and the cost."""

    ritz_values: torch.Tensor
    ritz_weights: torch.Tensor
    grid: torch.Tensor
    values: torch.Tensor
    sigma: float
    hvps: int
    passes: int

    def moment(self, m: int) -> tuple[float, float]:
        """Estimate of ``tr(H^m) / n`` = mean over probes of ``sum_j w_j theta_j^m``, and its standard error."""
        per_probe = torch.nansum(self.ritz_weights * self.ritz_values**m, dim=1)
        return _mean_stderr(per_probe)


def broadened_density(theta: torch.Tensor, weights: torch.Tensor, grid: torch.Tensor, sigma: float) -> torch.Tensor:
    """``phi(t) = (1/P) sum_i sum_j w_ij N(t; theta_ij, sigma^2)`` on ``grid`` (NaN entries ignored); integrates to 1."""
    ok = ~torch.isnan(theta)
    th, w = theta[ok], weights[ok]
    z = (grid[:, None] - th[None, :]) / sigma
    return (torch.exp(-0.5 * z**2) * w).sum(1) / (sigma * math.sqrt(2 * math.pi) * theta.shape[0])


def slq(matmat: MatMat, n: int, num_probes: int, steps: int, seed: int = 0, grid_points: int = 1000, sigma: float | None = None, on_pass: Callable[[int], None] | None = None) -> SLQResult:
    """Spectral density by stochastic Lanczos quadrature (Lin, Saad & Yang 2016, SIAM Rev. 58(1); Ghorbani, Krishnan & Xiao 2019, ICML).

    For ``P`` normalized Rademacher probes ``v_i = z_i / sqrt(n)``, ``m = steps`` Lanczos steps each (all probes
    advanced together: one pass of ``H`` on the ``(n, P)`` block per step; each probe's vector made
    orthogonal to its own basis twice) give ``T_i = S_i diag(theta_i) S_i^T``; then

        v_i^T f(H) v_i ~ sum_j w_ij f(theta_ij),   w_ij = (S_i)_{0j}^2,   E[v_i^T f(H) v_i] = tr f(H) / n,

    exact for polynomials of degree < 2m (Gauss quadrature). The density is that measure broadened by a
    Gaussian of width ``sigma`` (default: 1% of the Ritz range) on ``grid_points`` points padded by ``5 sigma``.
    A probe whose recurrence breaks down (``beta ~ 0``: its Krylov space is invariant) stops there, exactly.
    """
    steps = max(1, min(steps, n))
    v = rademacher(n, num_probes, seed) / math.sqrt(n)  # (n, P)
    bases = torch.zeros(num_probes, steps, n, dtype=F64)
    alpha = torch.full((num_probes, steps), float("nan"), dtype=F64)
    beta = torch.zeros(num_probes, steps, dtype=F64)
    active = torch.ones(num_probes, dtype=torch.bool)
    length = torch.zeros(num_probes, dtype=torch.long)
    prev = torch.zeros_like(v)
    passes = hvps = 0
    for j in range(steps):
        ids = active.nonzero().flatten()
        bases[ids, j] = v[:, ids].T
        w = matmat(v[:, ids]).to(F64)
        passes += 1
        hvps += len(ids)
        if on_pass is not None:
            on_pass(passes)
        a = (v[:, ids] * w).sum(0)
        alpha[ids, j] = a
        length[ids] = j + 1
        w = w - v[:, ids] * a - prev[:, ids] * (beta[ids, j - 1] if j else 0)
        q = bases[ids, : j + 1]  # (P', j+1, n)
        for _ in range(2):
            w = w - torch.einsum("pjn,pj->np", q, torch.einsum("pjn,np->pj", q, w))
        b = w.norm(dim=0)
        beta[ids, j] = b
        stop = b <= 1e-12 * a.abs().clamp_min(1e-300) * math.sqrt(n)
        active[ids[stop]] = False
        prev = v.clone()
        v = v.clone()
        v[:, ids] = w / torch.where(stop, torch.ones_like(b), b)
        if not bool(active.any()):
            break
    m = int(length.max())
    ritz = torch.full((num_probes, m), float("nan"), dtype=F64)
    weights = torch.full((num_probes, m), float("nan"), dtype=F64)
    for i in range(num_probes):
        li = int(length[i])
        t = torch.diag(alpha[i, :li]) + torch.diag(beta[i, : li - 1], 1) + torch.diag(beta[i, : li - 1], -1)
        th, s = torch.linalg.eigh(t)
        ritz[i, :li], weights[i, :li] = th, s[0] ** 2
    lo, hi = float(torch.nan_to_num(ritz, nan=float("inf")).min()), float(torch.nan_to_num(ritz, nan=float("-inf")).max())
    sig = sigma if sigma is not None else max((hi - lo) / 100, 1e-12 * max(abs(lo), abs(hi), 1e-300))
    grid = torch.linspace(lo - 5 * sig, hi + 5 * sig, grid_points, dtype=F64)
    return SLQResult(ritz, weights, grid, broadened_density(ritz, weights, grid, sig), sig, hvps, passes)


def exact_density(eigenvalues: torch.Tensor, grid_points: int = 1000, sigma: float | None = None) -> SLQResult:
    """The density of known eigenvalues (the exact path) in :class:`SLQResult` form: one "probe", weights ``1/n``."""
    ev = eigenvalues.to(F64).reshape(1, -1)
    lo, hi = float(ev.min()), float(ev.max())
    sig = sigma if sigma is not None else max((hi - lo) / 100, 1e-12 * max(abs(lo), abs(hi), 1e-300))
    grid = torch.linspace(lo - 5 * sig, hi + 5 * sig, grid_points, dtype=F64)
    w = torch.full_like(ev, 1 / ev.numel())
    return SLQResult(ev, w, grid, broadened_density(ev, w, grid, sig), sig, 0, 0)
