"""Curvature approximations compared with the exact Hessian (``--compare``), one module each (see :mod:`.base`).

Importing this package imports every module in its folder, whose ``@register`` fills :data:`REGISTRY`.
"""

from ..registry import INFRASTRUCTURE
from .base import REGISTRY, Approximation, MatrixContext, Source, register, sources

REGISTRY.discover(__name__, __path__, infrastructure=INFRASTRUCTURE["approximations"])

__all__ = ["REGISTRY", "Approximation", "MatrixContext", "Source", "register", "sources"]
