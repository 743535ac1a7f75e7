"""Finite-difference Hessian-vector products from first-order gradients: pure functions over a gradient callable.

For a smooth ``f`` with gradient ``g = grad f`` (each ``g`` one forward and one first-order backward, no graph kept)::

    D(e) = (g(x0 + e v) - g(x0 - e v)) / (2 e) = H v + (e^2 / 6) T[v, v, .] + O(e^4)      (central difference)
    R(e) = (4 D(e / 2) - D(e)) / 3              = H v + O(e^4)                            (Richardson, 4 gradients)

with ``T`` the third-derivative tensor. **Step.** The gradients are rounded to the model's dtype (machine
epsilon ``eps``), so their difference carries an absolute error ``~ eps |g| / e`` that the step balances against
the truncation: ``e = h s / ||v||`` with ``s = ||x0||`` the norm of the subset's own weights (so the weights move
by the fraction ``h`` of their size, whatever the scale of ``v``; ``s = sqrt(n)`` when ``x0 = 0``) and
``h = eps^(1/3)`` (central) or ``eps^(1/5)`` (Richardson), the minimisers of ``eps / h + h^2`` and ``eps / h + h^4``.

**ReLU kinks** (OPT's feed-forward). ``g`` jumps where a ReLU's input crosses 0, and the exact HVP (double
backward) is the almost-everywhere second derivative, which does not see those jumps. A perturbation of
relative size ``h`` moves each of the ``N`` ReLU inputs of a pass by about ``h`` of its size, so about ``c h N``
of them cross 0, and each crossing adds a *finite* jump of the gradient divided by ``2 e``: one crossing alone
ruins the product (on the embedded OPT, whole model, float64: no crossing and relative error 4e-10 at
``h = 1e-6``; 3 crossings and error 15 at ``h = 1e-5``). The step is therefore *kink-aware*: while the two
evaluations of a central difference see a different sign pattern at the inputs of the model's kinked
activation modules (:class:`KinkMonitor`, forward hooks, nothing patched), the product is redone with ``h``
divided by ``4 c`` (``c`` crossings; crossings scale with ``h``), down to ``MIN_STEP_EPS * eps``; the
retries and any crossings left are counted (:class:`FDStats`) and reported. When even that smallest step
would still see crossings (``c`` times the step ratio at least 1: large ReLU models in float32 or bf16,
e.g. OPT-125M in float32 with about 9 crossings per sample at ``h = 1e-6``), no step avoids them and the
first product is kept (its expected kink error, ``~ c |jump| / 2e``, does not shrink with ``e``, while its
rounding error does): such products approximate the Hessian of the loss smoothed over the step, not the
almost-everywhere Hessian, and the JSON's ``crossings_left`` says so. Smooth activations (Llama's SiLU,
GPT-2's GELU) have no monitor and never retry. Each product restarts from the default step, so a product
depends only on its inputs (replays and ranks agree).

Nothing here modifies a tensor it is given: perturbed points are new tensors (:func:`perturbed`), so a
caller that substitutes them with :func:`torch.func.functional_call` leaves the stored weights bitwise
unchanged; a caller that writes them into the weights in place (FSDP shards, :mod:`lib.products.fsdp`) restores the
saved bits afterwards.
"""

from __future__ import annotations

import contextlib
import math
import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from .. import constants
from .base import Products

GradFn = Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]]
"""``grad(x) -> (grad f(x), f(x))``: ``x`` of the model's dtype (``(n,)``, or a rank's shard), the gradient alike."""
Progress = Callable[[int], None]
Reduce = Callable[[int], int]
"""Sums an integer over the processes that take one product together (torchrun ranks); the identity in one process."""

HVP_METHODS = constants.HVP_METHODS
"""``exact``: double backward on the gradient's graph (:mod:`lib.products.operator`); ``finite_difference``: this module."""
MAX_RELATIVE_STEP = 1.0
"""``--fd_step`` must be below this: a relative step ``h`` moves the weights by ``h`` times their own norm, so at 1 the
difference spans more than the weights themselves (and a float32 step of 1e40 overflowed); refused before any work."""
MIN_STEP_EPS = 8.0
"""The kink-aware step is not reduced below ``MIN_STEP_EPS * eps`` (relative): there the rounding error ``~ eps / h`` is ~1/8."""
KINKS: dict[type, Callable[[nn.Module], tuple[float, ...]]] = {
    nn.ReLU: lambda m: (0.0,),
    nn.LeakyReLU: lambda m: (0.0,),
    nn.PReLU: lambda m: (0.0,),
    nn.ReLU6: lambda m: (0.0, 6.0),
    nn.Hardtanh: lambda m: (m.min_val, m.max_val),
}
"""Activation modules whose derivative jumps, and where (the inputs at which it does)."""


MEASURED_ERROR = {
    "float64": {
        "hvp_q_proj": 5.1e-10,
        "hvp_whole_model": 6.9e-10,
        "top3_eigenvalues_q_proj": 1.1e-9,
    },
    "float32": {"hvp_q_proj": 2.7e-2, "hvp_whole_model": 4.8e-2, "top3_eigenvalues_q_proj": 2.9e-3},
    "bfloat16": {"hvp_q_proj": 0.68, "hvp_whole_model": 0.47, "top3_eigenvalues_q_proj": 0.56},
}
"""Relative error of central differences with the default step against exact float64 products, measured on the embedded
OPT (ReLU; 2 samples of 128 tokens; block-0 ``q_proj`` and the whole model) by ``benchmarks/scale.py`` (``errors``,
``eig_errors``): float32 products are limited by rounding at the kink-free step, bf16 ones by kink crossings no step
avoids. Written into every JSON that used finite differences."""


@dataclass(frozen=True)
class FDSettings:
    """How finite-difference products are taken: ``richardson`` (4 gradients per product instead of 2) and the
    relative step ``h`` (``None``: :func:`default_relative_step` of the dtype)."""

    richardson: bool = False
    relative_step: float | None = None

    def h(self, dtype: torch.dtype) -> float:
        """The (starting) relative step for ``dtype``."""
        return (
            self.relative_step
            if self.relative_step is not None
            else default_relative_step(dtype, self.richardson)
        )

    def describe(self, dtype: torch.dtype) -> dict:
        """The settings, for checkpoint configurations."""
        return {
            "hvp": "finite_difference",
            "richardson": self.richardson,
            "relative_step": self.h(dtype),
            "relative_step_given": self.relative_step is not None,
        }

    def report(self, dtype: torch.dtype, stats: FDStats | None = None) -> dict:
        """For JSON sidecars: the settings and the error measured for ``dtype`` (:data:`MEASURED_ERROR`) -- unless
        ``stats`` shows kink crossings left in the products (:func:`kink_note`): then no error is quoted."""
        name = str(dtype).removeprefix("torch.")
        measured = (
            {
                **MEASURED_ERROR[name],
                "source": "embedded OPT (ReLU), default central step, benchmarks/README.md",
            }
            if name in MEASURED_ERROR
            else None
        )
        note = kink_note(stats) if stats is not None else None
        if note is None:
            return {**self.describe(dtype), "measured_error_embedded": measured}
        return {**self.describe(dtype), "measured_error_embedded": None, "error_unknown": note}


_WARNED: set[str] = set()


def kink_note(stats: FDStats) -> str | None:
    """Why no error is quoted for products that kept kink crossings (``None`` when none was left), warned once on
    stderr (rank 0). Each crossing adds a finite jump of the gradient divided by the step, so such products
    approximate the Hessian of the loss smoothed over the step, and the error of :data:`MEASURED_ERROR` (measured
    where no crossing was left) says nothing about theirs (on OPT-125M in float32: 131,149 crossings, top
    eigenvalue 43.04 against an exact 109.76)."""
    if stats.crossings_left <= 0:
        return None
    note = (
        f"{stats.crossings_left:,} kink crossings were left in the finite-difference products (no step avoided "
        "them): they approximate the Hessian of the loss smoothed over the step, with an unknown error (none "
        "is quoted); use --dtype float64 or --hvp exact"
    )
    from ..runtime.ranks import this_rank

    if note not in _WARNED and this_rank() == 0:
        _WARNED.add(note)
        print(f"warning: {note}", file=sys.stderr, flush=True)
    return note


@dataclass
class FDStats:
    """What the kink-aware step did: ``products`` taken, ``retries`` (products redone with a smaller step), ``crossings_left``
    (kink crossings in products that reached the smallest step), ``min_relative_step`` used (``inf``: none)."""

    products: int = 0
    retries: int = 0
    crossings_left: int = 0
    min_relative_step: float = math.inf

    def add(self, other: FDStats) -> None:
        self.products += other.products
        self.retries += other.retries
        self.crossings_left += other.crossings_left
        self.min_relative_step = min(self.min_relative_step, other.min_relative_step)

    def as_tensors(self) -> dict[str, torch.Tensor]:
        """The counts as additive partial sums (float64 scalars; the smallest step is not additive and stays out)."""
        return {
            "fd_products": torch.tensor(float(self.products), dtype=torch.float64),
            "fd_retries": torch.tensor(float(self.retries), dtype=torch.float64),
            "fd_crossings_left": torch.tensor(float(self.crossings_left), dtype=torch.float64),
        }

    @classmethod
    def from_sums(cls, sums: dict[str, torch.Tensor]) -> FDStats:
        return cls(
            int(sums.get("fd_products", 0)),
            int(sums.get("fd_retries", 0)),
            int(sums.get("fd_crossings_left", 0)),
        )

    def to_json(self) -> dict:
        return {
            "products": self.products,
            "retries": self.retries,
            "crossings_left": self.crossings_left,
            "min_relative_step": None
            if math.isinf(self.min_relative_step)
            else self.min_relative_step,
        }


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """Where differences are formed: float64 for float64 models, else float32 (exact for the difference of two bf16 / fp16 numbers)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def default_relative_step(dtype: torch.dtype, richardson: bool = False) -> float:
    """``h = eps^(1/3)`` (central) or ``eps^(1/5)`` (Richardson), ``eps`` the machine epsilon of ``dtype``."""
    return torch.finfo(dtype).eps ** (1 / 5 if richardson else 1 / 3)


def underflow_message(h: float, dtype: torch.dtype) -> str | None:
    """Why the relative step ``h`` cannot work in ``dtype`` (``None`` if it can): a perturbation at or below the dtype's
    rounding of the weights (``h <= eps``) is lost when added to them; ``h`` must also be positive, finite and below
    :data:`MAX_RELATIVE_STEP`."""
    if not (h > 0 and math.isfinite(h)):
        return f"the finite-difference step must be positive and finite, got {h}"
    if h >= MAX_RELATIVE_STEP:
        return (
            f"finite-difference step {h:g} is not below {MAX_RELATIVE_STEP:g}: the step is relative, the weights "
            f"move by {h:g} times their own norm (the default for {str(dtype).removeprefix('torch.')} is "
            f"{default_relative_step(dtype):.3g})"
        )
    eps = torch.finfo(dtype).eps
    if h <= eps:
        name = str(dtype).removeprefix("torch.")
        return f"finite-difference step {h:g} underflows {name}: a relative perturbation at or below its machine epsilon {eps:.3g} is lost when added to the weights; use a step above {eps:.3g} (the default for {name} is {default_relative_step(dtype):.3g})"
    return None


def step(x0_norm: float, v_norm: float, n: int, h: float) -> float:
    """The absolute step ``e`` along ``v``: ``||e v|| = h * s``, ``s = ||x0||`` (``sqrt(n)`` when ``x0 = 0``)."""
    if v_norm == 0:
        return 0.0
    scale = x0_norm if x0_norm > 0 else math.sqrt(n)
    return h * scale / v_norm


def perturbed(x0: torch.Tensor, v: torch.Tensor, e: float) -> torch.Tensor:
    """A new tensor ``x0 + e v`` in ``x0``'s dtype, formed in the accumulation dtype (``x0`` is not modified; one fused
    pass when ``v`` is already in that dtype on ``x0``'s device, as :func:`fd_products` arranges)."""
    acc = accumulation_dtype(x0.dtype)
    v = v.to(device=x0.device, dtype=acc)
    if x0.dtype == acc:
        return torch.add(x0, v, alpha=e)
    return torch.add(x0.to(acc), v, alpha=e).to(x0.dtype)


class KinkMonitor:
    """Records, while active, on which side of its kinks each input of the model's kinked activation modules (:data:`KINKS`)
    lies (forward hooks; nothing is patched). ``kinked``: the model has such modules. Use as a context manager."""

    def __init__(self, model: nn.Module):
        self.modules = [(m, KINKS[type(m)](m)) for m in model.modules() if type(m) in KINKS]
        self.kinked = bool(self.modules)
        self.records: list[torch.Tensor] = []
        self._handles: list = []

    def __enter__(self) -> KinkMonitor:
        for m, points in self.modules:
            self._handles.append(
                m.register_forward_hook(
                    lambda mod, inp, out, p=points: self.records.append(sides(inp[0], p))
                )
            )
        return self

    def __exit__(self, *exc) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()
        self.records.clear()

    def take(self) -> list[torch.Tensor]:
        """The records since the last call (in call order), and forget them."""
        out, self.records = self.records, []
        return out


def sides(a: torch.Tensor, points: tuple[float, ...]) -> torch.Tensor:
    """``uint8`` code of the interval between ``points`` (sorted) in which each entry of ``a`` lies."""
    code = torch.zeros(a.shape, dtype=torch.uint8, device=a.device)
    for p in points:
        code += (a.detach() > p).to(torch.uint8)
    return code


def crossings(before: list[torch.Tensor], after: list[torch.Tensor]) -> int:
    """How many recorded activation inputs changed side of a kink between two evaluations (same calls, same order)."""
    if len(before) != len(after):
        raise RuntimeError(
            f"the two evaluations called the kinked activations {len(before)} and {len(after)} times"
        )
    return sum(int((a != b).sum()) for a, b in zip(before, after))


def central_difference(
    grad: GradFn, x0: torch.Tensor, v: torch.Tensor, e: float, monitor: KinkMonitor | None = None
) -> tuple[torch.Tensor, torch.Tensor, int]:
    """``(D(e), (f(x0 + e v) + f(x0 - e v)) / 2, kink crossings)``: the central difference of ``grad`` along ``v``
    (accumulation dtype); crossings are counted by ``monitor`` (0 without one)."""
    acc = accumulation_dtype(x0.dtype)
    watch = monitor is not None and monitor.kinked
    if watch:
        monitor.take()
    g_plus, f_plus = grad(perturbed(x0, v, e))
    g_plus = g_plus.to(acc)
    before = monitor.take() if watch else []
    g_minus, f_minus = grad(perturbed(x0, v, -e))
    crossed = crossings(before, monitor.take()) if watch else 0
    d = g_plus.sub_(g_minus.to(acc)).div_(2 * e)
    return d, (f_plus.detach().to(acc) + f_minus.detach().to(acc)) / 2, crossed


def richardson(d_e: torch.Tensor, d_half: torch.Tensor) -> torch.Tensor:
    """``(4 D(e/2) - D(e)) / 3``: cancels the ``e^2`` term of two central differences (error ``O(e^4)``)."""
    return (4 * d_half - d_e) / 3


def fd_hvp(
    grad: GradFn,
    x0: torch.Tensor,
    v: torch.Tensor,
    e: float,
    use_richardson: bool = False,
    monitor: KinkMonitor | None = None,
    min_e: float = 0.0,
    reduce: Reduce = int,
) -> tuple[torch.Tensor, torch.Tensor, FDStats, float]:
    """``(H v, f(x0) + O(e^2), stats, step used)`` by a central difference with step ``e`` (2 gradients), or Richardson
    over ``e`` and ``e / 2`` (4 gradients). With a ``monitor``, a product whose evaluations cross ``c`` kinks (summed over
    the processes by ``reduce``) is redone with ``max(e / (4 c), min_e)`` until none cross or ``min_e`` is reached; when even
    ``min_e`` would see a crossing (``c min_e / e >= 1``) the first product is kept, as its expected kink error is no larger. ``e = 0`` (``v = 0``): zeros."""
    acc = accumulation_dtype(x0.dtype)
    stats = FDStats(products=1)
    if e == 0:
        return (
            torch.zeros(x0.shape, dtype=acc, device=x0.device),
            torch.full((), float("nan"), dtype=acc),
            stats,
            e,
        )
    while True:
        d, value, crossed = central_difference(grad, x0, v, e, monitor)
        if use_richardson:
            d_half, _, crossed_half = central_difference(grad, x0, v, e / 2, monitor)
            d, crossed = richardson(d, d_half), crossed + crossed_half
        crossed = reduce(crossed)
        if (
            crossed == 0 or e <= min_e or crossed * min_e / e >= 1
        ):  # none, or unavoidable: crossings scale with e
            stats.crossings_left = crossed
            return d, value, stats, e
        e = max(e / (4 * crossed), min_e)
        stats.retries += 1


def fd_products(
    grad: GradFn,
    x0: torch.Tensor,
    vt: torch.Tensor,
    settings: FDSettings,
    progress: Progress | None = None,
    monitor: KinkMonitor | None = None,
    x0_norm: float | None = None,
    reduce: Reduce = int,
    norm: Callable[[torch.Tensor], float] | None = None,
    n: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor, FDStats]:
    """``(H v_r for each row v_r of vt ((p, n)) -> (p, n), f(x0) + O(e^2), stats)``: one :func:`fd_hvp` per row, each
    starting from the step of :func:`step` (``x0_norm``: given, else ``||x0||``; ``norm(v)``: the norm of a row, given
    for sharded rows, else ``||v||``; ``n``: the global size, given for shards). Costs ``2 p`` gradients (``4 p`` with
    Richardson) plus the kink retries."""
    acc = accumulation_dtype(x0.dtype)
    h = settings.h(x0.dtype)
    n = x0.numel() if n is None else n
    s = float(x0.to(acc).norm()) if x0_norm is None else x0_norm
    norm = norm or (lambda v: float(v.to(acc).norm()))
    min_h = MIN_STEP_EPS * torch.finfo(x0.dtype).eps
    out = torch.empty(vt.shape, dtype=acc, device=x0.device) if vt.shape[0] > 1 else None
    value = torch.full((), float("nan"), dtype=acc)
    stats = FDStats()
    for r in range(vt.shape[0]):
        v = vt[r].to(device=x0.device, dtype=acc)  # once per product, not per perturbation
        vn = norm(v)
        e = step(s, vn, n, h)
        hv, val, st, used = fd_hvp(
            grad, x0, v, e, settings.richardson, monitor, step(s, vn, n, min_h), reduce
        )
        if out is None:
            out = hv.unsqueeze(0)  # a single product: no copy
        else:
            out[r] = hv
        if e > 0:
            st.min_relative_step = h * used / e
        stats.add(st)
        if not bool(torch.isfinite(value)):
            value = val
        if progress is not None:
            progress(1)
    if out is None:
        out = torch.empty(vt.shape, dtype=acc, device=x0.device)
    return out, value, stats


def gradient_of(fn: Callable[[torch.Tensor], torch.Tensor]) -> GradFn:
    """``x -> (grad fn(x), fn(x))`` by one first-order backward (no graph kept), on a leaf copy of ``x``."""

    def grad(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = x.detach().requires_grad_(True)
        value = fn(x)
        (g,) = torch.autograd.grad(value, x)
        return g, value.detach()

    return grad


# ----------------------------------------------------------------------------- the product method


class FDGraph:
    """What one batch's finite-difference products start from (this method's :class:`lib.products.operator.BatchGraph`): the point
    ``x`` (``x0`` itself, never modified), ``grad`` (one first-order gradient per call, no graph kept), the kink ``monitor``
    (``None``: none) and ``stats``, the counts of the products taken on it. ``g`` (the gradient at ``x0``, one gradient) and
    ``value`` (``f(x0)``, one forward) are computed on first use; when a product comes first, ``value`` is its
    ``(f(x0 + e v) + f(x0 - e v)) / 2 = f(x0) + O(e^2)`` (no extra pass)."""

    def __init__(
        self,
        fn: Callable[[torch.Tensor], torch.Tensor],
        x0: torch.Tensor,
        monitor: KinkMonitor | None = None,
    ):
        self.fn, self.x, self.monitor = fn, x0, monitor
        self.grad = gradient_of(fn)
        self.stats = FDStats()
        self.x0_norm: float | None = None
        self._g: torch.Tensor | None = None
        self._value: torch.Tensor | None = None

    @property
    def g(self) -> torch.Tensor:
        if self._g is None:
            self._g, value = self.grad(self.x)
            self._value = value if self._value is None else self._value
        return self._g

    @property
    def value(self) -> torch.Tensor:
        if self._value is None:
            with torch.no_grad():
                self._value = self.fn(self.x).detach()
        return self._value

    def watch(self, model: nn.Module) -> None:
        """Watch ``model``'s kinked activations (:class:`KinkMonitor`) in the products taken on this graph."""
        self.monitor = KinkMonitor(model)

    def sums(self) -> dict[str, torch.Tensor]:
        """The counts as additive partial sums (:meth:`FDStats.as_tensors`)."""
        return self.stats.as_tensors()


@dataclass(frozen=True)
class FiniteDifference(Products):
    """The :class:`lib.products.operator.Products` of finite differences: each ``H v`` from two (Richardson: four) first-order
    gradients of the batch's loss (:func:`fd_products`, kink-aware once :meth:`FDGraph.watch` names the model). One
    vector at a time (``batched = False``: no chunk to choose); no double backward (``double_backward = False``: SDPA
    keeps its fused kernels); nothing kept between passes (``keeps_graphs = False``); vectors in
    :func:`accumulation_dtype` (``vector_dtype``: float32 for a bf16 model)."""

    settings: FDSettings = FDSettings()
    exact: ClassVar[bool] = False
    batched: ClassVar[bool] = False
    double_backward: ClassVar[bool] = False
    keeps_graphs: ClassVar[bool] = False
    """Nothing to keep between passes (no graph; a batch's :class:`FDGraph` counts its own products)."""

    @property
    def name(self) -> str:
        s = self.settings
        return f"finite_difference(richardson={s.richardson}, relative_step={s.relative_step})"

    def vector_dtype(self, dtype: torch.dtype) -> torch.dtype:
        return accumulation_dtype(dtype)

    def watch(self, graph: FDGraph, model: nn.Module) -> None:
        graph.watch(model)

    def graph_sums(self, graph: FDGraph) -> dict[str, torch.Tensor]:
        return graph.sums()

    def stats(self, sums: dict[str, torch.Tensor] | None) -> FDStats:
        return FDStats.from_sums(sums or {})

    @property
    def fd_settings(self) -> FDSettings:
        return self.settings

    def graph(self, fn: Callable[[torch.Tensor], torch.Tensor], x0: torch.Tensor) -> FDGraph:
        return FDGraph(fn, x0)  # the job's model is watched through FDGraph.watch

    def __call__(
        self,
        graph: FDGraph,
        rows,
        count: int,
        sink,
        chunk: int = 1,
        progress: Progress | None = None,
        start: int = 0,
    ) -> int:
        x = graph.x
        if (
            graph.x0_norm is None
        ):  # in float64, as the sharded operator's (lib.products.fsdp): the same steps
            graph.x0_norm = float(x.to(torch.float64).norm())
        with graph.monitor if graph.monitor is not None else contextlib.nullcontext():
            for a in range(start, count):
                v = rows(a, a + 1)
                hv, value, stats = fd_products(
                    graph.grad, x, v, self.settings, progress, graph.monitor, x0_norm=graph.x0_norm
                )
                graph.stats.add(stats)
                if graph._value is None:
                    graph._value = value
                sink(a, v, hv)
        return chunk

    def report(
        self,
        dtype: torch.dtype,
        stats: FDStats | None,
        counted: str = "per batch of model_input_bs samples",
    ) -> dict:
        """For JSON sidecars: the settings, the measured error for ``dtype`` (none with kink crossings left) and the
        kink-retry counts."""
        assert stats is not None
        return {**self.settings.report(dtype, stats), **stats.to_json(), "counted": counted}


def exact_script_report(
    products: Products, hessian: torch.Tensor, sums: dict[str, torch.Tensor]
) -> dict:
    """For the exact scripts' JSON when ``--hvp finite_difference`` made the matrix: the settings, the kink-retry counts,
    ``approximate: True`` and the relative asymmetry ``||H - H^T||_F / ||H||_F`` of the rows ``H e_i`` (an error indicator:
    the exact Hessian is symmetric)."""
    h = hessian.to(torch.float64)
    asym = float((h - h.T).norm() / h.norm()) if bool(h.norm() > 0) else 0.0
    return {
        **products.report(hessian.dtype, FDStats.from_sums(sums)),
        "approximate": True,
        "relative_asymmetry": asym,
    }
