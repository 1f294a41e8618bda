"""The one exception type the tools raise for bad input.

The command line turns a `DSGError` into a single `dsg: error: ...` line and exit code 2. Anything
else that escapes is a bug and keeps its traceback.
"""


class DSGError(Exception):
    """A user-facing error: bad input, missing file, wrong schema, offline Hub, ..."""


def raise_first(checks) -> None:
    """Raise a `DSGError` with the message of the first `(ok, message)` pair whose `ok` is false."""
    for ok, message in checks:
        if not ok:
            raise DSGError(message)
