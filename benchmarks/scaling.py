"""Benchmark: data-parallel scaling of the exact Hessian, samples per second with 1 and 2 worker processes.

The exact Hessian (``rev-rev``) of the embedded model for the first ``t`` weights of row 0 of
``self_attn.q_proj`` in block 0, over ``b`` samples of ``seqlen`` tokens, run with
:func:`lib.runtime.parallel.run_job`: in this process, then with each ``--configs`` entry (a comma-separated
device list, one spawned worker per entry). For each it prints the start-up time (spawn, imports and
model load, until every worker is ready), the compute time, samples per second over the compute time
and over the whole wall time, the speed-up of the compute rate over the in-process run, and whether
the Hessian is bitwise the in-process one. ``CPU s/sample`` is the process CPU time spent in the
units: when it stays flat while the speed-up does not grow, the cores were busy with other work.
Every worker uses this process's number of CPU threads, so on a 2-core CPU run it with
``OMP_NUM_THREADS=1``:

    OMP_NUM_THREADS=1 python benchmarks/scaling.py                       # cpu and cpu,cpu
    python benchmarks/scaling.py --configs cuda:0 cuda:0,cuda:1 --model facebook/opt-125m --seqlen 2048 --t 128
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from lib.hessian.exact import ExactHessianJob  # noqa: E402
from lib.model.data import load_samples  # noqa: E402
from lib.model.models import EMBEDDED, ModelSpec, resolve_device  # noqa: E402
from lib.objective import subsets  # noqa: E402
from lib.runtime import parallel  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(
        description=__doc__.splitlines()[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    p.add_argument("--model", default=EMBEDDED)
    p.add_argument("--dtype", default="float32")
    p.add_argument("--seqlen", type=int, default=128)
    p.add_argument("--b", type=int, default=32)
    p.add_argument("--t", type=int, default=32)
    p.add_argument("--device", default="cpu", help="device of the in-process baseline")
    p.add_argument(
        "--configs",
        nargs="+",
        default=["cpu", "cpu,cpu"],
        help="device lists, one spawned worker per entry",
    )
    args = p.parse_args()

    spec = ModelSpec(args.model, dtype=args.dtype)
    model = spec.load(resolve_device(args.device))
    subset = subsets.single_layer_single_block(model, "self_attn.q_proj", 0, args.t)
    samples = load_samples(args.model, args.seqlen, args.b)
    print(
        f"exact Hessian {args.t}x{args.t}, {args.model} ({args.dtype}), b={args.b}, seqlen={args.seqlen}; {torch.get_num_threads()} CPU thread(s) per process; torch {torch.__version__}"
    )

    rows, reference, base_rate = [], None, None
    for label in ["in-process", *args.configs]:
        devices = (
            [resolve_device(args.device)]
            if label == "in-process"
            else [resolve_device(d) for d in label.split(",")]
        )
        job = ExactHessianJob(subset, samples, spec=spec, model=model)
        settings = parallel.RunSettings(devices, force_workers=label != "in-process")
        t0 = time.perf_counter()
        sums = parallel.run_job(job, settings)
        wall = time.perf_counter() - t0
        st = settings.stats
        rate = args.b / st["compute_s"]
        if reference is None:
            reference, base_rate = sums["hessian_sum"], rate
        rows.append(
            [
                label,
                str(st["workers"]),
                f"{st['setup_s']:.1f}",
                f"{st['compute_s']:.1f}",
                f"{rate:.2f}",
                f"{args.b / wall:.2f}",
                f"{rate / base_rate:.2f}x",
                f"{st['unit_cpu_s'] / args.b:.2f}",
                "yes" if torch.equal(sums["hessian_sum"], reference) else "NO",
            ]
        )

    head = [
        "devices",
        "workers",
        "start-up s",
        "compute s",
        "samples/s",
        "samples/s (wall)",
        "speed-up",
        "CPU s/sample",
        "bitwise equal",
    ]
    widths = [max(len(r[i]) for r in [head, *rows]) for i in range(len(head))]
    for r in [head, ["-" * w for w in widths], *rows]:
        print(" | ".join(c.ljust(w) for c, w in zip(r, widths)))


if __name__ == "__main__":
    main()
