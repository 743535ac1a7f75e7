"""Hutchinson's estimator: ``diag(H) ~ (1/K) sum_j z_j * (H z_j)`` with Rademacher probes ``z_j`` (i.i.d. +-1 entries).

Unbiased (``E[z z^T] = I``), with ``E ||est - diag H||^2 = (1/K) sum_{i != j} H_ij^2`` exactly (:func:`offdiagonal_error`).
References: Hutchinson 1989, "A stochastic estimator of the trace of the influence matrix for Laplacian smoothing
splines"; Bekas, Kokiopoulou & Saad 2007, "An estimator for the diagonal of a matrix", Appl. Numer. Math. 57.

Cost: ``K`` HVPs per sample and weight. Plan: ``K`` probes (:class:`Probes`; with tracked entries, each probe's
contribution there and on the monitored entries is recorded, so that the estimate after every ``k <= K`` can be
formed afterwards). Finish: ``zhz / K``.

Per-entry standard error (``K >= 2``): per-probe values ``z_j * (H z_j)`` are not additive over samples once
squared, so the probes are split into ``B = min(K, SE_GROUPS)`` interleaved groups (``j mod B``) whose sums are
additive like ``zhz`` (over batches, workers and checkpoints) and independent; the spread of the group means gives
``se = sqrt(sum_g k_g (m_g - m)^2 / ((B - 1) K))`` (:func:`~.work.group_standard_error`; equal groups:
``std_g(m_g) / sqrt(B)``). ``(est - diag H) / se`` is about Student-t with ``B - 1`` degrees of freedom. The estimate
itself is ``zhz / K`` as without groups (the groups are extra sums, ``(B - 1) n`` floats).
"""

from __future__ import annotations

import math

import torch

from .base import (
    DiagonalEstimator,
    Finish,
    ParamPlan,
    Probes,
    Target,
    convergence_curve,
    monitor_entries,
    register,
)
from .work import group_sizes, group_standard_error, group_sums

SE_GROUPS = 4
"""Interleaved probe groups for the per-entry standard error (``min(K, SE_GROUPS)``; memory ``(B - 1) n`` floats)."""


def se_groups(k: int) -> int:
    """Probe groups ``B`` for ``K = k`` probes (0: none, ``K < 2``)."""
    return min(k, SE_GROUPS) if k >= 2 else 0


def hutchinson_running(contributions: torch.Tensor) -> torch.Tensor:
    """Running means: row ``k-1`` is the Hutchinson estimate from the first ``k`` rows of ``contributions`` (``(K, m)``).

    Args:
        contributions: ``(K, m)`` per-probe estimates ``z_k * (H z_k)`` of ``m`` diagonal entries.

    Returns:
        ``(K, m)`` float64: the cumulative means over the probes.
    """
    c = contributions.to(torch.float64)
    return c.cumsum(0) / torch.arange(1, c.shape[0] + 1, dtype=torch.float64)[:, None]


def offdiagonal_error(h: torch.Tensor) -> float:
    """Hutchinson's expected relative error with one probe, ``sqrt(sum_{i != j} H_ij^2) / ||diag H||``.

    With ``k`` probes the root-mean-square relative error is this divided by ``sqrt(k)``.
    """
    h = h.to(torch.float64)
    d = h.diagonal()
    return math.sqrt(max(float((h * h).sum() - (d * d).sum()), 0.0)) / float(d.norm())


@register
class Hutchinson(DiagonalEstimator):
    """Hutchinson's Rademacher estimator of the diagonal (module docstring): ``K`` probes, ``zhz / K``."""

    name = "hutchinson"
    order = 10
    summary = "Rademacher, unbiased"
    cost = "K HVPs per sample and weight (K probes)"
    min_k = 1
    curve = True

    def hvps_per_sample(self, numel: int, k: int) -> int:
        return k

    def plan(self, plan: ParamPlan, target: Target, k: int, seed: int) -> None:
        record = None
        if len(target.tracked):
            record = torch.cat([target.tracked, monitor_entries(target.numel, k, seed)]).unique()
        plan.add(Probes(k, record=record, groups=se_groups(k)))

    def finish(self, fin: Finish) -> torch.Tensor:
        return fin.get("zhz") / fin.k

    def standard_error(self, fin: Finish) -> torch.Tensor | None:
        b = se_groups(fin.k)
        if not b:
            return None
        sums = group_sums(fin.get("zhz"), fin.get("zhz_groups"))
        return group_standard_error(sums, group_sizes(fin.k, b))

    def convergence(self, fin: Finish, exact: torch.Tensor) -> tuple[dict[str, list], int]:
        t, probes = fin.target, fin.work(Probes)
        monitor = monitor_entries(t.numel, probes.count, fin.seed)
        run = hutchinson_running(fin.get("record")) / fin.n_tokens
        pos = lambda idx: torch.searchsorted(probes.record, idx)  # noqa: E731
        return convergence_curve(
            lambda j: run[j - 1], list(range(1, fin.k + 1)), pos(t.tracked), pos(monitor), exact
        ), len(monitor)
