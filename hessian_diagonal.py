"""Diagonal of the Hessian of perplexity for all entries of a weight (paper Sec. 5, Fig. 3): XDiag, Hutchinson, GGN, empirical Fisher or exact."""

from __future__ import annotations

import argparse

from lib import cli, diagonal_cli


def parser() -> argparse.ArgumentParser:
    """This script's flags (also used by ``reproduce.py`` to check flags before any run)."""
    return diagonal_cli.build_parser(__doc__)


def run(argv: list[str] | None = None) -> dict:
    return diagonal_cli.run(argv, __doc__)


if __name__ == "__main__":
    cli.main(run)
