"""Estimators of a whole weight's Hessian diagonal, one module each (see :mod:`.base` for what they are made of).

Importing this package imports every module in its folder, whose ``@register`` fills :data:`REGISTRY`.
"""

from .base import (
    REGISTRY,
    DiagonalEstimator,
    Entries,
    Estimates,
    Finish,
    LinearUnit,
    ParamPlan,
    Probes,
    Rows,
    Target,
    Unit,
    Work,
    diagonal_of,
    estimate,
    plan_phase1,
    register,
    run_plan,
)

REGISTRY.discover(__name__, __path__)

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
    "plan_phase1",
    "register",
    "run_plan",
]
