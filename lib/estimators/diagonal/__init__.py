"""Estimators of a whole weight's Hessian diagonal, one module each.

What they are made of: :mod:`.base` (the estimator interface and registry), :mod:`.work` (per-batch work and
plans), :mod:`.driver` (running them). Importing this package imports every other module in its folder, whose
``@register`` fills :data:`REGISTRY`.
"""

from ..registry import INFRASTRUCTURE
from .base import REGISTRY, DiagonalEstimator, Finish, register
from .driver import Estimates, diagonal_of, estimate, estimates_of, plan_phase1
from .work import (
    Entries,
    LinearUnit,
    ParamPlan,
    Probes,
    Rows,
    Target,
    Unit,
    Work,
    run_plan,
)

REGISTRY.discover(__name__, __path__, infrastructure=INFRASTRUCTURE["diagonal"])

__all__ = [
    "REGISTRY",
    "DiagonalEstimator",
    "Entries",
    "Estimates",
    "Finish",
    "LinearUnit",
    "ParamPlan",
    "Probes",
    "Rows",
    "Target",
    "Unit",
    "Work",
    "diagonal_of",
    "estimate",
    "estimates_of",
    "plan_phase1",
    "register",
    "run_plan",
]
