"""One protocol for every curvature operator: :class:`CurvatureOperator` (``shape``, ``dtype``, ``device``,
``matmat`` on ``(n, p)`` blocks), implemented by :class:`lib.products.operator.HessianOperator` (``H`` over the samples),
:class:`lib.estimators.diagonal.ggn.GGNOperator` (one batch's GGN) and :class:`lib.products.fsdp.ShardedOperator` (``H`` on
FSDP shards: its blocks are this rank's rows ``(local, p)`` of the ``(n, p)`` block, :class:`lib.spectrum.vectors.VectorSpace`).
:class:`OperatorViews` adds ``matvec``, ``@`` and a SciPy view on top of ``matmat``; where a process holds no
result (a torchrun rank other than 0), the view refuses in one line instead of handing SciPy ``None``.
"""

from __future__ import annotations

from typing import Any, Protocol, runtime_checkable

import torch


@runtime_checkable
class CurvatureOperator(Protocol):
    """A symmetric ``n x n`` curvature matrix given by block products.

    Attributes:
        shape: ``(n, n)``.
        dtype: the dtype of the blocks ``matmat`` returns.
        device: where the blocks ``matmat`` returns live.
    """

    shape: tuple[int, int]
    dtype: torch.dtype
    device: torch.device

    def matmat(self, v: Any) -> Any:
        """``H V`` for ``V`` of shape ``(n, p)`` (a sharded operator: this rank's rows ``(local, p)``); same shape."""
        ...


class NoResultHere(RuntimeError):
    """A product was asked for in a process that holds no result (a torchrun rank other than 0)."""


class OperatorViews:
    """``matvec``, ``@`` and :meth:`to_scipy` for a class with ``shape`` and ``matmat`` (which may return ``None``
    in a process that holds no result)."""

    shape: tuple[int, int]

    def matmat(self, v: Any) -> Any:  # pragma: no cover - implemented by the operator
        """``H V`` for ``V`` of shape ``(n, p)``, or ``None`` where this process holds no result."""
        raise NotImplementedError

    def _held(self, out: Any) -> Any:
        if out is None:
            raise NoResultHere(
                "this process holds no result of H V (a torchrun rank other than 0): "
                "use the operator on rank 0, or broadcast its products"
            )
        return out

    def matvec(self, v: Any) -> Any:
        """``H v`` for ``v`` of shape ``(n,)`` (a NumPy input gives a NumPy output)."""
        is_numpy = not isinstance(v, torch.Tensor)
        t = torch.as_tensor(v, dtype=torch.float64).reshape(-1, 1)
        out = self._held(self.matmat(t))[:, 0]
        return out.numpy() if is_numpy else out

    def __matmul__(self, v: Any) -> Any:
        return self.matvec(v) if getattr(v, "ndim", 2) == 1 else self.matmat(v)

    def to_scipy(self) -> Any:
        """A :class:`scipy.sparse.linalg.LinearOperator` view (float64, symmetric: ``rmatvec = matvec``); every
        product raises :class:`NoResultHere` in one line where this process holds no result."""
        import numpy as np
        from scipy.sparse.linalg import LinearOperator

        mm = lambda v: self._held(self.matmat(v))  # noqa: E731
        mv = lambda v: self._held(self.matmat(np.asarray(v).reshape(-1, 1)))[:, 0]  # noqa: E731
        return LinearOperator(
            self.shape, matvec=mv, rmatvec=mv, matmat=mm, rmatmat=mm, dtype=np.float64
        )
