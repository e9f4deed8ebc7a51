"""The one exception type for mistakes a user can fix (bad files, bad options).

The command line catches `UserError`, prints its message on one line and exits
with status 2, without a traceback. Library code raises it with a message that
names the file, the line and the problem, e.g. ``train.de:17: invalid UTF-8``.
"""


class UserError(Exception):
    """A problem with the user's input, reported as one line with no traceback."""
