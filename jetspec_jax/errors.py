"""Errors a user can fix. The CLI prints them as one `error: <message>` line and exits 2."""


class UserError(Exception):
    """Bad input: a missing or corrupt file, an out-of-range option, a prompt that does not fit.

    The message is one line, says what is wrong and, where it helps, what would be accepted.
    """
