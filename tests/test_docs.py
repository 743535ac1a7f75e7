"""The README and docs/ are true: the flags page is generated from the parsers, links resolve, the library page's
examples run, and every number quoted about the embedded figures is a value that a run stored in pdf/*.json."""

from __future__ import annotations

import doctest
import json
import math
import re
from pathlib import Path
from typing import Any

import pytest
import tomllib
from conftest import ROOT

DOCS = ROOT / "docs"
PAGES = [ROOT / "README.md", *sorted(DOCS.glob("*.md")), ROOT / "pdf" / "README.md"]
README_MAX_LINES = 200


# ----------------------------------------------------------------------------- flags page, README size


def test_flags_page_is_generated_from_the_parsers():
    from lib.app import flags_doc

    assert (DOCS / "flags.md").read_text() == flags_doc.markdown(), (
        "docs/flags.md is stale: run `python -m lib.app.flags_doc > docs/flags.md`"
    )
    assert (
        "%%" not in flags_doc.markdown()
    )  # help strings formatted as --help shows them ("5%", not "5%%")


def test_readme_is_read_in_two_minutes():
    lines = (ROOT / "README.md").read_text().splitlines()
    assert len(lines) <= README_MAX_LINES, (
        f"README.md has {len(lines)} lines (at most {README_MAX_LINES})"
    )


def test_readme_starts_with_the_two_commands_and_links_every_docs_page():
    text = (ROOT / "README.md").read_text()
    install = (
        "python3 -m venv .venv && . .venv/bin/activate && pip install torch==2.13.0 -r requirements.txt "
        "&& python single_layer_single_block.py"
    )
    first_fence = text.index("```")
    assert text.index(install) < text.index("```", first_fence + 3), (
        "the install + main-job line comes first"
    )
    assert "python -m pytest -q tests" in text and 'python -m pytest -q -m "not slow" tests' in text
    ci = (ROOT / ".ci" / "run").read_text()
    assert "python -m pytest -q tests" in ci  # the README's test command is CI's
    linked = set(re.findall(r"\]\((docs/[^)#]+\.md)", text))
    pages = {f"docs/{p.name}" for p in DOCS.glob("*.md")}
    assert pages <= linked, f"README.md links no page {sorted(pages - linked)}"


# ----------------------------------------------------------------------------- links

LINK = re.compile(r"(?<!!)\[[^\]]*\]\(([^)\s]+)\)|<img src=\"([^\"]+)\"")


def _strip_code(text: str) -> str:
    """Text without fenced code blocks and inline code (links inside them are not links)."""
    text = re.sub(r"```.*?```", "", text, flags=re.S)
    return re.sub(r"`[^`\n]*`", "", text)


def anchor(heading: str) -> str:
    """GitHub's anchor of a Markdown heading: lower case, punctuation removed, spaces to hyphens."""
    h = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return h.replace(" ", "-")


def anchors(path: Path) -> set[str]:
    text = re.sub(r"```.*?```", "", path.read_text(), flags=re.S)
    return {anchor(m) for m in re.findall(r"^#{1,6} (.+)$", text, flags=re.M)}


def links(path: Path) -> list[str]:
    found = []
    for m in LINK.finditer(_strip_code(path.read_text())):
        found.append(m.group(1) or m.group(2))
    # image links ![alt](path) too
    found += re.findall(r"!\[[^\]]*\]\(([^)\s]+)\)", _strip_code(path.read_text()))
    return found


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_relative_link_resolves(page):
    bad = []
    for target in links(page):
        if re.match(r"[a-z]+:", target):  # https:, mailto:
            continue
        file, _, frag = target.partition("#")
        dest = (page.parent / file).resolve() if file else page
        if not dest.exists():
            bad.append(f"{target}: no file {dest}")
        elif frag and dest.suffix == ".md" and frag not in anchors(dest):
            bad.append(f"{target}: no heading #{frag} in {dest.name}")
    assert not bad, f"{page.name}: " + "; ".join(bad)


def test_the_link_checker_can_fail(tmp_path):
    (tmp_path / "a.md").write_text(
        "# Top\n\n[ok](#top) [bad](b.md) [bad anchor](#nope) `[code](c.md)`\n"
    )
    assert links(tmp_path / "a.md") == ["#top", "b.md", "#nope"]
    assert anchors(tmp_path / "a.md") == {"top"}
    assert anchor("The report's OPT-125M runs (GPU users)") == "the-reports-opt-125m-runs-gpu-users"


# ----------------------------------------------------------------------------- the library page runs


def doctest_source(markdown: str) -> str:
    """The page with its code fences blanked, so that a fence line never reads as expected output."""
    return (
        "\n".join("" if line.startswith("```") else line for line in markdown.splitlines()) + "\n"
    )


@pytest.mark.slow
def test_library_page_examples_run_as_doctests():
    """docs/library.md's ``>>>`` examples, in order, in one namespace (about 10 s on one core); then the assertions
    the README's former "Library use" snippet was held to."""
    text = (DOCS / "library.md").read_text()
    test = doctest.DocTestParser().get_doctest(
        doctest_source(text), {}, "docs/library.md", "docs/library.md", 0
    )
    assert len(test.examples) >= 20
    runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS)
    runner.run(test, clear_globs=False)
    assert runner.summarize(verbose=False).failed == 0
    scope = test.globs
    assert scope["result"].hessian.shape == (32, 32) and scope["result"].perplexity > 1
    assert scope["diag"].diagonals["xdiag"][scope["name"]].shape == (128, 128)
    assert scope["top"].eigenvalues.shape == (3,) and bool(scope["top"].converged.all())
    assert scope["nll"].ndim == 0 and scope["s"].size == 2 and scope["r"].size == 16
    cfg = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert "slow" in " ".join(cfg["tool"]["pytest"]["ini_options"]["markers"])


def test_doctests_of_a_page_can_fail():
    text = "```python\n>>> 1 + 1\n3\n```\n"
    test = doctest.DocTestParser().get_doctest(doctest_source(text), {}, "x", "x", 0)
    runner = doctest.DocTestRunner()
    runner.run(test, out=lambda s: None)
    assert runner.summarize(verbose=False).failed == 1


# ----------------------------------------------------------------------------- quoted numbers are stored numbers

PDF = ROOT / "pdf"
NUMBER_TABLE = "| quantity | value | file | JSON key |"
THRESHOLDS = {
    "0.1"
}  # round thresholds the text compares stored values with ("first below 0.1"), not results
QUOTED_PAGES = {ROOT / "README.md": ("## Figures", True), DOCS / "results.md": ("## ", False)}
"""Pages whose numbers about the embedded figures are checked: from the first heading that starts with the given
text to the next heading of its level (True) or to the end (False); what comes before describes conditions."""


def number_rows(text: str) -> list[tuple[str, str, str, str]]:
    """``(quantity, value, file, key)`` of every row of every table headed :data:`NUMBER_TABLE`."""
    rows, inside = [], False
    for line in text.splitlines():
        if line.strip() == NUMBER_TABLE:
            inside = True
            continue
        if inside and line.startswith("|---"):
            continue
        if inside and line.startswith("|"):
            cells = [c.strip() for c in line.strip().strip("|").split("|")]
            assert len(cells) == 4, f"a number-table row needs 4 cells: {line}"
            rows.append((cells[0], cells[1], cells[2].strip("`"), cells[3].strip("`")))
        else:
            inside = False
    return rows


def lookup(data: Any, key: str) -> Any:
    """``a.b[k=100]``: ``data["a"]["b"]`` at the index where the sibling list ``k`` is 100; ``a[0]``: an index;
    a dict key may contain spaces (``layer_type_pair_share_fro2.k_proj x q_proj``)."""
    node, parent = data, None
    for part in key.split("."):
        m = re.fullmatch(r"(.+?)(?:\[(\w+)(?:=([-\d.]+))?\])?", part)
        name, sel, val = m.group(1), m.group(2), m.group(3)
        parent, node = node, node[name]
        if sel is None:
            continue
        if val is None:
            node = node[int(sel)]
        else:
            node = node[parent[sel].index(float(val) if "." in val else int(val))]
    return node


def matches(quoted: str, value: float) -> bool:
    """Whether ``value`` rounds to ``quoted`` as written: ``0.97``, ``6.7 %`` (x100), ``3.0e-4``, ``104``."""
    q = quoted.replace(" ", "").replace("\u2212", "-")
    if q.endswith("%"):
        q, value = q[:-1], value * 100
    if "e" in q.lower():
        mantissa = q.lower().split("e")[0]
        digits = len(mantissa.split(".")[1]) if "." in mantissa else 0
        return float(f"{value:.{digits}e}") == float(q)
    digits = len(q.split(".")[1]) if "." in q else 0
    return f"{value:.{digits}f}" == q


def prose_numbers(text: str) -> list[str]:
    """Decimal numbers and percentages of the text outside code, tables, image tags and links."""
    text = re.sub(r"```.*?```", "", text, flags=re.S)
    text = "\n".join(
        line
        for line in text.splitlines()
        if not line.startswith("|") and not line.startswith("<img")
    )
    text = re.sub(r"`[^`\n]*`", "", text)
    text = re.sub(r"\]\([^)]*\)", "]", text)
    return re.findall(r"(?<![\w.])-?\d+\.\d+(?:e-?\d+)?(?:\s?%)?|(?<![\w.])\d+\s?%", text)


def _section(path: Path, start: str, one: bool) -> str:
    text = path.read_text()
    i = re.search("^" + re.escape(start), text, flags=re.M)
    assert i, f"{path.name} has no heading starting with {start!r}"
    text = text[i.start() :]
    end = re.search(r"^## ", text[3:], flags=re.M) if one else None
    return text[: end.start() + 3] if end else text


@pytest.mark.parametrize("page", list(QUOTED_PAGES), ids=lambda p: p.name)
def test_every_quoted_number_is_a_stored_value(page):
    """Issue 18 item 4: each number the page states about the embedded figures is in the committed pdf/*.json."""
    text = _section(page, *QUOTED_PAGES[page])
    rows = number_rows(text)
    if page.name == "results.md":
        assert len(rows) >= 40
    bad = []
    for quantity, quoted, file, key in rows:
        value = lookup(json.loads((PDF / file).read_text()), key)
        if not (
            isinstance(value, (int, float))
            and math.isfinite(value)
            and matches(quoted, float(value))
        ):
            bad.append(f"{quantity}: quoted {quoted}, {file} {key} = {value}")
    assert not bad, "; ".join(bad)
    values = {
        q.replace(" ", "").lstrip("-")
        for _, q, _, _ in number_rows((DOCS / "results.md").read_text()) + rows
    }
    loose = [
        n for n in prose_numbers(text) if n.replace(" ", "").lstrip("-") not in values | THRESHOLDS
    ]
    assert not loose, f"{page.name} states numbers that no table ties to a JSON key: {loose}"


def test_the_number_checks_can_fail():
    assert matches("0.97", 0.9657) and not matches("0.96", 0.9657)
    assert matches("98.7 %", 0.98668) and not matches("98.6 %", 0.98668)
    assert matches("3.0e-4", 3.04e-4) and matches("104", 104.38) and not matches("105", 104.38)
    data = {"a": {"b": [10, 20, 30], "k": [1, 2, 3], "c d": 5}}
    assert (
        lookup(data, "a.b[k=2]") == 20
        and lookup(data, "a.b[0]") == 10
        and lookup(data, "a.c d") == 5
    )
    text = f"## Figures\n\n{NUMBER_TABLE}\n|---|---|---|---|\n| x | 0.5 | `f.json` | `a.b` |\n\nSee 0.5 and 0.25, `0.3`.\n"
    assert number_rows(text) == [("x", "0.5", "f.json", "a.b")]
    assert prose_numbers(text) == ["0.5", "0.25"]


# ----------------------------------------------------------------------------- GPU users (issue 18 item 7)


def gpu_table(text: str) -> dict[str, tuple[float, float, float]]:
    """``{run: (PFLOP, hours, graph GiB)}`` of docs/long_runs.md's estimate table."""
    rows = {}
    for line in text.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if line.startswith("| Fig.") and len(cells) == 6:
            rows[cells[0]] = (float(cells[3]), float(cells[4]), float(cells[5]))
    return rows


def test_readme_gives_gpu_users_an_install_line_and_the_estimates():
    readme = (ROOT / "README.md").read_text()
    assert "pip install torch==2.13.0 --index-url https://download.pytorch.org/whl/cu" in readme
    assert "docs/long_runs.md#gpu-users" in readme
    page = (DOCS / "long_runs.md").read_text()
    assert "estimates" in page and len(gpu_table(page)) == 8
    # the one GPU measurement, quoted in README and docs, is benchmarks/README.md's table
    bench = (ROOT / "benchmarks" / "README.md").read_text()
    row = next(line for line in bench.splitlines() if line.startswith("| **Fig. 1a: t=768"))
    per_sample, hours = re.search(
        r"([\d.]+) s/sample: the test split \(140 samples\) in ([\d.]+) h", row
    ).groups()
    for text in (readme, page):
        assert f"{round(float(per_sample))} s per sample" in text
        assert f"{float(hours):.1f} hours" in text


@pytest.mark.slow
def test_gpu_estimates_are_what_the_flop_count_gives():
    """The table's PFLOP, hours and graph memory are benchmarks/gpu_estimate.py's output (about 15 s)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(
        "gpu_estimate", ROOT / "benchmarks" / "gpu_estimate.py"
    )
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    out = mod.main(["--tflops", "8"])
    table = list(gpu_table((DOCS / "long_runs.md").read_text()).values())
    assert len(table) == len(out["runs"])
    for (pflop, hours, gib), run in zip(table, out["runs"]):
        assert round(run["flops"] / 1e15) == round(pflop), run["run"]
        assert f"{run['hours']:.1f}" == f"{hours:.1f}", run["run"]
        assert f"{run['graph_bytes'] / 2**30:.1f}" == f"{gib:.1f}", run["run"]


def test_ci_lints_and_checks_the_format_before_the_tests():
    ci = (ROOT / ".ci" / "run").read_text()
    steps = [
        ci.index(s) for s in ("ruff check .", "ruff format --check .", "python -m pytest -q tests")
    ]
    assert steps == sorted(steps)
    cfg = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert cfg["tool"]["ruff"]["line-length"] == 100
