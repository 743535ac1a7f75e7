"""Saving results: ``<name>.pt`` (the tensor), ``<name>.json`` (full configuration), and figures."""

from __future__ import annotations

import json
import os
import platform
from pathlib import Path
from typing import Any

import torch


def versions() -> dict[str, str]:
    """Versions of the libraries that produced a result, and the machine."""
    import numpy
    import transformers

    out = {"python": platform.python_version(), "torch": torch.__version__, "transformers": transformers.__version__, "numpy": numpy.__version__, "platform": platform.platform()}
    try:
        import datasets

        out["datasets"] = datasets.__version__
    except ImportError:  # pragma: no cover
        pass
    if torch.cuda.is_available():
        out["cuda"] = str(torch.version.cuda)
        out["gpu"] = torch.cuda.get_device_name()
    return out


def atomic_write_bytes(path: Path, write) -> None:
    """Write through ``write(tmp_path)`` to a temporary file, then rename it over ``path``."""
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    write(tmp)
    os.replace(tmp, path)


def save_tensor_and_json(output_dir: str | Path, name: str, tensor: Any, meta: dict[str, Any]) -> dict[str, Any]:
    """Write ``<output_dir>/<name>.pt`` (a tensor, or any object ``torch.save`` takes, e.g. a nested dict of
    tensors) and ``<output_dir>/<name>.json`` atomically.

    Returns the metadata as written (``meta`` plus ``versions`` and ``files``, names relative to ``output_dir``).
    """
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    pt, js = out / f"{name}.pt", out / f"{name}.json"
    obj = tensor.detach().cpu() if isinstance(tensor, torch.Tensor) else tensor
    atomic_write_bytes(pt, lambda p: torch.save(obj, p))
    meta = {**meta, "versions": versions(), "files": {"tensor": pt.name, "json": js.name}}
    atomic_write_bytes(js, lambda p: p.write_text(json.dumps(meta, indent=1, default=str) + "\n"))
    return meta
