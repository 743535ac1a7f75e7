"""The one exception type that scripts turn into a one-line error message."""


class UserError(Exception):
    """Bad input or an unreachable resource, detected before heavy work.

    Scripts catch it, print ``error: <message>`` on one line and exit with status 2.
    """
