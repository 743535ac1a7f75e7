"""The spectrum of a symmetric operator as one library call: settings in, a frozen result out.

:func:`hessian_spectrum` takes any block product ``matmat(V) = H V`` (``V``: ``(n, p)``; a
:class:`lib.products.operator.HessianOperator`, the :class:`lib.runtime.passlog.PassLog` of a resumable run, or a dense matrix's
``lambda v: h @ v``) and the :class:`SpectrumSettings`, and runs, in this order and with these seeds, block Lanczos
for the extreme eigenpairs (``seed``), Hutchinson (``seed + 1``) and Hutch++ (``seed + 2``) for the trace, and
stochastic Lanczos quadrature for the density (``seed + 3``) (:mod:`lib.spectrum.algorithms`). :func:`dense_spectrum` is the
same question answered exactly for a matrix held in memory (``eigh``). Both return a :class:`SpectrumResult`:
the wanted eigenpairs with their residuals ``||H y - theta y||``, the trace estimates with standard errors, the
density with its moments, and the cost in products ``H v`` and passes. ``hessian_spectrum.py``
(:mod:`lib.app.spectrum_family`) builds the operator and the pass log, calls these and turns the result into files.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch

from ..errors import ParamError
from ..products.linop import CurvatureOperator
from . import algorithms as spectrum
from .algorithms import EigResult, MatMat, SLQResult, TraceEstimate
from .vectors import VectorSpace

Which = Literal["largest", "smallest", "both"]
"""Which end of the spectrum: the ``top_k`` largest, smallest, or both (``top_k`` per end)."""
Reorth = Literal["full", "selective", "none"]
"""Lanczos reorthogonalization (:data:`lib.spectrum.algorithms.REORTH`)."""
Storage = Literal["device", "cpu", "disk"]
"""Where the vectors an algorithm must remember are kept (:class:`lib.spectrum.vectors.Basis`)."""
SpectrumPath = Literal["exact", "iterative"]
"""How the result was obtained: ``eigh`` of the dense matrix, or Lanczos / Hutchinson / SLQ on products."""


@dataclass(frozen=True, kw_only=True)
class SpectrumSettings:
    """What to compute; the defaults are ``hessian_spectrum.py``'s.

    Args:
        top_k: eigenvalues wanted per end.
        which: ``largest``, ``smallest`` or ``both`` (``top_k`` of each).
        block_size: Lanczos block size ``p`` (products per pass).
        tol: a pair is converged when ``||H y - theta y|| <= tol * max |theta|``.
        max_iter: most Lanczos passes.
        seed: random start block; the trace probes use ``seed + 1`` and ``seed + 2``, the SLQ probes ``seed + 3``.
        reorth: Lanczos reorthogonalization (:data:`Reorth`).
        eigenvectors: keep the Ritz vectors (``(n, k')``).
        trace: Hutchinson and Hutch++ trace estimates of ``trace_hvps`` products each.
        trace_hvps: products per trace estimate (Hutch++ needs at least 3).
        density: the spectral density by SLQ with ``slq_probes`` probes of ``lanczos_steps`` steps.
        slq_probes: SLQ probes (each its own Lanczos run, advanced together).
        lanczos_steps: Lanczos steps per SLQ probe.
        density_points: grid points of the broadened density.
    """

    top_k: int = 5
    which: Which = "largest"
    block_size: int = 1
    tol: float = 1e-6
    max_iter: int = 100
    seed: int = 0
    reorth: Reorth = "full"
    eigenvectors: bool = False
    trace: bool = False
    trace_hvps: int = 30
    density: bool = False
    slq_probes: int = 4
    lanczos_steps: int = 30
    density_points: int = 1000

    @property
    def max_passes(self) -> int:
        """Most passes (``matmat`` calls) :func:`hessian_spectrum` makes: Lanczos, 3 for the traces, SLQ's steps."""
        return (
            self.max_iter + (3 if self.trace else 0) + (self.lanczos_steps if self.density else 0)
        )


@dataclass(frozen=True)
class SpectrumResult:
    """The answer of :func:`hessian_spectrum` / :func:`dense_spectrum`.

    Attributes:
        path: ``exact`` (``eigh`` of the dense matrix) or ``iterative`` (products only).
        n: the operator's size.
        eigenvalues: ``(k',)`` the wanted eigenvalues (largest: descending; smallest: ascending; both: the
            ``top_k`` largest, then the ``top_k`` smallest).
        residuals: ``(k',)`` ``||H y_i - theta_i y_i||`` per pair.
        converged: ``(k',)`` bool, ``residual <= tol * max |theta|`` (always true on the exact path).
        eigenvectors: ``(n, k')`` orthonormal, or ``None`` unless ``settings.eigenvectors``.
        trace: estimates by name (``hutchinson``, ``hutch++``; ``exact`` on the exact path, stderr 0), each with
            its standard error and cost; empty unless asked (always ``exact`` on the exact path).
        density: the spectral density (SLQ; on the exact path, the broadened density of every eigenvalue), with
            :meth:`lib.spectrum.algorithms.SLQResult.moment`; ``None`` unless asked on the iterative path.
        lanczos: the Lanczos run (Ritz values, ghosts removed, ...) on the iterative path, else ``None``.
        all_eigenvalues: ``(n,)`` ascending, on the exact path, else ``None``.
        hessian: the symmetric ``(n, n)`` matrix that was diagonalized on the exact path, else ``None``.
        hvps: products ``H v`` over every stage (``n`` on the exact path).
        passes: ``matmat`` calls over every stage (1 on the exact path).
    """

    path: SpectrumPath
    n: int
    eigenvalues: torch.Tensor
    residuals: torch.Tensor
    converged: torch.Tensor
    eigenvectors: torch.Tensor | None
    trace: Mapping[str, TraceEstimate]
    density: SLQResult | None
    lanczos: EigResult | None
    all_eigenvalues: torch.Tensor | None
    hessian: torch.Tensor | None
    hvps: int
    passes: int


def hessian_spectrum(
    matmat: MatMat | CurvatureOperator,
    n: int | None = None,
    settings: SpectrumSettings = SpectrumSettings(),
    *,
    space: VectorSpace | None = None,
    storage: Storage = "device",
    storage_dir: Path | None = None,
    on_lanczos: Callable[[EigResult], None] | None = None,
) -> SpectrumResult:
    """Extreme eigenpairs, and on request the trace and the spectral density, of a symmetric ``H`` from products.

    Args:
        matmat: ``V`` ``(n, p)`` -> ``H V`` (``(local, p)`` blocks of a sharded ``space``), or an operator
            (:class:`lib.products.linop.CurvatureOperator`, e.g. a :class:`lib.products.operator.HessianOperator`); each call is one
            pass.
        n: the size of ``H`` (default: an operator's ``shape[0]``; required for a plain function).
        settings: what to compute (:class:`SpectrumSettings`).
        space: where the ``n``-vectors live (:class:`lib.spectrum.vectors.VectorSpace`; default float64 on the host).
        storage: where remembered vectors are kept (:data:`Storage`).
        storage_dir: the folder of ``disk`` storage.
        on_lanczos: called with the Lanczos result before the trace and density stages (progress bars).

    Returns:
        A :class:`SpectrumResult` (``path="iterative"``).

    Example:
        >>> import torch, lib
        >>> h = torch.diag(torch.arange(1.0, 21.0, dtype=torch.float64))
        >>> r = lib.hessian_spectrum(lambda v: h @ v, 20, lib.SpectrumSettings(top_k=2, trace=True, trace_hvps=60))
        >>> [round(x, 6) for x in r.eigenvalues.tolist()], round(r.trace["hutch++"].estimate, 6)
        ([20.0, 19.0], 210.0)
    """
    matmat, n = _as_matmat(matmat, n)
    eig = spectrum.lanczos(
        matmat,
        n,
        settings.top_k,
        settings.which,
        settings.block_size,
        settings.tol,
        settings.max_iter,
        seed=settings.seed,
        reorth=settings.reorth,
        eigenvectors=settings.eigenvectors,
        space=space,
        storage=storage,
        storage_dir=storage_dir,
    )
    if on_lanczos is not None:
        on_lanczos(eig)
    trace = traces(matmat, n, settings, space) if settings.trace else {}
    dens = None
    if settings.density:
        dens = spectrum.slq(
            matmat,
            n,
            settings.slq_probes,
            settings.lanczos_steps,
            seed=settings.seed + 3,
            grid_points=settings.density_points,
            reorth=settings.reorth,
            space=space,
            storage=storage,
            storage_dir=storage_dir,
        )
    return _iterative_result(n, eig, trace, dens, settings.eigenvectors)


def _as_matmat(matmat: MatMat | CurvatureOperator, n: int | None) -> tuple[MatMat, int]:
    """An operator's ``matmat`` and size (``n`` given wins), or a plain function with its required ``n``."""
    if isinstance(matmat, CurvatureOperator):
        return matmat.matmat, matmat.shape[0] if n is None else n
    if n is None:
        raise ParamError("n", "n (the size of H) is required when matmat is a plain function")
    return matmat, n


def _iterative_result(
    n: int,
    eig: EigResult,
    trace: dict[str, TraceEstimate],
    dens: SLQResult | None,
    eigenvectors: bool,
) -> SpectrumResult:
    """The stages' results as one :class:`SpectrumResult`; the cost summed over the stages."""
    stages: list[EigResult | TraceEstimate | SLQResult] = [eig, *trace.values()]
    stages += [dens] if dens is not None else []
    return SpectrumResult(
        path="iterative",
        n=n,
        eigenvalues=eig.eigenvalues,
        residuals=eig.residuals,
        converged=eig.converged,
        eigenvectors=eig.eigenvectors if eigenvectors else None,
        trace=trace,
        density=dens,
        lanczos=eig,
        all_eigenvalues=None,
        hessian=None,
        hvps=sum(x.hvps for x in stages),
        passes=sum(x.passes for x in stages),
    )


def traces(
    matmat: MatMat, n: int, s: SpectrumSettings, space: VectorSpace | None
) -> dict[str, TraceEstimate]:
    """Hutchinson (seed ``s.seed + 1``, one pass) and Hutch++ (``s.seed + 2``, two passes) with ``s.trace_hvps``
    products each."""
    return {
        "hutchinson": spectrum.hutchinson_trace(
            matmat, n, s.trace_hvps, seed=s.seed + 1, space=space
        ),
        "hutch++": spectrum.hutchpp_trace(matmat, n, s.trace_hvps, seed=s.seed + 2, space=space),
    }


def dense_spectrum(
    h: torch.Tensor, settings: SpectrumSettings = SpectrumSettings()
) -> SpectrumResult:
    """The same question answered exactly for a symmetric matrix held in memory: ``eigh`` of ``h``.

    Args:
        h: ``(n, n)`` symmetric (float64 recommended; not symmetrized here).
        settings: ``top_k``, ``which``, ``eigenvectors`` and ``density_points`` apply; the trace is exact.

    Returns:
        A :class:`SpectrumResult` with ``path="exact"``: the wanted eigenpairs with residuals
        ``||h y - theta y||``, every eigenvalue, ``trace["exact"]``, the broadened density of the eigenvalues.

    Example:
        >>> import torch, lib
        >>> r = lib.dense_spectrum(torch.diag(torch.tensor([3.0, -1.0, 2.0], dtype=torch.float64)),
        ...                        lib.SpectrumSettings(top_k=1, which="both"))
        >>> r.eigenvalues.tolist(), r.trace["exact"].estimate
        ([3.0, -1.0], 4.0)
    """
    n = h.shape[0]
    ev, vecs = torch.linalg.eigh(h)
    idx = spectrum.wanted(ev, settings.top_k, settings.which)
    resid = (h @ vecs[:, idx] - vecs[:, idx] * ev[idx]).norm(dim=0)
    return SpectrumResult(
        path="exact",
        n=n,
        eigenvalues=ev[idx],
        residuals=resid,
        converged=torch.ones(len(idx), dtype=torch.bool),
        eigenvectors=vecs[:, idx] if settings.eigenvectors else None,
        trace={"exact": TraceEstimate(float(h.trace()), 0.0, n, 1)},
        density=spectrum.exact_density(ev, settings.density_points),
        lanczos=None,
        all_eigenvalues=ev,
        hessian=h,
        hvps=n,
        passes=1,
    )
