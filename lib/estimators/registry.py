"""A registry of estimators by name, filled by a decorator in each estimator's own module."""

from __future__ import annotations

import importlib
import pkgutil
from typing import Any, Generic, Iterable, Iterator, TypeVar

T = TypeVar("T")


class Registry(Generic[T]):
    """``name -> estimator`` (one instance of each registered class), ordered by the classes' ``(order, name)``.

    Each estimator module decorates its class with :meth:`register`; :meth:`discover` imports every module of the
    family's package except its infrastructure (e.g. ``base``, and names starting with ``_``), so that adding an
    estimator is adding its file. ``renamed``: old names, for the error message when one is asked for.
    """

    def __init__(self, kind: str, renamed: dict[str, str] | None = None):
        self.kind = kind
        self.renamed = dict(renamed or {})
        self._items: dict[str, T] = {}

    def register(self, cls: type[T]) -> type[T]:
        """Class decorator: register one instance of ``cls`` under ``cls.name``."""
        name = cls.name  # type: ignore[attr-defined]
        if name in self._items:
            raise ValueError(f"two {self.kind}s are named {name!r}")
        self._items[name] = cls()
        self._items = dict(sorted(self._items.items(), key=lambda item: (getattr(item[1], "order", 100), item[0])))
        return cls

    def unregister(self, name: str) -> None:
        """Remove ``name`` (tests that register an example estimator clean up with it)."""
        del self._items[name]

    def discover(self, package: str, path: Iterable[str], infrastructure: Iterable[str] = ("base",)) -> None:
        """Import every module of ``package`` (folder ``path``) but its ``infrastructure`` and ``_*``; their
        decorators register them."""
        skip = set(infrastructure)
        for info in pkgutil.iter_modules(list(path)):
            if info.name not in skip and not info.name.startswith("_"):
                importlib.import_module(f"{package}.{info.name}")

    def names(self) -> tuple[str, ...]:
        """The registered names, in order."""
        return tuple(self._items)

    def lookup(self, names: Iterable[str]) -> list[T]:
        """The estimators called ``names`` (in that order); ``ValueError`` naming the unknown one and the choices."""
        out = []
        for name in names:
            if name not in self._items:
                hint = f" ({name!r} is now called {self.renamed[name]!r})" if name in self.renamed else ""
                raise ValueError(f"unknown {self.kind} {name!r}; choose from {self.names()}{hint}")
            out.append(self._items[name])
        return out

    def __getitem__(self, name: str) -> T:
        return self.lookup([name])[0]

    def __contains__(self, name: Any) -> bool:
        return name in self._items

    def __iter__(self) -> Iterator[T]:
        return iter(self._items.values())

    def __len__(self) -> int:
        return len(self._items)
