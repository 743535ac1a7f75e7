"""Every figure of the report from one command (see ``--help``, or :mod:`lib.app.reproduce`)."""

from __future__ import annotations

from lib.app.reproduce import FIGURES, Run, main, run, runs, shrink  # noqa: F401 -- this script's API

if __name__ == "__main__":
    main()
