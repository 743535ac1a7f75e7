"""docs/adding_an_estimator.md is true: its example estimator file and its test run as shown, and nothing else is needed."""

from __future__ import annotations

import json
import re
import sys
import types

import pytest
import torch
from conftest import ROOT, tiny_ids, tiny_model

from lib.hessian.diagonal import REGISTRY, Target, hessian_diagonal

DOC = ROOT / "docs" / "adding_an_estimator.md"
MODULE = "lib/estimators/diagonal/gaussian_hutchinson.py"
TEST = "tests/test_gaussian_hutchinson.py"


def blocks() -> dict[str, str]:
    """The page's code blocks marked ``<!-- file: PATH -->``, by path."""
    return dict(re.findall(r"<!-- file: (\S+) -->\n```python\n(.*?)```", DOC.read_text(), re.S))


@pytest.fixture
def example():
    """The documented estimator, registered as if its file were in lib/estimators/diagonal/ (removed afterwards)."""
    name = "lib.estimators.diagonal.gaussian_hutchinson"
    module = types.ModuleType(name)
    module.__file__ = str(ROOT / MODULE)
    sys.modules[name] = module
    try:
        exec(compile(blocks()[MODULE], str(ROOT / MODULE), "exec"), module.__dict__)
        yield REGISTRY["gaussian_hutchinson"]
    finally:
        sys.modules.pop(name, None)
        if "gaussian_hutchinson" in REGISTRY:
            REGISTRY.unregister("gaussian_hutchinson")


def test_the_page_shows_one_file_and_one_test():
    assert set(blocks()) == {MODULE, TEST}
    assert "gaussian_hutchinson" not in REGISTRY  # an example, not shipped


def test_the_documented_test_passes(example):
    namespace: dict = {}
    exec(compile(blocks()[TEST], str(ROOT / TEST), "exec"), namespace)
    tests = [f for name, f in namespace.items() if name.startswith("test_")]
    assert len(tests) == 1
    tests[0]()


def test_the_documented_test_fails_for_rademacher_probes(example, monkeypatch):
    """The documented test can fail: with Rademacher probes the error is below its Gaussian theory."""
    from lib.estimators.diagonal.base import rademacher_probes

    monkeypatch.setitem(
        sys.modules["lib.estimators.diagonal.gaussian_hutchinson"].__dict__,
        "gaussian_probes",
        lambda n, seed, name, a, b, dtype: rademacher_probes(n, seed, name, a, b, dtype),
    )
    namespace: dict = {}
    exec(compile(blocks()[TEST], str(ROOT / TEST), "exec"), namespace)
    with pytest.raises(AssertionError):
        namespace["test_gaussian_hutchinson_is_unbiased_with_the_stated_error"]()


@pytest.mark.slow
def test_the_new_estimator_runs_in_the_library_and_the_script_unchanged(example, tmp_path):
    import hessian_diagonal as script

    model = tiny_model("opt")
    name = "model.decoder.layers.1.self_attn.q_proj.bias"
    target = Target(name, (16,))
    res = hessian_diagonal(
        model,
        [target],
        tiny_ids(),
        estimators=("gaussian_hutchinson", "exact"),
        hvps=400,
        chunk=50,
    )
    est, exact = res.diagonals["gaussian_hutchinson"][name], res.diagonals["exact"][name]
    assert (
        res.hvps_per_sample["gaussian_hutchinson"] == 400
        and float((est - exact).norm() / exact.norm()) < 0.5
    )
    meta = script.run(
        [
            "--estimator",
            "gaussian_hutchinson",
            "hutchinson",
            "--vhp_samples",
            "4",
            "--seqlen",
            "8",
            "--b",
            "2",
            "--no_progress",
            "--output_dir",
            str(tmp_path),
            "--name",
            "g",
        ]
    )
    js = json.loads((tmp_path / "g.json").read_text())
    assert js["estimators"] == ["gaussian_hutchinson", "hutchinson"] == meta["estimators"]
    assert (
        js["hvps_per_sample"]["gaussian_hutchinson"] == 4
        and js["cost"]["gaussian_hutchinson"] == example.cost
    )
    diags = torch.load(tmp_path / "g.pt")
    assert diags["gaussian_hutchinson"]["model.decoder.layers.0.self_attn.q_proj.weight"].shape == (
        128,
        128,
    )


def test_a_file_in_the_package_folder_is_all_the_registry_needs(tmp_path, monkeypatch):
    package = tmp_path / "more_estimators"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "gaussian_hutchinson.py").write_text(blocks()[MODULE])
    monkeypatch.syspath_prepend(str(tmp_path))
    try:
        REGISTRY.discover("more_estimators", [str(package)])
        assert "gaussian_hutchinson" in REGISTRY and REGISTRY.names()[-1] == "gaussian_hutchinson"
    finally:
        if "gaussian_hutchinson" in REGISTRY:
            REGISTRY.unregister("gaussian_hutchinson")
        for m in [m for m in sys.modules if m.startswith("more_estimators")]:
            sys.modules.pop(m)
