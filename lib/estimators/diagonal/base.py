"""What a diagonal estimator is: its plan of per-batch work for each weight, later phases, finish step and cost.

For a weight ``W`` (``x = W.reshape(-1)``, ``n`` entries) and the summed NLL ``f = sum_s f(x; X_s)`` (:mod:`lib.objective.loss`),
every estimator here sums per-batch quantities (``H = sum_s H_s``), so its work is an additive job: each batch's
products are computed on that batch's own gradient graph, summed over batches (float64, in sample order), and
turned into the estimate once, at the end. :class:`DiagonalEstimator` is the interface (registered by name in
:data:`REGISTRY` with :func:`register`), :class:`Finish` what its later phases and finish step see; the per-batch
work it plans is in :mod:`.work` (re-exported here for the estimator modules), the driver in :mod:`.driver`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch

from ...constants import ESTIMATOR_RENAMED
from ...runtime.jobs import Partial
from ..registry import Registry
from .work import (
    MONITOR_BUDGET,
    Entries,
    LinearUnit,
    ParamPlan,
    Probes,
    Progress,
    Rows,
    Target,
    Unit,
    W,
    Work,
    convergence_curve,
    key,
    log_grid,
    monitor_entries,
    probe_seed,
    rademacher_probes,
    rel_l2,
    run_plan,
)

__all__ = [  # with the per-batch work of .work, the whole vocabulary of an estimator module
    "MONITOR_BUDGET",
    "REGISTRY",
    "DiagonalEstimator",
    "Entries",
    "Finish",
    "LinearUnit",
    "ParamPlan",
    "Probes",
    "Progress",
    "Rows",
    "Target",
    "Unit",
    "W",
    "Work",
    "convergence_curve",
    "key",
    "log_grid",
    "monitor_entries",
    "probe_seed",
    "rademacher_probes",
    "register",
    "rel_l2",
    "run_plan",
]


# ----------------------------------------------------------------------------- estimators


@dataclass
class Finish:
    """What an estimator's later phases and finish step see for one weight: the settings, the plan and sums of each
    phase done (``plans[i]``, ``sums[i]`` for phase ``i + 1``), the normalization ``n_tokens`` and ``state`` (what
    estimators keep between phases, by estimator name)."""

    target: Target
    k: int
    seed: int
    n_tokens: int
    dtype: torch.dtype
    plans: list[ParamPlan]
    sums: list[Partial]
    state: dict[str, Any] = field(default_factory=dict)

    def get(self, what: str, phase: int = 1) -> torch.Tensor:
        """This weight's sum ``what`` of phase ``phase``."""
        return self.sums[phase - 1][key(self.target.param_name, what)]

    def work(self, kind: type[W], phase: int = 1) -> W:
        """This weight's work of type ``kind`` in phase ``phase``'s plan."""
        w = self.plans[phase - 1].get(kind)
        assert w is not None, f"no {kind.__name__} in phase {phase} of {self.target.param_name}"
        return w


class DiagonalEstimator:
    """An estimator of a weight's Hessian diagonal. Subclasses (one per module, decorated with :func:`register`) set:

    * ``name``, ``order`` (position in :data:`REGISTRY`), ``summary`` (a few words for ``--help``), ``cost`` (what it
      costs per sample and weight, for the JSON) and, when it does not estimate ``diag(H)``, ``normalization`` (what it
      is, with ``{n}`` for the normalizing token count) and ``estimates_hessian = False``;
    * the settings it accepts: ``min_k`` (smallest ``K``, HVPs per sample; 0 = does not use ``K``), ``k_multiple``
      with ``k_reason``, ``max_k_per_entry`` (``K <= that * n``), ``max_entries`` with ``entry_cost``, ``curve``
      (it has a convergence curve along ``K``), ``phases`` (passes over the samples);

    and implement :meth:`hvps_per_sample`, :meth:`plan` (phase-1 work), :meth:`finish` and, as needed,
    :meth:`plan_next` (work of phase 2, ...) and :meth:`convergence`.
    """

    name: ClassVar[str]
    order: ClassVar[int] = 100
    summary: ClassVar[str] = ""
    cost: ClassVar[str] = ""
    normalization: ClassVar[str | None] = None
    estimates_hessian: ClassVar[bool] = True
    min_k: ClassVar[int] = 0
    k_multiple: ClassVar[int] = 1
    k_reason: ClassVar[str] = ""
    max_k_per_entry: ClassVar[int | None] = None
    max_entries: ClassVar[int | None] = None
    entry_cost: ClassVar[str] = ""
    curve: ClassVar[bool] = False
    phases: ClassVar[int] = 1

    @property
    def uses_k(self) -> bool:
        """Whether the number of HVPs per sample ``K`` is one of its settings."""
        return self.min_k > 0

    def hvps_per_sample(self, numel: int, k: int) -> int:
        """Hessian-vector products each sample costs for a weight of ``numel`` entries."""
        raise NotImplementedError

    def plan(self, plan: ParamPlan, target: Target, k: int, seed: int) -> None:
        """Add the phase-1 work it needs for ``target`` to ``plan``."""
        raise NotImplementedError

    def plan_next(self, phase: int, plan: ParamPlan, fin: Finish) -> None:
        """Add the work of phase ``phase`` (2, ...) to ``plan``, from the sums of the earlier phases in ``fin``."""

    def finish(self, fin: Finish) -> torch.Tensor:
        """The estimate of the summed-loss diagonal, flat ``(n,)`` (the caller normalizes and reshapes it)."""
        raise NotImplementedError

    def standard_error(self, fin: Finish) -> torch.Tensor | None:
        """Per-entry standard error of :meth:`finish`'s estimate, flat ``(n,)`` (same scale; the caller normalizes),
        or None where the estimator has none (deterministic, or no independent replicates)."""
        return None

    def convergence(self, fin: Finish, exact: torch.Tensor) -> tuple[dict[str, list], int] | None:
        """``(curve, monitored entries)`` along ``K`` against ``exact`` (normalized, at ``fin.target.tracked``), or None."""
        return None


REGISTRY: Registry[DiagonalEstimator] = Registry("estimator", renamed=ESTIMATOR_RENAMED)
"""Every diagonal estimator by name (filled by :mod:`lib.estimators.diagonal`)."""
register = REGISTRY.register
