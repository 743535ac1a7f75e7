"""Saving results: ``<name>.pt`` (the tensor), ``<name>.json`` (full configuration), and figures."""

from __future__ import annotations

import hashlib
import json
import os
import platform
from pathlib import Path
from typing import Any

import torch

from . import threads


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


def fsync_dir(path: Path) -> None:
    """Make the directory entries of ``path`` (renames, removals) durable."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # pragma: no cover -- platforms without directory fds
        return
    try:
        os.fsync(fd)
    except OSError:  # pragma: no cover
        pass
    finally:
        os.close(fd)


def atomic_write_bytes(path: Path, write) -> None:
    """Write through ``write(tmp_path)`` to a temporary file, fsync it, rename it over ``path``, fsync the directory."""
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        write(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def sha256_file(path: str | Path) -> str:
    """Hex SHA-256 of a file's bytes."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def save_tensor_and_json(output_dir: str | Path, name: str, tensor: Any, meta: dict[str, Any]) -> dict[str, Any]:
    """Write ``<output_dir>/<name>.pt`` (a tensor, or any object ``torch.save`` takes, e.g. a nested dict of
    tensors) and ``<output_dir>/<name>.json`` durably, as a pair.

    Order: an old ``.json`` is removed first, then the ``.pt`` and last the ``.json`` (which records the
    ``.pt``'s SHA-256) are each written to a temporary file, fsynced, renamed and the directory fsynced.
    So a ``.json`` always describes the ``.pt`` beside it, whenever the process is killed.
    Returns the metadata as written (``meta`` plus ``versions``, ``files`` (names relative to ``output_dir``) and, when
    :func:`lib.threads.apply` chose this process's threads, ``threads``).
    """
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    pt, js = out / f"{name}.pt", out / f"{name}.json"
    obj = tensor.detach().cpu() if isinstance(tensor, torch.Tensor) else tensor
    if js.exists():
        js.unlink()
        fsync_dir(out)
    atomic_write_bytes(pt, lambda p: torch.save(obj, p))
    chosen = {"threads": threads.report()} if threads.report() is not None and "threads" not in meta else {}
    meta = {**meta, **chosen, "versions": versions(), "files": {"tensor": pt.name, "json": js.name}, "tensor_sha256": sha256_file(pt)}
    atomic_write_bytes(js, lambda p: p.write_text(json.dumps(meta, indent=1, default=str) + "\n"))
    return meta
