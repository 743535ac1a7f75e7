"""The ``hessian_diagonal.py`` pipeline: flags, validation before heavy work, the run (phases of
:mod:`lib.diagonal` through :func:`lib.parallel.run_job`, so ``--devices``/``--resume`` apply), and the
outputs (``.pt``, ``.json``, heatmap, convergence figure)."""

from __future__ import annotations

import argparse
import math
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

from . import checkpoint as ckpt
from . import cli, finite_difference, outputs, parallel, preflight
from .diagonal import ESTIMATORS, EXACT_MAX_ENTRIES, DiagonalJob, DiagonalResult, Target, hessian_diagonal, plan_phase1, rel_l2
from .errors import UserError
from .models import iter_named_linear
from .plots import convergence, heatmap, heatmap_grid
from .results import save_tensor_and_json
from .subsets import layer_module, num_blocks, num_output_units, output_units_index, whole_parameter

VHP_DEFAULT = 100
"""HVPs per sample and weight (the default ``--vhp_samples``)."""


DEFAULT_LAYER = "self_attn.q_proj"


def build_parser(description: str) -> argparse.ArgumentParser:
    p = cli.base_parser(description, None, compare=False)  # --t, --method, --chunk and --compare do not apply to whole weights
    d = p.add_argument_group("Hessian diagonal")
    d.add_argument("--layer_name", default=None, help=f"linear layer inside a block, e.g. self_attn.q_proj (OPT/Llama), attn.c_attn (GPT-2) (default {DEFAULT_LAYER}; not with --all_layers)")
    d.add_argument("--block_index", type=int, default=None, help="which block (default 0; with --all_layers: every block unless given)")
    d.add_argument("--all_layers", action="store_true", help="every linear layer of every block (or of --block_index), in one run that loads the model and data once")
    d.add_argument("--estimator", nargs="+", choices=ESTIMATORS, default=None, help="one or more of: xdiag (variance-reduced, unbiased), hutchinson (Rademacher, unbiased), fisher (empirical Fisher diagonal, a baseline), ggn (Hutchinson on the Gauss-Newton matrix: K probes of one JVP + one VJP each, no second backward), exact (one HVP per entry; small layers); default xdiag, or hutchinson xdiag with --track_rows")
    d.add_argument("--vhp_samples", type=int, default=VHP_DEFAULT, help="K: Hessian-vector products per sample and weight for hutchinson (K probes) and xdiag (K/2 probes + K/2 basis vectors; K even)")
    d.add_argument("--track_rows", type=int, default=0, help="convergence study (paper Fig. 3): exact diagonal of the weights of the first R output units, and the estimators' error and consecutive difference after each probe")
    d.add_argument("--probe_batch", type=int, default=0, help="HVPs per batched backward; 0 = auto: the fastest of 1, 2, 4, ... timed on the first batch's first products (recorded in the JSON); halved on CUDA OOM")
    return p


def resolve_estimators(args: argparse.Namespace) -> list[str]:
    if args.estimator is None:
        return ["hutchinson", "xdiag"] if args.track_rows else ["xdiag"]
    return list(dict.fromkeys(args.estimator))


def check_flags(args: argparse.Namespace) -> None:
    """Validate the diagonal's own flags (no model needed)."""
    k = args.vhp_samples
    est = args.estimator
    if any(e in est for e in ("hutchinson", "xdiag", "ggn")) and k < 1:
        raise UserError(f"--vhp_samples must be at least 1, got {k}")
    if "xdiag" in est and (k < 2 or k % 2):
        raise UserError(f"--estimator xdiag uses K/2 probes and K/2 basis vectors: --vhp_samples must be even and at least 2, got {k}")
    if args.track_rows < 0:
        raise UserError(f"--track_rows must be >= 0, got {args.track_rows}")
    if args.layer_name is not None and args.all_layers:
        raise UserError(f"--layer_name {args.layer_name} picks one layer but --all_layers takes every linear layer: give one or the other")
    args.layer_name = args.layer_name or DEFAULT_LAYER  # after the check: default names (hashes) as before
    if args.track_rows and args.all_layers:
        raise UserError("--track_rows studies the convergence on one layer; it cannot be combined with --all_layers")
    if args.track_rows and not any(e in est for e in ("hutchinson", "xdiag")):
        raise UserError("--track_rows records the error after each probe: use it with --estimator hutchinson and/or xdiag")
    if args.probe_batch < 0:
        raise UserError(f"--probe_batch must be >= 0, got {args.probe_batch}")
    if args.block_index is not None and args.block_index < 0:
        raise UserError(f"--block_index {args.block_index} is out of range: it must be >= 0")


def build_targets(model: nn.Module, args: argparse.Namespace) -> list[tuple[Target, int, str]]:
    """``(target, block, layer name)`` for each weight to estimate, validated against the model and the estimators."""
    if args.all_layers:
        total = num_blocks(model)
        if args.block_index is not None and args.block_index >= total:
            raise UserError(f"--block_index {args.block_index} is out of range: the model has {total} blocks (0..{total - 1})")
        items = [(b, lname) for b, lname, _, _ in iter_named_linear(model) if args.block_index is None or b == args.block_index]
    else:
        items = [(0 if args.block_index is None else args.block_index, args.layer_name)]
    out = []
    for b, lname in items:
        name, module = layer_module(model, b, lname)
        shape = tuple(model.get_parameter(name).shape)
        numel = math.prod(shape)
        if "exact" in args.estimator and numel > EXACT_MAX_ENTRIES:
            raise UserError(f"--estimator exact needs one Hessian-vector product per entry and sample: {name} has {numel} entries, over the limit of {EXACT_MAX_ENTRIES}; use --estimator xdiag or hutchinson")
        if "xdiag" in args.estimator and args.vhp_samples // 2 > numel:
            raise UserError(f"--vhp_samples {args.vhp_samples} is more than twice the {numel} entries of {name}; use --estimator exact")
        tracked = torch.zeros(0, dtype=torch.long)
        if args.track_rows:
            units = num_output_units(module)
            if args.track_rows > units:
                raise UserError(f"--track_rows {args.track_rows} is larger than the {units} output units of {lname}")
            tracked = output_units_index(module, args.track_rows)
            if len(tracked) > EXACT_MAX_ENTRIES:
                raise UserError(f"--track_rows {args.track_rows} tracks {len(tracked)} entries exactly (one Hessian-vector product each per sample), over the limit of {EXACT_MAX_ENTRIES}")
        out.append((Target(name, shape, tracked), b, lname))
    return out


def default_name(args: argparse.Namespace, estimators: list[str]) -> str:
    model = Path(args.model.rstrip("/")).name
    if args.all_layers:
        tag = "all_layers" if args.block_index is None else f"all_layers_block{args.block_index}"
    else:
        tag = f"{args.layer_name}_block{args.block_index or 0}"
    k = "" if set(estimators) <= {"fisher", "exact"} else f"_K{args.vhp_samples}"
    track = f"_track{args.track_rows}" if args.track_rows else ""
    return outputs.default_name(f"hessian_diagonal_{model}_{tag}_{'+'.join(estimators)}{k}{track}_b{args.b}_s{args.seqlen}", args)


def _finite(x: Any) -> Any:
    """NaN/inf -> None, recursively (strict JSON)."""
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, dict):
        return {k: _finite(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_finite(v) for v in x]
    return x


class _Runner:
    """Runs each phase with :func:`lib.parallel.run_job` (devices, checkpoints); under torchrun, shares phase-1 sums with every rank."""

    def __init__(self, args: argparse.Namespace, prep: cli.Prepared, out: Path, name: str, two_phase: bool):
        self.args, self.prep, self.out, self.name, self.two_phase = args, prep, out, name, two_phase
        self.settings: list[parallel.RunSettings] = []
        self.keep = args.keep_checkpoint

    @staticmethod
    def checkpoint_path(out: Path, name: str, phase: str) -> Path:
        return out / (f"{name}.ckpt" if phase == "1" else f"{name}.phase{phase}.ckpt")

    def path(self, phase: str) -> Path:
        return self.checkpoint_path(self.out, self.name, phase)

    def __call__(self, job: DiagonalJob, phase: str) -> dict[str, torch.Tensor] | None:
        settings = cli.run_settings(self.args, self.prep, self.path(phase), f"HVPs, phase {phase}" if self.two_phase else "HVPs")
        if self.two_phase and phase == "1" and settings.checkpoint is not None:
            settings.checkpoint.keep = True  # until phase 2 is done, so that --resume never redoes phase 1
        self.settings.append(settings)
        sums = parallel.run_job(job, settings)
        if self.two_phase and phase == "1" and parallel.distributed_env() is not None:
            import torch.distributed as dist

            box = [sums]
            dist.broadcast_object_list(box, src=0)  # phase 2 needs every rank to know Q
            sums = box[0]
        return sums

    def finish(self) -> None:
        for s in self.settings:
            if s.checkpoint is not None:
                s.checkpoint.keep = self.keep
            ckpt.finish(s.checkpoint)


def _init_distributed(device: torch.device) -> bool:
    """Under torchrun, start the process group here (so it outlives phase 1); returns whether we did."""
    return parallel.distributed_env() is not None and parallel.init_process_group(device)


@outputs.guarded
def run(argv: list[str] | None = None, description: str = "") -> dict[str, Any]:
    """Parse, validate, compute and save; returns the saved metadata (``{}`` on torchrun ranks > 0)."""
    args = build_parser(description).parse_args(argv)
    cli.resolve_defaults(args, None)
    args.estimator = resolve_estimators(args)
    check_flags(args)
    cli.check_cheap(args)
    t_start = time.perf_counter()
    name = args.name or default_name(args, args.estimator)
    out = Path(args.output_dir)
    cli.claim_outputs(args, name, [_Runner.checkpoint_path(out, name, p) for p in "12"])
    found: list[tuple[Target, int, str]] = []

    def build(model: nn.Module):
        found.extend(build_targets(model, args))
        return whole_parameter(model, found[0][0].param_name)

    prep, _ = cli.prepare(args, build)
    targets = [t for t, _, _ in found]
    estimators = args.estimator
    est = preflight.diagonal_estimate(plan_phase1(targets, estimators, args.vhp_samples, args.seed), cli.DTYPES[args.dtype].itemsize, len(prep.devices or [1]))
    cli.check_resources(args, prep, est, "--estimator hutchinson (no stored vectors), fewer weights (one --layer_name, or --block_index with --all_layers), a smaller --vhp_samples, or --checkpoint_every 0 (no checkpoint files)")
    runner = _Runner(args, prep, out, name, two_phase="xdiag" in estimators)
    own_group = _init_distributed(prep.devices[0]) if prep.devices else False
    try:
        result = hessian_diagonal(
            prep.model,
            targets,
            prep.samples,
            estimators=estimators,
            vhp_samples=args.vhp_samples,
            seed=args.seed,
            model_input_bs=args.model_input_bs,
            probe_batch=args.probe_batch or None,
            fused_head=False if args.no_fused_head else None,
            spec=cli.model_spec(args, prep),
            runner=runner,
            fd=finite_difference.settings_from(args),
        )
    except ValueError as e:
        if "rank below" in str(e):
            raise UserError(str(e)) from None
        raise
    finally:
        if own_group:
            import torch.distributed as dist

            dist.destroy_process_group()
    if result is None:  # torchrun rank > 0
        return {}
    outputs.saving_results([s.checkpoint for s in runner.settings])
    meta = save(args, prep, found, result, name, out, t_start, runner)
    runner.finish()
    return meta


def save(args: argparse.Namespace, prep: cli.Prepared, found: list[tuple[Target, int, str]], result: DiagonalResult, name: str, out: Path, t_start: float, runner: _Runner) -> dict[str, Any]:
    """Write ``<name>.pt`` (tensor, or ``{estimator: {param: tensor}}``), ``<name>.json``, the heatmap and the convergence figure."""
    dtype = cli.DTYPES[args.dtype]
    estimators = list(result.diagonals)
    targets = [t for t, _, _ in found]
    single = len(targets) == 1 and len(estimators) == 1
    if single:
        tensor: Any = result.diagonals[estimators[0]][targets[0].param_name].to(dtype)
    else:
        tensor = {e: {t.param_name: result.diagonals[e][t.param_name].to(dtype) for t in targets} for e in estimators}
    model_desc = f"{args.model}, b={args.b}, seqlen={args.seqlen}"
    k_desc = lambda e: f", K={args.vhp_samples}" if e in ("hutchinson", "xdiag", "ggn") else ""  # noqa: E731
    if single:
        e, t = estimators[0], targets[0]
        figures = heatmap(result.diagonals[e][t.param_name], out / name, f"|diag H| of {t.param_name} ({e}{k_desc(e)})\n{model_desc}", axis_labels=("input index (column of the weight)", "output unit (row of the weight)"), value="|H_ii| of each weight")
    else:
        panels = [(f"{e}: {'' if len(targets) == 1 else f'block {b} '}{lname}", result.diagonals[e][t.param_name]) for e in estimators for t, b, lname in found]
        figures = heatmap_grid(panels, out / name, f"|diag H| ({', '.join(e + k_desc(e) for e in estimators)}), {model_desc}", ncols=min(6, len(found)) if len(found) > 1 else len(estimators))
    convergence_meta = {}
    if result.curves:
        t = targets[0]
        curves = result.curves[t.param_name]
        plot = {e: {"k": c["k"], "tracked relative l2 error": c["tracked_rel_error"], "consecutive relative l2 difference": c["consecutive_rel_diff"]} for e, c in curves.items() if c["k"]}
        refs = {e: {"tracked relative l2 error": c["final_tracked_rel_error"]} for e, c in curves.items() if not c["k"]}
        figures += convergence(plot, out / f"{name}_convergence", f"Convergence on the first {args.track_rows} output units of {t.param_name}\n{model_desc}", refs)
        convergence_meta = {
            "tracked_rows": args.track_rows,
            "tracked_entries": len(t.tracked),
            "tracked_exact_hvps_per_sample": len(t.tracked),
            "consecutive_diff_entries": result.monitor_size.get(t.param_name),
            "tracked_rel_error": "||est[T] - exact[T]|| / ||exact[T]|| over the tracked entries T (the first R output units: weight[:R] for nn.Linear, weight[:, :R] for Conv1D)",
            "consecutive_rel_diff": "||est(k) - est(k_prev)|| / ||est(k)|| over all entries (or the stated random subset), k_prev the previous k of the curve",
            "curves": curves,
        }
    n_tokens = result.n_tokens
    errors_vs_exact = {}
    if "exact" in estimators:
        errors_vs_exact = {e: {t.param_name: rel_l2(result.diagonals[e][t.param_name], result.diagonals["exact"][t.param_name]) for t in targets} for e in estimators if e != "exact"}
    meta = {
        "script": "hessian_diagonal",
        "config": vars(args),
        "estimators": estimators,
        "vhp_samples": args.vhp_samples,
        "parameter": targets[0].param_name if len(targets) == 1 else None,
        "parameters": [{"name": t.param_name, "block": b, "layer": lname, "shape": list(t.shape)} for t, b, lname in found],
        "tensor_layout": "the diagonal, with the parameter's shape" if single else "{estimator: {parameter name: diagonal with the parameter's shape}}",
        "hvps_per_sample": result.hvps,
        "cost": {
            "hutchinson": "K HVPs per sample and weight (K probes)",
            "xdiag": "K HVPs per sample and weight: K/2 probes (phase 1), K/2 basis vectors (phase 2)",
            "exact": "one HVP per entry and sample",
            "fisher": "one gradient per sample",
            "ggn": "K Gauss-Newton-vector products per sample and weight (one JVP + one VJP each)",
        },
        "probes": "Rademacher (i.i.d. +-1 entries); probe j of parameter p from a generator seeded with sha256(f'{seed}/{p}/{j}'), shared by all samples; xdiag's probes are the first K/2 hutchinson probes",
        "normalization": f"diagonal of the Hessian of the mean next-token NLL over b*(seqlen-1) = {n_tokens} predicted tokens (the additive summed-NLL Hessian divided by {n_tokens}); fisher: (sum over samples of the squared per-sample gradient of the summed NLL) / {n_tokens}; ggn: the diagonal of the Gauss-Newton matrix sum_t J_t^T (diag p_t - p_t p_t^T) J_t / {n_tokens}",
        "n_samples": result.n_samples,
        "n_tokens": n_tokens,
        "nll_mean": result.nll_sum / n_tokens,
        "perplexity": result.perplexity,
        "estimate_elapsed_s": result.elapsed_s,
        "phase_elapsed_s": result.phase_s,
        "probe_batch": result.probe_batch,
        "hvp": result.hvp,
        "elapsed_s": time.perf_counter() - t_start,
        "fingerprints": prep.fingerprints,
        "run": [{"devices": [str(d) for d in s.devices], **s.stats} for s in runner.settings],
        "rel_error_vs_exact": errors_vs_exact,
        "convergence": convergence_meta,
        "figures": [p.name for p in figures],
    }
    meta = save_tensor_and_json(out, name, tensor, _finite(meta))
    print(f"perplexity {result.perplexity:.3f} over {result.n_samples} samples; {', '.join(estimators)} diagonal of {len(targets)} weight(s) in {result.elapsed_s:.1f}s")
    for e, errs in errors_vs_exact.items():
        print(f"  {e}: relative l2 error vs exact " + ", ".join(f"{v:.3g}" for v in errs.values()))
    if convergence_meta:
        print("  tracked relative l2 error: " + ", ".join(f"{e} {c['final_tracked_rel_error']:.3g}" for e, c in convergence_meta["curves"].items()))
    print("wrote " + ", ".join(str(out / f) for f in [*meta["files"].values(), *meta["figures"]]))
    return meta
