"""The console lines of the numbers a user asked for (the JSON holds them all): the trace with its standard error
(``hessian_spectrum.py --trace``) and one line per curvature approximation (the exact scripts' ``--compare``).
Pure functions of the saved metadata."""

from __future__ import annotations

import math
from typing import Any

TRACE_NAMES = {"exact": "exact", "hutchinson": "Hutchinson", "hutch++": "Hutch++"}


def _estimate(name: str, e: dict[str, Any] | float) -> str:
    if not isinstance(e, dict):  # the exact path: a number
        return f"{TRACE_NAMES.get(name, name)} {e:.6g}"
    se = e.get("stderr")
    err = (
        f" +- {se:.2g} (standard error)"
        if isinstance(se, (int, float)) and math.isfinite(se)
        else " (no standard error: one probe)"
    )
    return f"{TRACE_NAMES.get(name, name)} {e['estimate']:.6g}{err}, {e['hvps']} HVPs"


def trace_line(trace: dict[str, Any]) -> str:
    """``trace: Hutchinson 12.3 +- 0.41 (standard error), 30 HVPs; Hutch++ 12.1 +- 0.05 (standard error), 30 HVPs``
    from the JSON's ``trace`` (``{"exact": t}`` on the exact path)."""
    return "trace: " + "; ".join(_estimate(k, v) for k, v in trace.items())


def comparison_lines(comparison: dict[str, dict[str, Any]]) -> list[str]:
    """One line per approximation of the JSON's ``comparison``:
    ``compare ggn: cosine 0.921, relative Frobenius error 0.402, top-8 overlap 0.750``."""
    return [
        f"compare {name}: cosine {m['cosine']:.3f}, relative Frobenius error {m['rel_frobenius']:.3f}, "
        f"top-{m['top_k']} overlap {m['top_k_overlap']:.3f}"
        for name, m in comparison.items()
        if "cosine" in m
    ]


def diagonal_se_lines(se: dict[str, Any]) -> list[str]:
    """One line per estimator of the diagonal JSON's ``standard_error`` (empty without one):
    ``  hutchinson: per-entry standard error (4 probe groups): median 0.21, max 3.4 relative to |estimate| (2112 entries
    above 1e-03 max), sign resolved at 2 se for 61.0% of 2304 entries``."""

    def g(x: Any) -> str:
        return f"{x:.2g}" if isinstance(x, (int, float)) and math.isfinite(x) else "nan"

    return [
        f"  {e}: per-entry standard error ({se.get('groups')} probe groups): median {g(s['median_rel_se'])}, "
        f"max {g(s['max_rel_se'])} relative to |estimate| ({s['entries_summarized']} entries above "
        f"{s['rel_threshold']:.0e} max), sign resolved at 2 se for "
        f"{100 * s['sign_resolved_2se']:.1f}% of {s['entries']} entries"
        for e, s in (se.get("estimators") or {}).items()
    ]
