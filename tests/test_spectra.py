"""The spectrum as one library call (:mod:`lib.spectrum.spectra`) on dense float64 matrices, against ``eigvalsh``."""

from __future__ import annotations

import dataclasses

import pytest
import torch

import lib
from lib.spectrum import algorithms as spectrum
from lib.spectrum.spectra import SpectrumSettings, dense_spectrum, hessian_spectrum

F64 = torch.float64


def symmetric(n: int, seed: int) -> torch.Tensor:
    """A symmetric ``(n, n)`` float64 matrix with eigenvalues of both signs, spread apart at both ends."""
    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=F64))
    ev = torch.linspace(-3.0, 5.0, n, dtype=F64)
    ev[-1], ev[0] = 9.0, -7.0
    return (q * ev) @ q.T


def test_iterative_matches_eigvalsh_with_true_residuals_trace_and_density():
    n = 40
    h = symmetric(n, 0)
    calls = []

    def matmat(v: torch.Tensor) -> torch.Tensor:
        calls.append(v.shape[1])
        return h @ v

    s = SpectrumSettings(
        top_k=2,
        which="both",
        tol=1e-10,
        max_iter=n,
        eigenvectors=True,
        trace=True,
        trace_hvps=12,
        density=True,
        slq_probes=3,
        lanczos_steps=n,
    )
    r = hessian_spectrum(matmat, n, s)
    ev = torch.linalg.eigvalsh(h)
    want = torch.cat([ev.flip(0)[:2], ev[:2]])
    assert r.path == "iterative" and r.n == n
    torch.testing.assert_close(r.eigenvalues, want, rtol=0, atol=1e-9)
    assert bool(r.converged.all())
    # the reported residuals are the true ||H y - theta y|| of the returned vectors
    y = r.eigenvectors
    assert y is not None and y.shape == (n, 4)
    true = (h @ y - y * r.eigenvalues).norm(dim=0)
    torch.testing.assert_close(r.residuals, true, rtol=0, atol=1e-8)
    # the traces are within 5 standard errors of the exact one; the SLQ moments are tr(H^m) / n
    exact = float(h.trace())
    for name in ("hutchinson", "hutch++"):
        t = r.trace[name]
        assert abs(t.estimate - exact) <= 5 * t.stderr, (name, t, exact)
    assert r.density is not None
    m0, _ = r.density.moment(0)
    m1, se1 = r.density.moment(1)
    assert abs(m0 - 1) < 1e-10
    assert abs(m1 - exact / n) <= 5 * se1 + 1e-10
    # the cost adds up over the stages and equals the calls actually made
    assert r.passes == len(calls) and r.hvps == sum(calls)


def test_settings_reach_each_algorithm_with_its_seed():
    """The call is exactly lanczos(seed), hutchinson(seed + 1), hutch++(seed + 2), slq(seed + 3): bitwise."""
    n = 30
    h = symmetric(n, 1)
    mm = lambda v: h @ v
    s = SpectrumSettings(
        top_k=3,
        which="smallest",
        seed=7,
        max_iter=12,
        reorth="selective",
        trace=True,
        trace_hvps=9,
        density=True,
        slq_probes=2,
        lanczos_steps=6,
        density_points=50,
    )
    r = hessian_spectrum(mm, n, s)
    eig = spectrum.lanczos(mm, n, 3, "smallest", 1, 1e-6, 12, seed=7, reorth="selective")
    assert torch.equal(r.eigenvalues, eig.eigenvalues) and torch.equal(r.residuals, eig.residuals)
    assert r.trace["hutchinson"] == spectrum.hutchinson_trace(mm, n, 9, seed=8)
    assert r.trace["hutch++"] == spectrum.hutchpp_trace(mm, n, 9, seed=9)
    d = spectrum.slq(mm, n, 2, 6, seed=10, grid_points=50, reorth="selective")
    assert r.density is not None and torch.equal(r.density.values, d.values)
    assert r.eigenvectors is None  # not asked for


def test_dense_spectrum_is_eigh():
    n = 12
    h = symmetric(n, 2)
    r = dense_spectrum(h, SpectrumSettings(top_k=3, which="largest", eigenvectors=True))
    ev = torch.linalg.eigvalsh(h)
    assert r.path == "exact" and r.hvps == n and r.passes == 1
    torch.testing.assert_close(r.eigenvalues, ev.flip(0)[:3], rtol=0, atol=1e-12)
    torch.testing.assert_close(r.all_eigenvalues, ev, rtol=0, atol=1e-12)
    assert r.residuals.max() < 1e-12 and bool(r.converged.all())
    assert r.trace["exact"].estimate == pytest.approx(float(ev.sum()), abs=1e-12)
    assert r.trace["exact"].stderr == 0.0
    assert r.density is not None and r.density.moment(1)[0] == pytest.approx(float(ev.mean()))


def test_results_and_settings_are_frozen_and_exported():
    s = SpectrumSettings()
    with pytest.raises(dataclasses.FrozenInstanceError):
        s.top_k = 3  # type: ignore[misc]
    with pytest.raises(TypeError):
        SpectrumSettings(5)  # type: ignore[misc]  # keyword-only
    r = dense_spectrum(torch.eye(3, dtype=F64))
    with pytest.raises(dataclasses.FrozenInstanceError):
        r.n = 4  # type: ignore[misc]
    assert lib.hessian_spectrum is hessian_spectrum and lib.SpectrumSettings is SpectrumSettings
    assert s.max_passes == s.max_iter
    # the library's defaults are hessian_spectrum.py's
    from lib.app.spec import SpectrumCompute

    c = SpectrumCompute()
    for f in dataclasses.fields(SpectrumSettings):
        assert getattr(s, f.name) == getattr(c, f.name), f.name
    assert dataclasses.replace(s, trace=True, density=True).max_passes == s.max_iter + 3 + 30


def test_docstring_examples_run():
    import doctest

    import lib.spectrum.spectra

    res = doctest.testmod(lib.spectrum.spectra)
    assert res.attempted >= 5 and res.failed == 0


def test_an_operator_is_taken_as_it_is_and_a_plain_function_needs_n():
    from lib.errors import ParamError
    from lib.products.linop import OperatorViews

    h = symmetric(10, 3)

    class Dense(OperatorViews):
        shape, dtype, device = (10, 10), F64, torch.device("cpu")

        def matmat(self, v):
            return h @ v

    s = SpectrumSettings(top_k=2, trace=True, trace_hvps=6)
    a, b = hessian_spectrum(Dense(), settings=s), hessian_spectrum(lambda v: h @ v, 10, s)
    assert torch.equal(a.eigenvalues, b.eigenvalues) and a.trace == b.trace and a.n == 10
    with pytest.raises(ParamError, match="n \\(the size of H\\) is required"):
        hessian_spectrum(lambda v: h @ v, settings=s)
