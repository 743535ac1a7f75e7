"""The ``single_layer_several_blocks`` command (see ``--help``, or :data:`lib.commands.single_layer_several_blocks`)."""

from __future__ import annotations

from lib.commands import single_layer_several_blocks as command

parser, run = command.parser, command.run

if __name__ == "__main__":
    command.main()
