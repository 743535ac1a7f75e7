""" "Did you mean ...?" for mistyped flags, layer names and parameter globs (closest matches by :mod:`difflib`)."""

from __future__ import annotations

import difflib
import re
from collections.abc import Iterable, Sequence


def closest(word: str, choices: Iterable[str], n: int = 1, cutoff: float = 0.6) -> list[str]:
    """The ``n`` choices most similar to ``word`` (ratio of :class:`difflib.SequenceMatcher` at least ``cutoff``)."""
    return difflib.get_close_matches(word, list(dict.fromkeys(choices)), n=n, cutoff=cutoff)


def did_you_mean(word: str, choices: Iterable[str], n: int = 1) -> str:
    """``" (did you mean 'x'?)"`` for the closest choices, or ``""`` when none is close."""
    hits = closest(word, choices, n)
    return f" (did you mean {' or '.join(repr(h) for h in hits)}?)" if hits else ""


def glob_suggestion(pattern: str, names: Sequence[str]) -> str:
    """For a parameter glob that matched nothing: the closest real names to the pattern (its ``*``/``?`` removed)."""
    plain = re.sub(r"[*?\[\]]", "", pattern)
    hits = closest(plain, names, n=2, cutoff=0.5)
    return f" (did you mean {' or '.join(repr(h) for h in hits)}?)" if hits else ""


def unknown_flags_hint(message: str, options: Iterable[str]) -> str:
    """For argparse's ``unrecognized arguments: --num_block 2`` message: ``" (did you mean --num_blocks?)"``
    naming the closest known flag of each unknown one, or ``""``."""
    if "unrecognized arguments:" not in message:
        return ""
    words = message.split("unrecognized arguments:", 1)[1].split()
    options = [o for o in options if o.startswith("--")]
    hints = []
    for w in words:
        if w.startswith("--"):
            hits = closest(w.split("=", 1)[0], options, cutoff=0.8)  # short flags: --t is not --b
            if hits:
                hints.append(f"{w.split('=', 1)[0]} -> {hits[0]}")
    return f" (did you mean {', '.join(h.split(' -> ')[1] for h in hints)}?)" if hints else ""
