"""User-facing errors: one exception for bad input, and the CLI's top-level handler.

A problem with what the user gave (a file, a line of it, an argument) raises :class:`UserError`, whose text is
``<file>:<line>: <what was expected>``. The CLI prints it as ONE line ``ltuning: <text>`` on stderr and exits with
status 2: no traceback. ``--debug`` or ``LTUNING_DEBUG=1`` re-raises instead, to show the traceback.

Other exceptions that the library raises for bad input (``FileNotFoundError``, ``ValueError`` with a message,
``OSError`` from the file system such as a full disk or a read-only directory) get the same one-line treatment.
Anything else is a bug: one line naming the exception, status 1, and the hint to rerun with ``--debug``.
"""
from __future__ import annotations

import errno
import os
import sys

EXIT_USAGE = 2  # bad input: the user can fix it
EXIT_BUG = 1  # an unexpected exception


class UserError(ValueError):
    """Bad input. ``file`` (and ``line``, 1-based) say where; ``message`` says what was expected.

    A ``ValueError`` so that callers that caught the library's earlier ``ValueError`` keep working."""

    def __init__(self, message: str, file: str | None = None, line: int | None = None):
        self.message, self.file, self.line = message, file, line
        super().__init__(str(self))

    def __str__(self) -> str:
        where = "" if self.file is None else f"{self.file}:{self.line}: " if self.line else f"{self.file}: "
        return where + self.message


def debug_requested(argv) -> bool:
    return "--debug" in argv or os.environ.get("LTUNING_DEBUG", "") not in ("", "0")


def _oneline(text: str) -> str:
    return " ".join(str(text).split())


def describe(exc: BaseException) -> tuple[int, str]:
    """``(exit status, one line)`` for an exception escaping a CLI command."""
    if isinstance(exc, UserError):
        return EXIT_USAGE, _oneline(exc)
    if isinstance(exc, OSError) and exc.errno is not None:
        name = exc.filename if exc.filename is not None else "output"
        what = {errno.ENOSPC: "no space left on the device; nothing was written",
                errno.EDQUOT: "disk quota exceeded; nothing was written",
                errno.EROFS: "read-only file system; expected a writable location",
                errno.EACCES: "permission denied; expected a readable/writable location",
                errno.EPERM: "operation not permitted; expected a writable location",
                errno.ENOENT: "no such file or directory",
                errno.ENOTDIR: "a path component is not a directory",
                errno.EISDIR: "is a directory; expected a file"}.get(exc.errno, exc.strerror or str(exc))
        return EXIT_USAGE, _oneline(f"{name}: {what}")
    if isinstance(exc, (FileNotFoundError, ValueError, NotImplementedError)) and str(exc):
        return EXIT_USAGE, _oneline(exc)
    return EXIT_BUG, _oneline(f"internal error: {type(exc).__name__}: {exc} (rerun with --debug or LTUNING_DEBUG=1 "
                              "for the traceback)")


def run_command(fn, debug: bool = False):
    """Run ``fn()``; an exception becomes one line on stderr and an exit status (2 for bad input).
    Returns ``(status, result)``; ``result`` is None on failure."""
    try:
        return 0, fn()
    except KeyboardInterrupt:
        if debug:
            raise
        print("ltuning: interrupted", file=sys.stderr)
        return 130, None
    except Exception as e:  # noqa: BLE001 - the CLI boundary: every exception becomes one line
        if debug:
            raise
        status, line = describe(e)
        print(f"ltuning: {line}", file=sys.stderr)
        return status, None
