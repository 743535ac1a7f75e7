"""Whole-model Hessian sweeps: one quantity table over many weight units (layers, blocks, attention heads).

A *unit* is a set of weights (:class:`Unit`: its :class:`lib.objective.subsets.ParamSlice` s); its Hessian block is
``H_uu``, the Hessian of the mean next-token NLL restricted to the unit's entries. :func:`make_units` makes them
from a granularity (``layer``: each linear weight of each block; ``block``: all linear weights of a block;
``head``: one attention head's rows of ``q``/``k``/``v`` and columns of the output projection) and shell globs.

Shared work. :func:`sweep` builds one :class:`lib.products.operator.HessianOperator` on the *union* ``x`` of the units
(the units' slices concatenated, so unit ``u`` occupies rows ``offset_u .. offset_u + n_u - 1``) and keeps each
batch's gradient graph for the whole sweep; a unit's product is the union product of a block-restricted vector:

    H_uu V = P_u H (P_u^T V),     P_u: the rows of unit u,

so every unit's Lanczos, SLQ and probes run on one model load, one set of samples and one graph per batch
(``strategy="per_unit"`` instead builds one operator per unit, sharing the model and samples only). The
algorithms are :mod:`lib.spectrum.algorithms`'s pure functions over that ``matmat``.

Traces. Per unit (Hutchinson on ``H_uu``, probes ``z_u``): ``Var = 2 sum_{i != j in u} H_ij^2``. Shared: one
union product per Rademacher probe ``z`` gives every unit's sample ``z_u . (H z)_u`` at once;
``E = tr(H_uu)`` (the off-diagonal blocks average out), ``Var = 2 sum_{i != j in u} H_ij^2 + sum_{w != u}
||H_uw||_F^2`` (they add variance). ``trace_estimator="auto"`` measures both variances on pilot probes and picks
the one that needs fewer seconds (its products at their measured cost) to reach ``trace_rel`` relative standard error
on every unit; when the shared one is chosen, the unit's pilot probes are not wasted: the two independent estimates
are combined by inverse-variance weights (:func:`combined_trace`).

Other quantities from the per-unit probes ``z`` (``H_uu z`` computed once): ``||H_uu||_F^2 = E ||H_uu z||^2``
(reported as ``||H_uu||_F`` with the delta-method standard error) and the Hutchinson diagonal
``diag(H_uu) ~ mean z * H_uu z`` (its statistics; error: the median entry's standard error). ``top`` /
``bottom``: Lanczos (residual ``||H y - theta y||``); ``density``: SLQ's negative mass and the moments
``tr(H_uu^m) / n_u`` (m = 1, 2) with standard errors over the probes.
"""

from __future__ import annotations

import fnmatch
import hashlib
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, Protocol

import torch
from torch import nn

from ..errors import ParamError
from ..model.models import find_blocks, iter_named_linear, text_config
from ..objective.subsets import ParamSlice, Subset
from ..products.operator import HessianOperator
from ..spectrum import algorithms as spectrum

F64 = torch.float64
GRANULARITIES = ("layer", "block", "head")
QUANTITIES = ("trace", "top", "bottom", "density", "frobenius", "diagonal")
TRACE_ESTIMATORS = ("auto", "shared", "per_unit")
STRATEGIES = ("union", "per_unit")
ROW_FIELDS = (
    "checkpoint",
    "unit",
    "block",
    "layer",
    "head",
    "n",
    "quantity",
    "estimate",
    "error",
    "error_kind",
    "hvps",
    "seconds",
)
"""The columns of a sweep table (:class:`Row`), in order."""
ATTENTION_PARTS = {"q": ("q_proj", "query"), "k": ("k_proj", "key"), "v": ("v_proj", "value")}
OUTPUT_PROJ = ("out_proj", "o_proj", "dense")


# ----------------------------------------------------------------------------- units


@dataclass(frozen=True)
class Unit:
    """A set of weights whose Hessian block is studied: ``name`` (unique), ``block`` index, ``layer`` (the layer's
    name in its block, ``"*"`` for a whole block, ``"self_attn"`` for a head), ``head`` (-1 unless a head) and its
    ``slices``."""

    name: str
    block: int
    layer: str
    head: int
    slices: tuple[ParamSlice, ...]

    @property
    def size(self) -> int:
        return sum(len(s) for s in self.slices)

    def subset(self) -> Subset:
        return Subset(self.slices, self.name)


def _matches(name: str, globs: Sequence[str]) -> bool:
    return any(fnmatch.fnmatchcase(name, g) for g in globs)


def _whole(name: str, module: nn.Module) -> ParamSlice:
    return ParamSlice(name, torch.arange(module.weight.numel()))


def head_slices(
    model: nn.Module, block: int, head: int, globs: Sequence[str]
) -> tuple[ParamSlice, ...]:
    """Head ``head`` of block ``block``: rows ``h d .. (h+1) d - 1`` of the q/k/v projections and those columns of the
    output projection (``d`` = hidden / heads), for the projections whose weight names match ``globs``.
    ``nn.Linear`` only (stored ``(out, in)``); grouped-query attention (shared k/v heads) is refused."""
    cfg = text_config(model)
    heads = int(cfg.num_attention_heads)
    kv = int(getattr(cfg, "num_key_value_heads", None) or heads)
    if kv != heads:
        raise ParamError(
            "over",
            f"over head: the model shares k/v heads ({kv} for {heads} query heads); use over layer or block",
        )
    prefix, blocks = find_blocks(model)
    out: list[ParamSlice] = []
    for lname, m in blocks[block].named_modules():
        leaf = lname.rpartition(".")[2]
        if not isinstance(m, nn.Linear):
            continue
        pname = f"{prefix}.{block}.{lname}.weight"
        if not _matches(pname, globs):
            continue
        rows, cols = m.weight.shape
        is_qkv = any(leaf in names for names in ATTENTION_PARTS.values())
        if is_qkv:
            d = rows // heads
            idx = (
                torch.arange(head * d, (head + 1) * d)[:, None] * cols + torch.arange(cols)
            ).reshape(-1)
        elif leaf in OUTPUT_PROJ and "attn" in lname:
            d = cols // heads
            idx = (
                torch.arange(rows)[:, None] * cols + torch.arange(head * d, (head + 1) * d)
            ).reshape(-1)
        else:
            continue
        out.append(ParamSlice(pname, idx))
    return tuple(out)


def make_units(model: nn.Module, over: str, globs: Sequence[str] = ("*",)) -> tuple[Unit, ...]:
    """The units of granularity ``over`` (:data:`GRANULARITIES`) among the blocks' linear weights whose names match a
    glob. Refused (:class:`lib.errors.ParamError`): an unknown granularity, a glob matching no linear weight.

    Args:
        model: a causal LM.
        over: ``"layer"`` (one weight), ``"block"`` (a block's chosen weights) or ``"head"`` (one attention head's
            rows or columns of the chosen attention projections).
        globs: shell-style globs over the weights' qualified names (``'*'``: all).

    Returns:
        The units in block order, each with its :class:`~lib.objective.subsets.ParamSlice` s.

    Raises:
        ParamError: an unknown ``over``; a glob matching no linear weight, or (``head``) no attention projection.
    """
    if over not in GRANULARITIES:
        raise ParamError(
            "over", f"over {over!r} is unknown; choose from {', '.join(GRANULARITIES)}"
        )
    linear = [(b, ln, f"{q}.weight", m) for b, ln, q, m in iter_named_linear(model)]
    for g in globs:
        if not any(fnmatch.fnmatchcase(p, g) for _, _, p, _ in linear):
            names = [p for _, _, p, _ in linear]
            raise ParamError(
                "globs",
                f"globs {g!r} matches no linear weight of a block; names look like: {', '.join(names[:2])}",
            )
    chosen = [(b, ln, p, m) for b, ln, p, m in linear if _matches(p, globs)]
    if over == "layer":
        return tuple(Unit(f"{b}.{ln}", b, ln, -1, (_whole(p, m),)) for b, ln, p, m in chosen)
    blocks = sorted({b for b, *_ in chosen})
    if over == "block":
        return tuple(
            Unit(f"{b}", b, "*", -1, tuple(_whole(p, m) for bb, _, p, m in chosen if bb == b))
            for b in blocks
        )
    heads = int(text_config(model).num_attention_heads)
    units = []
    for b in blocks:
        for h in range(heads):
            sl = head_slices(model, b, h, globs)
            if sl:
                units.append(Unit(f"{b}.head{h}", b, "self_attn", h, sl))
    if not units:
        raise ParamError(
            "globs", f"globs {' '.join(globs)} selects no attention projection for over head"
        )
    return tuple(units)


def union_subset(units: Sequence[Unit]) -> tuple[Subset, list[tuple[int, int]]]:
    """The concatenation of the units' slices and each unit's ``(start, stop)`` rows in it."""
    slices: list[ParamSlice] = []
    ranges, start = [], 0
    for u in units:
        slices.extend(u.slices)
        ranges.append((start, start + u.size))
        start += u.size
    return Subset(tuple(slices), f"{len(units)} units"), ranges


# ----------------------------------------------------------------------------- settings and results


@dataclass(frozen=True)
class SweepSettings:
    """How each quantity is estimated. ``trace_rel``: target relative standard error of the traces (probes added
    ``probe_round`` at a time, from ``min_probes`` to ``max_probes``); the per-unit probes also give ``frobenius``
    and ``diagonal``. ``tol`` / ``max_iter``: Lanczos (converged when ``residual <= tol * |theta|``).
    ``slq_probes`` x ``lanczos_steps``: SLQ. ``trace_estimator``: :data:`TRACE_ESTIMATORS`; ``strategy``:
    :data:`STRATEGIES`. ``seed``: every probe and start vector (the same at every checkpoint)."""

    trace_rel: float = 0.05
    min_probes: int = 10
    max_probes: int = 200
    probe_round: int = 10
    tol: float = 1e-3
    max_iter: int = 60
    slq_probes: int = 4
    lanczos_steps: int = 20
    trace_estimator: str = "auto"
    strategy: str = "per_unit"
    seed: int = 0
    chunk: int | None = 1
    keep_graphs: bool | str = "auto"
    model_input_bs: int | str = "auto"

    def check(self) -> None:
        """Refuse settings out of range (:class:`ParamError` naming the field)."""
        if self.trace_estimator not in TRACE_ESTIMATORS:
            raise ParamError(
                "trace_estimator", f"trace_estimator must be one of {TRACE_ESTIMATORS}"
            )
        if self.strategy not in STRATEGIES:
            raise ParamError("strategy", f"strategy must be one of {STRATEGIES}")
        if not self.trace_rel > 0:
            raise ParamError("trace_rel", f"trace_rel must be positive, got {self.trace_rel}")
        if not 2 <= self.min_probes <= self.max_probes or self.probe_round < 1:
            raise ParamError(
                "min_probes",
                "min_probes must be at least 2 and at most max_probes; probe_round >= 1",
            )


def check_quantities(quantities: Sequence[str]) -> tuple[str, ...]:
    """The quantities, checked against :data:`QUANTITIES` (order kept, duplicates dropped)."""
    bad = [q for q in quantities if q not in QUANTITIES]
    if bad or not quantities:
        raise ParamError(
            "quantities",
            f"quantities {bad[0] if bad else '(none)'!r} is unknown; choose from {', '.join(QUANTITIES)}",
        )
    return tuple(dict.fromkeys(quantities))


@dataclass(frozen=True)
class Row:
    """One line of the sweep table: a unit's quantity, its estimate and error (``error_kind``: ``stderr`` or
    ``residual``; NaN when none), the products it took (``hvps``; shared-probe traces: the union products that
    served every unit) and the seconds."""

    checkpoint: str
    unit: str
    block: int
    layer: str
    head: int
    n: int
    quantity: str
    estimate: float
    error: float
    error_kind: str
    hvps: int
    seconds: float

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class SweepResult:
    """The rows (one per unit x quantity, units in order) and the trace estimator's choice with both estimators'
    per-unit variances per probe (``trace``: ``{"chosen", "variance_shared", "variance_per_unit", "cost_shared",
    "cost_per_unit", ...}``); ``hvps``: every product of the sweep; ``operator``: the product settings used."""

    rows: tuple[Row, ...]
    trace: dict[str, Any]
    hvps: int
    seconds: float
    operator: dict[str, Any] = field(default_factory=dict)

    def table(self) -> list[dict[str, Any]]:
        return [r.as_dict() for r in self.rows]

    def value(self, unit: str, quantity: str) -> Row:
        """The row of ``unit`` and ``quantity``."""
        for r in self.rows:
            if r.unit == unit and r.quantity == quantity:
                return r
        raise KeyError((unit, quantity))


class Store(Protocol):
    """Where finished stages are kept (resume): ``get(key)`` -> the stage's value or None, ``put(key, value)``."""

    def get(self, key: str) -> Any: ...

    def put(self, key: str, value: Any) -> None: ...


class MemoryStore(dict):
    """A :class:`Store` in memory (the default: nothing survives the process), with a pass log (:class:`PassStore`)."""

    def put(self, key: str, value: Any) -> None:
        self[key] = value

    def get_pass(self, stage: str, k: int) -> Any:
        return self.get(f"{stage}#{k}")

    def put_pass(self, stage: str, k: int, value: Any) -> None:
        self[f"{stage}#{k}"] = value

    def drop_passes(self, stage: str) -> None:
        for key in [k for k in self if k.startswith(f"{stage}#")]:
            del self[key]


class PassStore(Store, Protocol):
    """A :class:`Store` that also keeps each product of an unfinished stage (resume inside a unit): ``get_pass(stage,
    k)`` / ``put_pass(stage, k, {"input": digest of V, "output": H V})`` for the stage's ``k``-th product, and
    ``drop_passes(stage)`` once the stage itself is stored."""

    def get_pass(self, stage: str, k: int) -> Any: ...

    def put_pass(self, stage: str, k: int, value: Any) -> None: ...

    def drop_passes(self, stage: str) -> None: ...


# ----------------------------------------------------------------------------- pure estimators over a matmat


def unit_seed(seed: int, name: str, stream: str) -> int:
    """A seed for unit ``name``'s ``stream`` (probes, lanczos, slq) from ``seed``: the same at every checkpoint."""
    text = f"{seed}:{name}:{stream}".encode()
    return int.from_bytes(hashlib.sha256(text).digest()[:7], "little")


@dataclass
class ProbeStats:
    """Per-probe samples of one unit's Hutchinson probes ``z`` (``H z`` computed once for all three):
    ``trace`` ``z . Hz``, ``frob`` ``||Hz||^2``, and the running diagonal sums of ``z * Hz`` and its square."""

    trace: list[float] = field(default_factory=list)
    frob: list[float] = field(default_factory=list)
    diag_sum: torch.Tensor | None = None
    diag_sq: torch.Tensor | None = None

    @property
    def count(self) -> int:
        return len(self.trace)


def probe_round(
    matmat: spectrum.MatMat, n: int, stats: ProbeStats, p: int, seed: int
) -> torch.Tensor:
    """``p`` more Rademacher probes (columns ``count .. count + p - 1`` of the global draw ``seed``) into ``stats``;
    returns their products ``H z`` ``(n, p)``."""
    from ..spectrum.vectors import local_space

    z = local_space(n).random(p, seed, "rademacher", first=stats.count)
    hz = matmat(z)
    stats.trace.extend((z * hz).sum(0).tolist())
    stats.frob.extend((hz * hz).sum(0).tolist())
    d = z * hz
    s, q = d.sum(1), (d * d).sum(1)
    stats.diag_sum = s if stats.diag_sum is None else stats.diag_sum + s
    stats.diag_sq = q if stats.diag_sq is None else stats.diag_sq + q
    return hz


def mean_stderr(samples: Sequence[float]) -> tuple[float, float, float]:
    """``(mean, standard error, sample variance)`` of the samples (NaN error for fewer than two)."""
    t = torch.tensor(list(samples), dtype=F64)
    k = t.numel()
    if k < 2:
        return float(t.mean()), float("nan"), float("nan")
    var = float(t.var())
    return float(t.mean()), math.sqrt(var / k), var


def enough(samples: Sequence[float], rel: float) -> bool:
    """Whether the mean of ``samples`` has a standard error of at most ``rel`` of its magnitude."""
    mean, se, _ = mean_stderr(samples)
    return se <= rel * abs(mean)


def combined_trace(shared: Sequence[float], own: Sequence[float]) -> tuple[float, float]:
    """The inverse-variance weighted mean of the shared-probe and the per-unit (pilot) trace estimates, two independent
    unbiased estimates of the same ``tr(H_uu)``, and its standard error ``(1/se_s^2 + 1/se_p^2)^(-1/2)`` (the weights
    use the estimated variances); the shared one alone when there are fewer than two per-unit samples."""
    ms, ss, _ = mean_stderr(shared)
    if len(own) < 2:
        return ms, ss
    mp, sp, _ = mean_stderr(own)
    if not (ss > 0 and sp > 0):
        return (ms, ss) if ss == 0 else (mp, sp)
    ws, wp = 1 / ss**2, 1 / sp**2
    return (ws * ms + wp * mp) / (ws + wp), (ws + wp) ** -0.5


def enough_combined(shared: Sequence[float], own: Sequence[float], rel: float) -> bool:
    """Whether :func:`combined_trace` has a standard error of at most ``rel`` of its magnitude."""
    m, se = combined_trace(shared, own)
    return se <= rel * abs(m)


NEED_CAP = 1e9
"""The probes :func:`_need` reports for a trace whose standard error cannot be reached (a mean of 0, no variance)."""


def _need(var: float, mean: float, rel: float, lo: int) -> float:
    """:func:`probes_needed`, at least ``lo``, at most :data:`NEED_CAP` (finite, so sums and maxima compare)."""
    return min(max(probes_needed(var, mean, rel), lo), NEED_CAP)


def probes_needed(var: float, mean: float, rel: float) -> float:
    """Probes for a standard error ``rel |mean|`` when one probe's variance is ``var``: ``var / (rel mean)^2``."""
    if not math.isfinite(var) or mean == 0:
        return math.inf
    return var / (rel * mean) ** 2


def frobenius_row(stats: ProbeStats) -> tuple[float, float]:
    """``||H||_F`` from ``E ||H z||^2 = ||H||_F^2``, with the delta-method standard error ``se(F^2) / (2 F)``."""
    m, se, _ = mean_stderr(stats.frob)
    f = math.sqrt(max(m, 0.0))
    return f, se / (2 * f) if f > 0 else float("nan")


def diagonal_rows(stats: ProbeStats) -> dict[str, tuple[float, float]]:
    """Statistics of the Hutchinson diagonal estimate ``d = mean_k z_k * H z_k`` (per entry standard error ``s``):
    ``diag_min``, ``diag_max``, ``diag_abs_mean``, ``diag_negative_fraction``, each with the median ``s``."""
    k = stats.count
    d = stats.diag_sum / k
    var = (stats.diag_sq / k - d * d).clamp_min(0) * k / max(k - 1, 1)
    s = float((var / k).sqrt().median())
    return {
        "diag_min": (float(d.min()), s),
        "diag_max": (float(d.max()), s),
        "diag_abs_mean": (float(d.abs().mean()), s),
        "diag_negative_fraction": (float((d < 0).to(F64).mean()), float("nan")),
    }


def density_rows(d: spectrum.SLQResult) -> dict[str, tuple[float, float]]:
    """SLQ's negative mass (the share of the spectrum below 0: mean over probes of the Ritz weights of negative Ritz
    values) and the moments ``tr(H^m) / n`` (m = 1, 2), each with its standard error over the probes."""
    neg = torch.nansum(d.ritz_weights * (d.ritz_values < 0).to(F64), dim=1)
    m, se, _ = mean_stderr(neg.tolist())
    out = {"density_negative_mass": (m, se)}
    for k in (1, 2):
        out[f"density_moment{k}"] = d.moment(k)
    return out


# ----------------------------------------------------------------------------- products


class UnitProducts:
    """``H_uu V`` for each unit: by the union operator with block-restricted vectors (``strategy="union"``), or by one
    operator per unit (``"per_unit"``). ``union(V)``: ``H V`` on the union (shared probes). ``hvps`` counts the
    products (one union or unit product each)."""

    def __init__(
        self,
        model: nn.Module,
        samples: torch.Tensor,
        units: Sequence[Unit],
        settings: SweepSettings,
        make_operator: Callable[..., HessianOperator] | None = None,
    ):
        self.model, self.samples, self.units, self.settings = model, samples, units, settings
        self.make = make_operator or (
            lambda subset, **kw: HessianOperator(model, subset, samples, **kw)
        )
        self.subset, self.ranges = union_subset(units)
        self.n = self.subset.size
        self._union: HessianOperator | None = None
        self._unit_ops: dict[int, HessianOperator] = {}
        self._last: HessianOperator | None = (
            None  # the newest unit operator (its settings go in the report)
        )
        self.hvps = 0
        self.log: PassStore | None = None
        self.stage, self._k = "", 0
        self.replayed = 0

    def begin(self, stage: str) -> None:
        """The products that follow belong to ``stage`` (numbered from 0 in the pass log)."""
        self.stage, self._k = stage, 0

    def end(self, stage: str) -> None:
        """``stage`` is stored: its logged products are no longer needed."""
        if self.log is not None:
            self.log.drop_passes(stage)

    def _product(self, compute: spectrum.MatMat, v: torch.Tensor) -> torch.Tensor:
        """``compute(v)``, counted; with a pass log, the stage's ``k``-th product is replayed when logged for the same
        ``v`` (a resumed stage repeats its deterministic inputs, so it gets bitwise the same outputs), else logged."""
        self.hvps += v.shape[1]
        k = self._k
        self._k += 1
        if self.log is None:
            return compute(v)
        from ..products.operator import digest

        key = digest(v)
        got = self.log.get_pass(self.stage, k)
        if got is not None and got["input"] == key:
            self.replayed += 1
            return got["output"]
        hv = compute(v)
        self.log.put_pass(self.stage, k, {"input": key, "output": hv})
        return hv

    def _kw(self) -> dict[str, Any]:
        s = self.settings
        return dict(model_input_bs=s.model_input_bs, chunk=s.chunk, keep_graphs=s.keep_graphs)

    @property
    def union_op(self) -> HessianOperator:
        if self._union is None:
            self._union = self.make(self.subset, **self._kw())
        return self._union

    def union(self, v: torch.Tensor) -> torch.Tensor:
        return self._product(self.union_op.matmat, v)

    def matmat(self, i: int) -> spectrum.MatMat:
        """Unit ``i``'s ``V`` ``(n_u, p)`` -> ``H_uu V``."""
        a, b = self.ranges[i]
        if self.settings.strategy == "per_unit":

            def own(v: torch.Tensor) -> torch.Tensor:
                if i not in self._unit_ops:
                    self._make_room()
                    self._unit_ops[i] = self.make(self.units[i].subset(), **self._kw())
                    self._last = self._unit_ops[i]
                return self._unit_ops[i].matmat(v)

            return lambda v: self._product(own, v)

        def restricted(v: torch.Tensor) -> torch.Tensor:
            full = torch.zeros(self.n, v.shape[1], dtype=F64)
            full[a:b] = v
            return self.union_op.matmat(full)[a:b].contiguous()

        return lambda v: self._product(restricted, v)

    def _make_room(self) -> None:
        """Before a new unit operator: keep the earlier units' operators (their graphs, reused when the unit's own
        stage follows its pilot probes) while their graphs fit :data:`GRAPH_MEMORY_FRACTION` of the free memory, else
        drop the most recently made ones (the pilot and the unit stages visit the units in the same order, so the
        first units' graphs stay and one slot turns over); operators that keep no graph go."""
        from ..products.autotune import free_memory
        from ..products.operator import GRAPH_MEMORY_FRACTION

        device = next(self.model.parameters()).device
        for i in [i for i, op in self._unit_ops.items() if not op.kept_graph_bytes()]:
            del self._unit_ops[i]  # no graphs kept (workers, finite differences): nothing to reuse
        while self._unit_ops:
            kept = sum(op.kept_graph_bytes() for op in self._unit_ops.values())
            one_more = kept / len(
                self._unit_ops
            )  # the next unit's graphs, guessed from the kept ones
            if kept + one_more <= GRAPH_MEMORY_FRACTION * (free_memory(device) + kept):
                return
            self._unit_ops.popitem()

    def release(self, i: int) -> None:
        """Unit ``i`` is done: its operator (and graphs) go."""
        self._unit_ops.pop(i, None)

    def report(self) -> dict[str, Any]:
        op = self._union or self._last
        return {
            "strategy": self.settings.strategy,
            "union_size": self.n,
            **(op.report() if op else {}),
        }


# ----------------------------------------------------------------------------- the sweep


def shared_trace_samples(
    matmat: spectrum.MatMat,
    n: int,
    ranges: Sequence[tuple[int, int]],
    p: int,
    first: int,
    seed: int,
) -> list[list[float]]:
    """``p`` shared Rademacher probes ``z`` (columns ``first .. first + p - 1`` of the global draw ``seed``) of an
    ``n x n`` symmetric ``H``: per block ``(a, b)`` of ``ranges`` the samples ``z[a:b] . (H z)[a:b]``, unbiased for
    ``tr(H[a:b, a:b])`` with variance ``2 sum_{i != j in block} H_ij^2 + sum_{k outside} ||H[a:b, k]||^2``."""
    from ..spectrum.vectors import local_space

    z = local_space(n).random(p, seed, "rademacher", first=first)
    hz = matmat(z)
    return [(z[a:b] * hz[a:b]).sum(0).tolist() for a, b in ranges]


KRYLOV_GAIN = 3.0
"""How much less the per-unit trace costs when deflated by the unit's Lanczos basis, against the pilot's plain
per-unit prediction: measured on the bundled model's 24 layers (b = 2, seqlen 64), the peers' plain Hutchinson needed
2640 probes for the standard errors the sweep reached with 780 (3.4x, rounded down; benchmarks/sweep.py)."""
KRYLOV_REASON = "the units run Lanczos, and the per-unit trace is deflated by its basis"


def _shared_round(products: UnitProducts, p: int, first: int, seed: int) -> list[list[float]]:
    """``p`` shared probes over the union: per unit, the samples ``z_u . (H z)_u``."""
    return shared_trace_samples(products.union, products.n, products.ranges, p, first, seed)


def sweep(
    model: nn.Module,
    samples: torch.Tensor,
    units: Sequence[Unit],
    quantities: Sequence[str],
    settings: SweepSettings = SweepSettings(),
    checkpoint: str = "",
    store: Store | None = None,
    progress: Callable[[str], None] | None = None,
    make_operator: Callable[..., HessianOperator] | None = None,
) -> SweepResult:
    """Every unit's ``quantities`` (:data:`QUANTITIES`) of the Hessian of the mean NLL over ``samples`` (``(b, seqlen)``).

    Stages, each kept in ``store`` under its key once finished (a resumed sweep recomputes only what is missing and,
    its products being deterministic, gets the same numbers): ``pilot`` (with ``trace``: ``min_probes`` shared probes,
    and ``min_probes`` per-unit probes per unit when ``trace_estimator="auto"``), ``shared`` (shared probes until every
    unit's trace reaches ``trace_rel``, when chosen), then ``unit:<name>`` per unit (per-unit probes, Lanczos, SLQ).
    A ``store`` with a pass log (:class:`PassStore`) also keeps every product of the unfinished stage, so a stage
    interrupted mid-way replays its finished products (same inputs, bitwise the same outputs) and computes the rest.
    ``checkpoint`` labels the rows; ``progress(stage)`` is called after each stage; ``make_operator(subset, **kw)``:
    how an operator is made (default :class:`lib.products.operator.HessianOperator` on ``model`` and ``samples``).

    Args:
        model: a prepared causal LM.
        samples: ``(b, seqlen)`` int64 token ids.
        units: the units (:func:`make_units`), at least one.
        quantities: names in :data:`QUANTITIES`.
        settings: probes, tolerances, Lanczos steps, strategy, seed and chunk (:class:`SweepSettings`).
        checkpoint: a label written in each row.
        store: where finished stages are kept for a resume; ``None``: in memory.
        progress: called with each finished stage's key, or ``None``.
        make_operator: ``make_operator(subset, **kw)`` makes the Hessian operator, or ``None``.

    Returns:
        The :class:`SweepResult`: one row per unit and quantity, the trace estimator's choice, the HVPs, the time.

    Raises:
        ParamError: unknown ``quantities``, ``settings`` out of range, or no ``units``.
    """
    t0 = time.perf_counter()
    quantities = check_quantities(quantities)
    settings.check()
    if not units:
        raise ParamError("units", "units is empty")
    prod = UnitProducts(model, samples, units, settings, make_operator)
    if store is not None and all(
        hasattr(store, m) for m in ("get_pass", "put_pass", "drop_passes")
    ):
        prod.log = store  # type: ignore[assignment]  # resume inside a stage: its finished products
    store = store if store is not None else MemoryStore()
    s = settings
    want_trace = "trace" in quantities
    want_probes = "frobenius" in quantities or "diagonal" in quantities
    shared_seed = unit_seed(s.seed, "<union>", "probes")
    krylov = (
        "top" in quantities or "bottom" in quantities
    )  # a Lanczos basis per unit: the deflated trace
    trace = _TraceStages({"chosen": None}, [[] for _ in units], [ProbeStats() for _ in units])

    def done(stage: str) -> None:
        if progress is not None:
            progress(stage)

    if want_trace:
        trace = _trace_stages(prod, units, s, store, shared_seed, krylov, trace.per_unit, done)
    trace_info, shared, pilot_per_unit = trace.info, trace.shared, trace.per_unit

    rows: list[Row] = []
    for i, u in enumerate(units):
        key = f"unit:{u.name}"
        got = store.get(key)
        if got is None:
            prod.begin(key)
            chosen = trace_info.get("chosen")
            got = _unit_rows(
                prod, i, u, quantities, s, chosen, pilot_per_unit[i], want_probes, checkpoint
            )
            store.put(key, got)
            prod.end(key)
            done(f"unit {u.name}")
        prod.release(i)
        unit_rows = list(got)
        if trace_info.get("chosen") == "shared":
            row = _shared_trace_row(checkpoint, u, shared[i], pilot_per_unit[i], trace, len(units))
            unit_rows.insert(0, row)
        rows.extend(unit_rows)
    # a resumed sweep's rows carry this run's checkpoint label
    rows = [
        r if r.checkpoint == checkpoint else Row(**{**r.as_dict(), "checkpoint": checkpoint})
        for r in rows
    ]
    return SweepResult(tuple(rows), trace_info, prod.hvps, time.perf_counter() - t0, prod.report())


@dataclass
class _TraceStages:
    """What the trace stages of :func:`sweep` leave: the trace estimator's choice and costs (``info``), the shared
    probes' samples per unit (``shared``), the pilot's per-unit probes (``per_unit``), the number of shared probes
    (``shared_hvps``) and the stages' seconds (``seconds``)."""

    info: dict[str, Any]
    shared: list[list[float]]
    per_unit: list[ProbeStats]
    shared_hvps: int = 0
    seconds: float = float("nan")
    paired: int = 0


def _shared_trace_row(
    cp: str, u: Unit, shared: list[float], pilot: ProbeStats, trace: _TraceStages, n_units: int
) -> Row:
    """Unit ``u``'s trace row from the shared probes combined with its own pilot probes; the HVPs count the union
    products and the unit's pilot probes, the seconds are the trace stages' share per unit."""
    m, se = combined_trace(shared, pilot.trace[trace.paired :])
    secs = trace.seconds / n_units
    k = trace.shared_hvps + pilot.count  # the union products and the unit's own pilot probes
    return _row(cp, u, "trace", m, se, "stderr", k, secs)


def _trace_stages(
    prod: UnitProducts,
    units: Sequence[Unit],
    s: SweepSettings,
    store: Store,
    shared_seed: int,
    krylov: bool,
    pilot_per_unit: list[ProbeStats],
    done: Callable[[str], None],
) -> _TraceStages:
    """The ``pilot`` stage (both estimators' variances, into ``pilot_per_unit`` when computed), the estimator's choice
    (:func:`_choose_estimator`) and, when ``shared`` is chosen, the ``shared`` stage; each stage read from ``store``
    when it is there, else computed and kept."""
    shared: list[list[float]] = [[] for _ in units]
    shared_hvps = 0
    got = store.get("pilot")
    if got is None:
        prod.begin("pilot")
        got = _pilot_stage(prod, units, s, shared_seed, shared, pilot_per_unit)
        # its measured seconds choose the estimator: under torchrun every rank takes rank 0's (RankStore.agree)
        got = getattr(store, "agree", lambda v: v)(got)
        store.put("pilot", got)
        prod.end("pilot")
        done("pilot")
    shared, pilot_per_unit = got["shared"], got["per_unit"]
    pilot_seconds = got["seconds"]
    trace_info = _choose_estimator(s, got, shared, pilot_per_unit, krylov)
    paired = int(got.get("paired", 0))
    if trace_info["chosen"] == "shared":
        got = store.get("shared")
        if got is None:
            prod.begin("shared")
            got = _shared_stage(prod, s, shared, pilot_per_unit, shared_seed, paired)
            store.put("shared", got)
            prod.end("shared")
            done("shared trace")
        shared = got["shared"]
        shared_hvps = len(shared[0])
        trace_info["shared_probes"] = shared_hvps
        pilot_seconds += got["seconds"]
    return _TraceStages(trace_info, shared, pilot_per_unit, shared_hvps, pilot_seconds, paired)


PAIRED = 2
"""Shared pilot probes under ``trace_estimator="auto"``: each is the concatenation of the units' own first pilot
probes, so its product minus the units' own products is ``H_{u,-u} z_{-u}``, whose squared norm estimates the
off-diagonal part of the shared estimator's variance (concentrated: one such norm sums ``n_u`` squares)."""


def _pilot_stage(
    prod: UnitProducts,
    units: Sequence[Unit],
    s: SweepSettings,
    shared_seed: int,
    shared: list[list[float]],
    pilot_per_unit: list[ProbeStats],
) -> dict[str, Any]:
    """The pilot: shared probes (unless ``per_unit`` is requested) and ``min_probes`` probes per unit into
    ``pilot_per_unit`` (unless ``shared`` is requested), with their HVPs and seconds (NaN where not run).

    Under ``auto`` the shared pilot is :data:`PAIRED` union probes made of the units' own first probes, and the shared
    estimator's per-probe variance of unit ``u`` is taken from its exact decomposition ``var_u + ||H_{u,-u}||_F^2``
    (the per-unit variance plus the off-diagonal blocks): ``var_u`` from the unit's pilot samples, the second term as
    the mean of ``||(H z)_u - H_uu z_u||^2`` over the paired probes (``"variance_shared"``). With ``shared``
    requested, ``min_probes`` shared probes of the shared draw, their sample variance."""
    tp = time.perf_counter()
    h0 = prod.hvps
    shared_s, unit_s = float("nan"), [float("nan")] * len(units)
    paired = min(PAIRED, s.min_probes) if s.trace_estimator == "auto" else 0
    seeds = [unit_seed(s.seed, u.name, "probes") for u in units]
    union_hz = None
    if s.trace_estimator == "shared":
        shared = _shared_round(prod, s.min_probes, 0, shared_seed)
        shared_s = time.perf_counter() - tp
    elif paired:
        shared, union_hz, last = _paired_round(prod, units, seeds, paired)
        shared_s = last * paired  # the union graph's build is paid once, whatever the probes
    off = [float("nan")] * len(units)
    if s.trace_estimator != "shared":
        for i, u in enumerate(units):
            tu = time.perf_counter()
            hz = probe_round(prod.matmat(i), u.size, pilot_per_unit[i], s.min_probes, seeds[i])
            unit_s[i] = time.perf_counter() - tu
            if union_hz is not None:
                a, b = prod.ranges[i]
                off[i] = float(((union_hz[a:b] - hz[:, :paired]) ** 2).sum(0).mean())
    var_shared = None
    if paired:
        var_shared = [mean_stderr(p.trace)[2] + o for p, o in zip(pilot_per_unit, off)]
    return {
        "shared": shared,
        "per_unit": pilot_per_unit,
        "shared_seconds": shared_s,
        "unit_seconds": unit_s,
        "hvps": prod.hvps - h0,
        "seconds": time.perf_counter() - tp,
        "paired": paired,
        "shared_probes": paired or (s.min_probes if s.trace_estimator == "shared" else 0),
        "variance_shared": var_shared,
    }


def _paired_round(
    prod: UnitProducts, units: Sequence[Unit], seeds: Sequence[int], p: int
) -> tuple[list[list[float]], torch.Tensor, float]:
    """``p`` union probes, each the concatenation of the units' own probe columns ``0 .. p - 1`` (draws ``seeds``):
    per unit the shared samples ``z_u . (H z)_u``, ``H z`` ``(n, p)`` and the last product's seconds."""
    from ..spectrum.vectors import local_space

    z = torch.cat([local_space(u.size).random(p, sd, "rademacher") for u, sd in zip(units, seeds)])
    cols, seconds = [], float("nan")
    for j in range(p):  # one at a time: the last one's time is a product's, without the graph build
        t = time.perf_counter()
        cols.append(prod.union(z[:, j : j + 1]))
        seconds = time.perf_counter() - t
    hz = torch.cat(cols, 1)
    return [(z[a:b] * hz[a:b]).sum(0).tolist() for a, b in prod.ranges], hz, seconds


def _choose_estimator(
    s: SweepSettings,
    got: dict[str, Any],
    shared: list[list[float]],
    pilot_per_unit: list[ProbeStats],
    krylov: bool,
) -> dict[str, Any]:
    """The trace estimator (``s.trace_estimator``, or for ``auto`` the one with the smaller cost per error) and its
    reasons, from the pilot ``got``: each unit's variance per probe ``v`` and mean, the probes ``v / (trace_rel *
    mean)^2`` each estimator needs (:func:`_predicted_run`: the run as it would go, capped by ``max_probes``), its
    predicted seconds at the pilot's time per product and the worst unit's relative variance of the mean ``e``; the
    score is ``seconds x e`` (the seconds to reach one fixed error if the error fell as ``1 / sqrt(seconds)``), so two
    runs that both stop at ``max_probes`` are compared at their errors, not only their seconds."""
    var_s = got.get("variance_shared") or [mean_stderr(x)[2] if x else float("nan") for x in shared]
    var_p = [mean_stderr(p.trace)[2] if p.count else float("nan") for p in pilot_per_unit]
    means = [  # the unit's own pilot mean where there is one (more probes than the shared pilot's)
        mean_stderr(p.trace)[0] if p.count else mean_stderr(x)[0]
        for x, p in zip(shared, pilot_per_unit)
    ]
    gain = KRYLOV_GAIN if krylov else 1.0  # the per-unit variance drop the deflation brings
    t_s = got["shared_seconds"] / (got.get("shared_probes") or s.min_probes)
    t_p = [t / s.min_probes for t in got["unit_seconds"]]
    shared_run = _predicted_run(s, var_s, means, [t_s], shared=True)
    unit_run = _predicted_run(s, [v / gain for v in var_p], means, t_p, shared=False)
    chosen, reason = s.trace_estimator, "requested"
    if chosen == "auto":
        chosen = "shared" if shared_run["score"] <= unit_run["score"] else "per_unit"
        reason = "smaller predicted seconds x worst relative variance (cost per error)" + (
            f" (per-unit variances divided by {KRYLOV_GAIN:g}: {KRYLOV_REASON})" if krylov else ""
        )

    def finite(x: float) -> float | None:
        return x if math.isfinite(x) else None

    return {
        "chosen": chosen,
        "requested": s.trace_estimator,
        "reason": reason,
        "pilot_probes": s.min_probes,
        "variance_shared": var_s,
        "variance_per_unit": var_p,
        "cost_shared": finite(shared_run["probes"]),
        "cost_per_unit": finite(unit_run["probes"]),
        "seconds_shared": finite(shared_run["seconds"]),
        "seconds_per_unit": finite(unit_run["seconds"]),
        "worst_rel_variance_shared": finite(shared_run["error"]),
        "worst_rel_variance_per_unit": finite(unit_run["error"]),
        "score_shared": finite(shared_run["score"]),
        "score_per_unit": finite(unit_run["score"]),
        "cost_unit": "the run each estimator would make: probes (to reach trace_rel on every unit, between "
        "min_probes and max_probes; shared: one union product serves every unit), their seconds at the pilot's "
        "time per product, the worst unit's predicted variance of the mean relative to its squared trace, and the "
        "score seconds x that variance; the estimator with the smaller score is chosen",
        "pilot_hvps": got["hvps"],
    }


def _predicted_run(
    s: SweepSettings,
    var: Sequence[float],
    means: Sequence[float],
    seconds: Sequence[float],
    shared: bool,
) -> dict[str, float]:
    """The run an estimator would make: the shared one takes the hardest unit's probes once for all units (each at
    ``seconds[0]``), the per-unit one each unit's own (at ``seconds[u]``), each between ``min_probes`` and
    ``max_probes``; its ``probes``, ``seconds``, the worst unit's ``error`` ``var / (probes x mean^2)`` and the
    ``score`` ``seconds x error``."""
    lo, hi = s.min_probes, s.max_probes
    need = [_need(v, m, s.trace_rel, lo) for v, m in zip(var, means)]
    probes = [min(max(need), hi)] * len(need) if shared else [min(k, hi) for k in need]
    errors = [v / (k * m * m) for v, k, m in zip(var, probes, means) if m != 0 and math.isfinite(v)]
    error = max(errors) if errors else math.inf
    secs = probes[0] * seconds[0] if shared else sum(k * t for k, t in zip(probes, seconds))
    total = probes[0] if shared else sum(probes)
    return {"probes": total, "seconds": secs, "error": error, "score": secs * error}


def _shared_stage(
    prod: UnitProducts,
    s: SweepSettings,
    shared: list[list[float]],
    pilot_per_unit: list[ProbeStats],
    shared_seed: int,
    paired: int = 0,
) -> dict[str, Any]:
    """Rounds of shared probes after the pilot's, until every unit's trace (shared and pilot probes combined)
    reaches ``trace_rel`` or ``max_probes`` are drawn; the samples per unit, HVPs and seconds."""
    tp = time.perf_counter()
    h0 = prod.hvps
    k = len(shared[0])
    while k < s.max_probes and not all(
        enough_combined(x, p.trace[paired:], s.trace_rel) for x, p in zip(shared, pilot_per_unit)
    ):
        p = min(s.probe_round, s.max_probes - k)
        for i, more in enumerate(_shared_round(prod, p, k, shared_seed)):
            shared[i] = shared[i] + more
        k += p
    return {
        "shared": shared,
        "hvps": prod.hvps - h0,
        "seconds": time.perf_counter() - tp,
    }


def _row(
    cp: str, u: Unit, q: str, est: float, err: float, kind: str, hvps: int, secs: float
) -> Row:
    return Row(
        cp,
        u.name,
        u.block,
        u.layer,
        u.head,
        u.size,
        q,
        float(est),
        float(err),
        kind,
        int(hvps),
        float(secs),
    )


class Recorder:
    """A ``matmat`` that keeps every block it was given and its product (the Lanczos basis ``Q`` and ``H Q``)."""

    def __init__(self, matmat: spectrum.MatMat):
        self.matmat, self.v, self.hv = matmat, [], []

    def __call__(self, v: torch.Tensor) -> torch.Tensor:
        hv = self.matmat(v)
        self.v.append(v)
        self.hv.append(hv)
        return hv


def deflated_trace_samples(
    matmat: spectrum.MatMat,
    n: int,
    q: torch.Tensor,
    hq: torch.Tensor,
    p: int,
    first: int,
    seed: int,
) -> list[float]:
    """``p`` samples of ``tr(Q^T H Q) + z'^T H z'``, ``z' = (I - Q Q^T) z`` for Rademacher ``z`` (columns ``first ..``
    of the draw ``seed``) and an orthonormal ``Q`` ``(n, m)`` with ``H Q`` (e.g. a Lanczos basis): each unbiased for
    ``tr(H)`` (``tr(H) = tr(P H P) + tr((I - P) H (I - P))`` for ``P = Q Q^T``, and ``Q`` does not depend on ``z``),
    with the variance of Hutchinson on the deflated ``(I - P) H (I - P)``: small when ``Q`` spans the dominant
    eigenvectors (the Hutch++ idea, Meyer et al. 2021, with the Krylov basis the eigenvalue search built anyway)."""
    from ..spectrum.vectors import local_space

    z = local_space(n).random(p, seed, "rademacher", first=first)
    for _ in range(2):
        z = z - q @ (q.T @ z)
    exact = float((q * hq).sum())
    return (exact + (z * matmat(z)).sum(0)).tolist()


def deflate_plain_samples(
    plain: Sequence[float], z: torch.Tensor, q: torch.Tensor, hq: torch.Tensor
) -> list[float]:
    """Plain Hutchinson samples ``z . H z`` (``z`` ``(n, p)``, drawn independently of ``Q``) turned into the deflated
    samples of :func:`deflated_trace_samples` without a product: for ``z' = (I - Q Q^T) z``, ``a = Q^T z`` and
    symmetric ``H``, ``z'^T H z' = z^T H z - 2 a^T (H Q)^T z + a^T (Q^T H Q) a`` (``Q^T H z = (H Q)^T z``), so each
    ``tr(Q^T H Q) + z'^T H z'`` is unbiased for ``tr(H)`` with the deflated variance. Returns ``p`` samples."""
    q64, hq64, z64 = q.to(F64), hq.to(F64), z.to(F64)
    a = q64.T @ z64  # (m, p)
    qhq = q64.T @ hq64
    qhq = (qhq + qhq.T) / 2
    zhz = torch.tensor(list(plain), dtype=F64)
    cross = (a * (hq64.T @ z64)).sum(0)
    inner = (a * (qhq @ a)).sum(0)
    return (float(qhq.trace()) + zhz - 2 * cross + inner).tolist()


def _unit_rows(
    prod: UnitProducts,
    i: int,
    u: Unit,
    quantities: tuple[str, ...],
    s: SweepSettings,
    trace_choice: str | None,
    pilot: ProbeStats,
    want_probes: bool,
    cp: str,
) -> list[Row]:
    """Unit ``i``'s rows (the shared trace excepted): Lanczos (its basis kept), the per-unit trace (Hutchinson deflated
    by that basis, the pilot's plain probes deflated too), the plain probes of ``frobenius`` / ``diagonal``, SLQ."""
    mm = prod.matmat(i)
    out: list[Row] = []
    per_unit_trace = "trace" in quantities and trace_choice == "per_unit"
    which = [w for w in ("top", "bottom") if w in quantities]
    basis: tuple[torch.Tensor, torch.Tensor] | None = None
    if which:
        basis = _lanczos_rows(mm, u, which, s, cp, out)
    stats = ProbeStats(list(pilot.trace), list(pilot.frob), pilot.diag_sum, pilot.diag_sq)
    seed = unit_seed(s.seed, u.name, "probes")
    if per_unit_trace:
        t = time.perf_counter()
        h0 = prod.hvps
        m, se = _per_unit_trace(mm, u, s, stats, seed, basis)
        k = prod.hvps - h0 + pilot.count
        out.insert(0, _row(cp, u, "trace", m, se, "stderr", k, time.perf_counter() - t))
    if want_probes:
        out.extend(_probe_rows(mm, u, quantities, s, stats, seed, cp))
    if "density" in quantities:
        out.extend(_density_rows(mm, u, s, cp))
    return out


def _lanczos_rows(
    mm: spectrum.MatMat, u: Unit, which: list[str], s: SweepSettings, cp: str, out: list[Row]
) -> tuple[torch.Tensor, torch.Tensor]:
    """Unit ``u``'s ``top`` / ``bottom`` eigenvalue rows (appended to ``out``) by Lanczos; its orthonormal basis
    ``Q`` ``(n, m)`` and ``H Q``."""
    t = time.perf_counter()
    rec = Recorder(mm)
    eig = spectrum.lanczos(
        rec,
        u.size,
        1,
        "both" if len(which) == 2 else {"top": "largest", "bottom": "smallest"}[which[0]],
        tol=s.tol,
        max_iter=s.max_iter,
        seed=unit_seed(s.seed, u.name, "lanczos"),
        eigenvectors=False,
    )
    secs = time.perf_counter() - t
    basis = (
        torch.cat(rec.v, dim=1),
        torch.cat(rec.hv, dim=1),
    )  # orthonormal: full reorthogonalization
    for j, w in enumerate(which):
        out.append(_row(cp, u, w, eig.eigenvalues[j], eig.residuals[j], "residual", eig.hvps, secs))
    return basis


def _per_unit_trace(
    mm: spectrum.MatMat,
    u: Unit,
    s: SweepSettings,
    stats: ProbeStats,
    seed: int,
    basis: tuple[torch.Tensor, torch.Tensor] | None,
) -> tuple[float, float]:
    """Unit ``u``'s trace and its standard error from its own probes: plain Hutchinson (more probes into ``stats``)
    without a Lanczos ``basis``, else deflated samples: the pilot's plain probes deflated without a product
    (:func:`deflate_plain_samples`), then new ones (:func:`deflated_trace_samples`) until ``trace_rel``."""
    if basis is None:  # plain Hutchinson
        if stats.count < s.min_probes:
            probe_round(mm, u.size, stats, s.min_probes - stats.count, seed)
        while stats.count < s.max_probes and not enough(stats.trace, s.trace_rel):
            probe_round(mm, u.size, stats, min(s.probe_round, s.max_probes - stats.count), seed)
        m, se, _ = mean_stderr(stats.trace)
    else:
        from ..spectrum.vectors import local_space

        dseed = unit_seed(s.seed, u.name, "deflated")
        q, hq = basis
        z = local_space(u.size).random(stats.count, seed, "rademacher", first=0)
        deflated = deflate_plain_samples(stats.trace, z, q, hq)  # the pilot's probes, no product
        q, hq, steps = _grown_basis(mm, q, hq, deflated, s)
        if steps:  # the pilot's probes deflated by the grown basis (still no product)
            deflated = deflate_plain_samples(stats.trace, z, q, hq)
        budget = s.max_probes - steps  # the steps came out of the trace's products
        k = 0  # deflated probes drawn here
        while (len(deflated) < 2 or not enough(deflated, s.trace_rel)) and (len(deflated) < budget):
            p = min(s.probe_round, max(2, budget - len(deflated)))
            deflated += deflated_trace_samples(mm, u.size, q, hq, p, k, dseed)
            k += p
        m, se, _ = mean_stderr(deflated)
    return m, se


def _grown_basis(
    mm: spectrum.MatMat,
    q: torch.Tensor,
    hq: torch.Tensor,
    deflated: Sequence[float],
    s: SweepSettings,
) -> tuple[torch.Tensor, torch.Tensor, int]:
    """The Lanczos basis ``q`` grown by Krylov steps while each removes more of the trace's variance than a probe would
    (:func:`lib.spectrum.deflation.grow_for_trace`), judged from the pilot's ``deflated`` samples (their variance and
    mean, the target ``trace_rel``); ``(q, hq, steps)``."""
    from ..spectrum.deflation import grow_for_trace

    if len(deflated) < 2:
        return q, hq, 0
    mean, _, var = mean_stderr(deflated)
    return grow_for_trace(mm, q, hq, var, len(deflated), (s.trace_rel * mean) ** 2, s.max_probes)


def _probe_rows(
    mm: spectrum.MatMat,
    u: Unit,
    quantities: tuple[str, ...],
    s: SweepSettings,
    stats: ProbeStats,
    seed: int,
    cp: str,
) -> list[Row]:
    """Unit ``u``'s ``frobenius`` / ``diagonal`` rows from plain probes (more drawn into ``stats`` until the
    Frobenius norm reaches ``trace_rel``, at least ``2 min_probes``, at most ``max_probes``)."""
    out: list[Row] = []
    t = time.perf_counter()
    if stats.count < s.min_probes:
        probe_round(mm, u.size, stats, s.min_probes - stats.count, seed)
    while stats.count < s.max_probes and not (
        stats.count >= 2 * s.min_probes and enough(stats.frob, s.trace_rel)
    ):  # ||Hz||^2 is skewed: its standard error needs more probes than its relative target suggests
        probe_round(mm, u.size, stats, min(s.probe_round, s.max_probes - stats.count), seed)
    secs, k = time.perf_counter() - t, stats.count
    if "frobenius" in quantities:
        out.append(_row(cp, u, "frobenius", *frobenius_row(stats), "stderr", k, secs))
    if "diagonal" in quantities:
        for q_, (est, err) in diagonal_rows(stats).items():
            out.append(_row(cp, u, q_, est, err, "stderr", k, secs))
    return out


def _density_rows(mm: spectrum.MatMat, u: Unit, s: SweepSettings, cp: str) -> list[Row]:
    """Unit ``u``'s spectral density rows (:func:`density_rows`) by SLQ."""
    t = time.perf_counter()
    d = spectrum.slq(
        mm,
        u.size,
        s.slq_probes,
        s.lanczos_steps,
        seed=unit_seed(s.seed, u.name, "slq"),
        grid_points=2,
    )
    secs = time.perf_counter() - t
    return [
        _row(cp, u, q_, est, err, "stderr", d.hvps, secs)
        for q_, (est, err) in density_rows(d).items()
    ]
