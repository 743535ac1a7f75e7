"""The library's one second-order primitive: Hessian-matrix products ``H V`` of the additive loss.

Low level: on the retained graph of ``g = grad f(x)`` (one forward and one ``create_graph`` backward),
``H v = d/dx (v . g)`` is one more backward; :func:`hvp_products` takes a block of ``count`` vectors
``chunk`` at a time in batched backwards (``is_grads_batched``), halving ``chunk`` on CUDA
out-of-memory. The exact Hessian (:mod:`lib.hessian`: ``V`` = unit vectors), the diagonal estimators
(:mod:`lib.diagonal`: probes, exact entries, XDiag's basis) and the spectrum (:mod:`lib.spectrum`:
Krylov blocks) all go through it; :func:`default_chunk` is the one place where the chunk is chosen.

High level: :class:`HessianOperator` is ``H``, the Hessian of the *mean* next-token NLL over ``b``
samples w.r.t. a flat subset (``H = sum_s H_s / (b (seqlen - 1))``, ``H_s`` per batch of
``model_input_bs`` samples, on the sample's own gradient graph), as a linear operator: ``H @ V``,
``matvec``, ``matmat`` and a :class:`scipy.sparse.linalg.LinearOperator` view. Each product is one
pass over the samples, an additive job (:class:`HVPJob`), so it runs serially, on several worker
processes or under torchrun, with checkpoints (:func:`lib.parallel.run_job`).
"""

from __future__ import annotations

import hashlib
from typing import Any, Callable

import torch
from torch import nn

from .jobs import ModelJob, Partial, run_serial
from .loss import SubsetLoss
from .models import ModelSpec
from .subsets import Subset

Progress = Callable[[int], None]
Rows = Callable[[int, int], torch.Tensor]
"""``rows(start, stop)``: the vectors ``start..stop-1`` of a block, shape ``(stop - start, n)``."""
Sink = Callable[[int, torch.Tensor, torch.Tensor], None]
"""``sink(start, v, hv)``: receives the chunk of vectors starting at ``start`` and their products."""


def default_chunk(device: torch.device, purpose: str = "exact") -> int:
    """Vectors per batched backward when none is given or measured (the spectrum's Krylov blocks): 1 on
    CPU; on GPU 64 for unit vectors (``purpose="exact"``), 8 for dense vectors (``"probes"``). The exact
    Hessian's columns and the diagonal's probes measure theirs (:mod:`lib.autotune`). Halved on
    out-of-memory by :func:`hvp_products`."""
    if device.type == "cpu":
        return 1
    return 64 if purpose == "exact" else 8


def hvp_rows(g: torch.Tensor, x: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """``H v_r`` for the rows of ``v`` (``(m, n)``) on the retained graph of ``g = grad f(x)``; returns ``(m, n)``."""
    if v.shape[0] == 1:
        (hv,) = torch.autograd.grad(g, x, grad_outputs=v[0], retain_graph=True)
        return hv.unsqueeze(0)
    (hv,) = torch.autograd.grad(g, x, grad_outputs=v, retain_graph=True, is_grads_batched=True)
    return hv


def hvp_products(g: torch.Tensor, x: torch.Tensor, rows: Rows, count: int, sink: Sink, chunk: int, progress: Progress | None = None, start: int = 0) -> int:
    """``sink(start, v, H v)`` for consecutive chunks ``v = rows(start, stop)`` of vectors ``start..count-1``.

    ``chunk`` vectors share one batched backward; on a CUDA out-of-memory error the chunk is halved
    and redone (an error at ``chunk == 1`` is raised): the library's one out-of-memory policy. Returns
    the chunk size that worked, for the caller to keep for later blocks. ``start > 0`` continues a
    block whose first vectors were done already (e.g. while :func:`lib.autotune.tune_chunk` measured).
    """
    while start < count:
        stop = min(count, start + chunk)
        v = rows(start, stop).to(device=x.device, dtype=x.dtype)
        try:
            hv = hvp_rows(g, x, v)
        except torch.OutOfMemoryError:
            if chunk == 1:
                raise
            chunk = max(1, chunk // 2)
            if x.is_cuda:
                torch.cuda.empty_cache()
            continue
        sink(start, v, hv)
        if progress is not None:
            progress(stop - start)
        start = stop
    return chunk


def gradient_graph(fn: Callable[[torch.Tensor], torch.Tensor], x0: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(x, g, value)``: a leaf copy ``x`` of ``x0``, ``g = grad fn(x)`` with its graph kept (``create_graph``), ``fn(x)``."""
    x = x0.detach().clone().requires_grad_(True)
    value = fn(x)
    (g,) = torch.autograd.grad(value, x, create_graph=True)
    return x, g, value


def block_products(g: torch.Tensor, x: torch.Tensor, vt: torch.Tensor, chunk: int, progress: Progress | None = None) -> tuple[torch.Tensor, int]:
    """``(H V)^T`` for the rows of ``vt = V^T`` (``(p, n)``) on the graph of ``g``; returns it and the chunk that worked."""
    out = torch.empty(vt.shape[0], x.numel(), dtype=x.dtype, device=x.device)

    def take(a: int, v: torch.Tensor, hv: torch.Tensor) -> None:
        out[a : a + len(hv)] = hv

    chunk = hvp_products(g, x, lambda a, b: vt[a:b], vt.shape[0], take, chunk, progress)
    return out, chunk


def digest(t: torch.Tensor) -> str:
    """SHA-256 of a tensor's bytes (CPU, contiguous)."""
    return hashlib.sha256(t.detach().cpu().contiguous().numpy().tobytes()).hexdigest()


class HVPJob(ModelJob):
    """One pass of ``H V`` over the samples as an additive job (:mod:`lib.jobs`): unit ``k`` = batch ``k``.

    ``vt = V^T`` (``(p, n)``, float64 on the CPU). ``run_unit`` returns ``{"hv_sum": (p, n), "nll_sum": ()}``:
    the batch's summed-NLL Hessian applied to the block (not normalized). ``tag`` (e.g. a pass index)
    goes into :meth:`config`, so checkpoints of different passes are never mixed up.
    """

    def __init__(self, subset: Subset, samples: torch.Tensor, vt: torch.Tensor, model_input_bs: int = 1, chunk: int | None = None, fused_head: bool | None = None, spec: ModelSpec | None = None, model: nn.Module | None = None, tag: str = ""):
        if model is None and spec is None:
            raise ValueError("give a model or a ModelSpec")
        self.subset, self.samples, self.vt, self.model_input_bs = subset, samples, vt, model_input_bs
        self.chunk, self.fused_head, self.spec, self.model, self.tag = chunk, fused_head, spec, model, tag

    _graphs: dict | None = None
    """Per-process cache ``{unit: (x, g, value)}`` of gradient graphs shared by the jobs of one operator (not pickled)."""

    def setup(self, device: torch.device) -> None:
        self.ensure_model(device)
        self._objective = SubsetLoss(self.model, self.subset, fused_head=self.fused_head)
        self._x0 = self._objective.x0()
        self._chunk = self.chunk or default_chunk(self._x0.device, "probes")

    def _graph(self, k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Batch ``k``'s ``(x, g = grad f, f)`` with the graph of ``g`` kept, from the cache when there is one."""
        if self._graphs is not None and k in self._graphs:
            return self._graphs[k]
        batch = self.samples[k * self.model_input_bs : (k + 1) * self.model_input_bs].to(self._x0.device)
        out = gradient_graph(lambda z: self._objective(z, batch), self._x0)
        if self._graphs is not None:
            self._graphs[k] = out
        return out

    def num_units(self) -> int:
        return -(-self.samples.shape[0] // self.model_input_bs)

    def steps_per_unit(self) -> int:
        return self.vt.shape[0]

    def run_unit(self, k: int, progress: Progress | None = None) -> Partial:
        x, g, value = self._graph(k)
        vt = self.vt.to(device=x.device, dtype=x.dtype)
        hv, self._chunk = block_products(g, x, vt, self._chunk, progress)
        return {"hv_sum": hv.detach().cpu(), "nll_sum": value.detach().cpu()}

    def config(self) -> dict[str, Any]:
        return {
            "kind": "hessian_vector_products",
            "tag": self.tag,
            "subset": hashlib.sha256(repr([[s.param_name, s.flat_index.tolist()] for s in self.subset.slices]).encode()).hexdigest(),
            "samples_sha256": digest(self.samples),
            "samples_shape": list(self.samples.shape),
            "block_sha256": digest(self.vt),
            "block_shape": list(self.vt.shape),
            "model_input_bs": self.model_input_bs,
            "fused_head": self.fused_head,
            "model": None if self.spec is None else self.spec.identity(),
        }


class HessianOperator:
    """``H``: the Hessian of the mean next-token NLL over ``samples`` (``(b, seqlen)``) w.r.t. ``subset``, as a linear operator.

    ``H @ V`` / ``matmat(V)``: ``V`` ``(n, p)`` -> ``H V`` ``(n, p)``; ``matvec(v)``: ``(n,)`` -> ``(n,)``. Inputs may be
    torch tensors or NumPy arrays (returned as the same kind); products are computed in the model's
    dtype on its device and summed over batches in float64, sample order. Each call is one pass over
    the samples (one forward + ``create_graph`` backward per batch, then ``p`` HVPs on its graph).
    ``run(job)`` (default: in this process, :func:`lib.jobs.run_serial`) runs each pass's
    :class:`HVPJob`; pass e.g. ``lambda job: lib.parallel.run_job(job, settings)`` for several devices.
    ``hvps`` (products ``H v`` of the whole operator) and ``passes`` count the work done.
    ``keep_graphs``: keep every batch's gradient graph in this process's memory between passes, so a
    pass costs only the HVPs (no forward or first backward; for models and ``b`` small enough that
    ``b / model_input_bs`` graphs fit; worker processes always rebuild them).
    """

    def __init__(self, model: nn.Module, subset: Subset, samples: torch.Tensor, model_input_bs: int = 1, chunk: int | None = None, fused_head: bool | None = None, spec: ModelSpec | None = None, run: Callable[[HVPJob], Partial | None] | None = None, keep_graphs: bool = False):
        self.model, self.subset, self.samples, self.model_input_bs = model, subset, samples, model_input_bs
        self.chunk, self.fused_head, self.spec = chunk, fused_head, spec
        self.run = run
        n = subset.size
        self.shape = (n, n)
        self.n_tokens = samples.shape[0] * (samples.shape[1] - 1)
        self.hvps = 0
        self.passes = 0
        self.nll_sum: float | None = None
        self.graphs: dict | None = {} if keep_graphs else None

    def job(self, vt: torch.Tensor, tag: str = "") -> HVPJob:
        """The additive job of one pass computing ``H`` applied to the rows of ``vt`` (``(p, n)``)."""
        job = HVPJob(self.subset, self.samples, vt.detach().to("cpu", torch.float64).contiguous(), self.model_input_bs, self.chunk, self.fused_head, spec=self.spec, model=self.model, tag=tag)
        job._graphs = self.graphs
        return job

    def _run(self, job: HVPJob) -> Partial | None:
        if self.run is not None:
            return self.run(job)
        return run_serial(job, next(self.model.parameters()).device)

    def matmat(self, v: Any, tag: str = "") -> Any:
        """``H V`` for ``V`` of shape ``(n, p)`` (float64; a NumPy input gives a NumPy output)."""
        is_numpy = not isinstance(v, torch.Tensor)
        vt = torch.as_tensor(v, dtype=torch.float64)
        if vt.ndim != 2 or vt.shape[0] != self.shape[0]:
            raise ValueError(f"expected V of shape ({self.shape[0]}, p), got {tuple(vt.shape)}")
        sums = self._run(self.job(vt.T, tag))
        self.passes += 1
        self.hvps += vt.shape[1]
        if sums is None:  # a torchrun rank other than 0
            return None
        self.nll_sum = float(sums["nll_sum"])
        out = (sums["hv_sum"] / self.n_tokens).T.contiguous()
        return out.numpy() if is_numpy else out

    def matvec(self, v: Any) -> Any:
        """``H v`` for ``v`` of shape ``(n,)``."""
        is_numpy = not isinstance(v, torch.Tensor)
        t = torch.as_tensor(v, dtype=torch.float64).reshape(-1, 1)
        out = self.matmat(t)[:, 0]
        return out.numpy() if is_numpy else out

    def __matmul__(self, v: Any) -> Any:
        return self.matvec(v) if getattr(v, "ndim", 2) == 1 else self.matmat(v)

    def to_scipy(self):
        """A :class:`scipy.sparse.linalg.LinearOperator` view (float64, symmetric: ``rmatvec = matvec``)."""
        import numpy as np
        from scipy.sparse.linalg import LinearOperator

        return LinearOperator(self.shape, matvec=self.matvec, rmatvec=self.matvec, matmat=self.matmat, rmatmat=self.matmat, dtype=np.float64)
