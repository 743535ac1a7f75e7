"""Float64 end to end: a model loaded in float64 computes every step in float64.

Hugging Face's eager attention for OPT and the Llama family runs its softmax in float32, and the
Llama-family RMSNorm casts its input to float32, even in a float64 model; Hessians of such a model are
then asymmetric and only about 1e-7 accurate. :func:`keep_float64` fixes a float64 model *instance*
without patching any transformers class or method:

* attention: the function :func:`keep_dtype_attention` (eager attention with the softmax in the input
  dtype) is registered in transformers' ``AttentionInterface`` (with the eager mask in
  ``AttentionMaskInterface``) under the name :data:`KEEP_DTYPE_ATTENTION`, and the model is switched to
  it; OPT, Llama, Qwen2, Mistral and GPT-2 attention dispatch through that interface;
* norms: Llama-family RMSNorm modules are replaced, on the instance, by :class:`KeepDtypeRMSNorm`, which
  computes the same ``w * h / sqrt(mean(h^2) + eps)`` in the input dtype and holds the *same* weight
  parameter (names and values unchanged).

Covered: :data:`COVERED_MODEL_TYPES`. Other architectures are left as loaded, with a one-line warning.
RoPE's cos/sin tables (Llama family) stay as transformers computes them (float32 precision, then cast):
they are constants of the positions, not functions of the weights, so they do not affect symmetry or
agreement with finite differences. Float32/bfloat16 models are never touched.
"""

from __future__ import annotations

import sys

import torch
import torch.nn.functional as F
from torch import nn

KEEP_DTYPE_ATTENTION = "eager_keep_dtype"
"""Name of the dtype-preserving eager attention in transformers' attention interface."""
COVERED_MODEL_TYPES = frozenset({"opt", "gpt2", "llama", "qwen2", "mistral"})
"""Architectures whose float64 forward is float64 in every step after :func:`keep_float64`."""
UPCASTING_RMSNORMS = frozenset({"LlamaRMSNorm", "Qwen2RMSNorm", "MistralRMSNorm"})
"""RMSNorm classes computing ``w * (h.float() * rsqrt(mean(h.float()^2) + eps)).to(dtype)``."""


def keep_dtype_attention(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    **kwargs,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Eager attention ``softmax(q k^T * scaling + mask) v`` computed in the inputs' dtype.

    ``query``: ``(B, heads, s, d)``; ``key``/``value``: ``(B, kv_heads, s, d)`` (grouped-query heads are
    repeated ``module.num_key_value_groups`` times). Returns ``(output (B, s, heads, d), weights)``.
    """
    groups = getattr(module, "num_key_value_groups", 1)
    if groups > 1:
        key, value = key.repeat_interleave(groups, dim=1), value.repeat_interleave(groups, dim=1)
    scores = torch.matmul(query, key.transpose(-1, -2)) * (
        query.shape[-1] ** -0.5 if scaling is None else scaling
    )
    if attention_mask is not None:
        scores = scores + attention_mask
    weights = F.dropout(torch.softmax(scores, dim=-1), p=dropout, training=module.training)
    return torch.matmul(weights, value).transpose(1, 2).contiguous(), weights


class KeepDtypeRMSNorm(nn.Module):
    """``weight * h / sqrt(mean(h^2, -1) + eps)`` in ``h``'s dtype; shares ``weight`` with the module it replaces."""

    def __init__(self, weight: nn.Parameter, eps: float):
        super().__init__()
        self.weight = weight
        self.variance_epsilon = eps

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.weight * (
            h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.variance_epsilon)
        )


def register_attention() -> None:
    """Register :func:`keep_dtype_attention` (and the eager mask) under :data:`KEEP_DTYPE_ATTENTION` (idempotent)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, eager_mask

    AttentionInterface.register(KEEP_DTYPE_ATTENTION, keep_dtype_attention)
    AttentionMaskInterface.register(KEEP_DTYPE_ATTENTION, eager_mask)


def swap_norms(model: nn.Module) -> int:
    """Replace upcasting RMSNorm modules of ``model`` by :class:`KeepDtypeRMSNorm` in place; returns how many."""
    targets = [
        (name, m) for name, m in model.named_modules() if type(m).__name__ in UPCASTING_RMSNORMS
    ]
    for name, m in targets:
        parent_name, _, attr = name.rpartition(".")
        setattr(
            model.get_submodule(parent_name), attr, KeepDtypeRMSNorm(m.weight, m.variance_epsilon)
        )
    return len(targets)


def keep_float64(model: nn.Module) -> nn.Module:
    """Make a float64 ``model`` compute in float64 throughout (see the module docstring); returns it.

    Does nothing unless the parameters are float64 and attention is ``eager`` (``sdpa``'s math kernel
    already keeps float64). Warns in one line on stderr for an architecture not in :data:`COVERED_MODEL_TYPES`.
    """
    param = next(model.parameters(), None)
    if param is None or param.dtype != torch.float64:
        return model
    model_type = getattr(model.config, "model_type", None)
    if model_type not in COVERED_MODEL_TYPES:
        print(
            f"warning: float64 is kept end to end only for {', '.join(sorted(COVERED_MODEL_TYPES))}; {model_type} may compute its attention softmax or norms in float32",
            file=sys.stderr,
        )
        return model
    if getattr(model.config, "_attn_implementation", "eager") == "eager":
        register_attention()
        model.config._attn_implementation = KEEP_DTYPE_ATTENTION
    swap_norms(model)
    return model
