"""Curvature approximations against independent oracles, their metrics on hand-made matrices, and --compare end to end."""

from __future__ import annotations

import json
import math

import pytest
import torch
from cases import (
    _logits_fn,  # x -> logits through the plain model, the subset substituted
)
from conftest import LAYER, tiny_ids, tiny_model

from lib.hessian import curvature as cv
from lib.objective import subsets
from lib.objective.loss import SubsetLoss
from lib.runtime.jobs import run_serial

CPU = torch.device("cpu")


def _job(model, subset, ids, approx, fisher_samples=1, perturbations=None, **kw):
    return cv.CurvatureJob(
        subset, ids, list(approx), fisher_samples, perturbations, seed=0, model=model, **kw
    )


def _logit_jacobian(model, subset, ids):
    """Oracle: ``(logits (N, V), J (N, V, n))`` of the full model's logits at the predicted positions, by autograd.functional.jacobian."""
    logits = _logits_fn(model, subset, ids)
    x0 = subset.gather(model)
    return logits(x0).detach(), torch.autograd.functional.jacobian(logits, x0)


@pytest.mark.parametrize("arch", ["opt", "llama", "gpt2"])
def test_ggn_and_empirical_fisher_equal_the_jacobian_oracle(arch):
    model = tiny_model(arch)
    sub = subsets.single_layer_single_block(model, LAYER[arch], 1, 5)
    ids = tiny_ids(b=2, seqlen=7)
    z, jac = _logit_jacobian(model, sub, ids)
    p = torch.softmax(z, -1)
    ggn = sum(
        jac[t].T @ (torch.diag(p[t]) - torch.outer(p[t], p[t])) @ jac[t] for t in range(len(p))
    )
    # per-sample gradients of the summed NLL at the true labels, by autograd
    obj = SubsetLoss(model, sub, fused_head=False)
    grads = []
    for row in ids:
        x = obj.x0().requires_grad_(True)
        grads.append(torch.autograd.grad(obj(x, row[None]), x)[0])
    grads = torch.stack(grads)
    for fused in (None, False):  # through the fused head, and through the plain logits
        sums = run_serial(
            _job(model, sub, ids, ["ggn", "empirical_fisher"], model_input_bs=2, fused_head=fused),
            CPU,
        )
        assert torch.allclose(sums["ggn_sum"], ggn, rtol=1e-9, atol=1e-12)
        assert torch.allclose(sums["empirical_fisher_sum"], grads.T @ grads, rtol=1e-9, atol=1e-12)
    assert float(ggn.norm()) > 0 and torch.linalg.eigvalsh(ggn).min() > -1e-12  # a GGN is PSD


def _hooked_inputs(model, names, ids):
    """Oracle: each module's input, captured by a forward *pre*-hook."""
    got = {}
    handles = [
        model.get_submodule(n).register_forward_pre_hook(
            lambda m, a, n=n: got.__setitem__(n, a[0].detach())
        )
        for n in names
    ]
    with torch.no_grad():
        model(input_ids=ids, use_cache=False)
    for h in handles:
        h.remove()
    return got


@pytest.mark.parametrize(
    "arch", ["opt", "gpt2"]
)  # nn.Linear (out, in) and GPT-2's Conv1D (in, out)
def test_gptq_is_the_gram_of_the_hooked_layer_inputs_blockwise(arch):
    model = tiny_model(arch)
    layers = ["self_attn.q_proj", "fc1"] if arch == "opt" else ["attn.c_attn", "mlp.c_fc"]
    slices = [subsets.row0_slice(model, b, name, 4) for b in (0, 1) for name in layers]
    # a second row of the first layer: its own block, zero against row 0
    name0, mod0 = subsets.layer_module(model, 0, layers[0])
    second = (
        torch.arange(4) * mod0.weight.shape[1] + 1
        if arch == "gpt2"
        else mod0.weight.shape[1] + torch.arange(4)
    )
    sub = subsets.make_subset(*slices, subsets.ParamSlice(name0, second))
    ids = tiny_ids(b=3, seqlen=6)
    sums = run_serial(_job(model, sub, ids, ["gptq"], model_input_bs=1), CPU)
    layout = cv.entry_layout(model, sub)
    from lib.hessian.exact import HessianResult

    res = HessianResult(
        torch.zeros(1), torch.zeros(sub.size, sub.size), 0.0, 3, 3 * 5, "rev-rev", 0.0, sub
    )
    gptq = cv.approximation_matrices(sums, res, ["gptq"], 1, layout, 6)["gptq"]
    inputs = _hooked_inputs(model, [s.param_name[:-7] for s in sub.slices], ids)
    expect = torch.zeros(sub.size, sub.size, dtype=torch.float64)
    start = 0
    for s in sub.slices:
        x = inputs[s.param_name[:-7]].reshape(
            -1, inputs[s.param_name[:-7]].shape[-1]
        )  # (b*seqlen, in)
        width = model.get_parameter(s.param_name).shape[1]
        cols = s.flat_index // width if arch == "gpt2" else s.flat_index % width
        xs = x[:, cols]
        expect[start : start + len(s), start : start + len(s)] = 2 * xs.T @ xs / (3 * 6)
        start += len(s)
    assert torch.allclose(gptq, expect, rtol=1e-10, atol=1e-14)
    assert float(expect.diagonal().min()) > 0


def _fisher_error_variance(c, p):
    """``E ||g g^T - GGN_t||_F^2`` summed over tokens: the expected squared error of one draw per position."""
    total = 0.0
    for t in range(c.shape[0]):
        g = c[t].T[None] @ (
            p[t][None, :, None] - torch.eye(p.shape[1])
        )  # (1, n, V): column y = g for label y
        g = g[0].T  # (V, n)
        ggn_t = cv.ggn_sum(c[t : t + 1], p[t : t + 1])
        total += float((p[t] * g.pow(2).sum(1).pow(2)).sum()) - float(ggn_t.pow(2).sum())
    return total


def test_sampled_fisher_is_unbiased_for_the_ggn_and_converges_at_rate_one_over_draws():
    g = torch.Generator().manual_seed(0)
    c = torch.randn(6, 7, 4, generator=g, dtype=torch.float64)
    p = torch.softmax(torch.randn(6, 7, generator=g, dtype=torch.float64), -1)
    ggn = cv.ggn_sum(c, p)
    var1 = _fisher_error_variance(c, p)

    def fisher(draws, rep):
        out = torch.zeros_like(ggn)
        for j in range(draws):
            gr = cv.label_gradients(c, p, cv.sample_labels(p, seed=rep, sample=0, draw=j))
            out += gr.T @ gr
        return out / draws

    reps = 300
    for draws in (1, 16):
        fs = [fisher(draws, rep) for rep in range(reps)]
        mean = torch.stack(fs).mean(0)
        # the mean over all reps*draws draws: unbiased, so within a few standard errors of the GGN
        assert float((mean - ggn).pow(2).sum()) < 4 * var1 / (reps * draws)
        mse = sum(float((f - ggn).pow(2).sum()) for f in fs) / reps
        assert 0.8 < mse / (var1 / draws) < 1.25, (draws, mse, var1 / draws)


def test_job_fisher_approaches_the_ggn_and_labels_do_not_depend_on_the_batching():
    model = tiny_model("opt")
    sub = subsets.single_layer_single_block(model, "fc1", 0, 6)
    ids = tiny_ids(b=2, seqlen=6)
    a = run_serial(
        _job(model, sub, ids, ["ggn", "fisher"], fisher_samples=3, model_input_bs=1), CPU
    )
    b = run_serial(_job(model, sub, ids, ["fisher"], fisher_samples=3, model_input_bs=2), CPU)
    assert torch.allclose(
        a["fisher_sum"], b["fisher_sum"], rtol=1e-10, atol=1e-14
    )  # same draws per sample index
    many = (
        run_serial(_job(model, sub, ids, ["fisher"], fisher_samples=400, model_input_bs=2), CPU)[
            "fisher_sum"
        ]
        / 400
    )
    err = float((many - a["ggn_sum"]).norm() / a["ggn_sum"].norm())
    one = float((a["fisher_sum"] / 3 - a["ggn_sum"]).norm() / a["ggn_sum"].norm())
    assert err < 0.2 and err < one / 4


@pytest.mark.filterwarnings("ignore:Full backward hook")
def test_kfac_on_a_single_row_is_gptq_times_the_predicted_scalar():
    model = tiny_model("opt")
    name, module = subsets.layer_module(model, 0, "self_attn.q_proj")
    sub = subsets.single_layer_single_block(model, "self_attn.q_proj", 0, 16)  # all of row 0
    ids = tiny_ids(b=2, seqlen=6)
    draws = 3
    sums = run_serial(
        _job(model, sub, ids, ["gptq", "kfac"], fisher_samples=draws, model_input_bs=2), CPU
    )
    from lib.hessian.exact import HessianResult

    n_tok = 2 * 5
    res = HessianResult(torch.zeros(1), torch.zeros(16, 16), 0.0, 2, n_tok, "rev-rev", 0.0, sub)
    mats = cv.approximation_matrices(
        sums, res, ["gptq", "kfac"], draws, cv.entry_layout(model, sub), 6
    )
    # oracle for G[0, 0]: the output gradient from a full backward hook, the same sampled labels
    grads = []
    module.weight.requires_grad_(True)
    h = module.register_full_backward_hook(lambda m, gi, go: grads.append(go[0][..., 0].detach()))
    try:
        logits = model(input_ids=ids, use_cache=False).logits[:, :-1]
        p = torch.softmax(logits.detach(), -1)
        for j in range(draws):
            y = torch.stack([cv.sample_labels(p[r], 0, r, j) for r in range(2)])
            torch.nn.functional.cross_entropy(
                logits.reshape(-1, logits.shape[-1]), y.reshape(-1), reduction="sum"
            ).backward(retain_graph=True)
    finally:
        h.remove()
        module.weight.requires_grad_(False)
        module.weight.grad = None
    g00 = sum(float(g.pow(2).sum()) for g in grads) / (draws * n_tok)
    assert g00 > 0
    assert torch.allclose(mats["kfac"], mats["gptq"] * g00 / 2, rtol=1e-9, atol=1e-15)


# ----------------------------------------------------------------------------- metrics on hand-made matrices


def test_frobenius_metrics_and_cosine():
    h = torch.tensor([[2.0, 1.0], [1.0, 3.0]], dtype=torch.float64)
    m = cv.frobenius_metrics(3 * h, h)
    assert m["rel_frobenius"] == pytest.approx(2.0) and m["best_scale"] == pytest.approx(1 / 3)
    assert m["rel_frobenius_scaled"] == pytest.approx(0.0, abs=1e-12) and m[
        "cosine"
    ] == pytest.approx(1.0)
    d = torch.diag(h.diagonal())
    m = cv.frobenius_metrics(d, h)
    assert m["cosine"] == pytest.approx(13 / (math.sqrt(13) * math.sqrt(15)))
    assert m["rel_frobenius"] == pytest.approx(math.sqrt(2 / 15))
    assert m["rel_frobenius_scaled"] == pytest.approx(
        math.sqrt(1 - 13 / 15)
    )  # best fit: c = 1, residual off-diagonal
    assert cv.frobenius_metrics(-h, h)["cosine"] == pytest.approx(-1.0)


def test_subspace_overlap():
    a = torch.diag(torch.tensor([4.0, 3.0, 2.0, 1.0], dtype=torch.float64))
    b = torch.diag(torch.tensor([1.0, 2.0, 3.0, 4.0], dtype=torch.float64))
    assert cv.subspace_overlap(a, a, 2) == pytest.approx(1.0)
    assert cv.subspace_overlap(a, b, 2) == pytest.approx(0.0, abs=1e-12)
    assert cv.subspace_overlap(a, b, 4) == pytest.approx(1.0)  # the whole space
    th = 0.3  # rotate the top eigenvector of a in the (e0, e3) plane: overlap of the top-1 subspaces is cos^2
    r = torch.eye(4, dtype=torch.float64)
    r[0, 0] = r[3, 3] = math.cos(th)
    r[0, 3], r[3, 0] = -math.sin(th), math.sin(th)
    assert cv.subspace_overlap(r @ a @ r.T, a, 1) == pytest.approx(math.cos(th) ** 2)


def test_quadratic_forms_and_prediction_metrics():
    h = torch.tensor([[2.0, -1.0], [-1.0, 4.0]], dtype=torch.float64)
    d = torch.tensor([[1.0, 0.0], [1.0, 1.0], [0.5, -2.0]], dtype=torch.float64)
    q = cv.quadratic_forms(h, d)
    assert torch.allclose(q, torch.tensor([1.0, 2.0, 0.25 + 8 + 1], dtype=torch.float64))
    m = cv.prediction_metrics(2 * q, q)
    assert m["corr"] == pytest.approx(1.0) and m["rel_error"] == pytest.approx(1.0)
    assert cv.prediction_metrics(-q, q)["corr"] == pytest.approx(-1.0)
    out = cv.compare_matrices(
        h, {"diag": torch.diag(h.diagonal()), "same": h}, 1, d, {"measured": q}
    )
    assert (
        out["same"]["pred_vs_exact_rel_error"] == pytest.approx(0.0, abs=1e-12)
        and out["same"]["rel_frobenius"] == 0
    )
    assert out["exact"]["pred_vs_measured_corr"] == pytest.approx(1.0)
    qd = cv.quadratic_forms(torch.diag(h.diagonal()), d)
    assert out["diag"]["pred_vs_exact_rel_error"] == pytest.approx(
        float((qd - q).norm() / q.norm())
    )


def test_measured_even_change_matches_the_exact_quadratic_on_a_smooth_model():
    """GPT-2's GELU is smooth: the even part of f(x0 +- d) - f(x0) is d^T H d / 2 + O(d^4) (ReLU models have kinks)."""
    model = tiny_model("gpt2")
    sub = subsets.single_layer_single_block(model, "mlp.c_fc", 0, 8)
    ids = tiny_ids(b=2, seqlen=6)
    d, s = cv.rounding_perturbations(model, sub, 6, 12, seed=0)
    w = model.get_parameter(sub.slices[0].param_name)
    assert torch.allclose(
        s, (w[:, 0].max() - w[:, 0].min()).double().expand(8) / 4095
    )  # Conv1D row 0 = column 0
    assert bool((d.abs() <= s / 2).all()) and float(d.abs().min()) > 0
    sums = run_serial(_job(model, sub, ids, ["diag"], perturbations=d, model_input_bs=2), CPU)
    change = sums["loss_change_sum"]
    quad = cv.quadratic_forms(sums["hessian_sum"], d)
    even = change.mean(1)
    assert float((even - quad).norm() / quad.norm()) < 1e-3
    odd = (change[:, 0] - change[:, 1]) / 2
    grad = torch.func.grad(lambda x: SubsetLoss(model, sub)(x, ids))(sub.gather(model))
    assert torch.allclose(
        odd, d @ grad, rtol=1e-3
    )  # the first-order term the quadratic proxies leave out


# ----------------------------------------------------------------------------- the script flag


ARGS = [
    "--t",
    "4",
    "--seqlen",
    "12",
    "--b",
    "4",
    "--dtype",
    "float64",
    "--no_progress",
    "--name",
    "c",
    "--compare",
    "ggn",
    "fisher",
    "empirical_fisher",
    "gptq",
    "kfac",
    "diag",
    "--fisher_samples",
    "2",
    "--perturbations",
    "5",
]


@pytest.fixture(scope="module")
def compare_reference(tmp_path_factory):
    import single_layer_single_block

    tmp = tmp_path_factory.mktemp("cmp")
    meta = single_layer_single_block.run([*ARGS, "--output_dir", str(tmp)])
    return tmp, meta


def test_compare_writes_matrices_metrics_and_figure(compare_reference):
    tmp, meta = compare_reference
    mats = torch.load(tmp / "c_compare.pt")
    assert list(mats) == ["exact", "ggn", "fisher", "empirical_fisher", "gptq", "kfac", "diag"]
    assert all(m.shape == (4, 4) for m in mats.values())
    assert torch.equal(mats["exact"], torch.load(tmp / "c.pt"))
    js = json.loads((tmp / "c.json").read_text())
    assert set(js["comparison"]) == {
        "ggn",
        "fisher",
        "empirical_fisher",
        "gptq",
        "kfac",
        "diag",
        "exact",
    }
    assert js["comparison"]["diag"]["best_scale"] == pytest.approx(1.0)
    assert set(js["comparison"]["exact"]) == {
        "pred_vs_measured_corr",
        "pred_vs_measured_rel_error",
        "pred_vs_measured_even_corr",
        "pred_vs_measured_even_rel_error",
    }
    for f in js["comparison_details"]["figures"]:
        assert (tmp / f).stat().st_size > 1000


@pytest.mark.slow
def test_compare_on_two_workers_and_resumed_equals_one_process(
    compare_reference, tmp_path, monkeypatch, capsys
):
    import single_layer_single_block
    from lib.app import cli

    ref = torch.load(compare_reference[0] / "c_compare.pt")
    single_layer_single_block.run(
        [*ARGS, "--output_dir", str(tmp_path / "w"), "--devices", "cpu,cpu"]
    )
    two = torch.load(tmp_path / "w" / "c_compare.pt")
    assert all(torch.equal(two[k], ref[k]) for k in ref)
    # a run that fails at unit 2 keeps units 0, 1 in its checkpoint; --resume computes only 2, 3
    run_unit = cv.CurvatureJob.run_unit
    calls, fail = [], [True]

    def failing(self, k, progress=None):
        calls.append(k)
        if k == 2 and fail[0]:
            raise RuntimeError("stop")
        return run_unit(self, k, progress)

    monkeypatch.setattr(cv.CurvatureJob, "run_unit", failing)
    with pytest.raises(RuntimeError):
        single_layer_single_block.run(
            [*ARGS, "--output_dir", str(tmp_path / "r"), "--checkpoint_every", "1"]
        )
    assert (tmp_path / "r" / "c.ckpt").exists()
    assert calls == [0, 1, 2]
    calls.clear()
    fail[0] = False
    single_layer_single_block.run([*ARGS, "--output_dir", str(tmp_path / "r"), "--resume"])
    assert calls == [2, 3]
    res = torch.load(tmp_path / "r" / "c_compare.pt")
    assert all(torch.equal(res[k], ref[k]) for k in ref)
    with pytest.raises(SystemExit) as exc:
        cli.main(
            single_layer_single_block.run,
            [*ARGS, "--output_dir", str(tmp_path), "--fisher_samples", "0"],
        )
    assert (
        exc.value.code == 2
        and capsys.readouterr().err.splitlines()[-1]
        == "error: --fisher_samples must be at least 1, got 0"
    )


# ----------------------------------------------------------------------------- the GGN diagonal of whole weights


@pytest.mark.parametrize("arch", ["opt", "gpt2"])
def test_ggn_diagonal_estimator_is_hutchinson_on_the_dense_ggn(arch):
    from lib.hessian import diagonal

    model = tiny_model(arch)
    name = (
        "model.decoder.layers.1.self_attn.q_proj.bias"
        if arch == "opt"
        else "transformer.h.1.attn.c_attn.bias"
    )
    sub = subsets.whole_parameter(model, name)
    ids = tiny_ids(b=2, seqlen=6)
    g = run_serial(_job(model, sub, ids, ["ggn"], model_input_bs=2), CPU)["ggn_sum"] / (2 * 5)
    k = 3
    target = diagonal.Target(name, tuple(model.get_parameter(name).shape))
    res = diagonal.hessian_diagonal(
        model,
        [target],
        ids,
        estimators=("ggn", "hutchinson"),
        hvps=k,
        seed=5,
        model_input_bs=1,
    )
    z = diagonal.rademacher_probes(sub.size, 5, name, 0, k)
    expect = (z * (z @ g)).mean(0)  # G symmetric: (G z)_i = (z G)_i
    assert torch.allclose(res.diagonals["ggn"][name].reshape(-1), expect, rtol=1e-9, atol=1e-14)
    assert not torch.allclose(
        res.diagonals["ggn"][name], res.diagonals["hutchinson"][name], rtol=1e-3
    )  # G is not H
    op = cv.GGNOperator(SubsetLoss(model, sub), sub.gather(model), ids)
    v = torch.randn(sub.size, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    assert torch.allclose(op.matvec(v), g @ v * (2 * 5), rtol=1e-9, atol=1e-13)


def test_layer_based_approximations_refuse_weights_that_are_not_linear_layers():
    from lib.errors import UserError

    model = tiny_model("opt")
    sub = subsets.whole_parameter(model, "model.decoder.layers.0.self_attn.q_proj.bias")
    with pytest.raises(
        UserError,
        match="need weights of linear layers; model.decoder.layers.0.self_attn.q_proj.bias is not one",
    ):
        cv.entry_layout(model, sub)
