"""The README and docs/ are true: the flags page is generated from the parsers, links resolve, the library page's
examples run, and every number quoted about the embedded figures is a value that a run stored in pdf/*.json."""

from __future__ import annotations

import doctest
import json
import math
import re
import tomllib
from pathlib import Path
from typing import Any

import pytest

from conftest import ROOT

DOCS = ROOT / "docs"
PAGES = [ROOT / "README.md", *sorted(DOCS.glob("*.md")), ROOT / "pdf" / "README.md"]
README_MAX_LINES = 200


# ----------------------------------------------------------------------------- flags page, README size


def test_flags_page_is_generated_from_the_parsers():
    from lib import flags_doc

    assert (DOCS / "flags.md").read_text() == flags_doc.markdown(), (
        "docs/flags.md is stale: run `python -m lib.flags_doc > docs/flags.md`"
    )


def test_readme_is_read_in_two_minutes():
    lines = (ROOT / "README.md").read_text().splitlines()
    assert len(lines) <= README_MAX_LINES, f"README.md has {len(lines)} lines (at most {README_MAX_LINES})"


def test_readme_starts_with_the_two_commands_and_links_every_docs_page():
    text = (ROOT / "README.md").read_text()
    install = (
        "python3 -m venv .venv && . .venv/bin/activate && pip install torch==2.13.0 -r requirements.txt "
        "&& python single_layer_single_block.py"
    )
    first_fence = text.index("```")
    assert text.index(install) < text.index("```", first_fence + 3), "the install + main-job line comes first"
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
    (tmp_path / "a.md").write_text("# Top\n\n[ok](#top) [bad](b.md) [bad anchor](#nope) `[code](c.md)`\n")
    assert links(tmp_path / "a.md") == ["#top", "b.md", "#nope"]
    assert anchors(tmp_path / "a.md") == {"top"}
    assert anchor("The report's OPT-125M runs (GPU users)") == "the-reports-opt-125m-runs-gpu-users"


# ----------------------------------------------------------------------------- the library page runs


def doctest_source(markdown: str) -> str:
    """The page with its code fences blanked, so that a fence line never reads as expected output."""
    return "\n".join("" if line.startswith("```") else line for line in markdown.splitlines()) + "\n"


@pytest.mark.slow
def test_library_page_examples_run_as_doctests():
    """docs/library.md's ``>>>`` examples, in order, in one namespace (about 10 s on one core); then the assertions
    the README's former "Library use" snippet was held to."""
    text = (DOCS / "library.md").read_text()
    test = doctest.DocTestParser().get_doctest(doctest_source(text), {}, "docs/library.md", "docs/library.md", 0)
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
