"""Renamed keyword arguments of the library, accepted under their old names with one :class:`DeprecationWarning`.

One name per concept (the flag's): ``hvps`` (was ``vhp_samples``), ``chunk`` (was ``probe_batch``), ``num_blocks``
(was ``n_blocks``), ``num_layers`` (was ``n_layers``). A call with an old keyword still works; the first such call
of each function and keyword in a process warns, naming the new keyword.
"""

from __future__ import annotations

import functools
import warnings
from collections.abc import Callable
from typing import Any, TypeVar

F = TypeVar("F", bound=Callable[..., Any])

_WARNED: set[tuple[str, str]] = set()
"""``(function, old keyword)`` pairs that have warned in this process."""


def warn_renamed(where: str, old: str, new: str, stacklevel: int = 3) -> None:
    """One :class:`DeprecationWarning` per process and ``(where, old)``: ``old`` is now called ``new``."""
    if (where, old) in _WARNED:
        return
    _WARNED.add((where, old))
    warnings.warn(
        f"{where}: the keyword {old!r} is deprecated; use {new!r} (same meaning)",
        DeprecationWarning,
        stacklevel=stacklevel,
    )


def renamed_keywords(**renames: str) -> Callable[[F], F]:
    """Decorator: accept each keyword ``old`` of ``renames`` (``old="new"``) as ``new``, warning once
    (:func:`warn_renamed`); giving both is a :class:`TypeError`. The wrapped function's signature shows only
    the new names."""

    def wrap(func: F) -> F:
        where = func.__qualname__.replace(".__init__", "")

        @functools.wraps(func)
        def call(*args: Any, **kwargs: Any) -> Any:
            for old, new in renames.items():
                if old in kwargs:
                    if new in kwargs:
                        raise TypeError(f"{where}() got both {old!r} and its new name {new!r}")
                    warn_renamed(where, old, new)
                    kwargs[new] = kwargs.pop(old)
            return func(*args, **kwargs)

        return call  # type: ignore[return-value]

    return wrap
