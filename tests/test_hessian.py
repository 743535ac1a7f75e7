"""Exactness of the default Hessian method against independent oracles, on tiny float64 models."""

from __future__ import annotations

import pytest
import torch
from conftest import ARCHS, LAYER, tiny_ids, tiny_model

from lib.hessian.exact import batch_hessian, exact_hessian
from lib.objective import subsets
from lib.objective.loss import SubsetLoss


def reference_hessian(model, subset, ids) -> torch.Tensor:
    """torch.autograd.functional.hessian on the plain (unfused) objective."""
    plain = SubsetLoss(model, subset, fused_head=False)
    return torch.autograd.functional.hessian(lambda x: plain(x, ids), plain.x0())


def fd_hessian_from_loss(fn, x0: torch.Tensor, h: float) -> torch.Tensor:
    """Central second differences of the loss itself: no derivative code at all."""
    n = x0.numel()
    e = torch.eye(n, dtype=x0.dtype) * h
    out = torch.empty(n, n, dtype=x0.dtype)
    with torch.no_grad():
        for i in range(n):
            for j in range(i, n):
                v = (
                    fn(x0 + e[i] + e[j])
                    - fn(x0 + e[i] - e[j])
                    - fn(x0 - e[i] + e[j])
                    + fn(x0 - e[i] - e[j])
                )
                out[i, j] = out[j, i] = v / (4 * h * h)
    return out


def fd_hessian_from_grad(fn, x0: torch.Tensor, h: float) -> torch.Tensor:
    """Central differences of the first-order autograd gradient (no second-order AD involved)."""

    def grad(x):
        x = x.detach().requires_grad_(True)
        return torch.autograd.grad(fn(x), x)[0]

    e = torch.eye(x0.numel(), dtype=x0.dtype) * h
    return torch.stack([(grad(x0 + e[i]) - grad(x0 - e[i])) / (2 * h) for i in range(x0.numel())])


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("chunk", [1, 4])
def test_default_method_equals_autograd_reference(arch, chunk):
    model = tiny_model(arch)
    subset = subsets.single_layer_several_blocks(model, LAYER[arch], 2, 5)
    ids = tiny_ids()
    objective = SubsetLoss(model, subset)
    assert objective.fused_head  # the default path uses the fused LM-head kernel
    h, value = batch_hessian(objective, ids, chunk=chunk)
    ref = reference_hessian(model, subset, ids)
    assert h.shape == (10, 10)
    assert ref.abs().max() > 0
    assert rel(h, ref) < 1e-9
    assert rel(h, h.T) < 1e-12  # float64 end to end (lib.model.precision), for OPT and Llama too


@pytest.mark.parametrize("arch", ["qwen2", "mistral"])
def test_other_llama_family_models(arch):
    """Qwen2 (q/k/v biases) and Mistral are found and differentiated like Llama."""
    model = tiny_model(arch)
    subset = subsets.several_layers_several_blocks(model, 7, 2, 2)
    assert [s.param_name.split(".")[-2] for s in subset.slices[:7]] == [
        "q_proj",
        "k_proj",
        "v_proj",
        "o_proj",
        "gate_proj",
        "up_proj",
        "down_proj",
    ]
    ids = tiny_ids()
    h, _ = batch_hessian(SubsetLoss(model, subset), ids)
    assert rel(h, reference_hessian(model, subset, ids)) < 1e-9


def test_gpt2_equals_finite_differences_of_the_loss():
    """GPT-2 stays float64 end to end, so second differences of the loss are accurate to ~1e-6."""
    model = tiny_model("gpt2")
    subset = subsets.several_layers_several_blocks(
        model, 4, 2, 2
    )  # every linear layer, both blocks
    ids = tiny_ids()
    objective = SubsetLoss(model, subset)
    h, _ = batch_hessian(objective, ids)
    fd = fd_hessian_from_loss(lambda x: objective(x, ids), objective.x0(), 1e-2)
    assert rel(h, fd) < 1e-4


def richardson(fd, fn, x0: torch.Tensor, h: float) -> torch.Tensor:
    """``(4 D(h/2) - D(h)) / 3`` of a central-difference Hessian ``D``: the ``h^2`` error term cancels."""
    return (4 * fd(fn, x0, h / 2) - fd(fn, x0, h)) / 3


def error_vs_extrapolated_differences(arch: str, fd, h: float) -> float:
    """Relative error of the default Hessian (3 layers x 2 blocks) against ``richardson(fd, ..., h)``."""
    model = tiny_model(arch)
    subset = subsets.several_layers_several_blocks(model, 3, 2, 2)
    ids = tiny_ids()
    objective = SubsetLoss(model, subset)
    hess, _ = batch_hessian(objective, ids)
    return rel(hess, richardson(fd, lambda x: objective(x, ids), objective.x0(), h))


@pytest.mark.parametrize("arch", ["opt", "llama", "qwen2"])
def test_opt_llama_equal_finite_differences_of_the_gradient(arch):
    """Float64 end to end: extrapolated differences of the gradient agree to ~1e-11 (about 1e-4 with a float32 softmax/norm)."""
    assert error_vs_extrapolated_differences(arch, fd_hessian_from_grad, 1e-3) < 1e-9


@pytest.mark.parametrize("arch", ["opt", "llama"])
def test_opt_llama_equal_finite_differences_of_the_loss(arch):
    """No derivative code in the oracle: extrapolated second differences of the loss agree to ~1e-8 (~1e-2 before)."""
    assert error_vs_extrapolated_differences(arch, fd_hessian_from_loss, 3e-3) < 1e-6


def test_finite_difference_oracle_detects_a_wrong_hessian():
    """Guard: the tolerance above is tight enough to catch an error of 1% in one entry."""
    model = tiny_model("gpt2")
    subset = subsets.single_layer_single_block(model, LAYER["gpt2"], 1, 3)
    ids = tiny_ids()
    objective = SubsetLoss(model, subset)
    h, _ = batch_hessian(objective, ids)
    fd = fd_hessian_from_loss(lambda x: objective(x, ids), objective.x0(), 1e-2)
    k = int(h.abs().argmax())
    wrong = h.clone().view(-1)
    wrong[k] *= 1.01
    assert rel(wrong.view_as(h), fd) > 1e-4 > rel(h, fd)


@pytest.mark.parametrize("arch", ARCHS)
def test_additivity_and_normalization(arch):
    """H(2 samples) = H(sample 0) + H(sample 1); the saved matrix is that sum / (b * (seqlen - 1))."""
    model = tiny_model(arch)
    subset = subsets.single_layer_single_block(model, LAYER[arch], 0, 4)
    ids = tiny_ids(b=2, seqlen=8)
    both = exact_hessian(model, subset, ids)
    one = exact_hessian(model, subset, ids[:1])
    two = exact_hessian(model, subset, ids[1:])
    batched = exact_hessian(model, subset, ids, model_input_bs=2)
    assert torch.allclose(both.hessian_sum, one.hessian_sum + two.hessian_sum, rtol=1e-10, atol=0)
    assert torch.allclose(batched.hessian_sum, both.hessian_sum, rtol=1e-8, atol=1e-14)
    assert both.n_tokens == 2 * 7
    assert torch.equal(both.hessian, both.hessian_sum / 14)
    assert both.nll_sum == pytest.approx(one.nll_sum + two.nll_sum, rel=1e-12)


def test_reference_method_through_exact_hessian():
    model = tiny_model("opt")
    subset = subsets.single_layer_single_block(model, "fc2", 1, 3)
    ids = tiny_ids(b=2)
    a = exact_hessian(model, subset, ids, method="autograd", fused_head=False)
    b = exact_hessian(model, subset, ids)
    assert rel(b.hessian, a.hessian) < 1e-9


def test_float32_model_agrees_with_float64():
    model64 = tiny_model("llama")
    model32 = tiny_model("llama", dtype=torch.float32)
    subset = subsets.single_layer_single_block(model64, "mlp.up_proj", 0, 6)
    ids = tiny_ids()
    h64 = exact_hessian(model64, subset, ids).hessian
    h32 = exact_hessian(model32, subset, ids).hessian
    assert h32.dtype == torch.float32
    assert rel(h32.double(), h64) < 1e-4


def _units_subset(model, arch: str, units: tuple[int, ...] = (0, 3)):
    """Every input weight of output units ``units`` of block 0's ``LAYER[arch]`` weight (GPT-2's Conv1D stores ``(in, out)``)."""
    name = next(n for n, _ in model.named_parameters() if LAYER[arch] in n)
    shape = model.get_parameter(name).shape
    if arch == "gpt2":
        idx = [[i, u] for u in units for i in range(shape[0])]
    else:
        idx = [[u, i] for u in units for i in range(shape[1])]
    return subsets.make_subset(subsets.from_indices(model, name, idx))


@pytest.mark.parametrize("arch", ARCHS)
def test_layer_outputs_equal_the_entries_and_the_reference(arch):
    """``H = sum_b J_b^T H_z J_b`` through the layer's outputs (GPT-2: a transposed Conv1D) equals the per-entry
    rows and torch.autograd.functional.hessian, with 2 samples in one forward (``H_z`` block-diagonal over them)."""
    from lib.hessian.exact import products_space

    model = tiny_model(arch)
    subset = _units_subset(model, arch)
    objective = SubsetLoss(model, subset)
    ids = tiny_ids(2, 6)
    assert products_space(objective, ids, "auto") is not None  # 6 positions x 2 units < 32 entries
    h, value = batch_hessian(objective, ids, space="layer-outputs")
    h_entries, value_entries = batch_hessian(objective, ids, space="entries")
    ref = reference_hessian(model, subset, ids)
    assert rel(h, ref) < 1e-9 and rel(h, h_entries) < 1e-12 and float(ref.abs().max()) > 0
    assert float(value) == float(value_entries)
    assert torch.equal(batch_hessian(objective, ids)[0], h)  # auto takes the cheaper space


def test_layer_outputs_of_two_layers_fed_by_the_same_input():
    """q_proj and k_proj of one block read the same input, which does not depend on either: still exact."""
    model = tiny_model("opt")
    q, k = (f"model.decoder.layers.0.self_attn.{p}.weight" for p in ("q_proj", "k_proj"))
    subset = subsets.make_subset(
        subsets.from_indices(model, q, list(range(0, 64, 3))),
        subsets.from_indices(model, k, list(range(5, 80, 4))),
    )
    ids = tiny_ids(2, 4)
    h, _ = batch_hessian(SubsetLoss(model, subset), ids, space="layer-outputs")
    assert rel(h, reference_hessian(model, subset, ids)) < 1e-9


def test_layer_outputs_refused_where_inputs_depend_on_the_subset_or_weights_are_shared():
    from lib.objective.loss import LayerOutputs

    model = tiny_model("opt")
    several = subsets.single_layer_several_blocks(
        model, "self_attn.q_proj", 2, 16
    )  # block 1's input depends on block 0's x
    objective = SubsetLoss(model, several)
    ids = tiny_ids(2, 4)
    with pytest.raises(ValueError, match="input depends on the subset"):
        batch_hessian(objective, ids, space="layer-outputs")
    assert (
        rel(batch_hessian(objective, ids)[0], reference_hessian(model, several, ids)) < 1e-9
    )  # auto falls back
    assert (
        LayerOutputs.of(
            model, subsets.make_subset(subsets.from_indices(model, "lm_head.weight", [0, 1]))
        )
        is None
    )  # tied to the embeddings
    assert (
        LayerOutputs.of(
            model,
            subsets.make_subset(
                subsets.from_indices(model, "model.decoder.layers.0.fc1.bias", [0, 1])
            ),
        )
        is None
    )
    assert (
        LayerOutputs.of(
            model,
            subsets.make_subset(
                subsets.from_indices(
                    model, "model.decoder.layers.0.self_attn_layer_norm.weight", [0]
                )
            ),
        )
        is None
    )
    with pytest.raises(ValueError, match="unknown space"):
        batch_hessian(objective, ids, space="sideways")


def test_layer_outputs_in_the_exact_hessian_job():
    """The whole job (chunk measured on the first batch) through the layers' outputs equals the entries' path."""
    model = tiny_model("gpt2")
    subset = _units_subset(model, "gpt2", (1, 2))
    ids = tiny_ids(4, 5)
    from lib.hessian.exact import ExactHessianJob
    from lib.runtime.jobs import run_serial

    job = ExactHessianJob(subset, ids, model_input_bs=2, model=model)
    sums = run_serial(job, torch.device("cpu"))
    ref = reference_hessian(model, subset, ids[:2]) + reference_hessian(model, subset, ids[2:])
    assert rel(sums["hessian_sum"], ref) < 1e-9
    assert job.products_report() == {"space": "layer-outputs", "products_per_sample": 10}
    assert job.chunk_report()["measured"]["chunk"] >= 1
