"""The one record reader (``ltuning.data.iter_records`` / ``read_records`` / ``count_records``): lazy, line-numbered,
line ends and block boundaries as ``bytes.splitlines``, the same one-line errors for every caller."""
from __future__ import annotations

import json
import random

import pytest

from ltuning.data import MAX_LINE_CHARS, count_records, iter_records, read_records
from ltuning.errors import UserError


def _error(path, **kw) -> str:
    with pytest.raises(UserError) as e:
        list(iter_records(str(path), **kw))
    return str(e.value)


def test_errors_name_file_and_line(tmp_path):
    p = tmp_path / "a.jsonl"
    p.write_bytes(b'{"text": "ok"}\n\n{"text": \n')
    assert _error(p, require_label=False).startswith(f"{p}:3: invalid JSON")
    p.write_bytes(b'{"text": "ok"}\n{"text": "caf\xe9"}\n')
    assert _error(p, require_label=False) == f"{p}:2: invalid UTF-8 (byte 0xe9 at column 14); expected UTF-8 text"
    p.write_text('{"text": "ok"}\n' + json.dumps({"text": "x" * MAX_LINE_CHARS}) + "\n")
    assert _error(p, require_label=False).startswith(f"{p}:2: line of {MAX_LINE_CHARS + 12:,d} characters")
    p.write_text('{"text": "ok", "label": "a"}\n{"text": "no label"}\n')
    assert _error(p) == f"{p}:2: expected a 'label' field with the class name"
    assert [r for r, _ in iter_records(str(p), require_label=False)][1] == {"text": "no label"}
    c = tmp_path / "b.csv"
    c.write_text("text,label\nfine,a\n\"two\nlines\",b\ntoo,many,fields\n")
    assert _error(c) == f"{c}:5: 3 fields; expected 2 as in the header"
    c.write_text("txt\nfine\n")
    assert _error(c, require_label=False) == f"{c}:1: header has columns ['txt']; expected 'text' (or 'premise' " \
                                             "and 'hypothesis')"
    c.write_text("\n\n")
    assert _error(c) == f"{c}: empty file; expected a header line and one record per line"
    with pytest.raises(UserError, match="no records; expected one JSON object per line"):
        (tmp_path / "e.jsonl").write_text("\n \n")
        read_records(str(tmp_path / "e.jsonl"))
    with pytest.raises(UserError, match="is a directory"):
        read_records(str(tmp_path))
    with pytest.raises(FileNotFoundError, match="no such file"):
        read_records(str(tmp_path / "missing.jsonl"))


def test_records_are_read_lazily_in_order(tmp_path):
    p = tmp_path / "a.jsonl"
    p.write_text('{"text": "one"}\n{"text": "two"}\n{broken\n')
    it = iter_records(str(p), require_label=False)
    assert next(it) == ({"text": "one"}, 1) and next(it) == ({"text": "two"}, 2)  # the bad line not read yet
    with pytest.raises(UserError, match=":3: invalid JSON"):
        next(it)


@pytest.mark.parametrize("ext", ["jsonl", "csv"])
def test_line_ends_across_block_boundaries(tmp_path, seed, ext):
    """Mixed \\n, \\r\\n and \\r line ends and blank lines in a file of several 64 KiB blocks: the records and line
    numbers of ``bytes.splitlines`` on the whole file."""
    rng = random.Random(seed)
    texts = [" ".join(rng.choice(["good", "bad", "film", "caf\u00e9"]) for _ in range(rng.randint(1, 40)))
             for _ in range(4000)]
    ends = [rng.choice(["\n", "\r\n", "\r"]) for _ in texts]
    if ext == "csv":
        body = "\ufefftext,label\n" + "".join(f"{t},{i % 3}{e}" for i, (t, e) in enumerate(zip(texts, ends)))
    else:
        body = "\ufeff" + "".join(json.dumps({"text": t, "label": i % 3}) + e + ("\n" if i % 97 == 0 else "")
                                  for i, (t, e) in enumerate(zip(texts, ends)))
    p = tmp_path / f"a.{ext}"
    p.write_bytes(body.encode())
    assert p.stat().st_size > 3 * (1 << 16)
    lines = body.encode()[3:].splitlines()
    want = [i for i, b in enumerate(lines, start=1) if b.strip()][1 if ext == "csv" else 0:]
    got = list(iter_records(str(p)))
    assert [r["text"] for r, _ in got] == texts and [i for _, i in got] == want
    assert [int(r["label"]) for r, _ in got] == [i % 3 for i in range(len(texts))]
    assert count_records(str(p)) == len(texts)
