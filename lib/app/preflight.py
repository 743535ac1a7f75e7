"""Resource pre-flight: estimate a run's memory and checkpoint size from its plan, refuse before heavy work when they do not fit.

The sums of an additive job are float64 (8 bytes per entry). The estimates below count the large
arrays only (model activations are not included); they are meant to catch runs off by orders of
magnitude, e.g. XDiag keeping ``K/2`` vectors of every weight's size (``--all_layers --hvps 200``).

* exact Hessian of ``n`` entries: sums ``n^2``; the checkpoint holds ``n^2`` float64.
* diagonal, phase 1: per weight of ``n`` entries, ``zhz`` (``n``), XDiag's sketch ``hz`` (``K/2 x n``),
  ``record`` (``probes x m``), ``exact`` entries, ``fisher`` (``n``); phase 2: ``hq`` (``K/2 x n``). The host
  also holds the orthonormal basis ``Q`` (float64) and its model-dtype copy sent to the workers.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import UserError

F64 = 8


@dataclass
class Estimate:
    """Bytes a run needs: ``host`` (peak, CPU memory of the parent), ``device`` (peak per GPU, beyond the model), ``checkpoint`` (all its files)."""

    host: int
    device: int
    checkpoint: int
    what: str
    """What dominates, in words (for the refusal message)."""
    disk: int = 0
    """Bytes written to disk besides the checkpoint (e.g. Lanczos vectors kept on disk)."""


def gb(n: float) -> str:
    """Bytes in words: ``4.37 GB``, ``12.6 MB``, ``0.4 kB``."""
    return (
        f"{n / 1e9:.2f} GB"
        if n >= 1e9
        else f"{n / 1e6:.1f} MB"
        if n >= 1e6
        else f"{n / 1e3:.1f} kB"
    )


def exact_estimate(n: int, dtype_bytes: int) -> Estimate:
    """Exact ``n x n`` Hessian: the float64 sum, a unit's partial, the checkpoint's encoding (2 copies) and the saved matrix."""
    sq = n * n
    return Estimate(
        host=sq * (4 * F64 + dtype_bytes),
        device=sq * dtype_bytes * 2,
        checkpoint=sq * F64,
        what=f"the exact Hessian has {n}^2 = {sq:,} entries",
    )


def phase1_entries(plans: Sequence) -> int:
    """Float64 entries of the phase-1 sums of :class:`lib.hessian.diagonal.ParamPlan` s (``nll_sum`` excluded)."""
    return sum(p.entries() for p in plans)


def diagonal_estimate(plans: Sequence, dtype_bytes: int, workers: int = 1) -> Estimate:
    """Peak host / device memory and checkpoint bytes of :func:`lib.hessian.diagonal.hessian_diagonal` with phase-1 ``plans``."""
    s1 = phase1_entries(plans) * F64
    sketch = sum(p.keep * p.numel for p in plans)  # K/2 x n per weight, for XDiag
    largest = max((p.keep * p.numel for p in plans), default=0)
    s2 = sketch * F64
    basis = sketch * dtype_bytes
    # phase 2 in the parent: phase-1 sums, Q (float64), the basis (model dtype; pickled once more for workers),
    # phase-2 sums, one unit's partial, the checkpoint being encoded (two copies); then the estimate's temporaries
    host = (
        s1
        + s2
        + basis * (2 + (workers if workers > 1 else 0))
        + s2
        + basis
        + 2 * max(s1, s2)
        + 5 * largest * F64
    )
    device = 3 * largest * dtype_bytes
    n = sum(p.numel for p in plans)
    k2 = max((p.keep for p in plans), default=0)
    what = (
        f"XDiag keeps K/2 = {k2} vectors of each weight's size ({n:,} entries in {len(plans)} weight(s))"
        if k2
        else f"{n:,} entries in {len(plans)} weight(s)"
    )
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


def check(
    est: Estimate,
    devices: Sequence[torch.device],
    output_dir: str | Path,
    writes_checkpoint: bool,
    alternatives: str,
) -> None:
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
        if (
            2 * est.checkpoint + est.disk > disk
        ):  # the new file is written beside the old one, then renamed
            problems.append(
                f"up to {gb(2 * est.checkpoint + est.disk)} of disk for checkpoints{' and stored vectors' if est.disk else ''} ({gb(disk)} free in {output_dir})"
            )
    if problems:
        raise UserError(f"this run needs {' and '.join(problems)}: {est.what}; use {alternatives}")


def stored_vectors(
    block_size: int,
    max_iter: int,
    reorth: str,
    eigenvectors: bool,
    top_k: int,
    trace_hvps: int,
    density: bool,
    slq_probes: int,
    lanczos_steps: int,
) -> int:
    """Most ``n``-vectors the spectrum's algorithms keep at once (they run one after another): Lanczos' basis (``block_size x
    max_iter`` with full or selective reorthogonalization, or for eigenvectors; plus up to ``2 top_k`` converged Ritz
    vectors with selective; none with ``reorth="none"``), Hutch++'s ``trace_hvps`` (its probes, ``Q`` and products), SLQ's
    probes x steps (full reorthogonalization only)."""
    lanczos = block_size * max_iter if reorth in ("full", "selective") or eigenvectors else 0
    lanczos += 2 * top_k if reorth == "selective" else 0
    slq = slq_probes * lanczos_steps if density and reorth == "full" else 0
    return max(lanczos, trace_hvps, slq)


def spectrum_estimate(
    n: int,
    block_size: int,
    stored: int,
    dtype_bytes: int,
    vector_bytes: int = F64,
    storage: str = "device",
    world: int = 1,
    pass_log_vectors: int = 0,
    on_gpu: bool = False,
) -> Estimate:
    """The iterative spectrum path, per process (``n / world`` entries each under FSDP): the ``stored`` vectors
    (:func:`stored_vectors`, ``vector_bytes`` each entry) on ``storage`` (``device``: the GPU with ``on_gpu``, else the host;
    ``cpu``; ``disk``: memory-mapped files, counted as disk), about 8 working blocks of ``block_size`` vectors, the product
    job's float64 copies of its block (3, on the host) and the model-dtype products (3, on the device); the pass log
    holds one float64 output per HVP (``pass_log_vectors``)."""
    local = -(-n // world)
    basis = local * stored * vector_bytes
    work = 8 * local * block_size * vector_bytes
    job = 3 * local * block_size * F64
    on_host = storage == "cpu" or (storage == "device" and not on_gpu)
    host = job + (0 if on_gpu else work) + (basis if on_host else 0)
    device = (
        3 * local * block_size * dtype_bytes
        + (work if on_gpu else 0)
        + (basis if storage == "device" and on_gpu else 0)
    )
    where = {
        "device": "on the device" if on_gpu else "in host memory",
        "cpu": "in host memory",
        "disk": "on disk",
    }[storage]
    what = f"the spectrum keeps {stored} vectors of {local:,} entries ({vector_bytes} bytes each) {where}, and its pass log {pass_log_vectors} more on disk"
    return Estimate(
        host=host,
        device=device,
        checkpoint=local * pass_log_vectors * F64,
        what=what,
        disk=basis if storage == "disk" else 0,
    )
