"""Jacobian-vector products ``J v`` of a function of the flat subset ``x``, forward mode where it works and pays.

Two exact ways to get ``J v`` for ``J = d fn(x) / dx`` (``fn(x)`` any tensor):

* **forward mode** -- ``torch.func.jvp(fn, (x,), (v,))``, vmapped over a block of tangents, so the primal
  ``fn(x)`` is evaluated once and the tangents ride along in batched operations;
* **double backward** -- ``J v = d/du <J^T u, v>``: one ``create_graph`` VJP ``J^T u`` for a dummy ``u`` (linear
  in ``u``), then one backward of it per tangent. It needs only reverse mode, so it runs wherever the
  Hessian does (e.g. kernels without forward AD such as SDPA's fused attention or a custom
  ``autograd.Function`` without ``jvp``).

Both agree to float round-off (tested to 1e-12 in float64 through Hugging Face's eager attention for OPT,
Llama and GPT-2). :class:`JVPPolicy` chooses per caller: ``"auto"`` tries forward mode once, falls back to
double backward when forward AD is not implemented for some operation, and otherwise times both on the
first block and keeps the faster one (the choice and timings go into :meth:`JVPPolicy.report`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from ..products.autotune import device_clock

MODES = ("auto", "forward", "double-backward")
FORWARD_CHUNK = 16
"""Tangents per vmapped forward-mode pass: on the project's CPU, 16 at a time were as fast per column as double
backward, all 32 or 128 at once twice as slow (the batched tangents outgrow the caches)."""
DECIDE_ROWS = 8
"""Rows of the first block on which ``"auto"`` times both ways (both are computed for them, once)."""


def jvp_forward(
    fn: Callable[[torch.Tensor], torch.Tensor],
    x: torch.Tensor,
    tangents: torch.Tensor,
    chunk: int | None = FORWARD_CHUNK,
) -> torch.Tensor:
    """``J v`` for the rows ``v`` of ``tangents`` (``(m, n)``) by forward mode (``torch.func.jvp`` vmapped over the rows,
    ``chunk`` at a time, ``None``: all); returns ``(m, *fn(x).shape)``."""
    from torch.func import jvp, vmap

    x = x.detach()
    one = lambda v: jvp(fn, (x,), (v,))[1]  # noqa: E731
    with torch.no_grad():  # no reverse-mode graph: the tangents are all we keep
        if tangents.shape[0] == 1:
            return one(tangents[0]).unsqueeze(0)
        return vmap(one, chunk_size=chunk)(tangents)


def jvp_double_backward(
    fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, tangents: torch.Tensor
) -> torch.Tensor:
    """``J v`` for the rows ``v`` of ``tangents`` (``(m, n)``) by the double-backward identity ``J v = d/du <J^T u, v>``;
    returns ``(m, *fn(x).shape)``."""
    xg = x.detach().clone().requires_grad_(True)
    out = fn(xg)
    return jvp_on_graph(out, xg, tangents)


def jvp_on_graph(out: torch.Tensor, x: torch.Tensor, tangents: torch.Tensor) -> torch.Tensor:
    """``J v`` (double backward) for ``out`` already built from the leaf ``x`` with a graph; ``(m, *out.shape)``."""
    u = torch.zeros_like(out, requires_grad=True)
    (jt_u,) = torch.autograd.grad(out, x, grad_outputs=u, create_graph=True)
    cols = torch.empty(tangents.shape[0], *out.shape, dtype=out.dtype, device=out.device)
    for j, v in enumerate(tangents):
        (cols[j],) = torch.autograd.grad(
            jt_u, u, grad_outputs=v.to(x), retain_graph=j + 1 < len(tangents)
        )
    return cols


def forward_unsupported(e: BaseException) -> bool:
    """Whether ``e`` says that forward-mode AD (or its batching) is not implemented for some operation."""
    text = str(e)
    return isinstance(e, NotImplementedError) or any(
        s in text for s in ("forward AD", "forward-mode", "jvp", "not implemented", "vmap")
    )


@dataclass
class JVPPolicy:
    """How one caller computes ``J v``: ``mode`` ``"forward"``, ``"double-backward"`` or ``"auto"`` (see the module doc).

    In ``"auto"`` the first rows decide (:data:`DECIDE_ROWS`): forward mode if it runs and is no slower than double
    backward on them (both timed on this thread's CPU clock when torch runs one thread, else the wall clock), else
    double backward; ``chosen`` and ``why`` record it.
    """

    mode: str = "auto"
    chosen: str | None = None
    why: str = ""
    seconds: dict[str, float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {self.mode!r}")
        if self.mode != "auto":
            self.chosen, self.why = self.mode, "given"

    def columns(
        self,
        fn: Callable[[torch.Tensor], torch.Tensor],
        x: torch.Tensor,
        tangents: torch.Tensor,
        backward: Callable[[torch.Tensor], torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """``J v`` for the rows of ``tangents`` (``(m, n)``), ``J = d fn / dx`` at ``x``; ``(m, *fn(x).shape)``.

        ``backward(tangents)``: the caller's double-backward ``J v`` (e.g. on a graph it keeps), used instead of
        :func:`jvp_double_backward`. Undecided ``"auto"`` decides on the first :data:`DECIDE_ROWS` rows, then goes on
        with the choice."""
        back = backward or (lambda v: jvp_double_backward(fn, x, v))
        if self.chosen is None:
            k = min(DECIDE_ROWS, tangents.shape[0])
            head = self._decide(fn, x, tangents[:k], back)
            if k == tangents.shape[0]:
                return head
            return torch.cat([head, self.columns(fn, x, tangents[k:], backward)])
        if self.chosen == "forward":
            return jvp_forward(fn, x, tangents)
        return back(tangents)

    def _decide(
        self,
        fn: Callable[[torch.Tensor], torch.Tensor],
        x: torch.Tensor,
        tangents: torch.Tensor,
        back: Callable[[torch.Tensor], torch.Tensor],
    ) -> torch.Tensor:
        clock = device_clock(x.device)
        t0 = clock()
        try:
            fwd = jvp_forward(fn, x, tangents)
        except (NotImplementedError, RuntimeError) as e:
            if not forward_unsupported(e):
                raise
            self.chosen, self.why = (
                "double-backward",
                f"forward mode unavailable: {type(e).__name__}: {str(e).splitlines()[0][:200]}",
            )
            return back(tangents)
        t1 = clock()
        bwd = back(tangents)
        t2 = clock()
        self.seconds = {"forward": t1 - t0, "double-backward": t2 - t1}
        faster = self.seconds["forward"] <= self.seconds["double-backward"]
        self.chosen = "forward" if faster else "double-backward"
        self.why = f"measured on a block of {tangents.shape[0]}"
        return fwd if faster else bwd

    def report(self) -> dict[str, Any]:
        """For the JSON: ``{"mode", "chosen", "why", "seconds"}``."""
        return {"mode": self.mode, "chosen": self.chosen, "why": self.why, "seconds": self.seconds}


def jvp_columns(
    fn: Callable[[torch.Tensor], torch.Tensor],
    x: torch.Tensor,
    tangents: torch.Tensor,
    mode: str = "auto",
) -> torch.Tensor:
    """``J v`` for the rows ``v`` of ``tangents`` (``(m, n)``), ``J = d fn(x) / dx``; ``(m, *fn(x).shape)``.

    ``mode``: ``"forward"``, ``"double-backward"``, or ``"auto"`` (a fresh :class:`JVPPolicy`: forward mode unless it
    is unavailable or measures slower on this block). Keep a :class:`JVPPolicy` to decide once for many blocks."""
    return JVPPolicy(mode).columns(fn, x, tangents)
