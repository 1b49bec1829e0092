"""Streamed batch classification of files of any size: bounded read-ahead, ordered, chunk-atomic, resumable.

* :func:`iter_records` reads JSONL (or .json lines) / CSV / TSV one record at a time with its ``path:line``;
  a bad record raises ``ValueError`` naming it.
* :func:`classify_file` reads ``chunk_size`` records at a time (the only records in memory), classifies them
  with the :class:`~ltuning.serving.engine.Engine` (token-budget batches within the chunk) and appends their
  output lines, in input order, to ``OUTPUT.partial`` with ONE ``write`` + ``fsync`` per chunk; at the end
  the file is renamed to ``OUTPUT``. An interrupted run leaves ``OUTPUT.partial``: ``resume=True`` keeps its
  complete lines (a torn last line is cut off), skips that many input records and continues. ``OUTPUT``
  itself only ever appears complete.
* Each output line is the input record plus ``prediction`` and ``scores`` (per label); with several adapters a
  record names its adapter in an ``adapter`` field (else the default adapter).
"""
from __future__ import annotations

import csv
import json
import os
import time

from tqdm.auto import tqdm

from ..data import _check_record


def _open(path: str):
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: no such file")
    return open(path, encoding="utf-8", newline="")


def _kind(path: str) -> str:
    ext = os.path.splitext(path)[1].lower()
    return {".csv": "csv", ".tsv": "tsv"}.get(ext, "jsonl")


def iter_records(path: str):
    """Yield ``(record, "path:line")`` lazily (constant memory)."""
    kind = _kind(path)
    with _open(path) as f:
        if kind in ("csv", "tsv"):
            reader = csv.DictReader(f, delimiter="\t" if kind == "tsv" else ",")
            for row in reader:
                where = f"{path}:{reader.line_num}"
                if None in row:
                    raise ValueError(f"{where}: more fields than the header's {len(reader.fieldnames)}")
                yield _check_record(row, path, reader.line_num, False), where
            return
        for i, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{i}: invalid JSON ({e.msg} at column {e.colno})") from None
            yield _check_record(rec, path, i, False), f"{path}:{i}"


def count_records(path: str) -> int:
    """Number of records (one cheap pass: blank lines skipped for JSONL, CSV rows parsed without checks)."""
    kind = _kind(path)
    with _open(path) as f:
        if kind in ("csv", "tsv"):
            return max(0, sum(1 for _ in csv.reader(f, delimiter="\t" if kind == "tsv" else ",")) - 1)
        return sum(1 for line in f if line.strip())


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
    done = 0
    if resume and os.path.isfile(partial):
        done = _complete_lines(partial)
    elif resume and os.path.isfile(output_path):
        raise ValueError(f"--resume: {output_path} is already complete (no {os.path.basename(partial)} to resume)")
    total = count_records(input_path)
    if done > total:
        raise ValueError(f"--resume: {partial} has {done} rows but {input_path} only {total} records")
    mode = "ab" if done else "wb"
    t0 = time.perf_counter()
    try:
        if mode == "wb":
            from .. import outputs
            outputs._write(partial, b"")  # create it (fsync'd) through the library's one file writer
        rows = _run(engine, input_path, partial, "ab", done, total, chunk_size, progress, default_adapter)
    except BaseException as e:
        if os.path.isfile(partial) and (os.path.getsize(partial) == 0 or not done and isinstance(e, OSError)):
            os.remove(partial)  # nothing written, or a write failed (disk full) in a fresh run: leave no trace
        if isinstance(e, OSError):
            from ..errors import UserError
            raise UserError(f"could not write it ({e.strerror}); no output file was written", output_path) from None
        raise
    seconds = time.perf_counter() - t0
    if done + rows == 0:
        os.remove(partial)
        raise ValueError(f"{input_path}: no records")
    os.replace(partial, output_path)
    return {"rows": done + rows, "classified": rows, "resumed_rows": done, "seconds": round(seconds, 3),
            "examples_per_s": round(rows / seconds, 2) if seconds > 0 else None,
            "output": os.path.abspath(output_path)}


def _run(engine, input_path, partial, mode, done, total, chunk_size, progress, default_adapter) -> int:
    rows = 0
    with open(partial, mode) as out, tqdm(total=total, initial=done, unit="ex", desc="classify",
                                          disable=not progress, smoothing=0.1) as bar:
        chunk = []
        it = iter_records(input_path)
        for n, (rec, where) in enumerate(it):
            if n < done:
                continue
            chunk.append((rec, where))
            if len(chunk) == chunk_size:
                rows += _flush(engine, chunk, out, default_adapter)
                bar.update(len(chunk))
                chunk = []
        if chunk:
            rows += _flush(engine, chunk, out, default_adapter)
            bar.update(len(chunk))
    return rows


def _flush(engine, chunk: list, out, default_adapter) -> int:
    """Classify one chunk (grouped by adapter) and append its lines in input order: one write + fsync."""
    groups: dict = {}
    for i, (rec, where) in enumerate(chunk):
        name = rec.get("adapter") or default_adapter
        try:
            a = engine.adapter(name)
        except KeyError as e:
            raise ValueError(f"{where}: {e.args[0]}") from None
        groups.setdefault(a.name, []).append(i)
    lines = [None] * len(chunk)
    for name, ix in groups.items():
        a = engine.adapters[name]
        ids = engine.tokenize([chunk[i][0] for i in ix], a)
        for i, (pred, scores) in zip(ix, engine.format(a, engine.score_ids(a, ids))):
            rec = dict(chunk[i][0])
            rec["prediction"] = pred
            rec["scores"] = scores
            lines[i] = json.dumps(rec, ensure_ascii=False)
    out.write(("\n".join(lines) + "\n").encode())
    out.flush()
    os.fsync(out.fileno())
    return len(chunk)
