"""The product strategy: how a :class:`lib.products.operator.ProductJob` takes ``H v`` on one batch, with every capability
the jobs and the operator use declared here (no attribute probing, no test of a concrete class elsewhere).

Two strategies exist: :class:`lib.products.operator.ReverseOverReverse` (exact, double backward on the retained gradient
graph) and :class:`lib.products.finite_difference.FiniteDifference` (two or four first-order gradients per product). A third
one (compiled, low-precision, ...) subclasses :class:`Products`, implements :meth:`Products.graph` and
:meth:`Products.__call__`, and overrides the capabilities that differ from the defaults (those of the exact
strategy).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from typing import Any, ClassVar

import torch
from torch import nn

Progress = Callable[[int], None]
Rows = Callable[[int, int], torch.Tensor]
"""``rows(a, b)``: vectors ``a..b-1`` as a ``(b - a, n)`` block."""
Sink = Callable[[int, torch.Tensor, torch.Tensor], None]
"""``sink(a, V, H V)``: receives the products of vectors ``a..a+len(V)-1``."""


class Products(ABC):
    """How a job computes ``H v`` on one batch, and what that implies for the job.

    ``name`` (an attribute or property of the subclass) goes into every job's configuration, so checkpoints and
    pass logs never mix methods. The class attributes are the capabilities the jobs read:

    * ``exact`` -- products without a step error (the exact scripts report no asymmetry, the spectrum's JSON
      reports chunk and graph-cache statistics);
    * ``batched`` -- takes a block of vectors per call (a chunk is chosen, :class:`lib.products.operator.ChunkPolicy`);
    * ``double_backward`` -- differentiates the gradient graph (the loss keeps it; SDPA falls back to math);
    * ``keeps_graphs`` -- a batch's graph may be kept between passes (:class:`lib.products.operator.GraphCache`);
    * ``layer_outputs`` -- the exact Hessian job may take its products in the layers' output space (only the
      double backward on the model's own graph: off by default).
    """

    name: str
    exact: ClassVar[bool] = True
    batched: ClassVar[bool] = True
    double_backward: ClassVar[bool] = True
    keeps_graphs: ClassVar[bool] = True
    layer_outputs: ClassVar[bool] = False

    @abstractmethod
    def graph(self, fn: Callable[[torch.Tensor], torch.Tensor], x0: torch.Tensor) -> Any:
        """Once per batch: what the products of ``fn`` at ``x0`` start from (it has ``x`` and ``value``)."""

    @abstractmethod
    def __call__(
        self,
        graph: Any,
        rows: Rows,
        count: int,
        sink: Sink,
        chunk: int,
        progress: Progress | None = None,
        start: int = 0,
    ) -> int:
        """``sink(a, v, H v)`` for vectors ``start..count-1`` of ``rows``, ``chunk`` at a time (when ``batched``);
        returns the chunk that worked."""

    def method_name(self, method: str) -> str:
        """The method a :class:`lib.hessian.exact.HessianResult` names, given the job's ``method`` (``rev-rev``,
        ``autograd``): default, this strategy's name without its settings."""
        return self.name.split("(")[0]

    def vector_dtype(self, dtype: torch.dtype) -> torch.dtype:
        """The dtype the vectors are given in for a model in ``dtype`` (default: the model's)."""
        return dtype

    def watch(self, graph: Any, model: nn.Module) -> None:
        """Called with the module ``fn`` runs once a batch's ``graph`` is built (default: nothing)."""
        return None

    def graph_sums(self, graph: Any) -> dict[str, torch.Tensor]:
        """Additive counts kept on a batch's graph, added to the unit's partial sums (default: none)."""
        return {}

    def stats(self, sums: dict[str, torch.Tensor] | None) -> Any | None:
        """The method's statistics from summed partials (:meth:`graph_sums` added up), ``None`` if it keeps none."""
        return None

    def report(self, dtype: torch.dtype, stats: Any | None, counted: str = "") -> dict[str, Any]:
        """For the JSON sidecars: how the HVPs were taken (default ``{"hvp": "exact"}``)."""
        return {"hvp": "exact"}

    @property
    def fd_settings(self) -> Any | None:
        """The finite-difference settings (:class:`lib.products.finite_difference.FDSettings`) the sharded operator
        (:mod:`lib.products.fsdp`, finite differences only) takes; ``None`` for products that are not finite differences."""
        return None
