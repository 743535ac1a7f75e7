"""Benchmark: the default thread count on a busy and on a quiet machine (:mod:`lib.runtime.threads`).

Runs the README's first command as a new user would (``single_layer_single_block.py``, a fresh process per
run; by default the smaller ``--t 32 --b 4``, seqlen 128, so that the collapsed runs stay within minutes) in
three thread settings, interleaved run by run in alternating order (``torch default`` in only the first ``--collapse_rounds`` busy rounds):

* ``default``: no ``OMP_NUM_THREADS`` and no ``--threads`` (the policy chooses; its choice is read back from the JSON);
* ``1 thread``: ``OMP_NUM_THREADS=1``;
* ``torch default``: ``--threads <CPUs>``, what torch chose before the policy (one thread per core).

first with ``--busy`` CPU-bound processes (busy loops) running beside it, then without them ("quiet": whatever
else runs on the machine). Prints wall times (median and slowest of ``--rounds``), the ratios the goals are
stated in (busy: default / 1 thread <= 1.2; quiet: default / torch default <= 1), the load average and the date.

    python benchmarks/contention.py                       # about 10 minutes on a 2-core CPU
    python benchmarks/contention.py --args "--t 128 --b 16" --rounds 1   # the README's first command itself
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def env_without_threads() -> dict[str, str]:
    """The environment with no thread settings (what a new user's shell has)."""
    return {
        k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "MKL_NUM_THREADS")
    } | {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}


def run_once(setting: str, script_args: list[str], out: Path, cpus: int) -> dict:
    """One run of the script in a fresh process: wall seconds, the JSON's Hessian seconds and thread choice."""
    env = env_without_threads()
    extra: list[str] = []
    if setting == "1 thread":
        env["OMP_NUM_THREADS"] = "1"
    elif setting == "torch default":
        extra = ["--threads", str(cpus)]
    cmd = [
        sys.executable,
        str(ROOT / "single_layer_single_block.py"),
        *script_args,
        "--no_progress",
        "--checkpoint_every",
        "0",
        "--output_dir",
        str(out),
        "--name",
        "run",
        "--overwrite",
        *extra,
    ]
    load = os.getloadavg()[0]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=out, check=False)
    wall = time.perf_counter() - t0
    if proc.returncode:
        raise SystemExit(f"{setting}: exit {proc.returncode}\n{proc.stderr[-2000:]}")
    js = json.loads((out / "run.json").read_text())
    return {
        "wall_s": wall,
        "hessian_s": js["hessian_elapsed_s"],
        "threads": js.get("threads"),
        "load_before": load,
    }


def busy_loops(n: int) -> list[subprocess.Popen]:
    """``n`` CPU-bound processes (pure Python loops, one core each)."""
    return [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(n)]


def stop(procs: list[subprocess.Popen]) -> None:
    for p in procs:
        p.terminate()
    for p in procs:
        p.wait()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument(
        "--args",
        default="--t 32 --b 4",
        help="flags of single_layer_single_block.py (default: a smaller job than the README's --t 128 --b 16)",
    )
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument(
        "--busy", type=int, default=2, help="CPU-bound processes beside the run in the busy phase"
    )
    p.add_argument(
        "--settle_s",
        type=float,
        default=5.0,
        help="seconds the busy loops run before the first measurement",
    )
    p.add_argument("--phases", default="busy,quiet")
    p.add_argument(
        "--collapse_rounds",
        type=int,
        default=1,
        help="busy phase: run 'torch default' (it collapses, minutes per run) in only this many rounds",
    )
    args = p.parse_args()
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    script_args = shlex.split(args.args)
    settings = ["default", "1 thread", "torch default"]
    print(
        f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, {cpus} CPUs, load average {os.getloadavg()}, job: single_layer_single_block.py {args.args}",
        flush=True,
    )
    results: dict[str, dict[str, list[dict]]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp)
        run_once("1 thread", script_args, out, cpus)  # warm-up: page cache, token cache
        for phase in args.phases.split(","):
            procs = busy_loops(args.busy) if phase == "busy" else []
            try:
                time.sleep(args.settle_s if procs else 0)
                runs: dict[str, list[dict]] = {s: [] for s in settings}
                for rnd in range(args.rounds):
                    for s in (
                        settings if rnd % 2 == 0 else settings[::-1]
                    ):  # alternate the order: no setting always first
                        if s == "torch default" and phase == "busy" and rnd >= args.collapse_rounds:
                            continue
                        r = run_once(s, script_args, out, cpus)
                        runs[s].append(r)
                        print(
                            f"{phase} round {rnd} {s}: wall {r['wall_s']:.1f}s, Hessian {r['hessian_s']:.1f}s, threads {r['threads']}, load before {r['load_before']:.1f}",
                            flush=True,
                        )
            finally:
                stop(procs)
            results[phase] = runs
    print(
        "\n| phase | setting | threads chosen | wall median (s) | wall slowest (s) | Hessian median (s) | wall / 1 thread, same round: median (max) | Hessian / 1 thread, same round: median (max) | wall / torch default (medians) |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for phase, runs in results.items():
        med = {s: statistics.median(r["wall_s"] for r in rs) for s, rs in runs.items() if rs}
        for s, rs in runs.items():
            if not rs:
                continue
            chosen = sorted({r["threads"]["n"] for r in rs if r["threads"]})
            wall = [r["wall_s"] / o["wall_s"] for r, o in zip(rs, runs["1 thread"])]
            hess = [r["hessian_s"] / o["hessian_s"] for r, o in zip(rs, runs["1 thread"])]
            vs_torch = f"{med[s] / med['torch default']:.2f}x" if "torch default" in med else "-"
            print(
                f"| {phase} (+{args.busy if phase == 'busy' else 0} busy loops) | {s} | {chosen} | {med[s]:.1f} | {max(r['wall_s'] for r in rs):.1f} | {statistics.median(r['hessian_s'] for r in rs):.1f} | {statistics.median(wall):.2f}x ({max(wall):.2f}x) | {statistics.median(hess):.2f}x ({max(hess):.2f}x) | {vs_torch} |"
            )
    print(
        f"load average at the end {os.getloadavg()}, {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}"
    )


if __name__ == "__main__":
    main()
