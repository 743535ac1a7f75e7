"""Hessian diagonals of whole weights (lib.hessian.diagonal, hessian_diagonal.py) on tiny float64 models.

Ground truth is the full exact Hessian of the weight (lib.exact_hessian). Statistical tests use fixed
seeds, so they are deterministic; each one also shows that it can fail (a biased estimator fails it).
"""

from __future__ import annotations

import json
import math
import re

import pytest
import torch
from cases import xdiag_by_definition
from conftest import ARCHS, LAYER, tiny_ids, tiny_model

import hessian_diagonal
from lib.app import cli
from lib.hessian.diagonal import (
    DiagonalJob,
    ParamPlan,
    Probes,
    Target,
    hutchinson_running,
    key,
    log_grid,
    offdiagonal_error,
    probe_seed,
    rademacher_probes,
    rel_l2,
    xdiag_basis,
    xdiag_estimate,
)
from lib.hessian.diagonal import (
    hessian_diagonal as estimate,
)
from lib.hessian.exact import exact_hessian
from lib.objective import subsets
from lib.objective.loss import summed_nll
from lib.runtime.jobs import run_serial

FAST = ["--seqlen", "8", "--b", "2", "--no_progress"]


def layer(model, arch: str, block: int = 0) -> Target:
    name, _ = subsets.layer_module(model, block, LAYER[arch])
    return Target(name, tuple(model.get_parameter(name).shape))


_HESSIANS: dict = {}


def full_hessian(arch: str) -> torch.Tensor:
    """Exact summed-NLL Hessian of the test layer over tiny_ids() (symmetrized), cached per architecture."""
    if arch not in _HESSIANS:
        model = tiny_model(arch)
        h = exact_hessian(
            model, subsets.whole_parameter(model, layer(model, arch).param_name), tiny_ids()
        ).hessian_sum
        _HESSIANS[arch] = (h + h.T) / 2
    return _HESSIANS[arch]


def probe_contributions(model, target: Target, k: int, seed: int = 0) -> torch.Tensor:
    """``z_j * (H z_j)`` for probes ``j < k`` at every entry, ``(k, n)``, from the real job (summed-NLL scale)."""
    plan = ParamPlan(target.param_name, target.numel)
    plan.add(Probes(k, record=torch.arange(target.numel)))
    sums = run_serial(DiagonalJob([plan], tiny_ids(), seed=seed, model=model), torch.device("cpu"))
    return sums[key(target.param_name, "record")]


# ----------------------------------------------------------------------------- probes


def test_probes_are_rademacher_and_depend_only_on_seed_param_and_index():
    a = rademacher_probes(1000, 7, "w", 0, 6)
    assert torch.equal(
        a[3:5], rademacher_probes(1000, 7, "w", 3, 5)
    )  # any chunking gives the same probe j
    assert set(a.unique().tolist()) == {-1.0, 1.0}
    assert abs(float(a.mean())) < 0.05
    assert not torch.equal(a[0], a[1]) and not torch.equal(
        a[0], rademacher_probes(1000, 8, "w", 0, 1)[0]
    )
    assert not torch.equal(a[0], rademacher_probes(1000, 7, "v", 0, 1)[0])
    assert probe_seed(0, "w", 1) == probe_seed(0, "w", 1) != probe_seed(0, "w", 2)
    # entries are uncorrelated (the original's balanced blocks are not)
    z = rademacher_probes(64, 0, "w", 0, 4000)
    corr = (z.T @ z) / 4000 - torch.eye(64)
    assert float(corr.abs().max()) < 0.08


def test_results_do_not_depend_on_probe_batch_or_model_input_bs():
    model = tiny_model("opt")
    t = layer(model, "opt")
    ids = tiny_ids(b=4)
    ref = estimate(model, [t], ids, estimators=("hutchinson", "xdiag"), hvps=6, chunk=1)
    other = estimate(
        model,
        [t],
        ids,
        estimators=("hutchinson", "xdiag"),
        hvps=6,
        chunk=4,
        model_input_bs=2,
    )
    for e in ("hutchinson", "xdiag"):
        assert torch.allclose(
            ref.diagonals[e][t.param_name], other.diagonals[e][t.param_name], rtol=1e-6, atol=1e-12
        )


# ----------------------------------------------------------------------------- exact and empirical fisher


@pytest.mark.parametrize("arch", ARCHS)
def test_exact_equals_diagonal_of_the_full_exact_hessian(arch):
    model = tiny_model(arch)
    t = layer(model, arch)
    res = estimate(model, [t], tiny_ids(), estimators=("exact",))
    d = res.diagonals["exact"][t.param_name]
    assert d.shape == t.shape
    ref = full_hessian(arch) / (2 * 7)  # lib.exact_hessian of the subset covering the whole weight
    assert float(ref.diagonal().abs().max()) > 0
    # entry [i, j] of the weight is flat index i * n_cols + j of that subset
    assert rel_l2(d.reshape(-1), ref.diagonal()) < 1e-12
    assert res.hvps_per_sample["exact"] == t.numel


@pytest.mark.parametrize("model_input_bs", [1, 2])
def test_empirical_fisher_equals_the_squared_per_sample_gradients_by_hand(model_input_bs):
    model = tiny_model("gpt2")
    t = layer(model, "gpt2", block=1)
    ids = tiny_ids(b=4)
    res = estimate(model, [t], ids, estimators=("empirical_fisher",), model_input_bs=model_input_bs)
    weight = model.get_parameter(t.param_name)
    by_hand = torch.zeros_like(weight)
    weight.requires_grad_(True)
    try:
        for row in ids:
            logits = model(input_ids=row[None]).logits
            loss = torch.nn.functional.cross_entropy(logits[0, :-1], row[1:], reduction="sum")
            (g,) = torch.autograd.grad(loss, weight)
            by_hand += g**2
    finally:
        weight.requires_grad_(False)
    by_hand /= 4 * 7
    assert float(by_hand.abs().max()) > 0
    assert torch.allclose(
        res.diagonals["empirical_fisher"][t.param_name], by_hand, rtol=1e-10, atol=0
    )
    assert res.hvps_per_sample["empirical_fisher"] == 0


# ----------------------------------------------------------------------------- hutchinson


def _bias_statistic(contrib: torch.Tensor, h: torch.Tensor) -> float:
    """``K ||mean_j c_j - diag H||^2 / sum_{i!=j} H_ij^2``: expectation exactly 1 for an unbiased one-probe estimator."""
    d = h.diagonal()
    off2 = float((h * h).sum() - (d * d).sum())
    return contrib.shape[0] * float(((contrib.mean(0) - d) ** 2).sum()) / off2


def balanced_block_probes(n: int, k: int, block: int, seed: int) -> torch.Tensor:
    """The original's probes: each block of ``block`` consecutive entries holds as many +1 as -1 (biased)."""
    base = torch.cat([torch.ones(block // 2), -torch.ones(block // 2)]).double()
    idx = torch.argsort(
        torch.rand(k, n // block, block, generator=torch.Generator().manual_seed(seed)), dim=-1
    )
    return base[idx].reshape(k, n)


@pytest.mark.parametrize("arch", ARCHS)
def test_hutchinson_is_unbiased_and_its_error_follows_the_theory(arch):
    model = tiny_model(arch)
    t = layer(model, arch)
    h = full_hessian(arch)
    contrib = probe_contributions(model, t, 400)  # 400 independent one-probe estimates, real HVPs
    d = h.diagonal()
    # the job's products are z * (H z) of the explicit Hessian
    z = rademacher_probes(t.numel, 0, t.param_name, 0, 3)
    assert rel_l2(contrib[:3], z * (h @ z.T).T) < 1e-6
    # unbiased: the mean error over the probes is consistent with zero
    assert 0.5 < _bias_statistic(contrib, h) < 1.8
    # error: E ||est_k - diag||^2 = sum_{i != j} H_ij^2 / k, checked with 400/k disjoint groups of k probes
    theory = offdiagonal_error(h) * float(d.norm())
    for k in (1, 4, 16):
        groups = contrib[: 400 // k * k].reshape(-1, k, t.numel).mean(1)
        measured = math.sqrt(float(((groups - d) ** 2).sum(1).mean()))
        assert 0.8 < measured / (theory / math.sqrt(k)) < 1.2, (k, measured, theory)


def test_the_bias_test_detects_the_originals_balanced_probes():
    h = full_hessian("llama")
    z = balanced_block_probes(h.shape[0], 400, 8, seed=0)
    assert _bias_statistic(z * (h @ z.T).T, h) > 1.8
    # while Rademacher probes on the same matrix pass
    r = rademacher_probes(h.shape[0], 0, "x", 0, 400)
    assert _bias_statistic(r * (h @ r.T).T, h) < 1.8


def test_hutchinson_running_means():
    c = torch.tensor([[1.0, 2.0], [3.0, 6.0], [5.0, 1.0]])
    assert torch.allclose(
        hutchinson_running(c),
        torch.tensor([[1.0, 2.0], [2.0, 4.0], [3.0, 3.0]], dtype=torch.float64),
    )


# ----------------------------------------------------------------------------- xdiag


def test_xdiag_closed_form_and_prefixes_equal_the_definition():
    h = full_hessian("opt")
    n = h.shape[0]
    omega = rademacher_probes(n, 3, "w", 0, 12).T
    q, r = xdiag_basis((h @ omega).T)
    z = h @ q
    assert rel_l2(xdiag_estimate(omega, q, z, r), xdiag_by_definition(h, omega)) < 1e-10
    # the first s' probes of a larger run are exactly XDiag with s' probes
    assert rel_l2(xdiag_estimate(omega, q, z, r, 5), xdiag_by_definition(h, omega[:, :5])) < 1e-10
    # on any subset of rows
    rows = torch.tensor([0, 7, 100, 255])
    assert torch.allclose(
        xdiag_estimate(omega[rows], q[rows], z[rows], r, 5),
        xdiag_by_definition(h, omega[:, :5])[rows],
        rtol=1e-10,
    )


def test_xdiag_refuses_a_rank_deficient_sketch():
    h = torch.diag(torch.tensor([1.0, 2.0, 0.0, 0.0], dtype=torch.float64))
    omega = rademacher_probes(4, 0, "w", 0, 3).T
    with pytest.raises(ValueError, match="rank below 3"):
        xdiag_basis((h @ omega).T)


@pytest.mark.parametrize("arch", ARCHS)
def test_xdiag_is_unbiased_and_the_test_detects_bias(arch):
    h = full_hessian(arch)
    n, d = h.shape[0], h.diagonal()
    seeds, s = 300, 8
    est, low_rank = [], []
    for seed in range(seeds):
        omega = rademacher_probes(n, seed, "w", 0, s).T
        q, r = xdiag_basis((h @ omega).T)
        z = h @ q
        est.append(xdiag_estimate(omega, q, z, r))
        low_rank.append((q * z).sum(1))  # diag(Q Q^T H) alone: reuses the sketch's probes, biased

    def statistic(e: torch.Tensor) -> float:
        return seeds * float(((e.mean(0) - d) ** 2).sum()) / float(((e - d) ** 2).sum(1).mean())

    assert 0.4 < statistic(torch.stack(est)) < 1.8
    assert statistic(torch.stack(low_rank)) > 20


@pytest.mark.parametrize("arch", ARCHS)
def test_xdiag_is_more_accurate_than_hutchinson_at_equal_budget(arch):
    """Root-mean-square relative error over 6 seeds at K = 64 HVPs per sample, real jobs."""
    model = tiny_model(arch)
    t = layer(model, arch)
    ids = tiny_ids()
    d = full_hessian(arch).diagonal() / (2 * 7)
    errs = {"hutchinson": [], "xdiag": []}
    for seed in range(6):
        res = estimate(model, [t], ids, estimators=("hutchinson", "xdiag"), hvps=64, seed=seed)
        for e in errs:
            errs[e].append(rel_l2(res.diagonals[e][t.param_name].reshape(-1), d) ** 2)
    rmse = {e: math.sqrt(sum(v) / len(v)) for e, v in errs.items()}
    assert rmse["xdiag"] <= 0.75 * rmse["hutchinson"], rmse


def test_the_job_equals_xdiag_on_the_explicit_hessian_with_the_same_probes():
    model = tiny_model("gpt2")
    t = layer(model, "gpt2")
    res = estimate(model, [t], tiny_ids(), estimators=("xdiag",), hvps=20, seed=5)
    h = full_hessian("gpt2")
    omega = rademacher_probes(t.numel, 5, t.param_name, 0, 10).T
    ref = xdiag_by_definition(h, omega) / (2 * 7)
    assert rel_l2(res.diagonals["xdiag"][t.param_name].reshape(-1), ref) < 1e-8
    assert res.hvps_per_sample["xdiag"] == 20


# ----------------------------------------------------------------------------- convergence study


def test_tracked_rows_give_curves_that_end_at_the_final_estimates():
    model = tiny_model("gpt2")
    name, module = subsets.layer_module(model, 0, LAYER["gpt2"])
    tracked = subsets.output_units_index(module, 3)  # Conv1D: weight[:, :3]
    t = Target(name, tuple(model.get_parameter(name).shape), tracked)
    res = estimate(
        model,
        [t],
        tiny_ids(),
        estimators=("hutchinson", "xdiag", "empirical_fisher"),
        hvps=10,
    )
    d = full_hessian("gpt2").diagonal() / (2 * 7)
    assert torch.allclose(res.tracked_exact[name], d[tracked], rtol=1e-10)
    assert torch.equal(
        tracked, (torch.arange(16)[:, None] * 48 + torch.arange(3)).reshape(-1)
    )  # GPT-2 Conv1D stores (in, out)
    curves = res.curves[name]
    assert curves["hutchinson"]["k"] == list(range(1, 11))
    assert curves["xdiag"]["k"] == [2, 4, 6, 8, 10]
    for e in ("hutchinson", "xdiag"):
        c = curves[e]
        final = res.diagonals[e][name].reshape(-1)
        assert c["tracked_rel_error"][-1] == pytest.approx(
            rel_l2(final[tracked], d[tracked]), rel=1e-9
        )
        assert math.isnan(c["consecutive_rel_diff"][0]) and all(
            v > 0 for v in c["consecutive_rel_diff"][1:]
        )
    assert curves["empirical_fisher"]["final_tracked_rel_error"] == pytest.approx(
        rel_l2(res.diagonals["empirical_fisher"][name].reshape(-1)[tracked], d[tracked])
    )


def test_log_grid():
    assert log_grid(10, 2) == [2, 4, 6, 8, 10]
    g = log_grid(10000, 1, points=20)
    assert g[0] == 1 and g[-1] == 10000 and len(g) <= 21 and g == sorted(set(g))


# ----------------------------------------------------------------------------- the script


def _outputs(tmp_path, meta):
    stem = tmp_path / meta["files"]["tensor"][:-3]
    return torch.load(f"{stem}.pt"), json.loads(open(f"{stem}.json").read())


@pytest.mark.slow
def test_script_end_to_end_with_a_convergence_study(tmp_path, capsys):
    meta = hessian_diagonal.run(
        [
            "--track_rows",
            "1",
            "--hvps",
            "6",
            "--estimator",
            "hutchinson",
            "xdiag",
            "empirical_fisher",
            "--output_dir",
            str(tmp_path),
            *FAST,
        ]
    )
    diags, js = _outputs(tmp_path, meta)
    name = "model.decoder.layers.0.self_attn.q_proj.weight"
    assert set(diags) == {"hutchinson", "xdiag", "empirical_fisher"} and diags["xdiag"][
        name
    ].shape == (128, 128)
    assert (
        js["parameter"] == name
        and js["hvps"] == 6
        and js["estimators"] == ["hutchinson", "xdiag", "empirical_fisher"]
    )
    assert js["hvps_per_sample"] == {"hutchinson": 6, "xdiag": 6, "empirical_fisher": 0}
    assert (
        js["n_tokens"] == 2 * 7
        and js["estimate_elapsed_s"] > 0
        and "mean next-token NLL" in js["normalization"]
    )
    conv = js["convergence"]
    assert conv["tracked_entries"] == 128 and conv["consecutive_diff_entries"] == 128 * 128
    assert (
        len(conv["curves"]["hutchinson"]["tracked_rel_error"]) == 6
        and conv["curves"]["hutchinson"]["consecutive_rel_diff"][0] is None
    )
    assert any(f.endswith("_convergence.png") for f in js["figures"])
    for f in js["figures"]:
        assert (tmp_path / f).stat().st_size > 1000
    assert not list(tmp_path.glob("*.ckpt"))  # both phases' checkpoints are removed at the end
    # Hutchinson's per-entry standard error: <name>_se.pt, its summary in the JSON and one console line
    se_js = js["standard_error"]
    assert se_js["groups"] == 4 and list(se_js["estimators"]) == ["hutchinson"]
    ses = torch.load(tmp_path / se_js["file"])
    se = ses["hutchinson"][name]
    assert se.shape == (128, 128) and bool((se > 0).all())
    summ = se_js["estimators"]["hutchinson"]
    d = diags["hutchinson"][name]
    assert summ["sign_resolved_2se"] == pytest.approx(float((d.abs() > 2 * se).double().mean()))
    assert summ["entries"] == 128 * 128 and 0 < summ["median_rel_se"] <= summ["max_rel_se"]
    assert se_js["file"] in meta["outputs"]
    assert "hutchinson: per-entry standard error (4 probe groups)" in capsys.readouterr().out


@pytest.mark.slow
def test_all_layers_equals_separate_runs(tmp_path):
    common = [
        "--hvps",
        "2",
        "--estimator",
        "xdiag",
        "--block_index",
        "3",
        "--output_dir",
        str(tmp_path),
        *FAST,
    ]
    meta = hessian_diagonal.run(["--all_layers", "--name", "all", *common])
    diags, js = _outputs(tmp_path, meta)
    names = [p["name"] for p in js["parameters"]]
    assert [p["layer"] for p in js["parameters"]] == [
        "self_attn.k_proj",
        "self_attn.v_proj",
        "self_attn.q_proj",
        "self_attn.out_proj",
        "fc1",
        "fc2",
    ]
    for lname in ("self_attn.v_proj", "fc1"):
        one = hessian_diagonal.run(["--layer_name", lname, "--name", lname, *common])
        single, js1 = _outputs(tmp_path, one)
        assert single.shape == tuple(js1["parameters"][0]["shape"])
        assert torch.equal(diags["xdiag"][f"model.decoder.layers.3.{lname}.weight"], single)
    assert len(names) == 6 and all(torch.isfinite(diags["xdiag"][n]).all() for n in names)


ERRORS = [
    (
        ["--layer_name", "q_proj"],
        r"unknown --layer_name 'q_proj'; the linear layers of a block are: self_attn.k_proj, self_attn.v_proj, self_attn.q_proj, self_attn.out_proj, fc1, fc2",
    ),
    (
        ["--estimator", "exact", "--layer_name", "fc1"],
        r"--estimator exact needs one Hessian-vector product per entry and sample: model.decoder.layers.0.fc1.weight has 65536 entries, over the limit of 16384",
    ),
    (["--hvps", "5"], r"--hvps must be even and at least 2, got 5"),
    (
        ["--track_rows", "129"],
        r"--track_rows 129 is larger than the 128 output units of self_attn.q_proj",
    ),
    (
        ["--track_rows", "1", "--all_layers"],
        r"--track_rows studies the convergence on one layer; it cannot be combined with --all_layers",
    ),
    (
        ["--all_layers", "--block_index", "4"],
        r"--block_index 4 is out of range: the model has 4 blocks",
    ),
    (["--block_index", "4"], r"--block_index 4 is out of range: the model has 4 blocks"),
    (
        ["--track_rows", "1", "--estimator", "empirical_fisher"],
        r"--track_rows records the error after each probe",
    ),
]


@pytest.mark.parametrize("extra,message", ERRORS, ids=[" ".join(e[0]) for e in ERRORS])
def test_errors_are_one_clear_line(extra, message, capsys, tmp_path):
    with pytest.raises(SystemExit) as exc:
        cli.main(hessian_diagonal.run, ["--output_dir", str(tmp_path), *FAST, *extra])
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and len(err.splitlines()) == 1
    assert re.search(message, err), err
    assert not list(tmp_path.iterdir())


def test_summed_nll_matches_the_jobs_perplexity():
    model = tiny_model("opt")
    ids = tiny_ids()
    res = estimate(model, [layer(model, "opt")], ids, estimators=("empirical_fisher",))
    assert res.nll_sum == pytest.approx(
        float(summed_nll(model(input_ids=ids).logits, ids)), rel=1e-10
    )


def test_the_old_name_fisher_is_a_deprecated_alias_of_empirical_fisher(tmp_path, capsys):
    meta = hessian_diagonal.run(
        [
            "--estimator",
            "fisher",
            "hutchinson",
            "--vhp_samples",
            "2",
            "--name",
            "old",
            "--output_dir",
            str(tmp_path),
            *FAST,
        ]
    )
    err = capsys.readouterr().err
    assert (
        "warning: --estimator fisher is deprecated: it is the empirical Fisher, now called empirical_fisher"
        in err
    )
    assert meta["estimators"] == ["empirical_fisher", "hutchinson"] and meta["config"]["compute"][
        "estimator"
    ] == ["empirical_fisher", "hutchinson"]
    new = hessian_diagonal.run(
        [
            "--estimator",
            "empirical_fisher",
            "hutchinson",
            "--vhp_samples",
            "2",
            "--name",
            "new",
            "--output_dir",
            str(tmp_path),
            *FAST,
        ]
    )
    a, b = torch.load(tmp_path / "old.pt"), torch.load(tmp_path / "new.pt")
    assert (
        all(torch.equal(a[e][p], b[e][p]) for e in b for p in b[e])
        and new["estimators"] == meta["estimators"]
    )
    with pytest.raises(
        ValueError, match=r"unknown estimator 'fisher'.*now called 'empirical_fisher'"
    ):
        estimate(
            tiny_model("opt"), [], tiny_ids(), estimators=("fisher",)
        )  # the library speaks the new names only


def test_xdiag_in_bfloat16_runs_end_to_end(tmp_path):
    """The phase-2 basis is bfloat16 (the model's dtype): its digest for the checkpoint identity works (NumPy has no bfloat16)."""
    meta = hessian_diagonal.run(
        [
            "--dtype",
            "bfloat16",
            "--estimator",
            "xdiag",
            "--vhp_samples",
            "4",
            "--name",
            "bf",
            "--output_dir",
            str(tmp_path),
            *FAST,
        ]
    )
    d = torch.load(tmp_path / "bf.pt")
    assert (
        d.dtype == torch.bfloat16
        and d.shape == (128, 128)
        and bool(torch.isfinite(d.float()).all())
        and meta["perplexity"] > 1
    )
    from lib.products.operator import digest

    basis = torch.randn(3, 5).to(torch.bfloat16)
    assert digest(basis) == digest(basis.clone()) != digest(basis + 1)
