"""Forward-mode Jacobian-vector products (:mod:`lib.objective.forward`) against the double-backward identity and differences."""

from __future__ import annotations

import pytest
import torch
from conftest import LAYER, tiny_ids, tiny_model

from lib.objective import subsets
from lib.objective.forward import (
    JVPPolicy,
    forward_unsupported,
    jvp_columns,
    jvp_double_backward,
    jvp_forward,
)
from lib.objective.loss import SubsetLoss


def _setup(arch: str, fused_head: bool = True, attn: str = "eager"):
    model = tiny_model(arch, attn=attn)
    name = next(n for n, _ in model.named_parameters() if LAYER[arch] in n)  # block 0's layer
    subset = subsets.make_subset(subsets.from_indices(model, name, list(range(0, 40, 3))))
    objective = SubsetLoss(model, subset, fused_head=fused_head)
    ids = tiny_ids()
    fn = lambda x: objective.features(x, ids)[0]  # noqa: E731 -- head inputs (fused) or logits
    x0 = objective.x0()
    tangents = torch.randn(
        3, x0.numel(), dtype=x0.dtype, generator=torch.Generator().manual_seed(1)
    )
    return fn, x0, tangents


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


@pytest.mark.parametrize("fused_head", [True, False], ids=["hidden", "logits"])
def test_func_jvp_through_eager_attention_equals_the_vjp_based_jvp(arch, fused_head):
    """torch.func.jvp through Hugging Face's eager attention is exact: it equals ``d/du <J^T u, v>`` to 1e-12 (float64)."""
    fn, x0, tangents = _setup(arch, fused_head)
    reference = jvp_double_backward(fn, x0, tangents)
    for j, v in enumerate(tangents):
        _, tangent = torch.func.jvp(fn, (x0,), (v,))
        assert _rel(tangent, reference[j]) < 1e-12
    assert _rel(jvp_forward(fn, x0, tangents), reference) < 1e-12  # vmapped over the block
    assert float(reference.abs().max()) > 1e-3  # the attention's tangents are not trivially zero


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_forward_jvp_equals_central_differences(arch):
    """Smooth activations (SiLU, GELU): central differences with a small step agree (OPT's ReLU kinks need steps below them)."""
    fn, x0, tangents = _setup(arch)
    v = tangents[0]
    h = 1e-5
    with torch.no_grad():
        fd = (fn(x0 + h * v) - fn(x0 - h * v)) / (2 * h)
    assert _rel(jvp_forward(fn, x0, v[None])[0], fd) < 1e-7


def test_policy_modes_agree_and_record_the_choice():
    fn, x0, tangents = _setup("opt")
    auto = JVPPolicy()
    a = auto.columns(fn, x0, tangents)
    assert auto.chosen in ("forward", "double-backward") and set(auto.seconds) == {
        "forward",
        "double-backward",
    }
    assert auto.report()["why"].startswith("measured")
    for mode in ("forward", "double-backward"):
        assert _rel(jvp_columns(fn, x0, tangents, mode=mode), a) < 1e-12
    with pytest.raises(ValueError, match="mode must be one of"):
        JVPPolicy("sideways")


class _NoJvp(torch.autograd.Function):
    """``x^3`` with a backward but no forward-mode rule."""

    generate_vmap_rule = True

    @staticmethod
    def forward(x):
        return x**3

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(inputs[0])

    @staticmethod
    def backward(ctx, g):
        (x,) = ctx.saved_tensors
        return 3 * x**2 * g


def test_falls_back_to_double_backward_without_forward_ad():
    x = torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64)
    v = torch.eye(3, dtype=torch.float64)
    fn = lambda z: _NoJvp.apply(z) * 2  # noqa: E731
    with pytest.raises(NotImplementedError):
        jvp_forward(fn, x, v)
    policy = JVPPolicy()
    cols = policy.columns(fn, x, v)
    assert policy.chosen == "double-backward" and "forward mode unavailable" in policy.why
    assert torch.allclose(cols, torch.diag(6 * x**2))
    assert torch.allclose(
        policy.columns(fn, x, v[:1]), (6 * x**2 * v[0])[None]
    )  # decided once, kept


def test_unrelated_errors_are_not_taken_for_missing_forward_ad():
    assert forward_unsupported(NotImplementedError("x"))
    assert not forward_unsupported(RuntimeError("shape mismatch"))

    def broken(z):
        raise RuntimeError("shape mismatch")

    with pytest.raises(RuntimeError, match="shape mismatch"):
        JVPPolicy().columns(broken, torch.zeros(2), torch.eye(2))


def test_auto_decides_on_the_first_rows_with_the_callers_backward():
    """The caller's double backward (e.g. on a graph it keeps) is the one timed and used; the decision takes the first rows."""
    fn, x0, _ = _setup("gpt2")
    tangents = torch.randn(
        20, x0.numel(), dtype=x0.dtype, generator=torch.Generator().manual_seed(2)
    )
    seen = []

    def backward(v):
        seen.append(v.shape[0])
        return jvp_double_backward(fn, x0, v)

    policy = JVPPolicy()
    cols = policy.columns(fn, x0, tangents, backward)
    assert seen[0] == 8 and policy.why == "measured on a block of 8"
    assert seen[1:] == ([12] if policy.chosen == "double-backward" else [])
    assert _rel(cols, jvp_double_backward(fn, x0, tangents)) < 1e-12


@pytest.mark.parametrize("mode", ["forward", "double-backward", "auto"])
def test_ggn_products_by_either_mode_equal_the_double_backward_matvec(mode):
    from lib.hessian.curvature import GGNOperator

    model = tiny_model("llama")
    name = "model.layers.0.self_attn.q_proj.weight"
    objective = SubsetLoss(model, subsets.whole_parameter(model, name))
    x0 = objective.x0()
    op = GGNOperator(objective, x0, tiny_ids())
    vs = torch.randn(10, x0.numel(), dtype=x0.dtype, generator=torch.Generator().manual_seed(3))
    ref = torch.stack([op.matvec(v) for v in vs])
    policy = JVPPolicy(mode)
    assert _rel(op.matmat_rows(vs, policy), ref) < 1e-12 and float(ref.abs().max()) > 0
    assert policy.chosen in ("forward", "double-backward")
