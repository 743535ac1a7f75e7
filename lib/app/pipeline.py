"""The one pipeline of every script: check -> claim -> inspect -> load -> compute -> save -> report.

* check: the spec's values (:meth:`lib.app.spec.RunSpec.validate`) and the environment (devices, cache directory,
  checkpoint interval, packages), before anything is read;
* claim: the outputs are checked and locked (:func:`lib.app.outputs.claim`) before the model is read;
* inspect: the model's config and module tree on the ``meta`` device (:func:`lib.model.models.model_skeleton`), the
  tokenizer and the text: the family's subset or weights (layer names, block indices, ``t`` against the row
  length, ...), ``seqlen`` against the position limit, the samples available and the token ids against the
  vocabulary are all checked before a weight is read; the spec's open defaults (``seqlen``, ``b``,
  ``num_blocks``, ``num_layers``) are fixed here, in a new spec;
* load: the intra-op threads (:mod:`lib.runtime.threads`), the weights, their fingerprints (:mod:`lib.model.inputs`), the
  family's structure on the real model, and ``--model_input_bs auto`` fixed by a rule
  (:func:`lib.products.autotune.samples_per_forward`; the choice goes into the JSON beside the threads');
* compute and save: the family's (:class:`Family`); the pipeline adds the spec (``config``), the
  fingerprints and the elapsed time to the JSON;
* report: results and the files written go to stdout; progress and warnings go to stderr.

A library error naming a parameter (:class:`lib.errors.ParamError`) leaves as a :class:`UserError` naming the
flag (:func:`lib.app.cli.flag_message`).
"""

from __future__ import annotations

import importlib.util
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import ParamError, UserError
from ..model.data import (
    check_seqlen,
    dataset_label,
    load_text,
    load_tokenizer,
    make_samples,
    text_sha256,
    tokenize,
)
from ..model.inputs import (
    check_token_ids,
    code_path,
    config_fingerprint,
    model_fingerprint,
    tokenizer_fingerprint,
    warn,
)
from ..model.models import (
    ModelSpec,
    load_model,
    max_positions,
    model_skeleton,
    offloaded_parameters,
    parse_device_map,
    resolve_device,
)
from ..products import audit
from ..products.autotune import samples_per_forward
from ..products.finite_difference import FDSettings
from ..products.operator import Products, products_for
from ..runtime import checkpoint as ckpt
from ..runtime import parallel, ranks, threads
from . import outputs, preflight
from .cli import LOW_PRECISION_NOTE, flag_message
from .results import save_tensor_and_json, verify_result
from .spec import PAPER_SEQLEN, SECTIONS, RunSpec, used_config

# ----------------------------------------------------------------------------- the family interface


class Family:
    """What a script family adds to the pipeline. Subclasses set :attr:`name` and implement :meth:`structure`,
    :meth:`default_name`, :meth:`compute`, :meth:`save` and :meth:`report`."""

    name = ""
    identity_sections: tuple[str, ...] = SECTIONS
    """The spec sections whose result-changing fields identify the run's checkpoints (beside each job's own
    configuration): a resume that changes one of them is refused."""

    def default_name(self, spec: RunSpec) -> str:
        """The output stem when ``--name`` is not given: readable, plus ``spec.digest()``."""
        raise NotImplementedError

    def checkpoints(self, spec: RunSpec, out: Path, name: str) -> list[Path]:
        """Every checkpoint file or directory the run may write (claimed before the model loads)."""
        return [out / f"{name}.ckpt"]

    def files(self, spec: RunSpec, name: str) -> list[str]:
        """Every result file the run may write (:func:`lib.app.outputs.planned_files`; claimed before the model
        loads, and no other file may be written)."""
        return outputs.planned_files(name)

    def resolve(self, spec: RunSpec, model: nn.Module) -> RunSpec:
        """``spec`` with the defaults that need the module tree fixed (``model`` may be on the meta device)."""
        return spec

    def load_revision(self, spec: RunSpec) -> str | None:
        """The hub revision of ``--model`` the run loads (its config, tokenizer and weights); None: the default."""
        return None

    def products_per_sample(self, spec: RunSpec, structure: Any) -> int:
        """Hessian-vector products per sample of the run (at most), for ``--model_input_bs auto``."""
        return 1

    def per_sample_units(self, spec: RunSpec) -> bool:
        """Whether the run needs one sample per unit (e.g. the batch study's per-sample snapshots)."""
        return False

    def structure(self, model: nn.Module, spec: RunSpec) -> Any:
        """What the family computes on, from ``model`` (called on the meta skeleton first, to refuse bad flags
        before the weights load, then on the loaded model)."""
        raise NotImplementedError

    def param_names(self, structure: Any) -> list[str]:
        """The names of the parameters the subset ``structure`` takes entries of (checked against offloading)."""
        return list(getattr(structure, "param_names", []))

    def compute(self, run: Run) -> Any:
        """The computation (through :func:`lib.runtime.parallel.run_job`); ``None`` on torchrun ranks other than 0."""
        raise NotImplementedError

    def save(self, run: Run, result: Any) -> tuple[Any, dict[str, Any]]:
        """Write the figures and side files; returns ``(tensor for <name>.pt, the family's JSON fields)``."""
        raise NotImplementedError

    def report(self, run: Run, meta: dict[str, Any]) -> list[str]:
        """The result lines printed on stdout (warnings go to stderr through :func:`lib.model.inputs.warn`)."""
        return []

    def finish(self, run: Run, meta: dict[str, Any]) -> None:
        """After the outputs are written: remove the run's checkpoints (unless ``--keep_checkpoint``)."""
        for s in run.settings:
            if s.checkpoint is not None:
                s.checkpoint.keep = run.spec.run.keep_checkpoint
            ckpt.finish(s.checkpoint)


# ----------------------------------------------------------------------------- the run


@dataclass
class Run:
    """One run in progress: its final spec, output stem, model, samples and the settings of its jobs."""

    spec: RunSpec
    name: str
    model: nn.Module
    samples: torch.Tensor
    device: torch.device
    """Where ``model`` is (the CPU when several worker processes load their own copies)."""
    devices: list[torch.device]
    """The run's devices, one per worker (:func:`run_devices`)."""
    fingerprints: dict[str, str]
    structure: Any
    t_start: float
    identity_sections: tuple[str, ...] = SECTIONS
    settings: list[parallel.RunSettings] = field(default_factory=list)
    """Every :func:`run_settings` made for this run's jobs."""
    kept: list[ckpt.CheckpointConfig | None] = field(default_factory=list)
    """Where the finished work is kept if writing the outputs fails (:func:`lib.app.outputs.saving_results`)."""
    dataset_sha256: str = ""
    """SHA-256 of the text the samples were cut from."""
    model_input_bs_choice: dict[str, Any] = field(default_factory=dict)
    """``--model_input_bs`` as requested, as chosen, and why (:func:`lib.products.autotune.samples_per_forward`)."""
    fd_step: float | None = None
    """The relative step chosen by the audit for ``--fd_step auto`` (:func:`lib.products.audit.prepare`)."""
    audit_plan: Any = None
    audit: Any = None
    """The float64 audit of the run's products (:class:`lib.products.audit.AuditResult`), once it ran."""
    revision: str | None = None
    """The hub revision ``model`` was loaded at (:meth:`Family.load_revision`); None: the default."""

    @property
    def out(self) -> Path:
        return Path(self.spec.output.output_dir)

    @property
    def dtype(self) -> torch.dtype:
        return getattr(torch, self.spec.model.dtype)

    @property
    def where(self) -> str:
        """What the run computed on, for titles and the printed summary: model, text (file name and the first
        digits of its SHA-256), dtype, b, seqlen, and the ``--label`` if any."""
        c = self.computed_on()
        label = f" [{c['label']}]" if c.get("label") else ""
        mm = f" (matmul {c['matmul_precision']})" if "matmul_precision" in c else ""
        return (
            f"{c['model']}, data {c['dataset']} ({c['dataset_sha256'][:8]}), {c['dtype']}{mm}, b={c['b']}, "
            f"seqlen={c['seqlen']}{label}{audit.subtitle(self.audit)}"
        )

    def computed_on(self) -> dict[str, Any]:
        """The JSON's top-level ``computed_on``: model, dataset (label, flag value, SHA-256), dtype, b, seqlen."""
        m, d = self.spec.model, self.spec.data
        out = {
            "model": m.model,
            "dataset": dataset_label(d.dataset),
            "dataset_flag": d.dataset,
            "dataset_sha256": self.dataset_sha256,
            "dtype": m.dtype,
            "b": d.b,
            "seqlen": d.seqlen,
        }
        if m.matmul_precision != "highest":
            out["matmul_precision"] = m.matmul_precision
        return {**out, "label": self.spec.output.label} if self.spec.output.label else out

    def config(self) -> dict[str, Any]:
        """The JSON's ``config``: the spec with every default fixed, ``model_input_bs`` as requested (``auto`` stays
        ``auto``, so the config rebuilds the run; the value used is in ``model_input_bs_choice``), without the
        fields the run did not use (:func:`lib.app.spec.used_config`)."""
        requested = self.model_input_bs_choice.get("requested", self.spec.data.model_input_bs)
        return used_config(self.spec.replace(model_input_bs=requested).as_dict())

    @property
    def rank0(self) -> bool:
        env = parallel.distributed_env()
        return env is None or env[0] == 0

    def identity(self) -> dict[str, Any]:
        """What every checkpoint of the run is validated against beside its job's configuration: the spec's
        result-changing fields of the family's :attr:`Family.identity_sections`."""
        return self.spec.result_values(self.identity_sections)

    def model_spec(self) -> ModelSpec:
        """How worker processes load the model of this run (and check that it is the parent's, by fingerprint)."""
        m = self.spec.model
        return ModelSpec(
            m.model,
            m.cache_dir,
            m.dtype,
            m.attn_implementation,
            self.spec.run.device_map,
            self.fingerprints.get("model"),
            self.fingerprints.get("tokenizer"),
            self.fingerprints.get("model_config"),
            self.fingerprints.get("code"),
            m.matmul_precision,
            self.revision,
        )

    def products(self) -> Products:
        """How the run's Hessian-vector products are taken (``--hvp``, ``--fd_richardson``, ``--fd_step``)."""
        c = self.spec.compute
        step = self.fd_step if c.fd_step == "auto" else c.fd_step
        if step == "auto":
            raise RuntimeError(
                "--fd_step auto: the step is chosen by lib.products.audit.prepare first"
            )
        return products_for(c.hvp, FDSettings(c.fd_richardson, step))

    def run_settings(self, checkpoint_path: Path, desc: str) -> parallel.RunSettings:
        """:class:`lib.runtime.parallel.RunSettings` from the run flags, checkpointing to ``checkpoint_path``
        (recorded in :attr:`settings`)."""
        r = self.spec.run
        every_units, every_s = ckpt.parse_every(r.checkpoint_every)
        cfg = ckpt.CheckpointConfig(
            Path(checkpoint_path), every_units, every_s, resume=r.resume, keep=r.keep_checkpoint
        )
        settings = parallel.RunSettings(
            devices=self.devices,
            checkpoint=cfg,
            progress=not self.spec.output.no_progress,
            desc=desc,
            unit_timeout=r.unit_timeout,
            setup_timeout=r.setup_timeout,
            identity=self.identity(),
        )
        self.settings.append(settings)
        self.kept.append(cfg)
        return settings

    def check_resources(
        self, est: preflight.Estimate, alternatives: str, always_writes: bool = False
    ) -> None:
        """Refuse before the computation when ``est`` does not fit in free host / GPU memory or disk
        (:func:`lib.app.preflight.check`); the disk is checked when checkpoints are on, or ``always_writes`` (files
        written whatever ``--checkpoint_every`` says, e.g. the spectrum's pass log)."""
        if self.rank0:
            writes = always_writes or any(ckpt.parse_every(self.spec.run.checkpoint_every))
            preflight.check(est, self.devices, self.spec.output.output_dir, writes, alternatives)


# ----------------------------------------------------------------------------- check


def check_cache_dir(cache_dir: str | None) -> None:
    """Refuse a ``--cache_dir`` that is not a writable directory (created if missing)."""
    if not cache_dir:
        return
    path = Path(cache_dir)
    if path.exists() and not path.is_dir():
        raise UserError(f"--cache_dir {cache_dir} is a file, not a directory")
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"cannot create --cache_dir {cache_dir}: {e.strerror or e}") from None
    if not os.access(path, os.W_OK | os.X_OK):
        raise UserError(f"--cache_dir {cache_dir} is not writable")


def _device(text: str, flag: str) -> torch.device:
    try:
        return resolve_device(text)
    except ParamError as e:
        raise UserError(flag_message(e, {"device": flag})) from None


def run_devices(spec: RunSpec) -> list[torch.device]:
    """The run's devices, one per worker process (``--devices``, else ``--device``); under torchrun,
    this rank's device."""
    text = spec.run.devices
    entries = [d.strip() for d in text.split(",")] if text is not None else None
    if entries is not None and not all(entries):
        raise UserError(
            f"--devices {text!r} has an empty entry; give e.g. cuda:0,cuda:1 or cpu,cpu"
        )
    local = parallel.local_rank()
    if local is not None:  # under torchrun (one rank too): this rank's device
        if entries:
            if local >= len(entries):
                raise UserError(
                    f"--devices lists {len(entries)} devices but this node runs local rank {local}: "
                    f"give one per local rank"
                )
            return [_device(entries[local], "--devices entry")]
        dev = _device(spec.run.device, "--device")
        if dev.type != "cuda" or dev.index is not None:
            return [dev]
        if local >= torch.cuda.device_count():
            raise UserError(
                f"torchrun local rank {local} runs on cuda:{local}, but this machine has "
                f"{torch.cuda.device_count()} CUDA device(s): launch at most one rank per GPU "
                "(--nproc_per_node; NCCL refuses two ranks on one GPU), or --device cpu for gloo ranks"
            )
        return [torch.device("cuda", local)]
    devices = (
        [_device(e, "--devices entry") for e in entries]
        if entries
        else [_device(spec.run.device, "--device")]
    )
    if len(devices) > 1 and spec.run.device_map is not None:
        raise UserError(
            "--device_map splits one model over the GPUs of a single worker; it cannot be combined "
            "with several --devices (use torchrun with one rank per node instead)"
        )
    return devices


def check_environment(spec: RunSpec) -> list[torch.device]:
    """What the flags need from this machine: a writable cache directory, the devices, a valid checkpoint
    interval, accelerate for ``--device_map``. Returns the run's devices."""
    check_cache_dir(spec.model.cache_dir)
    devices = run_devices(spec)
    ckpt.parse_every(spec.run.checkpoint_every)
    if spec.run.device_map is not None and importlib.util.find_spec("accelerate") is None:
        raise UserError(
            f"--device_map {spec.run.device_map} needs the accelerate package: pip install accelerate"
        )
    if spec.run.device_map is not None:
        parse_device_map(
            spec.run.device_map
        )  # a malformed JSON map: one line before anything loads
    return devices


def warn_low_precision(dtype: str) -> None:
    """One line when the model runs in a 16-bit dtype (its Hessians are far less accurate)."""
    if dtype in LOW_PRECISION_NOTE:
        warn(f"--dtype {dtype}: {LOW_PRECISION_NOTE[dtype]}")


# ----------------------------------------------------------------------------- inspect and load


def _load_weights(spec: RunSpec, device: torch.device, revision: str | None = None) -> nn.Module:
    m = spec.model
    return load_model(
        m.model,
        cache_dir=m.cache_dir,
        dtype=getattr(torch, m.dtype),
        device=device,
        attn_implementation=m.attn_implementation,
        device_map=spec.run.device_map,
        revision=revision,
    )


@dataclass
class Inspected:
    """What :func:`inspect` found: the spec with every default fixed, the samples, and the module tree."""

    spec: RunSpec
    samples: torch.Tensor
    tokenizer_fingerprint: str
    dataset_sha256: str
    model: nn.Module
    """The meta-device skeleton, or the loaded model when no skeleton could be built."""
    loaded: bool
    revision: str | None = None
    """The hub revision of ``--model`` read (:meth:`Family.load_revision`)."""


def inspect(spec: RunSpec, family: Family, device: torch.device) -> Inspected:
    """Every check that needs only the config, the tokenizer and the text, before a weight is read."""
    m = spec.model
    rev = family.load_revision(spec)
    model = model_skeleton(
        m.model, m.cache_dir, getattr(torch, m.dtype), m.attn_implementation, rev
    )
    loaded = model is None
    if loaded:  # an architecture that cannot be built on the meta device: check on the real model
        model = _load_weights(spec, device, rev)
    spec = family.resolve(spec, model)
    family.structure(model, spec)
    limit = max_positions(model)
    if spec.data.seqlen is None:
        spec = spec.replace(seqlen=min(PAPER_SEQLEN, limit or PAPER_SEQLEN))
    check_seqlen(spec.data.seqlen, limit)
    tokenizer = load_tokenizer(m.model, m.cache_dir, rev)
    text = load_text(spec.data.dataset, m.cache_dir)
    tokens = tokenize(tokenizer, text, m.cache_dir)
    if not tokens.numel():
        raise UserError(f"the text of --dataset {spec.data.dataset} gives no tokens")
    d = spec.data
    if d.b is None:
        bs = 1 if d.model_input_bs == "auto" else d.model_input_bs
        spec = spec.replace(b=(tokens.numel() // d.seqlen) // bs * bs)
        spec.validate()
    samples = make_samples(tokens, spec.data.seqlen, spec.data.b)
    check_token_ids(samples, model, m.model)
    return Inspected(
        spec, samples, tokenizer_fingerprint(tokenizer), text_sha256(text), model, loaded, rev
    )


def load(
    spec: RunSpec, family: Family, name: str, devices: list[torch.device], t_start: float
) -> Run:
    """Inspect, then load the weights (once, on the single device, or on the CPU when workers load their own)."""
    torch.manual_seed(spec.get("seed"))
    fsdp = "fsdp" in spec.field_names() and spec.get("fsdp")
    device = (
        devices[0] if len(devices) == 1 and not fsdp else torch.device("cpu")
    )  # FSDP shards it from the host
    found = inspect(spec, family, device)
    before = {
        "model config": config_fingerprint(found.model),
        "tokenizer": found.tokenizer_fingerprint,
        "dataset text": found.dataset_sha256,
        "code": code_path(found.model),
    }
    ranks.agree(ranks.identity(found.spec, before), devices[0])  # torchrun: before a weight loads
    model = found.model if found.loaded else _load_weights(found.spec, device, found.revision)
    structure = family.structure(model, found.spec)
    offloaded = offloaded_parameters(model, family.param_names(structure))
    if offloaded:
        raise UserError(
            f"--device_map offloads {offloaded[0]} to disk (loaded only inside the forward, so it cannot be "
            f"differentiated): place the layers of the subset on a device (cpu or cuda) and offload others"
        )
    d = found.spec.data
    bs, why = samples_per_forward(
        d.model_input_bs,
        model,
        d.b,
        d.seqlen,
        family.products_per_sample(found.spec, structure),
        device,
        per_sample_units=family.per_sample_units(found.spec),
    )
    choice = {"requested": d.model_input_bs, "chosen": bs, "why": why}
    spec = found.spec.replace(model_input_bs=bs)
    fingerprints = {
        "model": model_fingerprint(model),
        "model_config": config_fingerprint(model),
        "code": code_path(model),
        "tokenizer": found.tokenizer_fingerprint,
    }
    ranks.agree({"model weights": fingerprints["model"]}, devices[0])
    return Run(
        spec,
        name,
        model,
        found.samples,
        device,
        devices,
        fingerprints,
        structure,
        t_start,
        family.identity_sections,
        dataset_sha256=found.dataset_sha256,
        model_input_bs_choice=choice,
        revision=found.revision,
    )


# ----------------------------------------------------------------------------- the pipeline


def written_files(meta: dict[str, Any]) -> list[str]:
    """Every file of ``meta`` (the .pt and .json, the figures, the side files), in that order."""
    compare = meta.get("comparison_details", {})
    return [
        *meta["files"].values(),
        *meta.get("table_files", []),
        *meta.get("figures", []),
        *meta.get("batch_study_files", []),
        *meta.get("side_files", []),
        *([compare["file"]] if "file" in compare else []),
        *compare.get("figures", []),
    ]


def finished_result(js: Path, spec: RunSpec, revision: str | None = None) -> dict[str, Any]:
    """``--skip_existing``: the metadata of the finished result ``js`` after checking that it holds this
    configuration (its ``spec_digest``) and that its files match their recorded SHA-256 (the config read at hub
    ``revision``, :meth:`Family.load_revision`); one line on stdout."""
    meta = verify_result(js)
    if meta.get("spec_digest") != spec.digest():
        raise UserError(
            f"{js} holds the result of another configuration (or of an older version): --skip_existing keeps only "
            f"a result of the same configuration; choose another --name, or pass --overwrite to replace it"
        )
    changed, unchecked = changed_inputs(meta, spec, revision)
    if changed:
        raise UserError(
            f"{js} was computed on other inputs: {changed}; --skip_existing keeps only a result of the same inputs; "
            "pass --overwrite to recompute it"
        )
    note = f"; {' and '.join(unchecked)} could not be checked" if unchecked else ""
    print(
        f"skipped: {js} holds this configuration's finished result (its files match their SHA-256{note})",
        flush=True,
    )
    return meta


def changed_inputs(
    meta: dict[str, Any], spec: RunSpec, revision: str | None = None
) -> tuple[str | None, list[str]]:
    """``--skip_existing``: what of the text and the model's config differs from what the finished result ``meta``
    records (``None``: nothing), and what could not be checked. Reads the text and ``config.json`` (no weight):
    the text's SHA-256 and :func:`lib.model.inputs.config_fingerprint` of the config's meta-device skeleton."""
    m, unchecked = spec.model, []
    text_sha = meta.get("computed_on", {}).get("dataset_sha256")
    if text_sha:
        if text_sha256(load_text(spec.data.dataset, m.cache_dir)) != text_sha:
            return f"the text of --dataset {spec.data.dataset} changed (its SHA-256 differs)", []
    else:
        unchecked.append("the text")
    config = meta.get("fingerprints", {}).get("model_config")
    skeleton = model_skeleton(
        m.model, m.cache_dir, getattr(torch, m.dtype), m.attn_implementation, revision
    )
    if config and skeleton is not None:
        if config_fingerprint(skeleton) != config:
            return f"the config.json of --model {m.model} changed (its forward settings differ)", []
    else:
        unchecked.append("the model's config")
    return None, unchecked


@outputs.guarded
def execute(spec: RunSpec, family: Family) -> dict[str, Any]:
    """Run ``spec`` through the pipeline; returns the saved metadata (``{}`` on torchrun ranks other than 0)."""
    precision = torch.get_float32_matmul_precision()
    try:
        return _execute(spec, family)
    except ParamError as e:
        raise UserError(flag_message(e)) from None
    finally:  # --matmul_precision is per run, not for the rest of the process (tests, the library)
        torch.set_float32_matmul_precision(precision)


def _execute(spec: RunSpec, family: Family) -> dict[str, Any]:
    t_start = time.perf_counter()
    spec.validate()
    devices = check_environment(spec)
    name = spec.output.name or family.default_name(spec)
    out = Path(spec.output.output_dir)
    if spec.output.skip_existing and (out / f"{name}.json").exists():
        return finished_result(out / f"{name}.json", spec, family.load_revision(spec))
    outputs.claim(
        out,
        name,
        family.checkpoints(spec, out, name),
        spec.output.overwrite,
        spec.run.resume,
        rank0=parallel.distributed_env() is None or parallel.distributed_env()[0] == 0,
        files=family.files(spec, name),
    )
    warn_low_precision(spec.model.dtype)
    torch.set_float32_matmul_precision(spec.model.matmul_precision)  # workers: ModelSpec.load
    threads.apply(spec.run.threads, threads.local_processes(len(devices)), say=True)
    run = load(spec, family, name, devices, t_start)
    run.audit_plan = audit.prepare(run)  # --fd_step auto: the step, before the computation
    t_compute = time.perf_counter()
    result = family.compute(run)
    if result is None:  # torchrun rank > 0: rank 0 saves
        return {}
    compute_s = time.perf_counter() - t_compute
    run.audit = audit.audit_run(
        run, run.audit_plan, result
    )  # rank 0: the float64 audit (lib.products.audit)
    outputs.saving_results(run.kept)
    tensor, fields = family.save(run, result)
    fields = {**fields, **audit.json_fields(run, fields, compute_s)}
    meta = {
        "script": run.spec.script,
        "spec_digest": spec.digest(),
        "computed_on": run.computed_on(),
        "config": run.config(),
        "model_input_bs_choice": run.model_input_bs_choice,
        "threads": threads.report(),
        **fields,
        "fingerprints": run.fingerprints,
        "elapsed_s": time.perf_counter() - t_start,
    }
    meta = save_tensor_and_json(out, name, tensor, meta)
    family.finish(run, meta)
    print(f"computed on {run.where}", flush=True)
    for line in [*family.report(run, meta), *audit.report_lines(run)]:
        print(line)
    print("wrote " + ", ".join(str(out / f) for f in written_files(meta)), flush=True)
    return meta
