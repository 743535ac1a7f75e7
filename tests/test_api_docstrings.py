"""The public API (what ``lib/__init__.py`` exports) documents every call: Google-style ``Args:`` naming each
parameter, ``Returns:``, and a docstring of its own on each exported class."""

from __future__ import annotations

import inspect
import re

import pytest

import lib

SECTION = re.compile(r"^\s*(Args|Arguments|Returns|Yields|Raises|Examples?|Notes?|Attributes):\s*$")


def args_section(doc: str) -> list[str] | None:
    """The lines of the ``Args:`` section (up to the next section), or ``None`` without one."""
    lines = doc.splitlines()
    starts = [i for i, line in enumerate(lines) if line.strip() == "Args:"]
    if not starts:
        return None
    out = []
    for line in lines[starts[0] + 1 :]:
        if SECTION.match(line):
            break
        out.append(line)
    return out


def docstring_problems(fn) -> list[str]:
    """What the docstring of ``fn`` lacks: ``Args:`` (with parameters), a parameter in it, ``Returns:``."""
    doc = inspect.getdoc(fn) or ""
    params = [
        p.name
        for p in inspect.signature(fn).parameters.values()
        if p.name != "self" and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)
    ]
    problems = []
    section = args_section(doc)
    if params and section is None:
        problems.append("no Args: section")
    for name in params if section is not None else ():
        entry = re.compile(rf"^\s+\*{{0,2}}{re.escape(name)}( \([^)]*\))?:")
        if not any(entry.match(line) for line in section):
            problems.append(f"parameter {name!r} not in Args:")
    if not any(line.strip() == "Returns:" for line in doc.splitlines()):
        problems.append("no Returns: section")
    return problems


def exported(kind) -> list[str]:
    return sorted(n for n in lib._EXPORTS if kind(getattr(lib, n)))


@pytest.mark.parametrize("name", exported(inspect.isfunction))
def test_each_exported_function_has_args_naming_every_parameter_and_returns(name):
    assert docstring_problems(getattr(lib, name)) == []


@pytest.mark.parametrize("name", exported(inspect.isclass))
def test_each_exported_class_has_a_docstring_of_its_own(name):
    cls = getattr(lib, name)
    doc = cls.__dict__.get("__doc__") or ""
    # a dataclass without a docstring gets its signature as __doc__
    assert doc.strip() and not doc.startswith(f"{name}("), name


def test_the_check_finds_what_is_missing():
    def bare(model, samples, *rest, chunk=1, **kw):
        """Summary only."""

    def partial(model, samples, chunk=1):
        """Summary.

        Args:
            model: a model.
            samples: ``(b, seqlen)`` token ids; mentions chunk: but not as an entry.

        Returns:
            Nothing much.
        """

    def complete(model, chunk=1):
        """Summary.

        Args:
            model: a model.
            chunk (int): per batch.

        Raises:
            ValueError: never.

        Returns:
            Something.
        """

    assert docstring_problems(bare) == ["no Args: section", "no Returns: section"]
    assert docstring_problems(partial) == ["parameter 'chunk' not in Args:"]
    assert docstring_problems(complete) == []
    assert exported(inspect.isfunction) and exported(inspect.isclass)
