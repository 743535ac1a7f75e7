"""The ``hessian_spectrum`` command (see ``--help``, or :data:`lib.commands.hessian_spectrum`)."""

from __future__ import annotations

from lib.commands import hessian_spectrum as command

parser, run = command.parser, command.run

if __name__ == "__main__":
    command.main()
