"""Checkpoints of additive jobs: the finished units and their sum, written atomically, checked on load.

The state of a run (:class:`RunState`) is the float64 sum of units ``0..prefix-1`` *added in index
order* (exactly the running sum of an uninterrupted :func:`lib.runtime.jobs.run_serial`) plus the partials
of units finished out of order (``pending``). Adding the remaining units to it in index order
therefore gives the uninterrupted result to the last bit.

File format of ``<output_dir>/<name>.ckpt``: ``MAGIC`` (8 bytes), the payload length (8 bytes,
little endian), the SHA-256 of the payload (32 bytes), then the payload (a ``torch.save`` of a dict
holding the state, the job configuration and its hash). It is written to a temporary file, fsynced
and renamed over the old one, so a kill at any moment leaves either the old or the new checkpoint;
a torn or truncated file fails the length or checksum test.
"""

from __future__ import annotations

import hashlib
import io
import json
import re
import struct
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .. import constants
from ..app.results import atomic_write_bytes
from ..errors import ParamError, RunError, UserError
from .jobs import Partial, add_partials

MAGIC = b"HSNCKPT1"
_HEADER = struct.Struct("<8sQ32s")
DEFAULT_EVERY = constants.DEFAULT_CHECKPOINT_EVERY
"""Default ``--checkpoint_every``: at most about two minutes of work is lost on a kill."""


def config_hash(config: dict[str, Any]) -> str:
    """SHA-256 of the canonical JSON of a job configuration."""
    return hashlib.sha256(json.dumps(config, sort_keys=True, default=str).encode()).hexdigest()


def parse_every(text: str) -> tuple[int, float]:
    """``--checkpoint_every``: ``"N"`` -> every N units, ``"120s"``/``"10m"``/``"1h"`` -> every so long; ``"0"`` -> never.

    Returns ``(every_units, every_s)``, one of them 0.
    """
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([smh]?)\s*", str(text))
    if m is None or (not m.group(2) and "." in m.group(1)):
        raise ParamError(
            "checkpoint_every",
            f"checkpoint_every {text!r} is neither a number of units (e.g. 10) nor a duration (e.g. 120s, 10m, 1h)",
        )
    value, unit = float(m.group(1)), m.group(2)
    if not unit:
        return int(value), 0.0
    return 0, value * {"s": 1, "m": 60, "h": 3600}[unit]


@dataclass
class CheckpointConfig:
    """Where and how often to checkpoint. ``every_units`` and ``every_s`` both 0: never write."""

    path: Path
    every_units: int = 0
    every_s: float = 120.0
    resume: bool = False
    keep: bool = False
    owned: bool = False
    """Set once this run wrote or resumed from ``path``: only then may :func:`finish` remove it."""

    @property
    def writes(self) -> bool:
        return self.every_units > 0 or self.every_s > 0


@dataclass
class RunState:
    """Finished work of a run of ``num_units`` units: ``prefix_sum`` = units ``0..prefix-1`` summed in order, ``pending`` = later finished units."""

    num_units: int
    prefix: int = 0
    prefix_sum: Partial | None = None
    pending: dict[int, Partial] = field(default_factory=dict)
    elapsed_s: float = 0.0
    """Compute time of earlier sessions (wall seconds)."""
    record: frozenset[int] = frozenset()
    """Prefix lengths at which a copy of ``prefix_sum`` is kept in ``snapshots`` (the batch-size study, :mod:`lib.hessian.batch_study`)."""
    snapshots: dict[int, Partial] = field(default_factory=dict)
    chunks: dict[str, dict[int, int]] = field(default_factory=dict)
    """``{process: {n: chunk}}``: the chunks each process (``worker 0 (cuda:0)``, ...) used, as it reported with its
    units (:meth:`lib.runtime.jobs.ModelJob.chunks_used`); ``--resume`` reuses them so that the remaining units are computed
    as the interrupted session would have."""

    def reused_chunks(self) -> dict[int, int]:
        """One chunk per size from :attr:`chunks`: the first process's that reported it."""
        out: dict[int, int] = {}
        for per_size in self.chunks.values():
            for n, c in per_size.items():
                out.setdefault(int(n), int(c))
        return out

    def add(self, k: int, partial: Partial) -> None:
        """Record unit ``k``; fold every unit that is now next in order into the prefix sum."""
        if not 0 <= k < self.num_units or k < self.prefix or k in self.pending:
            raise ValueError(f"unit {k} is out of range or already finished")
        self.pending[k] = {name: v.detach().cpu() for name, v in partial.items()}
        while self.prefix in self.pending:
            self.prefix_sum = add_partials(self.prefix_sum, self.pending.pop(self.prefix))
            self.prefix += 1
            if self.prefix in self.record:
                self.snapshots[self.prefix] = {
                    name: v.clone() for name, v in self.prefix_sum.items()
                }

    @property
    def n_done(self) -> int:
        return self.prefix + len(self.pending)

    @property
    def complete(self) -> bool:
        return self.prefix == self.num_units

    def remaining(self) -> list[int]:
        """Unfinished unit indices, ascending."""
        return [k for k in range(self.prefix, self.num_units) if k not in self.pending]

    def total(self) -> Partial:
        """The sum of all units (the run must be complete)."""
        if not self.complete or self.prefix_sum is None:
            raise ValueError(
                f"the run is not complete: {self.n_done} of {self.num_units} units finished"
            )
        return self.prefix_sum


def frame(payload: bytes, magic: bytes = MAGIC) -> bytes:
    """``magic`` (8 bytes), the payload's length (8 bytes, little endian), its SHA-256 (32 bytes), the payload."""
    return _HEADER.pack(magic, len(payload), hashlib.sha256(payload).digest()) + payload


def unframe(data: bytes, magic: bytes = MAGIC) -> bytes:
    """The payload of :func:`frame`'s ``data``; ``ValueError`` naming what is wrong (too short, other magic,
    truncated, checksum)."""
    if len(data) < _HEADER.size:
        raise ValueError(f"{len(data)} bytes, shorter than its header")
    got, length, digest = _HEADER.unpack_from(data)
    if got != magic:
        raise ValueError(
            "not a checkpoint of this program" if magic == MAGIC else "not a file of this program"
        )
    payload = data[_HEADER.size :]
    if len(payload) != length:
        raise ValueError(f"{len(payload)} of {length} payload bytes")
    if hashlib.sha256(payload).digest() != digest:
        raise ValueError("checksum mismatch")
    return payload


def _encode(state: RunState, config: dict[str, Any]) -> bytes:
    buf = io.BytesIO()
    torch.save(
        {
            "format": 1,
            "config_json": json.dumps(config, sort_keys=True, default=str),
            "config_sha256": config_hash(config),
            "num_units": state.num_units,
            "prefix": state.prefix,
            "prefix_sum": state.prefix_sum,
            "pending": state.pending,
            "elapsed_s": state.elapsed_s,
            "snapshots": state.snapshots,
            "chunks": state.chunks,
            "written_at": time.time(),
        },
        buf,
    )
    return frame(buf.getvalue())


def save(path: str | Path, state: RunState, config: dict[str, Any]) -> None:
    """Write the checkpoint atomically: temporary file, fsync, rename, fsync of the directory."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    data = _encode(state, config)
    atomic_write_bytes(path, lambda p: p.write_bytes(data))


def _differences(old: dict[str, Any], new: dict[str, Any], prefix: str = "") -> list[str]:
    """Dotted keys whose values differ between two configurations."""
    out = []
    for key in sorted(set(old) | set(new), key=str):
        a, b = old.get(key), new.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            out += _differences(a, b, f"{prefix}{key}.")
        elif a != b:
            out.append(f"{prefix}{key}")
    return out


CONTENT_KEYS = {
    "model.fingerprint": "the model's weights",
    "model.config_fingerprint": "the model's configuration (config.json)",
    "model.code": "the code that runs the model",
    "model.tokenizer_fingerprint": "the tokenizer",
}
"""Configuration keys that identify the inputs (:mod:`lib.model.inputs`): a difference there means a file or the
installed code changed."""


def _describe_change(key: str, old: dict[str, Any], new: dict[str, Any]) -> str:
    """``"the model's weights changed (fingerprint abc.. -> def..)"`` for a dotted key of :data:`CONTENT_KEYS`
    (the code path in full: ``(transformers 5.1.0, ... -> transformers 5.2.0, ...)``)."""

    def get(cfg: dict[str, Any]) -> str:
        for part in key.split("."):
            cfg = cfg.get(part) if isinstance(cfg, dict) else None
        if not isinstance(cfg, str):
            return "none"
        return cfg if key == "model.code" else f"{cfg[:12]}.."

    what = "" if key == "model.code" else "fingerprint "
    return f"{CONTENT_KEYS[key]} changed ({what}{get(old)} -> {get(new)})"


def read(path: str | Path) -> dict[str, Any]:
    """The raw content of a checkpoint file, after checking its length and checksum (:class:`UserError` if torn)."""
    path = Path(path)
    try:
        payload = unframe(path.read_bytes())
    except ValueError as e:
        raise UserError(
            f"checkpoint {path} is truncated or corrupt ({e}); delete it to start over"
        ) from None
    return torch.load(io.BytesIO(payload), weights_only=True)


def load(path: str | Path, config: dict[str, Any], num_units: int) -> RunState:
    """The run state stored at ``path``; refuses (:class:`UserError`) a torn file or one written for another configuration."""
    raw = read(path)
    if raw["config_sha256"] != config_hash(config) or raw["num_units"] != num_units:
        old = json.loads(raw["config_json"])
        new = json.loads(json.dumps(config, sort_keys=True, default=str))
        diff = _differences(old, new)
        changed = [_describe_change(key, old, new) for key in diff if key in CONTENT_KEYS]
        if changed:
            rest = [key for key in diff if key not in CONTENT_KEYS]
            also = f"; the configuration also differs in: {', '.join(rest)}" if rest else ""
            raise UserError(
                f"checkpoint {path} was written for other inputs: {'; '.join(changed)}{also}; restore the original files, or delete it to start over"
            )
        raise UserError(
            f"checkpoint {path} was written by a run with a different configuration "
            f"(differs in: {', '.join(diff) or 'num_units'}); rerun with the original flags, or delete it to start over"
        )
    return RunState(
        raw["num_units"],
        raw["prefix"],
        raw["prefix_sum"],
        dict(raw["pending"]),
        raw["elapsed_s"],
        snapshots=dict(raw.get("snapshots", {})),
        chunks=dict(raw.get("chunks", {})),
    )


class CheckpointWriteError(RunError):
    """The checkpoint could not be written (disk full, permissions): the run stops; the file keeps what it held."""


class Writer:
    """Decides when to write the checkpoint of a run (every N units, or every so many seconds) and writes it.

    ``saved_done``: the finished units the checkpoint file durably holds (written by this run, or resumed
    from); every message that says what is saved reports this count, never the units merely finished."""

    def __init__(self, cfg: CheckpointConfig | None, config: dict[str, Any], state: RunState):
        self.cfg, self.config, self.state = cfg, config, state
        self.saved_done = state.n_done if cfg is not None and cfg.owned else 0
        self._saved_at = time.monotonic()
        self._t0 = time.monotonic()
        self._elapsed0 = state.elapsed_s
        self.written = False
        self.failed: OSError | None = None
        """The error of the last write, if it failed."""

    @property
    def dirty(self) -> bool:
        """Units finished since the last write."""
        return self.state.n_done != self.saved_done

    def save(self) -> None:
        """Write now (if checkpointing is on); :class:`CheckpointWriteError` if the file cannot be written."""
        if self.cfg is None or not self.cfg.writes:
            return
        self.state.elapsed_s = self._elapsed0 + time.monotonic() - self._t0
        try:
            save(self.cfg.path, self.state, self.config)
        except OSError as e:
            self.failed = e
            where = self.cfg.path
            raise CheckpointWriteError(
                f"could not write the checkpoint {where} ({type(e).__name__}: {e})"
            ) from None
        self.cfg.owned = True
        self.failed = None
        self.saved_done, self._saved_at, self.written = self.state.n_done, time.monotonic(), True

    def maybe_save(self) -> None:
        """Write if the unit count or the time since the last write calls for it."""
        if self.cfg is None or not self.dirty:
            return
        by_units = (
            self.cfg.every_units > 0 and self.state.n_done - self.saved_done >= self.cfg.every_units
        )
        by_time = self.cfg.every_s > 0 and time.monotonic() - self._saved_at >= self.cfg.every_s
        if by_units or by_time:
            self.save()

    def save_if_dirty(self) -> None:
        """On a failure or an interrupt: keep every finished unit (unless the last write failed: the disk is full)."""
        if self.dirty and self.failed is None:
            self.save()

    def kept(self) -> str:
        """``"; the 3 finished units of 8 are saved in <path> (rerun with --resume)"``: what the file durably holds
        (``""`` when checkpointing is off or nothing was finished)."""
        cfg, state = self.cfg, self.state
        if cfg is None or not cfg.writes or not state.n_done:
            return ""
        if not self.saved_done:
            return f"; none of the {state.n_done} finished unit{_s(state.n_done)} could be saved"
        unit = f"unit{_s(self.saved_done)} of {state.num_units} {'is' if self.saved_done == 1 else 'are'}"
        return f"; the {self.saved_done} finished {unit} saved in {cfg.path} (rerun with --resume)"


def _s(n: int) -> str:
    return "" if n == 1 else "s"


def finish(cfg: CheckpointConfig | None) -> None:
    """After the results are durably saved: remove the checkpoint unless ``keep`` -- never one this run did not write or resume from."""
    if cfg is not None and not cfg.keep and cfg.owned:
        try:
            Path(cfg.path).unlink()
        except FileNotFoundError:
            pass
