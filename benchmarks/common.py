"""Paths shared by the benchmark scripts in ``benchmarks/<group>/``.

A script puts this folder on ``sys.path`` (``sys.path[:0] = [ROOT, BENCH]``, two lines at its top) and imports
what it needs from here: the repository root (for ``import ltuning`` from a checkout), ``RESULTS`` (the folder of
the committed records the ``RESULTS*.md`` tables cite) and ``DATA`` (the GLUE task folders, ``shared/data`` beside
the checkout). A script of one group imports another group's script by putting that group's folder on
``sys.path`` with :func:`group`.
"""
from __future__ import annotations

import json
import os
import sys

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
