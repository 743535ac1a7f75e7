"""Shared command-line flags, validation and the run/save pipeline used by the top-level scripts."""

from __future__ import annotations

import argparse
import importlib.util
import os
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from . import batch_study
from . import checkpoint as ckpt
from . import curvature, diagonality, finite_difference, outputs, parallel, preflight
from .data import default_dataset, load_text, load_tokenizer, make_samples, tokenize, check_seqlen
from .errors import Interrupted, RunError, UserError
from .hessian import METHODS, ExactHessianJob
from .inputs import model_fingerprint, tokenizer_fingerprint, warn
from .models import EMBEDDED, ModelSpec, load_model, max_positions, offloaded_parameters, resolve_device
from .plots import heatmap, slice_label
from .results import save_tensor_and_json
from .subsets import Subset

DTYPES = {"float32": torch.float32, "float64": torch.float64, "bfloat16": torch.bfloat16, "float16": torch.float16}

LOW_PRECISION_NOTE = {
    "bfloat16": "Hessians computed in bfloat16 carry about 2% relative error (1.3-2.1% in Frobenius norm against float64 on the embedded model, benchmarks/low_precision.py); use --dtype float32 (about 6e-7) for exact values",
    "float16": "Hessians computed in float16 carry about 0.3% relative error (0.23-0.29% in Frobenius norm against float64 on the embedded model, benchmarks/low_precision.py) and can overflow on large models; use --dtype float32 (about 6e-7) for exact values",
}
"""The one-line warning for a 16-bit ``--dtype``, with the measured error of the exact Hessian."""
SEED_RANGE = (-(2**63), 2**64 - 1)
"""Seeds ``torch.manual_seed`` accepts."""

EMBEDDED_DEFAULTS = {"seqlen": 128, "b": 16}
"""Sized so that each script's default run takes under a minute of compute on one CPU core with the embedded model."""
PAPER_DEFAULTS = {"seqlen": 2048, "b": None}
"""The paper: seqlen 2048 and all samples of the WikiText-2 test split (``b=None``)."""


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Appends ``(default: X)`` only where the help text does not already say the default and X is informative."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if "default" in text or action.default is None or action.default is False:
            return text
        return super()._get_help_string(action)


class Parser(argparse.ArgumentParser):
    """An argument parser whose errors (unknown or misspelt flag, bad value) are one line ``error: ...`` and
    exit status 2, like every other bad input, instead of the full usage block."""

    def error(self, message: str):  # type: ignore[override]
        self.exit(2, f"error: {message} (see {self.prog} --help)\n")


def base_parser(description: str, t_default: tuple[int, int] | None, compare: bool = True) -> argparse.ArgumentParser:
    """Flags shared by all scripts. ``t_default``: (embedded model, paper models); ``None``: no exact-Hessian
    flags (``--t``, ``--method``, ``--chunk``), for scripts they do not apply to; ``compare``: the
    ``--compare`` flags (exact scripts)."""
    p = Parser(description=description, formatter_class=HelpFormatter, allow_abbrev=False)  # --t must not mean --track_rows
    g = p.add_argument_group("model and data")
    g.add_argument("--model", default=EMBEDDED, help="HF model id or local directory; 'embedded' = the bundled tiny trained OPT")
    g.add_argument("--cache_dir", default="llm_weights", help="where HF weights, datasets and tokenized text are cached")
    g.add_argument("--dataset", default="auto", help="'embedded' (bundled held-out Shakespeare), 'wikitext2' (test split), or a path to a UTF-8 text file; auto = embedded for the embedded model, else wikitext2")
    g.add_argument("--seqlen", type=int, default=None, help=f"tokens per sample (default {EMBEDDED_DEFAULTS['seqlen']} for the embedded model, else min(2048, model limit))")
    g.add_argument("--b", type=int, default=None, help=f"number of samples (default {EMBEDDED_DEFAULTS['b']} for the embedded model, else all samples of the text)")
    g.add_argument("--model_input_bs", type=int, default=1, help="samples per forward/backward; must divide --b")
    g.add_argument("--seed", type=int, default=0, help="random seed")
    c = p.add_argument_group("computation")
    if t_default is not None:
        g.add_argument("--t", type=int, default=None, help=f"entries per selected row (default {t_default[0]} for the embedded model, {t_default[1]} otherwise)")
        c.add_argument("--method", choices=METHODS, default="rev-rev", help="rev-rev: fast exact (default); autograd: the paper's torch.autograd.functional.hessian")
        c.add_argument("--chunk", type=int, default=0, help="Hessian columns per batched backward; 0 = auto: the fastest of 1, 2, 4, ... timed on the first batch's first columns (recorded in the JSON); halved on CUDA OOM")
    c.add_argument("--dtype", choices=sorted(DTYPES), default="float32", help="model dtype; float64 (validation) computes every step in float64 for OPT, GPT-2, Llama, Qwen2, Mistral")
    c.add_argument("--device", default="auto", help="cpu, cuda, cuda:1, ... (auto = cuda if available else cpu)")
    c.add_argument("--attn_implementation", default="eager", help="eager (default) or sdpa (run with its math kernel); flash attention has no double backward")
    c.add_argument("--no_fused_head", action="store_true", help="differentiate the LM head + softmax with plain autograd instead of the fused kernel")
    o = p.add_argument_group("output")
    o.add_argument("--output_dir", default="results", help="where <name>.pt, <name>.json and the figures go")
    o.add_argument("--name", default=None, help="output file stem (default: derived from the configuration)")
    o.add_argument("--overwrite", action="store_true", help="replace a finished result of the same --name (refused otherwise)")
    o.add_argument("--no_progress", action="store_true", help="hide the progress bar")
    add_run_flags(p)
    finite_difference.add_flags(p)
    if compare:
        curvature.add_flags(p)
    return p


def add_run_flags(p: argparse.ArgumentParser) -> None:
    """Flags for data-parallel runs and checkpoints (see :mod:`lib.parallel`, :mod:`lib.checkpoint`)."""
    r = p.add_argument_group("parallel runs and checkpoints")
    r.add_argument("--devices", default=None, help="comma-separated devices, one worker process per entry, e.g. cuda:0,cuda:1,cuda:2,cuda:3 (cpu,cpu for tests); overrides --device; under torchrun, entry LOCAL_RANK is the rank's device")
    r.add_argument("--device_map", default=None, help="split one model over the GPUs of its worker with this Hugging Face device_map: a strategy (e.g. auto) or a JSON object {module: device or \"disk\"} (disk: offloaded by accelerate to <cache_dir>/offload/, the subset must not be there); exact HVPs, one GPU at a time; needs accelerate; one worker (or one torchrun rank per node)")
    r.add_argument("--checkpoint_every", default=ckpt.DEFAULT_EVERY, help="write <output_dir>/<name>.ckpt every N units (batches of --model_input_bs samples), or every DURATION such as 120s, 10m; 0 = never")
    r.add_argument("--resume", action="store_true", help="continue from the checkpoint <output_dir>/<name>.ckpt (hessian_diagonal.py: also <name>.phase2.ckpt; hessian_spectrum.py: the pass log <name>.passes/), recomputing nothing finished (the configuration must be the same); starts afresh if there is none")
    r.add_argument("--keep_checkpoint", action="store_true", help="keep the checkpoint when the run completes (it is removed by default)")
    r.add_argument("--unit_timeout", type=float, default=0.0, help="with --devices: stop the run when one unit runs longer than this many seconds (a hung worker); default 0 = auto: 10x the median unit time and at least 5 minutes")


def resolve_defaults(args: argparse.Namespace, t_default: tuple[int, int] | None) -> None:
    """Fill model-dependent defaults in place (``seqlen``, ``b`` resolved later from the text, ``t``, ``dataset``)."""
    embedded = args.model == EMBEDDED
    if t_default is not None and args.t is None:
        args.t = t_default[0] if embedded else t_default[1]
    if args.dataset == "auto":
        args.dataset = default_dataset(args.model)
    if args.seqlen is None and embedded:
        args.seqlen = EMBEDDED_DEFAULTS["seqlen"]
    if args.b is None and embedded:
        args.b = EMBEDDED_DEFAULTS["b"]


def check_cheap(args: argparse.Namespace) -> None:
    """Validate flags that need neither the model nor the data."""
    if args.model_input_bs < 1:
        raise UserError(f"--model_input_bs must be at least 1, got {args.model_input_bs}")
    if args.b is not None and args.b % args.model_input_bs:
        raise UserError(f"--model_input_bs {args.model_input_bs} does not divide --b {args.b}")
    if getattr(args, "chunk", 0) < 0:
        raise UserError(f"--chunk must be >= 0, got {args.chunk}")
    if hasattr(args, "fisher_samples"):
        curvature.check_flags(args)
    if hasattr(args, "hvp"):
        finite_difference.check_flags(args, DTYPES[args.dtype])
    for flag in ("num_blocks", "num_layers"):
        value = getattr(args, flag, None)
        if value is not None and value < 1:
            raise UserError(f"--{flag} must be at least 1, got {value} (leave it out to use all)")
    if not SEED_RANGE[0] <= args.seed <= SEED_RANGE[1]:
        raise UserError(f"--seed {args.seed} is out of range: use an integer from -2**63 to 2**64-1")
    check_cache_dir(args.cache_dir)
    run_devices(args)
    ckpt.parse_every(getattr(args, "checkpoint_every", "0"))
    if getattr(args, "device_map", None) is not None and importlib.util.find_spec("accelerate") is None:
        raise UserError(f"--device_map {args.device_map} needs the accelerate package: pip install accelerate")
    if getattr(args, "unit_timeout", 0) < 0:
        raise UserError(f"--unit_timeout must be >= 0 seconds, got {args.unit_timeout}")


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


def warn_low_precision(dtype: str) -> None:
    """One line when the model runs in a 16-bit dtype (its Hessians are far less accurate)."""
    if dtype in LOW_PRECISION_NOTE:
        warn(f"--dtype {dtype}: {LOW_PRECISION_NOTE[dtype]}")


def run_devices(args: argparse.Namespace) -> list[torch.device]:
    """The run's devices, one per worker process (``--devices``, else ``--device``); under torchrun, this rank's device."""
    text = getattr(args, "devices", None)
    entries = [d.strip() for d in text.split(",")] if text is not None else None
    if entries is not None and not all(entries):
        raise UserError(f"--devices {text!r} has an empty entry; give e.g. cuda:0,cuda:1 or cpu,cpu")
    dist_env = parallel.distributed_env()
    if dist_env is not None:
        local = dist_env[1]
        if entries:
            if local >= len(entries):
                raise UserError(f"--devices lists {len(entries)} devices but this node runs local rank {local}: give one per local rank")
            return [resolve_device(entries[local], "--devices")]
        dev = resolve_device(args.device)
        return [torch.device("cuda", local) if dev.type == "cuda" and dev.index is None else dev]
    devices = [resolve_device(e, "--devices") for e in entries] if entries else [resolve_device(args.device)]
    if len(devices) > 1 and getattr(args, "device_map", None) is not None:
        raise UserError("--device_map splits one model over the GPUs of a single worker; it cannot be combined with several --devices (use torchrun with one rank per node instead)")
    return devices


def model_spec(args: argparse.Namespace, prep: Prepared) -> ModelSpec:
    """How worker processes load the model of this run (and check that it is the parent's, by fingerprint)."""
    return ModelSpec(args.model, args.cache_dir, args.dtype, args.attn_implementation, getattr(args, "device_map", None), prep.fingerprints.get("model"), prep.fingerprints.get("tokenizer"))


def run_settings(args: argparse.Namespace, prep: Prepared, checkpoint_path: str | Path, desc: str) -> parallel.RunSettings:
    """:class:`lib.parallel.RunSettings` from the run flags, checkpointing to ``checkpoint_path``."""
    every_units, every_s = ckpt.parse_every(args.checkpoint_every)
    cfg = ckpt.CheckpointConfig(Path(checkpoint_path), every_units, every_s, resume=args.resume, keep=args.keep_checkpoint)
    return parallel.RunSettings(devices=prep.devices or [prep.device], checkpoint=cfg, progress=not args.no_progress, desc=desc, unit_timeout=args.unit_timeout)


@dataclass
class Prepared:
    """A loaded model, its samples (``(b, seqlen)``) and the resolved flags."""

    model: nn.Module
    samples: torch.Tensor
    device: torch.device
    """Where ``model`` is (the CPU when several worker processes load their own copies)."""
    devices: list[torch.device] | None = None
    """The run's devices, one per worker (:func:`run_devices`)."""
    fingerprints: dict[str, str] = field(default_factory=dict)
    """Content fingerprints of the ``model`` and ``tokenizer`` (:mod:`lib.inputs`), checked by workers and ``--resume``."""


def prepare(args: argparse.Namespace, build_subset: Callable[[nn.Module], Subset]) -> tuple[Prepared, Subset]:
    """Load the model, build and validate the subset, load and validate the samples -- all before heavy work.

    The caller has run :func:`check_cheap` (before claiming the outputs, so before the model is loaded)."""
    warn_low_precision(args.dtype)
    torch.manual_seed(args.seed)
    devices = run_devices(args)
    device = devices[0] if len(devices) == 1 and not getattr(args, "fsdp", False) else torch.device("cpu")  # FSDP shards it from the host
    model = load_model(args.model, cache_dir=args.cache_dir, dtype=DTYPES[args.dtype], device=device, attn_implementation=args.attn_implementation, device_map=getattr(args, "device_map", None))
    subset = build_subset(model)
    offloaded = offloaded_parameters(model, subset.param_names)
    if offloaded:
        raise UserError(f"--device_map offloads {offloaded[0]} to disk (loaded only inside the forward, so it cannot be differentiated): place the layers of the subset on a device (cpu or cuda) and offload others")
    limit = max_positions(model)
    if args.seqlen is None:
        args.seqlen = min(2048, limit or 2048)
    check_seqlen(args.seqlen, limit)
    tokenizer = load_tokenizer(args.model, args.cache_dir)
    fingerprints = {"model": model_fingerprint(model), "tokenizer": tokenizer_fingerprint(tokenizer)}
    tokens = tokenize(tokenizer, load_text(args.dataset, args.cache_dir), args.cache_dir)
    if not tokens.numel():
        raise UserError(f"the text of --dataset {args.dataset} gives no tokens")
    if args.b is None:
        args.b = (tokens.numel() // args.seqlen) // args.model_input_bs * args.model_input_bs
        check_cheap(args)
    samples = make_samples(tokens, args.seqlen, args.b)
    return Prepared(model, samples, device, devices, fingerprints), subset


def default_name(script: str, args: argparse.Namespace, tag: str) -> str:
    """Readable stem plus a hash of the result-defining flags (the exact Hessian uses no random numbers: not ``seed``)."""
    model = Path(args.model.rstrip("/")).name
    return outputs.default_name(f"{script}_{model}_{tag}_t{args.t}_b{args.b}_s{args.seqlen}", args, ignore=("seed",))


def claim_outputs(args: argparse.Namespace, name: str, checkpoints: list[Path]) -> None:
    """Check and lock the run's outputs before the model is loaded (:func:`lib.outputs.claim`; released by :func:`lib.outputs.guarded`)."""
    env = parallel.distributed_env()
    outputs.claim(args.output_dir, name, checkpoints, args.overwrite, args.resume, rank0=env is None or env[0] == 0)


def check_resources(args: argparse.Namespace, prep: Prepared, est: preflight.Estimate, alternatives: str) -> None:
    """Refuse before the computation when ``est`` does not fit in free host / GPU memory or disk (:func:`lib.preflight.check`)."""
    env = parallel.distributed_env()
    if env is None or env[0] == 0:
        writes = any(ckpt.parse_every(args.checkpoint_every))
        preflight.check(est, prep.devices or [prep.device], args.output_dir, writes, alternatives)


def slice_boundaries(subset: Subset) -> list[int]:
    """Flat offsets where each slice after the first starts."""
    out, pos = [], 0
    for s in subset.slices[:-1]:
        pos += len(s)
        out.append(pos)
    return out


@outputs.guarded
def run_exact(script: str, args: argparse.Namespace, build_subset: Callable[[nn.Module], Subset], tag: Callable[[], str]) -> dict[str, Any]:
    """The whole exact-Hessian job of a script: prepare, compute (in this process, on worker processes
    or under torchrun, with checkpoints), save ``.pt`` / ``.json`` / figures.

    ``tag()`` names the subset in the default output name (from the flags; called before the model is loaded).
    Returns the saved metadata (``{}`` on torchrun ranks other than 0, which save nothing).
    """
    t_start = time.perf_counter()
    check_cheap(args)
    name = args.name or default_name(script, args, tag())
    out = Path(args.output_dir)
    claim_outputs(args, name, [out / f"{name}.ckpt"])
    prep, subset = prepare(args, build_subset)
    check_resources(args, prep, preflight.exact_estimate(subset.size, DTYPES[args.dtype].itemsize), "a smaller --t (or fewer blocks or layers), or --checkpoint_every 0 (no checkpoint file)")
    job = ExactHessianJob(
        subset,
        prep.samples,
        model_input_bs=args.model_input_bs,
        method=args.method,
        chunk=args.chunk or None,
        fused_head=False if args.no_fused_head else None,
        spec=model_spec(args, prep),
        model=prep.model,
        fd=finite_difference.settings_from(args),
    )
    if getattr(args, "compare", None):
        job = curvature.make_job(args, job)
    settings = run_settings(args, prep, out / f"{name}.ckpt", "Hessian columns")
    settings.snapshot_units = tuple(batch_study.snapshot_units(args.b, args.model_input_bs)) if getattr(args, "batch_study", False) else ()
    t0 = time.perf_counter()
    sums = parallel.run_job(job, settings)
    if sums is None:
        return {}
    result = job.result(sums, time.perf_counter() - t0)
    outputs.saving_results([settings.checkpoint])
    where = f"{args.model}, b={args.b}, seqlen={args.seqlen}"
    what = "|H|" if job.fd is None else "approximate |H| (finite-difference HVPs)"
    figures = heatmap(result.hessian, out / name, f"{what}: {subset.description}\n{where}", slice_boundaries(subset), slice_labels=[slice_label(s.param_name) for s in subset.slices])
    diag, diag_figures = diagonality.report(result.hessian, subset.slices, out / name, f"{subset.description}; {where}")
    study = batch_study.finish(settings.snapshots, args.model_input_bs, args.seqlen, out, name, f"{subset.description}; {where}", result.hessian.dtype) if settings.snapshot_units else {}
    meta = {
        "script": script,
        "config": vars(args),
        "subset": subset.description,
        "shape": list(result.hessian.shape),
        "normalization": f"Hessian of the mean next-token NLL over b*(seqlen-1) = {result.n_tokens} predicted tokens (the additive summed-NLL Hessian divided by {result.n_tokens})",
        "n_samples": result.n_samples,
        "n_tokens": result.n_tokens,
        "nll_mean": result.nll_sum / result.n_tokens,
        "perplexity": result.perplexity,
        "method": result.method,
        "hvp": {"hvp": "exact"} if job.fd is None else finite_difference.exact_script_report(job.fd, result.hessian_sum, sums),
        "chunk": job.chunk_report(),
        "hessian_elapsed_s": result.elapsed_s,
        "elapsed_s": time.perf_counter() - t_start,
        "fingerprints": prep.fingerprints,
        "run": {"devices": [str(d) for d in settings.devices], **settings.stats},
        "figures": [p.name for p in [*figures, *diag_figures]],
        "diagonality": diag,
        **({"batch_study": study["batch_study"], "batch_study_files": study["files"]} if study else {}),
        "entries": subset.entries(prep.model),
    }
    if getattr(args, "compare", None):
        meta.update(curvature.write_comparison(out, name, job, sums, result, f"{subset.description}\n{where}", args.compare_top_k))
    meta = save_tensor_and_json(out, name, result.hessian, meta)
    ckpt.finish(settings.checkpoint)
    print(f"perplexity {result.perplexity:.3f} over {result.n_samples} samples; Hessian {tuple(result.hessian.shape)} in {result.elapsed_s:.1f}s")
    print("wrote " + ", ".join(str(out / f) for f in [*meta["files"].values(), *meta["figures"], *meta.get("batch_study_files", [])]))
    if study:
        print(batch_study.summary_line(study["batch_study"]))
    print(diagonality.one_line(diag))
    return meta


def main(fn: Callable[[list[str] | None], Any], argv: list[str] | None = None) -> Any:
    """Run a script's ``fn(argv)``, turning :class:`UserError` into one line on stderr and exit status 2
    (:class:`RunError`, a run stopped while computing: exit status 1; SIGINT / SIGTERM: 130 / 143, one line, no traceback)."""
    import signal

    def terminate(signum, frame):  # noqa: ARG001 -- SIGTERM before or after the computation (lib.parallel handles it during)
        raise Interrupted(signum)

    old = signal.signal(signal.SIGTERM, terminate) if threading.current_thread() is threading.main_thread() else None
    try:
        return fn(argv)
    except (Interrupted, KeyboardInterrupt) as e:
        e = e if isinstance(e, Interrupted) else Interrupted(signal.SIGINT)
        print(f"error: {e.message}", file=sys.stderr)
        raise SystemExit(e.code) from None
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2) from None
    except RunError as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(1) from None
    finally:
        if old is not None:
            signal.signal(signal.SIGTERM, old)
