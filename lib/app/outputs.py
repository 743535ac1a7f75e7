"""Output pre-flight and guarantees of a run: checked before the model is loaded, held until it ends.

* :func:`default_name`: a readable stem plus a short hash of the result-defining configuration (the run
  spec's result-changing fields), so runs that would give different results never share a name.
* :func:`claim`: the output directory is created and a probe file written and removed; ``--name`` must
  be a plain file stem short enough for every file name the run derives from it (temporary files
  included); an exclusive ``fcntl`` lock on ``<name>.lock`` is taken for the whole run (a second run with
  the same name refuses at once); a finished result (``<name>.json``) is never replaced without
  ``--overwrite``; an existing checkpoint is never ignored or replaced without ``--resume``; no file the
  run will write (every suffix: :func:`planned_files`) may belong to another result, finished, unfinished
  or running (e.g. ``--name r --batch_study`` would write ``r_batch_study.pt``, the tensor of a result
  ``--name r_batch_study``).
* :func:`saving_results`: from here on the run's outputs are staged and committed as one set
  (:class:`lib.app.results.OutputSet`).
* :func:`guarded` (decorator of a script's run function): releases the claim however the run ends, and
  turns an error while the outputs are written (after :func:`saving_results`) into a
  :class:`~lib.errors.RunError` saying that the finished sums are in the checkpoint and that
  ``--resume`` writes the outputs without recomputing.
"""

from __future__ import annotations

import fcntl
import functools
import json
import os
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from ..errors import Interrupted, RunError, UserError, signal_name
from . import results


def default_name(prefix: str, digest: str) -> str:
    """``<prefix>_<digest>`` with path separators and ``None`` (= all / the model's maximum) made readable;
    ``digest``: the run spec's hash of its result-changing fields (:meth:`lib.app.spec.RunSpec.digest`)."""
    stem = prefix.replace("/", "-").replace("None", "all")
    return f"{stem}_{digest}"


def check_name(name: str) -> None:
    """``--name`` must be a plain file stem: no path separator, not ``.``/``..``, not empty."""
    if (
        not name
        or name in (".", "..")
        or "/" in name
        or os.sep in name
        or "\0" in name
        or name.startswith(".")
    ):
        raise UserError(
            f"--name {name!r} is not a plain file name (no '/', not '.', '..' or a hidden name); use --output_dir for the folder"
        )


FIGURE_FORMATS = (".pdf", ".png")
CHECKPOINT_SUFFIXES = (".ckpt", ".phase2.ckpt", ".passes")
"""Checkpoint files of the scripts (the spectrum's pass log ``.passes`` is a directory)."""
DERIVED_STEMS = ("_slice_mass", "_batch_study", "_compare", "_convergence", "_density")
"""Stems of the extra files a result may have: ``<name><stem>.pdf/.png`` and, for some, ``<name><stem>.pt``."""


def figure_files(stem: str) -> list[str]:
    """``<stem>.pdf``, ``<stem>.png``."""
    return [stem + ext for ext in FIGURE_FORMATS]


def planned_files(
    name: str, figures: Iterable[str] = ("",), tensors: Iterable[str] = ()
) -> list[str]:
    """The result files a run writes besides its checkpoints: ``<name>.pt``, ``<name>.json``, ``<name><t>.pt`` for
    each extra tensor stem ``t`` and ``<name><f>.pdf/.png`` for each figure stem ``f`` (``""``: the main figure;
    ``"_slice_mass"``, ...)."""
    out = [f"{name}.pt", f"{name}.json", *(f"{name}{t}.pt" for t in tensors)]
    for f in figures:
        out += figure_files(name + f)
    return list(dict.fromkeys(out))


def _fixed_files(stem: str) -> set[str]:
    """Files any result or run named ``stem`` may have whatever its flags."""
    return {
        f"{stem}.pt",
        f"{stem}.json",
        f"{stem}.lock",
        *figure_files(stem),
        *(stem + c for c in CHECKPOINT_SUFFIXES),
    }


PID_DIGITS = len(str(2**22))
"""Digits of the largest process id on Linux (``pid_max`` at most 2^22), in temporary file names."""


def _name_max(out: Path) -> int:
    """The longest file name, in bytes, the file system of ``out`` (or of its nearest existing parent) allows."""
    for d in [out, *out.parents]:
        if d.is_dir():
            try:
                return os.pathconf(d, "PC_NAME_MAX")
            except (OSError, ValueError):
                break
    return 255


def check_name_length(out: Path, name: str, files: Iterable[str]) -> None:
    """Refuse (:class:`UserError`) a ``name`` whose longest derived file name, a temporary
    ``.<file>.tmp<pid>`` of any of ``files``, would exceed the file system's limit (255 bytes on most), in bytes."""
    limit = _name_max(out)
    longest = max(files, key=lambda f: len(f.encode()))
    total = len(f".{longest}{results.TEMP_MARK}".encode()) + PID_DIGITS
    if total > limit:
        size = len(name.encode())
        extra = total - size
        example = "." + longest.replace(name, "<name>", 1) + f"{results.TEMP_MARK}<pid>"
        raise UserError(
            f"--name is {size} bytes long (UTF-8): with the suffixes and temporary-file markers this run adds "
            f"(up to {extra} bytes, as in {example!r}) its file names would exceed the {limit}-byte limit of {out}; "
            f"use a --name of at most {limit - extra} bytes"
        )


def _probe_dir(out: Path) -> Path | None:
    """Create ``out`` and write, fsync and remove a probe file there (:class:`UserError` if impossible).

    Returns the topmost directory it created (``None`` if ``out`` existed)."""
    created = None
    for d in [out, *out.parents]:
        if d.exists():
            break
        created = d
    probe = out / f".write-probe-{os.getpid()}"
    try:
        out.mkdir(parents=True, exist_ok=True)
        try:
            with open(probe, "wb") as f:
                f.write(b"probe")
                f.flush()
                os.fsync(f.fileno())
        finally:  # also when the write fails (a full disk): never leave the probe behind
            probe.unlink(missing_ok=True)
    except OSError as e:
        _remove_empty(out, created)
        raise UserError(
            f"--output_dir {str(out)!r} is not a writable directory ({e.strerror or e}); choose another --output_dir"
        ) from None
    return created


def _remove_empty(out: Path, top: Path | None) -> None:
    """Remove ``out`` and its parents up to ``top`` (directories this run created) while they are empty."""
    if top is None:
        return
    for d in [out, *out.parents]:
        try:
            d.rmdir()
        except OSError:
            return
        if d == top:
            return


@dataclass
class Claim:
    """The outputs of one run: its lock (held until :meth:`release`) and, once computed, its checkpoints."""

    lock_path: Path
    fd: int | None
    created: Path | None = None
    """The topmost output directory this run created: removed again if the run leaves it empty."""
    checkpoints: list[Any] = field(default_factory=list)
    """:class:`lib.runtime.checkpoint.CheckpointConfig` of the run, set by :func:`saving_results`."""
    saving: bool = False
    files: list[str] = field(default_factory=list)
    """Every file name the run may write in its output directory (result files, checkpoints, lock)."""
    staging: Any = None
    """The run's :class:`lib.app.results.OutputSet` once it writes its outputs."""

    def release(self) -> None:
        if self.staging is not None:
            self.staging.abort()  # committed sets are empty: this removes only what a failed save left staged
            self.staging = None
        if self.fd is None:
            return
        try:
            self.lock_path.unlink()  # still under the lock; a waiter re-checks the inode (see _lock)
        except FileNotFoundError:
            pass
        os.close(self.fd)
        self.fd = None
        _remove_empty(self.lock_path.parent, self.created)


_CURRENT: list[Claim] = []
"""Claims held by this process (one per running script call)."""


def _held(path: Path) -> bool:
    """Whether another process holds the ``flock`` of the lock file ``path`` (a run in progress)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)  # fails while a run holds its exclusive lock
        return False
    except OSError:
        return True
    finally:
        os.close(fd)


def _owner(out: Path, stem: str, own: set[str]) -> tuple[set[str], str] | None:
    """The files of the result or run named ``stem`` in ``out`` and what it is, or ``None`` if there is none
    (a checkpoint among ``own``, this run's files, e.g. ``<name>.phase2.ckpt``, is not another run's)."""
    js, lock, ckpt = out / f"{stem}.json", out / f"{stem}.lock", out / f"{stem}.ckpt"
    if js.is_file():
        try:
            listed = results.listed_files(json.loads(js.read_text()))
        except (OSError, ValueError, AttributeError):
            listed = set()
        # a finished result owns the files its JSON lists (and its JSON, lock and checkpoints), not every figure a
        # run of its name could draw: a spectrum named q_convergence must not block q's own q_convergence.pdf
        kept = {f"{stem}.json", f"{stem}.lock", *(stem + c for c in CHECKPOINT_SUFFIXES)}
        return (kept | listed if listed else _fixed_files(stem)), f"the result {js}"
    if lock.is_file() and _held(lock):
        try:
            lines = lock.read_text().splitlines()
        except OSError:
            lines = []
        return _fixed_files(stem) | set(
            lines[1:]
        ), f"a run in progress (pid {lines[0] if lines else '?'}) named {stem}"
    if ckpt.exists() and ckpt.name not in own:
        return _fixed_files(stem), f"the unfinished run {stem} (checkpoint {ckpt})"
    return None


def check_foreign(out: Path, name: str, files: Iterable[str]) -> None:
    """Refuse (:class:`UserError`) when one of ``files`` belongs to a result other than ``name``: it is listed by
    the JSON of a finished result, planned by a run in progress (its lock file), or one of the fixed files of an
    unfinished run (its checkpoint). Each file can only be derived from a stem that is a prefix of its name."""
    owners: dict[str, tuple[set[str], str] | None] = {}
    files = list(dict.fromkeys(files))
    own = set(files)
    for f in files:
        for i in range(1, len(f) + 1):
            stem = f[:i]
            if stem == name:
                continue
            if stem not in owners:
                owners[stem] = _owner(out, stem, own)
            found = owners[stem]
            if found is not None and f in found[0]:
                raise UserError(
                    f"this run would write {out / f}, which belongs to {found[1]}; "
                    "choose another --name (--overwrite replaces only a result of the same name)"
                )


def _remove_stale_temps(out: Path, files: Iterable[str]) -> None:
    """Remove temporary files ``.<file>.tmp<pid>`` of ``files`` left by a killed run of the same name (we hold its
    lock)."""
    prefixes = tuple(f".{f}{results.TEMP_MARK}" for f in files)
    try:
        entries = os.listdir(out)
    except OSError:
        return
    for e in entries:
        if e.startswith(prefixes) and e.rsplit(results.TEMP_MARK, 1)[-1].isdigit():
            try:
                os.unlink(out / e)
            except OSError:
                pass


def _lock(path: Path, files: Sequence[str] = ()) -> int:
    """An exclusive non-blocking ``flock`` on ``path`` (created if needed); :class:`UserError` if another run holds it.

    The file holds the holder's pid, then the names of the files it will write (one a line), for other runs' checks."""
    for _ in range(10):
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            try:
                pid = (path.read_text().splitlines() or ["?"])[0].strip() or "?"
            except OSError:
                pid = "?"
            raise UserError(
                f"another run (pid {pid}) is writing {path.with_suffix('')}.*; wait for it to finish or choose another --name"
            ) from None
        try:
            same = os.fstat(fd).st_ino == os.stat(path).st_ino
        except FileNotFoundError:
            same = False
        if same:  # not a file that its holder removed between our open and our lock
            os.ftruncate(fd, 0)
            os.write(fd, "\n".join([str(os.getpid()), *files]).encode())
            return fd
        os.close(fd)
    raise UserError(f"could not lock {path}: it keeps being replaced by another run")


def claim(
    output_dir: str | Path,
    name: str,
    checkpoints: Sequence[Path],
    overwrite: bool,
    resume: bool,
    rank0: bool = True,
    files: Sequence[str] | None = None,
) -> Claim:
    """Check and lock the outputs of a run before any heavy work (:class:`UserError` on any problem).

    ``checkpoints``: every checkpoint file the run may write; ``files``: every result file it writes
    (:func:`planned_files`; default ``<name>.pt``, ``.json`` and its figure). On torchrun ranks other than 0
    (``rank0=False``), which write nothing, only ``name`` is checked.
    """
    check_name(name)
    out = Path(output_dir)
    results_files = planned_files(name) if files is None else files
    planned = list(
        dict.fromkeys([*results_files, *(Path(p).name for p in checkpoints), f"{name}.lock"])
    )
    check_name_length(out, name, planned)
    if not rank0:
        return Claim(out / f"{name}.lock", None)
    if out.exists() and not out.is_dir():
        raise UserError(
            f"--output_dir {str(out)!r} is a file, not a directory; choose another --output_dir"
        )
    created = _probe_dir(out)
    lock_path = out / f"{name}.lock"
    try:
        fd = _lock(lock_path, planned)
    except UserError:
        _remove_empty(out, created)
        raise
    c = Claim(lock_path, fd, created=created, files=planned)
    try:
        # first: another run's checkpoint is never this run's to --resume
        check_foreign(out, name, planned)
        finished = out / f"{name}.json"
        if finished.exists() and not overwrite:
            raise UserError(
                f"{finished} holds a finished result; pass --overwrite to replace it, --skip_existing to keep it "
                f"(exit 0 when it holds this configuration), or choose another --name"
            )
        if not resume:
            for p in checkpoints:
                if Path(p).exists():
                    raise UserError(
                        f"checkpoint {p} exists from an earlier run; pass --resume to continue it, or delete it to start over"
                    )
        _remove_stale_temps(out, planned)
    except BaseException:
        c.release()
        raise
    _CURRENT.append(c)
    return c


def saving_results(checkpoints: Sequence[Any]) -> None:
    """Mark the start of writing the outputs of the current run (every unit is computed and, with
    checkpointing on, in ``checkpoints``): from here on its files are staged and committed as one set by
    :func:`lib.app.results.save_tensor_and_json` (:class:`lib.app.results.OutputSet`)."""
    if _CURRENT:
        c = _CURRENT[-1]
        c.checkpoints = [x for x in checkpoints if x is not None]
        c.saving = True
        if c.staging is None and c.fd is not None:
            c.staging = results.open_output_set(c.lock_path.parent, c.files)


def _kept(c: Claim) -> str:
    """Where the complete sums are, and how to write the outputs from them."""
    written = [cfg for cfg in c.checkpoints if cfg.writes and Path(cfg.path).exists()]
    if written:
        paths = ", ".join(str(cfg.path) for cfg in written)
        return f"every unit is computed and saved in {paths}: fix the cause and rerun with --resume (and the same flags) to write the outputs without recomputing"
    return "checkpointing was off (--checkpoint_every 0), so the computed sums are lost"


def _save_failure(e: Exception, c: Claim) -> RunError:
    return RunError(f"could not write the results ({type(e).__name__}: {e}); {_kept(c)}")


F = TypeVar("F", bound=Callable[..., Any])


def guarded(fn: F) -> F:
    """Decorator of a script's run function: releases the claims it took, and reports a failed save in one line."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        depth = len(_CURRENT)
        try:
            return fn(*args, **kwargs)
        except (RunError, UserError):
            raise
        except (Interrupted, KeyboardInterrupt) as e:
            if len(_CURRENT) > depth and _CURRENT[-1].saving:
                signum = e.signum if isinstance(e, Interrupted) else 2
                raise Interrupted(
                    signum,
                    f"interrupted by {signal_name(signum)} while writing the results; {_kept(_CURRENT[-1])}",
                ) from None
            raise
        except Exception as e:  # noqa: BLE001 -- a disk full or a permission change while writing the outputs
            if len(_CURRENT) > depth and _CURRENT[-1].saving:
                raise _save_failure(e, _CURRENT[-1]) from None
            raise
        finally:
            while len(_CURRENT) > depth:
                _CURRENT.pop().release()

    return wrapper  # type: ignore[return-value]
