"""Saving and reading results: ``<name>.pt`` (the tensor), ``<name>.json`` (full configuration, and the manifest:
the SHA-256 of every other file of the result), and figures.

The files of one result are replaced as a unit (:class:`OutputSet`): while a run writes its outputs, every
:func:`atomic_write_bytes` into its output directory goes to a temporary file; :func:`save_tensor_and_json`
then removes the old ``<name>.json``, renames every temporary into place and writes the new ``<name>.json``
last, listing each file with its SHA-256 (``outputs``). A result is the set its JSON lists, and
:func:`verify_result` checks it: whenever the process is killed, a ``<name>.json`` present describes exactly
the files beside it, and without one there is no result.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch

from ..errors import UserError


def versions() -> dict[str, str]:
    """Versions of the libraries that produced a result, and the machine."""
    import numpy
    import transformers

    out = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "numpy": numpy.__version__,
        "platform": platform.platform(),
    }
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


TEMP_MARK = ".tmp"
"""Temporary files are ``.<file name>.tmp<pid>`` (hidden, beside their target)."""


def temp_path(path: Path) -> Path:
    """Where :func:`atomic_write_bytes` writes ``path`` first: ``.<name>.tmp<pid>`` beside it."""
    return path.with_name(f".{path.name}{TEMP_MARK}{os.getpid()}")


def _write_temp(path: Path, write) -> Path:
    """``write(tmp)`` to :func:`temp_path` of ``path`` and fsync it; the temporary is removed if anything fails."""
    tmp = temp_path(path)
    try:
        write(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return tmp


def atomic_write_bytes(path: Path, write) -> None:
    """Write through ``write(tmp_path)`` to a temporary file, fsync it, rename it over ``path``, fsync the directory.

    While an :class:`OutputSet` is open for ``path``'s directory, the file is only staged (written and fsynced
    under its temporary name); the set's commit renames it (:func:`save_tensor_and_json`)."""
    path = Path(path)
    staging = _OPEN[-1] if _OPEN and _OPEN[-1].holds(path) else None
    if staging is not None:
        staging.stage(path, write)
        return
    tmp = _write_temp(path, write)
    try:
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


class OutputSet:
    """The files of one result in ``directory``, staged under temporary names and committed together.

    ``names``: the file names the result may write (claimed by :func:`lib.app.outputs.claim`); writing any other
    file into ``directory`` while the set is open is an error (a file the run did not claim). Open it with
    :func:`open_output_set`; :func:`save_tensor_and_json` commits and closes it; :meth:`abort` removes the staged files.
    """

    def __init__(self, directory: str | Path, names: Iterable[str]):
        self.dir = Path(directory)
        self.names = frozenset(names)
        self.staged: dict[str, Path] = {}
        """Final file name -> its staged temporary file, in the order written."""

    def holds(self, path: Path) -> bool:
        """Whether ``path`` is in this set's directory (so it must be one of its files, and is staged)."""
        return os.path.abspath(path.parent) == os.path.abspath(self.dir)

    def stage(self, path: Path, write) -> None:
        if path.name not in self.names:
            claimed = ", ".join(sorted(self.names))
            raise ValueError(
                f"{path} is not among the files this run claimed ({claimed}); add it to the run's claim"
            )
        earlier = self.staged.pop(path.name, None)
        if earlier is not None:
            earlier.unlink(missing_ok=True)
        self.staged[path.name] = _write_temp(path, write)

    def abort(self) -> None:
        """Remove the staged files (the run failed before its commit)."""
        for tmp in self.staged.values():
            tmp.unlink(missing_ok=True)
        self.staged.clear()
        close_output_set(self)


_OPEN: list[OutputSet] = []
"""The output sets open in this process (the last one stages)."""


def open_output_set(directory: str | Path, names: Iterable[str]) -> OutputSet:
    """Stage every following :func:`atomic_write_bytes` into ``directory`` until :func:`save_tensor_and_json`
    commits."""
    s = OutputSet(directory, names)
    _OPEN.append(s)
    return s


def close_output_set(s: OutputSet) -> None:
    if s in _OPEN:
        _OPEN.remove(s)


def listed_files(meta: dict[str, Any]) -> set[str]:
    """The file names a result's JSON lists: its manifest ``outputs`` and ``files``, and for results written before
    the manifest, ``figures``, ``batch_study_files`` and the comparison's ``file`` and ``figures``."""
    names = set(meta.get("outputs") or {}) | set((meta.get("files") or {}).values())
    names |= set(meta.get("figures") or []) | set(meta.get("batch_study_files") or [])
    details = meta.get("comparison_details") or {}
    names |= set(details.get("figures") or []) | (
        {details["file"]} if details.get("file") else set()
    )
    return {n for n in names if isinstance(n, str)}


def save_tensor_and_json(
    output_dir: str | Path, name: str, tensor: Any, meta: dict[str, Any]
) -> dict[str, Any]:
    """Write ``<output_dir>/<name>.pt`` (a tensor, or any object ``torch.save`` takes, e.g. a nested dict of
    tensors) and ``<output_dir>/<name>.json``, and commit every other file of the result staged before (the
    open :class:`OutputSet` of ``output_dir``: figures, extra tensors) with them, as one set.

    Order: the ``.pt`` is staged (temporary file, fsynced) like the others and each staged file's SHA-256 taken;
    the old ``.json`` is removed (directory fsynced), then the files it listed that the new result does not have;
    every staged file is renamed into place (directory fsynced); last the ``.json``, recording ``tensor_sha256``
    and the manifest ``outputs`` (file name -> SHA-256 of every file but itself), is written to a temporary
    file, fsynced and renamed. So a ``.json`` always describes exactly the files beside it,
    whenever the process is killed. Returns the metadata as written (``meta`` plus ``versions``, ``files``
    (names relative to ``output_dir``), ``tensor_sha256`` and ``outputs``).
    """
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    pt, js = out / f"{name}.pt", out / f"{name}.json"
    obj = tensor.detach().cpu() if isinstance(tensor, torch.Tensor) else tensor
    own = _OPEN[-1] if _OPEN and _OPEN[-1].holds(pt) else open_output_set(out, [pt.name])
    try:
        own.stage(pt, lambda p: torch.save(obj, p))
        digests = {n: sha256_file(tmp) for n, tmp in own.staged.items()}
        old = _old_files(js)
        if js.exists():
            js.unlink()
            fsync_dir(out)
        for stale in sorted(
            old - set(digests) - {js.name}
        ):  # e.g. an --overwrite without the batch study
            (out / stale).unlink(missing_ok=True)
        for n, tmp in list(own.staged.items()):
            os.replace(tmp, out / n)
            del own.staged[n]
        fsync_dir(out)
    except BaseException:
        own.abort()
        raise
    close_output_set(own)
    meta = {
        **meta,
        "versions": versions(),
        "files": {"tensor": pt.name, "json": js.name},
        "tensor_sha256": digests[pt.name],
        "outputs": dict(sorted(digests.items())),
    }
    atomic_write_bytes(js, lambda p: p.write_text(json.dumps(meta, indent=1, default=str) + "\n"))
    return meta


def _old_files(js: Path) -> set[str]:
    """The files listed by the result about to be replaced (none if there is none or its JSON is unreadable)."""
    try:
        return listed_files(json.loads(js.read_text()))
    except (OSError, ValueError, AttributeError):
        return set()


_REBUILD = "rerun with --overwrite to rebuild the result"

RENAMED_KEYS = {"vhp_samples": "hvps", "probe_batch": "chunk"}
"""Keys of results written before one name per concept (old -> new): the diagonal's ``K`` and product batch."""


def current_keys(meta: dict[str, Any]) -> dict[str, Any]:
    """``meta`` with the old keys of :data:`RENAMED_KEYS` renamed (in place, also inside each phase's ``chunk``
    report); a result written with the new keys is returned unchanged."""
    for old, new in RENAMED_KEYS.items():
        if old in meta and new not in meta:
            meta[new] = meta.pop(old)
    phases = meta.get("chunk")
    if isinstance(phases, dict):
        for report in phases.values():
            if isinstance(report, dict) and "probe_batch" in report and "chunk" not in report:
                report["chunk"] = report.pop("probe_batch")
    return meta


class ResultMismatch(UserError):
    """A result's files are missing or differ from what its JSON records."""


def verify_result(json_path: str | Path) -> dict[str, Any]:
    """Read the result ``<name>.json`` and check every file it records against its SHA-256: the manifest
    ``outputs`` (the tensor, figures, extra tensors), or for results written before the manifest, the tensor's
    ``tensor_sha256``. Returns the metadata (old keys renamed: :func:`current_keys`); raises :class:`ResultMismatch` (a :class:`~lib.errors.UserError`:
    one line, exit status 2) naming the first file that is missing or differs, or a JSON that cannot be read."""
    js = Path(json_path)
    try:
        meta = json.loads(js.read_text())
    except (OSError, ValueError) as e:
        raise ResultMismatch(f"cannot read the result {js} ({type(e).__name__}: {e})") from None
    if (
        not isinstance(meta, dict)
        or not isinstance(meta.get("files"), dict)
        or "tensor" not in meta["files"]
    ):
        raise ResultMismatch(f"{js} is not a result of this project (no 'files' naming its tensor)")
    recorded = dict(meta.get("outputs") or {})
    recorded.setdefault(meta["files"]["tensor"], meta.get("tensor_sha256"))
    for n, want in recorded.items():
        f = js.parent / n
        if not f.is_file():
            raise ResultMismatch(f"{f}, a file of the result {js}, is missing; {_REBUILD}")
        got = sha256_file(f)
        if got != want:
            raise ResultMismatch(
                f"{f} does not match the SHA-256 recorded in {js} ({str(want)[:12]}.. recorded, {got[:12]}.. found): "
                f"it was replaced or damaged; {_REBUILD}"
            )
    return current_keys(meta)


def load_result(json_path: str | Path) -> tuple[dict[str, Any], Any]:
    """``(metadata, tensor)`` of a result, after :func:`verify_result`."""
    meta = verify_result(json_path)
    return meta, torch.load(Path(json_path).parent / meta["files"]["tensor"], weights_only=True)


def run_config(meta: dict[str, Any]) -> dict[str, Any]:
    """The ``config`` of a result's metadata with only the fields the run used (:func:`lib.app.spec.used_config`), the
    same for files written before the JSON left the unused ones out (they listed a ``--params`` run's default
    ``layer_name``, ``block_index`` and ``t``)."""
    from .spec import used_config

    return used_config(meta["config"])
