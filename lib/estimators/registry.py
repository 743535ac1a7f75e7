"""A registry of estimators by name, filled by a decorator in each estimator's own module."""

from __future__ import annotations

import ast
import importlib
import pkgutil
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any, Generic, TypeVar

T = TypeVar("T")

INFRASTRUCTURE = {"diagonal": ("base", "driver", "work"), "approximations": ("base",)}
"""The modules of each estimator family's folder that hold no estimator (shared machinery)."""


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
        self._items = dict(
            sorted(self._items.items(), key=lambda item: (getattr(item[1], "order", 100), item[0]))
        )
        return cls

    def unregister(self, name: str) -> None:
        """Remove ``name`` (tests that register an example estimator clean up with it)."""
        del self._items[name]

    def discover(
        self, package: str, path: Iterable[str], infrastructure: Iterable[str] = ("base",)
    ) -> None:
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
                hint = (
                    f" ({name!r} is now called {self.renamed[name]!r})"
                    if name in self.renamed
                    else ""
                )
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


def declared(
    folder: str | Path, infrastructure: Iterable[str] = ("base",)
) -> dict[str, dict[str, Any]]:
    """``{name: {attribute: value}}`` of the estimator classes in ``folder``'s modules (but its ``infrastructure``
    and ``_*``), read from their source without importing them (no torch: ``--help`` stays fast): the literal class
    attributes of every class that sets ``name``, in registry order (``(order, name)``, as :class:`Registry`)."""
    skip = set(infrastructure)
    out: dict[str, dict[str, Any]] = {}
    for path in sorted(Path(folder).glob("*.py")):
        if path.stem in skip or path.stem.startswith("_"):
            continue
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if not isinstance(node, ast.ClassDef):
                continue
            attrs = {}
            for a in node.body:
                if isinstance(a, ast.Assign) and isinstance(a.value, ast.Constant):
                    attrs.update(
                        {t.id: a.value.value for t in a.targets if isinstance(t, ast.Name)}
                    )
            if isinstance(attrs.get("name"), str):
                out[attrs["name"]] = attrs
    return dict(sorted(out.items(), key=lambda item: (item[1].get("order", 100), item[0])))
