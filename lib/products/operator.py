"""The library's one second-order primitive: Hessian-matrix products ``H V`` of the additive loss.

Low level: on the retained graph of ``g = grad f(x)`` (one forward and one ``create_graph`` backward),
``H v = d/dx (v . g)`` is one more backward; :func:`hvp_products` takes a block of ``count`` vectors
``chunk`` at a time in batched backwards (``is_grads_batched``), halving ``chunk`` on CUDA
out-of-memory. The exact Hessian (:mod:`lib.hessian.exact`: ``V`` = unit vectors), the diagonal estimators
(:mod:`lib.hessian.diagonal`: probes, exact entries, XDiag's basis) and the spectrum (:mod:`lib.spectrum.algorithms`:
Krylov blocks) all go through it; :class:`ChunkPolicy` is the one place where the chunk is chosen (given,
else measured by :func:`lib.products.autotune.tune` on blocks of at least ``TUNE_MIN_PRODUCTS`` vectors, else 1).

Middle level: :class:`ProductJob` is the one base of the jobs made of such products (batching, digests, model
loading, chunking, the product method as a :class:`Products` strategy); :class:`lib.hessian.exact.ExactHessianJob`
(unit rows), :class:`lib.hessian.diagonal.DiagonalJob` (probe rows with reducing sinks) and :class:`HVPJob` (Krylov
blocks) are thin users of it, and the ``--compare`` job (:class:`lib.hessian.curvature.CurvatureJob`) holds an exact one.

High level: :class:`HessianOperator` is ``H``, the Hessian of the *mean* next-token NLL over ``b``
samples w.r.t. a flat subset (``H = sum_s H_s / (b (seqlen - 1))``, ``H_s`` per batch of
``model_input_bs`` samples, on the sample's own gradient graph), as a linear operator: ``H @ V``,
``matvec``, ``matmat`` and a :class:`scipy.sparse.linalg.LinearOperator` view. Each product is one
pass over the samples, an additive job (:class:`HVPJob`), so it runs serially, on several worker
processes or under torchrun, with checkpoints (:func:`lib.runtime.parallel.run_job`).
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, ClassVar, NamedTuple

import torch
from torch import nn

from ..model.models import ModelSpec
from ..objective.loss import SubsetLoss
from ..objective.subsets import Subset
from ..runtime import threads
from ..runtime.jobs import ModelJob, Partial, run_serial
from .autotune import Compute, Tuning, free_memory, samples_per_forward, tune
from .base import Products
from .finite_difference import HVP_METHODS, FDSettings, FDStats, FiniteDifference
from .linop import OperatorViews

Progress = Callable[[int], None]
Rows = Callable[[int, int], torch.Tensor]
"""``rows(start, stop)``: the vectors ``start..stop-1`` of a block, shape ``(stop - start, n)``."""
Sink = Callable[[int, torch.Tensor, torch.Tensor], None]
"""``sink(start, v, hv)``: receives the chunk of vectors starting at ``start`` and their products."""


def hvp_rows(g: torch.Tensor, x: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """``H v_r`` for the rows of ``v`` (``(m, n)``) on the retained graph of ``g = grad f(x)``; returns ``(m, n)``."""
    if v.shape[0] == 1:
        (hv,) = torch.autograd.grad(g, x, grad_outputs=v[0], retain_graph=True)
        return hv.unsqueeze(0)
    (hv,) = torch.autograd.grad(g, x, grad_outputs=v, retain_graph=True, is_grads_batched=True)
    return hv


def hvp_products(
    g: torch.Tensor,
    x: torch.Tensor,
    rows: Rows,
    count: int,
    sink: Sink,
    chunk: int,
    progress: Progress | None = None,
    start: int = 0,
) -> int:
    """``sink(start, v, H v)`` for consecutive chunks ``v = rows(start, stop)`` of vectors ``start..count-1``.

    ``chunk`` vectors share one batched backward; on a CUDA out-of-memory error the chunk is halved
    and redone (an error at ``chunk == 1`` is raised): the library's one out-of-memory policy. Returns
    the chunk size that worked, for the caller to keep for later blocks. ``start > 0`` continues a
    block whose first vectors were done already (e.g. while :func:`lib.products.autotune.tune_chunk` measured).
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


TUNE_MIN_PRODUCTS = 16
"""Fewest vectors of one block on which the chunk is measured (fewer: one at a time, not measured)."""


@dataclass
class ChunkPolicy:
    """How many vectors share one batched backward, for every product of one job (per process).

    ``given`` (``--chunk``): that many, halved on out-of-memory. Else, per size ``n`` of ``x``:
    measured by :func:`lib.products.autotune.tune` the first time a block has at least ``min_products`` vectors (the
    measured products are kept), then that chunk for every later block of that size; before that, one at a time.
    """

    given: int | None = None
    tunings: dict[int, Tuning] = field(default_factory=dict)
    min_products: int = TUNE_MIN_PRODUCTS

    def run(
        self, compute: Compute, count: int, size: int, measure: Callable[[Compute, int], Tuning]
    ) -> None:
        """Vectors ``0..count-1`` of a block through ``compute(start, stop, chunk)`` (see :data:`lib.products.autotune.Compute`)
        with the chosen chunk, ``measure(compute, count)`` choosing it the first time for this ``size``."""
        done = 0
        chunk = self.given or (self.tunings[size].chunk if size in self.tunings else None)
        if chunk is None and count >= self.min_products:
            self.tunings[size] = measure(compute, count)
            chunk, done = self.tunings[size].chunk, self.tunings[size].done
        used = compute(
            done, count, chunk or 1
        )  # smaller than chunk after a CUDA out-of-memory halving
        if self.given:
            self.given = used
        elif size in self.tunings:
            self.tunings[size].chunk = used

    def chosen(self) -> dict[int, int]:
        """The chunk used so far for each size ``n`` (measured or reused); ``{}`` with a given chunk (nothing to
        record)."""
        return {} if self.given else {n: t.chunk for n, t in self.tunings.items()}

    def reuse(self, chunks: dict[int, int]) -> None:
        """Use ``chunks`` (``{n: chunk}``, recorded by an earlier session of the run) as given, for sizes not chosen
        yet: the later blocks of size ``n`` are then computed exactly as in the session that chose them."""
        if not self.given:
            for n, c in chunks.items():
                self.tunings.setdefault(int(n), Tuning(int(c), 0))

    def report(self, given: int | None, flag: str) -> dict[str, Any]:
        """For the JSON: ``{flag: given, "measured": False}``, or ``{flag: "auto", "measured": {n: timings} or None}``."""
        if given:
            return {flag: given, "measured": False}
        return {
            flag: "auto",
            "measured": {str(n): t.to_json() for n, t in self.tunings.items()} or None,
        }


def gradient_graph(
    fn: Callable[[torch.Tensor], torch.Tensor], x0: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(x, g, value)``: a leaf copy ``x`` of ``x0``, ``g = grad fn(x)`` with its graph kept (``create_graph``), ``fn(x)``."""
    x = x0.detach().clone().requires_grad_(True)
    value = fn(x)
    (g,) = torch.autograd.grad(value, x, create_graph=True)
    return x, g, value


GRAPH_MEMORY_FRACTION = 0.25
"""Share of the free memory (host for CPU, device for GPU) that the kept gradient graphs may take, by their
measured bytes: a quarter, as the CPU count (saved tensors only) saw ~70% of the resident-memory growth per
kept graph on the embedded model (8.4 of 12 MB), and the products' own intermediates need room too."""


def keep_all_graphs(
    mode: bool | str,
    batches: int,
    graph_bytes: int,
    free_bytes: int,
    fraction: float = GRAPH_MEMORY_FRACTION,
) -> bool:
    """Keep every batch's gradient graph between passes? ``mode`` True / False force it; ``"auto"``: when the
    ``batches - 1`` graphs still to build, ``graph_bytes`` each (the first one's, measured), fit in ``fraction``
    of ``free_bytes`` (measured after the first graph was built)."""
    if mode in (True, False):
        return bool(mode)
    if mode != "auto":
        raise ValueError(f"keep_graphs must be True, False or 'auto', got {mode!r}")
    return (batches - 1) * graph_bytes <= fraction * free_bytes


def graph_bytes_measured(
    build: Callable[[], Any], device: torch.device, exclude: set[int]
) -> tuple[Any, int]:
    """``(build(), bytes)``: the bytes the result's autograd graph holds. CUDA: the allocated-memory delta;
    otherwise the unique storages of the tensors the graph saves (``saved_tensors_hooks``), except those
    whose ``data_ptr`` is in ``exclude`` (the model's parameters), plus the returned tensors."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        before = torch.cuda.memory_allocated(device)
        out = build()
        torch.cuda.synchronize(device)
        return out, torch.cuda.memory_allocated(device) - before
    seen: dict[int, int] = {}

    def count(t: torch.Tensor) -> None:
        st = t.untyped_storage()
        if st.data_ptr() not in exclude:
            seen[st.data_ptr()] = st.nbytes()

    def pack(t: torch.Tensor) -> torch.Tensor:
        count(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = build()
    for t in out if isinstance(out, tuple) else (out,):
        if isinstance(t, torch.Tensor):
            count(t)
    return out, sum(seen.values())


@dataclass
class GraphCache:
    """Per-process gradient graphs ``{unit: (x, g, value)}`` shared by the passes (jobs) of one operator.

    ``mode``: True / False / ``"auto"`` (:func:`keep_all_graphs`, decided on the first graph built in this
    process); ``keep``: the decision (None before it), ``graph_bytes``: the first graph's measured bytes,
    ``free_bytes``: the free memory it was compared with. Not pickled: worker processes rebuild every pass.
    """

    mode: bool | str = "auto"
    keep: bool | None = None
    graph_bytes: int | None = None
    free_bytes: int | None = None
    graphs: dict = field(default_factory=dict)

    def get(
        self,
        k: int,
        batches: int,
        build: Callable[[], Any],
        device: torch.device,
        exclude: Callable[[], set[int]],
    ) -> Any:
        """Unit ``k``'s graph: kept, or built (measured and decided on the first one; ``exclude()``: the storages not
        to count, e.g. the model's parameters, asked for only then)."""
        if k in self.graphs:
            return self.graphs[k]
        if self.keep is None:
            if self.mode == "auto":
                out, self.graph_bytes = graph_bytes_measured(build, device, exclude())
                self.free_bytes = free_memory(device)
            else:
                out = build()
            self.keep = keep_all_graphs(
                self.mode, batches, self.graph_bytes or 0, self.free_bytes or 0
            )
        else:
            out = build()
        if self.keep:
            self.graphs[k] = out
        return out

    def report(self) -> dict[str, Any]:
        """For the JSON: mode, decision, the measured bytes and the free memory they were compared with."""
        out = {
            "mode": self.mode,
            "kept": bool(self.keep),
            "graph_bytes": self.graph_bytes,
            "free_bytes": self.free_bytes,
            "graphs_kept": len(self.graphs),
            "memory_fraction": GRAPH_MEMORY_FRACTION,
        }
        if self.keep is None:
            out["note"] = (
                "no pass ran in this process: worker processes (--devices) rebuild the graphs every pass"
            )
        return out


def digest(t: torch.Tensor) -> str:
    """SHA-256 of a tensor's bytes (CPU, contiguous); dtypes NumPy lacks (bfloat16, float8) are hashed as float64
    (which holds them exactly)."""
    t = t.detach().cpu().contiguous()
    if t.is_floating_point() and t.dtype not in (torch.float16, torch.float32, torch.float64):
        t = t.to(torch.float64)
    return hashlib.sha256(t.numpy().tobytes()).hexdigest()


class BatchGraph(NamedTuple):
    """What one batch's Hessian-vector products start from: the point ``x`` (a leaf copy of ``x0``), the gradient
    ``g = grad f(x)`` there (reverse-over-reverse: with its graph kept) and the batch's summed loss ``value = f(x)``."""

    x: torch.Tensor
    g: torch.Tensor
    value: torch.Tensor


@dataclass(frozen=True)
class ReverseOverReverse(Products):
    """The default :class:`Products`: exact products ``H v = d/dx (v . g)`` on the retained gradient graph
    (:func:`gradient_graph`, :func:`hvp_products`)."""

    name: str = "exact"
    layer_outputs: ClassVar[bool] = True

    def method_name(self, method: str) -> str:
        return method

    def graph(self, fn: Callable[[torch.Tensor], torch.Tensor], x0: torch.Tensor) -> BatchGraph:
        return BatchGraph(*gradient_graph(fn, x0))

    def __call__(
        self,
        graph: BatchGraph,
        rows: Rows,
        count: int,
        sink: Sink,
        chunk: int,
        progress: Progress | None = None,
        start: int = 0,
    ) -> int:
        return hvp_products(graph.g, graph.x, rows, count, sink, chunk, progress, start=start)


REVERSE_OVER_REVERSE = ReverseOverReverse()


def products_for(hvp: str = "exact", fd: FDSettings | None = None) -> Products:
    """The :class:`Products` of ``--hvp``: :data:`REVERSE_OVER_REVERSE` (``exact``) or finite differences with ``fd``."""
    if hvp not in HVP_METHODS:
        raise ValueError(f"hvp must be one of {HVP_METHODS}, got {hvp!r}")
    return REVERSE_OVER_REVERSE if hvp == "exact" else FiniteDifference(fd or FDSettings())


def graph_sums(products: Products, graph: Any) -> dict[str, torch.Tensor]:
    """Additive counts a product method kept on a batch's graph (finite differences: products and kink retries); none
    for exact products (:meth:`Products.graph_sums`)."""
    return products.graph_sums(graph)


def fd_stats(products: Products, sums: Partial | None) -> FDStats | None:
    """The finite-difference counts of summed partials (``None`` for exact products, :meth:`Products.stats`)."""
    return products.stats(sums)


def unit_rows(
    n: int, start: int, stop: int, like: torch.Tensor, entries: torch.Tensor | None = None
) -> torch.Tensor:
    """Rows ``start..stop-1`` of the ``n x n`` identity (``entries`` given: the unit vectors ``e_i`` of
    ``entries[start:stop]``), shape ``(stop - start, n)``, with ``like``'s dtype and device."""
    cols = (
        torch.arange(start, stop, device=like.device)
        if entries is None
        else entries[start:stop].to(like.device)
    )
    e = torch.zeros(stop - start, n, dtype=like.dtype, device=like.device)
    e[torch.arange(stop - start, device=like.device), cols] = 1
    return e


def store_rows(out: torch.Tensor) -> Sink:
    """A sink writing each chunk's products into the rows of ``out`` (``(count, n)``)."""

    def sink(start: int, v: torch.Tensor, hv: torch.Tensor) -> None:
        out[start : start + len(hv)] = hv

    return sink


class ProductJob(ModelJob):
    """Base of the additive jobs (:mod:`lib.runtime.jobs`) made of Hessian-vector products: unit ``k`` is batch ``k`` of
    ``samples`` (``(b, seqlen)``), ``model_input_bs`` rows each. It owns what every such job shares:

    * batching: :meth:`num_units`, :meth:`batch`, :meth:`first_sample`, :meth:`describe_unit`, :attr:`tokens`;
    * the model: ``model`` as given, or loaded from ``spec`` in each process (:meth:`ModelJob.ensure_model`, in
      :meth:`setup`);
    * the identity for checkpoints: :meth:`base_config` (sample digest and shape, batching, model, product method);
    * the products: :meth:`batch_graph` once per batch, then :meth:`multiply` -- ``H v`` for a block of vectors
      through ``products`` (a :class:`Products`, default :data:`REVERSE_OVER_REVERSE`), ``chunk`` vectors per call,
      the chunk given or chosen by :class:`ChunkPolicy` (measured on the first block of each size with at least
      ``min_products`` vectors); :meth:`chunk_report` says which.

    Subclasses add their own inputs and implement ``steps_per_unit``, ``run_unit`` and ``config``. Sums stay
    per unit (the runners add them in float64 in unit order), so every runner gives the same bits.
    """

    min_products: int = TUNE_MIN_PRODUCTS
    _policy: ChunkPolicy | None = None
    """Per-process chunk choice (not pickled: each worker measures its own); a job may be handed a shared one."""

    def __init__(
        self,
        samples: torch.Tensor,
        model_input_bs: int = 1,
        chunk: int | None = None,
        fused_head: bool | None = None,
        spec: ModelSpec | None = None,
        model: nn.Module | None = None,
        products: Products | None = None,
    ):
        if model is None and spec is None:
            raise ValueError("give a model or a ModelSpec")
        self.samples, self.model_input_bs, self.chunk, self.fused_head = (
            samples,
            model_input_bs,
            chunk,
            fused_head,
        )
        self.spec, self.model = spec, model
        self.products = REVERSE_OVER_REVERSE if products is None else products

    def setup(self, device: torch.device) -> None:
        self.ensure_model(device)
        if self._policy is None:
            self._policy = ChunkPolicy(self.chunk, min_products=self.min_products)

    def num_units(self) -> int:
        return -(-self.samples.shape[0] // self.model_input_bs)

    def first_sample(self, k: int) -> int:
        """Index of unit ``k``'s first sample."""
        return k * self.model_input_bs

    def batch(self, k: int, device: torch.device | None = None) -> torch.Tensor:
        """Unit ``k``'s samples, ``(<= model_input_bs, seqlen)``, on ``device`` if given."""
        rows = self.samples[self.first_sample(k) : self.first_sample(k + 1)]
        return rows if device is None else rows.to(device)

    def describe_unit(self, k: int) -> str:
        bs = self.model_input_bs
        return f"sample {k}" if bs == 1 else f"samples {k * bs}..{(k + 1) * bs - 1}"

    @property
    def tokens(self) -> int:
        """Tokens of a full batch (the memory bound of :func:`lib.products.autotune.tune`)."""
        return self.model_input_bs * self.samples.shape[1]

    def subset_loss(self, subset: Subset) -> SubsetLoss:
        """The summed NLL as a function of ``subset`` on the job's model, set up for its product method (no double
        backward: SDPA keeps its fused kernels)."""
        double = self.products.double_backward
        return SubsetLoss(self.model, subset, fused_head=self.fused_head, double_backward=double)

    def batch_graph(
        self, objective: SubsetLoss, batch: torch.Tensor, x0: torch.Tensor | None = None
    ) -> BatchGraph:
        """What the products of ``objective`` on ``batch`` at ``x0`` (default ``objective.x0()``) start from."""
        graph = self.products.graph(
            lambda z: objective(z, batch), objective.x0() if x0 is None else x0
        )
        self.products.watch(
            graph, objective.model
        )  # e.g. finite differences: the model's ReLU kinks
        return graph

    def multiply(
        self,
        graph: BatchGraph,
        rows: Rows,
        count: int,
        sink: Sink,
        progress: Progress | None = None,
    ) -> None:
        """``sink(start, v, H v)`` for the ``count`` vectors of ``rows`` in chunks: the given ``chunk``, else the one
        measured (:func:`lib.products.autotune.tune`, budget: ``count`` products in each unit) the first time a block of
        this size of ``x`` has at least ``min_products`` vectors (the measured products are kept), else 1."""
        x = graph.x
        if not self.products.batched:  # one vector at a time: no chunk to choose
            self.products(graph, rows, count, sink, 1, progress)
            return
        compute = lambda start, stop, chunk: self.products(
            graph, rows, stop, sink, chunk, progress, start=start
        )  # noqa: E731
        measure = lambda c, m: tune(
            c, m, self.model, self.tokens, x, total=count * self.num_units()
        )  # noqa: E731
        self._policy.run(compute, count, x.numel(), measure)

    def chunk_report(self, flag: str = "chunk") -> dict[str, Any]:
        """For the JSON: the given chunk, or per size of ``x`` the measured choice (:meth:`ChunkPolicy.report`)."""
        return (self._policy or ChunkPolicy()).report(self.chunk, flag)

    def base_config(self) -> dict[str, Any]:
        """The shared part of :meth:`config`: samples (SHA-256 and shape), batching, head, model identity, product method."""
        return {
            "samples_sha256": digest(self.samples),
            "samples_shape": list(self.samples.shape),
            "model_input_bs": self.model_input_bs,
            "fused_head": self.fused_head,
            "model": None if self.spec is None else self.spec.identity(),
            "products": self.products.name,
        }


def subset_digest(subset: Subset) -> str:
    """SHA-256 of a subset's parameter names and entry digests (no Python list of its entries: whole models too)."""
    return hashlib.sha256(
        "".join(f"{s.param_name}:{digest(s.flat_index)};" for s in subset.slices).encode()
    ).hexdigest()


class HVPJob(ProductJob):
    """One pass of ``H V`` over the samples as an additive job (:class:`ProductJob`): unit ``k`` = batch ``k``.

    ``vt = V^T`` (``(p, n)``, float64 on the CPU). ``run_unit`` returns ``{"hv_sum": (p, n), "nll_sum": ()}``:
    the batch's summed-NLL Hessian applied to the block (not normalized). ``tag`` (e.g. a pass index)
    goes into :meth:`config`, so checkpoints of different passes are never mixed up.
    """

    def __init__(
        self,
        subset: Subset,
        samples: torch.Tensor,
        vt: torch.Tensor,
        model_input_bs: int = 1,
        chunk: int | None = None,
        fused_head: bool | None = None,
        spec: ModelSpec | None = None,
        model: nn.Module | None = None,
        tag: str = "",
        products: Products | None = None,
    ):
        super().__init__(samples, model_input_bs, chunk, fused_head, spec, model, products)
        self.subset, self.vt, self.tag = subset, vt, tag

    _graphs: GraphCache | None = None
    """Per-process gradient graphs shared by the jobs of one operator (not pickled: workers rebuild them)."""
    _prepared: dict | None = None
    """Per-process ``{model id: (objective, x0)}`` shared by the jobs of one operator (not pickled), so that a pass does
    not rebuild the subset's loss and gather ``x0`` again (seconds for a whole model)."""

    def share(self, graphs: GraphCache, policy: ChunkPolicy, prepared: dict) -> HVPJob:
        """Share an operator's per-process state with this pass's job (not pickled: workers rebuild their own):
        the gradient graphs, the chunk policy, the prepared loss and ``x0``. Returns the job."""
        self._graphs, self._policy, self._prepared = graphs, policy, prepared
        return self

    def setup(self, device: torch.device) -> None:
        super().setup(device)
        key = id(self.model)
        if self._prepared is not None and key in self._prepared:
            self._objective, self._x0 = self._prepared[key]
            return
        self._objective = self.subset_loss(self.subset)
        self._x0 = self._objective.x0()
        if self._prepared is not None:
            self._prepared.clear()
            self._prepared[key] = (self._objective, self._x0)

    def _graph(self, k: int) -> BatchGraph:
        """Batch ``k``'s :class:`BatchGraph`, from the cache when there is one."""
        batch = self.batch(k, self._x0.device)
        build = lambda: self.batch_graph(self._objective, batch, self._x0)  # noqa: E731
        if self._graphs is None or not self.products.keeps_graphs:
            return build()
        params = lambda: {p.untyped_storage().data_ptr() for p in self.model.parameters()}  # noqa: E731
        return self._graphs.get(k, self.num_units(), build, self._x0.device, params)

    def steps_per_unit(self) -> int:
        return self.vt.shape[0]

    def run_unit(self, k: int, progress: Progress | None = None) -> Partial:
        graph = self._graph(k)
        dtype = self.products.vector_dtype(graph.x.dtype)  # finite differences: float32 for bf16
        if (
            getattr(self, "_vt", None) is None or self._vt.device != graph.x.device
        ):  # once per pass, not per batch
            self._vt = self.vt.to(device=graph.x.device, dtype=dtype)
        vt = self._vt
        hv = torch.empty_like(vt)
        self.multiply(graph, lambda a, b: vt[a:b], len(vt), store_rows(hv), progress)
        return {
            "hv_sum": hv.detach().cpu(),
            "nll_sum": graph.value.detach().cpu(),
            **graph_sums(self.products, graph),
        }

    def config(self) -> dict[str, Any]:
        return {
            "kind": "hessian_vector_products",
            "tag": self.tag,
            "subset": subset_digest(self.subset),
            **self.base_config(),
            "block_sha256": digest(self.vt),
            "block_shape": list(self.vt.shape),
        }


class HessianOperator(OperatorViews):
    """``H``: the Hessian of the mean next-token NLL over ``samples`` (``(b, seqlen)``) w.r.t. ``subset``, as a linear operator.

    ``H @ V`` / ``matmat(V)``: ``V`` ``(n, p)`` -> ``H V`` ``(n, p)``; ``matvec(v)``: ``(n,)`` -> ``(n,)``. Inputs may be
    torch tensors or NumPy arrays (returned as the same kind); products are computed in the model's
    dtype on its device and summed over batches in float64, sample order. Each call is one pass over
    the samples (one forward + ``create_graph`` backward per batch, then ``p`` HVPs on its graph).
    ``run(job)`` (default: in this process, :func:`lib.runtime.jobs.run_serial`) runs each pass's
    :class:`HVPJob`; pass e.g. ``lambda job: lib.runtime.parallel.run_job(job, settings)`` for several devices, with a
    :class:`lib.runtime.parallel.WorkerPool` in ``settings.pool`` so that every pass reuses the same workers and their models.
    ``hvps`` (products ``H v`` of the whole operator) and ``passes`` count the work done.
    ``keep_graphs``: keep every batch's gradient graph in this process's memory between passes, so a
    pass costs only the HVPs (no forward or first backward): True, False, or ``"auto"`` (default): measure
    the first graph's bytes and keep all ``b / model_input_bs`` graphs when they fit in a quarter of the free host
    (CPU) or device (GPU) memory (:func:`keep_all_graphs`); worker processes always rebuild them. Products
    are bitwise the same either way. ``chunk``: vectors per batched backward, else :class:`ChunkPolicy`
    (measured on blocks of at least ``TUNE_MIN_PRODUCTS`` vectors). ``model_input_bs``: samples per forward, or
    ``"auto"`` (default): :func:`lib.products.autotune.samples_per_forward` as ``hessian_spectrum.py`` resolves it (at most
    ``n`` products per sample), so that the operator and the script batch the same samples.
    :meth:`report` gives the three choices. ``products``: how each ``H v`` is computed (a :class:`Products`;
    default exact reverse-over-reverse), or ``hvp="finite_difference"`` (settings ``fd``): each product a central
    difference of two first-order gradients (:class:`lib.products.finite_difference.FiniteDifference`): no graph is kept
    (``keep_graphs`` and ``chunk`` do not apply), SDPA keeps its fused kernels, and the stored weights are never
    modified (perturbed copies are substituted).
    """

    def __init__(
        self,
        model: nn.Module,
        subset: Subset,
        samples: torch.Tensor,
        model_input_bs: int | str = "auto",
        chunk: int | None = None,
        fused_head: bool | None = None,
        spec: ModelSpec | None = None,
        run: Callable[[HVPJob], Partial | None] | None = None,
        keep_graphs: bool | str = "auto",
        products: Products | None = None,
        hvp: str = "exact",
        fd: FDSettings | None = None,
    ):
        threads.for_library()  # once per process, as the scripts (lib.runtime.library_defaults)
        products = products_for(hvp, fd) if products is None else products
        self.model, self.subset, self.samples = model, subset, samples
        device = next(model.parameters()).device
        self.model_input_bs, self.model_input_bs_why = samples_per_forward(
            model_input_bs, model, samples.shape[0], samples.shape[1], subset.size, device
        )
        self.chunk, self.fused_head, self.spec, self.products = chunk, fused_head, spec, products
        self.fd_stats = FDStats()
        self._prepared: dict = {}
        self.run = run
        n = subset.size
        self.shape = (n, n)
        self.dtype, self.device = (
            torch.float64,
            torch.device("cpu"),
        )  # H V comes back float64 on the host
        self.n_tokens = samples.shape[0] * (samples.shape[1] - 1)
        self.hvps = 0
        self.passes = 0
        self.nll_sum: float | None = None
        keep_all_graphs(keep_graphs, 1, 0, 0)  # validates the mode
        self.graphs = GraphCache(keep_graphs)
        self.policy = ChunkPolicy(chunk)

    def job(self, vt: torch.Tensor, tag: str = "") -> HVPJob:
        """The additive job of one pass computing ``H`` applied to the rows of ``vt`` (``(p, n)``)."""
        job = HVPJob(
            self.subset,
            self.samples,
            vt.detach().to("cpu", torch.float64).contiguous(),
            self.model_input_bs,
            self.chunk,
            self.fused_head,
            spec=self.spec,
            model=self.model,
            tag=tag,
            products=self.products,
        )
        return job.share(self.graphs, self.policy, self._prepared)

    def record(self, sums: Partial) -> None:
        """Count a finished pass's finite-difference statistics (its sums' ``fd_*`` entries; nothing for exact products)."""
        stats = fd_stats(self.products, sums)
        if stats is not None:
            self.fd_stats.add(stats)

    def kept_graph_bytes(self) -> int:
        """Bytes of the gradient graphs this operator keeps in this process (the first graph's measured bytes times
        the graphs kept; 0 when none are kept, e.g. with worker processes or finite differences)."""
        return (self.graphs.graph_bytes or 0) * len(self.graphs.graphs)

    def report(self) -> dict[str, Any]:
        """For the JSON: ``{"hvp": {"hvp": "exact"}, "keep_graphs": GraphCache.report(), "chunk": ChunkPolicy.report(),
        "model_input_bs": {...}}`` of this process; with finite differences ``{"hvp": {settings, kink retries...},
        "model_input_bs": {...}}`` instead."""
        bs = {"chosen": self.model_input_bs, "why": self.model_input_bs_why}
        if not self.products.exact:
            return {
                "hvp": self.products.report(next(self.model.parameters()).dtype, self.fd_stats),
                "model_input_bs": bs,
            }
        return {
            "hvp": {"hvp": "exact"},
            "keep_graphs": self.graphs.report(),
            "chunk": self.policy.report(self.chunk, "chunk"),
            "model_input_bs": bs,
        }

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
        self.record(sums)
        self.nll_sum = float(sums["nll_sum"])
        out = (
            sums["hv_sum"].div_(self.n_tokens).T.contiguous()
        )  # the sums are this call's own: divided in place
        return out.numpy() if is_numpy else out
