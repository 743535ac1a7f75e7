"""Running diagonal estimators: plan each weight's work, run each phase through a caller's runner, finish.

:func:`estimate` is the driver of :func:`lib.hessian.diagonal.hessian_diagonal` (a model, additive jobs) and of
:func:`diagonal_of` (any symmetric linear map, in this process).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from ...runtime.jobs import Partial
from .base import REGISTRY, DiagonalEstimator, Finish
from .work import Entries, LinearUnit, ParamPlan, Target, rel_l2, run_plan


def plan_phase1(
    targets: Sequence[Target], estimators: Sequence[str | DiagonalEstimator], k: int, seed: int
) -> list[ParamPlan]:
    """Phase-1 plans: each estimator's work for each target, plus the exact diagonal at the tracked entries."""
    ests = [e if isinstance(e, DiagonalEstimator) else REGISTRY[e] for e in estimators]
    plans = []
    for t in targets:
        plan = ParamPlan(t.param_name, t.numel)
        for e in ests:
            e.plan(plan, t, k, seed)
        if len(t.tracked):
            plan.add(Entries(t.tracked))
        plans.append(plan)
    return plans


@dataclass
class Estimates:
    """What :func:`estimate` returns: ``diagonals[estimator][param]`` (float64, the weight's shape, divided by
    ``n_tokens``), the phases' first sums (``nll_sum`` there), the convergence study (see
    :class:`lib.hessian.diagonal.DiagonalResult`), each phase's wall seconds and ``standard_errors[estimator][param]``
    (per-entry, same scale and shape, for the estimators that have one: :meth:`DiagonalEstimator.standard_error`)."""

    diagonals: dict[str, dict[str, torch.Tensor]]
    sums: Partial
    tracked_exact: dict[str, torch.Tensor] = field(default_factory=dict)
    curves: dict[str, dict[str, dict[str, Any]]] = field(default_factory=dict)
    monitor_size: dict[str, int] = field(default_factory=dict)
    phase_s: dict[str, float] = field(default_factory=dict)
    standard_errors: dict[str, dict[str, torch.Tensor]] = field(default_factory=dict)


PhaseRunner = Callable[[str, list[ParamPlan]], "Partial | None"]
"""``run(phase, plans)``: the float64 sums of one pass over the samples doing ``plans`` (``None``: not on this rank)."""


def estimate(
    estimators: Sequence[str],
    targets: Sequence[Target],
    k: int,
    seed: int,
    run: PhaseRunner,
    dtype: torch.dtype,
    n_tokens: int,
) -> Estimates | None:
    """The estimators' diagonals of ``targets``: plan, run each phase (``run``), finish; ``None`` when a phase's
    runner returns ``None`` (a torchrun rank other than 0). ``dtype``: of the vectors later phases multiply by."""
    ests = REGISTRY.lookup(estimators)
    plans = plan_phase1(targets, ests, k, seed)
    t0 = time.perf_counter()
    first = run("1", plans)
    phase_s = {"1": time.perf_counter() - t0}
    if first is None:
        return None
    fins = [Finish(t, k, seed, n_tokens, dtype, [p], [first]) for t, p in zip(targets, plans)]
    for phase in range(2, max(e.phases for e in ests) + 1):
        t1 = time.perf_counter()
        later = [ParamPlan(t.param_name, t.numel) for t in targets]
        for fin, plan in zip(fins, later):
            for e in ests:
                if e.phases >= phase:
                    e.plan_next(phase, plan, fin)
        sums = run(str(phase), later)
        phase_s[str(phase)] = time.perf_counter() - t1
        if sums is None:
            return None
        for fin, plan in zip(fins, later):
            fin.plans.append(plan)
            fin.sums.append(sums)
    out = Estimates({e.name: {} for e in ests}, first, phase_s=phase_s)
    for fin in fins:
        t = fin.target
        for e in ests:
            out.diagonals[e.name][t.param_name] = (
                e.finish(fin).to(torch.float64) / n_tokens
            ).reshape(t.shape)
            se = e.standard_error(fin)
            if se is not None:
                out.standard_errors.setdefault(e.name, {})[t.param_name] = (
                    se.to(torch.float64) / n_tokens
                ).reshape(t.shape)
        if len(t.tracked):
            _track(out, fin, ests)
    return out


def _track(out: Estimates, fin: Finish, ests: list[DiagonalEstimator]) -> None:
    """Convergence curves on the tracked entries (error) and the monitored entries (consecutive difference), in
    registry order: first the estimators with a curve along ``K``, then the final error of the others."""
    t = fin.target
    name = t.param_name
    exact = (
        fin.work(Entries).values_at(fin.get("exact"), t.tracked).to(torch.float64) / fin.n_tokens
    )
    out.tracked_exact[name] = exact
    chosen = [e for e in REGISTRY if e in ests]
    curves: dict[str, dict[str, Any]] = {}
    for e in chosen:
        found = e.convergence(fin, exact)
        if found is not None:
            curves[e.name], monitored = found
            curves[e.name]["final_tracked_rel_error"] = curves[e.name]["tracked_rel_error"][-1]
            out.monitor_size.setdefault(name, monitored)
    for e in chosen:
        if e.name not in curves:
            d = out.diagonals[e.name][name].reshape(-1)[t.tracked]
            curves[e.name] = {
                "k": [],
                "tracked_rel_error": [],
                "consecutive_rel_diff": [],
                "final_tracked_rel_error": rel_l2(d, exact),
            }
    out.curves[name] = curves


def diagonal_of(
    apply: Callable[[torch.Tensor], torch.Tensor],
    n: int,
    estimators: Sequence[str],
    k: int,
    seed: int = 0,
    name: str = "x",
) -> dict[str, torch.Tensor]:
    """The estimators' diagonals of a symmetric linear map ``apply`` (rows ``v`` ``(m, n)`` to ``H v``), float64 ``(n,)``,
    e.g. ``apply = lambda v: v @ h`` for a dense symmetric ``h``; estimators that need a model (per-sample
    gradients, Gauss-Newton products) raise. Probes are those of weight ``name`` with ``seed``."""
    res = estimates_of(apply, n, estimators, k, seed, name)
    return {e: d[name] for e, d in res.diagonals.items()}


def estimates_of(
    apply: Callable[[torch.Tensor], torch.Tensor],
    n: int,
    estimators: Sequence[str],
    k: int,
    seed: int = 0,
    name: str = "x",
) -> Estimates:
    """As :func:`diagonal_of`, the whole :class:`Estimates` (``diagonals[e][name]``, ``standard_errors[e][name]``)."""

    def run(phase: str, plans: list[ParamPlan]) -> Partial:
        out: Partial = {}
        for plan in plans:
            out.update(
                run_plan(
                    plan,
                    LinearUnit(
                        apply=apply, numel=plan.numel, seed=seed, param_name=plan.param_name
                    ),
                )
            )
        return {k_: v.to(torch.float64) for k_, v in out.items()}

    res = estimate(estimators, [Target(name, (n,))], k, seed, run, torch.float64, 1)
    assert res is not None
    return res
