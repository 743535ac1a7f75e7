"""How many Hessian columns (or probes) share one batched backward, chosen by measurement.

A batched vector-Jacobian product over ``c`` vectors (``is_grads_batched``) amortizes the graph walk
but materializes ``c`` copies of every intermediate; whether that pays depends on the model, the
subset size, the device and its memory bandwidth, not on the device type alone. :func:`tune_chunk`
times the candidates ``c = 1, 2, 4, ...`` up to a memory bound on the first columns of the first
batch, through a callable that *computes and keeps* those columns, so the measurement costs only the
difference in speed of the slower candidates and changes results only by float round-off (batched and
unbatched products sum in a different order). The choice and the timings go into the run's JSON.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

MAX_CHUNK = 1024
"""Largest candidate, whatever the memory allows."""
MEMORY_FRACTION = 0.25
"""Share of the device's free memory the batched intermediates may take."""

Compute = Callable[[int, int, int], int]
"""``compute(start, stop, chunk)`` computes and stores columns ``start..stop-1``, ``chunk`` per batched
backward; returns the chunk it ended with (smaller after a CUDA out-of-memory halving)."""


@dataclass
class Tuning:
    """The chosen ``chunk``; ``done`` columns (``0..done-1``) were computed while measuring and are kept."""

    chunk: int
    done: int
    seconds_per_column: dict[int, float] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {"chunk": self.chunk, "measured_columns": self.done, "seconds_per_column": {str(c): t for c, t in self.seconds_per_column.items()}}


def candidates(limit: int) -> list[int]:
    """``1, 2, 4, ...`` up to ``min(limit, MAX_CHUNK)`` (at least ``[1]``)."""
    out, c = [], 1
    while c <= max(1, min(limit, MAX_CHUNK)):
        out.append(c)
        c *= 2
    return out


def tune_chunk(compute: Compute, n: int, limit: int, clock: Callable[[], float] = time.perf_counter, min_columns: int = 4, give_up: float = 1.15) -> Tuning:
    """Time ``compute`` on columns ``0, 1, ...`` of ``n`` with chunks ``1, 2, 4, ... <= limit``; the fastest per column wins.

    Candidate ``c`` computes the next ``max(c, min_columns)`` columns (rounded up to a multiple of ``c``)
    in one timed call; the ladder stops when those columns would not fit in ``n``, once a candidate is
    slower per column than ``give_up`` times the best so far (time per column is about convex in ``c``),
    or when ``compute`` had to shrink its chunk (memory). Returns the choice and how many columns are done.
    """
    done, timings = 0, {}
    for c in candidates(limit):
        m = -(-max(c, min_columns) // c) * c
        if done + m > n and timings:
            break
        m = min(m, n - done)
        t0 = clock()
        used = compute(done, done + m, c)
        timings[c] = (clock() - t0) / m
        done += m
        best = min(timings, key=timings.get)
        if used < c or timings[c] > give_up * timings[best] or done >= n:
            break
    best = min(timings, key=timings.get)
    return Tuning(best, done, timings)


def free_memory(device: torch.device) -> int:
    """Free bytes on ``device``: CUDA's ``mem_get_info``, else the host's available physical memory."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return 2**32


def column_bytes(model: torch.nn.Module, tokens: int, itemsize: int) -> int:
    """Rough bytes one more column of a batched product adds: ``tokens * (vocab + 16 * hidden * layers) * itemsize``.

    (The fused head's ``(tokens, vocab)`` product and about 16 hidden-sized intermediates per block.)
    """
    from .models import text_config

    cfg = text_config(model)
    hidden = getattr(cfg, "hidden_size", None) or getattr(cfg, "n_embd", 1024)
    layers = getattr(cfg, "num_hidden_layers", None) or getattr(cfg, "n_layer", 12)
    vocab = getattr(cfg, "vocab_size", 50272)
    return tokens * (vocab + 16 * hidden * layers) * itemsize


def memory_limit(model: torch.nn.Module, tokens: int, x: torch.Tensor) -> int:
    """Largest chunk whose batched intermediates fit in ``MEMORY_FRACTION`` of the free memory of ``x``'s device."""
    return max(1, int(MEMORY_FRACTION * free_memory(x.device)) // column_bytes(model, tokens, x.element_size()))
