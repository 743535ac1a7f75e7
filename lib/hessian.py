"""Exact Hessians of the additive loss with respect to a flat subset ``x``.

Over samples ``X_1..X_b`` (each ``(seqlen,)``), ``f(x) = sum_k f(x; X_k)`` (see :mod:`lib.loss`), so
``H = sum_k H_k`` with ``H_k = d^2 f(x; X_k) / dx^2`` evaluated at ``x0``; memory does not grow with ``b``.
The stored result is normalized to the Hessian of the *mean* next-token NLL:
``H / (b * (seqlen - 1))``.

Methods (all exact up to floating point):

* ``autograd`` -- the paper's reference, :func:`torch.autograd.functional.hessian` per batch.
* ``rev-rev`` (default) -- reverse-over-reverse: one forward and one ``create_graph`` backward per
  batch give ``g = grad f``; then row ``i`` of ``H`` is the vector-Jacobian product ``e_i^T dg/dx``,
  computed for ``chunk`` unit vectors at a time (``is_grads_batched``) on the retained graph. The
  frozen part of the network (everything that does not depend on ``x``) is evaluated once per batch
  and never differentiated, and the LM head + softmax use the fused kernel of :mod:`lib.loss`.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import nn

from .loss import SubsetLoss
from .subsets import Subset

METHODS = ("rev-rev", "autograd")

Progress = Callable[[int], None]
"""Called with the number of Hessian columns just finished."""


def _unit_rows(n: int, start: int, stop: int, like: torch.Tensor) -> torch.Tensor:
    """Rows ``start..stop-1`` of the ``n x n`` identity, shape ``(stop-start, n)``."""
    e = torch.zeros(stop - start, n, dtype=like.dtype, device=like.device)
    e[torch.arange(stop - start), torch.arange(start, stop)] = 1
    return e


def default_chunk(device: torch.device) -> int:
    """Columns per batched backward: 1 on CPU (batching does not pay there), 64 on GPU (halved on OOM)."""
    return 1 if device.type == "cpu" else 64


def hessian_rev_rev(fn: Callable[[torch.Tensor], torch.Tensor], x0: torch.Tensor, chunk: int = 1, progress: Progress | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact Hessian of scalar ``fn`` at ``x0`` (shape ``(n,)``) by reverse-over-reverse; returns ``(H (n, n), fn(x0))``.

    Row ``i`` is ``d/dx (e_i . grad fn(x))``; ``chunk`` rows share one batched backward. On a CUDA
    out-of-memory error the chunk is halved and the rows are redone.
    """
    x = x0.detach().clone().requires_grad_(True)
    value = fn(x)
    (g,) = torch.autograd.grad(value, x, create_graph=True)
    n = x.numel()
    rows = torch.empty(n, n, dtype=x.dtype, device=x.device)
    start = 0
    while start < n:
        stop = min(n, start + chunk)
        try:
            if stop - start == 1:
                (row,) = torch.autograd.grad(g, x, grad_outputs=_unit_rows(n, start, stop, x)[0], retain_graph=True)
                rows[start] = row
            else:
                (block,) = torch.autograd.grad(g, x, grad_outputs=_unit_rows(n, start, stop, x), retain_graph=True, is_grads_batched=True)
                rows[start:stop] = block
        except torch.OutOfMemoryError:
            if chunk == 1:
                raise
            chunk = max(1, chunk // 2)
            if x.is_cuda:
                torch.cuda.empty_cache()
            continue
        if progress is not None:
            progress(stop - start)
        start = stop
    return rows, value.detach()


def hessian_reference(fn: Callable[[torch.Tensor], torch.Tensor], x0: torch.Tensor, progress: Progress | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The paper's method: ``torch.autograd.functional.hessian(fn, x0)``; returns ``(H, fn(x0))``."""
    h = torch.autograd.functional.hessian(fn, x0.detach())
    with torch.no_grad():
        value = fn(x0.detach())
    if progress is not None:
        progress(x0.numel())
    return h, value


def batch_hessian(objective: SubsetLoss, input_ids: torch.Tensor, method: str = "rev-rev", chunk: int = 1, progress: Progress | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Hessian of the summed NLL of one batch ``input_ids`` (``(B, s)``) w.r.t. the subset, at ``x0``.

    Returns ``(H (n, n), summed NLL)``.
    """
    fn = lambda x: objective(x, input_ids)  # noqa: E731
    x0 = objective.x0()
    if method == "rev-rev":
        return hessian_rev_rev(fn, x0, chunk=chunk, progress=progress)
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

    Batches of ``model_input_bs`` samples are processed one after another and their Hessians summed
    in float64 in sample order. ``progress=True`` shows a tqdm bar over batches x columns.
    """
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; choose from {METHODS}")
    objective = SubsetLoss(model, subset, fused_head=fused_head)
    x0 = objective.x0()
    chunk = chunk or default_chunk(x0.device)
    n = x0.numel()
    total = torch.zeros(n, n, dtype=torch.float64, device=x0.device)
    nll = torch.zeros((), dtype=torch.float64, device=x0.device)
    t0 = time.perf_counter()
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=n * len(batches(samples, model_input_bs)), desc="Hessian columns", unit="col", dynamic_ncols=True)
    try:
        for _, batch in batches(samples, model_input_bs):
            h, value = batch_hessian(objective, batch.to(x0.device), method=method, chunk=chunk, progress=bar.update if bar else None)
            total += h.to(torch.float64)
            nll += value.to(torch.float64)
    finally:
        if bar is not None:
            bar.close()
    n_tokens = samples.shape[0] * (samples.shape[1] - 1)
    return HessianResult(
        hessian=(total / n_tokens).to(x0.dtype).cpu(),
        hessian_sum=total.to(x0.dtype).cpu(),
        nll_sum=float(nll),
        n_samples=samples.shape[0],
        n_tokens=n_tokens,
        method=method,
        elapsed_s=time.perf_counter() - t0,
        subset=subset,
    )
