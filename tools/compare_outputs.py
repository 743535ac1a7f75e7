"""Run a fixed set of commands into a folder, or compare two such folders bitwise (refactoring guard).

    OMP_NUM_THREADS=1 python tools/compare_outputs.py run DIR [--only NAME ...]
    python tools/compare_outputs.py compare BASELINE_DIR NEW_DIR

``run`` executes, with fixed ``--seed``, fixed ``--chunk`` and float64 where the scripts take them: the README's
first command (``single_layer_single_block.py``), a ``hessian_diagonal.py`` run, four ``hessian_spectrum.py`` runs
(the iterative path with ``--trace`` and ``--density`` under each ``--reorth``, and the dense path) a ``--compare`` run and ``reproduce.py --figure
all --quick``. ``compare`` loads every ``.pt`` under both folders and compares every leaf (tensors with
``torch.equal`` after checking dtype and shape, other values with ``==``), prints a table and exits 1 on any
difference or missing file. A refactoring that claims "results bitwise unchanged" runs ``run`` before and after,
then ``compare``.
"""

from __future__ import annotations

import argparse
import math
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
COMMON = ["--seed", "0", "--no_progress", "--threads", "1"]
SMALL = ["--b", "2", "--seqlen", "16", "--dtype", "float64"]

RUNS: dict[str, list[str]] = {
    # README's first command as written (the scripts' defaults), fixed chunk so the product batch is not autotuned
    "readme": ["single_layer_single_block.py", "--chunk", "16", "--name", "readme"],
    "diagonal": [
        "hessian_diagonal.py",
        *SMALL,
        "--estimator",
        "hutchinson",
        "xdiag",
        "--hvps",
        "4",
        "--name",
        "diagonal",
    ],
    "spectrum_iter": [
        "hessian_spectrum.py",
        *SMALL,
        "--chunk",
        "4",
        "--exact_below",
        "0",
        "--top_k",
        "2",
        "--which",
        "both",
        "--trace",
        "--trace_hvps",
        "12",
        "--density",
        "--slq_probes",
        "2",
        "--lanczos_steps",
        "8",
        "--max_iter",
        "30",
        "--eigenvectors",
        "--name",
        "spectrum_iter",
    ],
    # the other two reorthogonalizations (Lanczos' selective and plain recurrences, SLQ without a basis)
    "spectrum_selective": [
        "hessian_spectrum.py",
        *SMALL,
        "--chunk",
        "4",
        "--exact_below",
        "0",
        "--top_k",
        "3",
        "--which",
        "both",
        "--reorth",
        "selective",
        "--density",
        "--slq_probes",
        "2",
        "--lanczos_steps",
        "8",
        "--max_iter",
        "40",
        "--name",
        "spectrum_selective",
    ],
    "spectrum_none": [
        "hessian_spectrum.py",
        *SMALL,
        "--chunk",
        "4",
        "--exact_below",
        "0",
        "--top_k",
        "2",
        "--reorth",
        "none",
        "--max_iter",
        "40",
        "--name",
        "spectrum_none",
    ],
    "spectrum_exact": [
        "hessian_spectrum.py",
        *SMALL,
        "--chunk",
        "8",
        "--top_k",
        "3",
        "--trace",
        "--name",
        "spectrum_exact",
    ],
    # the curvature comparison (every --compare approximation), not in the reproduce presets
    "compare": [
        "single_layer_single_block.py",
        *SMALL,
        "--t",
        "4",
        "--chunk",
        "4",
        "--compare",
        "ggn",
        "fisher",
        "empirical_fisher",
        "gptq",
        "kfac",
        "diag",
        "--perturbations",
        "8",
        "--name",
        "compare",
    ],
    "reproduce": ["reproduce.py", "--figure", "all", "--quick", "--dtype", "float64"],
}


def run(out: Path, only: list[str] | None) -> None:
    """Run every command of :data:`RUNS` (or those named in ``only``) with its outputs under ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    for name, argv in RUNS.items():
        if only and name not in only:
            continue
        extra = COMMON if argv[0] != "reproduce.py" else ["--no_progress", "--threads", "1"]
        cmd = [sys.executable, str(ROOT / argv[0]), *argv[1:], *extra, "--output_dir", str(out)]
        t0 = time.perf_counter()
        proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
        (out / f"{name}.log").write_text(proc.stdout + proc.stderr)
        print(f"{name}: rc={proc.returncode} ({time.perf_counter() - t0:.0f}s)", flush=True)
        if proc.returncode:
            print(proc.stderr[-2000:])
            sys.exit(1)


def leaves(obj: Any, prefix: str = "") -> dict[str, Any]:
    """Every leaf of ``obj`` (nested dicts, lists, tuples, objects with ``__dict__``) by its key path."""
    import torch

    if isinstance(obj, torch.Tensor):
        return {prefix: obj}
    out: dict[str, Any] = {}
    if isinstance(obj, dict):
        for k, v in obj.items():
            out.update(leaves(v, f"{prefix}/{k}"))
    elif isinstance(obj, list | tuple):
        for i, v in enumerate(obj):
            out.update(leaves(v, f"{prefix}[{i}]"))
    elif hasattr(obj, "__dict__") and not isinstance(obj, type):
        out.update(leaves(vars(obj), prefix))
    else:
        out[prefix] = obj
    return out


def same(a: Any, b: Any) -> bool:
    """Bitwise equality of two leaves (NaN equals NaN at the same place)."""
    import torch

    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        if not (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor)):
            return False
        if a.dtype != b.dtype or a.shape != b.shape:
            return False
        if a.is_floating_point() or a.is_complex():
            return bool(torch.equal(torch.nan_to_num(a), torch.nan_to_num(b))) and bool(
                torch.equal(a.isnan(), b.isnan())
            )
        return bool(torch.equal(a, b))
    if isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b):
        return True
    try:
        return bool(a == b)
    except Exception:
        return repr(a) == repr(b)


def compare(base: Path, new: Path) -> int:
    """Print one row per ``.pt`` file under ``base``; return the number of files that differ or are missing."""
    import torch

    files = sorted(p.relative_to(base) for p in base.rglob("*.pt"))
    extra = sorted(set(p.relative_to(new) for p in new.rglob("*.pt")) - set(files))
    bad = 0
    print("| file | tensors | other leaves | result |\n|---|---|---|---|")
    for rel in files:
        if not (new / rel).exists():
            print(f"| {rel} | | | MISSING in {new} |")
            bad += 1
            continue
        la = leaves(torch.load(base / rel, map_location="cpu", weights_only=False))
        lb = leaves(torch.load(new / rel, map_location="cpu", weights_only=False))
        nt = sum(isinstance(v, torch.Tensor) for v in la.values())
        diff = sorted(
            k for k in la.keys() | lb.keys() if k not in la or k not in lb or not same(la[k], lb[k])
        )
        if diff:
            bad += 1
            print(
                f"| {rel} | {nt} | {len(la) - nt} | DIFFERS at {len(diff)}: {', '.join(diff[:5])} |"
            )
        else:
            print(f"| {rel} | {nt} | {len(la) - nt} | bitwise equal |")
    for rel in extra:
        print(f"| {rel} | | | only in {new} |")
    print(f"\n{len(files)} files compared, {bad} differ or are missing")
    return bad


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run")
    r.add_argument("dir", type=Path)
    r.add_argument("--only", nargs="+", choices=list(RUNS))
    c = sub.add_parser("compare")
    c.add_argument("base", type=Path)
    c.add_argument("new", type=Path)
    a = p.parse_args()
    if a.cmd == "run":
        run(a.dir, a.only)
    else:
        sys.exit(1 if compare(a.base, a.new) else 0)


if __name__ == "__main__":
    main()
