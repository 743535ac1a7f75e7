"""The exception types that scripts turn into a one-line error message."""


class UserError(Exception):
    """Bad input or an unreachable resource, detected before heavy work.

    Scripts catch it, print ``error: <message>`` on one line and exit with status 2.
    """


class ParamError(UserError, ValueError):
    """A library function's argument is out of range or does not fit the model or data.

    ``param`` is the name of the function's parameter; the message names it as written (``block_index 4 is
    out of range ...``). The command line shows the same message with the flag that set the parameter in
    its place (:func:`lib.app.cli.flag_message`). A :class:`ValueError` for library callers, a
    :class:`UserError` (one line, exit status 2) for the scripts.

    ``template`` (optional), for a message that names several parameters or one twice: the message with each
    parameter written ``{name}`` (``"... a filled {cache_dir}, or pass {dataset} PATH ..."``); the library's
    message writes the names, the command line's the flags.
    """

    def __init__(self, param: str, message: str = "", template: str | None = None):
        if template is not None:
            message = template.format_map(_Names())
        super().__init__(message)
        self.param = param
        self.message = message
        self.template = template

    def __reduce__(self):  # pickled whole (between processes and torchrun ranks)
        return (type(self), (self.param, self.message, self.template))


def literal(text: object) -> str:
    """``text`` for a :class:`ParamError` template (its braces doubled)."""
    return str(text).replace("{", "{{").replace("}", "}}")


class _Names(dict):
    """``{name}`` -> ``name`` (the library's view of a :class:`ParamError` template)."""

    def __missing__(self, key: str) -> str:
        return key


class RunError(Exception):
    """A run stopped while computing (a worker failed or died, a non-finite value appeared).

    Finished work is kept in the checkpoint; scripts print ``error: <message>`` on one line and exit with
    status 1.
    """


class Interrupted(SystemExit):
    """The run was stopped by SIGINT (Ctrl-C) or SIGTERM; exit status ``128 + signum`` (130, 143).

    ``message`` says what was kept. Scripts print ``error: <message>`` on one line, without a traceback.
    """

    def __init__(self, signum: int, message: str = ""):
        super().__init__(128 + signum)
        self.signum = signum
        self.message = message or f"interrupted by {signal_name(signum)}"


def signal_name(signum: int) -> str:
    import signal

    try:
        return signal.Signals(signum).name
    except ValueError:
        return f"signal {signum}"
