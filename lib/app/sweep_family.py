"""``hessian_sweep.py``'s family of the pipeline (:mod:`lib.app.pipeline`): the units, the checkpoints, resumable
stages, the tidy table and its figures.

Every checkpoint (``--revisions`` of one hub model, or several ``--model`` directories) is swept by
:func:`lib.hessian.sweep.sweep` on the *same* samples (the first model's tokenizer) and the same probe seeds, so differences
between checkpoints are the model's. Each finished stage of each checkpoint (the trace pilot, the shared trace, each
unit) is written atomically to ``<output_dir>/<name>.sweep/`` with the hash of everything it depends on (the spec's
result fields, the checkpoint's weight fingerprint, the samples' digest, the units); ``--resume`` reuses the stages
whose hash matches and refuses a stage made by another configuration or other weights. Products are deterministic
(fixed ``--chunk``), so a resumed sweep's numbers are bitwise those of an uninterrupted one.
"""

from __future__ import annotations

import csv
import dataclasses
import hashlib
import io
import json
import math
import re
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import UserError
from ..hessian import sweep
from ..model.inputs import model_fingerprint, warn
from ..model.models import ModelSpec
from ..model.revisions import hub_repo_cache, loaded_commit, resolve_commit
from ..products.operator import digest
from ..runtime import parallel, ranks
from ..runtime.checkpoint import config_hash
from . import outputs
from .pipeline import Family, Run
from .results import atomic_write_bytes
from .spec import SweepSpec
from .sweep_ranks import rank_store

KEEP_GRAPHS = {"auto": "auto", "on": True, "off": False}
TABLE_COLUMNS = (
    "checkpoint",
    "step",
    "commit",
    "fingerprint",
    *sweep.ROW_FIELDS[1:],
)
"""The CSV's columns: the checkpoint's identity, then :data:`lib.hessian.sweep.ROW_FIELDS`."""
SIGNED = ("trace", "top", "bottom", "density_moment1", "diag_min", "diag_max")
"""Quantities drawn with a diverging colour map centred at 0."""


def checkpoint_step(name: str, path: Path | None = None) -> int | None:
    """The training step of a checkpoint: ``step<N>`` / ``step-<N>`` / ``checkpoint-<N>`` in its revision or directory
    name, else ``global_step`` of a ``trainer_state.json`` in the directory; None when neither says."""
    m = re.search(r"(?:step|checkpoint)[-_]?(\d+)", Path(str(name)).name)
    if m:
        return int(m.group(1))
    if path is not None and (path / "trainer_state.json").is_file():
        try:
            return int(json.loads((path / "trainer_state.json").read_text())["global_step"])
        except (ValueError, KeyError, OSError):
            return None
    return None


def cached_revisions(model_id: str, cache_dir: str | None) -> set[str]:
    """The revisions of hub model ``model_id`` in the local hub cache (``cache_dir``, else the hub library's): the
    branch and tag names under ``refs/`` and the commit hashes under ``snapshots/``."""
    root = hub_repo_cache(model_id, cache_dir)
    refs = root / "refs"
    names = (
        {p.relative_to(refs).as_posix() for p in refs.rglob("*") if p.is_file()}
        if refs.is_dir()
        else set()
    )
    snaps = root / "snapshots"
    return names | ({p.name for p in snaps.iterdir()} if snaps.is_dir() else set())


def _hub_has_revision(model_id: str, revision: str) -> bool | None:
    """Whether the hub knows ``revision`` of ``model_id`` (None: it could not say, e.g. a gated model or an error)."""
    from huggingface_hub import HfApi
    from huggingface_hub.errors import RevisionNotFoundError

    try:
        HfApi().model_info(model_id, revision=revision)
    except RevisionNotFoundError:
        return False
    except Exception:  # noqa: BLE001 -- gated, private, network: loading will say
        return None
    return True


def check_revisions(
    model_id: str, revisions: tuple[str, ...], cache_dir: str | None, has_revision=_hub_has_revision
) -> None:
    """Refuse (:class:`UserError`, before any weight is read) a revision that does not exist: asked of the hub
    (``has_revision(model_id, revision)``) when it is reachable, else looked up in the local cache (offline mode:
    only cached revisions can load). A commit hash prefix of a cached snapshot counts as cached."""
    from ..model.inputs import hub_offline, hub_offline_if_unreachable

    hub_offline_if_unreachable()
    if hub_offline():
        cached = cached_revisions(model_id, cache_dir)
        for r in revisions:
            if r not in cached and not (len(r) >= 7 and any(c.startswith(r) for c in cached)):
                raise UserError(
                    f"--revisions {r}: not in the local cache of {model_id} "
                    f"({', '.join(sorted(cached)) or 'no revision cached'}) and the hub is offline or unreachable; "
                    "connect, or pick a cached revision"
                )
        return
    for r in revisions:
        if has_revision(model_id, r) is False:
            raise UserError(
                f"--revisions {r}: {model_id} has no such revision on the hub (branches and tags are listed at "
                f"https://huggingface.co/{model_id}/tree/main)"
            )


class DirStore:
    """A :class:`lib.hessian.sweep.PassStore` on disk: one file per stage in ``directory``, written atomically, holding
    the stage's value and the hash ``config`` of what it was computed from; a stage file of another configuration is
    refused on resume. The unfinished stage's products go to ``directory/passes/<stage hash>/<k>.pt`` (removed once
    the stage is stored), so a unit killed mid-way replays its finished products."""

    def __init__(self, directory: Path, config: str, label: str):
        self.dir, self.config, self.label = directory, config, label
        self.reused = 0
        self.replayed = 0

    def _path(self, key: str) -> Path:
        return self.dir / f"{hashlib.sha256(f'{self.label}|{key}'.encode()).hexdigest()[:20]}.pt"

    def _load(self, p: Path, what: str, weights_only: bool) -> Any:
        """The payload of ``p``, or None when it is absent or torn (recomputed); refused in one line when it was
        written for another configuration or other weights (``what`` names it in the message)."""
        if not p.exists():
            return None
        try:
            payload = torch.load(p, weights_only=weights_only)
        except Exception:  # noqa: BLE001 -- a torn file: recompute it
            return None
        if payload.get("config") != self.config:
            raise UserError(
                f"{what} was made with another configuration, other weights or another commit than this run's; "
                "pass the same flags and models, or delete the .sweep directory to start over"
            )
        return payload

    def get(self, key: str) -> Any:
        p = self._path(key)
        payload = self._load(p, f"checkpoint {p} (stage {key} of {self.label})", weights_only=False)
        if payload is None:
            return None
        self.reused += 1
        return payload["value"]

    def put(self, key: str, value: Any) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        payload = {"key": key, "checkpoint": self.label, "config": self.config, "value": value}
        atomic_write_bytes(self._path(key), lambda p: torch.save(payload, p))

    def _passes(self, stage: str) -> Path:
        tag = hashlib.sha256(f"{self.label}|{stage}".encode()).hexdigest()[:20]
        return self.dir / "passes" / tag

    def get_pass(self, stage: str, k: int) -> Any:
        """Product ``k`` of the unfinished ``stage`` (``{"input", "output"}``), or None (absent or torn)."""
        p = self._passes(stage) / f"{k:05d}.pt"
        payload = self._load(p, f"pass file {p} (stage {stage} of {self.label})", weights_only=True)
        if payload is not None:
            self.replayed += 1
        return payload

    def put_pass(self, stage: str, k: int, value: Any) -> None:
        d = self._passes(stage)
        d.mkdir(parents=True, exist_ok=True)
        payload = {"config": self.config, **value}
        atomic_write_bytes(d / f"{k:05d}.pt", lambda p: torch.save(payload, p))

    def drop_passes(self, stage: str) -> None:
        shutil.rmtree(self._passes(stage), ignore_errors=True)


def _load_checkpoint(run: Run, i: int, name: str, commit: str | None = None) -> nn.Module:
    """Checkpoint ``i`` (``name``: a revision of ``--model`` or a model): the run's loaded model for the first model,
    else loaded the same way (a revision by its resolved ``commit`` when there is one)."""
    spec = run.spec
    if i == 0 and (not spec.subset.revisions or (commit or name) == run.revision):
        return run.model
    from ..model.models import load_model

    m = spec.model
    return load_model(
        m.model if spec.subset.revisions else name,
        cache_dir=m.cache_dir,
        dtype=run.dtype,
        device=run.device,
        attn_implementation=m.attn_implementation,
        device_map=spec.run.device_map,
        revision=(commit or name) if spec.subset.revisions else None,
    )


def worker_runner(
    run: Run,
    pool: parallel.WorkerPool,
    model: nn.Module,
    name: str,
    fingerprint: str,
    revision: str | None = None,
) -> tuple[ModelSpec | None, Any]:
    """With several ``--devices``: how the workers load checkpoint ``name`` (a :class:`ModelSpec` checked against its
    fingerprint; with ``revision``, that revision of ``--model``) and ``runner(job)``, every pass of every unit
    spread by batches over ``pool``'s workers (:func:`lib.runtime.parallel.run_job`: the partial sums added in batch
    order, so the products are bitwise the one-process ones); under torchrun, ``(None, runner)`` splitting the
    batches over the ranks (:func:`lib.app.sweep_ranks.rank_runner`); ``(None, None)`` on one device."""
    if parallel.distributed_env() is not None:
        from .sweep_ranks import rank_runner

        return None, rank_runner(run, fingerprint)
    if len(run.devices) < 2:
        return None, None
    from ..model.inputs import code_path, config_fingerprint

    mspec = run.model_spec()
    if model is not run.model:
        mspec = dataclasses.replace(
            mspec,
            name=run.spec.model.model if revision else name,
            revision=revision,
            fingerprint=fingerprint,
            config_fingerprint=config_fingerprint(model),
            code=code_path(model),
        )
    r = run.spec.run
    settings = parallel.RunSettings(
        devices=run.devices,
        unit_timeout=r.unit_timeout,
        setup_timeout=r.setup_timeout,
        pool=pool,
        identity=run.identity(),
    )
    passes: dict[str, Any] = {"passes": 0, "workers": 0, "units_run": 0}

    def runner(job: Any) -> Any:
        sums = parallel.run_job(job, settings)
        st = settings.stats
        passes["passes"] += 1
        passes["workers"] = max(passes["workers"], st.get("workers", 0))
        passes["units_run"] += st.get("units_run", 0)
        return sums

    runner.stats = passes  # type: ignore[attr-defined]
    return mspec, runner


def settings_of(spec: SweepSpec) -> sweep.SweepSettings:
    c = spec.compute
    return sweep.SweepSettings(
        trace_rel=c.trace_rel,
        min_probes=c.min_probes,
        max_probes=c.max_probes,
        probe_round=c.min_probes,
        tol=c.tol,
        max_iter=c.max_iter,
        slq_probes=c.slq_probes,
        lanczos_steps=c.lanczos_steps,
        trace_estimator=c.trace_estimator,
        strategy=c.strategy,
        seed=c.seed,
        chunk=c.chunk,
        keep_graphs=KEEP_GRAPHS[c.keep_graphs],
        model_input_bs=spec.data.model_input_bs,
    )


def table_csv(rows: list[dict[str, Any]]) -> str:
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=list(TABLE_COLUMNS), lineterminator="\n")
    w.writeheader()
    for r in rows:
        w.writerow({k: ("" if r[k] is None else r[k]) for k in TABLE_COLUMNS})
    return buf.getvalue()


def _grid(rows: list[dict[str, Any]], quantity: str) -> tuple[list[int], list[str], torch.Tensor]:
    """``(blocks, columns, values (blocks, columns))`` of one checkpoint's quantity: columns are the layer names,
    the heads (``head h``) or one whole-block column."""
    sel = [r for r in rows if r["quantity"] == quantity]
    blocks = sorted({r["block"] for r in sel})
    col = lambda r: f"head {r['head']}" if r["head"] >= 0 else r["layer"]  # noqa: E731
    cols = list(dict.fromkeys(col(r) for r in sel))
    v = torch.full((len(blocks), len(cols)), float("nan"), dtype=torch.float64)
    for r in sel:
        v[blocks.index(r["block"]), cols.index(col(r))] = r["estimate"]
    return blocks, cols, v


def heatmap_figure(
    rows: list[dict[str, Any]], quantities: list[str], stem: Path, title: str
) -> list[Path]:
    """One panel per quantity: block (rows) x layer or head (columns); signed quantities on a diverging colour
    map centred at 0."""
    from .plots import _pyplot, _save, fit_title

    plt = _pyplot()
    n = len(quantities)
    ncols = min(n, 3)
    nrows = -(-n // ncols)
    blocks, cols, _ = _grid(rows, quantities[0])
    w = max(3.2, 0.55 * len(cols) + 1.8)
    fig, axes = plt.subplots(
        nrows,
        ncols,
        figsize=(w * ncols, 0.5 * len(blocks) + 2.2)
        if nrows == 1
        else (w * ncols, (0.5 * len(blocks) + 2) * nrows),
        layout="constrained",
        squeeze=False,
    )
    for k, q in enumerate(quantities):
        ax = axes[k // ncols][k % ncols]
        blocks, cols, v = _grid(rows, q)
        finite = v[torch.isfinite(v)]
        signed = q in SIGNED and finite.numel() and float(finite.min()) < 0
        if signed:
            m = float(finite.abs().max()) or 1.0
            im = ax.imshow(v.numpy(), cmap="RdBu_r", vmin=-m, vmax=m, aspect="auto")
        else:
            im = ax.imshow(v.numpy(), cmap="viridis", aspect="auto")
        ax.set_xticks(
            range(len(cols)), [c.split(".")[-1] for c in cols], rotation=45, ha="right", fontsize=8
        )
        ax.set_yticks(range(len(blocks)), [f"block {b}" for b in blocks], fontsize=8)
        ax.set_title(q, fontsize=10)
        fig.colorbar(im, ax=ax, shrink=0.8)
    for k in range(n, nrows * ncols):
        axes[k // ncols][k % ncols].axis("off")
    fit_title(fig, title)
    return _save(fig, stem)


def steps_figure(
    rows: list[dict[str, Any]], quantities: list[str], stem: Path, title: str
) -> list[Path]:
    """Each quantity against the training step (else the checkpoint's index), one line per unit, with its error bar."""
    from .plots import _pyplot, _save, fit_title

    plt = _pyplot()
    n = len(quantities)
    ncols = min(n, 3)
    nrows = -(-n // ncols)
    fig, axes = plt.subplots(
        nrows, ncols, figsize=(4.6 * ncols, 3.6 * nrows), layout="constrained", squeeze=False
    )
    labels = list(dict.fromkeys(r["checkpoint"] for r in rows))
    steps = {r["checkpoint"]: r["step"] for r in rows}
    use_steps = all(steps[c] is not None for c in labels)
    for k, q in enumerate(quantities):
        ax = axes[k // ncols][k % ncols]
        units = list(dict.fromkeys(r["unit"] for r in rows if r["quantity"] == q))
        for u in units:
            sel = [r for r in rows if r["quantity"] == q and r["unit"] == u]
            x = [
                steps[r["checkpoint"]] if use_steps else labels.index(r["checkpoint"]) for r in sel
            ]
            err = [
                r["error"] if r["error_kind"] == "stderr" and math.isfinite(r["error"]) else 0
                for r in sel
            ]
            ax.errorbar(
                x, [r["estimate"] for r in sel], yerr=err, lw=0.8, marker="o", ms=2.5, label=u
            )
        ax.set_xlabel("training step" if use_steps else "checkpoint")
        ax.set_title(q, fontsize=10)
        if len(units) <= 8:
            ax.legend(fontsize=6)
    for k in range(n, nrows * ncols):
        axes[k // ncols][k % ncols].axis("off")
    fit_title(fig, title)
    return _save(fig, stem)


def row_quantities(spec: SweepSpec) -> list[str]:
    """The table's quantity names of the requested ``--quantities``, in order."""
    names = {
        "trace": ["trace"],
        "top": ["top"],
        "bottom": ["bottom"],
        "frobenius": ["frobenius"],
        "diagonal": ["diag_min", "diag_max", "diag_abs_mean", "diag_negative_fraction"],
        "density": ["density_negative_mass", "density_moment1", "density_moment2"],
    }
    return [n for q in sweep.QUANTITIES if q in spec.compute.quantities for n in names[q]]


def _stage_bar(spec: SweepSpec, total: int) -> Any:
    """The progress bar over the sweep's stages (checkpoint x unit), or ``None`` with ``--no_progress``."""
    if spec.output.no_progress or ranks.this_rank() != 0:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, desc="sweep stages (checkpoint x unit)", dynamic_ncols=True)


@dataclasses.dataclass(frozen=True)
class _SweepRun:
    """What every checkpoint of one sweep shares: the run, its worker pool, the products (``fd``), the settings,
    the quantities, the stages' directory and the samples' digest."""

    run: Run
    pool: parallel.WorkerPool
    fd: Any
    settings: sweep.SweepSettings
    quantities: list[str]
    store_dir: Path
    samples_digest: str

    def checkpoint(
        self, i: int, cname: str, progress: Callable[[str], None]
    ) -> tuple[list[dict[str, Any]], dict[str, Any]]:
        """Sweep checkpoint ``i`` (``cname``) with its stages kept in a :class:`DirStore` under the hash of what they
        depend on; its table rows (labelled with the checkpoint's identity) and its entry of the JSON's
        ``checkpoints``."""
        run = self.run
        t0 = time.perf_counter()
        m, revs = run.spec.model, run.spec.subset.revisions
        commit = resolve_commit(m.model, cname, m.cache_dir) if revs else None
        model = _load_checkpoint(run, i, cname, commit)
        fp = run.fingerprints["model"] if model is run.model else model_fingerprint(model)
        mspec, runner = worker_runner(
            run, self.pool, model, cname, fp, (commit or cname) if revs else None
        )
        local = Path(cname) if not revs and Path(cname).is_dir() else None
        ident = {
            "checkpoint": cname,
            "step": checkpoint_step(cname, local),
            "commit": commit
            or getattr(model.config, "_commit_hash", None)
            or (None if revs else loaded_commit(cname, m.cache_dir)),
            "fingerprint": fp,
        }
        cfg = config_hash(
            {
                **run.identity(),
                "checkpoint": cname,
                "fingerprint": fp,
                **({"commit": ident["commit"]} if ident["commit"] else {}),
                "samples": self.samples_digest,
                "units": [(u.name, u.size) for u in run.structure],
            }
        )
        # under torchrun rank 0 reads and writes the stage files (sweep_ranks.RankStore)
        store = rank_store(DirStore(self.store_dir, cfg, f"{i}:{cname}"))
        fd = self.fd
        mk = lambda subset, model=model, mspec=mspec, runner=runner, **kw: (  # noqa: E731
            sweep.HessianOperator(
                model, subset, run.samples, products=fd, spec=mspec, run=runner, **kw
            )
        )
        if run.spec.compute.fsdp:  # the model sharded over the torchrun ranks, whole unit vectors
            from .sweep_fsdp import operator_maker

            mk = operator_maker(run, model, sweep.union_subset(run.structure)[0])
        res = sweep.sweep(
            model,
            run.samples,
            run.structure,
            self.quantities,
            self.settings,
            cname,
            store,
            progress,
            mk,
        )
        rows = [{**r.as_dict(), **ident} for r in res.rows]
        entry = {
            **ident,
            "trace_estimator": res.trace,
            "hvps": res.hvps,
            "stages_reused": store.reused,
            "products_replayed": store.replayed,
            "workers": getattr(runner, "stats", None),
            "seconds": time.perf_counter() - t0,
            "operator": res.operator,
        }
        return rows, entry


@dataclass(frozen=True)
class SweepComputed:
    """What :meth:`SweepFamily.compute` hands to :meth:`SweepFamily.save`: the JSON fields (``meta``) and the tidy
    table's rows (``table``, one dict per checkpoint x unit x quantity, the CSV's columns)."""

    meta: dict[str, Any]
    table: list[dict[str, Any]]


class SweepFamily(Family):
    name = "sweep"
    identity_sections = ("model", "data", "subset", "compute")

    def default_name(self, spec: SweepSpec) -> str:
        model = Path(spec.model.model.rstrip("/")).name
        s = spec.subset
        many = f"_{len(spec.checkpoint_names())}ckpts" if len(spec.checkpoint_names()) > 1 else ""
        return outputs.default_name(
            f"hessian_sweep_{model}{many}_{s.over}_b{spec.data.b}_s{spec.data.seqlen}".replace(
                "/", "-"
            ),
            spec.digest(),
        )

    def checkpoints(self, spec: SweepSpec, out: Path, name: str) -> list[Path]:
        return [out / f"{name}.sweep"]

    def files(self, spec: SweepSpec, name: str) -> list[str]:
        figs = ["_heatmap"] + (["_steps"] if len(spec.checkpoint_names()) > 1 else [])
        return [*outputs.planned_files(name, figs), f"{name}.csv", f"{name}.jsonl"]

    def products_per_sample(self, spec: SweepSpec, structure: Any) -> int:
        return 100  # tens of passes over the samples: batch samples per forward when memory allows

    def load_revision(self, spec: SweepSpec) -> str | None:
        """With ``--revisions``: refuses an unknown name (:func:`check_revisions`) before anything of the model is
        read, then the first revision's commit (:func:`lib.model.revisions.resolve_commit`, else its name), whose
        config, tokenizer and weights the run loads (its samples, and its first checkpoint when still there)."""
        r, m = spec.subset.revisions, spec.model
        if not r:
            return None
        check_revisions(m.model, r, m.cache_dir)
        return resolve_commit(m.model, r[0], m.cache_dir) or r[0]

    def structure(self, model: nn.Module, spec: SweepSpec) -> tuple[sweep.Unit, ...]:
        return sweep.make_units(model, spec.subset.over, spec.subset.params)

    def param_names(self, structure: Any) -> list[str]:
        return list(dict.fromkeys(s.param_name for u in structure for s in u.slices))

    def compute(self, run: Run) -> SweepComputed | None:
        spec: SweepSpec = run.spec
        units = run.structure
        settings = settings_of(spec)
        quantities = list(spec.compute.quantities)
        names = spec.checkpoint_names()
        store_dir = run.out / f"{run.name}.sweep"
        per_ckpt = len(units) + (1 if "trace" in quantities else 0)
        bar = _stage_bar(spec, per_ckpt * len(names))
        samples_digest = digest(run.samples)
        table: list[dict[str, Any]] = []
        per_checkpoint: list[dict[str, Any]] = []
        hvps = 0
        fd = run.products()
        pool = parallel.WorkerPool(run.devices)  # spawns workers only for several devices

        def progress(stage: str) -> None:
            if bar is not None and stage != "shared trace":
                bar.update(1)

        sweep_run = _SweepRun(run, pool, fd, settings, quantities, store_dir, samples_digest)
        try:
            for i, cname in enumerate(names):
                rows, entry = sweep_run.checkpoint(i, cname, progress)
                if bar is not None:
                    bar.n = per_ckpt * (i + 1)
                    bar.refresh()
                hvps += entry["hvps"]
                table.extend(rows)
                per_checkpoint.append(entry)
        finally:
            pool.close()
            if bar is not None:
                bar.close()
        meta = {
            "units": [
                {"name": u.name, "block": u.block, "layer": u.layer, "head": u.head, "n": u.size}
                for u in units
            ],
            "over": spec.subset.over,
            "quantities": quantities,
            "checkpoints": per_checkpoint,
            "hvps": hvps,
            "samples_sha256": samples_digest,
            "table_columns": list(TABLE_COLUMNS),
        }
        return SweepComputed(meta, table) if run.rank0 else None  # torchrun: rank 0 saves

    def save(self, run: Run, result: SweepComputed) -> tuple[Any, dict[str, Any]]:
        table, meta = result.table, result.meta
        out, name = run.out, run.name
        atomic_write_bytes(out / f"{name}.csv", lambda p: p.write_text(table_csv(table)))
        atomic_write_bytes(
            out / f"{name}.jsonl",
            lambda p: p.write_text(
                "".join(json.dumps({k: r[k] for k in TABLE_COLUMNS}) + "\n" for r in table)
            ),
        )
        qs = row_quantities(run.spec)
        last = [r for r in table if r["checkpoint"] == table[-1]["checkpoint"]]
        figures = heatmap_figure(
            last,
            qs,
            out / f"{name}_heatmap",
            f"Hessian sweep over {run.spec.subset.over}s: {last[0]['checkpoint']}\n{run.where}",
        )
        if len(meta["checkpoints"]) > 1:
            figures += steps_figure(
                table, qs, out / f"{name}_steps", f"Hessian sweep across checkpoints\n{run.where}"
            )
        meta["summary"] = summary(table)
        tops = {
            (r["checkpoint"], r["unit"]): abs(r["estimate"])
            for r in table
            if r["quantity"] == "top"
        }
        meta["unconverged"] = sum(
            1
            for r in table
            if r["error_kind"] == "residual"
            and (r["checkpoint"], r["unit"]) in tops
            and r["error"] > run.spec.compute.tol * tops[(r["checkpoint"], r["unit"])]
        )
        saved = {
            "columns": list(TABLE_COLUMNS),
            "rows": [[r[k] for k in TABLE_COLUMNS] for r in table],
        }
        return saved, {
            **meta,
            "table_files": [f"{name}.csv", f"{name}.jsonl"],
            "figures": [p.name for p in figures],
        }

    def finish(self, run: Run, meta: dict[str, Any]) -> None:
        super().finish(run, meta)
        if not run.spec.run.keep_checkpoint:
            shutil.rmtree(run.out / f"{run.name}.sweep", ignore_errors=True)

    def report(self, run: Run, meta: dict[str, Any]) -> list[str]:
        lines = list(meta["summary"])
        for c in meta["checkpoints"]:
            t = c["trace_estimator"]
            if t.get("chosen"):
                lines.append(
                    f"{c['checkpoint']}: trace estimator {t['chosen']} (predicted seconds x worst relative variance: "
                    f"shared {_num(t.get('score_shared', t['seconds_shared']))}, per unit "
                    f"{_num(t.get('score_per_unit', t['seconds_per_unit']))}); {c['hvps']} HVPs in {c['seconds']:.1f}s"
                )
        if meta["unconverged"]:
            warn(
                f"{meta['unconverged']} eigenvalue(s) have a Ritz residual above --tol x |top| (see the table's error "
                "column); raise --max_iter"
            )
        return lines


def _num(x: float | None) -> str:
    return "inf" if x is None else f"{x:.3g}"


FAMILY = SweepFamily()


def summary(table: list[dict[str, Any]], k: int = 3) -> list[str]:
    """Per checkpoint, the ``k`` units with the largest top eigenvalue and the largest trace."""
    lines = []
    for c in dict.fromkeys(r["checkpoint"] for r in table):
        for q in ("top", "trace"):
            sel = sorted(
                (r for r in table if r["checkpoint"] == c and r["quantity"] == q),
                key=lambda r: -r["estimate"],
            )[:k]
            if sel:
                kind = {"top": "residual", "trace": "+-"}[q]
                lines.append(
                    f"{c}: largest {q}: "
                    + ", ".join(
                        f"{r['unit']} {r['estimate']:.4g} ({kind} {r['error']:.2g})" for r in sel
                    )
                )
    return lines
