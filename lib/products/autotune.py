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

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

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
        return {
            "chunk": self.chunk,
            "measured_columns": self.done,
            "seconds_per_column": {str(c): t for c, t in self.seconds_per_column.items()},
        }


def candidates(limit: int) -> list[int]:
    """``1, 2, 4, ...`` up to ``min(limit, MAX_CHUNK)`` (at least ``[1]``)."""
    out, c = [], 1
    while c <= max(1, min(limit, MAX_CHUNK)):
        out.append(c)
        c *= 2
    return out


def tune_chunk(
    compute: Compute,
    n: int,
    limit: int,
    total: int | None = None,
    clock: Callable[[], float] = time.perf_counter,
    repeats: int = 3,
    give_up: float = 1.15,
    budget: float = 0.03,
    margin: float = 0.05,
) -> Tuning:
    """Time ``compute`` on columns ``0, 1, ...`` of ``n`` with chunks ``1, 2, 4, ... <= limit``; the fastest per column wins.

    Candidate ``c`` makes ``repeats`` timed calls of ``c`` columns (one call for ``c > 8``, or if only one
    fits) and keeps its fastest call per column ``t_c`` (robust to load and to the first batched call's
    one-time cost). Per-column time is not convex in ``c`` (batching overheads amortize only from some
    size on), so the ladder goes on while candidates improve and past one slower candidate; it stops when
    a call would not fit in ``n``, when ``compute`` had to shrink its chunk (memory), or at a candidate
    that is not the best so far once two consecutive ones were slower than ``give_up * t_best`` or the time
    lost to slower candidates, ``sum_c columns_c * (t_c - t_best)`` plus the next candidate's if it were as
    slow as this one, would exceed ``budget * total * t_best`` (``total``: columns of the whole run, default ``n``). The
    choice is the smallest chunk within ``margin`` of the fastest: a larger one must pay for its memory, and
    differences of a few percent are timing noise (on the embedded model, where chunks 1-4 are within 10 %, one
    run in five picked 4 by noise and ran 30 % slower). Returns the choice and how many columns (``0..done-1``)
    are done.

    Args:
        compute: ``compute(start, stop, chunk)`` computes and keeps columns ``start..stop-1`` and returns the chunk
            it ended with (:data:`Compute`).
        n: columns available for measuring.
        limit: the largest chunk tried.
        total: columns of the whole run (the budget's scale); ``None``: ``n``.
        clock: the timer (seconds).
        repeats: timed calls per small candidate.
        give_up: slowdown factor against the best that counts a candidate as slower.
        budget: the fraction of the run's time that slower candidates may cost.
        margin: relative time within which the smallest chunk is chosen.

    Returns:
        The :class:`Tuning`: the chosen ``chunk`` and ``done``, the columns already computed.
    """
    done, timings, columns, slower = 0, {}, {}, 0
    for c in candidates(limit):
        calls = repeats if c <= 8 and done + repeats * c <= n else 1
        if done + c > n and timings:
            break
        per_column, used, start = [], c, done
        for _ in range(calls):
            stop = min(n, done + c)
            t0 = clock()
            used = compute(done, stop, c)
            per_column.append((clock() - t0) / (stop - done))
            done = stop
            if used < c or done >= n:
                break
        timings[c], columns[c] = min(per_column), done - start
        best = timings[min(timings, key=timings.get)]
        slower = slower + 1 if timings[c] > give_up * best else 0
        lost = sum(columns[k] * (timings[k] - best) for k in timings) + 2 * c * (
            timings[c] - best
        )  # + the next one, if as slow
        if (
            used < c
            or done >= n
            or (timings[c] > best and (slower >= 2 or lost > budget * (total or n) * best))
        ):
            break
    fastest = min(timings.values())
    return Tuning(min(c for c, t in timings.items() if t <= (1 + margin) * fastest), done, timings)


def device_clock(device: torch.device) -> Callable[[], float]:
    """The clock candidates are timed with: this thread's CPU time when torch computes on one CPU thread
    (blind to other processes sharing the cores), else wall-clock time (after a CUDA synchronize)."""
    if device.type == "cuda":
        return lambda: (torch.cuda.synchronize(device), time.perf_counter())[1]
    return time.thread_time if torch.get_num_threads() == 1 else time.perf_counter


def free_memory(device: torch.device) -> int:
    """Free bytes on ``device``: CUDA's free memory, else the host's available memory (:mod:`lib.app.preflight`)."""
    from ..app.preflight import available_host_bytes, free_device_bytes

    free = free_device_bytes(device)
    return available_host_bytes() if free is None else free


def column_bytes(model: torch.nn.Module, tokens: int, itemsize: int) -> int:
    """Rough bytes one more column of a batched product adds: ``tokens * (vocab + 16 * hidden * layers) * itemsize``.

    (The fused head's ``(tokens, vocab)`` product and about 16 hidden-sized intermediates per block.)
    """
    from ..model.models import text_config

    cfg = text_config(model)
    hidden = getattr(cfg, "hidden_size", None) or getattr(cfg, "n_embd", 1024)
    layers = getattr(cfg, "num_hidden_layers", None) or getattr(cfg, "n_layer", 12)
    vocab = getattr(cfg, "vocab_size", 50272)
    return tokens * (vocab + 16 * hidden * layers) * itemsize


def tune(
    compute: Compute, n: int, model: torch.nn.Module, tokens: int, x: torch.Tensor, total: int
) -> Tuning:
    """:func:`tune_chunk` for products w.r.t. ``x`` (``(n,)`` columns) through ``model`` on ``tokens`` tokens:
    candidates up to ``min(n, memory_limit)``, timed with :func:`device_clock` of ``x``'s device."""
    return tune_chunk(
        compute,
        n,
        min(n, memory_limit(model, tokens, x)),
        total=total,
        clock=device_clock(x.device),
    )


def memory_limit(model: torch.nn.Module, tokens: int, x: torch.Tensor) -> int:
    """Largest chunk whose batched intermediates fit in ``MEMORY_FRACTION`` of the free memory of ``x``'s device."""
    return max(
        1,
        int(MEMORY_FRACTION * free_memory(x.device))
        // column_bytes(model, tokens, x.element_size()),
    )


AUTO_ELEMENTS = {"cpu": 2**16, "cuda": 2**21}
"""Most activation elements (``samples * seqlen * hidden``) per forward that ``model_input_bs`` auto batches: on this
project's CPU, 4 embedded-model samples of 128 tokens (hidden 128) per forward were 12-18 % faster per sample than one,
larger batches no faster (``benchmarks/README.md``). On an H200, one OPT-125M sample of 2048 tokens (1.6M elements)
already filled the GPU: batching 8 or 32 Hessian columns over it was 5-13 % slower per column and took 4-9x the
memory (``benchmarks/README.md``, "On one GPU"), so 2M elements: short sequences are batched, 2048-token ones not."""
AUTO_MIN_SECONDS = 2.0
"""Below this estimated compute a job keeps one sample per forward: fine-grained units (checkpoints, progress,
worker balance, per-sample batch study) then cost nothing that batching could save."""
AUTO_FLOPS = {"cpu": 2e10, "cuda": 1e13}
"""Rough floating-point operations per second per CPU thread (or per GPU), for the estimate only."""


def estimated_seconds(
    model: torch.nn.Module,
    samples: int,
    seqlen: int,
    products: int,
    device: torch.device,
    passes: int = 1,
) -> float:
    """Rough compute time of ``passes`` passes over ``samples`` samples, each building one gradient graph
    (about 3 forwards) and ``products`` Hessian-vector products per sample (about 4 forwards each);
    a forward costs ``2 * parameters`` operations per token. On one CPU thread whatever the thread count, so that
    the estimate (and :func:`samples_per_forward`) does not follow the load that :mod:`lib.runtime.threads` sees: a resumed
    run batches its samples as the first session did."""
    flops = (
        2
        * sum(p.numel() for p in model.parameters())
        * samples
        * seqlen
        * (3 + 4 * products)
        * passes
    )
    return flops / AUTO_FLOPS["cuda" if device.type == "cuda" else "cpu"]


def samples_per_forward(
    requested: int | str,
    model: torch.nn.Module,
    b: int,
    seqlen: int,
    products: int,
    device: torch.device,
    passes: int = 1,
    per_sample_units: bool = False,
) -> tuple[int, str]:
    """``model_input_bs``: ``requested`` if an integer, else (``"auto"``) a deterministic rule; returns ``(bs, why)``.

    Auto: 1 when ``per_sample_units`` (e.g. the batch study) or the job is short (:func:`estimated_seconds` below
    :data:`AUTO_MIN_SECONDS`), else the largest divisor of ``b`` with ``bs * seqlen * hidden`` at most
    :data:`AUTO_ELEMENTS` for the device. A rule, not a timing, so that every process, worker and resumed run
    of the same configuration batches the same samples (bitwise the same results).
    """
    if requested != "auto":
        return int(requested), "given"
    if per_sample_units:
        return 1, "auto: one sample per unit (per-sample results)"
    est = estimated_seconds(model, b, seqlen, products, device, passes)
    if est < AUTO_MIN_SECONDS:
        return 1, f"auto: a short job (about {est:.2g} s estimated), one sample per unit"
    from ..model.models import text_config

    cfg = text_config(model)
    hidden = getattr(cfg, "hidden_size", None) or getattr(cfg, "n_embd", 1024)
    cap = AUTO_ELEMENTS["cuda" if device.type == "cuda" else "cpu"]
    bs = max([d for d in range(1, b + 1) if b % d == 0 and d * seqlen * hidden <= cap] or [1])
    return (
        bs,
        f"auto: {bs} x {seqlen} tokens x hidden {hidden} <= {cap} activation elements per forward ({device.type}), dividing b={b}",
    )
