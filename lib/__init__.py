"""Exact and stochastic Hessians of LLM perplexity (the library behind the top-level scripts).

Typical use from Python::

    import lib
    model = lib.load_model("embedded")                     # or any HF causal LM id / directory
    subset = lib.single_layer_single_block(model, "self_attn.q_proj", block_index=0, t=32)
    samples = lib.load_samples("embedded", seqlen=128, b=4)  # (b, seqlen) token ids
    result = lib.exact_hessian(model, subset, samples)      # result.hessian: (32, 32)
    H = lib.HessianOperator(model, subset, samples)          # H @ V: (32, p) -> (32, p), one pass per call

    name = "model.decoder.layers.0.self_attn.q_proj.weight"  # a whole weight's Hessian diagonal
    target = lib.Target(name, tuple(model.get_parameter(name).shape))
    diag = lib.hessian_diagonal(model, [target], samples, estimators=("xdiag",), vhp_samples=10)
    diag.diagonals["xdiag"][name]                          # float64, the weight's shape

Main entry points:

* models and data: :func:`load_model` (eval mode, frozen, float64 end to end when loaded in float64),
  :func:`prepare_model`, :func:`find_blocks`, :func:`linear_layers`, :func:`load_samples`;
* subsets ``x`` of the weights: :func:`single_layer_single_block`, :func:`single_layer_several_blocks`,
  :func:`several_layers_several_blocks` (the paper's three), :func:`from_indices` + :func:`make_subset`,
  :func:`random_subset`; :class:`SubsetLoss` is the summed next-token NLL as a function ``f(x, input_ids)``
  (``f.x0()`` gives the model's own values);
* exact Hessians: :func:`exact_hessian` (-> :class:`HessianResult`), :func:`batch_hessian` (one batch),
  :func:`hessian_rev_rev` (any scalar function of a flat tensor);
* Hessian diagonals of whole weights: :func:`hessian_diagonal` (-> :class:`DiagonalResult`) with the
  estimators in :data:`ESTIMATORS` (``hutchinson``, ``xdiag``, ``empirical_fisher``, ``ggn``, ``exact``; one module
  each in :mod:`lib.estimators`) for :class:`Target` weights; the estimator math on dense data: :func:`xdiag_basis`,
  :func:`xdiag_estimate`, :func:`hutchinson_running`, :func:`rademacher_probes`;
* Hessian spectra: :class:`HessianOperator` (``H @ V``, ``matvec``, ``matmat``, ``to_scipy()``; the one
  Hessian-product primitive, :mod:`lib.operator`) and :mod:`lib.spectrum` (Lanczos with full
  reorthogonalization, Hutchinson and Hutch++ traces, stochastic Lanczos quadrature over any ``matmat``);
* curvature approximations next to the exact Hessian (GGN, sampled and empirical Fisher, GPTQ, K-FAC):
  :mod:`lib.curvature`, one module each in :mod:`lib.estimators.approximations`;
* chunk by measurement: :func:`tune_chunk` (:mod:`lib.autotune`); runs on several devices with checkpoints:
  :mod:`lib.parallel`, :mod:`lib.checkpoint`; command-line pipelines: :mod:`lib.cli`, :mod:`lib.diagonal_cli`,
  :mod:`lib.spectrum_cli`. Modules that ``import lib`` does not load (``curvature``, ``parallel``,
  ``checkpoint``, the ``*_cli``) are imported by name, e.g. ``import lib.curvature``.
"""

from .autotune import tune_chunk
from .data import load_samples, load_text, load_tokenizer, make_samples, tokenize
from .diagonal import ESTIMATORS, DiagonalResult, Target, hessian_diagonal, hutchinson_running, rademacher_probes, xdiag_basis, xdiag_estimate
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
    "ESTIMATORS",
    "DiagonalResult",
    "HessianOperator",
    "HessianResult",
    "ParamSlice",
    "Subset",
    "SubsetLoss",
    "Target",
    "UserError",
    "batch_hessian",
    "exact_hessian",
    "find_blocks",
    "from_indices",
    "head_nll",
    "hessian_diagonal",
    "hessian_rev_rev",
    "hutchinson_running",
    "linear_layers",
    "load_model",
    "load_samples",
    "load_text",
    "load_tokenizer",
    "make_samples",
    "make_subset",
    "prepare_model",
    "rademacher_probes",
    "random_subset",
    "several_layers_several_blocks",
    "single_layer_several_blocks",
    "single_layer_single_block",
    "summed_nll",
    "tokenize",
    "tune_chunk",
    "xdiag_basis",
    "xdiag_estimate",
]
