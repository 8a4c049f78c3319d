"""The one exception type maskkit raises for problems a user can fix."""


class MaskkitError(Exception):
    """A user-facing error: the message names the file, key or shape at fault and what would fix it.

    The CLI prints it on one line and exits non-zero; `--debug` shows the traceback.
    """
