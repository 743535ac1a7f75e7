"""The fast paths of Fig. 1a's columns, each timed and audited (issue 28): float32 (the exact default), TF32
(``--matmul_precision high``), a bfloat16 model, and finite-difference products in float32.

The OPT-125M architecture (random weights, no download: ``exact_hessian.opt``), seqlen ``--seqlen`` (the report's
2048), ``--columns`` columns of Fig. 1a's block (row 0 of block-0 ``q_proj``, t=768) on one random sample: per path,
the time per column (:class:`lib.hessian.exact.ExactHessianJob`, warmed up) and the audit of ``--audit`` of those columns
against exact float64 double backward (:func:`lib.products.audit.audit_products`, the reference being a float64 copy of the
model). Prints one line per path and a Markdown table (device, torch, date) for the README's GPU paragraph and
``docs/long_runs.md``. Random weights: the errors of the trained model may differ (the time does not).

    python benchmarks/fast_paths.py --device cuda            # about 2 minutes on one H200
    OMP_NUM_THREADS=1 python benchmarks/fast_paths.py --device cpu --seqlen 64 --columns 8   # the CPU smoke run
"""

from __future__ import annotations

import argparse
import copy
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from exact_hessian import opt  # noqa: E402 -- OPTForCausalLM(OPTConfig(**config)), seed 0, eager, frozen

from lib.hessian.exact import ExactHessianJob  # noqa: E402
from lib.objective import subsets  # noqa: E402
from lib.products import audit  # noqa: E402
from lib.products.finite_difference import FDSettings, FiniteDifference  # noqa: E402
from lib.products.operator import REVERSE_OVER_REVERSE  # noqa: E402
from lib.runtime.jobs import run_serial  # noqa: E402

T = 768
"""Fig. 1a's block: the whole first row of OPT-125M's block-0 ``q_proj``."""


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def columns(model, subset, ids, products) -> tuple[torch.Tensor, float]:
    """``(H (n, n) float64 over ids, seconds)``: the exact script's job on ``subset`` with ``products``."""
    job = ExactHessianJob(subset, ids, model_input_bs=1, model=model, products=products)
    sync(ids.device)
    t0 = time.perf_counter()
    sums = run_serial(job, ids.device)
    sync(ids.device)
    return sums["hessian_sum"] / (ids.shape[0] * (ids.shape[1] - 1)), time.perf_counter() - t0


def main() -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--device", default="cuda")
    p.add_argument("--seqlen", type=int, default=2048)
    p.add_argument(
        "--columns", type=int, default=32, help="timed columns of Fig. 1a's block per path"
    )
    p.add_argument("--audit", type=int, default=8, help="of them, audited against float64")
    args = p.parse_args()
    dev = torch.device(args.device)
    cuda = (
        f", CUDA {torch.version.cuda}, {torch.cuda.get_device_name(dev)}"
        if dev.type == "cuda"
        else ""
    )
    print(
        f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, torch {torch.__version__}{cuda}",
        flush=True,
    )

    model = opt().to(dev)
    ids = torch.randint(
        3, model.config.vocab_size, (1, args.seqlen), generator=torch.Generator().manual_seed(0)
    )
    ids = ids.to(dev)
    sub = subsets.single_layer_single_block(model, "self_attn.q_proj", 0, args.columns)
    n = sub.size
    vectors, cols = audit.column_vectors(n, args.audit, 0)
    t0 = time.perf_counter()
    reference = audit.float64_reference(model, sub, ids)(vectors.to(dev))
    sync(dev)
    ref_s = time.perf_counter() - t0
    print(f"float64 reference: {args.audit} columns in {ref_s:.2f} s", flush=True)
    bf16 = copy.deepcopy(model).to(torch.bfloat16)
    paths = {
        "float32, --matmul_precision highest (exact default)": (
            model,
            "highest",
            REVERSE_OVER_REVERSE,
        ),
        "TF32, --matmul_precision high": (model, "high", REVERSE_OVER_REVERSE),
        "bf16 passes, --matmul_precision medium": (model, "medium", REVERSE_OVER_REVERSE),
        "--dtype bfloat16": (bf16, "highest", REVERSE_OVER_REVERSE),
        "--hvp finite_difference, float32": (model, "highest", FiniteDifference(FDSettings())),
    }
    rows, base = [], None
    for name, (m, precision, products) in paths.items():
        torch.set_float32_matmul_precision(precision)
        try:
            s4 = subsets.single_layer_single_block(m, "self_attn.q_proj", 0, 4)
            columns(m, s4, ids, products)  # warm-up
            h, dt = columns(m, sub, ids, products)
        except Exception as e:  # noqa: BLE001 -- a path that fails is a row, not the end of the run
            rows.append((name, "failed", f"{type(e).__name__}: {str(e)[:100]}", "-"))
            print(" | ".join(rows[-1]), flush=True)
            continue
        finally:
            torch.set_float32_matmul_precision("highest")
        res = audit.audit_products(
            audit.matrix_path(h), None, vectors.to(dev), 1, columns=cols, ref=reference
        )
        per = dt / n * 1e3
        base = per if base is None else base
        rows.append(
            (
                name,
                f"{per:.1f} ms/column ({base / per:.2f}x)",
                f"max {res.max_rel_error:.1e}, median {res.median_rel_error:.1e}",
                f"{ref_s / (dt / n * T) * 100:.1f} %",  # K float64 columns / one sample's T columns
            )
        )
        print(" | ".join(rows[-1]), flush=True)
    print(
        f"\nOPT-125M architecture (random weights), seqlen {args.seqlen}, {n} columns of Fig. 1a's block, 1 sample; "
        f"audit: {args.audit} columns against float64 double backward; audit cost: {args.audit} float64 columns "
        f"against a {T}-column sample of Fig. 1a\n"
    )
    print(
        f"| path | time per column (speed-up) | audited rel. error | audit cost (K={args.audit} of t={T}) |"
    )
    print("|---|---|---|---|")
    for r in rows:
        print("| " + " | ".join(r) + " |")


if __name__ == "__main__":
    main()
