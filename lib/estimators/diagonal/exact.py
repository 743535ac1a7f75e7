"""The exact diagonal: ``diag(H)_i = (H e_i)_i`` for every unit vector ``e_i``; ground truth for small weights.

Cost: one HVP per entry and sample (``n``), hence refused above :data:`MAX_ENTRIES` entries. Plan: every entry
(:class:`Entries`, shared with the exact values at tracked entries). Finish: the sums themselves.
"""

from __future__ import annotations

import torch

from .base import DiagonalEstimator, Entries, Finish, ParamPlan, Target, register

MAX_ENTRIES = 16384
"""Largest number of entries the ``exact`` method (one HVP per entry and sample) and ``--track_rows`` accept."""


@register
class Exact(DiagonalEstimator):
    name = "exact"
    order = 50
    summary = "one HVP per entry; small layers"
    cost = "one HVP per entry and sample"
    max_entries = MAX_ENTRIES
    entry_cost = "one Hessian-vector product per entry and sample"

    def hvps_per_sample(self, numel: int, k: int) -> int:
        return numel

    def plan(self, plan: ParamPlan, target: Target, k: int, seed: int) -> None:
        plan.add(Entries(torch.arange(target.numel)))

    def finish(self, fin: Finish) -> torch.Tensor:
        return fin.work(Entries).values_at(fin.get("exact"), torch.arange(fin.target.numel))
