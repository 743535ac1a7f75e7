"""The Hessian operator of a model sharded with FSDP2 under torchrun: finite-difference products on the shards.

``torchrun --nproc_per_node N hessian_spectrum.py --fsdp --params GLOB ...``: every rank loads the model on its
host, :func:`shard` splits it with :func:`torch.distributed.fsdp.fully_shard` (one unit per transformer block,
then the root: embeddings, final norm, head), so each rank keeps ``1/N`` of every parameter (dim-0 rows). The
flat subset ``x`` (whole parameters matched by ``--params``, in the model's order) is therefore sharded too:
rank ``r`` holds, for each parameter, the entries of its rows, and every Lanczos / probe vector is held the same
way (a :class:`lib.spectrum.vectors.VectorSpace` whose segments are those rows; inner products are all-reduced).

A product ``H v`` (:class:`ShardedOperator`) is a central difference of the summed-NLL gradient
(:mod:`lib.products.finite_difference`): each rank writes ``x0 +- e v`` into its own shards (in place, in the model's
dtype), and the gradient of the loss over *all* samples comes back sharded, each rank running the forward and
backward of its share of the batches (batch ``k`` on rank ``k mod N``; a rank out of batches in the last round
runs one with weight 0, so that every rank joins every collective) and FSDP reduce-scattering the *sum* (its
gradient divide factor set to 1). The shards are then copied back from the saved bits: the weights are
bitwise what they were. The kink-aware step (:class:`lib.products.finite_difference.KinkMonitor`) counts crossings on
each rank and all-reduces the count, so every rank takes the same steps. There is no double backward anywhere
(FSDP has none), so SDPA runs its fused kernels and the model may be bf16.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..model.models import find_blocks
from ..objective.loss import summed_nll
from ..objective.subsets import Subset
from ..spectrum.vectors import VectorSpace
from .finite_difference import FDSettings, FDStats, KinkMonitor, fd_products

F64 = torch.float64


def init(device: torch.device) -> tuple[int, int]:
    """Start the process group (gloo on the CPU, NCCL on CUDA) if needed; ``(rank, world)``."""
    import torch.distributed as dist

    from ..runtime.parallel import init_process_group

    init_process_group(device)
    return dist.get_rank(), dist.get_world_size()


def shard(model: nn.Module, subset: Subset, device: torch.device) -> nn.Module:
    """``fully_shard`` every transformer block, then the root, on a 1-D mesh of all ranks on ``device``'s type; the
    subset's parameters require gradients (the others stay frozen); FSDP sums gradients over ranks (divide factor 1)."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import FSDPModule, fully_shard

    model.requires_grad_(False)
    for name in subset.param_names:
        model.get_parameter(name).requires_grad_(True)
    mesh = init_device_mesh(device.type, (dist.get_world_size(),))
    for block in find_blocks(model)[1]:
        fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)
    for m in model.modules():
        if isinstance(m, FSDPModule):
            m.set_gradient_divide_factor(1.0)
            m.set_force_sum_reduction_for_comms(
                True
            )  # plain SUM: gloo has no PREMUL_SUM (float32, bf16)
    return model


def _all_reduce(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    import torch.distributed as dist

    buf = t.to(device=device, dtype=F64).clone()
    dist.all_reduce(buf)
    return buf.to("cpu")


def _all_gather(obj: Any) -> list[Any]:
    import torch.distributed as dist

    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


@dataclass
class Memory:
    """This rank's resident bytes: ``parameters`` (its shards of every parameter), ``saved`` (the subset's original bits kept
    for restoring, the flat ``x0``), ``vectors`` (peak of the vectors the algorithms stored, :attr:`VectorSpace.peak_stored_bytes`)."""

    parameters: int
    saved: int
    vectors: int = 0

    def to_json(self) -> dict[str, int]:
        return {
            "parameters": self.parameters,
            "saved_weights": self.saved,
            "vectors_peak": self.vectors,
            "parameters_and_vectors": self.parameters + self.vectors,
        }


class ShardedOperator:
    """``H`` of the mean next-token NLL over ``samples`` (``(b, seqlen)``) w.r.t. the whole parameters of ``subset`` of an
    FSDP-sharded ``model`` (:func:`shard`), on this rank's shards: :meth:`matmat` maps a ``(local, p)`` block of
    :attr:`space` to ``H V`` (same block and dtype), by :func:`lib.products.finite_difference.fd_products`. Collective: every rank
    calls it with its own block of the same global vectors (:class:`lib.products.linop.CurvatureOperator`: ``dtype`` and
    ``device`` are the space's)."""

    def __init__(
        self,
        model: nn.Module,
        subset: Subset,
        samples: torch.Tensor,
        model_input_bs: int,
        fd: FDSettings,
        device: torch.device,
        vector_dtype: torch.dtype = F64,
    ):
        import torch.distributed as dist

        self.model, self.samples, self.bs, self.fd, self.device = (
            model,
            samples,
            model_input_bs,
            fd,
            device,
        )
        self.rank, self.world = dist.get_rank(), dist.get_world_size()
        self.params = [model.get_parameter(name) for name in subset.param_names]
        self.locals = [p.to_local() for p in self.params]  # views of the sharded storage
        self.x0 = (
            torch.cat([t.detach().reshape(-1) for t in self.locals])
            if self.locals
            else torch.zeros(0)
        )
        self.saved = [
            piece.view_as(t)
            for piece, t in zip(torch.split(self.x0, [t.numel() for t in self.locals]), self.locals)
        ]
        """The original bits, as views of the flat ``x0`` (one copy of the shards)."""
        rows = _all_gather([t.shape[0] if t.dim() else 1 for t in self.locals])
        segments, offset = [], 0
        for i, p in enumerate(self.params):
            row = p.numel() // p.shape[0] if p.dim() else 1
            before = sum(rows[r][i] for r in range(self.rank))
            segments.append((offset + before * row, self.locals[i].numel()))
            offset += p.numel()
        self.n = offset
        self.shape = (
            self.n,
            self.n,
        )  # lib.products.linop.CurvatureOperator; blocks are this rank's rows
        self.space = VectorSpace(
            self.n,
            tuple(segments),
            device,
            vector_dtype,
            lambda t: _all_reduce(t, device),
            self.world,
            self.rank,
        )
        self.x0_norm = math.sqrt(float(self.space.reduce(self.x0.to(F64).pow(2).sum())))
        self.dtype = self.space.dtype  # lib.products.linop.CurvatureOperator (device: the rank's)
        self.n_tokens = samples.shape[0] * (samples.shape[1] - 1)
        units = -(-samples.shape[0] // model_input_bs)
        self.mine = list(range(self.rank, units, self.world))
        self.rounds = -(-units // self.world)
        self.monitor = KinkMonitor(model)
        self.stats = FDStats()
        self.passes = self.hvps = 0
        self.memory = Memory(
            sum(p.to_local().numel() * p.element_size() for p in model.parameters()),
            self.x0.numel() * self.x0.element_size(),
        )

    def _write(self, x: torch.Tensor) -> None:
        """Put the flat local values ``x`` into this rank's shards of the subset's parameters (in place)."""
        start = 0
        with torch.no_grad():
            for t in self.locals:
                t.copy_(x[start : start + t.numel()].view_as(t))
                start += t.numel()

    def restore(self) -> None:
        """Copy the saved original bits back into the shards."""
        with torch.no_grad():
            for t, s in zip(self.locals, self.saved):
                t.copy_(s)

    def gradient(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(this rank's shard of grad f(x), f(x))``, ``f`` the summed NLL over all samples at subset values ``x`` (this
        rank's entries): each rank runs its batches (one weighted 0 when it has none left in the last round)."""
        self._write(x)
        for p in self.params:
            p.grad = None
        total = torch.zeros((), dtype=F64)
        for r in range(self.rounds):
            k = self.mine[r] if r < len(self.mine) else None
            unit = k if k is not None else 0
            batch = self.samples[unit * self.bs : (unit + 1) * self.bs].to(self.device)
            logits = self.model(input_ids=batch, use_cache=False).logits
            loss = summed_nll(logits, batch) * (1.0 if k is not None else 0.0)
            loss.backward()
            total += float(loss.detach())
        g = torch.cat(
            [
                (p.grad.to_local() if p.grad is not None else torch.zeros_like(t)).reshape(-1)
                for p, t in zip(self.params, self.locals)
            ]
        )
        return g, self.space.reduce(total)

    def matmat(self, v: torch.Tensor) -> torch.Tensor:
        """``H V`` for this rank's block ``V`` (``(local, p)``) in the space's dtype on the device, normalized by ``b (seqlen - 1)``."""
        reduce_int = lambda c: int(round(float(self.space.reduce(torch.tensor(float(c))))))  # noqa: E731
        norm = lambda row: math.sqrt(float(self.space.reduce(row.to(F64).pow(2).sum())))  # noqa: E731
        try:
            with self.monitor:
                hv, _, stats = fd_products(
                    self.gradient,
                    self.x0,
                    v.T,
                    self.fd,
                    monitor=self.monitor,
                    x0_norm=self.x0_norm,
                    reduce=reduce_int,
                    norm=norm,
                    n=self.n,
                )
        finally:
            self.restore()
        self.stats.add(stats)
        self.passes += 1
        self.hvps += v.shape[1]
        return (hv / self.n_tokens).T.contiguous().to(self.space.dtype)

    def restored(self) -> bool:
        """Whether every shard holds bitwise the saved original weights (it should after every product)."""
        return all(torch.equal(t, s) for t, s in zip(self.locals, self.saved))

    def report(self) -> dict[str, Any]:
        """For the JSON (collective): settings, kink retries (counted once per HVP over all samples), world size, entries and
        whether the weights are bitwise restored, per rank."""
        hvp = {
            **self.fd.report(self.x0.dtype, self.stats),
            **self.stats.to_json(),
            "counted": "per HVP over all samples",
        }
        return {
            "hvp": hvp,
            "fsdp": {
                "world_size": self.world,
                "units": "one per transformer block, then the root",
                "entries_per_rank": _all_gather(self.space.local),
                "weights_bitwise_restored": _all_gather(self.restored()),
            },
        }

    def gather_memory(self) -> list[dict[str, int]]:
        """Every rank's :class:`Memory` (collective), with the vectors' peak from :attr:`space`."""
        self.memory.vectors = self.space.peak_stored_bytes
        return _all_gather(self.memory.to_json())


def sharded_operator(
    run, subset: Subset, model_input_bs: int, fd: FDSettings, vector_dtype: torch.dtype
) -> ShardedOperator:
    """Under torchrun: start the process group, shard ``run.model`` (loaded on the host) onto this rank's device
    (``run.devices[0]``), and wrap it as a :class:`ShardedOperator` over ``run.samples`` (a :class:`lib.app.pipeline.Run`)."""
    device = run.devices[0]
    init(device)
    shard(run.model, subset, device)
    return ShardedOperator(run.model, subset, run.samples, model_input_bs, fd, device, vector_dtype)


def agree_min(value: int) -> int:
    """The smallest ``value`` over the ranks (e.g. the passes every rank has logged)."""
    import torch.distributed as dist

    t = torch.tensor([value], dtype=torch.int64)
    if dist.get_backend() == "nccl":
        t = t.cuda()
    dist.all_reduce(t, op=dist.ReduceOp.MIN)
    return int(t.item())


def finish() -> None:
    """Wait for every rank (all pass files written), then end the process group."""
    import torch.distributed as dist

    dist.barrier()
    dist.destroy_process_group()


def process_memory(model: nn.Module, saved_bytes: int, space: VectorSpace) -> dict[str, int]:
    """One process's :class:`Memory` (the single-process counterpart of :meth:`ShardedOperator.gather_memory`)."""
    params = sum(p.numel() * p.element_size() for p in model.parameters())
    return Memory(params, saved_bytes, space.peak_stored_bytes).to_json()
