"""The ``hessian_spectrum.py`` pipeline: flags, subset, the exact or iterative path, resumable passes, outputs.

Iterative path: every product of :mod:`lib.spectrum`'s algorithms is one pass over the samples, an
additive :class:`lib.operator.HVPJob` run by :func:`lib.parallel.run_job` (``--devices``, torchrun,
``--checkpoint_every`` inside a pass). After each pass its input digest and output ``H V`` are written
to ``<output_dir>/<name>.passes/pass_NNNNN.pt``; the algorithms are deterministic given the seed, so
``--resume`` replays them through the recorded passes (no HVP recomputed; the Krylov bases, the
coefficients and the probes are rebuilt exactly) and continues: bitwise the uninterrupted result.
Exact path (``n <= --exact_below``): the exact Hessian job and ``eigvalsh``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import textwrap
import sys
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

from . import checkpoint as ckpt
from . import cli, finite_difference, fsdp, outputs, parallel, preflight, spectrum, vectors
from .errors import RunError, UserError
from .hessian import ExactHessianJob
from .inputs import warn
from .operator import HessianOperator, digest
from .results import atomic_write_bytes, save_tensor_and_json
from .subsets import Subset, num_blocks, params_subset, several_layers_several_blocks, single_layer_several_blocks, single_layer_single_block

T_DEFAULT = (128, 768)
"""``--t`` for the paper-style subsets (embedded model, paper models), as in single_layer_single_block.py."""
EXACT_BELOW = 2048
KEEP_GRAPHS = {"auto": "auto", "on": True, "off": False}
"""``--keep_graphs`` -> :class:`lib.operator.HessianOperator`'s ``keep_graphs``."""
ENTRIES_MAX = 65536
"""Largest subset whose per-entry ``[param, *index]`` list goes into the JSON (``slices`` always does; not
when every slice is a whole parameter in storage order, which ``slices`` describes already)."""


def build_parser(description: str) -> argparse.ArgumentParser:
    p = cli.base_parser(description, T_DEFAULT, compare=False)
    s = p.add_argument_group("subset (the exact scripts' flags, or --params)")
    s.add_argument("--params", nargs="+", default=None, metavar="GLOB", help="whole parameters whose names match these shell-style globs, e.g. 'model.decoder.layers.0.self_attn.q_proj.weight'; '*' = every parameter (overrides the flags below)")
    s.add_argument("--layer_name", default="self_attn.q_proj", help="linear layer inside a block (first --t weights of row 0)")
    s.add_argument("--block_index", type=int, default=0, help="which block (single layer, single block)")
    s.add_argument("--num_blocks", type=int, default=None, help="blocks 0..N-1 (as single_layer_several_blocks.py; with --num_layers as several_layers_several_blocks.py)")
    s.add_argument("--num_layers", type=int, default=None, help="the first K linear layers of each block (as several_layers_several_blocks.py)")
    e = p.add_argument_group("spectrum")
    e.add_argument("--top_k", type=int, default=5, help="eigenvalues wanted (per end with --which both)")
    e.add_argument("--which", choices=spectrum.WHICH, default="largest", help="largest or smallest by value, or both ends")
    e.add_argument("--block_size", type=int, default=1, help="Lanczos block size: vectors per pass over the samples")
    e.add_argument("--tol", type=float, default=1e-6, help="converged when ||Hv - lambda v|| <= tol * max|Ritz value|")
    e.add_argument("--max_iter", type=int, default=100, help="most Lanczos passes")
    e.add_argument("--eigenvectors", action="store_true", help="save the eigenvectors (columns in the subset's entry order) in the .pt")
    e.add_argument("--trace", action="store_true", help="Hutchinson and Hutch++ trace estimates with standard errors")
    e.add_argument("--trace_hvps", type=int, default=30, help="HVPs per trace estimator")
    e.add_argument("--density", action="store_true", help="spectral density by stochastic Lanczos quadrature")
    e.add_argument("--slq_probes", type=int, default=4, help="SLQ probes (advanced together, one pass per step)")
    e.add_argument("--lanczos_steps", type=int, default=30, help="SLQ Lanczos steps per probe")
    e.add_argument("--density_points", type=int, default=1000, help="grid points of the density")
    e.add_argument("--keep_graphs", choices=tuple(KEEP_GRAPHS), default="auto", help="keep each batch's gradient graph in memory between passes (b/model_input_bs graphs), so a pass costs only its HVPs; auto: when they fit in a quarter of the free host (CPU) or GPU memory, measured on the first graph (recorded in the JSON); worker processes (--devices) always rebuild them")
    e.add_argument("--exact_below", type=int, default=EXACT_BELOW, help="form H exactly and use eigvalsh when the subset has at most this many entries (0 = always iterative)")
    e.add_argument("--reorth", choices=spectrum.REORTH, default="full", help="Lanczos reorthogonalization: full (every step against all stored vectors, O(n m^2) work and m vectors kept), selective (only against converged Ritz vectors; the basis still kept, may be on the host or disk), none (3 vectors, no basis: the scale choice; ghost copies of converged eigenvalues removed by the Cullum-Willoughby test; SLQ then runs without reorthogonalization too); selective and none need --block_size 1")
    vectors.add_flags(p)
    fsdp.add_flags(p)
    return p


def check_flags(args: argparse.Namespace) -> None:
    """Validate the spectrum's own flags (no model needed)."""
    for flag, low in (("top_k", 1), ("block_size", 1), ("max_iter", 1), ("trace_hvps", 3), ("slq_probes", 1), ("lanczos_steps", 1), ("density_points", 2), ("exact_below", 0)):
        if getattr(args, flag) < low:
            raise UserError(f"--{flag} must be at least {low}, got {getattr(args, flag)}")
    if not args.tol > 0:
        raise UserError(f"--tol must be positive, got {args.tol}")
    if args.reorth != "full" and args.block_size > 1:
        raise UserError(f"--reorth {args.reorth} runs single-vector Lanczos: use --block_size 1 (or --reorth full)")
    fsdp.check_flags(args)


def check_top_k(args: argparse.Namespace, n: int) -> None:
    """``--top_k`` per end (``--which both``: twice) must not exceed the subset's ``n`` entries."""
    want = args.top_k * (2 if args.which == "both" else 1)
    if want > n:
        raise UserError(f"--top_k {args.top_k} with --which {args.which} asks for {want} eigenvalues but the subset has only {n} entries")


def build_subset(model: nn.Module, args: argparse.Namespace) -> Subset:
    """``--params`` globs, else the exact scripts' subsets (several layers / several blocks / one block)."""
    if args.params:
        return params_subset(model, args.params)
    if args.num_layers is not None:
        return several_layers_several_blocks(model, args.num_layers, args.num_blocks or num_blocks(model), args.t)
    if args.num_blocks is not None:
        return single_layer_several_blocks(model, args.layer_name, args.num_blocks, args.t)
    return single_layer_single_block(model, args.layer_name, args.block_index, args.t)


def slice_table(model: nn.Module, subset: Subset) -> list[dict[str, Any]]:
    """Where each slice's entries sit in ``x`` (eigenvectors' rows): ``{param, shape, offset, size, whole}``."""
    out, offset = [], 0
    for sl in subset.slices:
        shape = list(model.get_parameter(sl.param_name).shape)
        whole = len(sl) == model.get_parameter(sl.param_name).numel() and bool((sl.flat_index == torch.arange(len(sl))).all())
        out.append({"param": sl.param_name, "shape": shape, "offset": offset, "size": len(sl), "whole_in_storage_order": whole})
        offset += len(sl)
    return out


def subset_tag(args: argparse.Namespace) -> str:
    if args.params:
        return "params-" + "+".join(args.params).replace("*", "x").replace("/", "-")[:80]
    if args.num_layers is not None:
        return f"layers{args.num_layers}_blocks{args.num_blocks}"
    if args.num_blocks is not None:
        return f"{args.layer_name}_blocks{args.num_blocks}"
    return f"{args.layer_name}_block{args.block_index}"


def default_name(args: argparse.Namespace) -> str:
    """Readable stem plus a hash of every result-defining flag, the seed included (random start vectors and probes)."""
    model = Path(args.model.rstrip("/")).name
    return outputs.default_name(f"hessian_spectrum_{model}_{subset_tag(args)}_b{args.b}_s{args.seqlen}".replace("/", "-"), args)


class PassLog:
    """The finished passes of a run, one file each: ``<dir>/pass_NNNNN.pt = {"input": sha256 of V, "output": H V}``.

    :meth:`__call__` is the ``matmat`` given to :mod:`lib.spectrum`: it replays recorded passes (checking
    that the algorithm asks for the same ``V``) and computes, records and returns the others.
    """

    def __init__(self, directory: Path | None, config: dict[str, Any], resume: bool, run_pass, bar=None, suffix: str = "", agree=None):
        self.dir, self.run_pass, self.bar, self.suffix = directory, run_pass, bar, suffix
        self.calls = self.replayed = self.hvps = 0
        self.replayable = 1 << 62
        """Passes that may be replayed: under FSDP (each rank logs its shard, ``suffix``), those every rank has (``agree``: a min over ranks)."""
        if directory is None:
            return
        cfg_file = directory / f"config{suffix}.json"
        text = json.dumps(config, sort_keys=True, default=str)
        if directory.exists() and not resume and any(directory.glob("pass_*.pt")):
            raise UserError(f"pass log {directory} exists from an earlier run; pass --resume to continue it, or delete it to start over")
        if resume and cfg_file.exists() and cfg_file.read_text() != text:
            raise UserError(f"pass log {directory} is from a different configuration; delete it to start over")
        directory.mkdir(parents=True, exist_ok=True)
        cfg_file.write_text(text)
        if agree is not None:
            have = 0
            while resume and (directory / f"pass_{have:05d}{suffix}.pt").exists():
                have += 1
            self.replayable = agree(have)

    def __call__(self, v: torch.Tensor) -> torch.Tensor:
        i = self.calls
        self.calls += 1
        self.hvps += v.shape[1]
        d = digest(v)
        f = None if self.dir is None else self.dir / f"pass_{i:05d}{self.suffix}.pt"
        if f is not None and f.exists() and i < self.replayable:
            rec = torch.load(f, weights_only=True)
            if rec["input"] != d:
                raise RunError(f"{f} was recorded for a different block than the resumed run asks for; delete {self.dir} to start over")
            self.replayed += 1
            out = rec["output"]
        else:
            out = self.run_pass(v, i)
            if f is not None:
                atomic_write_bytes(f, lambda p: torch.save({"input": d, "output": out.cpu()}, p))
        if self.bar is not None:
            self.bar.update(1)
        return out


def make_run_pass(args: argparse.Namespace, prep: cli.Prepared, op: HessianOperator, out: Path, name: str, pool: parallel.WorkerPool | None = None):
    """``run_pass(V, i)``: ``H V`` by one :class:`HVPJob` through :func:`lib.parallel.run_job` (checkpointed inside the pass);
    with several devices, every pass runs on ``pool`` (workers and their models kept between passes); under
    torchrun every rank receives rank 0's result."""
    every_units, every_s = ckpt.parse_every(args.checkpoint_every)
    distributed = parallel.distributed_env() is not None
    if distributed:
        parallel.init_process_group(prep.devices[0])

    def run_pass(v: torch.Tensor, i: int) -> torch.Tensor:
        path = out / f"{name}.ckpt"
        cfg = ckpt.CheckpointConfig(path, every_units, every_s, resume=args.resume and path.exists(), keep=False)
        settings = parallel.RunSettings(devices=prep.devices or [prep.device], checkpoint=cfg, progress=False, unit_timeout=args.unit_timeout, pool=pool)
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
        "moments": {str(m): dict(zip(("estimate", "stderr"), d.moment(m))) for m in range(3)},
        "hvps": d.hvps,
        "passes": d.passes,
    }


def density_figure(d: spectrum.SLQResult, top: list[float], path_stem: Path, title: str) -> list[Path]:
    """The density on a log axis with the computed extreme eigenvalues ``top`` marked (``<path_stem>.pdf/.png``)."""
    from .plots import _pyplot, _save

    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4))
    vals = d.values.clamp_min(1e-300)
    ax.semilogy(d.grid.numpy(), vals.numpy(), lw=1.2, label="SLQ density" if d.passes else "density of the exact eigenvalues")
    for j, lam in enumerate(top):
        ax.axvline(lam, color="C3", ls="--", lw=0.8, label="extreme eigenvalues (--top_k, --which)" if j == 0 else None)
    floor = float(d.values.max()) * 1e-8
    ax.set_ylim(bottom=max(floor, 1e-300))
    ax.set_xlabel("eigenvalue")
    ax.set_ylabel("density")
    ax.set_title("\n".join(textwrap.wrap(title, 90)), fontsize=8)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return _save(fig, path_stem)


@outputs.guarded
def run(argv: list[str] | None, description: str) -> dict[str, Any]:
    t_start = time.perf_counter()
    args = build_parser(description).parse_args(argv)
    cli.resolve_defaults(args, T_DEFAULT)
    check_flags(args)
    cli.check_cheap(args)
    name = args.name or default_name(args)
    out = Path(args.output_dir)
    cli.claim_outputs(args, name, [out / f"{name}.ckpt", out / f"{name}.passes"])
    prep, subset = cli.prepare(args, lambda m: build_subset(m, args))
    n = subset.size
    check_top_k(args, n)
    dtype_bytes = cli.DTYPES[args.dtype].itemsize
    exact_path = bool(args.exact_below and n <= args.exact_below and not args.fsdp)
    world = int(os.environ.get("WORLD_SIZE", "1")) if args.fsdp else 1
    vdtype = vectors.vector_dtype(args.vector_dtype, cli.DTYPES[args.dtype])
    if exact_path:
        est = preflight.exact_estimate(n, dtype_bytes)
    else:
        stored = preflight.stored_vectors(args.block_size, args.max_iter, args.reorth, args.eigenvectors, args.top_k, args.trace_hvps if args.trace else 0, args.density, args.slq_probes, args.lanczos_steps)
        on_gpu = args.fsdp and prep.devices[0].type == "cuda"
        storage = vectors.choose_storage(args.vector_storage, -(-n // world) * stored * vdtype.itemsize, preflight.free_device_bytes(prep.devices[0]) if on_gpu else None, preflight.available_host_bytes())
        log_vectors = args.block_size * args.max_iter + (2 * args.trace_hvps if args.trace else 0) + (args.slq_probes * args.lanczos_steps if args.density else 0)
        est = preflight.spectrum_estimate(n, args.block_size, stored, dtype_bytes, vdtype.itemsize, storage, world, log_vectors, on_gpu)
    cli.check_resources(args, prep, est, "a smaller subset, fewer --max_iter or --lanczos_steps, a smaller --block_size, --reorth none, --vector_storage disk, --vector_dtype working, or --exact_below 0 for large subsets")
    spec = cli.model_spec(args, prep)
    rank0 = parallel.distributed_env() is None or parallel.distributed_env()[0] == 0
    fused = False if args.no_fused_head else None
    fd = finite_difference.settings_from(args)
    op = HessianOperator(prep.model, subset, prep.samples, args.model_input_bs, args.chunk or None, fused, spec=spec, keep_graphs=KEEP_GRAPHS[args.keep_graphs], hvp=args.hvp, fd=fd)
    meta: dict[str, Any] = {"script": "hessian_spectrum", "config": vars(args), "subset": subset.description, "n": n, "n_samples": int(prep.samples.shape[0]), "n_tokens": op.n_tokens}
    saved: dict[str, torch.Tensor] = {}
    kept: list[ckpt.CheckpointConfig | None] = [ckpt.CheckpointConfig(out / f"{name}.passes", every_units=1)]  # where finished passes are
    t0 = time.perf_counter()
    if exact_path:
        job = ExactHessianJob(subset, prep.samples, args.model_input_bs, args.method, args.chunk or None, fused, spec=spec, model=prep.model, fd=fd)
        settings = cli.run_settings(args, prep, out / f"{name}.ckpt", "Hessian columns")
        sums = parallel.run_job(job, settings)
        if sums is None:
            return {}
        h = job.result(sums, time.perf_counter() - t0).hessian.to(torch.float64)
        if fd is not None:  # rows H e_i by finite differences: report their asymmetry, diagonalize the symmetric part
            meta["hvp"] = finite_difference.exact_script_report(fd, h, sums)
            h = (h + h.T) / 2
        ev, vecs = torch.linalg.eigh(h)
        idx = spectrum._wanted(ev, args.top_k, args.which)
        resid = (h @ vecs[:, idx] - vecs[:, idx] * ev[idx]).norm(dim=0)
        dens = spectrum.exact_density(ev, args.density_points)
        meta.update(path="exact", eigenvalues=ev[idx].tolist(), residuals=resid.tolist(), converged=[True] * len(idx), all_eigenvalues=ev.tolist(), trace={"exact": float(h.trace())}, density=density_json(dens), hvps=n, passes=1)
        saved.update(hessian=h, eigenvalues=ev[idx], all_eigenvalues=ev)
        if args.eigenvectors:
            saved["eigenvectors"] = vecs[:, idx]
        kept = [settings.checkpoint]
    else:
        total = args.max_iter + (3 if args.trace else 0) + (args.lanczos_steps if args.density else 0)
        bar = None
        if rank0 and not args.no_progress:
            from tqdm.auto import tqdm

            bar = tqdm(total=total, desc="passes over the samples", dynamic_ncols=True)
        log_cfg = {"subset": hashlib.sha256("".join(digest(s.flat_index) for s in subset.slices).encode()).hexdigest(), "params": subset.param_names, "samples": digest(prep.samples), "model": spec.identity(), "model_input_bs": args.model_input_bs, "seed": args.seed, "fused_head": fused}
        log_cfg.update({} if fd is None else {"hvp": fd.describe(cli.DTYPES[args.dtype])}, **({"vectors": args.vector_dtype} if args.vector_dtype != "float64" else {}))
        pool = parallel.WorkerPool(prep.devices or [prep.device])  # spawns workers only for several devices
        if args.fsdp:  # every rank logs its shard of each pass
            sop = fsdp.sharded_operator(prep, subset, args.model_input_bs, fd, vdtype)
            space, log_cfg["world_size"] = sop.space, world
            log = PassLog(out / f"{name}.passes", log_cfg, args.resume, lambda v, i: sop.matmat(v), bar, f".rank{sop.rank}of{world}", fsdp.agree_min)
        else:
            space = vectors.local_space(n, dtype=vdtype)
            log = PassLog(out / f"{name}.passes" if rank0 else None, log_cfg, args.resume, make_run_pass(args, prep, op, out, name, pool), bar)
        store = dict(space=space, storage=storage, storage_dir=out / f"{name}.vectors")
        try:
            eig = spectrum.lanczos(log, n, args.top_k, args.which, args.block_size, args.tol, args.max_iter, seed=args.seed, reorth=args.reorth, eigenvectors=args.eigenvectors, **store)
            if bar is not None:
                bar.total -= args.max_iter - eig.passes
                bar.refresh()
            meta.update(path="iterative", eigenvalues=eig.eigenvalues.tolist(), residuals=eig.residuals.tolist(), converged=eig.converged.tolist(), lanczos={"hvps": eig.hvps, "passes": eig.passes, "ritz_values": eig.ritz_values.tolist(), "invariant_subspace": eig.breakdown, "reorth": eig.reorth, "ghosts_removed": eig.ghosts, "stored_vectors": eig.stored_vectors})
            saved.update(eigenvalues=eig.eigenvalues, residuals=eig.residuals, ritz_values=eig.ritz_values)
            if args.eigenvectors:
                saved["eigenvectors"] = eig.eigenvectors
            if args.trace:
                hutch = spectrum.hutchinson_trace(log, n, args.trace_hvps, seed=args.seed + 1, space=space)
                hpp = spectrum.hutchpp_trace(log, n, args.trace_hvps, seed=args.seed + 2, space=space)
                meta["trace"] = {"hutchinson": hutch.as_dict(), "hutch++": hpp.as_dict()}
            if args.density:
                dens = spectrum.slq(log, n, args.slq_probes, args.lanczos_steps, seed=args.seed + 3, grid_points=args.density_points, reorth=args.reorth, **store)
        finally:
            pool.close()
            if bar is not None:
                bar.close()
        meta.update(hvps=log.hvps, passes=log.calls, replayed_passes=log.replayed, workers={"spawned": pool.started, "passes_run": pool.jobs}, **(sop.report() if args.fsdp else op.report()))
        meta["vectors"] = {"dtype": str(vdtype).removeprefix("torch."), "storage": storage, "peak_stored_bytes": space.peak_stored_bytes}
        meta["memory"] = sop.gather_memory() if args.fsdp else [fsdp.process_memory(prep.model, n * dtype_bytes, space)]
        if args.fsdp:
            fsdp.finish()  # every rank has written its pass files before rank 0 removes them
    if not rank0:
        return {}
    if args.density:
        meta["density"] = density_json(dens)
        saved.update(ritz_values_slq=dens.ritz_values, ritz_weights_slq=dens.ritz_weights, density_grid=dens.grid, density=dens.values)
    meta.update(spectrum_elapsed_s=time.perf_counter() - t0, elapsed_s=time.perf_counter() - t_start, slices=slice_table(prep.model, subset))
    if n <= ENTRIES_MAX and not all(sl["whole_in_storage_order"] for sl in meta["slices"]):
        meta["entries"] = subset.entries(prep.model)
    outputs.saving_results(kept)
    meta["fingerprints"] = prep.fingerprints
    figures: list[Path] = []
    if "density" in meta:
        title = f"Hessian spectral density, {subset.description}; {args.model}, b={args.b}, seqlen={args.seqlen} ({meta['path']} path{', finite-difference HVPs' if fd else ''})"
        figures = density_figure(dens, meta["eigenvalues"], out / f"{name}_density", title)
    meta["figures"] = [p.name for p in figures]
    meta = save_tensor_and_json(out, name, saved, meta)
    if meta["path"] == "exact":
        ckpt.finish(kept[0])
    if meta["path"] == "iterative" and not args.keep_checkpoint:
        shutil.rmtree(out / f"{name}.passes", ignore_errors=True)
    shutil.rmtree(out / f"{name}.vectors", ignore_errors=True)  # --vector_storage disk (every rank's blocks are gone already)
    top = ", ".join(f"{v:.6g}" for v in meta["eigenvalues"])
    print(f"{meta['path']} path, n={n}: eigenvalues [{top}] with {meta['hvps']} HVPs in {meta['passes']} passes ({meta['spectrum_elapsed_s']:.1f}s)")
    if not all(meta["converged"]):
        warn(f"{meta['converged'].count(False)} of {len(meta['converged'])} eigenvalues did not converge within --max_iter {args.max_iter} passes (residuals in the JSON); raise --max_iter or --tol")
    print("wrote " + ", ".join(str(out / f) for f in [*meta["files"].values(), *meta["figures"]]), file=sys.stderr)
    return meta
