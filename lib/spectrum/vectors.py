"""Where the spectrum algorithms' ``n``-vectors live: blocks held whole or sharded over ranks, in a chosen dtype, with
stored bases on the device, the host or disk.

The algorithms of :mod:`lib.spectrum.algorithms` touch the ``n`` dimension only through a :class:`VectorSpace`: a block is a
``(local, p)`` tensor holding this process's entries of ``p`` global vectors, and every sum over ``n`` (inner
products, norms) is formed locally and then summed over the processes by :meth:`VectorSpace.reduce`. One
process holds everything (``local = n``, :func:`local_space`); under FSDP each rank holds the entries of its
parameter shards (:mod:`lib.products.fsdp`) and ``reduce`` is an all-reduce. Small matrices (``p x p`` Gram matrices,
tridiagonals) are float64 on the host, the same on every rank.

Random vectors are global: entry ``i`` of column ``j`` of a draw depends only on ``(seed, kind, j, i)``, generated
in chunks of :data:`CHUNK` entries (``min(CHUNK, n)``), so a rank draws just its own entries and any sharding sees
the vectors one process sees.

A :class:`Basis` keeps the Krylov / probe blocks an algorithm must remember, on the working device, on the host
(``cpu``) or memory-mapped on ``disk``, in the space's dtype; it streams them back block by block for the
projections ``Q (Q^T w)`` and combinations ``Q s``.
"""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .. import constants
from ..runtime.jobs import derived_seed

F64 = torch.float64
CHUNK = 1 << 20
"""Entries per random-number chunk (each seeded by ``(seed, kind, column, chunk)``)."""
STORAGES = constants.STORAGES
VECTOR_DTYPES = constants.VECTOR_DTYPES
"""``--vector_dtype``: ``working`` = the model's dtype."""


def vector_dtype(choice: str, model_dtype: torch.dtype) -> torch.dtype:
    """The dtype of ``--vector_dtype`` for a model in ``model_dtype``."""
    return model_dtype if choice == "working" else getattr(torch, choice)


@dataclass
class VectorSpace:
    """``n``-vectors as ``(local, p)`` blocks on ``device`` in ``dtype``; ``segments``: the ``(global start, length)`` ranges
    of the global vector that this process holds, in local order; ``reduce``: sums a float64 host tensor over the
    processes (identity in one process); ``world``/``rank``: the processes."""

    n: int
    segments: tuple[tuple[int, int], ...]
    device: torch.device = torch.device("cpu")
    dtype: torch.dtype = F64
    reduce_fn: Callable[[torch.Tensor], torch.Tensor] | None = None
    world: int = 1
    rank: int = 0
    stored_bytes: int = 0
    peak_stored_bytes: int = 0

    @property
    def local(self) -> int:
        return sum(length for _, length in self.segments)

    def reduce(self, t: torch.Tensor) -> torch.Tensor:
        """Sum of ``t`` (float64, on the host) over the processes."""
        t = t.detach().to("cpu", F64)
        return t if self.reduce_fn is None else self.reduce_fn(t)

    def block(self, t: torch.Tensor) -> torch.Tensor:
        """``t`` on the space's device and dtype."""
        return t.to(device=self.device, dtype=self.dtype)

    def zeros(self, p: int) -> torch.Tensor:
        return torch.zeros(self.local, p, device=self.device, dtype=self.dtype)

    def gram(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        """``A^T B`` (``(pa, pb)``, float64 host), summed over the shards; accumulated in float64 (blocks of other dtypes
        converted :data:`ROWS` rows at a time)."""
        return self.reduce(_chunked(lambda x, y: x.T @ y, a, b))

    def coldot(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        """Column-wise ``<a_j, b_j>`` (``(p,)``, float64 host), accumulated in float64."""
        return self.reduce(_chunked(lambda x, y: (x * y).sum(0), a, b))

    def colnorms(self, a: torch.Tensor) -> torch.Tensor:
        return self.coldot(a, a).clamp_min(0).sqrt()

    def combine(self, a: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        """``A C`` for a block ``A`` and a small host matrix ``C``."""
        return a @ c.to(device=a.device, dtype=a.dtype)

    def qr(self, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``W = Q R``: ``Q`` orthonormal columns (a block), ``R`` upper triangular (float64 host). One process: Householder
        (:func:`torch.linalg.qr`); sharded: classical Gram-Schmidt twice, column by column, with reduced inner products
        (a column in the span of the previous ones gets ``R_jj ~ 0``, as a breakdown signal)."""
        if w.shape[1] == 1:  # a single vector: normalize it
            norm = float(self.colnorms(w)[0])
            return (w / norm if norm > 0 else w.clone()), torch.tensor([[norm]], dtype=F64)
        if self.world == 1:
            q, r = torch.linalg.qr(w.to(torch.promote_types(w.dtype, torch.float32)))
            return q.to(w.dtype), r.to("cpu", F64)
        p = w.shape[1]
        q = torch.zeros_like(w)
        r = torch.zeros(p, p, dtype=F64)
        for j in range(p):
            col = w[:, j : j + 1].clone()
            for _ in range(2):
                if j:
                    c = self.gram(q[:, :j], col)
                    col = col - self.combine(q[:, :j], c)
                    r[:j, j] += c[:, 0]
            norm = float(self.colnorms(col)[0])
            r[j, j] = norm
            q[:, j : j + 1] = col / norm if norm > 0 else col
        return q, r

    def random(self, p: int, seed: int, kind: str = "gaussian", first: int = 0) -> torch.Tensor:
        """Columns ``first..first+p-1`` of a global random draw (``kind`` gaussian or rademacher), this process's entries."""
        cols = [
            torch.cat(
                [
                    random_segment(kind, seed, j, start, start + length, self.n)
                    for start, length in self.segments
                ]
            )
            if self.segments
            else torch.zeros(0, dtype=F64)
            for j in range(first, first + p)
        ]
        return self.block(
            torch.stack(cols, dim=1) if cols else torch.zeros(self.local, 0, dtype=F64)
        )

    def track(self, delta: int) -> None:
        """Count ``delta`` bytes of stored vectors (bases), keeping the peak."""
        self.stored_bytes += delta
        self.peak_stored_bytes = max(self.peak_stored_bytes, self.stored_bytes)


ROWS = 1 << 22
"""Rows per chunk when a block of another dtype is converted to float64 for a reduction."""


def _chunked(
    op: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], a: torch.Tensor, b: torch.Tensor
) -> torch.Tensor:
    """``sum over row chunks of op(a[c], b[c])`` in float64: whole when both are float64, else ``ROWS`` rows converted at a time."""
    if a.dtype == F64 and b.dtype == F64:
        return op(a, b)
    total = None
    for start in range(0, max(a.shape[0], 1), ROWS):
        part = op(a[start : start + ROWS].to(F64), b[start : start + ROWS].to(F64))
        total = part if total is None else total + part
    return total


def local_space(
    n: int, device: torch.device | str = "cpu", dtype: torch.dtype = F64
) -> VectorSpace:
    """All ``n`` entries in this process."""
    return VectorSpace(n, ((0, n),), torch.device(device), dtype)


def random_segment(
    kind: str, seed: int, column: int, start: int, stop: int, n: int
) -> torch.Tensor:
    """Entries ``start..stop-1`` (float64) of column ``column`` of the global draw ``(kind, seed)`` of length ``n``: chunk ``c``
    (``min(CHUNK, n)`` entries) comes from a generator seeded by ``(seed, kind, column, c)``."""
    size = min(CHUNK, n)
    out = torch.empty(stop - start, dtype=F64)
    if stop <= start:
        return out
    for c in range(start // size, (stop - 1) // size + 1):
        g = torch.Generator().manual_seed(derived_seed(seed, kind, column, c))
        if kind == "gaussian":
            chunk = torch.randn(size, generator=g, dtype=F64)
        elif kind == "rademacher":
            chunk = torch.randint(0, 2, (size,), generator=g).to(F64).mul_(2).sub_(1)
        else:
            raise ValueError(f"unknown kind {kind!r}")
        a, b = max(start, c * size), min(stop, (c + 1) * size)
        out[a - start : b - start] = chunk[a - c * size : b - c * size]
    return out


@dataclass
class Basis:
    """Blocks ``Q_j`` (``(local, p_j)``) kept by an algorithm, on ``storage``: ``device`` (the space's), ``cpu`` or ``disk``
    (memory-mapped files under ``directory``, removed by :meth:`close`), in the space's dtype."""

    space: VectorSpace
    storage: str = "device"
    directory: Path | None = None
    blocks: list[torch.Tensor] = field(default_factory=list)
    _files: list[Path] = field(default_factory=list)
    _tmp: Path | None = None

    def __post_init__(self) -> None:
        if self.storage not in STORAGES:
            raise ValueError(f"storage must be one of {STORAGES}, got {self.storage!r}")

    @property
    def cols(self) -> int:
        return sum(b.shape[1] for b in self.blocks)

    @property
    def nbytes(self) -> int:
        return sum(b.numel() * b.element_size() for b in self.blocks)

    def append(self, block: torch.Tensor) -> None:
        block = self.space.block(block)
        if self.storage == "device":
            kept = block.clone()
        elif self.storage == "cpu":
            kept = block.to("cpu", copy=True)
        else:
            kept = self._mapped(block)
        self.blocks.append(kept)
        self.space.track(kept.numel() * kept.element_size())

    def _mapped(self, block: torch.Tensor) -> torch.Tensor:
        if self._tmp is None:
            base = self.directory if self.directory is not None else Path(tempfile.gettempdir())
            base.mkdir(parents=True, exist_ok=True)
            self._tmp = Path(tempfile.mkdtemp(prefix=f"basis-r{self.space.rank}-", dir=base))
        path = self._tmp / f"block_{len(self.blocks):06d}.bin"
        numel = block.numel()
        with open(path, "wb") as f:
            f.truncate(numel * block.element_size())
        kept = torch.from_file(str(path), shared=True, size=numel, dtype=block.dtype).view(
            block.shape
        )
        kept.copy_(block.cpu())
        self._files.append(path)
        return kept

    def _get(self, j: int) -> torch.Tensor:
        return self.space.block(self.blocks[j])

    def coefficients(self, w: torch.Tensor) -> torch.Tensor:
        """``Q^T w`` (``(cols, p)``, float64 host), one reduction for all blocks."""
        if not self.blocks:
            return torch.zeros(0, w.shape[1], dtype=F64)
        local = torch.cat([self._get(j).to(F64).T @ w.to(F64) for j in range(len(self.blocks))])
        return self.space.reduce(local)

    def subtract(self, w: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        """``w - Q c``."""
        start = 0
        for j in range(len(self.blocks)):
            q = self._get(j)
            w = w - self.space.combine(q, c[start : start + q.shape[1]])
            start += q.shape[1]
        return w

    def orthogonalize(self, w: torch.Tensor, passes: int = 2) -> torch.Tensor:
        """``w - Q (Q^T w)``, ``passes`` times ("twice is enough", Parlett 1980)."""
        for _ in range(passes if self.blocks else 0):
            w = self.subtract(w, self.coefficients(w))
        return w

    def column_coefficients(self, w: torch.Tensor) -> torch.Tensor:
        """``c[j, i] = <Q_j[:, i], w[:, i]>`` for blocks of ``w``'s width (one basis per column, e.g. SLQ's probes): ``(blocks, p)``."""
        if not self.blocks:
            return torch.zeros(0, w.shape[1], dtype=F64)
        return self.space.reduce(
            torch.stack(
                [(self._get(j).to(F64) * w.to(F64)).sum(0) for j in range(len(self.blocks))]
            )
        )

    def orthogonalize_columns(self, w: torch.Tensor, passes: int = 2) -> torch.Tensor:
        """Each column of ``w`` made orthogonal to the same column of every block (column-wise bases), ``passes`` times."""
        for _ in range(passes if self.blocks else 0):
            c = self.column_coefficients(w)
            for j in range(len(self.blocks)):
                w = w - self._get(j) * c[j].to(device=w.device, dtype=w.dtype)
        return w

    def combine(self, s: torch.Tensor) -> torch.Tensor:
        """``Q s`` for ``s`` of shape ``(cols, k)`` (float64 host): a block."""
        out = self.space.zeros(s.shape[1])
        start = 0
        for j in range(len(self.blocks)):
            q = self._get(j)
            out = out + self.space.combine(q, s[start : start + q.shape[1]])
            start += q.shape[1]
        return out

    def close(self) -> None:
        """Forget the blocks (and remove the disk files)."""
        self.space.track(-self.nbytes)
        self.blocks.clear()
        if self._tmp is not None:
            shutil.rmtree(self._tmp, ignore_errors=True)
            self._tmp = None
        self._files.clear()


def choose_storage(
    wanted: str, bytes_needed: int, device_free: int | None, host_free: int, fraction: float = 0.5
) -> str:
    """``wanted`` unless ``auto``: the device when the basis fits in ``fraction`` of its free memory (always, on the CPU:
    ``device_free`` None), else the host when it fits there, else disk."""
    if wanted != "auto":
        return wanted
    if device_free is None:
        return "device" if bytes_needed <= fraction * host_free else "disk"
    if bytes_needed <= fraction * device_free:
        return "device"
    return "cpu" if bytes_needed <= fraction * host_free else "disk"
