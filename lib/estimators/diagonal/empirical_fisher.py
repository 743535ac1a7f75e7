"""The empirical Fisher diagonal: ``sum_s (grad f(x; X_s))^2`` over the samples ``s``, at their true labels.

Not an estimate of ``diag(H)`` but a baseline (what the original scripts call "Fisher"); it equals the Fisher
information, hence the Hessian's expectation, only for a model that generated the data. Not the sampled Fisher
(labels drawn from the model), which ``--compare fisher`` computes. Reference: Kunstner, Hennig & Balles 2019,
"Limitations of the empirical Fisher approximation for natural gradient descent", NeurIPS.

Cost: one gradient per sample, no HVP. Plan: :class:`GradientSquares` (its own work; with one sample per batch and
products on the gradient graph, that graph's gradient is used). Finish: the sum.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from ...runtime.jobs import Partial
from .base import (
    DiagonalEstimator,
    Finish,
    ParamPlan,
    Progress,
    Target,
    Unit,
    Work,
    register,
)


@dataclass
class GradientSquares(Work):
    """The squared gradient of each sample's summed NLL, summed over the batch's samples, as ``grad_sq`` (``(n,)``)."""

    order: ClassVar[int] = 10  # before the products: it may evaluate the batch's NLL itself

    def merge(self, other: Work) -> None:
        pass  # the same request

    def entries(self, numel: int) -> int:
        return numel

    def run(self, unit: Unit, progress: Progress | None) -> Partial:
        if unit.objective is None:
            raise ValueError("the empirical Fisher needs a model (per-sample gradients)")
        if unit.batch.shape[0] == 1 and unit.needs_graph:
            return {
                "grad_sq": unit.gradient().detach() ** 2
            }  # one sample: its gradient is the products' graph's
        x0 = unit.x0
        out, nll = torch.zeros_like(x0), torch.zeros((), dtype=x0.dtype, device=x0.device)
        for row in unit.batch:
            x = x0.clone().requires_grad_(True)
            value = unit.objective(x, row[None])
            (g,) = torch.autograd.grad(value, x)
            out += g**2
            nll += value.detach()
        unit.offer_nll(nll)
        return {"grad_sq": out}


@register
class EmpiricalFisher(DiagonalEstimator):
    name = "empirical_fisher"
    order = 30
    summary = "empirical Fisher diagonal, a baseline; 'fisher' before"
    cost = "one gradient per sample"
    normalization = "(sum over samples of the squared per-sample gradient of the summed NLL) / {n}"
    estimates_hessian = False

    def hvps_per_sample(self, numel: int, k: int) -> int:
        return 0

    def plan(self, plan: ParamPlan, target: Target, k: int, seed: int) -> None:
        plan.add(GradientSquares())

    def finish(self, fin: Finish) -> torch.Tensor:
        return fin.get("grad_sq")
