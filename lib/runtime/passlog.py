"""The spectrum's pass log: every finished pass ``H V`` of a run, one file each, so ``--resume`` replays them.

``<dir>/config.json`` holds the run's configuration (the subset, the samples, the model's identity, the seed,
...), written atomically; ``<dir>/pass_NNNNN.pt`` holds pass ``N``, framed like a checkpoint
(:func:`lib.runtime.checkpoint.frame`: magic, length, SHA-256 of the payload) around a ``torch.save`` of
``{"config_sha256", "index", "input", "output"}``: the SHA-256 of the configuration it was computed for, its
index, the digest of the block ``V`` and ``H V``.

On ``--resume`` every pass file is checked before any pass is replayed: a truncated or junk file, an edited
one (checksum), one written for another configuration (even with ``config.json`` deleted) or a pass log
without its ``config.json`` are refused in one line (:class:`~lib.errors.UserError`, exit status 2). A pass
file that cannot be written stops the run in one line (:class:`~lib.errors.RunError`) saying which passes are saved;
so does a pass stopped by an error or a signal (:meth:`PassLog.stopped`).
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import signal
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch

from ..app.results import atomic_write_bytes
from ..errors import Interrupted, ParamError, RunError, UserError, literal
from ..products.operator import digest
from .checkpoint import frame, unframe

MAGIC = b"HSNPASS1"
CONFIG = "config.json"


def pass_file(directory: Path, i: int, suffix: str = "") -> Path:
    """Pass ``i``'s file (``suffix``: a rank's, e.g. ``.rank0of2`` under FSDP, where each rank logs its shard)."""
    return directory / f"pass_{i:05d}{suffix}.pt"


def encode_pass(
    config_sha256: str,
    i: int,
    input_digest: str,
    output: torch.Tensor,
    chunks: dict[int, int] | None = None,
) -> bytes:
    """The bytes of pass file ``i`` (``chunks``: what the operator's chunk policy had chosen after the pass)."""
    buf = io.BytesIO()
    torch.save(
        {
            "config_sha256": config_sha256,
            "index": i,
            "input": input_digest,
            "output": output.detach().cpu(),
            "chunks": dict(chunks or {}),
        },
        buf,
    )
    return frame(buf.getvalue(), MAGIC)


def read_pass(path: Path, config_sha256: str, i: int) -> dict[str, Any]:
    """The record of pass file ``path`` (pass ``i``), after checking its frame and that it belongs to ``config_sha256``
    (:class:`UserError` naming the problem otherwise)."""
    hint = f"delete {path.parent} to start over"
    try:
        rec = torch.load(io.BytesIO(unframe(path.read_bytes(), MAGIC)), weights_only=True)
    except (
        OSError,
        ValueError,
        RuntimeError,
        EOFError,
    ) as e:  # RuntimeError: a payload torch.load cannot read
        raise UserError(f"pass file {path} is truncated, damaged or edited ({e}); {hint}") from None
    if (
        not isinstance(rec, dict)
        or rec.get("config_sha256") != config_sha256
        or rec.get("index") != i
    ):
        raise UserError(
            f"pass file {path} was written by a run with a different configuration; {hint}"
        )
    return rec


class PassLog:
    """The finished passes of a run in ``directory`` (``None``: keep none, e.g. torchrun ranks > 0).

    :meth:`__call__` is the ``matmat`` given to :mod:`lib.spectrum.algorithms`: it replays recorded passes (checking that the
    algorithm asks for the same ``V``) and computes (``run_pass(V, i)``), records and returns the others.
    ``policy`` (the operator's :class:`lib.products.operator.ChunkPolicy`, optional): the chunks it chose are recorded
    with each pass and reused when the pass is replayed, so that the passes computed after a resume use the
    chunks the interrupted session chose (bitwise the uninterrupted run). Under FSDP every rank logs its shard of
    each pass (``suffix``, e.g. ``.rank0of2``, in the pass files' and the configuration's names) and replays only
    the passes every rank has (``agree``: the minimum over the ranks of the passes found).
    """

    def __init__(
        self,
        directory: Path | None,
        config: dict[str, Any],
        resume: bool,
        run_pass: Callable[[torch.Tensor, int], torch.Tensor],
        bar=None,
        policy: Any = None,
        suffix: str = "",
        agree: Callable[[int], int] | None = None,
    ):
        self.dir, self.run_pass, self.bar, self.policy, self.suffix = (
            directory,
            run_pass,
            bar,
            policy,
            suffix,
        )
        self.calls = self.replayed = self.hvps = 0
        self.replayable = 1 << 62
        """Passes that may be replayed (under FSDP: those every rank has logged)."""
        text = json.dumps(config, sort_keys=True, default=str)
        self.config_sha256 = hashlib.sha256(text.encode()).hexdigest()
        if directory is None:
            return
        cfg_file = directory / (CONFIG if not suffix else f"config{suffix}.json")
        passes = sorted(directory.glob(f"pass_*{suffix}.pt")) if directory.is_dir() else []
        if not suffix:  # a rank's files are not this process's
            passes = [f for f in passes if ".rank" not in f.name]
        if passes and not resume:
            raise ParamError(
                "resume",
                template=f"pass log {literal(directory)} exists from an earlier run; pass {{resume}} to "
                "continue it, or delete it to start over",
            )
        if passes and not cfg_file.is_file():
            raise UserError(
                f"pass log {directory} has {len(passes)} pass files but no {CONFIG}: "
                "it cannot be checked against this run; delete it to start over"
            )
        if cfg_file.is_file() and resume and cfg_file.read_text() != text:
            raise UserError(
                f"pass log {directory} is from a different configuration; delete it to start over"
            )
        for i, f in enumerate(
            passes
        ):  # every file is checked before any is replayed (exit status 2, nothing computed)
            if f != pass_file(directory, i, suffix):
                raise UserError(
                    f"pass log {directory} has {f.name} but not {pass_file(directory, i, suffix).name}; delete it to "
                    "start over"
                )
            read_pass(f, self.config_sha256, i)
        directory.mkdir(parents=True, exist_ok=True)
        if not cfg_file.is_file() or cfg_file.read_text() != text:
            atomic_write_bytes(cfg_file, lambda p: p.write_text(text))
        if agree is not None:
            self.replayable = agree(len(passes) if resume else 0)

    def stopped(self, message: str, i: int) -> str:
        """``message`` (why pass ``i`` stopped, and what its checkpoint kept) with the passes this log keeps:
        ``interrupted by SIGTERM; no unit was finished (pass 4); the 3 finished passes before it are saved in <dir>
        (rerun with --resume)`` (the message's own start kept, which scripts and users match on)."""
        if self.dir is None or i == 0:
            return message
        them = "pass before it is" if i == 1 else "passes before it are"
        return f"{message} (pass {i + 1}); the {i} finished {them} saved in {self.dir} (rerun with --resume)"

    @contextlib.contextmanager
    def counting(self) -> Iterator[None]:
        """Around the algorithms that call this log: a SIGINT / SIGTERM that arrives between two passes (in the
        algorithms' own arithmetic, or while a pass file is written) also says how many passes this log keeps, like
        one inside a pass (:meth:`stopped`)."""
        try:
            yield
        except (Interrupted, KeyboardInterrupt) as e:
            if getattr(e, "counted", False) or self.dir is None:
                raise
            signum = e.signum if isinstance(e, Interrupted) else signal.SIGINT
            message = e.message if isinstance(e, Interrupted) else "interrupted by SIGINT"
            kept = len(list(self.dir.glob(f"pass_*{self.suffix}.pt")))
            if kept == 0:
                raise
            them = "pass is" if kept == 1 else "passes are"
            raise Interrupted(
                signum,
                f"{message} (between passes); the {kept} finished {them} saved in {self.dir} (rerun with --resume)",
            ) from None

    def __call__(self, v: torch.Tensor) -> torch.Tensor:
        i = self.calls
        self.calls += 1
        self.hvps += v.shape[1]
        d = digest(v)
        f = None if self.dir is None else pass_file(self.dir, i, self.suffix)
        if f is not None and f.exists() and i < self.replayable:
            rec = read_pass(f, self.config_sha256, i)
            if rec["input"] != d:
                raise RunError(
                    f"{f} was recorded for a different block than the resumed run asks for; "
                    f"delete {self.dir} to start over"
                )
            self.replayed += 1
            out = rec["output"]
            if self.policy is not None and rec.get("chunks"):
                self.policy.reuse(rec["chunks"])
        else:
            try:
                out = self.run_pass(v, i)
            except (
                Interrupted
            ) as e:  # the message counts the passes kept, not only this pass's units
                counted = Interrupted(e.signum, self.stopped(e.message, i))
                counted.counted = True  # type: ignore[attr-defined]
                raise counted from None
            except RunError as e:
                stopped = RunError(self.stopped(str(e), i))
                stopped.__dict__.update(
                    e.__dict__
                )  # e.g. shared_by_ranks: under torchrun rank 0 prints it
                raise stopped from None
            if f is not None:
                data = encode_pass(
                    self.config_sha256,
                    i,
                    d,
                    out,
                    self.policy.chosen() if self.policy is not None else None,
                )
                try:
                    atomic_write_bytes(f, lambda p: p.write_bytes(data))
                except OSError as e:
                    raise RunError(
                        f"could not write the pass file {f} ({type(e).__name__}: {e}); "
                        f"the {i} finished passes before it are saved in {self.dir} (rerun with --resume)"
                    ) from None
        if self.bar is not None:
            self.bar.update(1)
        return out
