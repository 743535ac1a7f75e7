"""``hessian_sweep.py`` under torchrun: every rank holds the whole model, the batches of each product are split over
the ranks.

Every product ``H_uu V`` of every unit is one pass (:class:`lib.products.operator.HVPJob`) through
:func:`lib.runtime.parallel.run_job`: in round ``r`` rank ``q`` takes batch ``r * world + q``, rank 0 adds the
batches' partial sums in batch order (bitwise the one-process sum) and broadcasts them (:func:`rank_runner`), so
every rank runs the same Lanczos, probes and SLQ on the same numbers; the random vectors are drawn from seeds of
the unit's name, the same on every rank. The operator's gradient graphs are kept per process, so each rank keeps its
own batches' graphs for a unit's products as the one-process sweep keeps all of them.

The finished stages and products (resume, :class:`lib.app.sweep_family.DirStore`) are read and written by rank 0
only; what it reads, and a refusal of a stage made by another configuration, is broadcast (:class:`RankStore`), so
every rank replays or computes the same products. Rank 0 also decides what depends on timings (the trace pilot's
measured seconds, which choose the trace estimator: :meth:`RankStore.agree`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from ..errors import UserError
from ..runtime import parallel, ranks


def _broadcast(value: Any) -> Any:
    """Rank 0's ``value`` on every rank (a collective)."""
    import torch.distributed as dist

    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def rank_runner(run: Any, fingerprint: str) -> Callable[[Any], Any]:
    """``runner(job)``: the sums of one pass over the samples, its batches split over the torchrun ranks
    (:func:`lib.runtime.parallel.run_job`, added in batch order on rank 0) and broadcast to every rank. The ranks first
    check that they hold the same weights (``fingerprint``). ``runner.stats`` counts the passes."""
    device = run.devices[0]
    ranks.agree({"model weights": fingerprint}, device)  # also starts the process group if needed
    r = run.spec.run
    settings = parallel.RunSettings(
        devices=run.devices,
        unit_timeout=r.unit_timeout,
        setup_timeout=r.setup_timeout,
        identity=run.identity(),
    )
    env = parallel.distributed_env()
    stats: dict[str, Any] = {"passes": 0, "ranks": env[2] if env else 1, "units_run": 0}

    def runner(job: Any) -> Any:
        sums = _broadcast(parallel.run_job(job, settings))
        stats["passes"] += 1
        stats["units_run"] += settings.stats.get("units_run", 0)
        return sums

    runner.stats = stats  # type: ignore[attr-defined]
    return runner


class RankStore:
    """A stage store (:class:`lib.hessian.sweep.PassStore`) shared by the torchrun ranks: rank 0 reads and writes
    ``inner`` (a :class:`lib.app.sweep_family.DirStore`) and broadcasts what it read, or its refusal (every rank raises
    it, rank 0 prints it); the other ranks write nothing. ``reused`` / ``replayed``: rank 0's counts."""

    def __init__(self, inner: Any, rank: int):
        self.inner, self.rank = inner, rank

    @property
    def reused(self) -> int:
        return self.inner.reused

    @property
    def replayed(self) -> int:
        return self.inner.replayed

    def _read(self, read: Callable[[], Any]) -> Any:
        got: tuple[str, Any] = ("ok", None)
        if self.rank == 0:
            try:
                got = ("ok", read())
            except UserError as e:
                got = ("error", str(e))
        kind, value = _broadcast(got)
        if kind == "error":
            err = UserError(value)
            err.shared_by_ranks = True  # type: ignore[attr-defined]  # rank 0 prints it
            raise err
        return value

    def get(self, key: str) -> Any:
        return self._read(lambda: self.inner.get(key))

    def put(self, key: str, value: Any) -> None:
        if self.rank == 0:
            self.inner.put(key, value)

    def get_pass(self, stage: str, k: int) -> Any:
        return self._read(lambda: self.inner.get_pass(stage, k))

    def put_pass(self, stage: str, k: int, value: Any) -> None:
        if self.rank == 0:
            self.inner.put_pass(stage, k, value)

    def drop_passes(self, stage: str) -> None:
        if self.rank == 0:
            self.inner.drop_passes(stage)

    def agree(self, value: Any) -> Any:
        """Rank 0's ``value`` (e.g. a stage holding measured seconds that steer what comes next) on every rank."""
        return _broadcast(value)


def rank_store(store: Any) -> Any:
    """``store`` shared by the torchrun ranks (:class:`RankStore`), or ``store`` itself outside torchrun."""
    env = parallel.distributed_env()
    return store if env is None else RankStore(store, env[0])
