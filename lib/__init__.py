"""Exact and stochastic Hessians of LLM perplexity (the library behind the top-level scripts).

Typical use from Python::

    import lib
    model = lib.load_model("embedded")                     # or any HF causal LM id / directory
    subset = lib.single_layer_single_block(model, "self_attn.q_proj", block_index=0, t=32)
    samples = lib.load_samples("embedded", seqlen=128, b=4)  # (b, seqlen) token ids
    result = lib.exact_hessian(model, subset, samples)      # result.hessian: (32, 32)
    H = lib.HessianOperator(model, subset, samples)          # H @ V: (32, p) -> (32, p), one pass per call
"""

from .data import load_samples, load_text, load_tokenizer, make_samples, tokenize
from .errors import UserError
from .hessian import HessianResult, batch_hessian, exact_hessian, hessian_rev_rev
from .loss import SubsetLoss, head_nll, summed_nll
from . import spectrum
from .operator import HessianOperator
from .models import find_blocks, linear_layers, load_model, prepare_model
from .subsets import (
    ParamSlice,
    Subset,
    from_indices,
    make_subset,
    random_subset,
    several_layers_several_blocks,
    single_layer_several_blocks,
    single_layer_single_block,
)

__all__ = [
    "HessianOperator",
    "HessianResult",
    "ParamSlice",
    "Subset",
    "SubsetLoss",
    "UserError",
    "batch_hessian",
    "exact_hessian",
    "find_blocks",
    "from_indices",
    "head_nll",
    "hessian_rev_rev",
    "linear_layers",
    "load_model",
    "load_samples",
    "load_text",
    "load_tokenizer",
    "make_samples",
    "make_subset",
    "prepare_model",
    "random_subset",
    "several_layers_several_blocks",
    "single_layer_several_blocks",
    "single_layer_single_block",
    "summed_nll",
    "tokenize",
]
