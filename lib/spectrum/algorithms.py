"""Spectrum of a symmetric operator given only as a block product ``matmat(V) = H V``: pure functions.

``matmat`` maps a block ``V`` (``(n, p)``; float64 on the host by default) to ``H V`` (same shape); each call is
one *pass* (for :class:`lib.products.operator.HessianOperator`, one pass over the samples serves the whole block).
Every ``n``-vector operation goes through a :class:`lib.spectrum.vectors.VectorSpace` (``space``; default: all of it
in this process, float64 on the host): blocks may be sharded over ranks (each holds ``(local, p)``; inner
products are all-reduced, :mod:`lib.products.fsdp`), kept in another dtype, and the vectors an algorithm must remember
are a :class:`lib.spectrum.vectors.Basis` on the device, the host or disk (``storage``). Everything here is
deterministic given ``seed`` (random vectors are global, :meth:`lib.spectrum.vectors.VectorSpace.random`) and tested
on dense float64 matrices.

* :func:`lanczos` -- (block) Lanczos for the extreme eigenvalues, with ``reorth`` full, selective or none
  (ghost eigenvalues filtered, :func:`cullum_willoughby`).
* :func:`hutchinson_trace`, :func:`hutchpp_trace` -- stochastic trace estimates with standard errors.
* :func:`slq` -- stochastic Lanczos quadrature: Ritz values and weights per probe, and the
  Gaussian-broadened spectral density.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from .. import constants
from .vectors import Basis, VectorSpace, local_space

MatMat = Callable[[torch.Tensor], torch.Tensor]
"""``V`` ``(n, p)`` (or a rank's ``(local, p)``) -> ``H V`` of the same shape, for a symmetric ``H``."""
WHICH = constants.WHICH
REORTH = constants.REORTH
"""Lanczos reorthogonalization: ``full`` (every step against the whole basis: ``2 m`` passes over the ``m`` stored
vectors per step, so ``O(n m^2)`` work overall); ``selective`` (Parlett & Scott 1979: only against Ritz vectors that
have converged, formed from the stored basis once each; the basis may live on the host or disk); ``none`` (the plain
three-term recurrence, 3 vectors, no basis unless eigenvectors are wanted; converged eigenvalues come back as
"ghost" copies, removed by :func:`cullum_willoughby`)."""
F64 = torch.float64


def rademacher(n: int, p: int, seed: int) -> torch.Tensor:
    """``(n, p)`` i.i.d. +-1 entries (float64, host): columns ``0..p-1`` of the global draw ``seed`` (:meth:`VectorSpace.random`)."""
    return local_space(n).random(p, seed, "rademacher")


# ----------------------------------------------------------------------------- extreme eigenvalues


@dataclass
class EigResult:
    """Ritz approximations of the wanted eigenpairs of ``H``.

    ``eigenvalues`` ``(k',)`` (largest: descending; smallest: ascending; both: the ``k`` largest then the
    ``k`` smallest); ``eigenvectors`` ``(n, k')`` (a block of the space; ``None`` when no basis was kept) orthonormal
    Ritz vectors; ``residuals`` ``||H y - theta y||`` per pair (the Lanczos residual ``||B_m S_{m,i}||``, equal to it in
    exact arithmetic); ``converged``: ``residual <= tol * max |theta|``; ``ritz_values``: the Ritz values of the last
    step (ascending; ghosts removed with ``reorth="none"``); ``hvps``: products ``H v``; ``passes``: ``matmat`` calls;
    ``breakdown``: an invariant subspace was found; ``ghosts``: Ritz values removed as spurious or duplicate.
    """

    eigenvalues: torch.Tensor
    eigenvectors: torch.Tensor | None
    residuals: torch.Tensor
    converged: torch.Tensor
    ritz_values: torch.Tensor
    hvps: int
    passes: int
    breakdown: bool = False
    ghosts: int = 0
    reorth: str = "full"
    stored_vectors: int = 0


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


def cullum_willoughby(
    t: torch.Tensor, tol: float, residuals: torch.Tensor | None = None, converged: float = 0.0
) -> torch.Tensor:
    """Indices into the ascending eigenvalues of the tridiagonal ``T`` (``(m, m)``) of the genuine Ritz values, by the
    test of Cullum & Willoughby (1985, *Lanczos Algorithms for Large Symmetric Eigenvalue Computations*, Vol. 1, Ch. 4):
    values within ``tol`` of each other are copies of one converged eigenvalue (the first is kept); a *simple* value
    within ``tol`` of an eigenvalue of ``T`` without its first row and column is spurious (a ghost) and dropped. With
    the Ritz ``residuals`` (ascending order too), a value whose interval ``theta +- residual`` reaches a kept *converged*
    one (residual at most ``converged``) is a copy of it still converging, and dropped as well."""
    keep = _cullum_willoughby(t, tol)
    if residuals is None:
        return keep
    theta = torch.linalg.eigvalsh(t)
    kept: list[int] = []
    for i in sorted(keep.tolist(), key=lambda i: float(residuals[i])):
        near = [
            j
            for j in kept
            if float(residuals[j]) <= converged
            and abs(float(theta[i] - theta[j])) <= float(residuals[i] + residuals[j]) + tol
        ]
        if not near:
            kept.append(i)
    return torch.tensor(sorted(kept), dtype=torch.long)


def _cullum_willoughby(t: torch.Tensor, tol: float) -> torch.Tensor:
    theta = torch.linalg.eigvalsh(t)
    hat = torch.linalg.eigvalsh(t[1:, 1:]) if t.shape[0] > 1 else torch.zeros(0, dtype=t.dtype)
    keep: list[int] = []
    i, m = 0, theta.numel()
    while i < m:
        j = i
        while j + 1 < m and float(theta[j + 1] - theta[j]) <= tol:
            j += 1
        if j > i or hat.numel() == 0 or float((hat - theta[i]).abs().min()) > tol:
            keep.append(i)
        i = j + 1
    return torch.tensor(keep, dtype=torch.long)


def _selective(
    space: VectorSpace,
    r: torch.Tensor,
    theta: torch.Tensor,
    s: torch.Tensor,
    scale: float,
    basis: Basis,
    good: Basis,
    good_values: list[float],
) -> torch.Tensor:
    """Selective reorthogonalization's step: the Ritz vectors ``basis @ s[:, i]`` of ``T`` (eigenpairs ``theta``,
    ``s``) whose residual estimate ``||r|| |s[-1, i]||`` is below ``sqrt(eps) * scale`` and not yet locked join
    the orthonormal set ``good`` (their values in ``good_values``); returns ``r`` made orthogonal to ``good``."""
    eps = torch.finfo(F64).eps
    beta_est = float(space.colnorms(r)[0])
    for i in (beta_est * s[-1, :].abs() <= math.sqrt(eps) * scale).nonzero().flatten().tolist():
        if any(abs(float(theta[i]) - g) <= 1e-6 * scale for g in good_values):
            continue
        good_values.append(float(theta[i]))
        y = good.orthogonalize(basis.combine(s[:, i : i + 1]))
        norm = float(space.colnorms(y)[0])
        if norm > 0.5:
            good.append(y / norm)
    return good.orthogonalize(r)


def lanczos(
    matmat: MatMat,
    n: int,
    k: int,
    which: str = "largest",
    block_size: int = 1,
    tol: float = 1e-8,
    max_iter: int = 100,
    seed: int = 0,
    on_pass: Callable[[int, torch.Tensor], None] | None = None,
    space: VectorSpace | None = None,
    reorth: str = "full",
    storage: str = "device",
    storage_dir: Path | None = None,
    eigenvectors: bool = True,
) -> EigResult:
    """Extreme eigenpairs of a symmetric ``H`` (``n x n``) by block Lanczos.

    With ``Q_0`` the orthonormalized seeded Gaussian ``(n, p)`` start block (``p = block_size``), step ``j`` is
    one pass ``W = H Q_j``; ``R = W - Q_{j-1} B_{j-1}^T``, ``A_j = Q_j^T R`` (symmetrized), ``R = R - Q_j A_j`` made
    orthogonal to ``Q_j`` once more, then (``reorth="full"``) to every previous block twice (no "ghost" copies of
    converged eigenvalues appear); ``R = Q_{j+1} B_j`` (QR). After ``m`` steps ``H Q = Q T_m + Q_m B_{m-1} E_m^T`` with ``T_m``
    block tridiagonal; a Ritz pair ``(theta_i, y_i = Q s_i)`` of ``T_m`` has residual
    ``||H y_i - theta_i y_i|| = ||B_{m-1} s_i[last block]||`` (Golub & Van Loan, *Matrix Computations*, 4th ed.,
    Sec. 10.1 and 10.3; Parlett, *The Symmetric Eigenvalue Problem*, Ch. 13). ``reorth="selective"`` (``p = 1``) instead
    orthogonalizes ``R`` against each Ritz vector once its residual is below ``sqrt(eps) ||T||`` (Parlett & Scott 1979);
    ``"none"`` (``p = 1``) keeps only the recurrence and filters the Ritz values with :func:`cullum_willoughby` (tolerance
    ``100 eps max|theta|``, ``eps`` of the vectors' dtype, and the residual intervals). Stops when the ``k`` wanted pairs (per end for ``which="both"``) satisfy
    ``residual <= tol * max|theta|``, after ``max_iter`` passes, when the Krylov space fills ``R^n`` (full), or on
    breakdown (an invariant subspace: the Ritz values are then exact). ``on_pass(j, theta)`` is called after each pass.
    The basis is kept on ``storage`` (``device``, ``cpu``, ``disk`` under ``storage_dir``) when reorthogonalization or
    ``eigenvectors`` need it.
    """
    p = _block_width(which, reorth, block_size, n)
    space = space or local_space(n)
    q_j, _ = space.qr(space.random(p, seed, "gaussian"))
    keep_basis = reorth in ("full", "selective") or eigenvectors
    basis = Basis(space, storage, storage_dir) if keep_basis else None
    good = Basis(space, storage, storage_dir) if reorth == "selective" else None
    good_values: list[float] = []
    alphas: list[torch.Tensor] = []
    betas: list[torch.Tensor] = []
    prev: tuple[torch.Tensor, torch.Tensor] | None = None
    passes = 0
    cw_tol = 100 * torch.finfo(space.dtype).eps  # ghost copies agree to the vectors' rounding
    try:
        while True:
            if basis is not None:
                basis.append(q_j)
            r, a = _recurrence(space, q_j, space.block(matmat(q_j)), prev)
            passes += 1
            alphas.append(a)
            if reorth == "full":
                r = basis.orthogonalize(r)
            t = _block_tridiagonal(alphas, betas)
            theta, s = torch.linalg.eigh(t)
            scale = float(theta.abs().max()) if theta.numel() else 0.0
            if reorth == "selective":
                r = _selective(space, r, theta, s, scale, basis, good, good_values)
            q_next, b = space.qr(r)
            ritz = _ritz_pairs(t, theta, s, b, p, reorth, cw_tol, scale, tol, k, which)
            if on_pass is not None:
                on_pass(passes, ritz.th)
            full = reorth == "full" and basis.cols + p > n
            breakdown = bool(b.diagonal().abs().min() <= 1e-13 * max(scale, 1e-300) * math.sqrt(n))
            if _lanczos_done(ritz, k, n, passes, max_iter, full or breakdown):
                return _eig_result(
                    ritz, basis, good, eigenvectors, passes, p, breakdown or full, reorth
                )
            betas.append(b)
            prev = (q_j, b)
            q_j = q_next
    finally:
        for bs in (basis, good):
            if bs is not None:
                bs.close()


def _block_width(which: str, reorth: str, block_size: int, n: int) -> int:
    """Check :func:`lanczos`'s ``which`` and ``reorth``; the block width ``p = min(max(block_size, 1), n)``.

    Only ``reorth="full"`` takes blocks (``p > 1``).
    """
    if which not in WHICH:
        raise ValueError(f"which must be one of {WHICH}, got {which!r}")
    if reorth not in REORTH:
        raise ValueError(f"reorth must be one of {REORTH}, got {reorth!r}")
    p = max(1, min(block_size, n))
    if reorth != "full" and p > 1:
        raise ValueError(f"reorth={reorth!r} needs block_size 1, got {block_size}")
    return p


def _lanczos_done(ritz: _Ritz, k: int, n: int, passes: int, max_iter: int, exhausted: bool) -> bool:
    """Whether :func:`lanczos` stops: all wanted Ritz pairs converged (at least ``min(k, n)`` of them),
    ``max_iter`` passes made, or the Krylov space ``exhausted`` (full or broken down)."""
    return bool(ritz.conv.all()) and ritz.th.numel() >= min(k, n) or passes >= max_iter or exhausted


def _recurrence(
    space: VectorSpace,
    q_j: torch.Tensor,
    w: torch.Tensor,
    prev: tuple[torch.Tensor, torch.Tensor] | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One block-Lanczos recurrence on ``W = H Q_j``: ``R = W - Q_{j-1} B_{j-1}^T``, ``A_j = Q_j^T R`` symmetrized,
    ``R = R - Q_j A_j`` made orthogonal to ``Q_j`` once more. Returns ``(R, A_j)``."""
    r = w if prev is None else w - space.combine(prev[0], prev[1].T)
    a = space.gram(q_j, r)
    a = (a + a.T) / 2
    r = r - space.combine(q_j, a)
    r = r - space.combine(q_j, space.gram(q_j, r))  # local reorthogonalization against Q_j
    return r, a


@dataclass
class _Ritz:
    """The genuine Ritz pairs of one Lanczos step: values ``th``, coefficients ``sg`` (columns), residuals ``res``,
    the wanted indices ``idx``, their convergence ``conv`` and the count of ghosts removed."""

    th: torch.Tensor
    sg: torch.Tensor
    res: torch.Tensor
    idx: torch.Tensor
    conv: torch.Tensor
    ghosts: int


def _ritz_pairs(
    t: torch.Tensor,
    theta: torch.Tensor,
    s: torch.Tensor,
    b: torch.Tensor,
    p: int,
    reorth: str,
    cw_tol: float,
    scale: float,
    tol: float,
    k: int,
    which: str,
) -> _Ritz:
    """The Ritz pairs ``(theta, s)`` of ``T`` with residuals ``||B s[last block]||``; without reorthogonalization the
    ghosts are filtered out (:func:`cullum_willoughby`); converged when ``residual <= tol * scale``."""
    ghosts = 0
    genuine = torch.arange(theta.numel())
    if reorth == "none":
        genuine = cullum_willoughby(
            t, cw_tol * max(scale, 1e-300), (b @ s[-p:, :]).norm(dim=0), tol * scale
        )
        ghosts = theta.numel() - genuine.numel()
    th, sg = theta[genuine], s[:, genuine]
    res = (b @ sg[-p:, :]).norm(dim=0)
    idx = wanted(th, k, which)
    return _Ritz(th, sg, res, idx, res[idx] <= tol * scale, ghosts)


def _eig_result(
    ritz: _Ritz,
    basis: Basis | None,
    good: Basis | None,
    eigenvectors: bool,
    passes: int,
    p: int,
    exact: bool,
    reorth: str,
) -> EigResult:
    """The wanted Ritz pairs as an :class:`EigResult`; ``exact`` (the basis spans an invariant subspace): residuals
    zero and every pair converged."""
    res, conv = ritz.res, ritz.conv
    if exact:
        res = torch.zeros_like(res)
        conv = torch.ones_like(conv)
    vecs = basis.combine(ritz.sg[:, ritz.idx]) if eigenvectors and basis is not None else None
    stored = sum(bs.cols for bs in (basis, good) if bs is not None)
    return EigResult(
        ritz.th[ritz.idx],
        vecs,
        res[ritz.idx],
        conv,
        ritz.th,
        passes * p,
        passes,
        exact,
        ritz.ghosts,
        reorth,
        stored,
    )


# ----------------------------------------------------------------------------- trace


@dataclass
class TraceEstimate:
    """A stochastic trace estimate, its standard error, and its cost (``hvps`` products in ``passes`` passes)."""

    estimate: float
    stderr: float
    hvps: int
    passes: int

    def as_dict(self) -> dict[str, float]:
        return {
            "estimate": self.estimate,
            "stderr": self.stderr,
            "hvps": self.hvps,
            "passes": self.passes,
        }


def _mean_stderr(samples: torch.Tensor) -> tuple[float, float]:
    """Sample mean and its standard error ``std / sqrt(K)`` (NaN for one sample)."""
    k = samples.numel()
    mean = float(samples.mean())
    return mean, float(samples.std() / math.sqrt(k)) if k > 1 else float("nan")


def hutchinson_trace(
    matmat: MatMat, n: int, num_hvps: int, seed: int = 0, space: VectorSpace | None = None
) -> TraceEstimate:
    """Hutchinson's estimator ``tr(H) ~ (1/K) sum_j z_j^T H z_j`` with ``K = num_hvps`` Rademacher probes (one pass).

    Unbiased; ``Var = (2/K) sum_{i != j} H_ij^2``; the stderr is the sample standard deviation over the
    probes divided by ``sqrt(K)`` (Hutchinson 1989, Commun. Stat. Simul. Comput. 18(3); Avron & Toledo 2011, J. ACM 58(2)).
    """
    space = space or local_space(n)
    z = space.random(num_hvps, seed, "rademacher")
    samples = space.coldot(z, space.block(matmat(z)))
    mean, se = _mean_stderr(samples)
    return TraceEstimate(mean, se, num_hvps, 1)


def hutchpp_trace(
    matmat: MatMat, n: int, num_hvps: int, seed: int = 0, space: VectorSpace | None = None
) -> TraceEstimate:
    """Hutch++ (Meyer, Musco, Musco & Woodruff 2021, SOSA, "Hutch++: optimal stochastic trace estimation"), two passes.

    With ``s = num_hvps // 3`` Rademacher ``S`` and ``g = num_hvps - 2 s`` Rademacher ``G``: ``Q = orth(H S)`` (pass 1),
    ``G' = (I - Q Q^T) G`` (twice), then ``[H Q, H G']`` (pass 2) and

        tr(H) ~ tr(Q^T H Q) + (1/g) sum_j g'_j^T H g'_j,

    unbiased; exact low-rank part plus Hutchinson on the deflated remainder, whose standard error is
    reported (the low-rank part has none given ``Q``). Needs ``num_hvps >= 3``.
    """
    if num_hvps < 3:
        raise ValueError(f"Hutch++ needs at least 3 HVPs, got {num_hvps}")
    space = space or local_space(n)
    s = num_hvps // 3
    gcount = num_hvps - 2 * s
    omega = space.random(s + gcount, seed, "rademacher")
    q, _ = space.qr(space.block(matmat(omega[:, :s])))
    g = omega[:, s:]
    for _ in range(2):
        g = g - space.combine(q, space.gram(q, g))
    hv = space.block(matmat(torch.cat([q, g], dim=1)))
    low = float(space.coldot(q, hv[:, :s]).sum())
    mean, se = _mean_stderr(space.coldot(g, hv[:, s:]))
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


MAX_DENSITY_POINTS = constants.MAX_DENSITY_POINTS
"""Most grid points of a spectral density (``--density_points``), :data:`lib.constants.MAX_DENSITY_POINTS`."""
DENSITY_BLOCK = 1 << 22
"""Largest ``grid points x Ritz values`` block :func:`broadened_density` evaluates at once (32 MB of float64)."""


def broadened_density(
    theta: torch.Tensor, weights: torch.Tensor, grid: torch.Tensor, sigma: float
) -> torch.Tensor:
    """``phi(t) = (1/P) sum_i sum_j w_ij N(t; theta_ij, sigma^2)`` on ``grid`` (NaN entries ignored); integrates to 1.
    Evaluated on slices of the grid, so that its temporaries stay below :data:`DENSITY_BLOCK` entries."""
    ok = ~torch.isnan(theta)
    th, w = theta[ok], weights[ok]
    rows = max(1, DENSITY_BLOCK // max(1, th.numel()))
    out = torch.empty(grid.shape, dtype=torch.promote_types(grid.dtype, th.dtype))
    for a in range(0, grid.numel(), rows):
        z = (grid[a : a + rows, None] - th[None, :]) / sigma
        out[a : a + rows] = (torch.exp(-0.5 * z**2) * w).sum(1)
    return out / (sigma * math.sqrt(2 * math.pi) * theta.shape[0])


def _advance_probes(
    space: VectorSpace,
    v: torch.Tensor,
    w: torch.Tensor,
    prev: torch.Tensor,
    ids: torch.Tensor,
    j: int,
    n: int,
    basis: Basis | None,
    alpha: torch.Tensor,
    beta: torch.Tensor,
    length: torch.Tensor,
    active: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Step ``j`` of the probes ``ids`` of :func:`slq` after the pass ``W = H V``: ``alpha_j = v . w``,
    ``w = w - alpha_j v - beta_{j-1} v_prev`` (made orthogonal to each probe's basis when one is kept),
    ``beta_j = ||w||``; a probe whose ``beta_j`` vanishes stops (``active``). Fills ``alpha``, ``beta``, ``length``
    and ``active`` in place; returns the next ``(v, v_prev)``."""
    num_probes = v.shape[1]
    a = space.coldot(v, w)[ids]
    alpha[ids, j] = a
    length[ids] = j + 1
    coef = torch.zeros(num_probes, dtype=F64)
    coef[ids] = a
    back = torch.zeros(num_probes, dtype=F64)
    if j:
        back[ids] = beta[ids, j - 1]
    w = (
        w
        - v * coef.to(device=v.device, dtype=v.dtype)
        - prev * back.to(device=v.device, dtype=v.dtype)
    )
    if basis is not None:
        w = basis.orthogonalize_columns(w)
    b = space.colnorms(w)[ids]
    beta[ids, j] = b
    stop = b <= 1e-12 * a.abs().clamp_min(1e-300) * math.sqrt(n)
    active[ids[stop]] = False
    prev = v.clone()
    v = v.clone()
    scale = torch.ones(num_probes, dtype=F64)
    scale[ids] = torch.where(stop, torch.ones_like(b), b)
    upd = torch.zeros(num_probes, dtype=torch.bool)
    upd[ids] = True
    v[:, upd.to(v.device)] = (w / scale.to(device=w.device, dtype=w.dtype))[:, upd.to(v.device)]
    return v, prev


def slq(
    matmat: MatMat,
    n: int,
    num_probes: int,
    steps: int,
    seed: int = 0,
    grid_points: int = 1000,
    sigma: float | None = None,
    on_pass: Callable[[int], None] | None = None,
    space: VectorSpace | None = None,
    reorth: str = "full",
    storage: str = "device",
    storage_dir: Path | None = None,
) -> SLQResult:
    """Spectral density by stochastic Lanczos quadrature (Lin, Saad & Yang 2016, SIAM Rev. 58(1); Ghorbani, Krishnan & Xiao 2019, ICML).

    For ``P`` normalized Rademacher probes ``v_i = z_i / sqrt(n)``, ``m = steps`` Lanczos steps each (all probes
    advanced together: one pass of ``H`` on the ``(n, P)`` block per step; with ``reorth="full"`` each probe's vector
    made orthogonal to its own basis twice, ``P m`` stored vectors; ``"none"`` / ``"selective"``: the plain recurrence,
    no stored basis, as the quadrature stays accurate without orthogonality (Knizhnerman 1996; Ubaru, Chen & Saad 2017,
    SIAM J. Matrix Anal. Appl. 38(4)) give ``T_i = S_i diag(theta_i) S_i^T``; then

        v_i^T f(H) v_i ~ sum_j w_ij f(theta_ij),   w_ij = (S_i)_{0j}^2,   E[v_i^T f(H) v_i] = tr f(H) / n,

    exact for polynomials of degree < 2m (Gauss quadrature). The density is that measure broadened by a
    Gaussian of width ``sigma`` (default: 1% of the Ritz range) on ``grid_points`` points padded by ``5 sigma``.
    A probe whose recurrence breaks down (``beta ~ 0``: its Krylov space is invariant) stops there, exactly.
    """
    if reorth not in REORTH:
        raise ValueError(f"reorth must be one of {REORTH}, got {reorth!r}")
    space = space or local_space(n)
    steps = max(1, min(steps, n))
    v = space.random(num_probes, seed, "rademacher") / math.sqrt(n)  # (n, P)
    basis = Basis(space, storage, storage_dir) if reorth == "full" else None
    alpha = torch.full((num_probes, steps), float("nan"), dtype=F64)
    beta = torch.zeros(num_probes, steps, dtype=F64)
    active = torch.ones(num_probes, dtype=torch.bool)
    length = torch.zeros(num_probes, dtype=torch.long)
    prev = torch.zeros_like(v)
    passes = hvps = 0
    try:
        for j in range(steps):
            ids = active.nonzero().flatten()
            if basis is not None:
                basis.append(
                    v * active.to(device=v.device, dtype=v.dtype)
                )  # finished probes: zero columns
            w = space.zeros(num_probes)
            w[:, ids] = space.block(matmat(v[:, ids]))
            passes += 1
            hvps += len(ids)
            if on_pass is not None:
                on_pass(passes)
            v, prev = _advance_probes(
                space, v, w, prev, ids, j, n, basis, alpha, beta, length, active
            )
            if not bool(active.any()):
                break
    finally:
        if basis is not None:
            basis.close()
    ritz, weights = gauss_quadrature(alpha, beta, length)
    lo, hi = (
        float(torch.nan_to_num(ritz, nan=float("inf")).min()),
        float(torch.nan_to_num(ritz, nan=float("-inf")).max()),
    )
    grid, sig = density_grid(lo, hi, grid_points, sigma)
    return SLQResult(
        ritz, weights, grid, broadened_density(ritz, weights, grid, sig), sig, hvps, passes
    )


def density_grid(
    lo: float, hi: float, grid_points: int, sigma: float | None
) -> tuple[torch.Tensor, float]:
    """The Gaussian width (``sigma``, default 1% of ``hi - lo``, at least ``1e-12`` of the largest magnitude) and
    ``grid_points`` points from ``lo - 5 sigma`` to ``hi + 5 sigma`` (float64)."""
    sig = (
        sigma if sigma is not None else max((hi - lo) / 100, 1e-12 * max(abs(lo), abs(hi), 1e-300))
    )
    return torch.linspace(lo - 5 * sig, hi + 5 * sig, grid_points, dtype=F64), sig


def gauss_quadrature(
    alpha: torch.Tensor, beta: torch.Tensor, length: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per probe ``i`` the nodes (Ritz values, ascending) and weights (squared first components of the
    eigenvectors) of the tridiagonal ``T_i`` of its first ``length[i]`` coefficients (``alpha``, ``beta``:
    ``(P, m)``); ``(P, max length)`` each, NaN past a probe's length."""
    num_probes = alpha.shape[0]
    m = int(length.max())
    ritz = torch.full((num_probes, m), float("nan"), dtype=F64)
    weights = torch.full((num_probes, m), float("nan"), dtype=F64)
    for i in range(num_probes):
        li = int(length[i])
        t = (
            torch.diag(alpha[i, :li])
            + torch.diag(beta[i, : li - 1], 1)
            + torch.diag(beta[i, : li - 1], -1)
        )
        th, s = torch.linalg.eigh(t)
        ritz[i, :li], weights[i, :li] = th, s[0] ** 2
    return ritz, weights


def exact_density(
    eigenvalues: torch.Tensor, grid_points: int = 1000, sigma: float | None = None
) -> SLQResult:
    """The density of known eigenvalues (the exact path) in :class:`SLQResult` form: one "probe", weights ``1/n``."""
    ev = eigenvalues.to(F64).reshape(1, -1)
    grid, sig = density_grid(float(ev.min()), float(ev.max()), grid_points, sigma)
    w = torch.full_like(ev, 1 / ev.numel())
    return SLQResult(ev, w, grid, broadened_density(ev, w, grid, sig), sig, 0, 0)
