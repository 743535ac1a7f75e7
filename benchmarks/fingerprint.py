"""Benchmark: the cost of the load-time input checks (:mod:`lib.model.inputs`) against the load itself.

For the embedded model and for the OPT-125M architecture with random weights (built from
``OPTConfig()`` and saved with ``save_pretrained`` to a temporary directory; no download), prints
the fastest of ``--repeat`` wall times of: ``load_model`` (which includes the finiteness check),
:func:`lib.model.inputs.model_fingerprint` (SHA-256 of every parameter and buffer) on one thread and on its
default number of threads, and :func:`lib.model.inputs.check_finite_weights`.

    python benchmarks/fingerprint.py --repeat 3
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from lib.model.inputs import check_finite_weights, model_fingerprint  # noqa: E402
from lib.model.models import load_model  # noqa: E402


def fastest(fn, repeat: int) -> float:
    best = float("inf")
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def measure(label: str, path: str, repeat: int) -> None:
    model = load_model(path)
    size = sum(
        t.numel() * t.element_size()
        for t in {id(t): t for t in model.state_dict().values()}.values()
    )
    load_s = fastest(lambda: load_model(path), repeat)
    fp1_s = fastest(lambda: model_fingerprint(model, threads=1), repeat)
    fp_s = fastest(lambda: model_fingerprint(model), repeat)
    fin_s = fastest(lambda: check_finite_weights(model), repeat)
    print(
        f"| {label} | {size / 2**20:.1f} | {load_s:.3f} | {fp1_s:.3f} ({size / 2**20 / fp1_s:.0f} MiB/s) | {fp_s:.3f} | {fin_s:.3f} |"
    )


def main() -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--repeat", type=int, default=3)
    args = p.parse_args()
    print(
        f"| model | weights MiB | load_model (s) | fingerprint, 1 thread (s) | fingerprint, {min(8, os.cpu_count() or 1)} threads (s) | finiteness check (s) |"
    )
    print("|---|---|---|---|---|---|")
    measure("embedded", "embedded", args.repeat)
    from transformers import OPTConfig, OPTForCausalLM

    with tempfile.TemporaryDirectory() as tmp:
        torch.manual_seed(0)
        OPTForCausalLM(OPTConfig()).save_pretrained(tmp)
        measure("OPT-125M architecture (random weights, float32)", tmp, args.repeat)


if __name__ == "__main__":
    main()
