"""Streamed batch classification of files of any size: bounded read-ahead, ordered, chunk-atomic, resumable,
sharded over the ranks under torchrun.

* Records come from :func:`ltuning.data.iter_records` (the library's one record reader: one record at a time with
  its line number; a bad record raises a one-line :class:`~ltuning.errors.UserError` naming file and line).
* :func:`classify_file` reads ``chunk_size`` records at a time (the only records in memory), classifies them
  with the :class:`~ltuning.serving.engine.Engine` (token-budget batches within the chunk) and appends their
  output lines, in input order, to ``OUTPUT.partial`` with ONE ``write`` + ``fsync`` per chunk; at the end
  the file is renamed to ``OUTPUT``. An interrupted run leaves ``OUTPUT.partial``: ``resume=True`` keeps its
  complete lines (a torn last line is cut off), skips that many input records and continues. ``OUTPUT``
  itself only ever appears complete.
* Under torchrun (W ranks) every rank reads the same chunks; rank r scores the inputs ``r, r + W, ...`` of each
  chunk's adapter group (:func:`ltuning.distributed.map_sharded`), the scores are gathered in input order and
  rank 0 alone writes, resumes and renames.
* Each output line is the input record plus ``prediction`` and ``scores`` (per label); with several adapters a
  record names its adapter in an ``adapter`` field (else the default adapter). A chunk that mixes adapters is
  scored as one stream (:meth:`~ltuning.serving.engine.Engine.score_mixed`: the prefix-family adapters share
  batches, the others run per adapter), else per adapter.
"""
from __future__ import annotations

import contextlib
import json
import os
import time

from tqdm.auto import tqdm

from .. import distributed
from ..data import count_records, iter_records
from ..errors import UserError


def _complete_lines(partial: str) -> int:
    """Cut a torn last line off ``partial``; return its number of complete lines."""
    with open(partial, "rb+") as f:
        data = f.read()
        keep = data.rfind(b"\n") + 1
        if keep != len(data):
            f.truncate(keep)
    return data[:keep].count(b"\n")


def classify_file(engine, input_path: str, output_path: str, resume: bool = False, chunk_size: int = 1024,
                  progress: bool = True, default_adapter: str | None = None) -> dict:
    """Classify ``input_path`` into ``output_path`` (see the module docstring); returns the closing summary
    ``{"rows", "seconds", "examples_per_s", "resumed_rows", "output"}``."""
    if chunk_size < 1:
        raise ValueError("--chunk-size must be >= 1")
    if os.path.abspath(input_path) == os.path.abspath(output_path):
        raise ValueError(f"--output {output_path}: is the input file")
    out_dir = os.path.dirname(os.path.abspath(output_path))
    if not os.path.isdir(out_dir):
        raise FileNotFoundError(f"--output {output_path}: directory {out_dir} does not exist")
    if default_adapter is not None:
        engine.adapter(default_adapter)  # KeyError if unknown
    partial = output_path + ".partial"
    main = distributed.is_main()
    done = distributed.on_main(lambda: _resumed_rows(partial, output_path, resume))
    total = count_records(input_path)
    if done > total:
        raise ValueError(f"--resume: {partial} has {done} rows but {input_path} only {total} records")
    t0 = time.perf_counter()
    try:
        if main and not done:
            from .. import outputs
            outputs.write_synced(partial, b"")  # create it (fsync'd) through the library's one file writer
        rows = _run(engine, input_path, partial if main else None, done, total, chunk_size, progress and main,
                    default_adapter)
    except BaseException as e:
        if main and os.path.isfile(partial) and (
                os.path.getsize(partial) == 0 or not done and isinstance(e, OSError)):
            os.remove(partial)  # nothing written, or a write failed (disk full) in a fresh run: leave no trace
        if isinstance(e, OSError):
            raise UserError(f"could not write it ({e.strerror}); no output file was written", output_path) from None
        raise
    seconds = time.perf_counter() - t0
    if done + rows == 0:
        if main:
            os.remove(partial)
        raise ValueError(f"{input_path}: no records")
    if main:
        os.replace(partial, output_path)
    return {"rows": done + rows, "classified": rows, "resumed_rows": done, "seconds": round(seconds, 3),
            "examples_per_s": round(rows / seconds, 2) if seconds > 0 else None,
            "output": os.path.abspath(output_path)}


def _resumed_rows(partial: str, output_path: str, resume: bool) -> int:
    """The complete lines an interrupted run left in ``partial`` (0 for a fresh run)."""
    if resume and os.path.isfile(partial):
        return _complete_lines(partial)
    if resume and os.path.isfile(output_path):
        raise ValueError(f"--resume: {output_path} is already complete (no {os.path.basename(partial)} to resume)")
    return 0


def _run(engine, input_path, partial, done, total, chunk_size, progress, default_adapter) -> int:
    """Classify the records after the first ``done``; append their lines to ``partial`` (None: score only)."""
    rows = 0
    with (open(partial, "ab") if partial else contextlib.nullcontext()) as out, \
            tqdm(total=total, initial=done, unit="ex", desc="classify", disable=not progress, smoothing=0.1) as bar:
        chunk = []
        for n, (rec, line) in enumerate(iter_records(input_path, require_label=False)):
            if n < done:
                continue
            chunk.append((rec, line))
            if len(chunk) == chunk_size:
                rows += _flush(engine, chunk, out, input_path, default_adapter)
                bar.update(len(chunk))
                chunk = []
        if chunk:
            rows += _flush(engine, chunk, out, input_path, default_adapter)
            bar.update(len(chunk))
    return rows


def _flush(engine, chunk: list, out, input_path: str, default_adapter) -> int:
    """Classify one chunk (grouped by adapter, sharded over ranks) and append its lines in input order: one
    write + fsync (``out`` None: nothing is written)."""
    groups: dict = {}
    for i, (rec, line) in enumerate(chunk):
        try:
            a = engine.adapter(rec.get("adapter") or default_adapter)
        except KeyError as e:
            raise UserError(e.args[0], input_path, line) from None
        groups.setdefault(a.name, []).append(i)
    lines = [None] * len(chunk)
    if getattr(engine, "shared", None) is not None and len(groups) > 1:  # a mixed chunk: the shared-bank adapters batched together
        return _flush_mixed(engine, chunk, groups, out, lines)
    for name, ix in groups.items():
        a = engine.adapters[name]
        ids = engine.tokenize([chunk[i][0] for i in ix], a)
        scores = distributed.map_sharded(lambda part: engine.score_ids(a, part), ids)
        for i, (pred, per_label) in zip(ix, engine.format(a, scores)):
            rec = dict(chunk[i][0])
            rec["prediction"] = pred
            rec["scores"] = per_label
            lines[i] = json.dumps(rec, ensure_ascii=False)
    return _write(out, lines)


def _flush_mixed(engine, chunk: list, groups: dict, out, lines: list) -> int:
    """:func:`_flush` through :meth:`Engine.score_mixed`: every input of the chunk in one stream (sharded over
    the ranks by input; each rank's scores padded to the largest label count to be gathered)."""
    import torch
    adapters, ids = [None] * len(chunk), [None] * len(chunk)
    for name, ix in groups.items():
        a = engine.adapters[name]
        for i, x in zip(ix, engine.tokenize([chunk[i][0] for i in ix], a)):
            adapters[i], ids[i] = a, x
    width = max(len(a.label_names) for a in engine.adapters.values())

    def score(part: list) -> torch.Tensor:
        res = engine.score_mixed([adapters[i] for i in part], [ids[i] for i in part])
        padded = torch.full((len(part), width), float("nan"))
        for r, row in enumerate(res):
            padded[r, :len(row)] = row
        return padded

    scores = distributed.map_sharded(score, list(range(len(chunk))))
    for i, (rec, _) in enumerate(chunk):
        a = adapters[i]
        (pred, per_label), = engine.format(a, scores[i:i + 1, :len(a.label_names)])
        rec = dict(rec)
        rec["prediction"] = pred
        rec["scores"] = per_label
        lines[i] = json.dumps(rec, ensure_ascii=False)
    return _write(out, lines)


def _write(out, lines: list) -> int:
    if out is not None:
        out.write(("\n".join(lines) + "\n").encode())
        out.flush()
        os.fsync(out.fileno())
    return len(lines)
