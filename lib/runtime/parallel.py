"""Running an additive job (:mod:`lib.runtime.jobs`) on one device, on several worker processes, or under torchrun, with checkpoints.

API::

    sums = run_job(job, RunSettings(devices=[torch.device("cuda:0"), torch.device("cuda:1")],
                                    checkpoint=CheckpointConfig(Path("results/x.ckpt"), every_s=120),
                                    progress=True, desc="Hessian columns"))
    ...save the result built from sums...
    lib.runtime.checkpoint.finish(settings.checkpoint)   # removes the checkpoint unless keep=True

``run_job(job, settings) -> dict[str, Tensor] | None`` returns the float64 sums of all units, or
``None`` on torchrun ranks other than 0. It picks one of three ways to run:

* **one device, no torchrun**: in this process (``job.setup(device)``, which reuses a model the job
  already holds);
* **several devices**: one worker process per device, started with ``torch.multiprocessing``
  (spawn); each unpickles the job, calls ``setup(device)`` once (loading its own model) and takes the
  next unfinished unit from the parent until none is left. With a :class:`WorkerPool` in
  ``RunSettings.pool``, the workers and their loaded models outlive the job: the next job run with the
  pool reuses them (the passes of a spectrum); without one, each job spawns and stops its own;
* **torchrun** (``WORLD_SIZE > 1``): ``torch.distributed`` (NCCL on GPUs, gloo on CPU); each rank
  computes, in round ``r``, unit ``remaining[r * world + rank]``, and rank 0 gathers the round's
  partials, sums and checkpoints them.

In every case the parent (rank 0) adds the unit partials in unit-index order with
:func:`lib.runtime.jobs.add_partials`, buffering units that finish early, so the result does not depend on
the number of workers: it is bitwise the result of :func:`lib.runtime.jobs.run_serial` when each unit is
computed bitwise the same (same device kind, same number of CPU threads: every worker uses the
parent's ``torch.get_num_threads()``).

Failures: a worker that raises, runs out of memory or is killed stops the run with a
:class:`~lib.errors.RunError` naming the worker and the samples; a unit whose partials contain NaN or
Inf stops it likewise. Finished units are then written to the checkpoint (if checkpointing is on),
as on Ctrl-C and SIGTERM (which are deferred while a unit is being added, so a checkpoint never holds
half a unit, and raise :class:`~lib.errors.Interrupted`, exit status 130 / 143); SIGKILL loses at most
the units since the last checkpoint. A worker whose unit runs longer than ``RunSettings.unit_timeout``
(default: 10x the median finished unit and at least 5 minutes), or whose set-up of a job (loading the model)
takes longer than ``RunSettings.setup_timeout`` (default: 15 minutes, or 10x the fastest worker's set-up if
that is longer), is killed and named, as hung.
With checkpointing on, the complete sums are written to the checkpoint before ``run_job`` returns,
and a run resumed from a complete checkpoint returns them without setting anything up.
"""

from __future__ import annotations

import io
import os
import pickle
import signal
import sys
import threading
import time
import traceback
from collections import deque
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

import torch

from ..errors import Interrupted, ParamError, RunError, UserError, literal, signal_name
from . import checkpoint as ckpt
from . import worker_boot
from .jobs import AdditiveJob, Partial, keep_models

HUNG_FACTOR = 10.0
HUNG_MIN_S = 300.0
"""Automatic hung-unit limit: ``max(HUNG_MIN_S, HUNG_FACTOR * median finished unit time)`` (none before a unit finishes)."""
SETUP_MIN_S = 900.0
"""Automatic set-up limit of a worker (from receiving a job to being ready: loading the model, the job's set-up):
``max(SETUP_MIN_S, HUNG_FACTOR * the fastest finished set-up of the job's workers)``."""
DIST_TIMEOUT = timedelta(hours=2)
"""How long a torchrun rank waits for the others (a round lasts as long as its slowest unit)."""


@dataclass
class RunSettings:
    """How to run a job: ``devices`` (one worker per entry; one entry = in this process, or this rank's device under torchrun)."""

    devices: list[torch.device]
    checkpoint: ckpt.CheckpointConfig | None = None
    progress: bool = False
    desc: str = "work"
    unit_timeout: float = 0.0
    """Worker processes: stop the run when a unit runs longer than this many seconds (0 = auto: more than
    :data:`HUNG_FACTOR` times the median finished unit and at least :data:`HUNG_MIN_S`)."""
    setup_timeout: float = 0.0
    """Worker processes: stop the run when a worker takes longer than this many seconds to set a job up (load its
    model, the job's set-up) (0 = auto: :data:`SETUP_MIN_S`, or more than :data:`HUNG_FACTOR` times the fastest
    set-up)."""
    force_workers: bool = False
    """Run a single device in a spawned worker too (benchmarks; isolation from the parent)."""
    pool: WorkerPool | None = None
    """Worker processes kept between jobs (:class:`WorkerPool`, on ``devices``); ``None``: each job spawns and stops its own."""
    snapshot_units: tuple[int, ...] = ()
    """Keep the running sum after these many units (prefix lengths) in ``snapshots`` (:mod:`lib.hessian.batch_study`); part of the checkpoint's configuration."""
    snapshots: dict[int, Partial] = field(default_factory=dict)
    """Filled by :func:`run_job` on the process that sums (rank 0): ``{units: running sum}``."""
    identity: dict[str, Any] = field(default_factory=dict)
    """More of the checkpoint's configuration: the run spec's result-changing fields (:mod:`lib.app.spec`); a key the
    job's own configuration holds is the job's."""
    stats: dict[str, Any] = field(default_factory=dict)
    """Filled by :func:`run_job`: ``mode``, ``workers``, ``units_run``, ``setup_s`` (until every worker is ready),
    ``compute_s`` (wall, after setup), ``unit_cpu_s`` (process CPU time spent in ``run_unit``, summed over workers)."""


def local_rank() -> int | None:
    """``LOCAL_RANK`` when launched by torchrun (also with one rank), else ``None``."""
    if "RANK" not in os.environ or "LOCAL_RANK" not in os.environ:
        return None
    return int(os.environ["LOCAL_RANK"] or 0)


def distributed_env() -> tuple[int, int, int] | None:
    """``(rank, local_rank, world_size)`` when launched by torchrun with more than one rank, else ``None``."""
    world = int(os.environ.get("WORLD_SIZE", "1") or 1)
    if world <= 1 or "RANK" not in os.environ:
        return None
    return int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0")), world


def unit_label(job: AdditiveJob, k: int) -> str:
    """``samples i..j`` for unit ``k`` when the job has ``model_input_bs``, else ``unit k``."""
    describe = getattr(job, "describe_unit", None)
    if callable(describe):
        return describe(k)
    bs = getattr(job, "model_input_bs", None)
    if isinstance(bs, int) and bs > 0:
        return f"sample {k}" if bs == 1 else f"samples {k * bs}..{(k + 1) * bs - 1}"
    return f"unit {k}"


def check_finite(job: AdditiveJob, k: int, partial: Partial) -> None:
    """Raise :class:`RunError` if unit ``k``'s partial sums contain NaN or Inf."""
    bad = [name for name, v in partial.items() if not bool(torch.isfinite(v).all())]
    if bad:
        raise RunError(f"{unit_label(job, k)} (unit {k}) gave NaN or Inf in {', '.join(bad)}")


def initial_state(
    job: AdditiveJob, cfg: ckpt.CheckpointConfig | None, config: dict[str, Any]
) -> ckpt.RunState:
    """The state to start from: the checkpoint's with ``cfg.resume``, else empty.

    Refuses to overwrite an existing checkpoint without ``resume``; with ``resume`` and no file, starts
    from the beginning (so that a job script can always pass ``--resume``).
    """
    n = job.num_units()
    if cfg is None:
        return ckpt.RunState(n)
    path = cfg.path
    if path.exists():
        if cfg.resume:
            state = ckpt.load(path, config, n)
            cfg.owned = True
            print(f"resuming from {path}: {state.n_done} of {n} units done", file=sys.stderr)
            return state
        raise ParamError(
            "resume",
            template=f"checkpoint {literal(path)} exists from an earlier run; pass {{resume}} to continue it, or "
            "delete it to start over",
        )
    elif cfg.resume:
        print(f"no checkpoint at {path}; starting from the beginning", file=sys.stderr)
    return ckpt.RunState(n)


def _chunks_used(job: AdditiveJob) -> dict[int, int]:
    """The chunks this process's copy of ``job`` used (:meth:`lib.runtime.jobs.ModelJob.chunks_used`; ``{}`` for other jobs)."""
    used = getattr(job, "chunks_used", None)
    return dict(used()) if callable(used) else {}


def _reuse_chunks(job: AdditiveJob, chunks: dict[int, int] | None = None) -> None:
    """Have ``job`` use ``chunks`` (default: those it carries, ``job.reused_chunks``) instead of measuring."""
    chunks = chunks if chunks is not None else getattr(job, "reused_chunks", None)
    if chunks and callable(getattr(job, "reuse_chunks", None)):
        job.reuse_chunks(chunks)


def job_config(job: AdditiveJob, settings: RunSettings) -> dict[str, Any]:
    """The configuration a checkpoint is validated against: ``settings.identity`` overridden by the job's, plus the snapshot units if any."""
    config = {**settings.identity, **job.config()}
    return (
        {**config, "snapshot_units": list(settings.snapshot_units)}
        if settings.snapshot_units
        else config
    )


def _dumps(partial: Partial) -> bytes:
    buf = io.BytesIO()
    torch.save({k: v.detach().cpu() for k, v in partial.items()}, buf)
    return buf.getvalue()


def _loads(data: bytes) -> Partial:
    return torch.load(io.BytesIO(data), weights_only=True)


def _summary(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0]}" if text else type(e).__name__


class _Bar:
    """One tqdm bar over all steps of the run (or nothing)."""

    def __init__(self, enabled: bool, total: int, initial: int, desc: str):
        self.bar, self.started = None, False
        if enabled:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=total, initial=initial, desc=desc, dynamic_ncols=True)

    def update(self, n: int) -> None:
        if self.bar is not None:
            if (
                not self.started
            ):  # the ETA counts from the first finished step, not from model loading
                self.bar.unpause()
                self.started = True
            self.bar.update(n)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


class _Signals:
    """During a run, SIGINT and SIGTERM raise :class:`~lib.errors.Interrupted` (exit status 130, 143) so that finished work is
    checkpointed -- but never inside a :meth:`critical` section (adding a unit to the state), where they
    are deferred to its end, so that a checkpoint never holds a half-added unit."""

    def __init__(self) -> None:
        self.depth, self.pending = 0, None

    @staticmethod
    def _raise(signum: int) -> None:
        raise Interrupted(signum)

    def _handler(self, signum, frame) -> None:  # noqa: ARG002
        if self.depth:
            self.pending = signum
        else:
            self._raise(signum)

    @contextmanager
    def installed(self) -> Iterator[None]:
        """Install the handlers for the duration of a run (main thread only; elsewhere a no-op)."""
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        old = {s: signal.signal(s, self._handler) for s in (signal.SIGINT, signal.SIGTERM)}
        try:
            yield
        finally:
            for s, h in old.items():
                signal.signal(s, h)

    @contextmanager
    def critical(self) -> Iterator[None]:
        self.depth += 1
        try:
            yield
        finally:
            self.depth -= 1
            if not self.depth and self.pending is not None:
                signum, self.pending = self.pending, None
                self._raise(signum)


_SIGNALS = _Signals()


class _Sink:
    """The parent's side of a run: checks and adds unit partials in order, checkpoints, shows progress."""

    def __init__(
        self, job: AdditiveJob, settings: RunSettings, state: ckpt.RunState, config: dict[str, Any]
    ):
        self.job, self.state, self.settings = job, state, settings
        state.record = frozenset(settings.snapshot_units)
        self.writer = ckpt.Writer(settings.checkpoint, config, state)
        steps = job.steps_per_unit()
        self.bar = _Bar(
            settings.progress, state.num_units * steps, state.n_done * steps, settings.desc
        )
        self.cfg = settings.checkpoint

    def accept(
        self, k: int, partial: Partial, who: str | None = None, chunks: dict[int, int] | None = None
    ) -> None:
        """Add unit ``k``'s ``partial``, computed by process ``who`` with ``chunks`` (recorded in the state and the
        checkpoint)."""
        check_finite(self.job, k, partial)
        with _SIGNALS.critical():
            self.state.add(k, partial)
            if who is not None and chunks:
                self.state.chunks[who] = {int(n): int(c) for n, c in chunks.items()}
        self.writer.maybe_save()

    def kept(self) -> str:
        """What the checkpoint durably holds of the finished work, for messages (:meth:`lib.runtime.checkpoint.Writer.kept`)."""
        return self.writer.kept()

    def fail(self) -> None:
        """Save the finished work after an error or interrupt (a failed write shows in :meth:`kept`)."""
        try:
            self.writer.save_if_dirty()
        except ckpt.CheckpointWriteError:
            pass  # never hide the original error; kept() says what the file holds

    def done(self) -> Partial:
        """The total; with checkpointing on, the complete state is written first (``--resume`` then only writes the outputs)."""
        cfg = self.cfg
        if cfg is not None and cfg.writes and (self.writer.dirty or not cfg.path.exists()):
            self.writer.save()  # the complete sums, before any output is written: a failed save loses nothing
        self.settings.snapshots = self.state.snapshots
        if self.state.chunks:
            chunks = self.state.chunks.items()
            self.settings.stats["chunks"] = {
                who: {str(n): c for n, c in per.items()} for who, per in chunks
            }
        return self.state.total()


def run_job(job: AdditiveJob, settings: RunSettings) -> Partial | None:
    """Sum all units of ``job`` (float64, unit-index order) as ``settings`` says; ``None`` on torchrun ranks > 0."""
    if not settings.devices:
        raise ValueError("no devices")
    dist_env = distributed_env()
    with _SIGNALS.installed():
        if dist_env is not None:
            return _run_distributed(job, settings, dist_env)
        config = job_config(job, settings)
        state = initial_state(job, settings.checkpoint, config)
        sink = _Sink(job, settings, state, config)
        if (
            state.chunks and not state.complete
        ):  # resumed: compute the rest with the chunks the first session used
            _reuse_chunks(job, state.reused_chunks())
            settings.stats["reused_chunks"] = {str(n): c for n, c in state.reused_chunks().items()}
        try:
            if state.complete:  # resumed from a complete checkpoint: nothing to compute or set up
                settings.stats.update(mode="resumed complete", workers=0, units_run=0)
            elif len(settings.devices) == 1 and not settings.force_workers:
                _run_here(job, settings, sink)
            else:
                _run_workers(job, settings, sink)
            return sink.done()
        except RunError as e:
            sink.fail()
            raise RunError(f"{e}{sink.kept()}") from None
        except (Interrupted, KeyboardInterrupt) as e:
            sink.fail()
            signum = e.signum if isinstance(e, Interrupted) else signal.SIGINT
            raise Interrupted(
                signum,
                f"interrupted by {signal_name(signum)}{sink.kept() or '; no unit was finished'}",
            ) from None
        except BaseException:
            sink.fail()
            if sink.kept():
                print(f"stopped{sink.kept()}", file=sys.stderr)
            raise
        finally:
            sink.bar.close()


def _run_here(job: AdditiveJob, settings: RunSettings, sink: _Sink) -> None:
    """One process: set up on the device and run the remaining units in order."""
    t0 = time.perf_counter()
    job.setup(settings.devices[0])
    _reuse_chunks(job)
    t1 = time.perf_counter()
    remaining, cpu_s = sink.state.remaining(), 0.0
    who = f"this process ({settings.devices[0]})"
    for k in remaining:
        c0 = time.process_time()
        partial = job.run_unit(k, sink.bar.update)
        cpu_s += time.process_time() - c0
        sink.accept(k, partial, who, _chunks_used(job))
    settings.stats.update(
        mode="serial",
        workers=1,
        units_run=len(remaining),
        setup_s=t1 - t0,
        compute_s=time.perf_counter() - t1,
        unit_cpu_s=cpu_s,
    )


# ----------------------------------------------------------------------------- worker processes


class _Throttled:
    """Progress callback of a worker: sends accumulated step counts of job ``seq`` to the parent at most every 0.2 s."""

    def __init__(self, conn, seq: int, period: float = 0.2):
        self.conn, self.seq, self.period, self.n, self.last = conn, seq, period, 0, time.monotonic()

    def __call__(self, n: int) -> None:
        self.n += n
        if time.monotonic() - self.last >= self.period:
            self.flush()

    def flush(self) -> None:
        if self.n:
            self.conn.send(("progress", self.seq, self.n))
            self.n, self.last = 0, time.monotonic()


PARENT_POLL_S = worker_boot.PARENT_POLL_S
_die_with_parent = worker_boot.die_with_parent
"""Workers watch their parent from their first line (:mod:`lib.runtime.worker_boot`), before torch is imported."""


def _worker_main(index: int, device: str, conn, threads: int, parent: int | None = None) -> None:
    """A pool's worker process: for each job the parent sends (``("job", seq, pickled job)``), set it up on ``device``
    and run the units the parent sends until it sends ``None``; exit when the parent closes the pipe.

    Models stay loaded between jobs (:func:`lib.runtime.jobs.keep_models`). Every message back names its job ``seq``,
    so the parent can tell a late message about an earlier job (a worker still setting up when that job ended)."""
    signal.signal(
        signal.SIGINT, signal.SIG_IGN
    )  # Ctrl-C reaches the parent, which stops the workers
    # (worker_boot.worker_entry watches the parent before it imports this module, and passes no parent)
    if parent is not None:
        _die_with_parent(parent)
    torch.set_num_threads(threads)
    keep_models()
    seq, k = None, None
    try:
        dev = torch.device(device)
        if dev.type == "cuda":
            torch.cuda.set_device(dev)
        while True:
            _, seq, job_bytes = conn.recv()
            job = pickle.loads(job_bytes)
            job.setup(dev)
            _reuse_chunks(job)
            conn.send(("ready", seq))
            while (k := conn.recv()) is not None:
                progress = _Throttled(conn, seq)
                c0 = time.process_time()
                partial = job.run_unit(k, progress)
                cpu_s = time.process_time() - c0
                progress.flush()
                conn.send(("done", seq, k, _dumps(partial), cpu_s, _chunks_used(job)))
                k = None
            del job, job_bytes  # the job's data goes; its model stays in the cache
    except (EOFError, BrokenPipeError, ConnectionResetError):
        return  # the parent is gone or stopped us
    except BaseException as e:  # noqa: BLE001 -- everything goes back to the parent
        try:
            conn.send(
                ("error", seq, k, _summary(e), traceback.format_exc(), isinstance(e, UserError))
            )
        except OSError:
            pass
        raise SystemExit(1) from None


@dataclass
class _Worker:
    index: int
    device: torch.device
    proc: Any
    conn: Any
    unit: int | None = None
    stopping: bool = False
    """The current job was ended on this worker (it was sent ``None``)."""
    ready: bool = False
    started: float = 0.0
    """``time.monotonic()`` when ``unit`` was handed out."""
    sent: float = 0.0
    """``time.monotonic()`` when the current job was sent (its set-up began)."""

    @property
    def name(self) -> str:
        return f"worker {self.index} ({self.device})"


def _exit_text(code: int | None) -> str:
    if code is None:
        return "stopped responding"
    if code < 0:
        try:
            sig = signal.Signals(-code).name
        except ValueError:
            sig = f"signal {-code}"
        return f"was killed by {sig}" + (" (out of memory?)" if sig == "SIGKILL" else "")
    return f"exited with status {code}"


class WorkerPool:
    """Worker processes, one per device, that stay alive between :func:`run_job` calls and keep their loaded models.

    Use as a context manager and pass it in :attr:`RunSettings.pool`: every job run with those settings (e.g. each
    pass of a spectrum) is sent, pickled without its model, to the same workers, which reuse the model they
    loaded for the first job (:func:`lib.runtime.jobs.keep_models`: one cached model per worker, keyed by every field of
    the job's ``ModelSpec``, fingerprint included, and the device). The workers are spawned by the first job
    that needs them; a job that fails or is interrupted stops them all (the next job spawns fresh ones), and
    leaving the ``with`` block stops them for good. ``started`` counts the processes spawned, ``jobs`` the jobs run.
    """

    def __init__(self, devices: list[torch.device]):
        self.devices = list(devices)
        self.workers: list[_Worker] = []
        self.closed = False
        self.started = 0
        self.jobs = 0

    def __enter__(self) -> WorkerPool:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def start(self) -> list[_Worker]:
        """The live workers, spawned (with this process's thread count) if there are none."""
        if self.closed:
            raise ValueError("this worker pool is closed")
        if not self.workers:
            import torch.multiprocessing as mp

            ctx = mp.get_context("spawn")
            threads = torch.get_num_threads()
            try:
                for i, dev in enumerate(self.devices):
                    parent_conn, child_conn = ctx.Pipe()
                    args = (i, str(dev), child_conn, threads, os.getpid())
                    proc = ctx.Process(
                        target=worker_boot.worker_entry,
                        args=args,
                        name=f"hessian-worker-{i}",
                        daemon=True,
                    )
                    proc.start()
                    child_conn.close()
                    self.workers.append(_Worker(i, dev, proc, parent_conn))
                    self.started += 1
            except BaseException:
                self.shutdown()
                raise
        return self.workers

    def shutdown(self) -> None:
        """Stop every worker (after an error or interrupt: their state is unknown); a later job spawns new ones."""
        workers, self.workers = self.workers, []
        _stop(workers)

    def close(self) -> None:
        """Stop the workers for good."""
        self.shutdown()
        self.closed = True


def _run_workers(job: AdditiveJob, settings: RunSettings, sink: _Sink) -> None:
    """Run the job on ``settings.pool`` (stopped on any error or interrupt), or on a pool of its own, stopped after it."""
    pool = settings.pool
    if pool is None:
        with WorkerPool(settings.devices) as own:
            _run_on_pool(job, settings, sink, own)
        return
    if pool.devices != list(settings.devices):
        raise ValueError(
            f"the worker pool runs on {pool.devices}, the settings ask for {settings.devices}"
        )
    try:
        _run_on_pool(job, settings, sink, pool)
    except BaseException:
        pool.shutdown()
        raise


def _run_on_pool(job: AdditiveJob, settings: RunSettings, sink: _Sink, pool: WorkerPool) -> None:
    """Send the job to the pool's workers, hand out the remaining units one at a time, add their partials in order."""
    from multiprocessing.connection import wait

    t0 = time.perf_counter()
    started = pool.started
    workers = pool.start()
    pool.jobs += 1
    seq = pool.jobs
    job_bytes = pickle.dumps(job)
    run = _PoolJob(job, sink, workers, seq, deque(sink.state.remaining()))
    n_todo = len(run.todo)
    for w in workers:
        w.unit, w.stopping, w.ready, w.sent = None, False, False, time.monotonic()
        run.send(w, ("job", seq, job_bytes))
    while not sink.state.complete:
        ready = wait([w.conn for w in workers] + [w.proc.sentinel for w in workers], timeout=1.0)
        run.receive(ready)
        run.stop_hung(settings)
    for w in workers:  # every unit is in: end the job on the workers still setting it up
        if not w.stopping:
            w.stopping = True
            run.send(w, None)
    end = time.perf_counter()
    settings.stats.update(
        mode="workers",
        workers=len(workers),
        workers_spawned=pool.started - started,
        pool_job=seq,
        units_run=n_todo,
        setup_s=(run.t_ready or end) - t0,
        compute_s=end - (run.t_ready or end),
        unit_cpu_s=run.cpu_s,
    )


@dataclass
class _PoolJob:
    """One job (number ``seq``) on a pool's ``workers``: the units still to hand out (``todo``) and the timings so far
    (worker CPU seconds, wall seconds of each unit and each worker's set-up, when every worker was ready)."""

    job: AdditiveJob
    sink: _Sink
    workers: list[_Worker]
    seq: int
    todo: deque[int]
    cpu_s: float = 0.0
    unit_s: list[float] = field(default_factory=list)
    setup_s: list[float] = field(default_factory=list)
    t_ready: float | None = None

    def died(self, w: _Worker) -> RunError:
        """The error for worker ``w``, which has exited or stopped answering (waits up to 5 s for its exit code)."""
        w.proc.join(timeout=5)
        where = (
            f" while computing {unit_label(self.job, w.unit)} (unit {w.unit})"
            if w.unit is not None
            else ("" if w.ready else " while setting up")
        )
        return RunError(f"{w.name} {_exit_text(w.proc.exitcode)}{where}")

    def send(self, w: _Worker, msg: Any) -> None:
        """Send ``msg`` to ``w``; a broken pipe means the worker died."""
        try:
            w.conn.send(msg)
        except OSError:
            raise self.died(w) from None

    def assign(self, w: _Worker) -> None:
        """Hand ``w`` the next unit, or ``None`` (end of this job) when none is left."""
        if self.todo:
            w.unit, w.started = self.todo.popleft(), time.monotonic()
        else:
            w.unit, w.stopping = None, True
        self.send(w, w.unit)

    def handle(self, w: _Worker, msg: tuple) -> None:
        """Act on one message from ``w``: an error (raised), progress, ready (set up), or a unit's partial."""
        kind, about = msg[0], msg[1]
        if kind == "error":  # about any job: the worker is gone
            k, summary, tb, user = msg[2:]
            where = (
                f" on {unit_label(self.job, k)} (unit {k})"
                if k is not None
                else " while setting up"
            )
            if not user:
                print(f"--- traceback of {w.name} ---\n{tb.rstrip()}", file=sys.stderr)
            raise RunError(f"{w.name} failed{where}: {summary}")
        if about != self.seq:
            return  # late news of an earlier job (this worker was still setting it up when it ended)
        if kind == "progress":
            self.sink.bar.update(msg[2])
        elif kind == "ready":
            w.ready = True
            self.setup_s.append(time.monotonic() - w.sent)
            if self.t_ready is None and all(x.ready for x in self.workers):
                self.t_ready = time.perf_counter()
            self.assign(w)
        elif kind == "done":
            k = msg[2]
            self.unit_s.append(time.monotonic() - w.started)
            w.unit = None
            self.cpu_s += msg[4]
            self.sink.accept(k, _loads(msg[3]), w.name, msg[5])
            self.assign(w)

    def receive(self, ready: list[Any]) -> None:
        """Handle every waiting message of the workers whose pipe or process is in ``ready``; raise if one died."""
        for w in self.workers:
            if w.conn in ready or w.proc.sentinel in ready:
                try:
                    while w.conn.poll():
                        self.handle(w, w.conn.recv())
                except (EOFError, OSError):
                    raise self.died(w) from None
                if not w.proc.is_alive():  # pool workers never exit on their own
                    raise self.died(w)

    def stop_hung(self, settings: RunSettings) -> None:
        """Kill and report a worker whose unit or set-up runs past its limit (:func:`_hung_worker`,
        :func:`_stuck_in_setup`)."""
        hung = _hung_worker(self.workers, self.unit_s, settings.unit_timeout)
        if hung is not None:
            w, why = hung
            w.proc.kill()  # a stopped (SIGSTOP) or deadlocked process ignores gentler signals
            raise RunError(
                f"{w.name} has computed {unit_label(self.job, w.unit)} (unit {w.unit}) for {time.monotonic() - w.started:.0f}s, over {why}; it was stopped as hung"
            )
        stuck = _stuck_in_setup(self.workers, self.setup_s, settings.setup_timeout)
        if stuck is not None:
            w, why = stuck
            w.proc.kill()
            took = time.monotonic() - w.sent
            what = "has been setting up (loading the model, preparing the job)"
            raise RunError(f"{w.name} {what} for {took:.0f}s, over {why}; it was stopped as hung")


def _hung_worker(
    live: list[_Worker], unit_s: list[float], timeout: float
) -> tuple[_Worker, str] | None:
    """A worker whose current unit runs past the limit (``timeout``, or the automatic one), and the limit in words."""
    if timeout > 0:
        limit, why = timeout, f"--unit_timeout {timeout:g}s"
    elif unit_s:
        median = sorted(unit_s)[len(unit_s) // 2]
        limit = max(HUNG_MIN_S, HUNG_FACTOR * median)
        why = f"the limit of {limit:.0f}s (more than {HUNG_FACTOR:g}x the median unit time {median:.1f}s and at least {HUNG_MIN_S:.0f}s; set it with --unit_timeout)"
    else:
        return None
    now = time.monotonic()
    for w in live:
        if w.unit is not None and now - w.started > limit:
            return w, why
    return None


def _stuck_in_setup(
    live: list[_Worker], setup_s: list[float], timeout: float
) -> tuple[_Worker, str] | None:
    """A worker still setting up the current job past the limit (``timeout``, or the automatic one), and the limit
    in words."""
    if timeout > 0:
        limit, why = timeout, f"--setup_timeout {timeout:g}s"
    else:
        limit = max(SETUP_MIN_S, HUNG_FACTOR * min(setup_s)) if setup_s else SETUP_MIN_S
        why = (
            f"the limit of {limit:.0f}s (at least {SETUP_MIN_S:.0f}s and {HUNG_FACTOR:g}x the fastest worker's set-up; "
            "set it with --setup_timeout)"
        )
    now = time.monotonic()
    for w in live:
        if not w.ready and not w.stopping and now - w.sent > limit:
            return w, why
    return None


def _stop(workers: list[_Worker], grace_s: float = 1.0) -> None:
    """Close the pipes (idle workers then exit), give them ``grace_s`` to exit, terminate the rest.

    Every unit is in (or the run failed), so nothing is lost by not waiting for a slow interpreter shutdown.
    """
    for w in workers:
        try:
            w.conn.close()
        except OSError:
            pass
    deadline = time.monotonic() + grace_s
    for w in workers:
        w.proc.join(timeout=max(0.0, deadline - time.monotonic()))
    for w in workers:
        if w.proc.is_alive():
            w.proc.terminate()
            try:
                os.kill(
                    w.proc.pid, signal.SIGCONT
                )  # a stopped (SIGSTOP) worker acts on SIGTERM once continued
            except OSError:
                pass
    for w in workers:
        w.proc.join(timeout=10)
        if w.proc.is_alive():  # pragma: no cover
            w.proc.kill()
            w.proc.join()


# ----------------------------------------------------------------------------- torchrun


def init_process_group(device: torch.device) -> bool:
    """Start the torchrun process group (NCCL on CUDA, gloo otherwise) unless it exists; returns whether it started it."""
    import torch.distributed as dist

    if dist.is_initialized():
        return False
    if device.type == "cuda":  # "cuda" alone: the current device
        torch.cuda.set_device(device if device.index is not None else torch.cuda.current_device())
    dist.init_process_group(
        backend="nccl" if device.type == "cuda" else "gloo", timeout=DIST_TIMEOUT
    )
    return True


def _shared(error: Exception) -> Exception:
    """``error``, raised alike on every rank from rank 0's verdict: rank 0 prints it (:func:`lib.runtime.ranks.quiet_on_this_rank`)."""
    error.shared_by_ranks = True  # type: ignore[attr-defined]
    return error


def _agree(rank: int, world: int, payload: Any, decide: Callable[[list[Any]], str | None]) -> None:
    """Gather ``payload`` on rank 0, which ``decide``s on an error message; every rank raises it."""
    import torch.distributed as dist

    gathered = [None] * world if rank == 0 else None
    dist.gather_object(payload, gathered, dst=0)
    verdict: list[str | None] = [decide(gathered) if rank == 0 else None]
    dist.broadcast_object_list(verdict, src=0)
    if verdict[0] is not None:
        raise _shared(RunError(verdict[0]))


def _first_error(payloads: list[Any]) -> str | None:
    """The message of the first ``("error", message)`` among the ranks' payloads, if any."""
    errors = [p for p in payloads if p is not None and p[0] == "error"]
    return errors[0][1] if errors else None


def _setup_rank(job: AdditiveJob, device: torch.device, rank: int) -> tuple[str, str] | None:
    """Set the job up on this rank's ``device``; ``("error", message)`` if that failed (traceback printed here)."""
    try:
        job.setup(device)
        _reuse_chunks(job)
        return None
    except Exception as e:  # noqa: BLE001
        traceback.print_exc()
        return (
            "error",
            f"rank {rank} ({device}) failed while setting up: {_summary(e)}",
        )


def _run_rank_unit(
    job: AdditiveJob, sink: _Sink | None, device: torch.device, rank: int, round_units: list[int]
) -> tuple | None:
    """This rank's unit of a round (``round_units[rank]``), as ``("done", k, pickled partial, chunks)`` or
    ``("error", message)``; ``None`` when the round has no unit for this rank. Rank 0 (which has the ``sink``)
    counts progress for the whole round."""
    k = round_units[rank] if rank < len(round_units) else None
    payload = None
    if k is not None:
        scale = len(round_units)
        update = (lambda n, scale=scale: sink.bar.update(n * scale)) if sink is not None else None
        try:
            payload = ("done", k, _dumps(job.run_unit(k, update)), _chunks_used(job))
        except Exception as e:  # noqa: BLE001 -- reported to rank 0, which stops every rank
            traceback.print_exc()
            payload = (
                "error",
                f"rank {rank} ({device}) failed on {unit_label(job, k)} (unit {k}): {_summary(e)}",
            )
    return payload


def _add_round(sink: _Sink, payloads: list[Any]) -> str | None:
    """On rank 0: add a round's partials to ``sink`` in unit order; the error message that stops every rank, if any."""
    msg = _first_error(payloads)
    if msg is not None:
        sink.fail()  # the finished units first, so that the message counts what the file holds
        return f"{msg}{sink.kept()}"
    try:
        done = sorted(
            ((r, p) for r, p in enumerate(payloads) if p is not None),
            key=lambda rp: rp[1][1],
        )
        for r, p in done:
            sink.accept(p[1], _loads(p[2]), f"rank {r}", p[3])
    except RunError as e:
        sink.fail()
        return f"{e}{sink.kept()}"
    return None


def _run_distributed(
    job: AdditiveJob, settings: RunSettings, env: tuple[int, int, int]
) -> Partial | None:
    """One rank of a torchrun job: rounds of ``world`` units, gathered and summed in order on rank 0."""
    import torch.distributed as dist

    rank, _, world = env
    device = settings.devices[0]
    own = init_process_group(device)
    sink: _Sink | None = None
    try:
        # rank 0 reads the checkpoint; every rank learns what is left (or the error)
        start: list[Any] = [None, None, None]
        if rank == 0:
            try:
                config = job_config(job, settings)
                sink = _Sink(job, settings, initial_state(job, settings.checkpoint, config), config)
                start = [sink.state.remaining(), None, sink.state.reused_chunks()]
            except UserError as e:  # a ParamError travels whole: the scripts name its flag
                start = [None, e if isinstance(e, ParamError) else str(e), None]
        dist.broadcast_object_list(start, src=0)
        if start[1] is not None:
            err = start[1]
            raise _shared(err if isinstance(err, ParamError) else UserError(err))
        remaining: list[int] = start[0]
        if start[2]:  # resumed: every rank computes the rest with the recorded chunks
            _reuse_chunks(job, start[2])

        t0 = time.perf_counter()
        _agree(rank, world, _setup_rank(job, device, rank), _first_error)
        t1 = time.perf_counter()

        for r0 in range(0, len(remaining), world):
            round_units = remaining[r0 : r0 + world]
            payload = _run_rank_unit(job, sink, device, rank, round_units)
            _agree(rank, world, payload, lambda payloads: _add_round(sink, payloads))
        settings.stats.update(
            mode="torchrun",
            workers=world,
            units_run=len(remaining),
            setup_s=t1 - t0,
            compute_s=time.perf_counter() - t1,
        )
        return sink.done() if sink is not None else None
    except (Interrupted, KeyboardInterrupt) as e:
        signum = e.signum if isinstance(e, Interrupted) else signal.SIGINT
        if sink is not None:
            sink.fail()
        raise Interrupted(
            signum,
            f"rank {rank}: interrupted by {signal_name(signum)}{sink.kept() if sink is not None else ''}",
        ) from None
    except BaseException:
        if sink is not None:
            sink.fail()
        raise
    finally:
        if sink is not None:
            sink.bar.close()
        if own:
            dist.destroy_process_group()
