"""Output pre-flight and guarantees of a run: checked before the model is loaded, held until it ends.

* :func:`default_name`: a readable stem plus a short hash of the result-defining configuration, so
  runs that would give different results never share a name.
* :func:`claim`: the output directory is created and a probe file written and removed; ``--name`` must
  be a plain file stem; an exclusive ``fcntl`` lock on ``<name>.lock`` is taken for the whole run (a
  second run with the same name refuses at once); a finished result (``<name>.json``) is never replaced
  without ``--overwrite``; an existing checkpoint is never ignored or replaced without ``--resume``.
* :func:`guarded` (decorator of a script's run function): releases the claim however the run ends, and
  turns an error while the outputs are written (after :func:`saving_results`) into a
  :class:`~lib.errors.RunError` saying that the finished sums are in the checkpoint and that
  ``--resume`` writes the outputs without recomputing.
"""

from __future__ import annotations

import argparse
import fcntl
import functools
import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence, TypeVar

from .errors import Interrupted, RunError, UserError, signal_name

OPERATIONAL_FLAGS = frozenset(
    {"output_dir", "name", "no_progress", "devices", "device", "device_map", "checkpoint_every", "resume", "keep_checkpoint", "overwrite", "unit_timeout", "cache_dir", "chunk", "probe_batch", "threads"}
)
"""Flags that change how or where a run computes, not its result (left out of the default name's hash)."""


def config_digest(args: argparse.Namespace, ignore: Sequence[str] = ()) -> str:
    """8 hex digits of the SHA-256 of the result-defining flags (all but :data:`OPERATIONAL_FLAGS` and ``ignore``)."""
    cfg = {k: v for k, v in sorted(vars(args).items()) if k not in OPERATIONAL_FLAGS and k not in ignore}
    return hashlib.sha256(json.dumps(cfg, sort_keys=True, default=str).encode()).hexdigest()[:8]


def default_name(prefix: str, args: argparse.Namespace, ignore: Sequence[str] = ()) -> str:
    """``<prefix>_<hash>`` with path separators and ``None`` (= all / the model's maximum) made readable."""
    stem = prefix.replace("/", "-").replace("None", "all")
    return f"{stem}_{config_digest(args, ignore)}"


def check_name(name: str) -> None:
    """``--name`` must be a plain file stem: no path separator, not ``.``/``..``, not empty."""
    if not name or name in (".", "..") or "/" in name or os.sep in name or "\0" in name or name.startswith("."):
        raise UserError(f"--name {name!r} is not a plain file name (no '/', not '.', '..' or a hidden name); use --output_dir for the folder")


def _probe_dir(out: Path) -> Path | None:
    """Create ``out`` and write, fsync and remove a probe file there (:class:`UserError` if impossible).

    Returns the topmost directory it created (``None`` if ``out`` existed)."""
    created = None
    for d in [out, *out.parents]:
        if d.exists():
            break
        created = d
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / f".write-probe-{os.getpid()}"
        with open(probe, "wb") as f:
            f.write(b"probe")
            f.flush()
            os.fsync(f.fileno())
        probe.unlink()
    except OSError as e:
        _remove_empty(out, created)
        raise UserError(f"--output_dir {str(out)!r} is not a writable directory ({e.strerror or e}); choose another --output_dir") from None
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
    """:class:`lib.checkpoint.CheckpointConfig` of the run, set by :func:`saving_results`."""
    saving: bool = False

    def release(self) -> None:
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


def _lock(path: Path) -> int:
    """An exclusive non-blocking ``flock`` on ``path`` (created if needed); :class:`UserError` if another run holds it."""
    for _ in range(10):
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            try:
                pid = path.read_text().strip() or "?"
            except OSError:
                pid = "?"
            raise UserError(f"another run (pid {pid}) is writing {path.with_suffix('')}.*; wait for it to finish or choose another --name") from None
        try:
            same = os.fstat(fd).st_ino == os.stat(path).st_ino
        except FileNotFoundError:
            same = False
        if same:  # not a file that its holder removed between our open and our lock
            os.ftruncate(fd, 0)
            os.write(fd, str(os.getpid()).encode())
            return fd
        os.close(fd)
    raise UserError(f"could not lock {path}: it keeps being replaced by another run")


def claim(output_dir: str | Path, name: str, checkpoints: Sequence[Path], overwrite: bool, resume: bool, rank0: bool = True) -> Claim:
    """Check and lock the outputs of a run before any heavy work (:class:`UserError` on any problem).

    ``checkpoints``: every checkpoint file the run may write. On torchrun ranks other than 0
    (``rank0=False``), which write nothing, only ``name`` is checked.
    """
    check_name(name)
    out = Path(output_dir)
    if not rank0:
        return Claim(out / f"{name}.lock", None)
    if out.exists() and not out.is_dir():
        raise UserError(f"--output_dir {str(out)!r} is a file, not a directory; choose another --output_dir")
    created = _probe_dir(out)
    lock_path = out / f"{name}.lock"
    try:
        fd = _lock(lock_path)
    except UserError:
        _remove_empty(out, created)
        raise
    c = Claim(lock_path, fd, created=created)
    try:
        finished = out / f"{name}.json"
        if finished.exists() and not overwrite:
            raise UserError(f"{finished} holds a finished result; pass --overwrite to replace it, or choose another --name")
        if not resume:
            for p in checkpoints:
                if Path(p).exists():
                    raise UserError(f"checkpoint {p} exists from an earlier run; pass --resume to continue it, or delete it to start over")
    except BaseException:
        c.release()
        raise
    _CURRENT.append(c)
    return c


def saving_results(checkpoints: Sequence[Any]) -> None:
    """Mark the start of writing the outputs of the current run (every unit is computed and, with
    checkpointing on, in ``checkpoints``)."""
    if _CURRENT:
        _CURRENT[-1].checkpoints = [c for c in checkpoints if c is not None]
        _CURRENT[-1].saving = True


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
                raise Interrupted(signum, f"interrupted by {signal_name(signum)} while writing the results; {_kept(_CURRENT[-1])}") from None
            raise
        except Exception as e:  # noqa: BLE001 -- a disk full or a permission change while writing the outputs
            if len(_CURRENT) > depth and _CURRENT[-1].saving:
                raise _save_failure(e, _CURRENT[-1]) from None
            raise
        finally:
            while len(_CURRENT) > depth:
                _CURRENT.pop().release()

    return wrapper  # type: ignore[return-value]
