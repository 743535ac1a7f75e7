"""Float64 end to end (lib.model.precision): what is swapped, what is left alone, and that it is the same model."""

from __future__ import annotations

import torch
from conftest import tiny_ids, tiny_model

from lib.hessian.exact import batch_hessian
from lib.model.models import load_model, prepare_model
from lib.model.precision import KEEP_DTYPE_ATTENTION, KeepDtypeRMSNorm, keep_dtype_attention
from lib.objective import subsets
from lib.objective.loss import SubsetLoss


def norm_types(model) -> set[str]:
    return {type(m).__name__ for m in model.modules() if "Norm" in type(m).__name__}


def test_float64_models_switch_attention_and_norms_float32_untouched():
    for arch in ("opt", "llama", "qwen2", "mistral", "gpt2"):
        m64 = tiny_model(arch)
        assert m64.config._attn_implementation == KEEP_DTYPE_ATTENTION
        assert not norm_types(m64) & {"LlamaRMSNorm", "Qwen2RMSNorm", "MistralRMSNorm"}
    m32 = tiny_model("llama", dtype=torch.float32)
    assert m32.config._attn_implementation == "eager" and "LlamaRMSNorm" in norm_types(m32)
    assert (
        tiny_model("llama", attn="sdpa").config._attn_implementation == "sdpa"
    )  # its math kernel keeps float64
    names = [n for n, _ in tiny_model("llama").named_parameters()]
    assert names == [
        n for n, _ in m32.named_parameters()
    ]  # the swapped norms hold the same weights


def test_same_function_as_eager_up_to_the_float32_softmax():
    """Only the softmax precision differs from eager attention (norms stay swapped): logits agree to ~float32 precision."""
    ids = tiny_ids()
    for arch in ("opt", "llama"):
        kept = tiny_model(arch)
        eager = tiny_model(arch)
        eager.config._attn_implementation = "eager"
        a = kept(input_ids=ids, use_cache=False).logits
        b = eager(input_ids=ids, use_cache=False).logits
        assert 0 < float((a - b).abs().max()) < 1e-5


def test_keep_dtype_attention_equals_softmax_attention():
    """Against a direct formula with grouped-query heads (2 query heads per key/value head)."""
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, h, 5, 3, generator=g, dtype=torch.float64) for h in (4, 2, 2))
    mask = torch.triu(torch.full((5, 5), float("-inf"), dtype=torch.float64), 1)[None, None]
    module = torch.nn.Module()
    module.num_key_value_groups = 2
    out, w = keep_dtype_attention(module.eval(), q, k, v, mask, scaling=0.5)
    kk, vv = k[:, [0, 0, 1, 1]], v[:, [0, 0, 1, 1]]
    ref = torch.softmax(q @ kk.transpose(-1, -2) * 0.5 + mask, -1) @ vv
    assert out.dtype == torch.float64 and w.dtype == torch.float64
    assert torch.allclose(out, ref.transpose(1, 2), rtol=0, atol=1e-15)


def test_rmsnorm_replacement_equals_upcasting_norm_in_float32():
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    norm = LlamaRMSNorm(6, eps=1e-5)
    norm.weight.data.uniform_(0.5, 1.5)
    h = torch.randn(3, 6)
    assert torch.allclose(
        KeepDtypeRMSNorm(norm.weight, norm.variance_epsilon)(h), norm(h), rtol=1e-6, atol=0
    )


def test_uncovered_architecture_warns_in_one_line(capsys):
    from transformers import Phi3Config, Phi3ForCausalLM

    torch.manual_seed(0)
    model = Phi3ForCausalLM(
        Phi3Config(
            vocab_size=64,
            hidden_size=16,
            intermediate_size=32,
            num_hidden_layers=1,
            num_attention_heads=2,
            max_position_embeddings=32,
            pad_token_id=0,
        )
    )
    model.config._attn_implementation = "eager"
    prepare_model(model.double())
    err = capsys.readouterr().err
    assert err.startswith("warning: float64") and err.count("\n") == 1 and "phi3" in err
    assert model.config._attn_implementation == "eager"


def test_embedded_model_in_float64_is_float64_end_to_end():
    model = load_model("embedded", dtype=torch.float64)
    assert model.config._attn_implementation == KEEP_DTYPE_ATTENTION
    subset = subsets.single_layer_single_block(model, "self_attn.q_proj", 0, 6)
    h, _ = batch_hessian(SubsetLoss(model, subset), tiny_ids(b=1, seqlen=16))
    assert float((h - h.T).abs().max() / h.abs().max()) < 1e-12
