"""Additive jobs: work that is a sum over batches of samples, so it can be split, checkpointed and resumed.

The paper's loss is additive over samples, hence so are its exact Hessian, its Hessian-vector
products and every diagonal estimate built from them. A job exposes that structure:

* ``setup(device)`` loads what the work needs (model, data) once per process, on ``device``;
* ``num_units()`` is the number of work units (batches of ``model_input_bs`` samples);
* ``run_unit(k, progress)`` returns unit ``k``'s partial sums as ``{name: tensor}`` (CPU, float64), and
  calls ``progress(n)`` as it finishes ``n`` steps of its ``steps_per_unit()``;
* ``config()`` is the JSON-able configuration that identifies the job (for checkpoint validation).

:func:`run_serial` is the reference runner: it sums the units in index order.
:func:`lib.runtime.parallel.run_job` runs a job on several worker processes or torchrun ranks, with
checkpoints (:mod:`lib.runtime.checkpoint`), and gives bitwise the same sums. Jobs run by worker processes
must be picklable (load the model in ``setup``, not in ``__init__``).
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from typing import Any, Protocol

import torch

Partial = dict[str, torch.Tensor]

_MODEL_CACHE: dict[str, Any] | None = None
"""``{key: model}`` of this process, at most one entry; ``None`` (the default, e.g. in the parent) = no caching.
Worker processes of a :class:`lib.runtime.parallel.WorkerPool` turn it on, so that the jobs they run one after another
(e.g. the passes of a spectrum) reuse the model loaded by the first."""


def keep_models() -> None:
    """Turn on this process's model cache (:meth:`ModelJob.ensure_model` then loads each spec once per device)."""
    global _MODEL_CACHE
    if _MODEL_CACHE is None:
        _MODEL_CACHE = {}


def model_key(spec: Any, device: torch.device) -> str:
    """The cache key of ``spec`` on ``device``: every field of the spec (its identity and fingerprint included) and the device."""
    fields = spec.__dict__ if hasattr(spec, "__dict__") else {"spec": spec}
    return repr((sorted((k, repr(v)) for k, v in fields.items()), str(device)))


def derived_seed(*parts: Any) -> int:
    """A seed from its parts, e.g. ``(seed, parameter, probe)``: 63 bits of ``sha256("/".join(parts))``. Random
    numbers drawn from it depend only on what they are for, never on the worker, device or batch order."""
    return (
        int.from_bytes(
            hashlib.sha256("/".join(str(p) for p in parts).encode()).digest()[:8], "little"
        )
        >> 1
    )


class AdditiveJob(Protocol):
    def setup(self, device: torch.device) -> None: ...

    def num_units(self) -> int: ...

    def steps_per_unit(self) -> int: ...

    def run_unit(self, k: int, progress: Callable[[int], None] | None = None) -> Partial: ...

    def config(self) -> dict[str, Any]: ...


class ModelJob:
    """Base of jobs that evaluate a model: ``model`` (used as is) or ``spec`` (loaded in each process).

    Pickles without the model when a spec can reload it, and without per-process state (attributes
    starting with ``_``, rebuilt by ``setup``), so spawned workers load their own copy.
    """

    spec: Any = None
    model: Any = None
    reused_chunks: dict[int, int] | None = None
    """Chunks recorded by an earlier session of the run, used as given (:meth:`reuse_chunks`; pickled to workers)."""

    def __getstate__(self) -> dict:
        state = {k: v for k, v in self.__dict__.items() if not k.startswith("_")}
        if self.spec is not None:
            state["model"] = None
        return state

    def chunks_used(self) -> dict[int, int]:
        """``{n: chunk}`` this process used so far (:meth:`lib.products.operator.ChunkPolicy.chosen` of the job's ``_policy``):
        recorded with each unit (:func:`lib.runtime.parallel.run_job`), in the checkpoint and the JSON."""
        policy = getattr(self, "_policy", None)
        return policy.chosen() if policy is not None else {}

    def reuse_chunks(self, chunks: dict[int, int]) -> None:
        """Use ``chunks`` instead of measuring (on ``--resume``: the chunks the interrupted session used), now if the
        job is set up, and again after :meth:`setup` in each worker (:func:`lib.runtime.parallel.run_job` calls it)."""
        self.reused_chunks = {int(n): int(c) for n, c in chunks.items()}
        policy = getattr(self, "_policy", None)
        if policy is not None:
            policy.reuse(self.reused_chunks)

    def ensure_model(self, device: torch.device):
        """The job's model, loaded from ``spec`` on ``device`` the first time if none was given; with the
        process's model cache on (:func:`keep_models`), the cached copy for the same spec and device, if any
        (the cache holds one model: loading another spec drops the previous one first)."""
        if self.model is None:
            if _MODEL_CACHE is None:
                self.model = self.spec.load(device)
            else:
                key = model_key(self.spec, device)
                if key not in _MODEL_CACHE:
                    _MODEL_CACHE.clear()  # free the old model before loading the new one
                    _MODEL_CACHE[key] = self.spec.load(device)
                self.model = _MODEL_CACHE[key]
        return self.model


def add_partials(total: Partial | None, part: Partial) -> Partial:
    """``total + part`` key by key (``total=None`` starts a sum); accumulates in float64."""
    if total is None:
        return {
            k: v.detach().to("cpu", torch.float64, copy=True) for k, v in part.items()
        }  # one copy, not a conversion and a clone
    if total.keys() != part.keys():
        raise ValueError(f"partial sums have different keys: {sorted(total)} vs {sorted(part)}")
    for k, v in part.items():
        total[k].add_(
            v.detach().to("cpu")
        )  # promoted to float64 element by element, without a float64 copy of v
    return total


def run_serial(
    job: AdditiveJob, device: torch.device, progress: bool = False, desc: str = "work"
) -> Partial:
    """Set the job up on ``device`` and sum all its units in index order (one process)."""
    job.setup(device)
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=job.num_units() * job.steps_per_unit(), desc=desc, dynamic_ncols=True)
    total: Partial | None = None
    try:
        for k in range(job.num_units()):
            total = add_partials(total, job.run_unit(k, bar.update if bar else None))
    finally:
        if bar is not None:
            bar.close()
    assert total is not None
    return total
