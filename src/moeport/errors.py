"""One exception type for every user-facing problem.

The CLI prints ``MoeportError`` as a single line and exits non-zero; anything else is a bug and
keeps its traceback. Messages name the file/tensor and say what was expected.
"""


class MoeportError(Exception):
    """A problem with the user's input (bad path, corrupt file, unknown layout...)."""


class OutputWriteError(MoeportError):
    """Writing the output failed (disk full, file too large, read-only...): what the run finished
    so far is kept, so the same command continues once there is room."""
