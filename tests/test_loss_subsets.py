"""The reparametrized loss and the subset definitions."""

from __future__ import annotations

import pytest
import torch
from conftest import ARCHS, LAYER, tiny_ids, tiny_model

from lib.app.cli import flag_message
from lib.errors import UserError
from lib.objective import subsets
from lib.objective.loss import SubsetLoss, head_nll, summed_nll


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("fused", [False, True])
def test_loss_at_x0_and_gradient_match_the_plain_model(arch, fused):
    model = tiny_model(arch)
    subset = subsets.several_layers_several_blocks(model, 2, 2, 3)
    ids = tiny_ids()
    objective = SubsetLoss(model, subset, fused_head=fused)
    x = objective.x0().requires_grad_(True)
    value = objective(x, ids)
    (g,) = torch.autograd.grad(value, x)

    model.requires_grad_(True)
    try:
        plain = summed_nll(model(ids, use_cache=False).logits, ids)
        plain.backward()
        plain = plain.detach()
        expected = torch.cat(
            [
                model.get_parameter(s.param_name).grad.reshape(-1)[s.flat_index]
                for s in subset.slices
            ]
        )
    finally:
        model.zero_grad(set_to_none=True)
        model.requires_grad_(False)
    assert float(value.detach()) == pytest.approx(float(plain.detach()), rel=1e-12)
    assert torch.allclose(g, expected, rtol=1e-9, atol=1e-14)
    # the summed NLL is the model's own mean loss (which HF computes in float32) times the predicted tokens
    assert float(plain) == pytest.approx(
        float(model(ids, labels=ids).loss) * ids.shape[0] * (ids.shape[1] - 1), rel=1e-6
    )


@pytest.mark.parametrize("arch", ["opt", "gpt2"])
def test_a_tied_embedding_is_one_parameter_in_both_roles(arch):
    """OPT and GPT-2 tie the LM head to the input embedding. Seen on an H200 run: the exact operator moved the
    tied weight as an input embedding only, while FSDP (and every peer) moved the one parameter, a 30 %
    difference in the HVPs of ``--params '*'``. Gradient and Hessian of entries of the tied weight (plus a
    block weight) against double backward of the plain model, whose parameter is tied by construction."""
    model = tiny_model(arch)
    head = model.get_output_embeddings().weight
    name = next(n for n, p in model.named_parameters() if p is head)
    assert name != "lm_head.weight" and head is model.get_input_embeddings().weight
    block = next(
        n for n, p in model.named_parameters() if ".0." in n and p.dim() == 2 and p.shape[0] > 1
    )
    subset = subsets.make_subset(
        subsets.from_indices(model, name, [[i, j] for i in (0, 5, 7) for j in (1, 2)]),
        subsets.from_indices(model, block, [[0, 0], [1, 3]]),
    )
    ids = tiny_ids()
    objective = SubsetLoss(model, subset)
    x0 = objective.x0()
    h = torch.autograd.functional.hessian(lambda x: objective(x, ids), x0)

    params = [model.get_parameter(name), model.get_parameter(block)]
    picks = [s.flat_index for s in subset.slices]
    model.requires_grad_(True)
    try:
        value = summed_nll(model(ids, use_cache=False).logits, ids)
        grads = torch.autograd.grad(value, params, create_graph=True)
        g = torch.cat([gr.reshape(-1)[i] for gr, i in zip(grads, picks)])
        rows = []
        for k in range(len(g)):
            hs = torch.autograd.grad(g[k], params, retain_graph=True)
            rows.append(torch.cat([hr.reshape(-1)[i] for hr, i in zip(hs, picks)]))
        expected = torch.stack(rows)
    finally:
        model.requires_grad_(False)
    torch.testing.assert_close(h, expected, rtol=1e-9, atol=1e-12 * float(expected.abs().max()))


def test_a_tied_alias_selects_the_one_parameter():
    """``--params lm_head.weight`` on a model whose head is tied: the embedding, once (it was refused as matching
    nothing, since ``named_parameters`` lists a tied weight under its first name only)."""
    model = tiny_model("opt")
    embed = "model.decoder.embed_tokens.weight"
    assert subsets.params_subset(model, ["lm_head.weight"]).param_names == [embed]
    both = subsets.params_subset(model, ["lm_head.*", "*embed_tokens*"])
    assert both.param_names == [embed] and both.size == model.get_parameter(embed).numel()
    assert subsets.params_subset(model, ["*"]).size == sum(p.numel() for p in model.parameters())


def test_loss_moves_with_x():
    model = tiny_model("opt")
    subset = subsets.single_layer_single_block(model, "fc1", 0, 4)
    objective = SubsetLoss(model, subset)
    ids = tiny_ids()
    x0 = objective.x0()
    assert float(objective(x0 + 0.5, ids)) != pytest.approx(float(objective(x0, ids)), rel=1e-6)
    # the model itself is untouched
    assert torch.equal(objective.x0(), x0)


def test_fused_head_matches_cross_entropy_and_its_hessian():
    torch.manual_seed(0)
    h = torch.randn(5, 4, dtype=torch.float64)
    w = torch.randn(7, 4, dtype=torch.float64)
    bias = torch.randn(7, dtype=torch.float64)
    y = torch.randint(0, 7, (5,))
    plain = lambda h: torch.nn.functional.cross_entropy(h @ w.T + bias, y, reduction="sum")  # noqa: E731
    fused = lambda h: head_nll(h, w, bias, y)  # noqa: E731
    assert float(fused(h)) == pytest.approx(float(plain(h)), rel=1e-14)
    hp = torch.autograd.functional.hessian(lambda v: plain(v.view(5, 4)), h.reshape(-1))
    hf = torch.autograd.functional.hessian(lambda v: fused(v.view(5, 4)), h.reshape(-1))
    assert torch.allclose(hf, hp, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("arch", ARCHS)
def test_entries_follow_the_subset_definition(arch):
    model = tiny_model(arch)
    subset = subsets.single_layer_several_blocks(model, LAYER[arch], 2, 3)
    entries = subset.entries(model)
    assert len(entries) == 6 == subset.size
    x0 = subset.gather(model)
    for k, (name, i, j) in enumerate(entries):
        assert name.endswith(f".{k // 3}.{LAYER[arch]}.weight")
        if arch == "gpt2":  # Conv1D stores (in, out): output unit 0 is column 0
            assert (i, j) == (k % 3, 0)
        else:
            assert (i, j) == (0, k % 3)
        assert x0[k] == model.get_parameter(name)[i, j]


def test_several_layers_order_is_block_major_then_module_order():
    model = tiny_model("opt")
    subset = subsets.several_layers_several_blocks(model, 3, 2, 2)
    names = [s.param_name for s in subset.slices]
    assert names == [
        f"model.decoder.layers.{b}.self_attn.{name}.weight"
        for b in range(2)
        for name in ("k_proj", "v_proj", "q_proj")
    ]


def test_arbitrary_and_random_subsets():
    model = tiny_model("llama")
    name = "model.layers.1.mlp.down_proj.weight"
    a = subsets.from_indices(model, name, [[0, 1], [3, 2]])
    assert a.flat_index.tolist() == [1, 3 * 32 + 2]
    r1 = subsets.random_subset(model, [name], 5, seed=3)
    r2 = subsets.random_subset(model, [name], 5, seed=3)
    assert torch.equal(r1.slices[0].flat_index, r2.slices[0].flat_index)
    both = subsets.make_subset(a, subsets.from_indices(model, "lm_head.weight", [0, 5]))
    objective = SubsetLoss(model, both)
    assert not objective.fused_head  # the LM head itself is in the subset: plain autograd path
    with pytest.raises(UserError, match="overlap"):
        subsets.make_subset(a, subsets.from_indices(model, name, [1]))


def test_subset_errors_name_the_parameters():
    """The library names its own parameters (a ValueError); the scripts show the flag instead (lib.app.cli.flag_message)."""
    model = tiny_model("opt")
    cases = [
        (
            lambda: subsets.single_layer_single_block(model, "q_proj", 0, 4),
            r"unknown layer_name 'q_proj'.*self_attn\.q_proj.*fc2",
            "--layer_name",
        ),
        (
            lambda: subsets.single_layer_single_block(model, "self_attn.q_proj", 0, 17),
            r"t 17 is larger than a row of self_attn.q_proj \(16 entries\)",
            "--t",
        ),
        (
            lambda: subsets.single_layer_single_block(model, "fc1", 2, 4),
            r"block_index 2 is out of range: the model has 2 blocks",
            "--block_index",
        ),
        (
            lambda: subsets.single_layer_several_blocks(model, "fc1", 3, 4),
            r"num_blocks 3 is out of range",
            "--num_blocks",
        ),
        (
            lambda: subsets.several_layers_several_blocks(model, 7, 1, 4),
            r"num_layers 7 is out of range: block 0 has 6 linear layers",
            "--num_layers",
        ),
    ]
    for call, message, flag in cases:
        with pytest.raises(ValueError, match=message) as exc:
            call()
        assert isinstance(exc.value, UserError) and "--" not in str(exc.value)
        assert flag_message(exc.value).startswith(
            str(exc.value).split(exc.value.param)[0] + flag
        ), flag_message(exc.value)
