"""Per-batch work of the diagonal estimators: what runs for each batch and weight, and the plan that collects it.

* :class:`ParamPlan` -- one weight's work for one pass over the samples: :class:`Work` pieces merged by key, so that
  two estimators asking for the same products share them (the larger request wins);
* :class:`Work` -- one kind of per-batch work and its partial sums ``{what: tensor}``. The shared kinds are
  :class:`Entries` (unit vectors ``e_i``: ``(H e_i)_i``), :class:`Probes` (Rademacher probes ``z_j``:
  ``sum_j z_j * (H z_j)``, the products kept or recorded per probe) and :class:`Rows` (given vectors ``v``:
  ``H v``); an estimator that needs other work defines its own kind in its module;
* :class:`Unit` -- what work sees for one batch and one weight: the products ``H v``, the batch and the loss
  (:class:`lib.hessian.diagonal.DiagonalJob` runs units on a model, :class:`LinearUnit` on any symmetric linear map).

Probe ``j`` of weight ``p`` is drawn from a generator seeded by ``sha256(f"{seed}/{p}/{j}")`` on the CPU, so it does
not depend on the sample, worker or device; every estimator using probes sees the same ones.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, ClassVar, TypeVar

import torch

from ...products.operator import digest, store_rows, unit_rows
from ...runtime.jobs import Partial, derived_seed

Progress = Callable[[int], None]
RowFn = Callable[[int, int], torch.Tensor]
Sink = Callable[[int, torch.Tensor, torch.Tensor], None]
MONITOR_BUDGET = 2**25
"""Most per-probe contributions (probes x entries) recorded for the consecutive-difference metric."""


# ----------------------------------------------------------------------------- probes, targets, small helpers


def probe_seed(seed: int, param_name: str, j: int) -> int:
    """Seed of probe ``j`` of parameter ``param_name``: 63 bits of ``sha256(f"{seed}/{param_name}/{j}")``."""
    return derived_seed(seed, param_name, j)


def rademacher_probes(
    n: int, seed: int, param_name: str, start: int, stop: int, dtype: torch.dtype = torch.float64
) -> torch.Tensor:
    """Probes ``start..stop-1`` of ``param_name``, shape ``(stop - start, n)``: i.i.d. +-1 entries, on the CPU.

    Probe ``j`` depends only on ``(seed, param_name, j)``, so any range of probes is reproducible on its own.

    Args:
        n: entries per probe (the weight's number of entries).
        seed: the run's seed.
        param_name: the weight's qualified name.
        start: index of the first probe.
        stop: index one past the last probe.
        dtype: the probes' dtype.

    Returns:
        ``(stop - start, n)`` tensor of +-1 in ``dtype``, on the CPU.
    """
    out = torch.empty(stop - start, n, dtype=dtype)
    for r, j in enumerate(range(start, stop)):
        g = torch.Generator().manual_seed(probe_seed(seed, param_name, j))
        out[r] = torch.randint(0, 2, (n,), generator=g).to(dtype).mul_(2).sub_(1)
    return out


def key(param_name: str, what: str) -> str:
    """Name of a partial sum: ``<param>|<what>``."""
    return f"{param_name}|{what}"


def rel_l2(est: torch.Tensor, ref: torch.Tensor) -> float:
    """``||est - ref|| / ||ref||`` (float64)."""
    ref = ref.to(torch.float64)
    return float((est.to(torch.float64) - ref).norm() / ref.norm())


def log_grid(k_max: int, step: int = 1, points: int = 48) -> list[int]:
    """Multiples of ``step`` up to ``k_max``: all of them when few, else about ``points`` log-spaced ones (with the last)."""
    n = k_max // step
    if n <= points:
        return [step * i for i in range(1, n + 1)]
    idx = sorted(
        {max(1, round(math.exp(u))) for u in torch.linspace(0, math.log(n), points).tolist()} | {n}
    )
    return [step * i for i in idx]


def monitor_entries(
    numel: int, probes: int, seed: int, budget: int = MONITOR_BUDGET
) -> torch.Tensor:
    """Entries for the consecutive-difference metric: all if ``probes * numel <= budget``, else a seeded random subset."""
    if probes * numel <= budget:
        return torch.arange(numel)
    m = max(1, budget // max(probes, 1))
    return torch.randperm(numel, generator=torch.Generator().manual_seed(seed))[:m].sort().values


def convergence_curve(
    est_at: Callable[[int], torch.Tensor],
    ks: list[int],
    tracked_pos: torch.Tensor,
    monitor_pos: torch.Tensor,
    exact: torch.Tensor,
) -> dict[str, list]:
    """Tracked relative error and consecutive relative difference of ``est_at(k)`` (estimates on the recorded rows).

    ``consecutive_rel_diff[i] = ||e(k_i) - e(k_{i-1})|| / ||e(k_i)||`` on the monitored entries (NaN for the first).
    """
    errs, diffs, prev = [], [], None
    for k in ks:
        e = est_at(k)
        errs.append(rel_l2(e[tracked_pos], exact))
        cur = e[monitor_pos]
        diffs.append(float("nan") if prev is None else float((cur - prev).norm() / cur.norm()))
        prev = cur
    return {"k": ks, "tracked_rel_error": errs, "consecutive_rel_diff": diffs}


@dataclass
class Target:
    """One weight to estimate: its name, shape, and the flat entries tracked exactly (``tracked``, may be empty)."""

    param_name: str
    shape: tuple[int, ...]
    tracked: torch.Tensor = field(default_factory=lambda: torch.zeros(0, dtype=torch.long))

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


# ----------------------------------------------------------------------------- units and work


class Unit:
    """What :class:`Work` sees for one batch and one weight (``param_name``, ``numel`` entries, probe ``seed``).

    ``like``: a tensor with the products' dtype and device; :meth:`multiply` gives ``H v``; ``batch``, ``objective``
    and ``x0`` (the batch's token ids, the summed NLL as a function of ``x``, ``x``'s values) are ``None`` where
    there is no model (:class:`LinearUnit`); ``nll`` is the batch's summed NLL, offered by the first work that
    evaluates it (:meth:`offer_nll`); ``needs_graph``: whether some work of the plan multiplies by ``H``.
    """

    param_name: str
    numel: int
    seed: int
    like: torch.Tensor
    needs_graph: bool = False
    batch: torch.Tensor | None = None
    objective: Any = None
    x0: torch.Tensor | None = None
    nll: torch.Tensor | None = None
    jvp: Any = None
    """The job's :class:`lib.objective.forward.JVPPolicy` (decided once per process), ``None``: a work makes its own."""

    def multiply(
        self, rows: RowFn, count: int, sink: Sink, progress: Progress | None = None
    ) -> None:
        """``sink(start, v, H v)`` for chunks ``v = rows(start, stop)`` of the vectors ``0..count-1``."""
        raise NotImplementedError

    def gradient(self) -> torch.Tensor:
        """The gradient of the batch's summed NLL at ``x0`` (one batch, one sample: the products' own graph)."""
        raise NotImplementedError(f"{type(self).__name__} has no model: no gradient")

    def offer_nll(self, value: torch.Tensor) -> None:
        if self.nll is None:
            self.nll = value.detach()


@dataclass
class LinearUnit(Unit):
    """A :class:`Unit` for an explicit symmetric linear map ``apply`` (``(m, n) -> (m, n)``, row ``v`` to ``H v``):
    the estimators on any matrix or operator, e.g. ``apply = lambda v: v @ h`` for a dense symmetric ``h``."""

    apply: Callable[[torch.Tensor], torch.Tensor] = None  # type: ignore[assignment]
    numel: int = 0
    seed: int = 0
    param_name: str = "x"
    dtype: torch.dtype = torch.float64
    chunk: int = 64

    def __post_init__(self):
        self.like = torch.zeros(0, dtype=self.dtype)

    def multiply(
        self, rows: RowFn, count: int, sink: Sink, progress: Progress | None = None
    ) -> None:
        for start in range(0, count, self.chunk):
            stop = min(count, start + self.chunk)
            v = rows(start, stop).to(self.dtype)
            sink(start, v, self.apply(v))
            if progress is not None:
                progress(stop - start)


W = TypeVar("W", bound="Work")


class Work:
    """One kind of per-batch work on one weight; :meth:`run` returns its partial sums ``{what: tensor}``.

    ``order``: when it runs within a batch (lower first; work that evaluates the loss itself, e.g. per-sample
    gradients, runs before the products on the gradient graph, and the order of the product blocks fixes which
    one the chunk is measured on); ``needs_graph``: it multiplies by ``H`` on the batch's gradient graph.
    """

    order: ClassVar[int] = 50
    needs_graph: ClassVar[bool] = False

    def key(self) -> str:
        """Work of the same key is merged (:meth:`merge`) rather than done twice."""
        return type(self).__name__

    def merge(self, other: Work) -> None:
        """Take ``other``'s request into this one (so that both are served by one piece of work)."""
        raise ValueError(f"two {self.key()} requests for one weight cannot be merged")

    def steps(self) -> int:
        """Products per batch (for the progress bar)."""
        return 0

    def entries(self, numel: int) -> int:
        """Float64 entries of its partial sums (memory and checkpoint estimates, :mod:`lib.app.preflight`)."""
        return 0

    def kept(self) -> int:
        """Products kept whole (``n`` entries each) for a later phase."""
        return 0

    def config(self) -> dict[str, Any]:
        """What identifies it in a checkpoint."""
        return {}

    def run(self, unit: Unit, progress: Progress | None) -> Partial:
        raise NotImplementedError


def _union(a: torch.Tensor | None, b: torch.Tensor | None) -> torch.Tensor | None:
    """Sorted union of two index sets (``None`` = empty)."""
    if a is None or b is None:
        return a if b is None else b
    return torch.cat([a, b]).unique()


@dataclass
class Entries(Work):
    """Unit vectors ``e_i`` of the flat entries ``index`` (sorted): ``(H e_i)_i`` as ``exact`` (``(len,)``); one HVP each."""

    index: torch.Tensor
    order: ClassVar[int] = 20
    needs_graph: ClassVar[bool] = True

    def merge(self, other: Work) -> None:
        self.index = _union(self.index, other.index)

    def steps(self) -> int:
        return len(self.index)

    def entries(self, numel: int) -> int:
        return len(self.index)

    def values_at(self, exact: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        """This work's summed ``exact`` values at the flat entries ``idx`` (all of them in ``index``)."""
        return exact[torch.searchsorted(self.index, idx)]

    def config(self) -> dict[str, Any]:
        return {"index": digest(self.index)}

    def run(self, unit: Unit, progress: Progress | None) -> Partial:
        idx, n = self.index.to(unit.like.device), unit.numel
        res = torch.empty(len(idx), dtype=unit.like.dtype, device=unit.like.device)

        def take(a: int, v: torch.Tensor, hv: torch.Tensor) -> None:
            res[a : a + len(hv)] = hv[torch.arange(len(hv), device=hv.device), idx[a : a + len(hv)]]

        unit.multiply(lambda a, b: unit_rows(n, a, b, unit.like, idx), len(idx), take, progress)
        return {"exact": res}


@dataclass
class Probes(Work):
    """Rademacher probes ``z_0..z_{count-1}`` (:func:`rademacher_probes`), one HVP each: ``sum_j z_j * (H z_j)`` as
    ``zhz`` (``(n,)``); with ``keep``, ``H z_j`` for ``j < keep`` as ``hz`` (``(keep, n)``); with ``record``, each
    probe's ``z_j * (H z_j)`` at those flat entries as ``record`` (``(count, len(record))``); with ``groups = B >= 2``,
    the sums over the interleaved groups ``j = g mod B`` for ``g < B - 1`` as ``zhz_groups`` (``(B - 1, n)``; the last
    group is ``zhz`` minus their sum, :func:`group_sums`), from which :func:`group_standard_error` forms a per-entry
    standard error. ``zhz`` is accumulated exactly as without groups (the groups are extra sums beside it)."""

    count: int
    keep: int = 0
    record: torch.Tensor | None = None
    groups: int = 0
    order: ClassVar[int] = 30
    needs_graph: ClassVar[bool] = True

    def merge(self, other: Work) -> None:
        self.count, self.keep = max(self.count, other.count), max(self.keep, other.keep)
        self.record = _union(self.record, other.record)
        self.groups = max(self.groups, getattr(other, "groups", 0))

    def steps(self) -> int:
        return self.count

    def entries(self, numel: int) -> int:
        return (
            numel
            + self.keep * numel
            + (0 if self.record is None else self.count * len(self.record))
            + max(self.groups - 1, 0) * numel
        )

    def kept(self) -> int:
        return self.keep

    def config(self) -> dict[str, Any]:
        return {
            "count": self.count,
            "keep": self.keep,
            "record": None if self.record is None else digest(self.record),
            **({"groups": self.groups} if self.groups >= 2 else {}),
        }

    def run(self, unit: Unit, progress: Progress | None) -> Partial:
        n, like = unit.numel, unit.like
        zhz = torch.zeros(n, dtype=like.dtype, device=like.device)
        kept = (
            torch.empty(self.keep, n, dtype=like.dtype, device=like.device) if self.keep else None
        )
        rec_idx = None if self.record is None else self.record.to(like.device)
        rec = (
            None
            if rec_idx is None
            else torch.empty(self.count, len(rec_idx), dtype=like.dtype, device=like.device)
        )

        b = self.groups if self.groups >= 2 else 0
        grp = torch.zeros(b - 1, n, dtype=like.dtype, device=like.device) if b else None

        def take(a: int, v: torch.Tensor, hv: torch.Tensor) -> None:
            c = v * hv
            zhz.add_(c.sum(0))
            if grp is not None:
                for g in range(b - 1):  # rows a + r with (a + r) mod b == g
                    rows = c[(g - a) % b :: b]
                    if len(rows):
                        grp[g].add_(rows.sum(0))
            if rec is not None:
                rec[a : a + len(c)] = c[:, rec_idx]
            if kept is not None and a < self.keep:
                m = min(len(hv), self.keep - a)
                kept[a : a + m] = hv[:m]

        unit.multiply(
            lambda a, b: rademacher_probes(n, unit.seed, unit.param_name, a, b, like.dtype),
            self.count,
            take,
            progress,
        )
        out = {"zhz": zhz}
        if kept is not None:
            out["hz"] = kept
        if rec is not None:
            out["record"] = rec
        if grp is not None:
            out["zhz_groups"] = grp
        return out


def group_sums(total: torch.Tensor, partial: torch.Tensor) -> torch.Tensor:
    """All ``B`` group sums ``(B, n)`` from the total ``(n,)`` and the first ``B - 1`` of them ``(B - 1, n)`` (float64)."""
    p = partial.to(torch.float64)
    return torch.cat([p, (total.to(torch.float64) - p.sum(0))[None]])


def group_sizes(count: int, groups: int) -> torch.Tensor:
    """Probes in each interleaved group ``j = g mod B`` of ``count`` probes, ``(B,)`` float64."""
    return torch.tensor([len(range(g, count, groups)) for g in range(groups)], dtype=torch.float64)


def group_standard_error(sums: torch.Tensor, sizes: torch.Tensor) -> torch.Tensor:
    """Per-entry standard error of the mean of ``K = sum_g k_g`` i.i.d. per-probe values from ``B`` group sums.

    ``sums``: ``(B, n)`` group sums ``S_g`` (``k_g`` probes each, ``sizes``, all ``>= 1``). With group means
    ``m_g = S_g / k_g`` and the overall mean ``m = sum_g S_g / K``, the between-group estimate of the per-probe
    variance ``s^2 = sum_g k_g (m_g - m)^2 / (B - 1)`` is unbiased (one-way analysis of variance), so

        se = sqrt(s^2 / K);   equal groups (k_g = K/B): se = std_g(m_g) / sqrt(B)  (std with ddof 1),

    the batch-means standard error (Schmeiser 1982, "Batch size effects in the analysis of simulation output",
    Oper. Res. 30(3)). ``(est - mean) / se`` has about Student's t law with ``B - 1`` degrees of
    freedom (exactly, for normal per-probe values), so ``se`` itself is noisy for small ``B``.
    """
    k = sizes.to(torch.float64)
    total = k.sum()
    m = sums.to(torch.float64).sum(0) / total
    means = sums.to(torch.float64) / k[:, None]
    var = (k[:, None] * (means - m) ** 2).sum(0) / (len(k) - 1)
    return (var / total).sqrt()


@dataclass
class Rows(Work):
    """Given vectors ``v`` (the rows of ``rows``, ``(s, n)``): ``H v`` as ``what`` (``(s, n)``); one HVP each."""

    rows: torch.Tensor
    what: str = "hv"
    order: ClassVar[int] = 40
    needs_graph: ClassVar[bool] = True

    def key(self) -> str:
        return f"Rows:{self.what}"

    def steps(self) -> int:
        return self.rows.shape[0]

    def entries(self, numel: int) -> int:
        return self.rows.shape[0] * numel

    def config(self) -> dict[str, Any]:
        return {"what": self.what, "rows": digest(self.rows), "shape": list(self.rows.shape)}

    def run(self, unit: Unit, progress: Progress | None) -> Partial:
        out = torch.empty(
            self.rows.shape[0], unit.numel, dtype=unit.like.dtype, device=unit.like.device
        )
        unit.multiply(lambda a, b: self.rows[a:b], self.rows.shape[0], store_rows(out), progress)
        return {self.what: out}


@dataclass
class ParamPlan:
    """One weight's work for one pass over the samples (``numel`` entries, flat storage order): its :class:`Work`
    pieces by key, in the order they were first asked for."""

    param_name: str
    numel: int
    work: dict[str, Work] = field(default_factory=dict)

    def add(self, work: W) -> W:
        """Add ``work``, or merge it into this plan's work of the same key; returns the plan's piece."""
        k = work.key()
        if k in self.work:
            self.work[k].merge(work)
        else:
            self.work[k] = work
        return self.work[k]  # type: ignore[return-value]

    def get(self, kind: type[W], key_: str | None = None) -> W | None:
        """This plan's work of type ``kind`` (and key ``key_``, default the type's name), if any."""
        w = self.work.get(key_ or kind.__name__)
        return w if isinstance(w, kind) else None

    def ordered(self) -> list[Work]:
        """The work in the order it runs within a batch (by ``order``, then as asked for)."""
        return sorted(self.work.values(), key=lambda w: w.order)

    @property
    def needs_graph(self) -> bool:
        return any(w.needs_graph for w in self.work.values())

    @property
    def keep(self) -> int:
        """Products kept whole for a later phase (e.g. XDiag's sketch: ``K/2``)."""
        return sum(w.kept() for w in self.work.values())

    def steps(self) -> int:
        """Products per batch (a plan without products counts as one step)."""
        return sum(w.steps() for w in self.work.values()) or 1

    def entries(self) -> int:
        """Float64 entries of this plan's partial sums (``nll_sum`` excluded)."""
        return sum(w.entries(self.numel) for w in self.work.values())

    def config(self) -> dict[str, Any]:
        return {
            "param": self.param_name,
            "numel": self.numel,
            "work": {k: w.config() for k, w in self.work.items()},
        }


def run_plan(plan: ParamPlan, unit: Unit, progress: Progress | None = None) -> Partial:
    """One batch of ``plan`` on ``unit``: every piece of work in order, its sums keyed by :func:`key`."""
    unit.needs_graph = plan.needs_graph
    out: Partial = {}
    for work in plan.ordered():
        for what, value in work.run(unit, progress).items():
            out[key(plan.param_name, what)] = value
    if progress is not None and not sum(w.steps() for w in plan.work.values()):
        progress(1)
    return out


SE_REL_THRESHOLD = 1e-3
"""Entries with ``|estimate| <= SE_REL_THRESHOLD * max |estimate|`` are left out of the relative-error summary."""


def se_summary(
    estimates: list[torch.Tensor],
    errors: list[torch.Tensor],
    rel_threshold: float = SE_REL_THRESHOLD,
) -> dict[str, float | int]:
    """Summary of per-entry standard errors over the entries of one or more weights (float64, any shapes).

    ``median_rel_se`` / ``max_rel_se``: of ``se_i / |est_i|`` over the entries with ``|est_i| > rel_threshold *
    max |est|`` (the max over each weight's own entries; ``entries_summarized`` of them); ``sign_resolved_2se``:
    the fraction of all entries with ``|est_i| > 2 se_i`` (their sign is resolved at about 2 standard errors).
    """
    rel, resolved, total = [], 0, 0
    for est, se in zip(estimates, errors):
        e, s = est.reshape(-1).to(torch.float64).abs(), se.reshape(-1).to(torch.float64)
        big = e > rel_threshold * float(e.max()) if e.numel() else e > 0
        rel.append(s[big] / e[big])
        resolved += int((e > 2 * s).sum())
        total += e.numel()
    r = torch.cat(rel) if rel else torch.zeros(0, dtype=torch.float64)
    return {
        "median_rel_se": float(r.median()) if r.numel() else float("nan"),
        "max_rel_se": float(r.max()) if r.numel() else float("nan"),
        "entries_summarized": int(r.numel()),
        "rel_threshold": rel_threshold,
        "sign_resolved_2se": resolved / total if total else float("nan"),
        "entries": total,
    }
