"""Output files: checks that an output location is writable BEFORE any work, and atomic groups of writes.

:func:`atomic_write_files` writes every file of a group to a temporary name beside it (``.NAME.tmpPID``), syncs it,
and only when all of them are complete renames them over their targets; on any failure (a full disk, an I/O
error) the temporaries are removed and the targets are untouched, so no output file is ever half-written.
"""
from __future__ import annotations

import os
import tempfile

from .errors import UserError


def _probe(directory: str, what: str, path: str) -> None:
    """Create and remove a file in ``directory`` (root ignores permission bits, so ``os.access`` is not enough)."""
    try:
        fd, tmp = tempfile.mkstemp(prefix=".ltuning-probe-", dir=directory)
    except OSError as e:
        raise UserError(f"{what}: cannot write in {directory} ({e.strerror}); expected a writable directory",
                        path) from None
    os.close(fd)
    os.unlink(tmp)


def check_output_dir(path: str, what: str = "--out") -> None:
    """``path`` is a directory that exists and is writable, or can be created (its nearest existing ancestor is a
    writable directory)."""
    p = os.path.abspath(path)
    if os.path.exists(p):
        if not os.path.isdir(p):
            raise UserError(f"{what}: exists and is not a directory; expected a directory", path)
        _probe(p, what, path)
        return
    anc = os.path.dirname(p)
    while not os.path.exists(anc):
        anc = os.path.dirname(anc)
    if not os.path.isdir(anc):
        raise UserError(f"{what}: {anc} is a file, so the directory cannot be created; expected a directory path",
                        path)
    _probe(anc, what, path)


def check_output_file(path: str, what: str = "--output") -> None:
    """``path`` is a file that can be written: its directory exists and is writable, and it is not a directory."""
    p = os.path.abspath(path)
    parent = os.path.dirname(p)
    if os.path.isdir(p):
        raise UserError(f"{what}: is a directory; expected a file path", path)
    if not os.path.isdir(parent):
        raise UserError(f"{what}: the directory {parent} does not exist; expected an existing directory", path)
    _probe(parent, what, path)


def write_synced(path: str, data: bytes) -> None:
    """Write ``data`` to ``path`` and fsync it (the one file writer of the library's outputs)."""
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def atomic_write_files(files: dict) -> None:
    """Write ``{path: bytes}`` all or nothing: temporaries first, renamed over the targets only once all are
    complete. A failure removes the temporaries, leaves the targets as they were and raises :class:`UserError`
    naming the file."""
    tmps = {}
    try:
        for path, data in files.items():
            d, name = os.path.split(os.path.abspath(path))
            tmps[path] = os.path.join(d, f".{name}.tmp{os.getpid()}")
            write_synced(tmps[path], data)
    except BaseException as e:
        for t in tmps.values():
            try:
                os.unlink(t)
            except OSError:
                pass
        if not isinstance(e, OSError):
            raise
        err = UserError(f"could not write it ({e.strerror or e}); no output file was written or changed", path)
        err.reason = e.strerror or str(e)
        raise err from None
    for path, t in tmps.items():
        os.replace(t, path)
