"""``hessian_sweep.py --fsdp --over block`` under torchrun: the model sharded over the ranks with FSDP2, each block's
products taken on the shards by :class:`lib.products.fsdp.ShardedOperator` (finite differences of sharded gradients).

The sweep's algorithms (Lanczos, probes, SLQ: :mod:`lib.hessian.sweep`) run on whole unit vectors, the same on every
rank (their seeds come from the unit's name): a product ``H_uu V`` passes each rank its rows of ``V`` (the dim-0
shards of the block's weights, :attr:`lib.spectrum.vectors.VectorSpace.segments`), and the rows of ``H_uu V`` come
back all-gathered, so every rank holds the whole product (:class:`GatheredOperator`). The model's parameters are
sharded, not the unit's vectors: a block's vectors (``n_u`` float64 entries each, Lanczos keeping up to
``--max_iter`` of them) are held whole on every rank. Only the unit's weights require gradients while it runs, so
each backward stops at the block.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ..objective.subsets import Subset
from ..products import fsdp

F64 = torch.float64


def _all_gather(obj: Any) -> list[Any]:
    """Every rank's ``obj`` in rank order (a collective)."""
    import torch.distributed as dist

    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


class GatheredOperator:
    """``H`` of the mean next-token NLL w.r.t. the whole parameters of ``subset`` of the FSDP-sharded ``model``, on
    whole vectors: :meth:`matmat` maps ``V`` ``(n, p)`` (float64, the same on every rank) to ``H V`` ``(n, p)``
    (float64 on the host, the same on every rank). Collective: every rank calls it with the same ``V``."""

    def __init__(
        self,
        model: nn.Module,
        subset: Subset,
        samples: torch.Tensor,
        model_input_bs: int,
        fd: Any,
        device: torch.device,
    ):
        model.requires_grad_(False)  # this unit's weights only: the backward stops at the block
        for name in subset.param_names:
            model.get_parameter(name).requires_grad_(True)
        self.op = fsdp.ShardedOperator(model, subset, samples, model_input_bs, fd, device)
        self.n = self.op.n
        self.shape = (self.n, self.n)
        self.segments: list[tuple[tuple[int, int], ...]] = _all_gather(self.op.space.segments)
        """Every rank's ``(global start, length)`` rows, in its local order."""

    def matmat(self, v: torch.Tensor) -> torch.Tensor:
        """``H V`` for the whole ``V`` ``(n, p)``: this rank's rows through the sharded operator, the rows of every rank
        all-gathered."""
        mine = self.segments[self.op.rank]
        local = torch.cat([v[s : s + k] for s, k in mine]) if mine else v[:0]
        hv = self.op.matmat(self.op.space.block(local)).to("cpu", F64)
        out = torch.empty(self.n, v.shape[1], dtype=F64)
        for segs, piece in zip(self.segments, _all_gather(hv)):
            at = 0
            for s, k in segs:
                out[s : s + k] = piece[at : at + k]
                at += k
        return out

    def kept_graph_bytes(self) -> int:
        """0: finite-difference products keep no graph, so nothing is gained by keeping this operator once another
        unit's is made (and each sets which weights require gradients: only one may be live)."""
        return 0

    def report(self) -> dict[str, Any]:
        """The sharded operator's report (collective: :meth:`lib.products.fsdp.ShardedOperator.report`)."""
        return self.op.report()


def operator_maker(run: Any, model: nn.Module, subset: Subset) -> Any:
    """Shard ``model`` (loaded on the host) over the torchrun ranks (:func:`lib.products.fsdp.shard`, once, with the
    weights of ``subset``, the union of the units) and return ``make(unit_subset, **kw)``: a :class:`GatheredOperator`
    of a unit (``kw``, the in-process operator's settings, do not apply)."""
    from torch.distributed.fsdp import FSDPModule

    device = run.devices[0]
    fsdp.init(device)
    if not isinstance(model, FSDPModule):
        fsdp.shard(model, subset, device)
    fd = run.products().fd_settings
    bs = int(run.spec.data.model_input_bs)

    def make(unit: Subset, **kw: Any) -> GatheredOperator:
        return GatheredOperator(model, unit, run.samples, bs, fd, device)

    return make
