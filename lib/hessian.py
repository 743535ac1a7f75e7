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

import time
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from torch import nn

from .autotune import Compute
from .jobs import run_serial
from .loss import SubsetLoss
from .models import ModelSpec
from .operator import ChunkPolicy, ProductJob, Products, gradient_graph, graph_sums, hvp_products, store_rows, unit_rows
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


def batch_hessian(objective: SubsetLoss, input_ids: torch.Tensor, method: str = "rev-rev", chunk: int = 1, progress: Progress | None = None, schedule: Schedule | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Hessian of the summed NLL of one batch ``input_ids`` (``(B, s)``) w.r.t. the subset, at ``x0``.

    Returns ``(H (n, n), summed NLL)``. ``schedule``: chooses the chunk (``rev-rev`` only, see :func:`hessian_rev_rev`).
    """
    fn = lambda x: objective(x, input_ids)  # noqa: E731
    x0 = objective.x0()
    if method == "rev-rev":
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


class ExactHessianJob(ProductJob):
    """The exact Hessian as an additive job (:class:`lib.operator.ProductJob`): unit ``k`` is batch ``k`` of the samples.

    ``run_unit`` returns ``{"hessian_sum": (n, n), "nll_sum": ()}`` for its batch: with ``rev-rev`` row ``i`` is
    ``H e_i``, the unit vectors going through :meth:`ProductJob.multiply` (chunk given, or measured on the first
    batch); with ``autograd`` the paper's :func:`hessian_reference`. The model is either given (``model``, used
    as is) or loaded by each process from ``spec`` in :meth:`setup`.
    """

    min_products = 1  # the chunk is measured on any block (a block is the whole Hessian)

    def __init__(self, subset: Subset, samples: torch.Tensor, model_input_bs: int = 1, method: str = "rev-rev", chunk: int | None = None, fused_head: bool | None = None, spec: ModelSpec | None = None, model: nn.Module | None = None, products: Products | None = None):
        if method not in METHODS:
            raise ValueError(f"unknown method {method!r}; choose from {METHODS}")
        super().__init__(samples, model_input_bs, chunk, fused_head, spec, model, products)
        self.subset, self.method = subset, method

    def setup(self, device: torch.device) -> None:
        super().setup(device)
        self._objective = self.subset_loss(self.subset)
        self._x0 = self._objective.x0()

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

    def run_unit(self, k: int, progress: Progress | None = None) -> dict[str, torch.Tensor]:
        batch = self.batch(k, self._x0.device)
        if self.method == "autograd":
            h, value = hessian_reference(lambda x: self._objective(x, batch), self._x0, progress=progress)
            return {"hessian_sum": h, "nll_sum": value}
        graph = self.batch_graph(self._objective, batch, self._x0)
        n = graph.x.numel()
        h = torch.empty(n, n, dtype=graph.x.dtype, device=graph.x.device)
        self.multiply(graph, lambda a, b: unit_rows(n, a, b, graph.x), n, store_rows(h), progress)
        return {"hessian_sum": h, "nll_sum": graph.value.detach(), **graph_sums(graph)}

    def chunk_report(self, flag: str = "chunk") -> dict[str, Any]:
        """For the JSON: the chunk given, or the measured choice and timings (``None`` if measured in worker processes)."""
        if self.chunk:
            return {flag: self.chunk, "measured": False}
        tuning = (self._policy or ChunkPolicy()).tunings.get(self.subset.size)
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
        dtype = next(iter(self.model.parameters())).dtype if self.model is not None else getattr(torch, self.spec.dtype)
        n_tokens = self.samples.shape[0] * (self.samples.shape[1] - 1)
        total = sums["hessian_sum"]
        return HessianResult(
            hessian=(total / n_tokens).to(dtype),
            hessian_sum=total.to(dtype),
            nll_sum=float(sums["nll_sum"]),
            n_samples=self.samples.shape[0],
            n_tokens=n_tokens,
            method=self.method if self.products.name == "exact" else self.products.name.split("(")[0],
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
