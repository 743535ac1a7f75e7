"""Hessian spectrum of perplexity for any weight subset: top eigenvalues (Lanczos), trace (Hutchinson, Hutch++) and spectral density (SLQ), or exact eigvalsh for small subsets."""

from __future__ import annotations

from lib import cli, spectrum_cli


def run(argv: list[str] | None = None) -> dict:
    return spectrum_cli.run(argv, __doc__)


if __name__ == "__main__":
    cli.main(run)
