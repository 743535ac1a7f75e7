"""The exception types that scripts turn into a one-line error message."""


class UserError(Exception):
    """Bad input or an unreachable resource, detected before heavy work.

    Scripts catch it, print ``error: <message>`` on one line and exit with status 2.
    """


class RunError(Exception):
    """A run stopped while computing (a worker failed or died, a non-finite value appeared).

    Finished work is kept in the checkpoint; scripts print ``error: <message>`` on one line and exit with
    status 1.
    """
