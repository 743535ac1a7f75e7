"""``hessian_spectrum.py``'s family of the pipeline (:mod:`lib.app.pipeline`): the subset, the exact or iterative
path, resumable passes, outputs.

Iterative path: every product of :mod:`lib.spectrum.algorithms`'s algorithms is one pass over the samples, an
additive :class:`lib.products.operator.HVPJob` run by :func:`lib.runtime.parallel.run_job` (``--devices``, torchrun,
``--checkpoint_every`` inside a pass). After each pass its input digest and output ``H V`` are written
to ``<output_dir>/<name>.passes/pass_NNNNN.pt``; the algorithms are deterministic given the seed, so
``--resume`` replays them through the recorded passes (no HVP recomputed; the Krylov bases, the
coefficients and the probes are rebuilt exactly) and continues: bitwise the uninterrupted result.
Exact path (``n <= --exact_below``): the exact Hessian job and ``eigvalsh``.
"""

from __future__ import annotations

import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import torch
from torch import nn

from ..errors import UserError
from ..hessian.exact import ExactHessianJob
from ..model.inputs import warn
from ..objective.subsets import (
    Subset,
    num_blocks,
    params_subset,
    several_layers_several_blocks,
    single_layer_several_blocks,
    single_layer_single_block,
)
from ..products import fsdp
from ..products.base import Products
from ..products.finite_difference import exact_script_report
from ..products.operator import HessianOperator, digest, subset_digest
from ..runtime import checkpoint as ckpt
from ..runtime import parallel
from ..runtime.passlog import PassLog
from ..spectrum import algorithms as spectrum
from ..spectrum import spectra, vectors
from . import outputs, preflight
from .outputs import default_name as output_name
from .pipeline import Family, Run
from .plots import density_figure
from .spec import SpectrumSpec

KEEP_GRAPHS = {"auto": "auto", "on": True, "off": False}
"""``--keep_graphs`` -> :class:`lib.products.operator.HessianOperator`'s ``keep_graphs``."""
ENTRIES_MAX = 65536
"""Largest subset whose per-entry ``[param, *index]`` list goes into the JSON (``slices`` always does; not
when every slice is a whole parameter in storage order, which ``slices`` describes already)."""


def check_top_k(spec: SpectrumSpec, n: int) -> None:
    """``--top_k`` per end (``--which both``: twice) must not exceed the subset's ``n`` entries."""
    c = spec.compute
    want = c.top_k * (2 if c.which == "both" else 1)
    if want > n:
        raise UserError(
            f"--top_k {c.top_k} with --which {c.which} asks for {want} eigenvalues but the subset has only {n} entries"
        )


def build_subset(model: nn.Module, spec: SpectrumSpec) -> Subset:
    """``--params`` globs, else the exact scripts' subsets (several layers / several blocks / one block)."""
    s = spec.subset
    if s.params:
        return params_subset(model, s.params)
    if s.num_layers is not None:
        return several_layers_several_blocks(
            model, s.num_layers, s.num_blocks or num_blocks(model), s.t
        )
    if s.num_blocks is not None:
        return single_layer_several_blocks(model, s.layer_name, s.num_blocks, s.t)
    return single_layer_single_block(model, s.layer_name, s.block_index, s.t)


def slice_table(model: nn.Module, subset: Subset) -> list[dict[str, Any]]:
    """Where each slice's entries sit in ``x`` (eigenvectors' rows): ``{param, shape, offset, size, whole}``."""
    out, offset = [], 0
    for sl in subset.slices:
        shape = list(model.get_parameter(sl.param_name).shape)
        whole = len(sl) == model.get_parameter(sl.param_name).numel() and bool(
            (sl.flat_index == torch.arange(len(sl))).all()
        )
        out.append(
            {
                "param": sl.param_name,
                "shape": shape,
                "offset": offset,
                "size": len(sl),
                "whole_in_storage_order": whole,
            }
        )
        offset += len(sl)
    return out


def subset_tag(spec: SpectrumSpec) -> str:
    s = spec.subset
    if s.params:
        return "params-" + "+".join(s.params).replace("*", "x").replace("/", "-")[:80]
    if s.num_layers is not None:
        return f"layers{s.num_layers}_blocks{s.num_blocks}"
    if s.num_blocks is not None:
        return f"{s.layer_name}_blocks{s.num_blocks}"
    return f"{s.layer_name}_block{s.block_index}"


def make_run_pass(run: Run, op: HessianOperator, pool: parallel.WorkerPool | None = None):
    """``run_pass(V, i)``: ``H V`` by one :class:`HVPJob` through :func:`lib.runtime.parallel.run_job`
    (checkpointed inside the pass);
    with several devices, every pass runs on ``pool`` (workers and their models kept between passes); under
    torchrun every rank receives rank 0's result."""
    r = run.spec.run
    every_units, every_s = ckpt.parse_every(r.checkpoint_every)
    distributed = parallel.distributed_env() is not None
    if distributed:
        parallel.init_process_group(run.devices[0])

    def run_pass(v: torch.Tensor, i: int) -> torch.Tensor:
        path = run.out / f"{run.name}.ckpt"
        cfg = ckpt.CheckpointConfig(
            path, every_units, every_s, resume=r.resume and path.exists(), keep=False
        )
        settings = parallel.RunSettings(
            devices=run.devices,
            checkpoint=cfg,
            progress=False,
            unit_timeout=r.unit_timeout,
            setup_timeout=r.setup_timeout,
            pool=pool,
            identity=run.identity(),
        )
        sums = parallel.run_job(op.job(v.T, tag=f"pass {i}"), settings)
        if sums is not None:
            op.record(sums)
            ckpt.finish(cfg)  # this pass is done: the next one starts its own checkpoint
        if distributed:
            import torch.distributed as dist

            box = [None if sums is None else sums["hv_sum"]]
            dist.broadcast_object_list(box, src=0)
            hv_sum = box[0]
        else:
            hv_sum = sums["hv_sum"]
        return (hv_sum / op.n_tokens).T.contiguous()

    return run_pass


def density_json(d: spectrum.SLQResult) -> dict[str, Any]:
    return {
        "grid": d.grid.tolist(),
        "values": d.values.tolist(),
        "sigma": d.sigma,
        "ritz_values": [[x for x in row if x == x] for row in d.ritz_values.tolist()],
        "ritz_weights": [[x for x in row if x == x] for row in d.ritz_weights.tolist()],
        "moments": {
            str(m): dict(zip(("estimate", "stderr"), d.moment(m), strict=True)) for m in range(3)
        },
        "hvps": d.hvps,
        "passes": d.passes,
    }


def spectrum_settings(spec: SpectrumSpec) -> spectra.SpectrumSettings:
    """The spec's ``--top_k``, ``--which``, ... as :class:`lib.spectrum.spectra.SpectrumSettings`."""
    c = spec.compute
    return spectra.SpectrumSettings(
        top_k=c.top_k,
        which=cast(spectra.Which, c.which),  # the spec checked the choice
        block_size=c.block_size,
        tol=c.tol,
        max_iter=c.max_iter,
        seed=c.seed,
        reorth=cast(spectra.Reorth, c.reorth),
        eigenvectors=c.eigenvectors,
        trace=c.trace,
        trace_hvps=c.trace_hvps,
        density=c.density,
        slq_probes=c.slq_probes,
        lanczos_steps=c.lanczos_steps,
        density_points=c.density_points,
    )


def result_json(r: spectra.SpectrumResult) -> dict[str, Any]:
    """The JSON fields of a spectrum result (the iterative path's density is added by the caller, after the run's
    costs)."""
    out: dict[str, Any] = {
        "path": r.path,
        "eigenvalues": r.eigenvalues.tolist(),
        "residuals": r.residuals.tolist(),
        "converged": r.converged.tolist(),
    }
    if r.path == "exact":
        assert r.all_eigenvalues is not None and r.density is not None
        out.update(
            all_eigenvalues=r.all_eigenvalues.tolist(),
            trace={"exact": r.trace["exact"].estimate},
            density=density_json(r.density),
            hvps=r.hvps,
            passes=r.passes,
        )
        return out
    eig = r.lanczos
    assert eig is not None
    out["lanczos"] = {
        "hvps": eig.hvps,
        "passes": eig.passes,
        "ritz_values": eig.ritz_values.tolist(),
        "invariant_subspace": eig.breakdown,
        "reorth": eig.reorth,
        "ghosts_removed": eig.ghosts,
        "stored_vectors": eig.stored_vectors,
    }
    if r.trace:
        out["trace"] = {name: t.as_dict() for name, t in r.trace.items()}
    return out


def result_tensors(r: spectra.SpectrumResult, density: bool) -> dict[str, torch.Tensor]:
    """The tensors of the ``.pt``: the exact path's matrix and every eigenvalue, or Lanczos' residuals and Ritz
    values; the wanted eigenvalues (and eigenvectors); with ``--density`` the SLQ (or exact) density."""
    saved: dict[str, torch.Tensor] = {}
    if r.path == "exact":
        assert r.hessian is not None and r.all_eigenvalues is not None
        saved.update(
            hessian=r.hessian, eigenvalues=r.eigenvalues, all_eigenvalues=r.all_eigenvalues
        )
    else:
        assert r.lanczos is not None
        saved.update(
            eigenvalues=r.eigenvalues, residuals=r.residuals, ritz_values=r.lanczos.ritz_values
        )
    if r.eigenvectors is not None:
        saved["eigenvectors"] = r.eigenvectors
    if density:
        assert r.density is not None
        saved.update(
            ritz_values_slq=r.density.ritz_values,
            ritz_weights_slq=r.density.ritz_weights,
            density_grid=r.density.grid,
            density=r.density.values,
        )
    return saved


def progress_bar(run: Run, total: int) -> Any:
    """The passes' progress bar on rank 0 (``None`` with ``--no_progress`` or on other ranks)."""
    if not run.rank0 or run.spec.output.no_progress:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, desc="passes over the samples", dynamic_ncols=True)


def pass_log_config(run: Run, products: Products) -> dict[str, Any]:
    """What the pass log is tied to (:class:`lib.runtime.passlog.PassLog`): the run's identity, the subset, the samples,
    the model, the batching, the seed, the head and the product method (and a non-default vector dtype)."""
    spec, subset = run.spec, run.structure
    c = spec.compute
    log_cfg = {
        "subset": subset_digest(subset),
        "params": subset.param_names,
        "samples": digest(run.samples),
        "model": run.model_spec().identity(),
        "model_input_bs": spec.data.model_input_bs,
        "seed": c.seed,
        "fused_head": False if spec.model.no_fused_head else None,
        "products": products.name,
        **({"vectors": c.vector_dtype} if c.vector_dtype != "float64" else {}),
    }
    return {**run.identity(), **log_cfg}


def run_costs(
    run: Run,
    log: PassLog,
    pool: parallel.WorkerPool,
    op: HessianOperator | fsdp.ShardedOperator,
    space: vectors.VectorSpace,
    storage: str,
) -> dict[str, Any]:
    """For the JSON: the passes (run and replayed), the workers, the operator's report, the stored vectors and
    every process's memory (collective under ``--fsdp``)."""
    sharded = isinstance(op, fsdp.ShardedOperator)
    costs: dict[str, Any] = dict(
        hvps=log.hvps,
        passes=log.calls,
        replayed_passes=log.replayed,
        workers={"spawned": pool.started, "passes_run": pool.jobs},
        **op.report(),
    )
    costs["vectors"] = {
        "dtype": str(space.dtype).removeprefix("torch."),
        "storage": storage,
        "peak_stored_bytes": space.peak_stored_bytes,
    }
    costs["memory"] = (
        op.gather_memory()
        if sharded
        else [fsdp.process_memory(run.model, space.n * run.dtype.itemsize, space)]
    )
    return costs


@dataclass(frozen=True)
class SpectrumComputed:
    """What :meth:`SpectrumFamily.compute` hands to :meth:`SpectrumFamily.save`: the JSON fields (``meta``), the
    tensors of the ``.pt`` (``saved``) and the density to draw (``None`` without one)."""

    meta: dict[str, Any]
    saved: dict[str, torch.Tensor]
    density: Any


class SpectrumFamily(Family):
    name = "spectrum"
    identity_sections = ("model", "data", "subset")
    """The checkpoints and the pass log hold products of ``H``, which the model, the data and the subset define;
    the algorithm's settings (``--max_iter``, ``--density``, ...) may change on ``--resume``: recorded passes are
    replayed by the digest of their input block."""

    def default_name(self, spec: SpectrumSpec) -> str:
        """Readable stem plus the hash of every result-defining field, the seed included (random start vectors
        and probes)."""
        model = Path(spec.model.model.rstrip("/")).name
        return output_name(
            f"hessian_spectrum_{model}_{subset_tag(spec)}_b{spec.data.b}_s{spec.data.seqlen}".replace(
                "/", "-"
            ),
            spec.digest(),
        )

    def checkpoints(self, spec: SpectrumSpec, out: Path, name: str) -> list[Path]:
        return [out / f"{name}.ckpt", out / f"{name}.passes", out / f"{name}.vectors"]

    def files(self, spec: SpectrumSpec, name: str) -> list[str]:
        return outputs.planned_files(name, ["_density"])  # the exact path always draws the density

    def products_per_sample(self, spec: SpectrumSpec, structure: Subset) -> int:
        return structure.size  # at most: the exact path's columns

    def structure(self, model: nn.Module, spec: SpectrumSpec) -> Subset:
        subset = build_subset(model, spec)
        check_top_k(spec, subset.size)
        return subset

    @staticmethod
    def exact_path(spec: SpectrumSpec, n: int) -> bool:
        c = spec.compute
        return bool(c.exact_below) and n <= c.exact_below and not c.fsdp

    @staticmethod
    def estimate(
        run: Run, n: int, world: int, vdtype: torch.dtype
    ) -> tuple[preflight.Estimate, str]:
        """The iterative path's memory and disk (per rank under ``--fsdp``) and where its stored vectors go."""
        c = run.spec.compute
        stored = preflight.stored_vectors(
            c.block_size,
            c.max_iter,
            c.reorth,
            c.eigenvectors,
            c.top_k,
            c.trace_hvps if c.trace else 0,
            c.density,
            c.slq_probes,
            c.lanczos_steps,
        )
        on_gpu = c.fsdp and run.devices[0].type == "cuda"
        storage = vectors.choose_storage(
            c.vector_storage,
            -(-n // world) * stored * vdtype.itemsize,
            preflight.free_device_bytes(run.devices[0]) if on_gpu else None,
            preflight.available_host_bytes(),
        )
        log_vectors = (
            c.block_size * c.max_iter
            + (2 * c.trace_hvps if c.trace else 0)
            + (c.slq_probes * c.lanczos_steps if c.density else 0)
        )
        est = preflight.spectrum_estimate(
            n,
            c.block_size,
            stored,
            run.dtype.itemsize,
            vdtype.itemsize,
            storage,
            world,
            log_vectors,
            on_gpu,
        )
        return est, storage

    def compute(self, run: Run) -> SpectrumComputed | None:
        """``{"meta": JSON fields, "saved": tensors for the .pt, "density": the density to draw or None}`` (the
        exact path always draws the density of its eigenvalues; the iterative one with ``--density``): the
        operator and the pass log from the spec, the answer from :func:`lib.spectrum.spectra.hessian_spectrum` or
        :func:`lib.spectrum.spectra.dense_spectrum`."""
        spec, subset = run.spec, run.structure
        c = spec.compute
        n = subset.size
        world = int(os.environ.get("WORLD_SIZE", "1")) if c.fsdp else 1
        vdtype = vectors.vector_dtype(c.vector_dtype, run.dtype)
        storage = "device"
        iterative = not self.exact_path(spec, n)
        if not iterative:
            est = preflight.exact_estimate(n, run.dtype.itemsize)
        else:
            est, storage = self.estimate(run, n, world, vdtype)
        run.check_resources(
            est,
            (
                "a smaller subset, fewer --max_iter or --lanczos_steps, a smaller --block_size, --reorth none, "
                "--vector_storage disk, --vector_dtype working, or --exact_below 0 for large subsets"
            ),
            always_writes=iterative,  # the pass log, even with --checkpoint_every 0
        )
        products = run.products()
        op = HessianOperator(
            run.model,
            subset,
            run.samples,
            spec.data.model_input_bs,
            c.chunk or None,
            False if spec.model.no_fused_head else None,
            spec=run.model_spec(),
            keep_graphs=KEEP_GRAPHS[c.keep_graphs],
            products=products,
        )
        meta: dict[str, Any] = {
            "subset": subset.description,
            "n": n,
            "n_samples": int(run.samples.shape[0]),
            "n_tokens": op.n_tokens,
        }
        t0 = time.perf_counter()
        if self.exact_path(spec, n):
            res = self.exact(run, products, meta)
            if res is None:
                return None
        else:
            res, costs = self.iterative(run, op, products, vdtype, storage, world)
        if not run.rank0:
            return None
        meta.update(result_json(res))
        if res.path == "iterative":
            meta.update(costs)
        if c.density:
            meta["density"] = density_json(res.density)
        meta.update(
            spectrum_elapsed_s=time.perf_counter() - t0, slices=slice_table(run.model, subset)
        )
        if n <= ENTRIES_MAX and not all(sl["whole_in_storage_order"] for sl in meta["slices"]):
            meta["entries"] = subset.entries(run.model)
        return SpectrumComputed(meta, result_tensors(res, c.density), res.density)

    @staticmethod
    def exact(run: Run, products: Products, meta: dict[str, Any]) -> spectra.SpectrumResult | None:
        """The exact path: the exact Hessian job (checkpointed), then :func:`lib.spectrum.spectra.dense_spectrum` of its
        float64 matrix (finite-difference rows: their asymmetry in ``meta["hvp"]``, the symmetric part
        diagonalized). ``None`` on ranks that hold no result."""
        spec, subset = run.spec, run.structure
        c = spec.compute
        fd = None if products.exact else products
        t0 = time.perf_counter()
        job = ExactHessianJob(
            subset,
            run.samples,
            spec.data.model_input_bs,
            c.method,
            c.chunk or None,
            False if spec.model.no_fused_head else None,
            spec=run.model_spec(),
            model=run.model,
            products=products,
        )
        settings = run.run_settings(run.out / f"{run.name}.ckpt", "Hessian columns")
        sums = parallel.run_job(job, settings)
        if sums is None:
            return None
        h = job.result(sums, time.perf_counter() - t0).hessian.to(torch.float64)
        if fd is not None:
            meta["hvp"] = exact_script_report(fd, h.to(run.dtype), sums)  # the dtype's step
            h = (h + h.T) / 2
        return spectra.dense_spectrum(h, spectrum_settings(spec))

    @staticmethod
    def iterative(
        run: Run,
        op: HessianOperator,
        products: Products,
        vdtype: torch.dtype,
        storage: str,
        world: int,
    ) -> tuple[spectra.SpectrumResult, dict[str, Any]]:
        """The iterative path: every product one pass (:class:`lib.runtime.passlog.PassLog`, resumable; on worker
        processes, torchrun or FSDP shards), :func:`lib.spectrum.spectra.hessian_spectrum`; with the run's costs for the
        JSON (passes, workers, the operator's report, vectors, memory)."""
        spec, subset = run.spec, run.structure
        c = spec.compute
        n = subset.size
        run.kept.append(
            ckpt.CheckpointConfig(run.out / f"{run.name}.passes", every_units=1)
        )  # where finished passes are
        settings = spectrum_settings(spec)
        bar = progress_bar(run, settings.max_passes)
        log_cfg = pass_log_config(run, products)
        pool = parallel.WorkerPool(run.devices)  # spawns workers only for several devices
        sop = None
        if c.fsdp:  # every rank logs its shard of each pass
            sop = fsdp.sharded_operator(
                run, subset, spec.data.model_input_bs, products.fd_settings, vdtype
            )
            space, log_cfg["world_size"] = sop.space, world
            log = PassLog(
                run.out / f"{run.name}.passes",
                log_cfg,
                spec.run.resume,
                lambda v, i: sop.matmat(v),
                bar,
                suffix=f".rank{sop.rank}of{world}",
                agree=fsdp.agree_min,
            )
        else:
            space = vectors.local_space(n, dtype=vdtype)
            log = PassLog(
                run.out / f"{run.name}.passes" if run.rank0 else None,
                log_cfg,
                spec.run.resume,
                make_run_pass(run, op, pool),
                bar,
                policy=op.policy,
            )

        def lanczos_done(eig: spectrum.EigResult) -> None:
            if bar is not None:  # Lanczos may stop early: fewer passes to come
                bar.total -= c.max_iter - eig.passes
                bar.refresh()

        try:
            with log.counting():  # a signal between passes also counts the passes kept
                res = spectra.hessian_spectrum(
                    log,
                    n,
                    settings,
                    space=space,
                    storage=storage,
                    storage_dir=run.out / f"{run.name}.vectors",
                    on_lanczos=lanczos_done,
                )
        finally:
            pool.close()
            if bar is not None:
                bar.close()
        costs = run_costs(run, log, pool, sop or op, space, storage)
        if sop is not None:
            fsdp.finish()  # every rank has written its pass files before rank 0 removes them
        return res, costs

    def save(self, run: Run, result: SpectrumComputed) -> tuple[Any, dict[str, Any]]:
        meta, dens = result.meta, result.density
        figures: list[Path] = []
        if dens is not None:
            fd_note = "" if run.spec.compute.hvp == "exact" else " (finite-difference HVPs)"
            title = f"Hessian spectral density{fd_note}: {run.structure.description}\n{run.where}"
            label = "SLQ density" if dens.passes else "density of the exact eigenvalues"
            figures = density_figure(
                dens.grid,
                dens.values,
                meta["eigenvalues"],
                run.out / f"{run.name}_density",
                title,
                label,
                "extreme eigenvalues (Lanczos)" if dens.passes else "extreme eigenvalues",
            )
        return result.saved, {**meta, "figures": [p.name for p in figures]}

    def finish(self, run: Run, meta: dict[str, Any]) -> None:
        super().finish(run, meta)
        if meta["path"] == "iterative" and not run.spec.run.keep_checkpoint:
            shutil.rmtree(run.out / f"{run.name}.passes", ignore_errors=True)
        shutil.rmtree(run.out / f"{run.name}.vectors", ignore_errors=True)  # --vector_storage disk

    def report(self, run: Run, meta: dict[str, Any]) -> list[str]:
        top = ", ".join(f"{v:.6g}" for v in meta["eigenvalues"])
        if not all(meta["converged"]):
            warn(
                f"{meta['converged'].count(False)} of {len(meta['converged'])} eigenvalues did not "
                f"converge within --max_iter {run.spec.compute.max_iter} passes (residuals in the "
                f"JSON); raise --max_iter or --tol"
            )
        from .console import trace_line

        asked = [trace_line(meta["trace"])] if run.spec.compute.trace and "trace" in meta else []
        return [
            (
                f"{meta['path']} path, n={meta['n']}: eigenvalues [{top}] with {meta['hvps']} HVPs in "
                f"{meta['passes']} passes ({meta['spectrum_elapsed_s']:.1f}s)"
            ),
            *asked,
        ]


FAMILY = SpectrumFamily()
