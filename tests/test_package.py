"""The installable package (issue 17 item 4): the source folder ``lib/`` is the package ``llm_hessian`` once
installed (pyproject.toml), importable from any directory, with the bundled model and text, and with console
entry points for the scripts."""

from __future__ import annotations

import fcntl
import os
import shutil
import subprocess
import sys
import sysconfig

import pytest
from conftest import ROOT

CHECK = """
import importlib, pkgutil, sys
import llm_hessian as lib
for m in pkgutil.walk_packages(lib.__path__, "llm_hessian."):  # every module, so every relative import, under the new name
    importlib.import_module(m.name)
from llm_hessian.model.data import EMBEDDED_TEXT
from llm_hessian.model.models import EMBEDDED_MODEL_DIR
assert (EMBEDDED_MODEL_DIR / "model.safetensors").is_file() and EMBEDDED_TEXT.is_file()
assert "lib" not in sys.modules, "the package imported itself as lib"
assert lib.single_layer_single_block.__module__ == "llm_hessian.objective.subsets"
print(lib.__file__)
"""


def _env(**extra: str) -> dict[str, str]:
    return {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "PYTHONPATH": "", **extra}


def test_the_package_mapping_imports_as_llm_hessian_from_another_directory(tmp_path):
    """``package-dir = {llm_hessian = "lib"}`` without an install: a folder ``llm_hessian`` that is ``lib/``."""
    (tmp_path / "site").mkdir()
    (tmp_path / "site" / "llm_hessian").symlink_to(ROOT / "lib", target_is_directory=True)
    proc = subprocess.run(
        [sys.executable, "-c", CHECK],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env=_env(PYTHONPATH=str(tmp_path / "site")),
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == str(tmp_path / "site" / "llm_hessian" / "__init__.py")


def test_pyproject_maps_the_package_and_ships_the_assets():
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    cfg = tomllib.loads((ROOT / "pyproject.toml").read_text())
    st = cfg["tool"]["setuptools"]
    assert st["package-dir"] == {"llm_hessian": "lib", "llm_hessian.assets": "assets"}
    shipped = st["package-data"]["llm_hessian.assets"]
    assert "*.txt" in shipped and "tiny-opt-shakespeare/*" in shipped
    assert (ROOT / "assets" / "shakespeare-heldout.txt").is_file() and (
        ROOT / "assets" / "tiny-opt-shakespeare" / "config.json"
    ).is_file()
    assert "slow" in " ".join(cfg["tool"]["pytest"]["ini_options"]["markers"])


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    """``pip install .`` into a fresh venv (the dependencies: this interpreter's, through a .pth file), once per test
    session even with several test processes (a lock in their shared temporary folder): ``(its venv, its
    site-packages)``."""
    # the same folder for every xdist worker of the session
    shared = tmp_path_factory.getbasetemp().parent
    with open(shared / "llm_hessian_install.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        tmp_path = shared / "llm_hessian_install"
        venv = tmp_path / "venv"
        if not (tmp_path / "done").exists():
            shutil.rmtree(tmp_path, ignore_errors=True)
            tmp_path.mkdir()
            _install(tmp_path, venv)
            (tmp_path / "done").write_text("")
    return venv, next(venv.glob("lib/python*/site-packages"))


def _install(tmp_path, venv) -> None:
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=300)
    site = next(venv.glob("lib/python*/site-packages"))
    (site / "deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    src = (
        tmp_path / "src"
    )  # a copy: an in-tree build would leave build/ and *.egg-info in the checkout
    src.mkdir()
    for d in ("lib", "assets"):
        shutil.copytree(ROOT / d, src / d, ignore=shutil.ignore_patterns("__pycache__"))
    for f in ("pyproject.toml", "README.md", "LICENSE"):
        shutil.copy(ROOT / f, src / f)
    pip = subprocess.run(
        [str(venv / "bin" / "python"), "-m", "pip", "install", "-q", "--no-deps", str(src)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert pip.returncode == 0, pip.stderr


@pytest.mark.slow
def test_pip_install_then_import_and_run_from_another_directory(tmp_path, installed):
    """The package and an entry point, installed, from another directory."""
    venv, site = installed
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    proc = subprocess.run(
        [str(venv / "bin" / "python"), "-c", CHECK],
        capture_output=True,
        text=True,
        cwd=elsewhere,
        env=_env(),
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == str(site / "llm_hessian" / "__init__.py")
    run = subprocess.run(
        [
            str(venv / "bin" / "llm-hessian-single-layer-single-block"),
            "--t",
            "2",
            "--seqlen",
            "16",
            "--b",
            "2",
            "--no_progress",
            "--output_dir",
            "out",
            "--cache_dir",
            "c",
            "--name",
            "h",
        ],
        capture_output=True,
        text=True,
        cwd=elsewhere,
        env=_env(),
        timeout=600,
    )
    assert run.returncode == 0, run.stderr
    assert (elsewhere / "out" / "h.pt").is_file() and run.stdout.splitlines()[-1].startswith(
        "wrote "
    )


def test_every_subpackage_of_lib_is_listed_for_installation():
    """``pip install .`` ships only the listed packages: a new folder under ``lib/`` must be added to pyproject."""
    tomllib = pytest.importorskip("tomllib")
    listed = set(
        tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]
    )
    found = {
        "llm_hessian" + "".join(f".{p}" for p in d.relative_to(ROOT / "lib").parts)
        for d in (ROOT / "lib").rglob("*")
        if d.is_dir() and (d / "__init__.py").exists()
    } | {"llm_hessian"}
    assert found <= listed, sorted(found - listed)


DOCS_EXAMPLES = """
import doctest, re, sys
from pathlib import Path

readme, page = (Path(p).read_text() for p in sys.argv[1:3])
snippet = re.search(r"## Library\\n+```python\\n(.*?)```", readme, re.S).group(1)
scope = {}
exec(compile(snippet, "README.md (Library)", "exec"), scope)
assert scope["lib"].__name__ == "llm_hessian" and scope["result"].hessian.shape == (32, 32)
source = "\\n".join("" if line.startswith("```") else line for line in page.splitlines()) + "\\n"
test = doctest.DocTestParser().get_doctest(source, {}, "docs/library.md", "docs/library.md", 0)
runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS)
runner.run(test, clear_globs=False)
assert test.globs["lib"].__name__ == "llm_hessian" and "lib" not in sys.modules
print(len(test.examples), runner.summarize(verbose=False).failed)
"""


@pytest.mark.slow
def test_the_docs_examples_run_verbatim_against_the_installed_package(tmp_path, installed):
    """The README's library snippet and docs/library.md's examples, as written, with the installed package from a
    directory that has no ``lib/`` (issue 27 item 2; from a checkout: tests/test_docs.py, test_library.py)."""
    venv, _ = installed
    proc = subprocess.run(
        [
            str(venv / "bin" / "python"),
            "-c",
            DOCS_EXAMPLES,
            str(ROOT / "README.md"),
            str(ROOT / "docs" / "library.md"),
        ],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env=_env(),
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    examples, failed = map(int, proc.stdout.splitlines()[-1].split())
    assert examples >= 20 and failed == 0, proc.stdout
