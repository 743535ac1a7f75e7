"""Compare the results of ``tools/gpu_check.sh`` run on a GPU with the same run on the CPU.

    python tools/gpu_compare.py GPU_RESULTS_DIR CPU_RESULTS_DIR

Prints, per run, the largest relative difference ``max |a - b| / max |b|`` over every floating tensor of its
``.pt`` (tensors matched by their key path), for GPU vs CPU and for the pairs that must agree on the GPU itself
(two workers vs one, ``--device_map auto`` vs one device, killed-and-resumed vs uninterrupted, FSDP vs one
process, bf16 finite differences vs the float64 exact Hessian).
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import torch

RUNS = ["s1", "s2", "s3", "d", "sp", "w2", "dm", "un", "ck", "fd1", "fsdp1", "fsdp2", "fdbf"]
PAIRS = [
    ("w2", "s1"),
    ("dm", "s1"),
    ("ck", "un"),
    ("fsdp1", "fd1"),
    ("fsdp2", "fd1"),
    ("fdbf", "s1"),
]


def tensors(obj: Any, prefix: str = "") -> dict[str, torch.Tensor]:
    """Every floating tensor in ``obj`` (nested dicts, lists, dataclass-like objects), by key path."""
    out: dict[str, torch.Tensor] = {}
    if isinstance(obj, torch.Tensor):
        if obj.is_floating_point():
            out[prefix] = obj.detach().double().cpu()
    elif isinstance(obj, dict):
        for k, v in obj.items():
            out.update(tensors(v, f"{prefix}/{k}"))
    elif isinstance(obj, list | tuple):
        for i, v in enumerate(obj):
            out.update(tensors(v, f"{prefix}[{i}]"))
    elif hasattr(obj, "__dict__"):
        out.update(tensors(vars(obj), prefix))
    return out


def compare(a: Path, b: Path) -> str:
    """The worst relative difference over the tensors both files hold, and where it is."""
    if not a.exists() or not b.exists():
        return f"missing {a if not a.exists() else b}"
    ta = tensors(torch.load(a, map_location="cpu", weights_only=False))
    tb = tensors(torch.load(b, map_location="cpu", weights_only=False))
    worst, where, n = 0.0, "", 0
    for k in sorted(ta.keys() & tb.keys()):
        x, y = ta[k], tb[k]
        if x.shape != y.shape:
            return f"shape differs at {k}: {tuple(x.shape)} vs {tuple(y.shape)}"
        n += 1
        scale = float(y.abs().max()) or 1.0
        d = float((x - y).abs().max()) / scale if x.numel() else 0.0
        if d > worst or not where:
            worst, where = d, k
    return f"{worst:.2e} (at {where}; {n} tensors compared)"


def main() -> None:
    gpu, cpu = Path(sys.argv[1]), Path(sys.argv[2])
    print("| run | GPU vs CPU, max rel diff |\n|---|---|")
    for r in RUNS:
        print(f"| {r} | {compare(gpu / f'{r}.pt', cpu / f'{r}.pt')} |")
    print("\n| pair (GPU) | max rel diff |\n|---|---|")
    for x, y in PAIRS:
        print(f"| {x} vs {y} | {compare(gpu / f'{x}.pt', gpu / f'{y}.pt')} |")


if __name__ == "__main__":
    main()
