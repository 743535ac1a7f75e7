"""Run specifications: what a script run computes and how, as one frozen value.

One dataclass per script family -- :class:`ExactSpec` (the three exact-Hessian scripts), :class:`DiagonalSpec`
(``hessian_diagonal.py``) and :class:`SpectrumSpec` (``hessian_spectrum.py``) -- made of the sections
``model``, ``data``, ``subset``, ``compute``, ``output`` and ``run``. A spec is built once, from the parsed
flags (:func:`lib.app.cli.spec_from_args`) or in Python (:meth:`RunSpec.build`, ``reproduce.py``), with every
default resolved, and never changed: :meth:`RunSpec.replace` returns a new spec (the pipeline does so once the
model and the text have fixed ``seqlen``, ``b``, ``num_blocks`` or ``num_layers`` left at ``None`` = "the
model's / the text's"). It is validated in one place (:meth:`RunSpec.validate`), written whole into the run's
JSON (:meth:`RunSpec.as_dict`) and hashed (:meth:`RunSpec.digest`) over its result-changing fields, for the
default output name and the checkpoint identity.

Every field is declared with :func:`result` (it changes the numbers or what is written: hashed) or
:func:`operational` (it changes only how, where or how fast a run computes: not hashed). A field's name is
its flag's name (``data.model_input_bs`` is ``--model_input_bs``), unique across the spec's sections.

Adding a flag: one field here, in the section it belongs to, declared ``result(default)`` or
``operational(default)`` (``result(default, when=predicate)`` when it matters only in some runs), plus one
``add_argument`` in :mod:`lib.app.cli` taking its default from the field; a test checks that the two match.

This module imports neither torch nor transformers, so that parsing and checking flags stays fast.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, ClassVar, TypeVar

from .. import constants
from ..errors import UserError
from ..paths import EMBEDDED as _EMBEDDED

ROLE = "role"
"""Field metadata key: :data:`RESULT`, :data:`OPERATIONAL` or :data:`SECTION`."""
RESULT, OPERATIONAL, SECTION = "result", "operational", "section"
WHEN = "when"
"""Field metadata key of a result field's predicate ``spec -> bool`` (``None``: always hashed)."""
SECTIONS = ("model", "data", "subset", "compute", "output", "run")


# ----------------------------------------------------------------------------- library constants without torch (lib.constants)


EMBEDDED: str = _EMBEDDED
"""The name of the bundled model (the default ``--model``)."""
DTYPES = ("bfloat16", "float16", "float32", "float64")
EMBEDDED_DEFAULTS = {"seqlen": 128, "b": 16}
"""Sized so that each script's default run takes under a minute of compute on one CPU core with the embedded model."""
PAPER_SEQLEN = 2048
"""The paper's sequence length (capped by the model's limit); its ``b`` is every sample of the text."""
SEED_RANGE = (-(2**63), 2**64 - 1)
"""Seeds ``torch.manual_seed`` accepts."""


# ----------------------------------------------------------------------------- fields


def result(default: Any = None, *, when: Callable[[Any], bool] | None = None) -> Any:
    """A field that changes the result (the numbers, or what is written): part of :meth:`RunSpec.digest`.

    ``when(spec)``: hashed only when it holds (e.g. the seed of an exact Hessian, which uses random
    numbers only with ``--compare``)."""
    return field(default=default, metadata={ROLE: RESULT, WHEN: when})


def operational(default: Any = None) -> Any:
    """A field that changes how, where or how fast a run computes, never its numbers: not hashed."""
    return field(default=default, metadata={ROLE: OPERATIONAL})


def section(cls: type) -> Any:
    return field(default_factory=cls, metadata={ROLE: SECTION})


# ----------------------------------------------------------------------------- sections


@dataclass(frozen=True)
class ModelSection:
    """Which model, loaded how."""

    model: str = result(EMBEDDED)
    cache_dir: str = operational("llm_weights")
    dtype: str = result("float32")
    attn_implementation: str = result("eager")
    no_fused_head: bool = result(False)
    matmul_precision: str = result(
        "highest", when=lambda spec: spec.model.matmul_precision != "highest"
    )
    """``torch.set_float32_matmul_precision`` (``high``/``medium``: TF32 / bf16 passes on GPUs that have them); hashed
    only when lowered, so that the default runs keep their names and digests."""


@dataclass(frozen=True)
class DataSection:
    """Which samples: ``b`` samples of ``seqlen`` tokens of ``dataset``, ``model_input_bs`` per forward."""

    dataset: str = result("auto")
    seqlen: int | None = result(None)
    """``None``: ``min(2048, the model's limit)``, fixed when the model's config is read."""
    b: int | None = result(None)
    """``None``: every sample of the text, fixed when the text is tokenized."""
    model_input_bs: int | str = result("auto")
    """``"auto"``: fixed once the model and the samples are known (:func:`lib.products.autotune.samples_per_forward`)."""


@dataclass(frozen=True)
class ExactSubset:
    """The first ``t`` weights of row 0 of linear layers (the paper's subsets); ``None``: not used by the script,
    or for ``num_blocks`` / ``num_layers`` every block / layer (fixed once the model is known)."""

    layer_name: str | None = result(None)
    block_index: int | None = result(None)
    num_blocks: int | None = result(None)
    num_layers: int | None = result(None)
    t: int | None = result(None)


@dataclass(frozen=True)
class SpectrumSubset(ExactSubset):
    """The exact scripts' subsets, or whole parameters by name (``params``: shell-style globs)."""

    params: tuple[str, ...] | None = result(None)


ROW_SUBSET_FIELDS = ("layer_name", "block_index", "num_blocks", "num_layers", "t")
"""The exact scripts' subset fields, which a ``--params`` subset (whole parameters by name) does not use."""


def used_config(config: dict[str, Any]) -> dict[str, Any]:
    """A JSON ``config`` (:meth:`RunSpec.as_dict`) without the fields the run did not use: a ``--params`` run's
    :data:`ROW_SUBSET_FIELDS` (their defaults stay in the spec and its digest, so names and checkpoints keep).
    Also reads older files, which list them."""
    subset = config.get("subset")
    if not isinstance(subset, dict) or not subset.get("params"):
        return config
    return {
        **config,
        "subset": {k: v for k, v in subset.items() if k not in ROW_SUBSET_FIELDS},
    }


@dataclass(frozen=True)
class DiagonalSubset:
    """Whole weights: one linear layer of one block, or every linear layer (of every block or of ``block_index``)."""

    layer_name: str | None = result(None)
    block_index: int | None = result(None)
    all_layers: bool = result(False)


def _finite_differences(spec: Any) -> bool:
    return spec.compute.hvp not in (None, "exact")


def _auto_step(spec: Any) -> bool:
    return spec.compute.fd_step == "auto"


@dataclass(frozen=True)
class AuditSettings:
    """The float64 audit of the run's products (:mod:`lib.products.audit`): ``audit`` products (``None``: the default of the
    run's path, :func:`lib.products.audit.default_products`), on the first ``audit_b`` samples (``None``: the default), warning
    above ``audit_tol``. They change no number of the result (not hashed), except with ``--fd_step auto``, whose step
    the audit chooses."""

    audit: int | None = result(None, when=_auto_step)
    audit_b: int | None = result(None, when=_auto_step)
    audit_tol: float = result(0.1, when=_auto_step)


@dataclass(frozen=True)
class ProductMethod(AuditSettings):
    """How every Hessian-vector product is taken (:mod:`lib.products.finite_difference`): ``hvp`` exact (double backward) or
    finite_difference (two first-order gradients), with Richardson extrapolation and a relative step (``None``: the
    dtype's default). ``hvp=None``: finite differences under ``--fsdp``, else exact (fixed when the spec is built).
    Hashed only for finite differences, so that exact runs keep the names and digests they had before these flags."""

    hvp: str | None = result(None, when=_finite_differences)
    fd_richardson: bool = result(False, when=_finite_differences)
    fd_step: float | str | None = result(None, when=_finite_differences)


HVP_METHODS = constants.HVP_METHODS
MATMUL_PRECISIONS = ("highest", "high", "medium")
"""``--matmul_precision``: torch's float32 matmul precisions (:func:`torch.set_float32_matmul_precision`)."""


def fd_step_arg(text: str) -> float | str:
    """``--fd_step``: a relative step, or ``auto`` (chosen by the audit among :data:`lib.products.audit.FD_LADDER`)."""
    if text == "auto":
        return text
    try:
        return float(text)
    except ValueError:
        import argparse

        raise argparse.ArgumentTypeError(
            f"invalid value {text!r}: give auto or a relative step such as 1e-3"
        ) from None


def _check_products(c: ProductMethod, dtype: str, method: str | None = None) -> None:
    """Finite-difference settings without ``--hvp finite_difference``, ``--method autograd`` with it, a step that
    underflows ``dtype``: one line each."""
    if c.hvp != "finite_difference":
        given = [
            f
            for f, on in (
                ("--fd_richardson", c.fd_richardson),
                ("--fd_step", c.fd_step is not None),
            )
            if on
        ]
        if given:
            them = "it" if len(given) == 1 else "them"
            raise UserError(
                f"{' and '.join(given)} set{'s' if len(given) == 1 else ''} finite-difference products; add --hvp "
                f"finite_difference or drop {them}"
            )
        return
    from .early_checks import finite_difference_check as check  # torch: only for these runs

    check(method, None if c.fd_step == "auto" else c.fd_step, c.fd_richardson, dtype)


def _compares(spec: Any) -> bool:
    return spec.compute.compare is not None


@dataclass(frozen=True)
class ExactCompute(ProductMethod):
    """The exact Hessian, and optionally the curvature approximations beside it and the batch-size study."""

    method: str = result("rev-rev")
    chunk: int = operational(0)
    seed: int = result(0, when=_compares)
    """Random numbers only with ``compare`` (sampled labels, perturbations)."""
    batch_study: bool = result(False)
    compare: tuple[str, ...] | None = result(None)
    fisher_samples: int = result(4)
    perturbations: int = result(64)
    perturbation_bits: int = result(4)
    compare_top_k: int = result(8)


@dataclass(frozen=True)
class DiagonalCompute(ProductMethod):
    """Estimators of the Hessian diagonal, ``hvps`` (K) Hessian-vector products per sample and weight."""

    estimator: tuple[str, ...] = result(("xdiag",))
    hvps: int = result(100)
    track_rows: int = result(0)
    chunk: int = operational(0)
    seed: int = result(0)


@dataclass(frozen=True)
class SpectrumCompute(ProductMethod):
    """Extreme eigenvalues (Lanczos), traces and the spectral density, or the exact path for small subsets."""

    method: str = result("rev-rev")
    chunk: int = operational(0)
    seed: int = result(0)
    top_k: int = result(5)
    which: str = result("largest")
    block_size: int = result(1)
    tol: float = result(1e-6)
    max_iter: int = result(100)
    eigenvectors: bool = result(False)
    trace: bool = result(False)
    trace_hvps: int = result(30)
    density: bool = result(False)
    slq_probes: int = result(4)
    lanczos_steps: int = result(30)
    density_points: int = result(1000)
    keep_graphs: str = operational("auto")
    exact_below: int = result(2048)
    reorth: str = result("full", when=lambda spec: spec.compute.reorth != "full")
    vector_dtype: str = result("float64", when=lambda spec: spec.compute.vector_dtype != "float64")
    vector_storage: str = operational("auto")
    fsdp: bool = operational(False)


@dataclass(frozen=True)
class OutputSection:
    """Where the outputs go."""

    output_dir: str = operational("results")
    name: str | None = operational(None)
    overwrite: bool = operational(False)
    skip_existing: bool = operational(False)
    """A finished result of this configuration under the run's name (its files verified) ends the run with exit 0."""
    no_progress: bool = operational(False)
    abs: bool = result(False)
    """Heatmaps of ``|H|`` instead of the signed ``H`` (only the figures change)."""
    label: str | None = result(None)
    """A word added to figure titles and the JSON (``reproduce.py --quick`` sets ``quick``)."""
    """Heatmaps of ``|H|`` instead of the signed ``H`` (only the figures change)."""


@dataclass(frozen=True)
class RunSection:
    """Devices, worker processes and checkpoints."""

    device: str = operational("auto")
    devices: str | None = operational(None)
    device_map: str | None = operational(None)
    checkpoint_every: str = operational(constants.DEFAULT_CHECKPOINT_EVERY)
    resume: bool = operational(False)
    keep_checkpoint: bool = operational(False)
    unit_timeout: float = operational(0.0)
    setup_timeout: float = operational(0.0)
    threads: int | None = operational(None)
    """Intra-op CPU threads per process; ``None``: :func:`lib.runtime.threads.choose` (``OMP_NUM_THREADS``, else the free CPUs)."""


def model_input_bs_arg(text: str) -> int | str:
    """``--model_input_bs``: ``auto`` or an integer (checked to be at least 1 with the other flags)."""
    if text == "auto":
        return text
    try:
        return int(text)
    except ValueError:
        import argparse

        raise argparse.ArgumentTypeError(
            f"invalid value {text!r}: give auto or a number of samples"
        ) from None


# ----------------------------------------------------------------------------- specs

S = TypeVar("S", bound="RunSpec")


def _jsonable(value: Any) -> Any:
    return list(value) if isinstance(value, tuple) else value


def _at_least(name: str, value: Any, low: Any, note: str = "") -> None:
    if value is not None and value < low:
        raise UserError(f"--{name} must be at least {low}, got {value}{note}")


@dataclass(frozen=True)
class RunSpec:
    """Base of the specs: the sections every script has, the digest, the JSON form and the shared checks."""

    family: ClassVar[str] = ""
    scripts: ClassVar[tuple[str, ...]] = ()
    script: str = result("")
    model: ModelSection = section(ModelSection)
    data: DataSection = section(DataSection)
    output: OutputSection = section(OutputSection)
    run: RunSection = section(RunSection)

    # -- structure

    def sections(self) -> dict[str, Any]:
        """``{section name: section}`` in the order of :data:`SECTIONS`."""
        return {name: getattr(self, name) for name in SECTIONS if hasattr(self, name)}

    def entries(self) -> Iterator[tuple[str, dataclasses.Field, Any]]:
        """``(section name, field, value)`` of every field of every section."""
        for sname, sec in self.sections().items():
            for f in fields(sec):
                yield sname, f, getattr(sec, f.name)

    @classmethod
    def field_names(cls) -> dict[str, str]:
        """``{field name: section name}`` (the flags' names)."""
        out = {}
        for f in fields(cls):
            if f.metadata.get(ROLE) == SECTION:
                out.update({g.name: f.name for g in fields(f.default_factory)})
        return out

    def get(self, name: str) -> Any:
        """The value of field ``name``, whichever section holds it."""
        return getattr(getattr(self, self.field_names()[name]), name)

    def replace(self: S, **changes: Any) -> S:
        """A new spec with fields changed by name (``spec.replace(b=4, t=8)``); ``script`` too."""
        where = self.field_names()
        unknown = set(changes) - set(where) - {"script"}
        if unknown:
            raise TypeError(f"{type(self).__name__} has no field {', '.join(sorted(unknown))}")
        by_section: dict[str, dict[str, Any]] = {}
        for name, value in changes.items():
            if name != "script":
                by_section.setdefault(where[name], {})[name] = value
        top = {s: dataclasses.replace(getattr(self, s), **kw) for s, kw in by_section.items()}
        if "script" in changes:
            top["script"] = changes["script"]
        return dataclasses.replace(self, **top)

    # -- JSON and digest

    def as_dict(self) -> dict[str, Any]:
        """The whole spec as JSON-ready nested dicts (``family``, ``script``, then each section)."""
        out: dict[str, Any] = {"family": self.family, "script": self.script}
        for sname, sec in self.sections().items():
            out[sname] = {f.name: _jsonable(getattr(sec, f.name)) for f in fields(sec)}
        return out

    def result_fields(self) -> dict[str, Any]:
        """The result-changing fields only (their ``when`` evaluated), nested like :meth:`as_dict`."""
        out: dict[str, Any] = {"family": self.family, "script": self.script}
        for sname, f, value in self.entries():
            if f.metadata.get(ROLE) == RESULT and (
                f.metadata.get(WHEN) is None or f.metadata[WHEN](self)
            ):
                out.setdefault(sname, {})[f.name] = _jsonable(value)
        return out

    def result_values(self, sections: tuple[str, ...] = SECTIONS) -> dict[str, Any]:
        """The result-changing fields of ``sections``, flat by field name (``family`` and ``script`` included)."""
        nested = self.result_fields()
        out = {"family": nested.pop("family"), "script": nested.pop("script")}
        for sname, values in nested.items():
            if sname in sections:
                out.update(values)
        return out

    def digest(self, length: int = 8) -> str:
        """Hex SHA-256 of :meth:`result_fields` (first ``length`` digits; the default name uses 8)."""
        text = json.dumps(self.result_fields(), sort_keys=True, default=str)
        return hashlib.sha256(text.encode()).hexdigest()[:length]

    # -- building

    @classmethod
    def build(cls: type[S], script: str, **values: Any) -> S:
        """The spec of ``script`` from field values by name (missing ones: the defaults), defaults resolved.

        Sequences become tuples; ``None`` where a field's default is not ``None`` means "the default"."""
        if cls.scripts and script not in cls.scripts:
            raise ValueError(f"{cls.__name__} is for {', '.join(cls.scripts)}, not {script!r}")
        where = cls.field_names()
        unknown = set(values) - set(where)
        if unknown:
            raise TypeError(f"{cls.__name__} has no field {', '.join(sorted(unknown))}")
        spec = cls(script=script)
        given = {
            k: tuple(v) if isinstance(v, list) else v
            for k, v in values.items()
            if v is not None or spec.get(k) is None
        }
        return spec.replace(**given)._resolved()

    def _resolved(self: S) -> S:
        """Defaults that depend on other fields (the model's name, ``--fsdp``), resolved."""
        changes: dict[str, Any] = {}
        names = self.field_names()
        if "hvp" in names and self.get("hvp") is None:
            changes["hvp"] = (
                "finite_difference" if names.get("fsdp") and self.get("fsdp") else "exact"
            )
        embedded = self.model.model == EMBEDDED
        if self.data.dataset == "auto":
            changes["dataset"] = EMBEDDED if embedded else constants.WIKITEXT2
        if embedded:
            for key, value in EMBEDDED_DEFAULTS.items():
                if getattr(self.data, key) is None:
                    changes[key] = value
        return self.replace(**changes) if changes else self

    # -- validation

    def validate(self) -> None:
        """Refuse (:class:`UserError`, naming the flags) values that are wrong whatever the model and data."""
        self._check()
        self._check_common()

    def _check(self) -> None:
        """The family's own checks (run before the shared ones)."""

    def _check_common(self) -> None:
        d = self.data
        if d.model_input_bs != "auto":
            _at_least("model_input_bs", d.model_input_bs, 1)
            if d.b is not None and d.b % d.model_input_bs:
                raise UserError(f"--model_input_bs {d.model_input_bs} does not divide --b {d.b}")
        _at_least("threads", self.run.threads, 1)
        names = self.field_names()
        if "chunk" in names:
            chunk = self.get("chunk")
            if chunk < 0:
                raise UserError(f"--chunk must be >= 0, got {chunk}")
        for name in ("num_blocks", "num_layers"):
            if name in names:
                _at_least(name, self.get(name), 1, " (leave it out to use all)")
        seed = self.get("seed")
        if not SEED_RANGE[0] <= seed <= SEED_RANGE[1]:
            raise UserError(f"--seed {seed} is out of range: use an integer from -2**63 to 2**64-1")
        if self.output.skip_existing and self.output.overwrite:
            raise UserError(
                "--skip_existing keeps a finished result and --overwrite replaces it: give one or the other"
            )
        check_timeout("--unit_timeout", self.run.unit_timeout)
        check_timeout("--setup_timeout", self.run.setup_timeout)
        compute = getattr(self, "compute", None)
        if isinstance(compute, ProductMethod):
            if compute.hvp not in HVP_METHODS:
                raise UserError(f"--hvp must be one of {', '.join(HVP_METHODS)}, got {compute.hvp}")
            _check_products(compute, self.model.dtype, getattr(compute, "method", None))
            _check_audit(compute, self.data.b)
        if self.model.matmul_precision not in MATMUL_PRECISIONS:
            raise UserError(
                f"--matmul_precision must be one of {', '.join(MATMUL_PRECISIONS)}, got {self.model.matmul_precision}"
            )


def _check_audit(c: AuditSettings, b: int | None) -> None:
    """``--audit`` >= 0, ``--audit_b`` between 1 and ``--b``, ``--audit_tol`` positive, ``--fd_step auto`` with an audit."""
    _at_least("audit", c.audit, 0)
    _at_least("audit_b", c.audit_b, 1)
    if c.audit_b is not None and b is not None and c.audit_b > b:
        raise UserError(f"--audit_b {c.audit_b} is more than the run's --b {b} samples")
    if not (c.audit_tol > 0 and math.isfinite(c.audit_tol)):
        raise UserError(f"--audit_tol must be a positive number, got {c.audit_tol}")
    if c.fd_step == "auto" and c.audit == 0:
        raise UserError(
            "--fd_step auto chooses the step by the audit's products: drop --audit 0 (or give a step)"
        )
    if c.fd_step == "auto" and getattr(c, "fsdp", False):
        raise UserError(
            "--fd_step auto chooses the step by the float64 audit, which --fsdp does not have: give --fd_step H"
        )
    if c.fd_step == "auto" and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise UserError(
            "--fd_step auto under torchrun would let each rank choose its own step: run it once in one process "
            "(the JSON's audit.fd.relative_step) and give that step with --fd_step H"
        )
    if c.audit and getattr(c, "fsdp", False):
        raise UserError(
            "--audit is not available with --fsdp (the float64 reference would need the whole model on one rank): "
            "drop --audit, and audit a smaller model or subset without --fsdp"
        )


def check_timeout(flag: str, value: float) -> None:
    """A time limit flag (``--unit_timeout``, ``--setup_timeout``): a finite number of seconds >= 0 (0 = automatic)."""
    if not math.isfinite(value):
        raise UserError(f"{flag} must be a finite number of seconds (0 = automatic), got {value}")
    if value < 0:
        raise UserError(f"{flag} must be >= 0 seconds, got {value}")


T_DEFAULTS = {
    "single_layer_single_block": (128, 768),
    "single_layer_several_blocks": (32, 150),
    "several_layers_several_blocks": (8, 25),
    "hessian_spectrum": (128, 768),
}
"""``t`` by script: (embedded model, the paper's OPT-125M). 768: the whole first row of q_proj; 150 per block x
12 blocks; 25 per layer x 6 layers x 12 blocks."""
DEFAULT_LAYER = "self_attn.q_proj"
EXACT_SUBSETS = {
    "single_layer_single_block": {"layer_name": DEFAULT_LAYER, "block_index": 0},
    "single_layer_several_blocks": {"layer_name": DEFAULT_LAYER},
    "several_layers_several_blocks": {},
}
"""The subset fields each exact script uses, with their defaults (the others stay ``None``)."""


def _resolve_t(spec: S) -> S:
    if spec.subset.t is not None:
        return spec
    embedded, paper = T_DEFAULTS[spec.script]
    return spec.replace(t=embedded if spec.model.model == EMBEDDED else paper)


@dataclass(frozen=True)
class ExactSpec(RunSpec):
    """``single_layer_single_block.py``, ``single_layer_several_blocks.py``, ``several_layers_several_blocks.py``."""

    family: ClassVar[str] = "exact"
    scripts: ClassVar[tuple[str, ...]] = tuple(EXACT_SUBSETS)
    subset: ExactSubset = section(ExactSubset)
    compute: ExactCompute = section(ExactCompute)

    def _resolved(self) -> ExactSpec:
        spec = _resolve_t(super()._resolved())
        defaults = {k: v for k, v in EXACT_SUBSETS[spec.script].items() if spec.get(k) is None}
        return spec.replace(**defaults) if defaults else spec

    def _check(self) -> None:
        c = self.compute
        if c.compare is None:
            defaults = ExactCompute()
            changed = [
                f"--{k}"
                for k in ("fisher_samples", "perturbations", "perturbation_bits", "compare_top_k")
                if getattr(c, k) != getattr(defaults, k)
            ]
            if changed:
                raise UserError(
                    f"{', '.join(changed)} only apply with --compare APPROX [APPROX ...]"
                )
        else:
            for name, low in (
                ("fisher_samples", 1),
                ("perturbations", 0),
                ("perturbation_bits", 1),
                ("compare_top_k", 1),
            ):
                _at_least(name, getattr(c, name), low)


@dataclass(frozen=True)
class SpectrumSpec(RunSpec):
    """``hessian_spectrum.py``."""

    family: ClassVar[str] = "spectrum"
    scripts: ClassVar[tuple[str, ...]] = ("hessian_spectrum",)
    subset: SpectrumSubset = section(SpectrumSubset)
    compute: SpectrumCompute = section(SpectrumCompute)

    def _resolved(self) -> SpectrumSpec:
        spec = _resolve_t(super()._resolved())
        defaults = {
            k: v
            for k, v in {"layer_name": DEFAULT_LAYER, "block_index": 0}.items()
            if spec.get(k) is None
        }
        return spec.replace(**defaults) if defaults else spec

    def _check(self) -> None:
        c = self.compute
        for name, low in (
            ("top_k", 1),
            ("block_size", 1),
            ("max_iter", 1),
            ("trace_hvps", 3),
            ("slq_probes", 1),
            ("lanczos_steps", 1),
            ("density_points", 2),
            ("exact_below", 0),
        ):
            _at_least(name, getattr(c, name), low)
        # inf and nan too; at 1 a residual as large as the top Ritz value would count as converged
        if not 0 < c.tol < 1:
            raise UserError(f"--tol must be a number above 0 and below 1, got {c.tol}")
        most = constants.MAX_DENSITY_POINTS
        if c.density_points > most:
            raise UserError(f"--density_points must be at most {most:,}, got {c.density_points:,}")
        if c.reorth != "full" and c.block_size > 1:
            raise UserError(
                f"--reorth {c.reorth} runs single-vector Lanczos: use --block_size 1 (or --reorth full)"
            )
        if c.fsdp:
            self._check_fsdp()

    def _check_fsdp(self) -> None:
        """``--fsdp`` outside torchrun, with ``--device_map`` / ``--devices`` / exact products / the exact scripts' row
        subsets / ``--eigenvectors``: one line each, before anything loads."""
        if not all(k in os.environ for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK")):
            raise UserError(
                "--fsdp shards the model over torchrun ranks: launch with torchrun --nproc_per_node N "
                "hessian_spectrum.py --fsdp ... (without torchrun, drop --fsdp)"
            )
        if self.run.device_map is not None:
            raise UserError(
                "--fsdp shards the model over the ranks itself; it cannot be combined with --device_map (one process "
                "splitting the model over its GPUs): use one or the other"
            )
        if self.run.devices is not None:
            raise UserError(
                "--fsdp runs one rank per device under torchrun; --devices starts its own worker processes: drop "
                "--devices (torchrun's rank r uses cuda:LOCAL_RANK, or --device cpu)"
            )
        if self.compute.hvp == "exact":
            raise UserError(
                "--fsdp has no double backward (FSDP does not support it): use --hvp finite_difference (the default "
                "with --fsdp)"
            )
        if not self.subset.params:
            raise UserError(
                "--fsdp shards whole parameters: select them with --params GLOB (e.g. '*'), not the exact scripts' "
                "row subsets"
            )
        if self.compute.eigenvectors:
            raise UserError(
                "--eigenvectors with --fsdp would gather model-sized vectors on rank 0; not supported: drop "
                "--eigenvectors"
            )


TRACK_DEFAULT = ("hutchinson", "xdiag")
"""The estimators of a ``--track_rows`` run that names none."""


@dataclass(frozen=True)
class DiagonalSpec(RunSpec):
    """``hessian_diagonal.py``."""

    family: ClassVar[str] = "diagonal"
    scripts: ClassVar[tuple[str, ...]] = ("hessian_diagonal",)
    subset: DiagonalSubset = section(DiagonalSubset)
    compute: DiagonalCompute = section(DiagonalCompute)

    @classmethod
    def build(cls, script: str = "hessian_diagonal", **values: Any) -> DiagonalSpec:
        if values.get("estimator") is None and values.get("track_rows"):
            values = {**values, "estimator": TRACK_DEFAULT}
        if values.get("estimator") is not None:
            values = {**values, "estimator": tuple(dict.fromkeys(values["estimator"]))}
        return super().build(script, **values)

    def _resolved(self) -> DiagonalSpec:
        spec = super()._resolved()
        if spec.subset.layer_name is None and not spec.subset.all_layers:
            spec = spec.replace(layer_name=DEFAULT_LAYER)
        return spec

    def _check(self) -> None:
        c, s = self.compute, self.subset
        from ..estimators.diagonal import (
            REGISTRY,
        )  # the estimators' own limits (imports torch: after parsing)

        unknown = [e for e in c.estimator if e not in REGISTRY]
        if unknown:
            from .suggest import did_you_mean

            raise UserError(
                f"--estimator {unknown[0]} is unknown{did_you_mean(unknown[0], REGISTRY.names())}; choose from "
                f"{', '.join(REGISTRY.names())}"
            )
        est = REGISTRY.lookup(c.estimator)
        if any(e.uses_k for e in est) and c.hvps < 1:
            raise UserError(f"--hvps must be at least 1, got {c.hvps}")
        for e in est:
            if e.uses_k and (c.hvps < e.min_k or c.hvps % e.k_multiple):
                multiple = {1: "", 2: "even and "}.get(
                    e.k_multiple, f"a multiple of {e.k_multiple} and "
                )
                raise UserError(
                    f"--estimator {e.name} {e.k_reason}: --hvps must be {multiple}at least {e.min_k}, got {c.hvps}"
                )
        if c.track_rows < 0:
            raise UserError(f"--track_rows must be >= 0, got {c.track_rows}")
        if s.layer_name is not None and s.all_layers:
            raise UserError(
                f"--layer_name {s.layer_name} picks one layer but --all_layers takes every linear "
                f"layer: give one or the other"
            )
        if c.track_rows and s.all_layers:
            raise UserError(
                "--track_rows studies the convergence on one layer; it cannot be combined with --all_layers"
            )
        if c.track_rows and not any(e.curve for e in est):
            curves = " and/or ".join(e.name for e in REGISTRY if e.curve)
            raise UserError(
                f"--track_rows records the error after each probe: use it with --estimator {curves}"
            )
        if s.block_index is not None and s.block_index < 0:
            raise UserError(f"--block_index {s.block_index} is out of range: it must be >= 0")


SWEEP_EMBEDDED_B = 4
"""``hessian_sweep.py``'s default ``b`` on the bundled model (every unit's quantities: tens of products per unit)."""


@dataclass(frozen=True)
class SweepSubset:
    """The units of a sweep (``over`` a granularity, restricted by ``params`` globs) and its checkpoints: ``models``
    (several ``--model`` directories or ids; the first is ``model.model``) or ``revisions`` of one hub model."""

    over: str = result("layer")
    params: tuple[str, ...] = result(("*",))
    models: tuple[str, ...] | None = result(None)
    revisions: tuple[str, ...] | None = result(None)


@dataclass(frozen=True)
class SweepCompute(ProductMethod):
    """Each unit's quantities (:mod:`lib.hessian.sweep`): traces to ``trace_rel`` relative standard error, Lanczos to ``tol``."""

    quantities: tuple[str, ...] = result(("trace", "top"))
    trace_rel: float = result(0.05)
    min_probes: int = result(10)
    max_probes: int = result(200)
    tol: float = result(1e-3)
    max_iter: int = result(60)
    slq_probes: int = result(4)
    lanczos_steps: int = result(20)
    trace_estimator: str = result("auto")
    strategy: str = result("per_unit")
    seed: int = result(0)
    chunk: int = result(1)
    """Fixed (not timed) so that a resumed sweep takes bitwise the same products."""
    keep_graphs: str = operational("auto")
    fsdp: bool = operational(False)


@dataclass(frozen=True)
class SweepSpec(RunSpec):
    """``hessian_sweep.py``."""

    family: ClassVar[str] = "sweep"
    scripts: ClassVar[tuple[str, ...]] = ("hessian_sweep",)
    subset: SweepSubset = section(SweepSubset)
    compute: SweepCompute = section(SweepCompute)

    @classmethod
    def build(cls, script: str = "hessian_sweep", **values: Any) -> SweepSpec:
        model = values.get("model")
        if isinstance(
            model, (list, tuple)
        ):  # several --model: the checkpoints, the first one inspected
            values = {
                **values,
                "model": model[0],
                "models": tuple(model) if len(model) > 1 else None,
            }
        return super().build(script, **values)

    def _resolved(self) -> SweepSpec:
        if (
            self.model.model == EMBEDDED and self.data.b is None
        ):  # the whole bundled sweep in about a minute
            return super(SweepSpec, self.replace(b=SWEEP_EMBEDDED_B))._resolved()
        return super()._resolved()

    def checkpoint_names(self) -> list[str]:
        """The checkpoints swept, in order: the revisions, else the models."""
        if self.subset.revisions:
            return list(self.subset.revisions)
        return list(self.subset.models or (self.model.model,))

    def _check(self) -> None:
        c, s = self.compute, self.subset
        from ..hessian.sweep import (  # imports torch
            GRANULARITIES,
            QUANTITIES,
            STRATEGIES,
            TRACE_ESTIMATORS,
        )

        for flag, value, allowed in (
            ("over", s.over, GRANULARITIES),
            ("trace_estimator", c.trace_estimator, TRACE_ESTIMATORS),
            ("strategy", c.strategy, STRATEGIES),
        ):
            if value not in allowed:
                raise UserError(f"--{flag} {value} is unknown; choose from {', '.join(allowed)}")
        for q in c.quantities:
            if q not in QUANTITIES:
                from .suggest import did_you_mean

                raise UserError(
                    f"--quantities {q} is unknown{did_you_mean(q, QUANTITIES)}; choose from {', '.join(QUANTITIES)}"
                )
        for name, low in (
            ("min_probes", 2),
            ("max_iter", 1),
            ("slq_probes", 1),
            ("lanczos_steps", 1),
            ("chunk", 1),
        ):
            _at_least(name, getattr(c, name), low)
        if c.max_probes < c.min_probes:
            raise UserError(f"--max_probes {c.max_probes} is below --min_probes {c.min_probes}")
        for name in ("trace_rel", "tol"):
            if not getattr(c, name) > 0:
                raise UserError(f"--{name} must be positive, got {getattr(c, name)}")
        if s.revisions and s.models:
            raise UserError(
                "--revisions are revisions of one --model: give one --model with them, not several"
            )
        if s.revisions and Path(str(self.model.model)).is_dir():
            raise UserError(
                f"--revisions need a Hugging Face model id; --model {self.model.model} is a local directory "
                "(give several --model directories instead)"
            )
        if c.fsdp:
            self._check_sweep_fsdp()

    def _check_sweep_fsdp(self) -> None:
        """``--fsdp``: ``--over block`` only, under torchrun, finite differences, without ``--device_map`` or
        ``--devices``; one line each, before anything loads."""
        if self.subset.over != "block":
            raise UserError(
                f"--fsdp sweeps whole blocks (the units FSDP shards, their weights whole parameters): use --over block, "
                f"not --over {self.subset.over} (a head is part of its weights, which the sharded products cannot "
                "take; for layers run without --fsdp, e.g. with --device_map)"
            )
        if not all(k in os.environ for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK")):
            raise UserError(
                "--fsdp shards the model over torchrun ranks: launch with torchrun --nproc_per_node N "
                "hessian_sweep.py --fsdp --over block ... (without torchrun, drop --fsdp)"
            )
        if self.run.device_map is not None or self.run.devices is not None:
            raise UserError(
                "--fsdp shards the model over the torchrun ranks itself: drop --device_map and --devices"
            )
        if self.compute.hvp == "exact":
            raise UserError(
                "--fsdp has no double backward (FSDP does not support it): use --hvp finite_difference (the "
                "default with --fsdp)"
            )


SPECS: dict[str, type[RunSpec]] = {
    "exact": ExactSpec,
    "diagonal": DiagonalSpec,
    "spectrum": SpectrumSpec,
    "sweep": SweepSpec,
}
"""The spec class of each family."""


def spec_class(script: str) -> type[RunSpec]:
    """The spec class that runs ``script`` (a top-level script's name without ``.py``)."""
    for cls in SPECS.values():
        if script in cls.scripts:
            return cls
    raise ValueError(f"no run spec for script {script!r}")
