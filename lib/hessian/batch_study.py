"""The report's batch-size study (its Sec. 5.3, Fig. 2), from one pass over the samples.

The run sums unit Hessians in unit order (:class:`lib.runtime.checkpoint.RunState`), so the running sum after
``u`` units is the summed-NLL Hessian ``S_b`` of the first ``b = u * model_input_bs`` samples. Copies of
it are kept at the recorded ``b`` (every ``b`` up to 64, then about 32 log-spaced ``b`` up to the full
batch ``B``; with ``--model_input_bs > 1`` each wanted ``b`` is rounded up to a unit boundary), and
``H^b = S_b / (b * (seqlen - 1))`` is the Hessian of the mean next-token NLL over those samples.
Memory: one ``(n, n)`` float64 copy per recorded ``b`` (about 96 for large ``B``), also in the checkpoint.

Metrics (Frobenius norms), for recorded ``b_0 < b_1 < ... < b_m = B``:

* ``rel_to_full[i] = ||H^{b_i} - H^B|| / ||H^B||``;
* ``rel_consecutive[i] = ||H^{b_i} - H^{b_{i-1}}|| / ||H^{b_i}||`` (``None`` for ``i = 0``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from .. import constants

DENSE_UPTO = constants.BATCH_STUDY_DENSE_UPTO
"""Every ``b`` up to this is recorded."""
N_LOG = constants.BATCH_STUDY_N_LOG
"""About this many log-spaced ``b`` are recorded beyond ``DENSE_UPTO``."""
HEATMAP_B = (1, 4, 16)
"""Running Hessians kept in ``<name>_batch_study.pt`` (and drawn), besides the full batch."""


def wanted_sizes(total: int, dense_upto: int = DENSE_UPTO, n_log: int = N_LOG) -> list[int]:
    """Sample counts to record: ``1..min(dense_upto, total)``, then ``n_log`` log-spaced counts up to ``total`` (always included)."""
    sizes = set(range(1, min(dense_upto, total) + 1))
    if total > dense_upto:
        ratio = math.log(total / dense_upto)
        sizes.update(
            min(total, round(dense_upto * math.exp(ratio * i / n_log))) for i in range(1, n_log + 1)
        )
    sizes.add(total)
    return sorted(sizes)


def snapshot_units(total: int, model_input_bs: int = 1) -> list[int]:
    """Unit counts (prefix lengths) after which the running sum is copied: each wanted ``b`` rounded up to a unit boundary."""
    return sorted({-(-b // model_input_bs) for b in wanted_sizes(total)})


def rel_to_full(hs: Sequence[torch.Tensor], full: torch.Tensor) -> list[float]:
    """``||H_i - full||_F / ||full||_F`` for each ``H_i``."""
    ref = float(torch.linalg.norm(full))
    return [float(torch.linalg.norm(h - full)) / ref if ref > 0 else math.nan for h in hs]


def rel_consecutive(hs: Sequence[torch.Tensor]) -> list[float | None]:
    """``[None, ||H_1 - H_0||_F / ||H_1||_F, ...]``."""
    out: list[float | None] = [None]
    for prev, cur in zip(hs[:-1], hs[1:]):
        den = float(torch.linalg.norm(cur))
        out.append(float(torch.linalg.norm(cur - prev)) / den if den > 0 else math.nan)
    return out


def running_hessians(
    snapshots: dict[int, dict[str, torch.Tensor]],
    model_input_bs: int,
    tokens_per_sample: int,
    key: str = "hessian_sum",
) -> tuple[list[int], list[torch.Tensor]]:
    """``(b, H^b)`` in increasing ``b`` from the running sums after ``u`` units (``b = u * model_input_bs``)."""
    units = sorted(snapshots)
    bs = [u * model_input_bs for u in units]
    return bs, [snapshots[u][key] / (b * tokens_per_sample) for u, b in zip(units, bs)]


def study(bs: Sequence[int], hs: Sequence[torch.Tensor]) -> dict[str, list]:
    """The JSON block ``batch_study``: ``b``, ``rel_to_full`` (against the last, full batch) and ``rel_consecutive``."""
    return {
        "b": list(bs),
        "rel_to_full": rel_to_full(hs, hs[-1]),
        "rel_consecutive": rel_consecutive(hs),
    }


def kept_sizes(bs: Sequence[int]) -> list[int]:
    """The recorded ``b`` whose running Hessians are saved and drawn: the recorded ones nearest to ``HEATMAP_B``, and ``B``."""
    picks = {min(bs, key=lambda b: (abs(b - want), b)) for want in HEATMAP_B}
    return sorted(picks | {bs[-1]})


@dataclass(frozen=True)
class BatchStudy:
    """How the running Hessian ``H^b`` of the first ``b`` samples approaches the full batch's ``H^B``.

    Attributes:
        b: the recorded batch sizes, increasing (the last is ``B``).
        rel_to_full: ``||H^b - H^B||_F / ||H^B||_F`` per ``b``.
        rel_consecutive: ``||H^b - H^{b'}||_F / ||H^b||_F`` against the previous recorded ``b'`` (NaN first).
        kept: ``{b: H^b}`` at :func:`kept_sizes` (saved and drawn), in the run's dtype.
    """

    b: list[int]
    rel_to_full: list[float]
    rel_consecutive: list[float]
    kept: dict[int, torch.Tensor]

    def as_json(self) -> dict[str, list]:
        """The JSON block ``batch_study`` (:func:`study` plus ``kept_b``)."""
        return {
            "b": self.b,
            "rel_to_full": self.rel_to_full,
            "rel_consecutive": self.rel_consecutive,
            "kept_b": list(self.kept),
        }


def batch_study(
    snapshots: dict[int, dict[str, torch.Tensor]],
    model_input_bs: int,
    seqlen: int,
    dtype: torch.dtype,
) -> BatchStudy:
    """The study from the running sums after ``u`` units (``b = u * model_input_bs`` samples of ``seqlen``
    tokens): the errors of every recorded ``b`` and the kept Hessians (in ``dtype``). Writes nothing."""
    bs, hs = running_hessians(snapshots, model_input_bs, seqlen - 1)
    block = study(bs, hs)
    kept = {b: hs[bs.index(b)].to(dtype) for b in kept_sizes(bs)}
    return BatchStudy(block["b"], block["rel_to_full"], block["rel_consecutive"], kept)


def summary_line(block: dict[str, Any]) -> str:
    """One printed line: the error against the full batch at ``b`` = 1 and 16 (if recorded, below ``B``), and the first ``b`` where it is below 0.1."""
    b, err = block["b"], block["rel_to_full"]
    below = next((x for x, e in zip(b, err) if e < 0.1), None)
    at = [f"{err[b.index(x)]:.3f} at b={x}" for x in (1, 16) if x in b[:-1]] or [
        f"{err[0]:.3f} at b={b[0]}"
    ]
    return f"batch study (B={b[-1]}): ||H^b - H^B||/||H^B|| = {', '.join(at)}; below 0.1 from b={below}"
