"""Diagonal of the Hessian of perplexity for all entries of a weight (paper Sec. 5, Fig. 3): XDiag, Hutchinson, empirical Fisher or exact."""

from __future__ import annotations

from lib import cli, diagonal_cli


def run(argv: list[str] | None = None) -> dict:
    return diagonal_cli.run(argv, __doc__)


if __name__ == "__main__":
    cli.main(run)
