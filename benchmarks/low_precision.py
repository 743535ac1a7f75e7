"""Measurement: how far exact Hessians computed in a 16-bit model dtype are from float64.

On the embedded model (``assets/tiny-opt-shakespeare``), for the same samples of its held-out text,
the exact Hessian of the mean next-token NLL is computed with the model in float64 (the reference),
float32, bfloat16 and float16, for two subsets: the first ``t`` entries of row 0 of ``q_proj`` in
block 0 and of ``fc2`` in all blocks. Prints the relative Frobenius error ``||H - H64|| / ||H64||``
and the largest entry error relative to ``max |H64|``. The figure behind the ``--dtype`` warning.

    python benchmarks/low_precision.py            # seqlen 128, b 4, t 32
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from lib.hessian.exact import exact_hessian  # noqa: E402
from lib.model.data import load_samples  # noqa: E402
from lib.model.models import load_model  # noqa: E402
from lib.objective import subsets  # noqa: E402

DTYPES = ("float64", "float32", "bfloat16", "float16")


def relative_errors(h: torch.Tensor, ref: torch.Tensor) -> tuple[float, float]:
    """``(||h - ref||_F / ||ref||_F, max |h - ref| / max |ref|)``."""
    d = h.double() - ref
    return float(d.norm() / ref.norm()), float(d.abs().max() / ref.abs().max())


def main() -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--seqlen", type=int, default=128)
    p.add_argument("--b", type=int, default=4)
    p.add_argument("--t", type=int, default=32)
    args = p.parse_args()
    samples = load_samples("embedded", args.seqlen, args.b)
    builders = {
        "q_proj block 0": lambda m: subsets.single_layer_single_block(
            m, "self_attn.q_proj", 0, args.t
        ),
        "fc2 all blocks": lambda m: subsets.single_layer_several_blocks(
            m, "fc2", subsets.num_blocks(m), args.t
        ),
    }
    hessians: dict[str, dict[str, torch.Tensor]] = {name: {} for name in builders}
    for dtype in DTYPES:
        model = load_model("embedded", dtype=getattr(torch, dtype))
        for name, build in builders.items():
            hessians[name][dtype] = exact_hessian(model, build(model), samples).hessian_sum.double()
    print(
        f"embedded model, b={args.b}, seqlen={args.seqlen}, t={args.t}; error vs the float64 Hessian"
    )
    print("| subset | dtype | rel. Frobenius error | max entry error / max entry |")
    print("|---|---|---|---|")
    for name, by_dtype in hessians.items():
        for dtype in DTYPES[1:]:
            fro, mx = relative_errors(by_dtype[dtype], by_dtype["float64"])
            print(f"| {name} | {dtype} | {fro:.2e} | {mx:.2e} |")


if __name__ == "__main__":
    main()
