"""Paths shared by the benchmark scripts in ``benchmarks/<group>/``.

A script puts this folder on ``sys.path`` (``sys.path[:0] = [ROOT, BENCH]``, two lines at its top) and imports
what it needs from here: the repository root (for ``import ltuning`` from a checkout), ``RESULTS`` (the folder of
the committed records the ``RESULTS*.md`` tables cite) and ``DATA`` (the GLUE task folders, ``shared/data`` beside
the checkout), and small helpers every script needs (atomic JSON, the commit, a median timer). A script of one
group imports another group's script by putting that group's folder on ``sys.path`` with :func:`group`.
"""
from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time

BENCH = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(BENCH)
RESULTS = os.path.join(BENCH, "results")
DATA = os.path.join(os.path.dirname(ROOT), "shared", "data")


def group(name: str) -> str:
    """Put ``benchmarks/<name>/`` on ``sys.path`` (once) so its scripts import by name; returns the folder."""
    folder = os.path.join(BENCH, name)
    if folder not in sys.path:
        sys.path.insert(0, folder)
    return folder


def atomic_json(path: str, obj) -> None:
    """Write ``obj`` as indented JSON to ``path`` (its folder made if missing) through a temporary file: a reader
    never sees half a record."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=1)
    os.replace(tmp, path)


def git_commit(path) -> str:
    """The commit checked out at ``path`` (any folder of a git checkout), or "unknown" outside one."""
    try:
        return subprocess.run(["git", "-C", str(path), "rev-parse", "HEAD"], capture_output=True, text=True,
                              check=True).stdout.strip()
    except (subprocess.CalledProcessError, FileNotFoundError):
        return "unknown"


def median_ms(fn, reps: int) -> float:
    """Milliseconds of one call of ``fn``: one untimed warm-up call, then the median of ``reps`` timed calls."""
    fn()
    ts = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return 1e3 * statistics.median(ts)


def cpu_name() -> str:
    """The CPU's model name (``/proc/cpuinfo``), else ``platform.processor()``, else "cpu"."""
    import platform
    name = platform.processor() or "cpu"
    try:
        with open("/proc/cpuinfo") as f:
            name = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), name)
    except OSError:
        pass
    return name
