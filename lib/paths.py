"""Where the bundled assets are (torch-free, for the checks that run before torch is imported)."""

from __future__ import annotations

from pathlib import Path


def assets_dir() -> Path:
    """The bundled assets: ``assets/`` inside the installed package (``pip install .``), else the source tree's."""
    here = Path(__file__).resolve().parent
    installed = here / "assets"
    return installed if installed.is_dir() else here.parent / "assets"


ROOT = Path(__file__).resolve().parent.parent
"""The source tree (the repository root when run from a checkout)."""
EMBEDDED_MODEL_DIR = assets_dir() / "tiny-opt-shakespeare"
EMBEDDED = "embedded"
"""Name of the project's own small trained OPT-architecture model (the default ``--model``)."""


def resolve_model_path(name: str) -> str:
    """``embedded`` -> the bundled model directory; anything else is returned unchanged."""
    return str(EMBEDDED_MODEL_DIR) if name == EMBEDDED else name
