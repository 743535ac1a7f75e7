"""How many intra-op CPU threads a process uses: what it may really use, not the machine's core count.

torch's default (one thread per core) collapses on a shared machine: OpenMP threads wait for each other
at every operation, so one preempted thread stalls them all (measured 9x slower than one thread with two
other CPU-bound processes on 2 cores, ``benchmarks/contention.py``). The default here is

    usable = min(CPUs in this process's affinity mask, the cgroup's CPU quota)
    free   = usable - load                      (load: other processes' runnable threads now, :func:`current_load`)
    n      = clamp(floor(free / processes + 0.25), 1, usable / processes)

where ``processes`` is the number of computing processes this machine runs for the job (worker processes of
``--devices cpu,cpu``, torchrun's local ranks), so that together they never ask for more CPUs than are free.
A busy machine thus costs a share (one thread) instead of a collapse, and a quiet one keeps every core.
``--threads N`` (or an ``OMP_NUM_THREADS`` set in the environment) overrides the choice; either way the
choice and its reason go into the run's JSON (:func:`report`).
"""

from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..errors import ParamError

SLACK = 0.25
"""Load below a quarter of a CPU per thread counts as none (kernel threads, short bursts)."""


@dataclass(frozen=True)
class Choice:
    """``n`` threads per computing process, and why (for the JSON)."""

    n: int
    why: str
    processes: int = 1
    """Computing processes the CPUs were shared among (this one, its CPU workers or local torchrun ranks)."""

    def to_json(self) -> dict[str, Any]:
        return {"n": self.n, "why": self.why, "processes": self.processes}


def policy(cpus: int, quota: float | None, load: float, processes: int = 1) -> tuple[int, str]:
    """Threads per process for ``processes`` processes given ``cpus`` in the affinity mask, a cgroup CPU ``quota``
    (CPUs, ``None`` = unlimited) and ``load`` (runnable work of other processes, in CPUs). Pure; returns ``(n, why)``.

    ``n = clamp(floor((usable - load) / processes + SLACK), 1, max(1, floor(usable / processes)))`` with
    ``usable = min(cpus, quota)``: no more threads than free CPUs (up to :data:`SLACK`), never fewer than one.
    """
    usable = float(cpus) if quota is None else min(float(cpus), max(quota, 1.0))
    per = max(1, math.floor(usable / processes))
    free = usable - max(load, 0.0)
    n = max(1, min(per, math.floor(free / processes + SLACK)))
    limit = (
        f"{cpus} cpus"
        if quota is None or quota >= cpus
        else f"cgroup quota {quota:g} of {cpus} cpus"
    )
    share = f" shared by {processes} processes" if processes > 1 else ""
    if n == per:
        return n, f"load {load:.1f} on {limit}{share}: all usable"
    return n, f"load {load:.1f} on {limit}{share}"


def affinity_cpus() -> int:
    """CPUs this process may run on (``sched_getaffinity``; ``os.cpu_count()`` where unavailable)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def _cgroup_quota_v2(root: Path = Path("/sys/fs/cgroup")) -> float | None:
    """The smallest ``cpu.max`` quota (in CPUs) on this process's cgroup v2 path, ``None`` if unlimited or unknown."""
    try:
        lines = Path("/proc/self/cgroup").read_text().splitlines()
    except OSError:
        return None
    rel = next((ln.split(":", 2)[2] for ln in lines if ln.startswith("0::")), None)
    if rel is None:
        return None
    best = None
    path = root / rel.lstrip("/")
    for d in [path, *path.parents]:
        if not str(d).startswith(str(root)):
            break
        try:
            quota, period = (d / "cpu.max").read_text().split()[:2]
        except (OSError, ValueError):
            continue
        if quota != "max" and float(period) > 0:
            q = float(quota) / float(period)
            best = q if best is None else min(best, q)
    return best


def _cgroup_quota_v1(root: Path = Path("/sys/fs/cgroup/cpu")) -> float | None:
    """The cgroup v1 ``cfs_quota_us / cfs_period_us`` in CPUs, ``None`` if unlimited or unknown."""
    try:
        quota = int((root / "cpu.cfs_quota_us").read_text())
        period = int((root / "cpu.cfs_period_us").read_text())
    except (OSError, ValueError):
        return None
    return quota / period if quota > 0 and period > 0 else None


def cgroup_quota() -> float | None:
    """The CPU quota of this process's cgroup in CPUs (v2, else v1), ``None`` if none is set."""
    q = _cgroup_quota_v2()
    return q if q is not None else _cgroup_quota_v1()


def _procs_running() -> int | None:
    """Runnable threads on the machine right now (``/proc/stat``'s ``procs_running``, this one included)."""
    try:
        for line in Path("/proc/stat").read_text().splitlines():
            if line.startswith("procs_running"):
                return int(line.split()[1])
    except (OSError, ValueError):
        return None
    return None


def current_load(samples: int = 10, interval_s: float = 0.01) -> float:
    """Other processes' CPU demand now: the mean over ``samples`` reads of ``procs_running`` (``interval_s`` apart)
    minus this process's own one, or the 1-minute load average where ``/proc/stat`` cannot be read.

    The load average lags a minute behind: it counts a job that just ended (or this process's own imports)
    and misses one that just started; the instant count is what the threads will meet."""
    seen = []
    for i in range(samples):
        r = _procs_running()
        if r is None:
            break
        seen.append(max(0, r - 1))
        if i + 1 < samples:
            time.sleep(interval_s)
    if seen:
        return sum(seen) / len(seen)
    try:
        return os.getloadavg()[0]
    except (AttributeError, OSError):
        return 0.0


_CHOICE: Choice | None = None
"""This process's choice (set by :func:`apply`)."""


def local_processes(workers: int = 1) -> int:
    """Computing processes sharing this machine's CPUs: ``workers`` (one per ``--devices`` entry), else torchrun's
    local ranks (``LOCAL_WORLD_SIZE``), else 1."""
    if workers > 1:
        return workers
    try:
        return max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1") or 1))
    except ValueError:
        return 1


def choose(requested: int | None = None, processes: int = 1) -> Choice:
    """The thread count: ``requested`` (``--threads``), else an ``OMP_NUM_THREADS`` from the environment, else :func:`policy`."""
    if requested is not None:
        return Choice(int(requested), "--threads", processes)
    env = os.environ.get("OMP_NUM_THREADS", "").strip()
    if env.isdigit() and int(env) > 0:
        return Choice(int(env), "OMP_NUM_THREADS", processes)
    n, why = policy(affinity_cpus(), cgroup_quota(), current_load(), processes)
    return Choice(n, why, processes)


def apply(requested: int | None = None, processes: int = 1, say: bool = False) -> Choice:
    """:func:`choose` and set it (``torch.set_num_threads``) for this process, recorded for :func:`report`. Worker
    processes (``--devices``) take this process's thread count (:class:`lib.runtime.parallel.WorkerPool`), i.e. the share.
    ``requested`` below 1 is refused (:class:`lib.errors.ParamError` ``threads``); more than the CPUs this process may run on is
    capped to them (:func:`capped`). ``say``: print :func:`console_line` (the scripts), when the run takes fewer
    threads than its CPUs."""
    global _CHOICE
    if requested is not None and requested < 1:
        raise ParamError("threads", f"threads must be at least 1, got {requested}")
    _CHOICE = capped(choose(requested, processes), affinity_cpus())
    torch.set_num_threads(_CHOICE.n)
    line = console_line(_CHOICE, usable_cpus()) if say else None
    if line:
        print(line, flush=True)
    return _CHOICE


def usable_cpus() -> int:
    """``min(CPUs in the affinity mask, the cgroup quota)``, at least 1: what :func:`policy` calls usable."""
    quota = cgroup_quota()
    cpus = affinity_cpus()
    return max(1, math.floor(cpus if quota is None else min(cpus, max(quota, 1.0))))


def console_line(choice: Choice, usable: int) -> str | None:
    """One console line when ``choice`` takes fewer threads than the ``usable`` CPUs, with the reason; else ``None``.

    E.g. ``threads: 1 of 2 CPUs, because the machine is busy (load 2.0 on 2 cpus); --threads N overrides``."""
    if choice.n * choice.processes >= usable:
        return None
    each = f" per process x {choice.processes} processes" if choice.processes > 1 else ""
    head = f"threads: {choice.n}{each} of {usable} CPUs"
    if choice.why == "--threads":
        return f"{head}, as --threads asks"
    if choice.why == "OMP_NUM_THREADS":
        return f"{head}, as OMP_NUM_THREADS={choice.n} in the environment asks (--threads N overrides it)"
    if choice.why.startswith("load "):
        return f"{head}, because the machine is busy ({choice.why}); --threads N overrides"
    return f"{head} ({choice.why})"


# ----------------------------------------------------------------------------- library calls

LIBRARY_ENV = "LLM_HESSIAN_THREADS"
"""Environment variable: the library's thread count (an integer), or ``auto``/empty for the policy."""
_LIBRARY_DONE = False
"""Whether :func:`for_library` has decided for this process (it decides once)."""


def torch_default_threads() -> int:
    """The intra-op thread count torch starts with: ``OMP_NUM_THREADS`` (or ``MKL_NUM_THREADS``) from the
    environment, else one per physical core of the machine (torch counts cores, not the affinity mask)."""
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        env = os.environ.get(var, "").strip()
        if env.isdigit() and int(env) > 0:
            return int(env)
    return physical_cores()


def physical_cores(root: Path = Path("/sys/devices/system/cpu")) -> int:
    """Physical cores of the machine: distinct ``core_cpus_list`` (hyperthread siblings) of the online CPUs;
    ``os.cpu_count()`` where the topology cannot be read."""
    cores = set()
    for d in root.glob("cpu[0-9]*"):
        for name in ("core_cpus_list", "thread_siblings_list"):
            try:
                cores.add((d / "topology" / name).read_text().strip())
                break
            except OSError:
                continue
    return len(cores) or os.cpu_count() or 1


def set_threads(n: int | str | None = "auto") -> Choice:
    """The library's threads for this process, now: ``n`` threads, or ``"auto"``/``None`` for the scripts' policy
    (:func:`policy`: the CPUs free now; ``OMP_NUM_THREADS`` if set). Library calls then leave them alone.
    Returns the choice. ``n`` below 1: :class:`lib.errors.ParamError`.

    Args:
        n: the number of intra-op threads, or ``"auto"``/``None``.

    Returns:
        The :class:`Choice`: the threads and why.

    Raises:
        ParamError: ``n`` is not an integer of at least 1 or ``"auto"``.
    """
    global _CHOICE, _LIBRARY_DONE
    from ..errors import ParamError

    if n is None or n == "auto":
        _CHOICE = choose(None)
    else:
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise ParamError("n", f"n must be an integer of at least 1 or 'auto', got {n!r}")
        _CHOICE = Choice(n, "lib.set_threads")
    torch.set_num_threads(_CHOICE.n)
    _LIBRARY_DONE = True
    return _CHOICE


def for_library() -> Choice | None:
    """Called by the heavy library calls (:func:`lib.exact_hessian`, :class:`lib.HessianOperator`,
    :func:`lib.hessian_diagonal`): once per process, choose the threads as the scripts do, unless they were chosen.

    In order: a choice already made (a script's :func:`apply`, :func:`set_threads`) stays; ``LLM_HESSIAN_THREADS``
    (an integer, or ``auto``) decides; a ``torch.set_num_threads`` of the caller (a thread count other than
    torch's start value, :func:`torch_default_threads`) is kept; else :func:`choose` (``OMP_NUM_THREADS``, else the
    free CPUs). A caller's ``torch.set_num_threads`` to torch's own start value cannot be told from none: use
    :func:`set_threads` or the variable for that. Later calls change nothing (a caller's later
    ``torch.set_num_threads`` is kept). Returns the choice (``None`` if the caller's setting was kept)."""
    global _CHOICE, _LIBRARY_DONE
    if _LIBRARY_DONE or _CHOICE is not None:
        return _CHOICE
    env = os.environ.get(LIBRARY_ENV, "").strip()
    if env and env != "auto":
        if not env.isdigit() or int(env) < 1:
            from ..errors import ParamError

            raise ParamError(
                LIBRARY_ENV,
                f"{LIBRARY_ENV} must be an integer of at least 1 or 'auto', got {env!r}",
            )
        _CHOICE = Choice(int(env), LIBRARY_ENV)
        torch.set_num_threads(_CHOICE.n)
    elif env == "auto" or torch.get_num_threads() == torch_default_threads():
        _CHOICE = choose(None)
        torch.set_num_threads(_CHOICE.n)
    _LIBRARY_DONE = True
    return _CHOICE


def capped(choice: Choice, cpus: int) -> Choice:
    """``choice`` with at most ``cpus`` threads (the CPUs this process may run on): more threads than CPUs only wait
    for each other (and ``--threads 100000`` made OpenMP run out of memory and crash); a cap is one warning line
    and is recorded in the JSON's ``why``."""
    if choice.n <= cpus:
        return choice
    from ..model.inputs import warn

    source = choice.why  # --threads or OMP_NUM_THREADS
    warn(
        f"{source} {choice.n} is more than the {cpus} CPUs this process may run on: using {cpus} threads"
    )
    return Choice(cpus, f"{source} {choice.n} capped to the {cpus} CPUs", choice.processes)


def report() -> dict[str, Any] | None:
    """For the JSON: ``{"n", "why", "processes"}`` of this process's choice, ``None`` if :func:`apply` was not called."""
    return None if _CHOICE is None else _CHOICE.to_json()
