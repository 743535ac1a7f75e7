"""Benchmark: ``--chunk 0`` (auto, measured by :mod:`lib.products.autotune`) against ``--chunk 1``, and ``--model_input_bs``.

Each case runs the whole exact-Hessian job (:class:`lib.hessian.exact.ExactHessianJob`, serial) with the chunk
measured on the first batch (the measurement included in the time) and with chunk 1, alternating the two
``--repeat`` times in one process; prints the fastest and the median wall time of each, their ratios, the
ratio of median process CPU times (less disturbed by other processes on a shared machine), the chosen
chunk and the max relative difference of the two Hessians. Cases:

* ``tiny``: all 400 entries of block-0 ``q_proj`` of a tiny random OPT (hidden 20, 2 blocks, vocab 64), b 2, seqlen 32;
* ``embedded``: the bundled model, ``t`` = 128 entries of row 0 of block-0 ``q_proj``, b 2, seqlen 128;
* ``opt125m``: the OPT-125M architecture with random weights (``OPTConfig()``), ``t`` = 32, b 1, seqlen 128;
* ``input_bs``: the embedded model, t 32, b 4, seqlen 128: ``--model_input_bs`` 4 against 1 (both auto chunk).

    OMP_NUM_THREADS=1 python benchmarks/chunk.py --cases tiny,embedded,opt125m,input_bs --repeat 3
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from lib.hessian.exact import ExactHessianJob  # noqa: E402
from lib.model.data import load_samples  # noqa: E402
from lib.model.models import load_model  # noqa: E402
from lib.objective import subsets  # noqa: E402
from lib.runtime.jobs import run_serial  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from exact_hessian import opt, tiny400  # noqa: E402 -- the same random OPTs as the exact-Hessian benchmark


def case(name: str):
    """``(model, subset, samples, [(label, job kwargs), (label, job kwargs)])`` of a case."""
    g = torch.Generator().manual_seed(0)
    if name == "tiny":
        return (*tiny400(), [("auto", {}), ("chunk 1", {"chunk": 1})])
    if name == "opt125m":
        model = opt()
        subset = subsets.single_layer_single_block(model, "self_attn.q_proj", 0, 32)
        return (
            model,
            subset,
            torch.randint(3, model.config.vocab_size, (1, 128), generator=g),
            [("auto", {}), ("chunk 1", {"chunk": 1})],
        )
    model = load_model("embedded")
    if name == "embedded":
        subset = subsets.single_layer_single_block(model, "self_attn.q_proj", 0, 128)
        return (
            model,
            subset,
            load_samples("embedded", 128, 2),
            [("auto", {}), ("chunk 1", {"chunk": 1})],
        )
    if name == "input_bs":
        subset = subsets.single_layer_single_block(model, "self_attn.q_proj", 0, 32)
        return (
            model,
            subset,
            load_samples("embedded", 128, 4),
            [("model_input_bs 4", {"model_input_bs": 4}), ("model_input_bs 1", {})],
        )
    raise SystemExit(f"unknown case {name!r}")


def timed(model, subset, samples, kwargs) -> tuple[float, float, torch.Tensor, dict]:
    """``(wall s, process CPU s, summed Hessian, chunk report)`` of one whole job."""
    job = ExactHessianJob(subset, samples, model=model, **kwargs)
    t0, c0 = time.perf_counter(), time.process_time()
    h = run_serial(job, torch.device("cpu"))["hessian_sum"]
    return time.perf_counter() - t0, time.process_time() - c0, h, job.chunk_report()


def main() -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--cases", default="tiny,embedded,opt125m,input_bs")
    p.add_argument(
        "--repeat", type=int, default=3, help="alternate the two settings this many times"
    )
    args = p.parse_args()
    print(
        f"torch {torch.__version__}, threads {torch.get_num_threads()}, {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}"
    )
    print(
        "| case | n | A | B | A wall best / median (s) | B wall best / median (s) | B/A wall best | B/A wall median | B/A CPU median | chunks chosen by A | max rel diff |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for name in args.cases.split(","):
        model, subset, samples, settings = case(name)
        timed(model, subset, samples[:1], {"chunk": 1})  # warm-up
        times: dict[str, list[float]] = {label: [] for label, _ in settings}
        cpu: dict[str, list[float]] = {label: [] for label, _ in settings}
        chosen, hs = [], {}
        for _ in range(args.repeat):
            for label, kwargs in settings:
                dt, dc, hs[label], report = timed(model, subset, samples, kwargs)
                times[label].append(dt)
                cpu[label].append(dc)
                if label == settings[0][0] and isinstance(report.get("measured"), dict):
                    chosen.append(report["measured"]["chunk"])
        (a, ta), (b, tb) = times.items()
        ha, hb = hs[a], hs[b]
        diff = float((ha - hb).abs().max() / hb.abs().max())
        med = statistics.median
        print(
            f"| {name} | {subset.size} | {a} | {b} | {min(ta):.2f} / {med(ta):.2f} | {min(tb):.2f} / {med(tb):.2f} | {min(tb) / min(ta):.2f}x | {med(tb) / med(ta):.2f}x | {med(cpu[b]) / med(cpu[a]):.2f}x | {chosen} | {diff:.1e} |",
            flush=True,
        )


if __name__ == "__main__":
    main()
