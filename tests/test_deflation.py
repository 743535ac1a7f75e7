"""The Krylov basis grown for a deflated trace (lib.spectrum.deflation) against dense float64 oracles, and the sweep's
per-unit trace with it: unbiased over many seeds, fewer products than without it."""

from __future__ import annotations

from types import SimpleNamespace

import torch

from lib.hessian import sweep as sw
from lib.spectrum import algorithms as spectrum
from lib.spectrum import deflation as dfl

F64 = torch.float64


def sym(n: int, eigenvalues: torch.Tensor, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    u, _ = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=F64))
    return (u * eigenvalues) @ u.T


def rest_frobenius2(h: torch.Tensor, q: torch.Tensor) -> float:
    """``||(I - P) H (I - P)||_F^2`` directly."""
    p = torch.eye(h.shape[0], dtype=F64) - q @ q.T
    return float(((p @ h @ p) ** 2).sum())


def lanczos_basis(h: torch.Tensor, steps: int) -> tuple[torch.Tensor, torch.Tensor]:
    rec = sw.Recorder(lambda v: h @ v)
    spectrum.lanczos(
        rec, h.shape[0], 1, "largest", tol=1e-14, max_iter=steps, seed=0, eigenvectors=False
    )
    return torch.cat(rec.v, 1), torch.cat(rec.hv, 1)


def test_the_drop_is_the_exact_change_of_the_deflated_frobenius_norm():
    g = torch.Generator().manual_seed(3)
    a = torch.randn(30, 30, generator=g, dtype=F64)
    h = a + a.T
    q, _ = torch.linalg.qr(torch.randn(30, 5, generator=g, dtype=F64))
    q, new = q[:, :4], q[:, 4]
    drop = dfl.frobenius_drop(q, new, h @ new)
    exact = rest_frobenius2(h, q) - rest_frobenius2(h, torch.cat([q, new[:, None]], 1))
    assert abs(drop - exact) <= 1e-9 * abs(exact) and drop > 0
    # with no basis yet: ||H||_F^2 - ||(I - nn^T) H (I - nn^T)||_F^2
    assert abs(
        dfl.frobenius_drop(q[:, :0], new, h @ new)
        - (float((h**2).sum()) - rest_frobenius2(h, new[:, None]))
    ) < 1e-9 * float((h**2).sum())


def test_extending_a_lanczos_basis_continues_its_krylov_space():
    h = sym(40, torch.linspace(-3, 9, 40, dtype=F64) ** 3 / 50, seed=1)
    q, hq = lanczos_basis(h, 5)
    for _ in range(3):
        grown = dfl.extend_basis(lambda v: h @ v, q, hq)
        assert grown is not None
        q, hq, drop = grown
        assert drop >= 0
    q8, _ = lanczos_basis(h, 8)
    assert torch.allclose(q.T @ q, torch.eye(8, dtype=F64), atol=1e-10)
    assert torch.allclose(hq, h @ q, atol=1e-10)
    assert torch.allclose(q @ q.T, q8 @ q8.T, atol=1e-7)  # the same Krylov space as 8 Lanczos steps
    # an invariant subspace: nothing to add
    h2 = torch.diag(torch.tensor([2.0, 1.0, 0.0, 0.0], dtype=F64))
    e = torch.eye(4, dtype=F64)[:, :2]
    assert dfl.extend_basis(lambda v: h2 @ v, e[:, 1:], h2 @ e[:, 1:]) is None


def test_a_step_pays_when_it_removes_more_variance_than_a_probe():
    # uncapped: the probes needed var / t = 100 fit the budget: a step pays when it removes more than t
    assert dfl.step_pays(drop=0.02, var=1.0, have=10, target_var=0.01, max_total=200)
    assert not dfl.step_pays(drop=0.005, var=1.0, have=10, target_var=0.01, max_total=200)
    # capped at 50 probes: a step pays when it removes more than var / 50
    assert dfl.step_pays(drop=0.03, var=1.0, have=10, target_var=1e-4, max_total=50)
    assert not dfl.step_pays(drop=0.01, var=1.0, have=10, target_var=1e-4, max_total=50)
    # the probes in hand reach the target, no budget, or nothing left to remove: no step
    assert not dfl.step_pays(drop=1.0, var=1.0, have=200, target_var=0.01, max_total=300)
    assert not dfl.step_pays(drop=1.0, var=1.0, have=10, target_var=0.01, max_total=10)
    assert not dfl.step_pays(drop=1.0, var=0.0, have=10, target_var=0.01, max_total=100)


def hard_unit(trace: float) -> torch.Tensor:
    """An indefinite spectrum whose trace is small against its spread (like attention's q/k blocks): a few large
    eigenvalues of both signs, a slowly decaying tail of both signs; the eigenvalues shifted to sum to ``trace``."""
    g = torch.Generator().manual_seed(5)
    tail = torch.randn(90, generator=g, dtype=F64) * torch.linspace(3, 0.2, 90, dtype=F64)
    ev = torch.cat([torch.tensor([40.0, -35.0, 25.0, -20.0, 12.0, -10.0], dtype=F64), tail])
    return sym(96, ev - (ev.sum() - trace) / 96, seed=6)


def per_unit_trace(h: torch.Tensor, seed: int, grow: bool) -> tuple[float, float, int]:
    """The sweep's per-unit trace on a dense ``h`` (a Lanczos basis for the top eigenvalue, 10 pilot probes, Krylov
    growth when ``grow``, fresh deflated probes, at most 80 products after Lanczos): ``(estimate, standard error,
    products after the Lanczos run)``."""
    n = h.shape[0]
    count = [0]

    def mm(v: torch.Tensor) -> torch.Tensor:
        count[0] += v.shape[1]
        return h @ v

    s = sw.SweepSettings(trace_rel=0.05, min_probes=10, max_probes=80, probe_round=10)
    q, hq = lanczos_basis(h, 6)
    stats = sw.ProbeStats()
    sw.probe_round(mm, n, stats, 10, seed)
    unit = SimpleNamespace(name=f"u{seed}", size=n)
    if not grow:
        real = sw._grown_basis
        sw._grown_basis = lambda mm_, q_, hq_, d, s_: (q_, hq_, 0)
    try:
        m, se = sw._per_unit_trace(mm, unit, s, stats, seed, (q, hq))
    finally:
        if not grow:
            sw._grown_basis = real
    return m, se, count[0]


def test_the_grown_per_unit_trace_is_unbiased_and_cheaper_or_more_accurate():
    """Over 150 seeds each: the per-unit trace with the grown basis has its mean within 4 standard errors of tr(H).
    Where the target (5 %) is within the budget it takes far fewer products than the same procedure on the Lanczos
    basis alone, at the same spread; where the budget caps both, it has a smaller spread."""
    for trace, capped in ((60.0, False), (30.0, True)):
        h = hard_unit(trace)
        grown = torch.tensor([per_unit_trace(h, seed, True) for seed in range(150)])
        plain = torch.tensor([per_unit_trace(h, seed, False) for seed in range(150)])
        m, sd = float(grown[:, 0].mean()), float(grown[:, 0].std())
        sd_plain = float(plain[:, 0].std())
        assert abs(m - trace) <= 4 * sd / 150**0.5, trace
        products, products_plain = float(grown[:, 2].mean()), float(plain[:, 2].mean())
        if capped:
            assert products <= products_plain + 1 and sd < 0.85 * sd_plain
        else:
            assert products < 0.7 * products_plain and sd < 1.1 * sd_plain
