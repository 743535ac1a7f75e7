"""Exact Hessians of the additive loss with respect to a flat subset ``x``.

Over samples ``X_1..X_b`` (each ``(seqlen,)``), ``f(x) = sum_k f(x; X_k)`` (see :mod:`lib.loss`), so
``H = sum_k H_k`` with ``H_k = d^2 f(x; X_k) / dx^2`` evaluated at ``x0``; memory does not grow with ``b``.
The stored result is normalized to the Hessian of the *mean* next-token NLL:
``H / (b * (seqlen - 1))``.

Methods (all exact up to floating point):

* ``autograd`` -- the paper's reference, :func:`torch.autograd.functional.hessian` per batch.
* ``rev-rev`` (default) -- reverse-over-reverse: one forward and one ``create_graph`` backward per
  batch give ``g = grad f``; then row ``i`` of ``H`` is the vector-Jacobian product ``e_i^T dg/dx``,
  computed for ``chunk`` unit vectors at a time (``is_grads_batched``) on the retained graph by
  :func:`lib.operator.hvp_products`. The
  frozen part of the network (everything that does not depend on ``x``) is evaluated once per batch
  and never differentiated, and the LM head + softmax use the fused kernel of :mod:`lib.loss`.
"""

from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from torch import nn

from .autotune import Compute, tune
from .jobs import ModelJob, run_serial
from .loss import LayerOutputs, SubsetLoss
from .models import ModelSpec
from .operator import ChunkPolicy, gradient_graph, hvp_products
from .subsets import Subset

METHODS = ("rev-rev", "autograd")

Progress = Callable[[int], None]
"""Called with the number of Hessian columns just finished."""


def _unit_rows(n: int, start: int, stop: int, like: torch.Tensor) -> torch.Tensor:
    """Rows ``start..stop-1`` of the ``n x n`` identity, shape ``(stop-start, n)``."""
    e = torch.zeros(stop - start, n, dtype=like.dtype, device=like.device)
    e[torch.arange(stop - start), torch.arange(start, stop)] = 1
    return e


Schedule = Callable[[Compute, int], None]
"""``schedule(compute, n)``: computes rows ``0..n-1`` through ``compute(start, stop, chunk)``, choosing the chunk
(e.g. :meth:`lib.operator.ChunkPolicy.run`, which measures it on the first rows and keeps them)."""


def hessian_rev_rev(fn: Callable[[torch.Tensor], torch.Tensor], x0: torch.Tensor, chunk: int = 1, progress: Progress | None = None, schedule: Schedule | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact Hessian of scalar ``fn`` at ``x0`` (shape ``(n,)``) by reverse-over-reverse; returns ``(H (n, n), fn(x0))``.

    Row ``i`` is ``H e_i = d/dx (e_i . grad fn(x))``: the unit vectors go through the library's one
    Hessian-vector primitive :func:`lib.operator.hvp_products` (``chunk`` rows per batched backward,
    halved on CUDA out-of-memory). With ``schedule`` the chunk is chosen by it instead.
    """
    x, g, value = gradient_graph(fn, x0)
    n = x.numel()
    rows = torch.empty(n, n, dtype=x.dtype, device=x.device)

    def take(a: int, v: torch.Tensor, hv: torch.Tensor) -> None:
        rows[a : a + len(hv)] = hv

    def compute(start: int, stop: int, c: int) -> int:  # rows start..stop-1, c per batched backward
        return hvp_products(g, x, lambda a, b: _unit_rows(n, a, b, x), stop, take, c, progress, start=start)

    if schedule is None:
        compute(0, n, chunk)
    else:
        schedule(compute, n)
    return rows, value.detach()


def hessian_reference(fn: Callable[[torch.Tensor], torch.Tensor], x0: torch.Tensor, progress: Progress | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The paper's method: ``torch.autograd.functional.hessian(fn, x0)``; returns ``(H, fn(x0))``."""
    h = torch.autograd.functional.hessian(fn, x0.detach())
    with torch.no_grad():
        value = fn(x0.detach())
    if progress is not None:
        progress(x0.numel())
    return h, value


def hessian_layer_outputs(objective: SubsetLoss, input_ids: torch.Tensor, layers: LayerOutputs, progress: Progress | None = None, schedule: Schedule | None = None, chunk: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """Hessian of the summed NLL of ``input_ids`` (``(B, s)``) w.r.t. the subset as ``sum_b J_b^T H_{z,b} J_b`` (:class:`LayerOutputs`).

    ``z`` (the selected units of the layers' outputs, ``s * width`` per sample) gets a leaf perturbation
    ``delta = 0``; one forward and one ``create_graph`` backward give ``grad_delta f``, and row ``j`` of every sample's
    ``H_z`` comes from one product with ``e_j`` placed in every sample at once (samples do not interact, so
    ``H_z`` is block-diagonal over them). Rows go through :func:`lib.operator.hvp_products` like
    :func:`hessian_rev_rev`'s (``schedule`` chooses the chunk). ``progress`` gets the entries' share of each product.
    Raises ``ValueError`` when a layer's input depends on the subset (then ``J`` is not constant).
    """
    x0 = objective.x0().detach()
    b, s = input_ids.shape
    m = layers.products_per_sample(s)
    delta = torch.zeros(b * m, dtype=x0.dtype, device=x0.device, requires_grad=True)
    with layers.perturbed(objective.model, delta, b, s) as inputs:
        value = objective(x0, input_ids)
    (g,) = torch.autograd.grad(value, delta, create_graph=True)
    hz = torch.empty(b, m, m, dtype=x0.dtype, device=x0.device)

    def rows(start: int, stop: int) -> torch.Tensor:  # e_j in every sample
        return _unit_rows(m, start, stop, delta).repeat(1, b)

    done = [0, 0]  # products, entries reported

    def take(a: int, v: torch.Tensor, hv: torch.Tensor) -> None:
        hz[:, a : a + len(hv)] = hv.view(len(hv), b, m).transpose(0, 1)
        if progress is not None:
            done[0] += len(hv)
            share = done[0] * objective.subset.size // m
            progress(share - done[1])
            done[1] = share

    def compute(start: int, stop: int, c: int) -> int:
        return hvp_products(g, delta, rows, stop, take, c, None, start=start)

    if schedule is None:
        compute(0, m, chunk)
    else:
        schedule(compute, m)
    h = torch.zeros(x0.numel(), x0.numel(), dtype=torch.float64, device=x0.device)
    for k in range(b):
        j = layers.jacobian(inputs, k, torch.float64).to(h.device)
        h += j.T @ hz[k].to(torch.float64) @ j
    return h.to(x0.dtype), value.detach()


SPACES = ("auto", "entries", "layer-outputs")


def products_space(objective: SubsetLoss, input_ids: torch.Tensor, space: str = "auto") -> LayerOutputs | None:
    """The :class:`LayerOutputs` map when the Hessian is to be computed through the layers' outputs, else ``None``.

    ``"auto"``: when the map exists and needs fewer products per sample (``seqlen * width``) than the subset has
    entries; ``"layer-outputs"``: whenever it exists; ``"entries"``: never."""
    if space not in SPACES:
        raise ValueError(f"unknown space {space!r}; choose from {SPACES}")
    if space == "entries":
        return None
    layers = LayerOutputs.of(objective.model, objective.subset)
    if layers is None or (space == "auto" and layers.products_per_sample(input_ids.shape[1]) >= objective.subset.size):
        return None
    return layers


def batch_hessian(objective: SubsetLoss, input_ids: torch.Tensor, method: str = "rev-rev", chunk: int = 1, progress: Progress | None = None, schedule: Schedule | None = None, space: str = "auto", record: dict[str, Any] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Hessian of the summed NLL of one batch ``input_ids`` (``(B, s)``) w.r.t. the subset, at ``x0``.

    Returns ``(H (n, n), summed NLL)``. ``schedule``: chooses the chunk (``rev-rev`` only, see :func:`hessian_rev_rev`).
    ``space`` (``rev-rev`` only, :func:`products_space`): ``"auto"`` computes through the layers' outputs
    (:func:`hessian_layer_outputs`) when that takes fewer products, falling back to the entries if a layer's input
    turns out to depend on the subset. ``record`` (a dict) gets ``space`` and ``products_per_sample`` of the products used.
    """
    fn = lambda x: objective(x, input_ids)  # noqa: E731
    x0 = objective.x0()
    record = {} if record is None else record
    if method == "rev-rev":
        layers = products_space(objective, input_ids, space)
        if layers is not None:
            try:
                out = hessian_layer_outputs(objective, input_ids, layers, progress, schedule, chunk)
                record.update(space="layer-outputs", products_per_sample=layers.products_per_sample(input_ids.shape[1]))
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
    return [(i, samples[i : i + model_input_bs]) for i in range(0, samples.shape[0], model_input_bs)]


class ExactHessianJob(ModelJob):
    """The exact Hessian as an additive job (:mod:`lib.jobs`): unit ``k`` is batch ``k`` of the samples.

    ``run_unit`` returns ``{"hessian_sum": (n, n), "nll_sum": ()}`` for its batch. The model is either
    given (``model``, used as is) or loaded by each process from ``spec`` in :meth:`setup`.
    """

    def __init__(self, subset: Subset, samples: torch.Tensor, model_input_bs: int = 1, method: str = "rev-rev", chunk: int | None = None, fused_head: bool | None = None, spec: ModelSpec | None = None, model: nn.Module | None = None):
        if method not in METHODS:
            raise ValueError(f"unknown method {method!r}; choose from {METHODS}")
        if model is None and spec is None:
            raise ValueError("give a model or a ModelSpec")
        self.subset, self.samples, self.model_input_bs = subset, samples, model_input_bs
        self.method, self.chunk, self.fused_head, self.spec = method, chunk, fused_head, spec
        self.model = model

    def setup(self, device: torch.device) -> None:
        self.ensure_model(device)
        self._objective = SubsetLoss(self.model, self.subset, fused_head=self.fused_head)
        self._x0 = self._objective.x0()
        self._policy = ChunkPolicy(self.chunk, min_products=1)  # chunk None = measured on the first batch
        self._products: dict[str, Any] = {}  # the space of the last unit's products (batch_hessian's record)

    def num_units(self) -> int:
        return -(-self.samples.shape[0] // self.model_input_bs)

    def steps_per_unit(self) -> int:
        return self.subset.size

    def run_unit(self, k: int, progress: Progress | None = None) -> dict[str, torch.Tensor]:
        batch = self.samples[k * self.model_input_bs : (k + 1) * self.model_input_bs].to(self._x0.device)
        measure = lambda compute, n: tune(compute, n, self.model, batch.numel(), self._x0, total=n * self.num_units())  # noqa: E731
        schedule = lambda compute, n: self._policy.run(compute, n, n, measure)  # noqa: E731
        h, value = batch_hessian(self._objective, batch, method=self.method, progress=progress, schedule=schedule, record=self._products)
        return {"hessian_sum": h, "nll_sum": value}

    def chunk_report(self) -> dict[str, Any]:
        """For the JSON: the chunk given, or the measured choice and timings (``None`` if measured in worker processes)."""
        if self.chunk:
            return {"chunk": self.chunk, "measured": False}
        tunings = getattr(self, "_policy", ChunkPolicy()).tunings
        tuning = tunings.get(self.products_report().get("products_per_sample", self.subset.size))
        return {"chunk": "auto", "measured": tuning and tuning.to_json()}

    def products_report(self) -> dict[str, Any]:
        """For the JSON: ``{"space": "entries" or "layer-outputs", "products_per_sample": ...}`` of this process's last
        unit (:func:`batch_hessian`'s record; ``{}`` if computed in worker processes)."""
        return dict(getattr(self, "_products", {}))

    def config(self) -> dict[str, Any]:
        return {
            "kind": "exact_hessian",
            "subset": [[s.param_name, s.flat_index.tolist()] for s in self.subset.slices],
            "samples_sha256": hashlib.sha256(self.samples.numpy().tobytes()).hexdigest(),
            "samples_shape": list(self.samples.shape),
            "model_input_bs": self.model_input_bs,
            "method": self.method,
            "fused_head": self.fused_head,
            "model": None if self.spec is None else self.spec.identity(),
        }

    def result(self, sums: dict[str, torch.Tensor], elapsed_s: float) -> HessianResult:
        """Package summed partials into a :class:`HessianResult` (normalized by ``b*(seqlen-1)``)."""
        dtype = next(iter(self.model.parameters())).dtype if self.model is not None else getattr(torch, self.spec.dtype)
        n_tokens = self.samples.shape[0] * (self.samples.shape[1] - 1)
        total = sums["hessian_sum"]
        return HessianResult(
            hessian=(total / n_tokens).to(dtype),
            hessian_sum=total.to(dtype),
            nll_sum=float(sums["nll_sum"]),
            n_samples=self.samples.shape[0],
            n_tokens=n_tokens,
            method=self.method,
            elapsed_s=elapsed_s,
            subset=self.subset,
        )


def exact_hessian(
    model: nn.Module,
    subset: Subset,
    samples: torch.Tensor,
    model_input_bs: int = 1,
    method: str = "rev-rev",
    chunk: int | None = None,
    fused_head: bool | None = None,
    progress: bool = False,
) -> HessianResult:
    """Exact Hessian of the mean next-token NLL over ``samples`` (``(b, seqlen)``) w.r.t. ``subset``.

    Batches of ``model_input_bs`` samples are processed one after another on the model's device and
    their Hessians summed in float64 in sample order. ``progress=True`` shows a tqdm bar over
    batches x columns.
    """
    job = ExactHessianJob(subset, samples, model_input_bs, method, chunk, fused_head, model=model)
    t0 = time.perf_counter()
    sums = run_serial(job, next(model.parameters()).device, progress=progress, desc="Hessian columns")
    return job.result(sums, time.perf_counter() - t0)
