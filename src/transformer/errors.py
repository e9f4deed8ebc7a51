"""The exceptions the package raises on purpose, all under `Error`, each with a one-line message.

`UserError` is a problem a user can fix, with input (a file, a line, a path) or with a setting; the
message names it (``train.de:17: invalid UTF-8``). A setting is named as the config dataclasses and
the Python interface spell it, in backticks (```warmup` -10: must be >= 0``); the command line
shows the flag instead (``--warmup -10: must be >= 0``, `cli.common.say_flags`). The command line
catches `Error`, prints its message on one line and exits with status 2, without a traceback; the
library never exits, and prints nothing but the progress its caller asks for.
"""


class Error(Exception):
    """Base of every error the package raises on purpose: one line, meant for the person running it."""


class UserError(Error):
    """A problem with the user's input (a file, a line, a path, a setting), named in one line."""
