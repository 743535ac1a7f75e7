""" "Did you mean ...?" for mistyped flags, layer names and parameter globs (closest matches by :mod:`difflib`)."""

from __future__ import annotations

import difflib
import re
from collections.abc import Callable, Iterable, Sequence


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


def unknown_flags_hint(
    message: str,
    options: Iterable[str],
    others: Callable[[], dict[str, Iterable[str]]] | None = None,
) -> str:
    """For argparse's ``unrecognized arguments: --num_block 2`` message: ``" (did you mean --num_blocks?)"``
    naming the closest known flag of each unknown one, or ``""``.

    ``others()`` (called only when a flag has no close match here): ``{script: its flags}`` of the other
    scripts; a flag close to one of theirs is named with the scripts that have it, e.g.
    ``" (--num_blocks is a flag of single_layer_several_blocks.py, not of this script)"``."""
    if "unrecognized arguments:" not in message:
        return ""
    words = message.split("unrecognized arguments:", 1)[1].split()
    options = [o for o in options if o.startswith("--")]
    hits_here, elsewhere = [], []
    for w in words:
        if not w.startswith("--"):
            continue
        flag = w.split("=", 1)[0]
        hits = closest(flag, options, cutoff=0.8)  # short flags: --t is not --b
        if hits:
            hits_here.append(hits[0])
        elif others is not None:
            line = _elsewhere(flag, others())
            if line:
                elsewhere.append(line)
    parts = [f"did you mean {', '.join(hits_here)}?"] if hits_here else []
    return "".join(f" ({p})" for p in [*parts, *elsewhere])


def _elsewhere(flag: str, others: dict[str, Iterable[str]]) -> str:
    """``"--num_blocks is a flag of a.py, b.py, not of this script"`` for the closest flag of the other scripts."""
    every = [o for flags in others.values() for o in flags if o.startswith("--")]
    hits = closest(flag, every, cutoff=0.8)
    if not hits:
        return ""
    scripts = [s for s, flags in others.items() if hits[0] in flags]
    return f"{hits[0]} is a flag of {', '.join(scripts)}, not of this script"
