"""The ``hessian_sweep`` command (see ``--help``, or :data:`lib.commands.hessian_sweep`)."""

from __future__ import annotations

from lib.commands import hessian_sweep as command

parser, run = command.parser, command.run

if __name__ == "__main__":
    command.main()
