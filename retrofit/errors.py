"""The one exception type users of retrofit see.

Every failure that a user can cause (a wrong name, a bad file, an option out of range, a
model retrofit cannot handle) is raised as :class:`RetrofitError` with a one-line message
that says what went wrong and what to do. The CLI prints that line and exits non-zero.
"""


class RetrofitError(Exception):
    """A user-facing error: the message is one line, specific, and actionable."""
