"""Spectra of any symmetric linear operator given as a ``matmat``: Lanczos (:func:`lanczos`), Hutchinson and Hutch++
traces, stochastic Lanczos quadrature (:mod:`.algorithms`), the Krylov vectors' storage (:mod:`.vectors`), and the
spectrum as one typed call (:mod:`.spectra`). No model knowledge: everything is tested on dense matrices.

``lib.spectrum.lanczos`` and the other algorithms are re-exported from :mod:`.algorithms`.
"""

from .algorithms import (
    MAX_DENSITY_POINTS,
    EigResult,
    SLQResult,
    TraceEstimate,
    exact_density,
    hutchinson_trace,
    hutchpp_trace,
    lanczos,
    rademacher,
    slq,
    wanted,
)

__all__ = [
    "MAX_DENSITY_POINTS",
    "EigResult",
    "SLQResult",
    "TraceEstimate",
    "exact_density",
    "hutchinson_trace",
    "hutchpp_trace",
    "lanczos",
    "rademacher",
    "slq",
    "wanted",
]
