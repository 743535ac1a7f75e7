"""The library's code stays in small pieces: no function or method in lib/ over MAX_LINES lines."""

from __future__ import annotations

import ast
from pathlib import Path

LIB = Path(__file__).resolve().parent.parent / "lib"
MAX_LINES = 80
"""From ``def`` to its last line, decorators excluded and docstring included (``end_lineno - lineno + 1``), less the
docstring's Google sections (:data:`SECTIONS`): the parameter reference the docstring rules ask of every public call
(tests/test_api_docstrings.py) does not make a function longer."""

SECTIONS = ("Args:", "Returns:", "Raises:")
"""A docstring line that starts its sections: from it to the docstring's last line they are not counted."""


def function_lengths(source: str, where: str = "") -> list[tuple[str, int]]:
    """``(qualified name, lines)`` of every function, method and nested function in ``source``."""
    out: list[tuple[str, int]] = []
    lines = source.splitlines()

    def sections(fn: ast.FunctionDef | ast.AsyncFunctionDef) -> int:
        """Lines of ``fn``'s docstring from its first section header up to (not with) the closing line."""
        doc = fn.body[0]
        if not (isinstance(doc, ast.Expr) and isinstance(doc.value, ast.Constant)):
            return 0
        if not isinstance(doc.value.value, str) or doc.end_lineno is None:
            return 0
        for line in range(doc.lineno, doc.end_lineno):
            if lines[line - 1].strip() in SECTIONS:
                return doc.end_lineno - line
        return 0

    def walk(node: ast.AST, prefix: str) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef):
                name = f"{prefix}{child.name}"
                length = child.end_lineno - child.lineno + 1 - sections(child)
                out.append((f"{where}{name}", length))
                walk(child, f"{name}.")
            elif isinstance(child, ast.ClassDef):
                walk(child, f"{prefix}{child.name}.")
            else:
                walk(child, prefix)

    walk(ast.parse(source), "")
    return out


def test_the_length_count_sees_methods_nested_functions_and_their_docstrings():
    body = "\n".join(f"        x{i} = {i}" for i in range(80))
    source = f'class A:\n    def f(self):\n        """doc"""\n{body}\n\n        def g():\n            pass\n'
    lengths = dict(function_lengths(source))
    assert lengths == {"A.f": 85, "A.f.g": 2}  # def, docstring, 80 lines, blank, g


def test_the_length_count_leaves_out_the_docstring_sections_only():
    doc = '    """Summary.\n\n    Prose.\n\n    Args:\n        x: one.\n\n    Returns:\n        y.\n    """'
    source = f"def f(x):\n{doc}\n    return x\n"
    # def, 4 docstring lines before Args:, the closing line, return (12 lines in all)
    assert dict(function_lengths(source)) == {"f": 7}
    assert dict(function_lengths(source.replace("Args:", "Notes"))) == {"f": 10}  # from Returns:
    no_sections = source.replace("Args:", "Notes").replace("Returns:", "Result")
    assert dict(function_lengths(no_sections)) == {"f": 12}


def test_no_function_in_lib_is_longer_than_80_lines():
    lengths = [
        item
        for path in sorted(LIB.rglob("*.py"))
        for item in function_lengths(path.read_text(), f"{path.relative_to(LIB.parent)}: ")
    ]
    assert len(lengths) > 500  # every module was parsed
    too_long = [f"{name} ({n} lines)" for name, n in lengths if n > MAX_LINES]
    assert not too_long, "split these into smaller named pieces:\n" + "\n".join(too_long)
