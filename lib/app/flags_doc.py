"""``docs/flags.md``, generated from the scripts' own parsers (so that it cannot drift from ``--help``).

``python -m lib.app.flags_doc > docs/flags.md`` rewrites it; ``tests/test_docs.py`` checks that it is current.
"""

from __future__ import annotations

import argparse

from ..commands import COMMANDS

HEADER = """# Flags

Generated from the scripts' parsers by `python -m lib.app.flags_doc > docs/flags.md` (a test checks that it is
current). `python <script>.py --help` shows the same. Flags marked *result* change the numbers or the files
written, so they enter the default output name's hash and the checkpoint's identity; *operational* flags change
only how, where or how fast a run computes (see [guarantees](guarantees.md)).
"""


def _default(action: argparse.Action) -> str:
    if isinstance(action, (argparse._StoreTrueAction, argparse._StoreFalseAction)):
        return "off"
    d = action.default
    if d is None or d == argparse.SUPPRESS:
        return "—"
    if isinstance(d, (list, tuple)):
        return " ".join(str(x) for x in d)
    return str(d)


def _cell(text: str) -> str:
    return " ".join(text.split()).replace("|", "\\|")


def roles() -> dict[str, str]:
    """``{flag name: "result" | "operational"}`` from the run specs' field metadata."""
    from . import spec as specs

    out: dict[str, str] = {}
    for cls in specs.SPECS.values():
        for section in specs.fields(cls):
            if section.metadata.get(specs.ROLE) != specs.SECTION:
                continue
            for f in specs.fields(
                section.type if isinstance(section.type, type) else section.default_factory()
            ):
                role = f.metadata.get(specs.ROLE)
                if role in (specs.RESULT, specs.OPERATIONAL):
                    out.setdefault(f.name, role)
    return out


def script_table(script: str, role: dict[str, str]) -> str:
    """One script's flags as a Markdown table, by argument group."""
    p = COMMANDS[script].parser()
    lines = [f"## `{script}.py`", "", _cell(p.description or ""), ""]
    for group in p._action_groups:
        actions = [
            a
            for a in group._group_actions
            if a.option_strings and a.help != argparse.SUPPRESS and a.dest != "help"
        ]
        if not actions:
            continue
        lines += [
            f"**{group.title}**",
            "",
            "| flag | default | kind | meaning |",
            "|---|---|---|---|",
        ]
        for a in actions:
            flag = ", ".join(f"`{o}`" for o in a.option_strings)
            choices = f" (one of: {', '.join(map(str, a.choices))})" if a.choices else ""
            kind = role.get(a.dest, "")
            lines.append(
                f"| {flag} | {_cell(_default(a))} | {kind} | {_cell((a.help or '') % vars(a))}{choices} |"
            )
        lines.append("")
    return "\n".join(lines)


def markdown() -> str:
    """The whole page."""
    role = roles()
    return HEADER + "\n" + "\n".join(script_table(s, role) for s in COMMANDS) + "\n"


if __name__ == "__main__":
    print(markdown(), end="")
