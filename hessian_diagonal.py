"""The ``hessian_diagonal`` command (see ``--help``, or :data:`lib.commands.hessian_diagonal`)."""

from __future__ import annotations

from lib.commands import hessian_diagonal as command

parser, run = command.parser, command.run

if __name__ == "__main__":
    command.main()
