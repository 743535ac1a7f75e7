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
    diag = lib.hessian_diagonal(model, [target], samples, estimators=("xdiag",), hvps=10)
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
  Hessian-product primitive, :mod:`lib.products.operator`; exact, or finite differences of gradients:
  ``hvp="finite_difference"``, :class:`FiniteDifference`, :class:`FDSettings`) and :mod:`lib.spectrum.algorithms` (Lanczos with
  full, selective or no reorthogonalization, Hutchinson and Hutch++ traces, stochastic Lanczos quadrature over any
  ``matmat``; sharded vectors :mod:`lib.spectrum.vectors`, FSDP :mod:`lib.products.fsdp`);
* how far approximate products are from exact float64 ones (TF32 / bf16 matmuls, 16-bit models, finite
  differences): :func:`audit_hessian` (-> :class:`AuditResult`, :mod:`lib.products.audit`; the scripts' ``--audit``);

* the spectrum as one call: :func:`hessian_spectrum` (any ``matmat``, e.g. a :class:`HessianOperator`) and
  :func:`dense_spectrum` (a matrix in memory), :class:`SpectrumSettings` -> :class:`SpectrumResult` (eigenpairs
  with residuals, traces with standard errors, the density with its moments, the cost);
* curvature approximations next to the exact Hessian (GGN, sampled and empirical Fisher, GPTQ, K-FAC):
  :mod:`lib.hessian.curvature`, one module each in :mod:`lib.estimators.approximations`;
* chunk by measurement: :func:`tune_chunk` (:mod:`lib.products.autotune`); runs on several devices with checkpoints:
  :mod:`lib.runtime.parallel`, :mod:`lib.runtime.checkpoint`; the scripts: :mod:`lib.commands` (their flags :mod:`lib.app.cli`,
  their run specs :mod:`lib.app.spec`, the one pipeline :mod:`lib.app.pipeline` and its families
  :mod:`lib.app.exact_family`, :mod:`lib.app.diagonal_family`, :mod:`lib.app.spectrum_family`). Modules that are not listed above
  (``curvature``, ``parallel``, ``checkpoint``, ...) are imported by name, e.g. ``import lib.hessian.curvature``.

Threads: the first heavy call (:func:`exact_hessian`, :func:`hessian_diagonal`, :class:`HessianOperator`) chooses
the intra-op CPU threads once per process as the scripts do (:mod:`lib.runtime.threads`), unless the caller chose them
(:func:`set_threads`, ``LLM_HESSIAN_THREADS``, or a ``torch.set_num_threads`` before the call).

``import lib`` loads nothing heavy: each name is imported on first use. Installed with ``pip install .``, the
same package is ``llm_hessian`` (``import llm_hessian as lib``).
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "AuditResult": "products.audit",
    "audit_hessian": "products.audit",
    "tune_chunk": "products.autotune",
    "load_samples": "model.data",
    "load_text": "model.data",
    "load_tokenizer": "model.data",
    "make_samples": "model.data",
    "tokenize": "model.data",
    "ESTIMATORS": "hessian.diagonal",
    "DiagonalResult": "hessian.diagonal",
    "Target": "hessian.diagonal",
    "hessian_diagonal": "hessian.diagonal",
    "hutchinson_running": "hessian.diagonal",
    "rademacher_probes": "hessian.diagonal",
    "xdiag_basis": "hessian.diagonal",
    "xdiag_estimate": "hessian.diagonal",
    "ParamError": "errors",
    "UserError": "errors",
    "HessianResult": "hessian.exact",
    "batch_hessian": "hessian.exact",
    "exact_hessian": "hessian.exact",
    "hessian_rev_rev": "hessian.exact",
    "SpectrumResult": "spectrum.spectra",
    "SpectrumSettings": "spectrum.spectra",
    "dense_spectrum": "spectrum.spectra",
    "hessian_spectrum": "spectrum.spectra",
    "SubsetLoss": "objective.loss",
    "SweepResult": "hessian.sweep",
    "SweepSettings": "hessian.sweep",
    "make_units": "hessian.sweep",
    "sweep": "hessian.sweep",
    "head_nll": "objective.loss",
    "summed_nll": "objective.loss",
    "HessianOperator": "products.operator",
    "FDSettings": "products.finite_difference",
    "FiniteDifference": "products.finite_difference",
    "find_blocks": "model.models",
    "linear_layers": "model.models",
    "load_model": "model.models",
    "prepare_model": "model.models",
    "ParamSlice": "objective.subsets",
    "Subset": "objective.subsets",
    "from_indices": "objective.subsets",
    "make_subset": "objective.subsets",
    "random_subset": "objective.subsets",
    "several_layers_several_blocks": "objective.subsets",
    "single_layer_several_blocks": "objective.subsets",
    "single_layer_single_block": "objective.subsets",
    "set_threads": "runtime.threads",
}
"""Each exported name and the module that defines it; loaded on first use (PEP 562), so that ``import lib``
and the command-line parsers do not import torch."""

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        value = getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
        globals()[name] = value
        return value
    if name == "spectrum":
        return importlib.import_module(".spectrum", __name__)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__, "spectrum"})
