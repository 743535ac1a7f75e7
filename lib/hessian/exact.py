"""Exact Hessians of the additive loss with respect to a flat subset ``x``.

Over samples ``X_1..X_b`` (each ``(seqlen,)``), ``f(x) = sum_k f(x; X_k)`` (see :mod:`lib.objective.loss`), so
``H = sum_k H_k`` with ``H_k = d^2 f(x; X_k) / dx^2`` evaluated at ``x0``; memory does not grow with ``b``.
The stored result is normalized to the Hessian of the *mean* next-token NLL:
``H / (b * (seqlen - 1))``.

Methods (all exact up to floating point):

* ``autograd`` -- the paper's reference, :func:`torch.autograd.functional.hessian` per batch.
* ``rev-rev`` (default) -- reverse-over-reverse: one forward and one ``create_graph`` backward per
  batch give ``g = grad f``; then row ``i`` of ``H`` is the vector-Jacobian product ``e_i^T dg/dx``,
  computed for ``chunk`` unit vectors at a time (``is_grads_batched``) on the retained graph by
  :func:`lib.products.operator.hvp_products`. The
  frozen part of the network (everything that does not depend on ``x``) is evaluated once per batch
  and never differentiated, and the LM head + softmax use the fused kernel of :mod:`lib.objective.loss`.

  Through the layers' outputs (``space``, :func:`products_space`): when the subset's entries are weights of plain,
  unshared linear layers whose inputs do not depend on it (:class:`lib.objective.loss.LayerOutputs`), and ``seqlen`` times
  the selected output units is fewer than the entries, ``H = sum_b J_b^T H_{z,b} J_b`` exactly, ``z`` the selected
  units of the layers' outputs and ``J = dz/dx`` constant: one product per (position, unit) instead of one per
  entry. Otherwise (or if a layer's input turns out to depend on the subset) the entries, as above.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from .. import constants
from ..model.models import ModelSpec
from ..objective.loss import LayerOutputs, SubsetLoss
from ..objective.subsets import Subset
from ..products.autotune import Compute
from ..products.operator import (
    BatchGraph,
    ChunkPolicy,
    ProductJob,
    Products,
    Sink,
    gradient_graph,
    graph_sums,
    hvp_products,
    store_rows,
    unit_rows,
)
from ..runtime.jobs import run_serial
from ..runtime.library_defaults import settle

METHODS = constants.METHODS

Progress = Callable[[int], None]
"""Called with the number of Hessian columns just finished."""


def _unit_rows(n: int, start: int, stop: int, like: torch.Tensor) -> torch.Tensor:
    """Rows ``start..stop-1`` of the ``n x n`` identity, shape ``(stop-start, n)``."""
    e = torch.zeros(stop - start, n, dtype=like.dtype, device=like.device)
    e[torch.arange(stop - start), torch.arange(start, stop)] = 1
    return e


Schedule = Callable[[Compute, int], None]
"""``schedule(compute, n)``: computes rows ``0..n-1`` through ``compute(start, stop, chunk)``, choosing the chunk
(e.g. :meth:`lib.products.operator.ChunkPolicy.run`, which measures it on the first rows and keeps them)."""


def hessian_rev_rev(
    fn: Callable[[torch.Tensor], torch.Tensor],
    x0: torch.Tensor,
    chunk: int = 1,
    progress: Progress | None = None,
    schedule: Schedule | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact Hessian of scalar ``fn`` at ``x0`` (shape ``(n,)``) by reverse-over-reverse; returns ``(H (n, n), fn(x0))``.

    Row ``i`` is ``H e_i = d/dx (e_i . grad fn(x))``: the unit vectors go through the library's one
    Hessian-vector primitive :func:`lib.products.operator.hvp_products` (``chunk`` rows per batched backward,
    halved on CUDA out-of-memory). With ``schedule`` the chunk is chosen by it instead.

    Args:
        fn: a twice-differentiable scalar function of a flat tensor of shape ``(n,)``.
        x0: ``(n,)`` the point (floating; float64 where exactness matters).
        chunk: unit vectors per batched backward.
        progress: called with the number of rows each batched backward did, or ``None``.
        schedule: ``schedule(compute, n)`` chooses the chunk instead of ``chunk`` (:data:`Schedule`), or ``None``.

    Returns:
        ``(H, value)``: the Hessian ``(n, n)`` in ``x0``'s dtype and device, and ``fn(x0)`` (0-d, detached).
    """
    x, g, value = gradient_graph(fn, x0)
    n = x.numel()
    rows = torch.empty(n, n, dtype=x.dtype, device=x.device)

    def take(a: int, v: torch.Tensor, hv: torch.Tensor) -> None:
        rows[a : a + len(hv)] = hv

    def compute(start: int, stop: int, c: int) -> int:  # rows start..stop-1, c per batched backward
        return hvp_products(
            g, x, lambda a, b: _unit_rows(n, a, b, x), stop, take, c, progress, start=start
        )

    if schedule is None:
        compute(0, n, chunk)
    else:
        schedule(compute, n)
    return rows, value.detach()


def hessian_reference(
    fn: Callable[[torch.Tensor], torch.Tensor], x0: torch.Tensor, progress: Progress | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """The paper's method: ``torch.autograd.functional.hessian(fn, x0)``; returns ``(H, fn(x0))``."""
    h = torch.autograd.functional.hessian(fn, x0.detach())
    with torch.no_grad():
        value = fn(x0.detach())
    if progress is not None:
        progress(x0.numel())
    return h, value


SPACES = ("auto", "entries", "layer-outputs")
"""Where the exact Hessian's products are taken: chosen, the subset's entries, or the layers' outputs."""


def products_space(
    objective: SubsetLoss,
    input_ids: torch.Tensor,
    space: str = "auto",
    layers: LayerOutputs | None = None,
) -> LayerOutputs | None:
    """The :class:`LayerOutputs` map when the Hessian is to be computed through the layers' outputs, else ``None``.

    ``"auto"``: when the map exists and needs fewer products per sample (``seqlen * width``) than the subset has
    entries; ``"layer-outputs"``: whenever it exists; ``"entries"``: never. ``layers``: the map if already known."""
    if space not in SPACES:
        raise ValueError(f"unknown space {space!r}; choose from {SPACES}")
    if space == "entries":
        return None
    layers = layers or LayerOutputs.of(objective.model, objective.subset)
    if layers is None or (
        space == "auto" and layers.products_per_sample(input_ids.shape[1]) >= objective.subset.size
    ):
        return None
    return layers


def layer_outputs_graph(
    objective: SubsetLoss, input_ids: torch.Tensor, layers: LayerOutputs
) -> tuple[BatchGraph, list[torch.Tensor]]:
    """The gradient graph w.r.t. a leaf perturbation ``delta = 0`` of the selected layer outputs ``z`` of ``input_ids``
    (``(B, s)``; ``delta``: ``(B * s * width,)``), and the layers' inputs seen by the forward (for ``J``).

    Raises ``ValueError`` when a layer's input depends on the subset (then ``J`` is not constant)."""
    x0 = objective.x0().detach()
    b, s = input_ids.shape
    delta = torch.zeros(
        b * layers.products_per_sample(s), dtype=x0.dtype, device=x0.device, requires_grad=True
    )
    with layers.perturbed(objective.model, delta, b, s) as inputs:
        value = objective(x0, input_ids)
    (g,) = torch.autograd.grad(value, delta, create_graph=True)
    return BatchGraph(delta, g, value), inputs


def layer_output_rows(m: int, b: int, like: torch.Tensor) -> Callable[[int, int], torch.Tensor]:
    """``rows(start, stop)``: ``e_j`` (``j`` in ``start..stop-1``, of ``m``) placed in every one of ``b`` samples at
    once (samples do not interact, so ``H_z`` is block-diagonal over them), ``(stop - start, b * m)``."""
    return lambda start, stop: unit_rows(m, start, stop, like).repeat(1, b)


def layer_output_sink(hz: torch.Tensor, entries: int, progress: Progress | None = None) -> Sink:
    """A sink storing row ``j`` of every sample's ``H_z`` into ``hz`` (``(B, m, m)``); ``progress`` gets the entries'
    share (``entries / m`` per product) of the products done."""
    b, m = hz.shape[0], hz.shape[1]
    done = [0, 0]  # products, entries reported

    def sink(start: int, v: torch.Tensor, hv: torch.Tensor) -> None:
        hz[:, start : start + len(hv)] = hv.view(len(hv), b, m).transpose(0, 1)
        if progress is not None:
            done[0] += len(hv)
            share = done[0] * entries // m
            progress(share - done[1])
            done[1] = share

    return sink


def hessian_from_layer_outputs(
    hz: torch.Tensor, layers: LayerOutputs, inputs: list[torch.Tensor]
) -> torch.Tensor:
    """``sum_b J_b^T H_{z,b} J_b`` in float64, ``(n, n)``, from every sample's ``H_z`` (``hz``: ``(B, m, m)``)."""
    n = layers.entry_input.numel()
    h = torch.zeros(n, n, dtype=torch.float64, device=hz.device)
    for k in range(hz.shape[0]):
        j = layers.jacobian(inputs, k, torch.float64).to(h.device)
        h += j.T @ hz[k].to(torch.float64) @ j
    return h


def hessian_layer_outputs(
    objective: SubsetLoss,
    input_ids: torch.Tensor,
    layers: LayerOutputs,
    progress: Progress | None = None,
    schedule: Schedule | None = None,
    chunk: int = 1,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Hessian of the summed NLL of ``input_ids`` (``(B, s)``) w.r.t. the subset as ``sum_b J_b^T H_{z,b} J_b``
    (:class:`LayerOutputs`): one forward and one ``create_graph`` backward w.r.t. ``delta``
    (:func:`layer_outputs_graph`), then the rows of ``H_z`` through :func:`lib.products.operator.hvp_products` (``schedule``
    chooses the chunk). Returns ``(H (n, n), summed NLL)``; ``ValueError`` as :func:`layer_outputs_graph`."""
    graph, inputs = layer_outputs_graph(objective, input_ids, layers)
    b, m = input_ids.shape[0], layers.products_per_sample(input_ids.shape[1])
    hz = torch.empty(b, m, m, dtype=graph.x.dtype, device=graph.x.device)
    rows, sink = (
        layer_output_rows(m, b, graph.x),
        layer_output_sink(hz, objective.subset.size, progress),
    )

    def compute(start: int, stop: int, c: int) -> int:
        return hvp_products(graph.g, graph.x, rows, stop, sink, c, None, start=start)

    if schedule is None:
        compute(0, m, chunk)
    else:
        schedule(compute, m)
    return hessian_from_layer_outputs(hz, layers, inputs).to(graph.x.dtype), graph.value.detach()


def batch_hessian(
    objective: SubsetLoss,
    input_ids: torch.Tensor,
    method: str = "rev-rev",
    chunk: int = 1,
    progress: Progress | None = None,
    schedule: Schedule | None = None,
    space: str = "auto",
    record: dict[str, Any] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Hessian of the summed NLL of one batch ``input_ids`` (``(B, s)``) w.r.t. the subset, at ``x0``.

    Returns ``(H (n, n), summed NLL)``. ``schedule``: chooses the chunk (``rev-rev`` only, see :func:`hessian_rev_rev`).
    ``space`` (``rev-rev`` only, :func:`products_space`): ``"auto"`` computes through the layers' outputs
    (:func:`hessian_layer_outputs`) when that takes fewer products, falling back to the entries if a layer's input
    turns out to depend on the subset. ``record`` (a dict) gets ``space`` and ``products_per_sample`` of the products used.

    Args:
        objective: the summed NLL as a function of the subset, ``f(x, input_ids)``; differentiated at ``objective.x0()``.
        input_ids: ``(B, s)`` int64 token ids of one batch.
        method: ``"rev-rev"`` (reverse over reverse) or ``"autograd"`` (``torch.autograd.functional.hessian``).
        chunk: Hessian-vector products per batched backward (``rev-rev``).
        progress: called with the number of rows each step did, or ``None``.
        schedule: chooses the chunk instead of ``chunk`` (``rev-rev`` only), or ``None``.
        space: ``"auto"``, ``"entries"`` or ``"layer-outputs"`` (:data:`SPACES`).
        record: a dict updated with where the products were taken, or ``None``.

    Returns:
        ``(H, nll)``: the summed-NLL Hessian ``(n, n)`` (``n``: the subset's size; ``x0``'s dtype) and the
        summed NLL of the batch (0-d).

    Raises:
        ValueError: an unknown ``method``; with ``space="layer-outputs"``, a layer's input that depends on the subset.
    """
    fn = lambda x: objective(x, input_ids)  # noqa: E731
    x0 = objective.x0()
    record = {} if record is None else record
    if method == "rev-rev":
        layers = products_space(objective, input_ids, space)
        if layers is not None:
            try:
                out = hessian_layer_outputs(objective, input_ids, layers, progress, schedule, chunk)
                record.update(
                    space="layer-outputs",
                    products_per_sample=layers.products_per_sample(input_ids.shape[1]),
                )
                return out
            except ValueError:
                if space == "layer-outputs":
                    raise
        record.update(space="entries", products_per_sample=x0.numel())
        return hessian_rev_rev(fn, x0, chunk=chunk, progress=progress, schedule=schedule)
    if method == "autograd":
        return hessian_reference(fn, x0, progress=progress)
    raise ValueError(f"unknown method {method!r}; choose from {METHODS}")


@dataclass
class HessianResult:
    """Exact Hessian over ``n_samples`` samples.

    ``hessian = hessian_sum / n_tokens`` is the Hessian of the mean next-token NLL; ``hessian_sum`` is
    the additive (summed-NLL) Hessian; ``nll_sum`` the summed NLL, so ``exp(nll_sum / n_tokens)`` is the
    perplexity of the evaluated samples.
    """

    hessian: torch.Tensor
    hessian_sum: torch.Tensor
    nll_sum: float
    n_samples: int
    n_tokens: int
    method: str
    elapsed_s: float
    subset: Subset = field(repr=False)

    @property
    def perplexity(self) -> float:
        return float(torch.tensor(self.nll_sum / self.n_tokens).exp())


def batches(samples: torch.Tensor, model_input_bs: int) -> list[tuple[int, torch.Tensor]]:
    """Split ``samples`` (``(b, seqlen)``) into consecutive batches of ``model_input_bs`` rows, with their first index."""
    return [
        (i, samples[i : i + model_input_bs]) for i in range(0, samples.shape[0], model_input_bs)
    ]


class ExactHessianJob(ProductJob):
    """The exact Hessian as an additive job (:class:`lib.products.operator.ProductJob`): unit ``k`` is batch ``k`` of the samples.

    ``run_unit`` returns ``{"hessian_sum": (n, n), "nll_sum": ()}`` for its batch: with ``rev-rev`` row ``i`` is
    ``H e_i``, the unit vectors going through :meth:`ProductJob.multiply` (chunk given, or measured on the first
    batch), or, where ``space`` (:data:`SPACES`, :func:`products_space`) takes the layers' outputs with the exact
    products, ``sum_b J_b^T H_{z,b} J_b`` with the rows of ``H_z`` through :meth:`ProductJob.multiply` (falling back
    to the entries when a layer's input depends on the subset); with ``autograd`` the paper's
    :func:`hessian_reference`. The model is either given (``model``, used
    as is) or loaded by each process from ``spec`` in :meth:`setup`.
    """

    min_products = 1  # the chunk is measured on any block (a block is the whole Hessian)

    def __init__(
        self,
        subset: Subset,
        samples: torch.Tensor,
        model_input_bs: int = 1,
        method: str = "rev-rev",
        chunk: int | None = None,
        fused_head: bool | None = None,
        spec: ModelSpec | None = None,
        model: nn.Module | None = None,
        products: Products | None = None,
        space: str = "auto",
    ):
        if method not in METHODS:
            raise ValueError(f"unknown method {method!r}; choose from {METHODS}")
        if space not in SPACES:
            raise ValueError(f"unknown space {space!r}; choose from {SPACES}")
        super().__init__(samples, model_input_bs, chunk, fused_head, spec, model, products)
        self.subset, self.method, self.space = subset, method, space

    def setup(self, device: torch.device) -> None:
        super().setup(device)
        self._objective = self.subset_loss(self.subset)
        self._x0 = self._objective.x0()
        self._layers: list[
            LayerOutputs | None
        ] = []  # the subset's LayerOutputs map, found on the first batch
        self._products: dict[
            str, Any
        ] = {}  # where the last unit's products were taken (for the JSON)

    @property
    def objective(self) -> SubsetLoss:
        """The summed NLL as a function of the subset (after :meth:`setup`, in this process)."""
        return self._objective

    @property
    def x0(self) -> torch.Tensor:
        """The subset's values in the model (after :meth:`setup`)."""
        return self._x0

    def steps_per_unit(self) -> int:
        return self.subset.size

    def _layer_outputs(self, batch: torch.Tensor) -> LayerOutputs | None:
        """The map through the layers' outputs for this batch (:func:`products_space`), ``None``: the entries. Only
        with the exact products (other :class:`Products` methods take the entries)."""
        if not self.products.layer_outputs or self.space == "entries":
            return None
        if not self._layers:
            self._layers.append(LayerOutputs.of(self.model, self.subset))
        return self._layers[0] and products_space(
            self._objective, batch, self.space, self._layers[0]
        )

    def run_unit(self, k: int, progress: Progress | None = None) -> dict[str, torch.Tensor]:
        batch = self.batch(k, self._x0.device)
        if self.method == "autograd":
            h, value = hessian_reference(
                lambda x: self._objective(x, batch), self._x0, progress=progress
            )
            return {"hessian_sum": h, "nll_sum": value}
        layers = self._layer_outputs(batch)
        if layers is not None:
            try:
                graph, inputs = layer_outputs_graph(self._objective, batch, layers)
            except ValueError:  # a layer's input depends on the subset: J is not constant
                if self.space == "layer-outputs":
                    raise
                self._layers[0] = layers = None
        if layers is not None:
            b, m = batch.shape[0], layers.products_per_sample(batch.shape[1])
            hz = torch.empty(b, m, m, dtype=graph.x.dtype, device=graph.x.device)
            self.multiply(
                graph,
                layer_output_rows(m, b, graph.x),
                m,
                layer_output_sink(hz, self.subset.size, progress),
            )
            self._products = {
                "space": "layer-outputs",
                "products_per_sample": m,
                "size": graph.x.numel(),
            }
            return {
                "hessian_sum": hessian_from_layer_outputs(hz, layers, inputs).to(graph.x.dtype),
                "nll_sum": graph.value.detach(),
            }
        graph = self.batch_graph(self._objective, batch, self._x0)
        n = graph.x.numel()
        h = torch.empty(n, n, dtype=graph.x.dtype, device=graph.x.device)
        self.multiply(graph, lambda a, b: unit_rows(n, a, b, graph.x), n, store_rows(h), progress)
        self._products = {"space": "entries", "products_per_sample": n, "size": n}
        return {
            "hessian_sum": h,
            "nll_sum": graph.value.detach(),
            **graph_sums(self.products, graph),
        }

    def products_report(self) -> dict[str, Any]:
        """For the JSON: ``{"space": "entries" or "layer-outputs", "products_per_sample": ...}`` of this process's last
        unit (``{}`` before one ran here, e.g. when computed in worker processes, or with ``autograd``)."""
        return {k: v for k, v in getattr(self, "_products", {}).items() if k != "size"}

    def chunk_report(self, flag: str = "chunk") -> dict[str, Any]:
        """For the JSON: the chunk given, or the measured choice and timings (``None`` if measured in worker processes)
        for the size of the last unit's products (the entries or the layers' outputs, :meth:`products_report`)."""
        if self.chunk:
            return {flag: self.chunk, "measured": False}
        size = getattr(self, "_products", {}).get("size", self.subset.size)
        tuning = (self._policy or ChunkPolicy()).tunings.get(size)
        return {flag: "auto", "measured": tuning and tuning.to_json()}

    def config(self) -> dict[str, Any]:
        return {
            "kind": "exact_hessian",
            "subset": [[s.param_name, s.flat_index.tolist()] for s in self.subset.slices],
            **self.base_config(),
            "method": self.method,
        }

    def result(self, sums: dict[str, torch.Tensor], elapsed_s: float) -> HessianResult:
        """Package summed partials into a :class:`HessianResult` (normalized by ``b*(seqlen-1)``)."""
        dtype = (
            next(iter(self.model.parameters())).dtype
            if self.model is not None
            else getattr(torch, self.spec.dtype)
        )
        n_tokens = self.samples.shape[0] * (self.samples.shape[1] - 1)
        total = sums["hessian_sum"]
        return HessianResult(
            hessian=(total / n_tokens).to(dtype),
            hessian_sum=total.to(dtype),
            nll_sum=float(sums["nll_sum"]),
            n_samples=self.samples.shape[0],
            n_tokens=n_tokens,
            method=self.products.method_name(self.method),
            elapsed_s=elapsed_s,
            subset=self.subset,
        )


def exact_hessian(
    model: nn.Module,
    subset: Subset,
    samples: torch.Tensor,
    model_input_bs: int | str = "auto",
    method: str = "rev-rev",
    chunk: int | None = None,
    fused_head: bool | None = None,
    progress: bool = False,
) -> HessianResult:
    """Exact Hessian of the mean next-token NLL over ``samples`` (``(b, seqlen)``) w.r.t. ``subset``.

    Batches of ``model_input_bs`` samples are processed one after another on the model's device and
    their Hessians summed in float64 in sample order. ``progress=True`` shows a tqdm bar over
    batches x columns. Defaults as the scripts': ``model_input_bs="auto"`` (their rule), ``chunk`` measured,
    and the threads chosen once per process (:func:`lib.runtime.library_defaults.settle`).

    Args:
        model: a prepared causal LM (:func:`lib.model.models.load_model`); float64 for exact results.
        subset: the ``n`` entries ``x`` of the weights.
        samples: ``(b, seqlen)`` int64 token ids.
        model_input_bs: samples per forward, or ``"auto"``.
        method: ``"rev-rev"`` (reverse over reverse) or ``"autograd"`` (the paper's
            ``torch.autograd.functional.hessian``).
        chunk: Hessian-vector products per batched backward; ``None``: measured on the first batch.
        fused_head: the LM head through :func:`lib.objective.loss.head_nll`; ``None``: where the architecture allows.
        progress: show a tqdm bar.

    Returns:
        The :class:`HessianResult`: ``hessian`` and ``hessian_sum`` ``(n, n)`` (summed in float64, returned in the
        model's dtype), the summed NLL, the sample and token counts, the time.

    Raises:
        ValueError: an unknown ``method``, or ``fused_head=True`` where the fused head does not apply.
    """
    model_input_bs = settle(model, samples, model_input_bs, subset.size)
    job = ExactHessianJob(subset, samples, model_input_bs, method, chunk, fused_head, model=model)
    t0 = time.perf_counter()
    sums = run_serial(
        job, next(model.parameters()).device, progress=progress, desc="Hessian columns"
    )
    return job.result(sums, time.perf_counter() - t0)
