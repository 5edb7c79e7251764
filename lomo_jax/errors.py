"""The one base of every error that is the user's to fix: a missing or damaged file, a bad
option, data that does not fit the model, an output in the way.

Each module raises its own subclass (`DataError`, `CheckpointError`, ...), which keeps the
builtin base it had (`ValueError`, `FileExistsError`, ...), and its message is the one line a
user sees: the file, then the problem. The command line catches `UserError`, prints that line
and exits with status 1; anything else is a bug and keeps its traceback.
"""


class UserError(Exception):
    """An error the user can fix; its message names the file or option and the problem."""


def first_line(e: BaseException) -> str:
    """An exception's first line of text (its type's name when it has none): what a one-line
    message quotes of a library's error."""
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__
