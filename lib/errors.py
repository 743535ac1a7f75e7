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
    """

    def __init__(self, param: str, message: str):
        super().__init__(message)
        self.param = param
        self.message = message


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
