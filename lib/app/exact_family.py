"""The exact-Hessian scripts' family of the pipeline (:mod:`lib.app.pipeline`): ``single_layer_single_block.py``,
``single_layer_several_blocks.py``, ``several_layers_several_blocks.py``.

Compute: one :class:`lib.hessian.exact.ExactHessianJob` (with ``--compare``, a :class:`lib.hessian.curvature.CurvatureJob`
beside it) through :func:`lib.runtime.parallel.run_job` (in this process, on worker processes or under torchrun, with
checkpoints). Save: ``.pt`` / ``.json``, the heatmap, the diagonality figures, the batch-size study and the
comparison when asked for.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from torch import nn

from ..hessian import batch_study, curvature, diagonality
from ..hessian.exact import ExactHessianJob
from ..objective import subsets
from ..objective.subsets import Subset
from ..products.finite_difference import exact_script_report
from ..runtime import parallel
from . import exact_outputs, outputs, preflight
from .console import comparison_lines
from .outputs import default_name as output_name
from .pipeline import Family, Run
from .plots import heatmap, slice_label
from .spec import ExactSpec


def subset_tag(spec: ExactSpec) -> str:
    """The subset part of the default name (``None`` = every block / layer, written ``all``)."""
    s = spec.subset
    if spec.script == "single_layer_single_block":
        return f"{s.layer_name}_block{s.block_index}"
    if spec.script == "single_layer_several_blocks":
        return f"{s.layer_name}_blocks{s.num_blocks}"
    return f"layers{s.num_layers}_blocks{s.num_blocks}"


def build_subset(model: nn.Module, spec: ExactSpec) -> Subset:
    """The script's subset (``num_blocks`` / ``num_layers`` fixed by :meth:`ExactFamily.resolve`)."""
    s = spec.subset
    if spec.script == "single_layer_single_block":
        return subsets.single_layer_single_block(model, s.layer_name, s.block_index, s.t)
    if spec.script == "single_layer_several_blocks":
        return subsets.single_layer_several_blocks(model, s.layer_name, s.num_blocks, s.t)
    return subsets.several_layers_several_blocks(model, s.num_layers, s.num_blocks, s.t)


def slice_boundaries(subset: Subset) -> list[int]:
    """Flat offsets where each slice after the first starts."""
    out, pos = [], 0
    for s in subset.slices[:-1]:
        pos += len(s)
        out.append(pos)
    return out


class ExactFamily(Family):
    name = "exact"

    def default_name(self, spec: ExactSpec) -> str:
        model = Path(spec.model.model.rstrip("/")).name
        d = spec.data
        return output_name(
            f"{spec.script}_{model}_{subset_tag(spec)}_t{spec.subset.t}_b{d.b}_s{d.seqlen}",
            spec.digest(),
        )

    def files(self, spec: ExactSpec, name: str) -> list[str]:
        """Tensor, JSON and heatmap; the slice-mass figure (scripts with several slices); the batch study's and the
        comparison's tensor and figure when asked for."""
        c = spec.compute
        extra = [
            stem for stem, on in (("_batch_study", c.batch_study), ("_compare", c.compare)) if on
        ]
        several = spec.script != "single_layer_single_block"
        return outputs.planned_files(
            name, ["", *(["_slice_mass"] if several else []), *extra], extra
        )

    def resolve(self, spec: ExactSpec, model: nn.Module) -> ExactSpec:
        s, changes = spec.subset, {}
        if spec.script != "single_layer_single_block" and s.num_blocks is None:
            changes["num_blocks"] = subsets.num_blocks(model)
        if spec.script == "several_layers_several_blocks" and s.num_layers is None:
            changes["num_layers"] = len(subsets.layer_names(model, 0))
        return spec.replace(**changes) if changes else spec

    def products_per_sample(self, spec: ExactSpec, structure: Subset) -> int:
        return structure.size

    def per_sample_units(self, spec: ExactSpec) -> bool:
        return spec.compute.batch_study

    def structure(self, model: nn.Module, spec: ExactSpec) -> Subset:
        return build_subset(model, spec)

    def compute(self, run: Run) -> tuple[ExactHessianJob, dict, Any] | None:
        spec, subset = run.spec, run.structure
        c = spec.compute
        run.check_resources(
            preflight.exact_estimate(subset.size, run.dtype.itemsize),
            "a smaller --t (or fewer blocks or layers), or --checkpoint_every 0 (no checkpoint file)",
        )
        job = ExactHessianJob(
            subset,
            run.samples,
            model_input_bs=spec.data.model_input_bs,
            method=c.method,
            chunk=c.chunk or None,
            fused_head=False if spec.model.no_fused_head else None,
            spec=run.model_spec(),
            model=run.model,
            products=run.products(),
        )
        if c.compare:
            job = curvature.make_job(
                job, c.compare, c.fisher_samples, c.perturbations, c.perturbation_bits, c.seed
            )
        settings = run.run_settings(  # the bar counts each batch's columns: 512 for 128 columns x 4 batches
            run.out / f"{run.name}.ckpt", f"Hessian columns x {job.num_units()} batches"
        )
        settings.snapshot_units = (
            tuple(batch_study.snapshot_units(spec.data.b, spec.data.model_input_bs))
            if c.batch_study
            else ()
        )
        t0 = time.perf_counter()
        sums = parallel.run_job(job, settings)
        if sums is None:
            return None
        return job, sums, job.result(sums, time.perf_counter() - t0)

    def save(
        self, run: Run, result: tuple[ExactHessianJob, dict, Any]
    ) -> tuple[Any, dict[str, Any]]:
        job, sums, res = result
        spec, subset, out, name = run.spec, run.structure, run.out, run.name
        settings = run.settings[0]
        fd = None if job.products.exact else job.products
        what = "|H|" if spec.output.abs else "H"
        what = what if fd is None else f"approximate {what} (finite-difference HVPs)"
        figures = heatmap(
            res.hessian,
            out / name,
            f"{what}: {subset.description}\n{run.where}",
            slice_boundaries(subset),
            slice_labels=[slice_label(s.param_name) for s in subset.slices],
            signed=not spec.output.abs,
        )
        diag, diag_figures = exact_outputs.diagonality_report(
            res.hessian, subset.slices, out / name, f"{subset.description}; {run.where}"
        )
        study = (
            exact_outputs.write_batch_study(
                settings.snapshots,
                spec.data.model_input_bs,
                spec.data.seqlen,
                out,
                name,
                f"{subset.description}; {run.where}",
                res.hessian.dtype,
            )
            if settings.snapshot_units
            else {}
        )
        meta = {
            "subset": subset.description,
            "shape": list(res.hessian.shape),
            "normalization": (
                f"Hessian of the mean next-token NLL over b*(seqlen-1) = {res.n_tokens} predicted tokens "
                f"(the additive summed-NLL Hessian divided by {res.n_tokens})"
            ),
            "n_samples": res.n_samples,
            "n_tokens": res.n_tokens,
            "nll_mean": res.nll_sum / res.n_tokens,
            "perplexity": res.perplexity,
            "method": res.method,
            "hvp": {"hvp": "exact"}
            if fd is None
            else exact_script_report(fd, res.hessian_sum, sums),
            "chunk": {
                **job.chunk_report(),
                **({"used": used} if (used := settings.stats.get("chunks")) else {}),
            },
            "products": job.products_report(),
            "hessian_elapsed_s": res.elapsed_s,
            "run": {"devices": [str(d) for d in settings.devices], **settings.stats},
            "figures": [p.name for p in [*figures, *diag_figures]],
            "diagonality": diag,
            **(
                {"batch_study": study["batch_study"], "batch_study_files": study["files"]}
                if study
                else {}
            ),
            "entries": subset.entries(run.model),
        }
        if spec.compute.compare:
            meta.update(
                exact_outputs.write_comparison(
                    out,
                    name,
                    job,
                    sums,
                    res,
                    f"{subset.description}\n{run.where}",
                    spec.compute.compare_top_k,
                )
            )
        return res.hessian, meta

    def report(self, run: Run, meta: dict[str, Any]) -> list[str]:
        lines = [
            (
                f"perplexity {meta['perplexity']:.3f} over {meta['n_samples']} samples; Hessian {tuple(meta['shape'])} "
                f"in {meta['hessian_elapsed_s']:.1f}s"
            )
        ]
        if "batch_study" in meta:
            lines.append(batch_study.summary_line(meta["batch_study"]))
        lines.extend(comparison_lines(meta.get("comparison", {})))
        return [*lines, diagonality.one_line(meta["diagonality"])]


FAMILY = ExactFamily()
