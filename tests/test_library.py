"""Library use as a new user meets it: `lib`'s exports and map, and the scripts' --help."""

from __future__ import annotations

import re

import pytest
import torch
from conftest import ROOT

import hessian_diagonal
import hessian_spectrum
import lib
import several_layers_several_blocks
import single_layer_several_blocks
import single_layer_single_block

SCRIPTS = (
    single_layer_single_block,
    single_layer_several_blocks,
    several_layers_several_blocks,
    hessian_diagonal,
    hessian_spectrum,
)


def script_help(script, capsys) -> str:
    with pytest.raises(SystemExit) as exc:
        script.run(["--help"])
    assert exc.value.code == 0
    return capsys.readouterr().out


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda s: s.__name__)
def test_no_help_line_states_its_default_twice(script, capsys):
    text = script_help(script, capsys)
    entries = re.split(r"\n  (?=-)", text.split("options:", 1)[1])  # one entry per flag
    assert len(entries) > 20
    for entry in entries:
        assert len(re.findall(r"\bdefault", entry)) <= 1, entry
        assert "(default: None)" not in entry and "(default: False)" not in entry, entry


def test_hessian_diagonal_has_no_exact_hessian_flags(capsys):
    text = script_help(hessian_diagonal, capsys)
    for flag in ("--t ", "--method", "--compare"):
        assert flag not in text
    # the product batch has one name in every script (--probe_batch: a deprecated alias, not listed)
    assert (
        "--chunk" in text
        and "--chunk" in script_help(single_layer_single_block, capsys)
        and "--probe_batch" not in text
    )
    with pytest.raises(SystemExit) as exc:  # not silently ignored: refused by argparse
        hessian_diagonal.run(["--t", "3"])
    assert exc.value.code == 2


def test_lib_exports_and_documents_its_entry_points():
    assert set(lib.__all__) <= set(dir(lib))
    for name in (
        "hessian_diagonal",
        "Target",
        "DiagonalResult",
        "ESTIMATORS",
        "xdiag_estimate",
        "exact_hessian",
        "SubsetLoss",
        "tune_chunk",
    ):
        assert name in lib.__all__ and f"{name}" in lib.__doc__
    assert "f.x0()" in lib.__doc__


@pytest.mark.slow
def test_readme_library_snippet_runs_as_written():
    """The README's "Library" code block, executed verbatim; the longer examples (the diagonal, Lanczos, traces)
    moved to docs/library.md and run as doctests with the former assertions (tests/test_docs.py)."""
    text = (ROOT / "README.md").read_text()
    snippet = re.search(r"## Library\n+```python\n(.*?)```", text, re.S).group(1)
    scope: dict = {}
    exec(compile(snippet, "README.md (Library)", "exec"), scope)
    assert scope["result"].hessian.shape == (32, 32) and scope["result"].perplexity > 1
    h = scope["result"].hessian
    assert torch.allclose(h, h.T, rtol=1e-4, atol=1e-6)
