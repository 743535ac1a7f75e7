"""Every torchrun rank of one job proves that it runs the same job, before it computes anything.

torchrun starts its ranks with whatever each was given: a rank launched with another ``--b``, ``--layer_name``,
``--fd_step`` or model directory would otherwise compute its share of *another* job, and rank 0 would add the
shares into one silently mixed result. So each rank sends its :func:`identity` -- the run spec's result-changing
fields (those of :meth:`lib.app.spec.RunSpec.digest`), the few operational ones the ranks must share (``--fsdp``,
``--resume``, ``--name``) and the fingerprints of the model's config, tokenizer, text and code -- to every other by
one ``all_gather_object`` (gloo on the CPU, NCCL on GPUs) after the config, tokenizer and text are read and *before a
weight is loaded*; the weights' fingerprint follows by a second, right after they load. A rank whose identity
differs from rank 0's makes every rank refuse (:class:`RanksDisagree`, exit status 2) in one line naming the
first field that differs and both values; rank 0 prints it, the other ranks exit silently
(:func:`quiet_on_this_rank`), so a job prints it once.

Outside torchrun (or with one rank) nothing is exchanged.
"""

from __future__ import annotations

import atexit
import os
from typing import TYPE_CHECKING, Any

from ..errors import UserError

if TYPE_CHECKING:
    import torch

SHARED_OPERATIONAL = ("fsdp", "resume", "name")
"""Operational fields (not in the digest) that every rank must share: how the ranks split the work, whether they
replay a pass log, under which name they log it."""


class RanksDisagree(UserError):
    """The ranks of one torchrun job were started for different jobs (every rank raises it; rank 0 prints it)."""

    shared_by_ranks = True


def identity(spec: Any, fingerprints: dict[str, str] | None = None) -> dict[str, Any]:
    """What must be equal on every rank: ``{"--flag": value}`` for each result-changing field of ``spec`` (the
    ``script`` too) and each of :data:`SHARED_OPERATIONAL` the spec has, then ``fingerprints`` (``{what: digest}``)."""
    values = spec.result_values()
    values.pop("family", None)
    out: dict[str, Any] = {"script": values.pop("script")}
    out.update({f"--{k}": v for k, v in values.items()})
    names = spec.field_names()
    out.update({f"--{k}": spec.get(k) for k in SHARED_OPERATIONAL if k in names})
    out.update(fingerprints or {})
    return out


def first_difference(identities: list[dict[str, Any]]) -> str | None:
    """The refusal naming the first field in which a rank's identity differs from rank 0's (``None``: all agree)."""
    base = identities[0]
    for r, other in enumerate(identities[1:], 1):
        for key in [*base, *(k for k in other if k not in base)]:
            mine, theirs = base.get(key, "(none)"), other.get(key, "(none)")
            if mine != theirs:
                return (
                    f"the ranks of this torchrun job were started for different jobs: {key} is {theirs!r} on rank {r} "
                    f"but {mine!r} on rank 0; start every rank with the same flags, model and data"
                )
    return None


def _all_gather(obj: Any) -> list[Any]:
    import torch.distributed as dist

    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def agree(ident: dict[str, Any], device: torch.device) -> None:
    """Under torchrun with several ranks (a collective: every rank calls it with its own ``ident``): start the
    process group if needed (:func:`lib.runtime.parallel.init_process_group`; it then lives until the process exits: a group
    destroyed and started again under torchrun can read the other ranks' old addresses) and raise :class:`RanksDisagree` on every
    rank unless all identities are equal. A no-op in one process."""
    from . import parallel

    if parallel.distributed_env() is None:
        return
    # kept for the process's later runs (torchrun cannot re-create it)
    if parallel.init_process_group(device):
        atexit.register(end_process_group)
    message = first_difference(_all_gather(ident))
    if message is not None:
        raise RanksDisagree(message)


def this_rank() -> int:
    """This process's torchrun rank (0 outside torchrun; read from the environment, torch is not imported)."""
    try:
        return int(os.environ.get("RANK", "0") or 0)
    except ValueError:
        return 0


def _local_rank() -> int:
    try:
        return int(os.environ.get("LOCAL_RANK", "0") or 0) if "RANK" in os.environ else 0
    except ValueError:
        return 0


def quiet_on_this_rank(error: BaseException) -> bool:
    """Whether this rank leaves ``error``'s line to another: an error every rank raised alike (``shared_by_ranks``,
    e.g. :class:`RanksDisagree`) is printed by rank 0; one that follows from the command line alone
    (``same_on_node``: a bad flag; torchrun gives every local rank the same arguments) by each node's local rank 0."""
    if getattr(error, "shared_by_ranks", False):
        return this_rank() != 0
    return bool(getattr(error, "same_on_node", False)) and _local_rank() != 0


def quiet_flag_error() -> bool:
    """Whether a command-line parsing error is left to this node's local rank 0 (:func:`quiet_on_this_rank`)."""
    return _local_rank() != 0


def end_process_group() -> None:
    """Destroy the process group if one is alive (at exit, on every rank)."""
    import sys

    if "torch.distributed" not in sys.modules:
        return
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        try:
            dist.destroy_process_group()
        except Exception:  # noqa: BLE001 -- a rank already gone: never hide the run's own error
            pass


def lost_rank_message(error: BaseException) -> str | None:
    """One line for a collective that failed because another rank of the torchrun job died (gloo's "Connection closed
    by peer", NCCL's errors), instead of the collective's traceback; ``None`` for any other error. The rank that
    died printed why, and torchrun's summary names it."""
    world = os.environ.get("WORLD_SIZE", "1")
    if not isinstance(error, RuntimeError) or not world.isdigit() or int(world) <= 1:
        return None
    text = str(error).strip()
    lost = type(error).__name__.startswith("Dist") or any(
        mark in text
        for mark in ("Connection closed by peer", "/gloo/", "NCCL", "Connection reset by peer")
    )
    if not lost:
        return None
    first = text.splitlines()[0] if text else type(error).__name__
    cut = first.find("] ")
    detail = (first[cut + 2 :] if cut >= 0 else first).split(". ")[0]
    return (
        f"rank {this_rank()} lost another rank of this torchrun job ({detail}); that rank printed why, and "
        "torchrun's summary names it"
    )
