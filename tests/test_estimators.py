"""One dense float64 test per registered estimator (lib/estimators/), each against an independent oracle.

Diagonal estimators run on an explicit symmetric matrix (``diagonal_of``) where they need only Hessian-vector
products, and on tiny float64 models against ``torch.autograd.functional`` (``hessian``, ``jacobian``) where they
need the model. The ``--compare`` approximations run through the real comparison job and are checked against
matrices built from autograd Jacobians and module hooks.
"""

from __future__ import annotations

import importlib
import math

import pytest
import torch
import torch.nn.functional as F
from cases import _logits_fn, xdiag_by_definition  # noqa: F401  (_logits_fn: used below)
from conftest import tiny_ids, tiny_model
from torch.func import functional_call

from lib.estimators.approximations import REGISTRY as APPROX_REGISTRY
from lib.estimators.approximations.base import sample_labels
from lib.estimators.diagonal import diagonal_of
from lib.hessian.curvature import (
    APPROXIMATIONS,
    CurvatureJob,
    approximation_matrices,
    entry_layout,
)
from lib.hessian.diagonal import (
    ESTIMATORS,
    REGISTRY,
    Target,
    hessian_diagonal,
    rademacher_probes,
)
from lib.objective import subsets
from lib.objective.loss import SubsetLoss
from lib.runtime.jobs import run_serial

CPU = torch.device("cpu")


def dense(n: int = 24, seed: int = 0) -> torch.Tensor:
    """A symmetric indefinite float64 matrix with a visible diagonal."""
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(n, n, generator=g, dtype=torch.float64)
    return (a + a.T) / 2 + torch.diag(torch.linspace(-3, 5, n, dtype=torch.float64))


def bias_statistic(estimates: torch.Tensor, d: torch.Tensor) -> float:
    """``m ||mean - d||^2 / mean ||e - d||^2`` over ``m`` independent estimates: about 1 when unbiased, large when biased."""
    m = estimates.shape[0]
    return (
        m
        * float(((estimates.mean(0) - d) ** 2).sum())
        / float(((estimates - d) ** 2).sum(1).mean())
    )


# ----------------------------------------------------------------------------- the registries


def test_every_estimator_is_registered_once_in_its_own_documented_module():
    assert ESTIMATORS == ("hutchinson", "xdiag", "empirical_fisher", "ggn", "exact")
    assert APPROXIMATIONS == ("ggn", "fisher", "empirical_fisher", "gptq", "kfac", "diag")
    for registry in (REGISTRY, APPROX_REGISTRY):
        modules = [type(e).__module__ for e in registry]
        assert len(set(modules)) == len(modules)  # one module each
        for e, module in zip(registry, modules):
            doc = importlib.import_module(module).__doc__
            assert "Cost" in doc and e.cost and module.rsplit(".", 1)[1] == e.name, module
    with pytest.raises(
        ValueError,
        match=r"unknown estimator 'fisher'; .*\('fisher' is now called 'empirical_fisher'\)",
    ):
        REGISTRY.lookup(["fisher"])


# ----------------------------------------------------------------------------- diagonal: on a dense matrix


def test_hutchinson_is_the_mean_of_its_probe_products_and_unbiased():
    h = dense()
    n, d = h.shape[0], h.diagonal()
    est = diagonal_of(lambda v: v @ h, n, ["hutchinson"], 5, seed=3)["hutchinson"]
    z = rademacher_probes(n, 3, "x", 0, 5)
    assert torch.allclose(est, (z * (z @ h)).mean(0), rtol=1e-12, atol=1e-12)
    ones = diagonal_of(lambda v: v @ h, n, ["hutchinson"], 1, seed=0)["hutchinson"]
    assert not torch.allclose(ones, d)  # one probe is not exact on a non-diagonal matrix
    many = torch.stack(
        [
            diagonal_of(lambda v: v @ h, n, ["hutchinson"], 1, seed=s)["hutchinson"]
            for s in range(300)
        ]
    )
    assert 0.4 < bias_statistic(many, d) < 1.8
    off2 = float((h * h).sum() - (d * d).sum())
    assert (
        0.8 < float(((many - d) ** 2).sum(1).mean()) / off2 < 1.2
    )  # E||est - d||^2 = sum_{i != j} H_ij^2
    biased = many + 0.5  # the statistic detects a bias of this size
    assert bias_statistic(biased, d) > 4


def test_xdiag_equals_its_definition_and_is_unbiased():
    h = dense()
    n, d = h.shape[0], h.diagonal()
    est = diagonal_of(lambda v: v @ h, n, ["xdiag"], 12, seed=4)["xdiag"]
    omega = rademacher_probes(n, 4, "x", 0, 6).T
    assert torch.allclose(est, xdiag_by_definition(h, omega), rtol=1e-9, atol=1e-10)
    many = torch.stack(
        [diagonal_of(lambda v: v @ h, n, ["xdiag"], 8, seed=s)["xdiag"] for s in range(200)]
    )
    assert 0.4 < bias_statistic(many, d) < 1.8
    # more accurate than Hutchinson at equal budget when the spectrum decays (as a Hessian's does)
    q, _ = torch.linalg.qr(
        torch.randn(n, n, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    )
    h = q @ torch.diag(0.5 ** torch.arange(n, dtype=torch.float64)) @ q.T
    err = {
        e: sum(
            float((diagonal_of(lambda v: v @ h, n, [e], 8, seed=s)[e] - h.diagonal()).norm())
            for s in range(20)
        )
        for e in ("xdiag", "hutchinson")
    }
    assert err["xdiag"] < 0.6 * err["hutchinson"], err  # measured 0.48


def test_exact_is_the_diagonal_of_a_dense_matrix():
    h = dense()
    assert torch.equal(
        diagonal_of(lambda v: v @ h, h.shape[0], ["exact"], 0)["exact"], h.diagonal()
    )


@pytest.mark.parametrize("name", ["ggn", "empirical_fisher"])
def test_estimators_that_need_a_model_refuse_a_bare_matrix(name):
    h = dense(6)
    with pytest.raises(ValueError, match="needs a model"):
        diagonal_of(lambda v: v @ h, 6, [name], 2)


# ----------------------------------------------------------------------------- diagonal: on tiny models

BIAS = {
    "opt": "model.decoder.layers.1.self_attn.q_proj.bias",
    "gpt2": "transformer.h.1.attn.c_attn.bias",
}


def _bias(arch: str):
    model = tiny_model(arch)
    name = BIAS[arch]
    return (
        model,
        name,
        Target(name, tuple(model.get_parameter(name).shape)),
        subsets.whole_parameter(model, name),
    )


def test_exact_equals_the_diagonal_of_autograd_functional_hessian():
    model, name, target, sub = _bias("opt")
    ids = tiny_ids(b=3, seqlen=6)
    objective = SubsetLoss(model, sub, fused_head=False)
    h = torch.autograd.functional.hessian(lambda x: objective(x, ids), sub.gather(model))
    res = hessian_diagonal(model, [target], ids, estimators=("exact",), model_input_bs=3)
    assert torch.allclose(
        res.diagonals["exact"][name], h.diagonal() / (3 * 5), rtol=1e-10, atol=1e-14
    )
    assert float(h.diagonal().abs().min()) > 0


def _ggn_oracle(model, sub, ids) -> torch.Tensor:
    """``sum_t J_t^T (diag p_t - p_t p_t^T) J_t`` with ``J`` from ``torch.autograd.functional.jacobian`` of the logits."""
    logits = _logits_fn(model, sub, ids)
    x0 = sub.gather(model)
    jac = torch.autograd.functional.jacobian(logits, x0)  # (N, V, n)
    p = torch.softmax(logits(x0).detach(), -1)
    return sum(
        jac[t].T @ (torch.diag(p[t]) - torch.outer(p[t], p[t])) @ jac[t] for t in range(len(p))
    )


@pytest.mark.parametrize("arch", ["opt", "gpt2"])
def test_ggn_estimator_is_hutchinson_on_the_gauss_newton_matrix_of_the_logit_jacobian(arch):
    model, name, target, sub = _bias(arch)
    ids = tiny_ids(b=2, seqlen=6)
    g = _ggn_oracle(model, sub, ids)
    k = 4
    res = hessian_diagonal(
        model, [target], ids, estimators=("ggn", "exact"), hvps=k, seed=7, model_input_bs=2
    )
    z = rademacher_probes(sub.size, 7, name, 0, k)
    assert torch.allclose(
        res.diagonals["ggn"][name].reshape(-1),
        (z * (z @ g)).mean(0) / (2 * 5),
        rtol=1e-9,
        atol=1e-14,
    )
    assert not torch.allclose(
        res.diagonals["ggn"][name], res.diagonals["exact"][name], rtol=1e-2
    )  # diag G is not diag H
    assert res.hvps_per_sample["ggn"] == k


@pytest.mark.parametrize("model_input_bs,with_products", [(1, False), (1, True), (2, True)])
def test_empirical_fisher_is_the_squared_jacobian_of_the_per_sample_losses(
    model_input_bs, with_products
):
    """Its three code paths: one sample without products, one sample on the products' graph, several samples."""
    model, name, target, sub = _bias("gpt2")
    ids = tiny_ids(b=2, seqlen=6)
    objective = SubsetLoss(model, sub, fused_head=False)
    per_sample = torch.autograd.functional.jacobian(
        lambda x: torch.stack([objective(x, r[None]) for r in ids]), sub.gather(model)
    )
    estimators = ("empirical_fisher", "hutchinson") if with_products else ("empirical_fisher",)
    res = hessian_diagonal(
        model, [target], ids, estimators=estimators, hvps=2, model_input_bs=model_input_bs
    )
    assert torch.allclose(
        res.diagonals["empirical_fisher"][name],
        (per_sample**2).sum(0) / (2 * 5),
        rtol=1e-10,
        atol=1e-15,
    )
    assert res.nll_sum == pytest.approx(float(objective(sub.gather(model), ids)), rel=1e-12)


# ----------------------------------------------------------------------------- the --compare approximations

DRAWS, SEED = 2, 0


@pytest.fixture(scope="module")
def comparison():
    """Every approximation from the real comparison job on a tiny float64 OPT: two layers of two blocks, 3 entries each."""
    model = tiny_model("opt")
    slices = [
        subsets.row0_slice(model, b, layer, 3)
        for b in (0, 1)
        for layer in ("self_attn.q_proj", "fc1")
    ]
    sub = subsets.make_subset(*slices)
    ids = tiny_ids(b=2, seqlen=6)
    job = CurvatureJob(
        sub, ids, list(APPROXIMATIONS), DRAWS, seed=SEED, model=model, model_input_bs=1
    )
    sums = run_serial(job, CPU)
    result = job.result(sums, 0.0)
    mats = approximation_matrices(
        sums, result, list(APPROXIMATIONS), DRAWS, entry_layout(model, sub), ids.shape[1]
    )
    return model, sub, ids, mats


def _sampled_labels(p: torch.Tensor, b: int, per_row: int) -> list[torch.Tensor]:
    return [
        torch.cat([sample_labels(p[r * per_row : (r + 1) * per_row], SEED, r, j) for r in range(b)])
        for j in range(DRAWS)
    ]


def _hooked(model, sub, ids, labels: list[torch.Tensor] | None = None):
    """Each slice's layer input ``(B*s, in)`` (forward hooks) and, per label set, the gradient of the summed NLL at
    those labels w.r.t. the layer's output ``(B*s, out)`` (``autograd.grad`` of the recorded output)."""
    names = list(dict.fromkeys(s.param_name[: -len(".weight")] for s in sub.slices))
    ins, outs = {}, {}

    def record(name):
        def hook(module, args, output):
            ins[name], outs[name] = args[0], output

        return hook

    hooks = [model.get_submodule(n).register_forward_hook(record(n)) for n in names]
    obj = SubsetLoss(model, sub, fused_head=False)
    x = sub.gather(model).requires_grad_(True)
    try:
        logits = functional_call(
            model,
            obj.weights(x),
            args=(),
            kwargs={"input_ids": ids, "use_cache": False},
            tie_weights=False,
        )[0]
    finally:
        for h in hooks:
            h.remove()
    z = logits[:, :-1].reshape(-1, logits.shape[-1])
    grads = []
    for y in labels or []:
        gs = torch.autograd.grad(
            F.cross_entropy(z, y, reduction="sum"), [outs[n] for n in names], retain_graph=True
        )
        grads.append({n: g.reshape(-1, g.shape[-1]) for n, g in zip(names, gs)})
    return {n: t.detach().reshape(-1, t.shape[-1]) for n, t in ins.items()}, grads


def _entries(model, sub):
    """``(module, output row, input index)`` of each entry (nn.Linear stores ``(out, in)``)."""
    out = []
    for s in sub.slices:
        width = model.get_parameter(s.param_name).shape[1]
        out += [
            (s.param_name[: -len(".weight")], int(i) // width, int(i) % width) for i in s.flat_index
        ]
    return out


def oracle(name: str, model, sub, ids) -> torch.Tensor:
    """The approximation ``name`` built independently of the library's statistics code."""
    b, s = ids.shape
    n_tok, positions = b * (s - 1), b * s
    x0 = sub.gather(model)
    objective = SubsetLoss(model, sub, fused_head=False)
    if name == "diag":
        return (
            torch.diag(
                torch.autograd.functional.hessian(lambda x: objective(x, ids), x0).diagonal()
            )
            / n_tok
        )
    if name == "ggn":
        return _ggn_oracle(model, sub, ids) / n_tok
    if name == "empirical_fisher":
        g = torch.autograd.functional.jacobian(
            lambda x: torch.stack([objective(x, r[None]) for r in ids]), x0
        )
        return g.T @ g / n_tok
    logits = _logits_fn(model, sub, ids)
    p = torch.softmax(logits(x0).detach(), -1)
    labels = _sampled_labels(p, b, s - 1)
    if name == "fisher":  # per-token gradients at the sampled labels, by autograd
        total = 0
        for y in labels:
            g = torch.autograd.functional.jacobian(
                lambda x, y=y: F.cross_entropy(logits(x), y, reduction="none"), x0
            )
            total = total + g.T @ g
        return total / (DRAWS * n_tok)
    ins, grads = _hooked(model, sub, ids, labels if name == "kfac" else None)
    ent = _entries(model, sub)
    out = torch.zeros(len(ent), len(ent), dtype=torch.float64)
    for k, (mk, ok, ik) in enumerate(ent):
        for m, (ml, ol, il) in enumerate(ent):
            if mk != ml:
                continue
            a = float(ins[mk][:, ik] @ ins[mk][:, il])
            if name == "gptq":
                out[k, m] = 2 * a / positions if ok == ol else 0.0
            else:  # kfac
                gg = sum(float(d[mk][:, ok] @ d[mk][:, ol]) for d in grads)
                out[k, m] = (a / positions) * gg / (DRAWS * n_tok)
    return out


@pytest.mark.parametrize("name", APPROXIMATIONS)
def test_each_approximation_equals_its_independent_oracle(name, comparison):
    model, sub, ids, mats = comparison
    expect = oracle(name, model, sub, ids)
    assert float(expect.abs().max()) > 0
    assert torch.allclose(mats[name], expect, rtol=1e-8, atol=1e-13), (
        name,
        float((mats[name] - expect).abs().max()),
    )


def test_the_sampled_fisher_approaches_the_ggn():
    """``fisher`` with many draws is close to ``ggn``: E_y[(p - e_y)(p - e_y)^T] = diag p - p p^T."""
    model = tiny_model("opt")
    sub = subsets.single_layer_single_block(model, "fc1", 0, 4)
    ids = tiny_ids(b=2, seqlen=6)
    sums = run_serial(
        CurvatureJob(sub, ids, ["ggn", "fisher"], 300, model=model, model_input_bs=2), CPU
    )
    err = float((sums["fisher_sum"] / 300 - sums["ggn_sum"]).norm() / sums["ggn_sum"].norm())
    assert err < 0.2 and not math.isnan(err)


def test_the_torch_free_help_lists_exactly_the_registered_estimators():
    from lib.app import cli

    summaries = cli.estimator_summaries()
    assert set(summaries) == set(REGISTRY.names())
    assert all(summaries[e.name] == e.summary for e in REGISTRY)
    assert list(summaries) == list(REGISTRY.names())  # and in registry order
    assert (
        cli.estimator_choices()[-1] == "fisher"
    )  # the deprecated name, mapped to empirical_fisher
    assert tuple(cli.approximation_choices()) == APPROXIMATIONS
