"""Per-entry standard errors of the diagonal estimators (Hutchinson's probe groups) on dense float64 matrices.

Oracles: the per-probe products computed here by hand (the group sums), the exact variance of Hutchinson's estimate
(``Var est_i = sum_{j != i} H_ij^2 / K`` for Rademacher probes), the empirical spread over many seeds, and Student's t
law for the coverage of ``est +- 2 se``.
"""

from __future__ import annotations

import math

import pytest
import torch

from lib.estimators.diagonal import Probes, estimates_of
from lib.estimators.diagonal import hutchinson as hutchinson_module
from lib.estimators.diagonal.work import (
    LinearUnit,
    group_sizes,
    group_standard_error,
    group_sums,
    rademacher_probes,
    se_summary,
)


def dense(n: int = 24, seed: int = 0) -> torch.Tensor:
    """A symmetric indefinite float64 matrix with a visible diagonal."""
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(n, n, generator=g, dtype=torch.float64)
    return (a + a.T) / 2 + torch.diag(torch.linspace(-3, 5, n, dtype=torch.float64))


def t_within(x: float, nu: int, steps: int = 4000) -> float:
    """``P(|T| <= x)`` for Student's t with ``nu`` degrees of freedom (Simpson's rule on the density)."""
    c = math.exp(math.lgamma((nu + 1) / 2) - math.lgamma(nu / 2)) / math.sqrt(nu * math.pi)
    f = lambda t: c * (1 + t * t / nu) ** (-(nu + 1) / 2)  # noqa: E731
    h = x / steps
    s = f(0) + f(x) + sum((4 if i % 2 else 2) * f(i * h) for i in range(1, steps))
    return 2 * s * h / 3


def many(h: torch.Tensor, k: int, seeds: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Hutchinson's estimates and standard errors ``(seeds, n)`` over seeds ``0..seeds-1``."""
    runs = [
        estimates_of(lambda v: v @ h, h.shape[0], ["hutchinson"], k, seed=s) for s in range(seeds)
    ]
    return (
        torch.stack([r.diagonals["hutchinson"]["x"] for r in runs]),
        torch.stack([r.standard_errors["hutchinson"]["x"] for r in runs]),
    )


def test_groups_leave_the_sum_bitwise_unchanged_and_hold_the_interleaved_probe_sums():
    h, n, count = dense(), 24, 10
    z = rademacher_probes(n, 5, "x", 0, count)
    c = z * (z @ h)  # per-probe products, by hand
    unit = lambda: LinearUnit(apply=lambda v: v @ h, numel=n, seed=5, chunk=3)  # noqa: E731
    plain = Probes(count).run(unit(), None)
    grouped = Probes(count, groups=4).run(unit(), None)
    assert torch.equal(plain["zhz"], grouped["zhz"])  # the estimate's sum is accumulated as before
    sums = group_sums(grouped["zhz"], grouped["zhz_groups"])
    assert grouped["zhz_groups"].shape == (3, n)
    for g in range(4):
        assert torch.allclose(sums[g], c[g::4].sum(0), rtol=1e-12, atol=1e-12)
    assert group_sizes(count, 4).tolist() == [3, 3, 2, 2]
    # equal groups: the batch-means formula std_g(m_g) / sqrt(B)
    s = torch.randn(5, 7, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    se = group_standard_error(s, torch.full((5,), 3.0, dtype=torch.float64))
    assert torch.allclose(se, (s / 3).std(0) / math.sqrt(5), rtol=1e-12)


@pytest.mark.parametrize("k", [16, 10])  # equal groups, and unequal ones (3, 3, 2, 2)
def test_standard_error_matches_the_exact_and_the_empirical_spread(k):
    h = dense()
    d = h.diagonal()
    est, se = many(h, k, 400)
    exact_sd = ((h * h).sum(1) - d * d).sqrt() / math.sqrt(
        k
    )  # Var z_i (H z)_i = sum_{j != i} H_ij^2
    emp_sd = est.std(0)
    rms_se = se.pow(2).mean(0).sqrt()  # se^2 is unbiased for the variance
    assert float((emp_sd / exact_sd - 1).abs().max()) < 0.2  # the oracles agree
    assert float((rms_se / exact_sd - 1).abs().max()) < 0.2
    assert float((rms_se / emp_sd - 1).abs().max()) < 0.2
    assert float((1.5 * rms_se / exact_sd - 1).abs().max()) > 0.2  # a 1.5x error would fail


def test_coverage_at_two_standard_errors_follows_student_t(monkeypatch):
    h = dense()
    d = h.diagonal()
    est, se = many(h, 16, 300)  # B = 4 groups: t with 3 degrees of freedom
    cover = float(((est - d).abs() <= 2 * se).double().mean())
    assert abs(cover - t_within(2.0, 3)) < 0.03, (cover, t_within(2.0, 3))  # 0.861
    monkeypatch.setattr(hutchinson_module, "SE_GROUPS", 16)
    est, se = many(h, 32, 150)  # B = 16: close to the normal 95 %
    cover = float(((est - d).abs() <= 2 * se).double().mean())
    assert abs(cover - t_within(2.0, 15)) < 0.03, (cover, t_within(2.0, 15))  # 0.936
    assert cover > 0.9


def test_no_standard_error_for_one_probe_or_for_xdiag():
    h = dense()
    r = estimates_of(lambda v: v @ h, 24, ["hutchinson", "xdiag"], 8, seed=1)
    assert list(r.standard_errors) == ["hutchinson"]
    one = estimates_of(lambda v: v @ h, 24, ["hutchinson"], 1, seed=1)
    assert one.standard_errors == {}


def test_summary_counts_the_resolved_signs_and_leaves_out_tiny_estimates():
    est = torch.tensor([[4.0, -1.0], [1e-9, 0.5]], dtype=torch.float64)
    se = torch.tensor([[1.0, 1.0], [1.0, 0.1]], dtype=torch.float64)
    s = se_summary([est], [se])
    assert s["entries"] == 4 and s["entries_summarized"] == 3  # 1e-9 <= 1e-3 * 4
    assert s["sign_resolved_2se"] == 0.5  # 4 > 2 and 0.5 > 0.2
    assert s["max_rel_se"] == 1.0 and s["median_rel_se"] == 0.25


def test_a_checkpoint_without_the_groups_is_refused_with_a_line_naming_them(tmp_path):
    from lib.hessian.diagonal import DiagonalJob, Target, plan_phase1
    from lib.model.models import ModelSpec
    from lib.runtime import checkpoint as ckpt

    job = lambda plans: DiagonalJob(plans, samples, spec=ModelSpec(dtype="float64"))  # noqa: E731
    target = Target("w", (4, 3))
    samples = torch.zeros(2, 5, dtype=torch.long)
    new = job(plan_phase1([target], ["hutchinson"], 8, 0)).config()
    old_plans = plan_phase1([target], ["hutchinson"], 8, 0)
    old_plans[0].work["Probes"].groups = 0  # what a run before the groups planned
    old = job(old_plans).config()
    assert "probe_groups" in new and "probe_groups" not in old
    ckpt.save(tmp_path / "d.ckpt", ckpt.RunState(2), old)
    with pytest.raises(
        ckpt.UserError, match=r"different configuration \(differs in: plans, probe_groups\)"
    ):
        ckpt.load(tmp_path / "d.ckpt", new, 2)
    # xdiag alone plans no groups: its checkpoints are those of before
    assert "probe_groups" not in job(plan_phase1([target], ["xdiag"], 8, 0)).config()


@pytest.mark.slow
def test_groups_resume_bitwise_from_a_checkpoint(tmp_path, monkeypatch):
    from lib.errors import RunError
    from lib.hessian.diagonal import DiagonalJob, Target, plan_phase1
    from lib.model.data import load_samples
    from lib.model.models import ModelSpec
    from lib.runtime import checkpoint as ckpt
    from lib.runtime import parallel

    spec = ModelSpec(dtype="float64")
    model = spec.load("cpu")
    name = "model.decoder.layers.1.self_attn.q_proj.bias"
    plans = plan_phase1(
        [Target(name, tuple(model.get_parameter(name).shape))], ["hutchinson"], 6, 0
    )
    samples = load_samples("embedded", 8, 3)
    job = lambda: DiagonalJob(plans, samples, spec=spec, model=model, probe_batch=2)  # noqa: E731
    cpu = [torch.device("cpu")]
    reference = parallel.run_job(job(), parallel.RunSettings(cpu))
    assert reference[f"{name}|zhz_groups"].shape == (3, 128)
    run_unit = DiagonalJob.run_unit

    def failing(self, k, progress=None):
        out = run_unit(self, k, progress)
        if k == 2:
            out["nll_sum"] = out["nll_sum"] * float("nan")
        return out

    cfg = ckpt.CheckpointConfig(tmp_path / "d.ckpt", every_units=1)
    monkeypatch.setattr(DiagonalJob, "run_unit", failing)
    with pytest.raises(RunError):
        parallel.run_job(job(), parallel.RunSettings(cpu, cfg))
    monkeypatch.setattr(DiagonalJob, "run_unit", run_unit)
    assert ckpt.read(cfg.path)["prefix"] == 2
    cfg.resume = True
    resumed = parallel.run_job(job(), parallel.RunSettings(cpu, cfg))
    assert resumed.keys() == reference.keys()
    assert all(torch.equal(resumed[k], reference[k]) for k in reference)
