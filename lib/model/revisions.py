"""Hub revisions pinned to commits: a branch or tag name (``main``, Pythia's ``step1000``) names a commit that may
move; every process of a run loads the commit the name pointed to when the run resolved it.

Transformers 5 no longer records the commit a model was loaded from (``config._commit_hash``), so the commit is
resolved here, before the weights load, and the weights are then loaded by commit: the parent, its worker processes
and a later ``--resume`` read the same snapshot even if the branch moves meanwhile.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path

COMMIT = re.compile(r"[0-9a-f]{40}")
"""A full hub commit hash (git SHA-1, lower-case hex)."""


def hub_repo_cache(model_id: str, cache_dir: str | None) -> Path:
    """The folder of hub model ``model_id`` in the hub cache (``cache_dir``, else the hub library's default):
    ``models--ORG--NAME`` with ``refs/<branch or tag>`` (a file holding a commit) and ``snapshots/<commit>/``."""
    from huggingface_hub import constants

    return Path(cache_dir or constants.HF_HUB_CACHE) / ("models--" + model_id.replace("/", "--"))


def cached_commit(model_id: str, revision: str, cache_dir: str | None) -> str | None:
    """The commit ``revision`` names in the local hub cache: ``refs/<revision>``'s content, else the one cached
    snapshot whose commit starts with ``revision`` (7+ characters); None when the cache does not say (or two
    snapshots share the prefix)."""
    root = hub_repo_cache(model_id, cache_dir)
    ref = root / "refs" / revision
    if ref.is_file():
        commit = ref.read_text().strip()
        return commit if COMMIT.fullmatch(commit) else None
    snaps = root / "snapshots"
    if len(revision) < 7 or not snaps.is_dir():
        return None
    found = [p.name for p in snaps.iterdir() if p.name.startswith(revision)]
    return found[0] if len(found) == 1 and COMMIT.fullmatch(found[0]) else None


def _hub_commit(model_id: str, revision: str) -> str | None:
    """The commit the hub says ``revision`` of ``model_id`` is now (None: it could not say)."""
    from huggingface_hub import HfApi

    try:
        return HfApi().model_info(model_id, revision=revision).sha
    except Exception:  # noqa: BLE001 -- gated, private, network: the cache or the load will say
        return None


def resolve_commit(
    model_id: str,
    revision: str,
    cache_dir: str | None,
    hub_commit: Callable[[str, str], str | None] = _hub_commit,
) -> str | None:
    """The commit hash ``revision`` (a branch, tag, commit or commit prefix) of hub model ``model_id`` names now.

    A full commit hash is itself; online (``HF_HUB_OFFLINE`` and ``TRANSFORMERS_OFFLINE`` unset) the hub is asked
    (``hub_commit(model_id, revision)``); offline, or when the hub cannot say, the local cache answers
    (:func:`cached_commit`). None when nobody can say: the weights are then loaded by the name.
    """
    from .inputs import hub_offline

    if COMMIT.fullmatch(revision):
        return revision
    commit = None if hub_offline() else hub_commit(model_id, revision)
    return commit or cached_commit(model_id, revision, cache_dir)


def loaded_commit(name: str, cache_dir: str | None) -> str | None:
    """The commit a model loaded by name without a revision came from: for a hub id, the commit the cache's
    ``refs/main`` holds (the hub library writes it on each load by name, online; offline it is what loads); None for
    a local directory or the bundled model, or when the cache does not say."""
    from ..paths import resolve_model_path

    if Path(resolve_model_path(name)).is_dir():
        return None
    try:
        return cached_commit(name, "main", cache_dir)
    except (OSError, ValueError):
        return None
