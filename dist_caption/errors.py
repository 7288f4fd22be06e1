"""The one exception type a user is meant to read.

Entry points catch `UserError`, print its message as a single line and exit with status 2.
Raise it for bad input that the user can fix (missing path, bad value, corrupt file); the
message says what was wrong and what to do about it.
"""


class UserError(Exception):
    """A problem with the user's input, reported as one line without a traceback."""
