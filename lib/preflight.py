"""Resource pre-flight: estimate a run's memory and checkpoint size from its plan, refuse before heavy work when they do not fit.

The sums of an additive job are float64 (8 bytes per entry). The estimates below count the large
arrays only (model activations are not included); they are meant to catch runs off by orders of
magnitude, e.g. XDiag keeping ``K/2`` vectors of every weight's size (``--all_layers --vhp_samples 200``).

* exact Hessian of ``n`` entries: sums ``n^2``; the checkpoint holds ``n^2`` float64.
* diagonal, phase 1: per weight of ``n`` entries, ``zhz`` (``n``), XDiag's sketch ``hz`` (``K/2 x n``),
  ``record`` (``probes x m``), ``exact`` entries, ``fisher`` (``n``); phase 2: ``hq`` (``K/2 x n``). The host
  also holds the orthonormal basis ``Q`` (float64) and its model-dtype copy sent to the workers.
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch

from .errors import UserError

F64 = 8


@dataclass
class Estimate:
    """Bytes a run needs: ``host`` (peak, CPU memory of the parent), ``device`` (peak per GPU, beyond the model), ``checkpoint`` (all its files)."""

    host: int
    device: int
    checkpoint: int
    what: str
    """What dominates, in words (for the refusal message)."""


def gb(n: float) -> str:
    """Bytes in words: ``4.37 GB``, ``12.6 MB``, ``0.4 kB``."""
    return f"{n / 1e9:.2f} GB" if n >= 1e9 else f"{n / 1e6:.1f} MB" if n >= 1e6 else f"{n / 1e3:.1f} kB"


def exact_estimate(n: int, dtype_bytes: int) -> Estimate:
    """Exact ``n x n`` Hessian: the float64 sum, a unit's partial, the checkpoint's encoding (2 copies) and the saved matrix."""
    sq = n * n
    return Estimate(host=sq * (4 * F64 + dtype_bytes), device=sq * dtype_bytes * 2, checkpoint=sq * F64, what=f"the exact Hessian has {n}^2 = {sq:,} entries")


def phase1_entries(plans: Sequence) -> int:
    """Float64 entries of the phase-1 sums of :class:`lib.diagonal.ParamPlan` s (``nll_sum`` excluded)."""
    return sum(p.entries() for p in plans)


def diagonal_estimate(plans: Sequence, dtype_bytes: int, workers: int = 1) -> Estimate:
    """Peak host / device memory and checkpoint bytes of :func:`lib.diagonal.hessian_diagonal` with phase-1 ``plans``."""
    s1 = phase1_entries(plans) * F64
    sketch = sum(p.keep * p.numel for p in plans)  # K/2 x n per weight, for XDiag
    largest = max((p.keep * p.numel for p in plans), default=0)
    s2 = sketch * F64
    basis = sketch * dtype_bytes
    # phase 2 in the parent: phase-1 sums, Q (float64), the basis (model dtype; pickled once more for workers),
    # phase-2 sums, one unit's partial, the checkpoint being encoded (two copies); then the estimate's temporaries
    host = s1 + s2 + basis * (2 + (workers if workers > 1 else 0)) + s2 + basis + 2 * max(s1, s2) + 5 * largest * F64
    device = 3 * largest * dtype_bytes
    n = sum(p.numel for p in plans)
    k2 = max((p.keep for p in plans), default=0)
    what = f"XDiag keeps K/2 = {k2} vectors of each weight's size ({n:,} entries in {len(plans)} weight(s))" if k2 else f"{n:,} entries in {len(plans)} weight(s)"
    return Estimate(host=host, device=device, checkpoint=s1 + s2, what=what)


def available_host_bytes() -> int:
    """``MemAvailable`` of ``/proc/meminfo`` (Linux), else physical memory."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:  # pragma: no cover
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")  # pragma: no cover


def free_device_bytes(device: torch.device) -> int | None:
    """Free memory of a CUDA device (``None`` elsewhere)."""
    if device.type != "cuda" or not torch.cuda.is_available():
        return None
    return torch.cuda.mem_get_info(device)[0]


def free_disk_bytes(path: str | Path) -> int:
    return shutil.disk_usage(path).free


def check(est: Estimate, devices: Sequence[torch.device], output_dir: str | Path, writes_checkpoint: bool, alternatives: str) -> None:
    """Refuse in one line (:class:`UserError`) when ``est`` exceeds free host memory, GPU memory, or (with
    checkpoints) free disk space, with the numbers and ``alternatives``."""
    problems = []
    host = available_host_bytes()
    if est.host > host:
        problems.append(f"about {gb(est.host)} of host memory ({gb(host)} available)")
    for d in dict.fromkeys(devices):
        free = free_device_bytes(d)
        if free is not None and est.device > free:
            problems.append(f"about {gb(est.device)} on {d} beyond the model ({gb(free)} free)")
    if writes_checkpoint:
        disk = free_disk_bytes(output_dir)
        if 2 * est.checkpoint > disk:  # the new file is written beside the old one, then renamed
            problems.append(f"up to {gb(2 * est.checkpoint)} of disk for checkpoints ({gb(disk)} free in {output_dir})")
    if problems:
        raise UserError(f"this run needs {' and '.join(problems)}: {est.what}; use {alternatives}")


def spectrum_estimate(n: int, block_size: int, max_iter: int, lanczos_vectors: int, dtype_bytes: int) -> Estimate:
    """The iterative spectrum path: the float64 Krylov basis (``n x lanczos_vectors``: Lanczos' ``block_size x
    max_iter``, or SLQ's probes x steps) and its products in the pass log (one ``n x block`` float64 file per pass)."""
    basis = n * lanczos_vectors * F64
    return Estimate(host=3 * basis + 4 * n * block_size * F64, device=3 * n * block_size * dtype_bytes, checkpoint=basis, what=f"the Krylov basis holds {lanczos_vectors} vectors of {n:,} entries")
