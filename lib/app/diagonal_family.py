"""``hessian_diagonal.py``'s family of the pipeline (:mod:`lib.app.pipeline`): the weights to estimate, the run
(phases of :mod:`lib.hessian.diagonal` through :func:`lib.runtime.parallel.run_job`, so ``--devices``/``--resume`` apply) and
the outputs (``.pt``, ``.json``, heatmap, convergence figure)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import UserError
from ..estimators.diagonal.hutchinson import se_groups
from ..estimators.diagonal.work import se_summary
from ..hessian.diagonal import (
    EXACT_MAX_ENTRIES,
    REGISTRY,
    DiagonalJob,
    DiagonalResult,
    Target,
    hessian_diagonal,
    plan_phase1,
)
from ..model.models import iter_named_linear
from ..objective.subsets import layer_module, num_blocks, num_output_units, output_units_index
from ..runtime import parallel
from . import console, outputs, preflight
from .early_checks import block_index_error
from .outputs import default_name as output_name
from .pipeline import Family, Run
from .plots import convergence, heatmap, heatmap_grid
from .results import atomic_write_bytes
from .spec import DiagonalSpec

Found = list[tuple[Target, int, str]]
"""``(target, block, layer name)`` of each weight to estimate."""


def build_targets(model: nn.Module, spec: DiagonalSpec) -> Found:
    """``(target, block, layer name)`` for each weight to estimate, validated against the model and the estimators."""
    s, c = spec.subset, spec.compute
    if s.all_layers:
        total = num_blocks(model)
        if s.block_index is not None and s.block_index >= total:
            raise block_index_error(s.block_index, total)
        items = [
            (b, lname)
            for b, lname, _, _ in iter_named_linear(model)
            if s.block_index is None or b == s.block_index
        ]
    else:
        items = [(0 if s.block_index is None else s.block_index, s.layer_name)]
    out = []
    for b, lname in items:
        name, module = layer_module(model, b, lname)
        shape = tuple(model.get_parameter(name).shape)
        numel = math.prod(shape)
        for e in REGISTRY.lookup(c.estimator):
            if e.max_entries is not None and numel > e.max_entries:
                others = " or ".join(
                    o.name for o in REGISTRY if o.estimates_hessian and o.max_entries is None
                )
                raise UserError(
                    f"--estimator {e.name} needs {e.entry_cost}: {name} has {numel} entries, over the limit "
                    f"of {e.max_entries}; use --estimator {others}"
                )
            if e.max_k_per_entry is not None and c.hvps // e.max_k_per_entry > numel:
                times = {2: "twice"}.get(e.max_k_per_entry, f"{e.max_k_per_entry} times")
                exact = " or ".join(o.name for o in REGISTRY if o.max_entries is not None)
                raise UserError(
                    f"--hvps {c.hvps} is more than {times} the {numel} entries of {name}; use --estimator {exact}"
                )
        tracked = torch.zeros(0, dtype=torch.long)
        if c.track_rows:
            units = num_output_units(module)
            if c.track_rows > units:
                raise UserError(
                    f"--track_rows {c.track_rows} is larger than the {units} output units of {lname}"
                )
            tracked = output_units_index(module, c.track_rows)
            if len(tracked) > EXACT_MAX_ENTRIES:
                raise UserError(
                    f"--track_rows {c.track_rows} tracks {len(tracked)} entries exactly (one Hessian-vector "
                    f"product each per sample), over the limit of {EXACT_MAX_ENTRIES}"
                )
        out.append((Target(name, shape, tracked), b, lname))
    return out


def _finite(x: Any) -> Any:
    """NaN/inf -> None, recursively (strict JSON)."""
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, dict):
        return {k: _finite(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_finite(v) for v in x]
    return x


def _g(value: float | None) -> str:
    """``value`` with 3 significant digits (``nan`` for the ``None`` that stands for a non-finite
    number in the JSON)."""
    return "nan" if value is None else f"{value:.3g}"


def checkpoint_path(out: Path, name: str, phase: str) -> Path:
    """Phase 1's checkpoint is ``<name>.ckpt``, phase 2's ``<name>.phase2.ckpt``."""
    return out / (f"{name}.ckpt" if phase == "1" else f"{name}.phase{phase}.ckpt")


class _Runner:
    """Runs each phase with :func:`lib.runtime.parallel.run_job` (devices, checkpoints); under torchrun,
    shares phase-1 sums with every rank."""

    def __init__(self, run: Run, two_phase: bool):
        self.run, self.two_phase = run, two_phase

    def __call__(self, job: DiagonalJob, phase: str) -> dict[str, torch.Tensor] | None:
        settings = self.run.run_settings(
            checkpoint_path(self.run.out, self.run.name, phase),
            f"HVPs, phase {phase}" if self.two_phase else "HVPs",
        )
        if self.two_phase and phase == "1" and settings.checkpoint is not None:
            settings.checkpoint.keep = (
                True  # until phase 2 is done, so that --resume never redoes phase 1
            )
        sums = parallel.run_job(job, settings)
        if self.two_phase and phase == "1" and parallel.distributed_env() is not None:
            import torch.distributed as dist

            box = [sums]
            dist.broadcast_object_list(box, src=0)  # phase 2 needs every rank to know Q
            sums = box[0]
        return sums


def pt_tensor(result: DiagonalResult, dtype: torch.dtype) -> Any:
    """What ``<name>.pt`` holds, in the run's dtype: the one diagonal (one weight, one estimator, the weight's
    shape), else ``{estimator: {param_name: diagonal}}``."""
    estimators, targets = list(result.diagonals), result.targets
    if len(targets) == 1 and len(estimators) == 1:
        return result.diagonals[estimators[0]][targets[0].param_name].to(dtype)
    return {
        e: {t.param_name: result.diagonals[e][t.param_name].to(dtype) for t in targets}
        for e in estimators
    }


def se_file(name: str) -> str:
    """``<name>_se.pt``: the per-entry standard errors, ``{estimator: {param_name: se}}`` (each the weight's shape)."""
    return f"{name}_se.pt"


def has_standard_error(spec: DiagonalSpec) -> bool:
    """Whether the run gives per-entry standard errors (Hutchinson with ``K >= 2``)."""
    return "hutchinson" in spec.compute.estimator and se_groups(spec.compute.hvps) > 0


def standard_error_json(result: DiagonalResult, file: str) -> dict[str, Any]:
    """The JSON's ``standard_error``: per estimator, the summary over all weights (:func:`se_summary`), per weight,
    the probe groups and how to read it."""
    out: dict[str, Any] = {
        "file": file,
        "method": (
            "B = min(K, 4) interleaved probe groups (probe j in group j mod B), each group's sum additive over "
            "samples; se = sqrt(sum_g k_g (m_g - m)^2 / ((B - 1) K)) (batch means); (est - diag H) / se is about "
            "Student-t with B - 1 degrees of freedom"
        ),
        "groups": se_groups(result.vhp_samples),
        "estimators": {},
    }
    for e, by_param in result.standard_errors.items():
        names = list(by_param)
        est = [result.diagonals[e][p] for p in names]
        se = [by_param[p] for p in names]
        out["estimators"][e] = {
            **se_summary(est, se),
            "per_parameter": {p: se_summary([d], [s]) for p, d, s in zip(names, est, se)},
        }
    return out


def _k_desc(e: str, hvps: int) -> str:
    return f", K={hvps}" if REGISTRY[e].uses_k else ""


def draw_heatmaps(run: Run, result: DiagonalResult) -> list[Path]:
    """The heatmap of the one diagonal, or a grid of every estimator's and weight's (``--abs``: of ``|H_ii|``)."""
    found, hvps, absolute = run.structure, run.spec.compute.hvps, run.spec.output.abs
    estimators, targets = list(result.diagonals), [t for t, _, _ in found]
    bars = lambda text: f"|{text}|" if absolute else text  # noqa: E731
    if len(targets) == 1 and len(estimators) == 1:
        e, t = estimators[0], targets[0]
        return heatmap(
            result.diagonals[e][t.param_name],
            run.out / run.name,
            f"{bars('diag H')} of {t.param_name} ({e}{_k_desc(e, hvps)})\n{run.where}",
            axis_labels=(
                "input index (column of the weight)",
                "output unit (row of the weight)",
            ),
            value="H_ii",
            signed=not absolute,
        )
    panels = [
        (
            f"{e}: {'' if len(targets) == 1 else f'block {b} '}{lname}",
            result.diagonals[e][t.param_name],
        )
        for e in estimators
        for t, b, lname in found
    ]
    return heatmap_grid(
        panels,
        run.out / run.name,
        f"{bars('diag H')} ({', '.join(e + _k_desc(e, hvps) for e in estimators)}), {run.where}",
        ncols=min(6, len(found)) if len(found) > 1 else len(estimators),
        signed=not absolute,
    )


def draw_convergence(run: Run, result: DiagonalResult) -> list[Path]:
    """The tracked entries' error and the consecutive difference against ``K``, per estimator."""
    t = result.targets[0]
    curves = result.curves[t.param_name]
    plot = {
        e: {
            "k": c["k"],
            "tracked relative l2 error": c["tracked_rel_error"],
            "consecutive relative l2 difference": c["consecutive_rel_diff"],
        }
        for e, c in curves.items()
        if c["k"]
    }
    refs = {
        e: {"tracked relative l2 error": c["final_tracked_rel_error"]}
        for e, c in curves.items()
        if not c["k"]
    }
    return convergence(
        plot,
        run.out / f"{run.name}_convergence",
        f"Convergence on the first {run.spec.compute.track_rows} output units of {t.param_name}\n{run.where}",
        refs,
    )


def convergence_json(result: DiagonalResult, track_rows: int) -> dict[str, Any]:
    """The tracked entries' curves and what they measure (empty without ``--track_rows``)."""
    if not result.curves:
        return {}
    t = result.targets[0]
    return {
        "tracked_rows": track_rows,
        "tracked_entries": len(t.tracked),
        "tracked_exact_hvps_per_sample": len(t.tracked),
        "consecutive_diff_entries": result.monitor_size.get(t.param_name),
        "tracked_rel_error": (
            "||est[T] - exact[T]|| / ||exact[T]|| over the tracked entries T (the first R output "
            "units: weight[:R] for nn.Linear, weight[:, :R] for Conv1D)"
        ),
        "consecutive_rel_diff": (
            "||est(k) - est(k_prev)|| / ||est(k)|| over all entries (or the stated random subset), "
            "k_prev the previous k of the curve"
        ),
        "curves": result.curves[t.param_name],
    }


def diagonal_json(run: Run, result: DiagonalResult) -> dict[str, Any]:
    """The JSON fields of a diagonal result (before ``figures``; non-finite numbers not yet mapped)."""
    found, hvps = run.structure, run.spec.compute.hvps
    estimators, targets = list(result.diagonals), [t for t, _, _ in found]
    single = len(targets) == 1 and len(estimators) == 1
    n_tokens = result.n_tokens
    return {
        "estimators": estimators,
        "hvps": hvps,
        "parameter": targets[0].param_name if len(targets) == 1 else None,
        "parameters": [
            {"name": t.param_name, "block": b, "layer": lname, "shape": list(t.shape)}
            for t, b, lname in found
        ],
        "tensor_layout": "the diagonal, with the parameter's shape"
        if single
        else "{estimator: {parameter name: diagonal with the parameter's shape}}",
        "hvps_per_sample": result.hvps_per_sample,
        "cost": {e.name: e.cost for e in REGISTRY},
        "probes": (
            "Rademacher (i.i.d. +-1 entries); probe j of parameter p from a generator seeded with "
            "sha256(f'{seed}/{p}/{j}'), shared by all samples; xdiag's probes are the first K/2 hutchinson "
            "probes"
        ),
        "normalization": (
            f"diagonal of the Hessian of the mean next-token NLL over b*(seqlen-1) = {n_tokens} predicted "
            f"tokens (the additive summed-NLL Hessian divided by {n_tokens})"
            + "".join(
                f"; {e.name}: {e.normalization.format(n=n_tokens)}"
                for e in REGISTRY
                if e.normalization
            )
        ),
        "n_samples": result.n_samples,
        "n_tokens": n_tokens,
        "nll_mean": result.nll_sum / n_tokens,
        "perplexity": result.perplexity,
        "estimate_elapsed_s": result.elapsed_s,
        "phase_elapsed_s": result.phase_s,
        "chunk": result.chunk,
        "hvp": result.hvp,
        "run": [{"devices": [str(d) for d in s.devices], **s.stats} for s in run.settings],
        "rel_error_vs_exact": result.errors_vs_exact(),
        "convergence": convergence_json(result, run.spec.compute.track_rows),
    }


class DiagonalFamily(Family):
    name = "diagonal"

    def default_name(self, spec: DiagonalSpec) -> str:
        model = Path(spec.model.model.rstrip("/")).name
        s, c, d = spec.subset, spec.compute, spec.data
        if s.all_layers:
            tag = "all_layers" if s.block_index is None else f"all_layers_block{s.block_index}"
        else:
            tag = f"{s.layer_name}_block{s.block_index or 0}"
        k = f"_K{c.hvps}" if any(e.uses_k for e in REGISTRY.lookup(c.estimator)) else ""
        track = f"_track{c.track_rows}" if c.track_rows else ""
        return output_name(
            f"hessian_diagonal_{model}_{tag}_{'+'.join(c.estimator)}{k}{track}_b{d.b}_s{d.seqlen}",
            spec.digest(),
        )

    def checkpoints(self, spec: DiagonalSpec, out: Path, name: str) -> list[Path]:
        return [checkpoint_path(out, name, p) for p in "12"]

    def files(self, spec: DiagonalSpec, name: str) -> list[str]:
        return outputs.planned_files(
            name,
            ["", *(["_convergence"] if spec.compute.track_rows else [])],
            ["_se"] if has_standard_error(spec) else [],
        )

    def structure(self, model: nn.Module, spec: DiagonalSpec) -> Found:
        return build_targets(model, spec)

    def param_names(self, structure: Found) -> list[str]:
        return [target.param_name for target, _, _ in structure]

    def compute(self, run: Run) -> DiagonalResult | None:
        spec, found = run.spec, run.structure
        c = spec.compute
        targets = [t for t, _, _ in found]
        est = preflight.diagonal_estimate(
            plan_phase1(targets, c.estimator, c.hvps, c.seed), run.dtype.itemsize, len(run.devices)
        )
        run.check_resources(
            est,
            (
                "--estimator hutchinson (no stored vectors), fewer weights (one --layer_name, or --block_index "
                "with --all_layers), a smaller --hvps, or --checkpoint_every 0 (no checkpoint files)"
            ),
        )
        own_group = parallel.distributed_env() is not None and parallel.init_process_group(
            run.devices[0]
        )  # outlives phase 1
        try:
            return hessian_diagonal(
                run.model,
                targets,
                run.samples,
                estimators=c.estimator,
                hvps=c.hvps,
                seed=c.seed,
                model_input_bs=spec.data.model_input_bs,
                chunk=c.chunk or None,
                fused_head=False if spec.model.no_fused_head else None,
                spec=run.model_spec(),
                runner=_Runner(
                    run, two_phase=any(e.phases > 1 for e in REGISTRY.lookup(c.estimator))
                ),
                products=run.products(),
            )
        finally:
            if own_group:
                import torch.distributed as dist

                dist.destroy_process_group()

    def save(self, run: Run, result: DiagonalResult) -> tuple[Any, dict[str, Any]]:
        """``<name>.pt`` holds the diagonal, or ``{estimator: {param: diagonal}}``; the heatmap and the
        convergence figure."""
        figures = draw_heatmaps(run, result)
        if result.curves:
            figures += draw_convergence(run, result)
        meta = diagonal_json(run, result)
        meta["figures"] = [p.name for p in figures]
        if result.standard_errors:
            path = run.out / se_file(run.name)
            ses = {
                e: {p: v.to(run.dtype) for p, v in by_param.items()}
                for e, by_param in result.standard_errors.items()
            }
            atomic_write_bytes(path, lambda f: torch.save(ses, f))
            meta["standard_error"] = standard_error_json(result, path.name)
            meta["side_files"] = [path.name]
        return pt_tensor(result, run.dtype), _finite(meta)

    def report(self, run: Run, meta: dict[str, Any]) -> list[str]:
        lines = [
            (
                f"perplexity {meta['perplexity']:.3f} over {meta['n_samples']} samples; "
                f"{', '.join(meta['estimators'])} "
                f"diagonal of {len(meta['parameters'])} weight(s) in {meta['estimate_elapsed_s']:.1f}s"
            )
        ]
        for e, errs in meta["rel_error_vs_exact"].items():
            lines.append(
                f"  {e}: relative l2 error vs exact " + ", ".join(_g(v) for v in errs.values())
            )
        lines += console.diagonal_se_lines(meta.get("standard_error") or {})
        if meta["convergence"]:
            lines.append(
                "  tracked relative l2 error: "
                + ", ".join(
                    f"{e} {_g(c['final_tracked_rel_error'])}"
                    for e, c in meta["convergence"]["curves"].items()
                )
            )
        return lines


FAMILY = DiagonalFamily()
