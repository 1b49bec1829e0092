"""Classification data: JSONL / CSV / TSV files (or a directory with train/dev files), label texts, subsampling,
the validation split, tokenisation and batching.

A record is ``{"text": str, "label": name}`` or ``{"premise": str, "hypothesis": str, "label": name}``.
Errors name the file and line and say what was expected. The path of records to a model:
``load_split`` -> ``subsample`` -> ``split_validation`` -> ``encode`` (:class:`Encoded`: token ids, label indices,
task ids) -> ``collate`` (a dict batch ``{"input_ids", "attention_mask", "labels"?, "task_ids"?}`` that
``model(**batch)`` / ``model.loss(**batch)`` take).
"""
from __future__ import annotations

import csv
import json
import os
import random
from dataclasses import dataclass
from typing import Optional

import torch

from .errors import UserError

# Default label texts, by label name (the SST-2 / RTE / CoLA / MRPC / NLI label names in ../shared/data).
LABEL_TEXTS = {
    "negative": "The sentiment of the text is negative.",
    "positive": "The sentiment of the text is positive.",
    "entailment": "The hypothesis is entailed by the premise.",
    "not_entailment": "The hypothesis is not entailed by the premise.",
    "neutral": "The hypothesis is neither entailed nor contradicted by the premise.",
    "contradiction": "The hypothesis contradicts the premise.",
    "acceptable": "The sentence is grammatically acceptable.",
    "unacceptable": "The sentence is grammatically unacceptable.",
    "equivalent": "The two sentences are paraphrases of each other.",
    "not_equivalent": "The two sentences are not paraphrases of each other.",
}


# How a label name becomes its label text when none is given (``label_template``, lt-prefix / lt-prompt):
#   "curated":  the hand-written sentence of ``LABEL_TEXTS`` for the GLUE / NLI label names, else "sentence";
#   "sentence": "The label of the text is {name}." for every name;
#   "name":     the name itself ("not_entailment" -> "not entailment").
# Underscores become spaces in "sentence" and "name". Which one is the default was decided on validation
# (benchmarks/RESULTS_scoring.md, "label-text template"); any data set's unseen names get "sentence" under
# "curated", so on new tasks "curated" and "sentence" are the same texts.
LABEL_TEMPLATES = ("curated", "sentence", "name")


def default_label_text(name: str, template: str = "curated") -> str:
    """The label text of label ``name`` under ``template`` (one of :data:`LABEL_TEMPLATES`)."""
    if template not in LABEL_TEMPLATES:
        raise ValueError(f"label_template must be one of {', '.join(LABEL_TEMPLATES)}, not {template!r}")
    words = str(name).replace("_", " ")
    if template == "name":
        return words
    if template == "curated" and name in LABEL_TEXTS:
        return LABEL_TEXTS[name]
    return f"The label of the text is {words}."


def parse_label_texts(items) -> dict:
    """``["name=text", ...]`` (CLI ``--label-text``) -> dict."""
    out = {}
    for it in items or []:
        if "=" not in it:
            raise ValueError(f"--label-text expects name=\"text\", got {it!r}")
        k, v = it.split("=", 1)
        out[k.strip()] = v.strip()
    return out


# A record's line may hold at most this many characters: inputs are truncated to --max-length tokens (128 by
# default, about 1 KB of text) anyway, so a longer line is a broken file (a missing newline, a binary blob).
MAX_LINE_CHARS = 100_000


def _nonempty_str(rec, key, path, line):
    v = rec.get(key)
    if not isinstance(v, str) or not v.strip():
        got = "an empty string" if isinstance(v, str) else "null" if v is None else type(v).__name__
        raise UserError(f"field {key!r} is {got}; expected non-empty text", path, line)


def _check_record(rec, path, line, require_label=True):
    if not isinstance(rec, dict):
        raise UserError(f"expected a JSON object, got {type(rec).__name__}", path, line)
    if "text" in rec:
        _nonempty_str(rec, "text", path, line)
    elif "premise" in rec and "hypothesis" in rec:
        _nonempty_str(rec, "premise", path, line)
        _nonempty_str(rec, "hypothesis", path, line)
    else:
        raise UserError(f"expected a 'text' field or 'premise' and 'hypothesis' fields; got fields {sorted(rec)}",
                        path, line)
    lab = rec.get("label")
    if require_label and (lab is None or lab == ""):
        raise UserError("expected a 'label' field with the class name", path, line)
    if lab is not None and (isinstance(lab, bool) or not isinstance(lab, (str, int))):
        raise UserError(f"label {lab!r} is a {type(lab).__name__}; expected a class name (a string)", path, line)
    return rec


def _raw_lines(f, block: int = 1 << 16):
    """The lines of a binary file ``f``, line ends kept (``\n``, ``\r\n`` or ``\r``, as ``bytes.splitlines``),
    read ``block`` bytes at a time: only one block and one line are held in memory."""
    rest = b""
    while True:
        data = f.read(block)
        if not data:
            if rest:
                yield rest
            return
        lines = (rest + data).splitlines(keepends=True)
        # the last piece may continue in the next block: no line end yet, or a "\r" that a "\n" may follow
        rest = lines.pop() if not lines[-1].endswith(b"\n") else b""
        yield from lines


def _decoded_lines(path: str, f):
    """``(line number, text)`` of the file's lines, each checked for UTF-8 and length (a UTF-8 BOM at the start is
    dropped)."""
    for i, b in enumerate(_raw_lines(f), start=1):
        if i == 1 and b.startswith(b"\xef\xbb\xbf"):
            b = b[3:]
        try:
            text = b.decode("utf-8")
        except UnicodeDecodeError as e:
            raise UserError(f"invalid UTF-8 (byte 0x{b[e.start]:02x} at column {e.start + 1}); expected UTF-8 "
                            "text", path, i) from None
        n = len(text.rstrip("\r\n"))
        if n > MAX_LINE_CHARS:
            raise UserError(f"line of {n:,d} characters; expected at most {MAX_LINE_CHARS:,d} per record "
                            "(inputs are truncated to --max-length tokens anyway)", path, i)
        yield i, text


def _is_table(path: str) -> bool:
    return os.path.splitext(path)[1].lower() in (".csv", ".tsv")


def _open_records(path: str):
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path}: no such file")
    if os.path.isdir(path):
        raise UserError("is a directory; expected a .jsonl, .csv or .tsv file of records", path)
    return open(path, "rb")


def iter_records(path: str, require_label: bool = True):
    """Yield ``(record, line)`` (1-based line number) of a .jsonl / .json / .csv / .tsv file of records, one at a
    time (constant memory). Every problem raises :class:`~ltuning.errors.UserError` naming the file and line."""
    with _open_records(path) as f:
        lines = _decoded_lines(path, f)
        if not _is_table(path):
            for i, line in lines:
                if not line.strip():
                    continue
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError as e:
                    raise UserError(f"invalid JSON ({e.msg} at column {e.colno}); expected one JSON object per "
                                    "line", path, i) from None
                yield _check_record(rec, path, i, require_label), i
            return
        ext = os.path.splitext(path)[1].lower()
        reader = csv.DictReader((text for _, text in lines), delimiter="\t" if ext == ".tsv" else ",")
        try:
            header = reader.fieldnames
            if not header and all(not text.strip() for _, text in lines):
                raise UserError("empty file; expected a header line and one record per line", path)
            ok = "text" in header or ("premise" in header and "hypothesis" in header)
            if not ok or (require_label and "label" not in header):
                raise UserError(f"header has columns {header}; expected 'text' (or 'premise' and 'hypothesis')"
                                + (" and 'label'" if require_label else ""), path, 1)
            for row in reader:
                i = reader.line_num
                if None in row or None in row.values():
                    n = len(header) + len(row.get(None, [])) - sum(v is None for v in row.values())
                    raise UserError(f"{n} fields; expected {len(header)} as in the header", path, i)
                yield _check_record(row, path, i, require_label), i
        except csv.Error as e:
            raise UserError(f"malformed {ext[1:].upper()} ({e})", path, reader.line_num) from None


def count_records(path: str) -> int:
    """Number of records, one cheap pass without checks (blank lines skipped for JSONL, CSV rows parsed)."""
    with _open_records(path) as f:
        if _is_table(path):
            text = (b.decode("utf-8", "replace") for b in _raw_lines(f))
            return max(0, sum(1 for _ in csv.reader(text, delimiter="\t" if path.lower().endswith(".tsv") else ","))
                       - 1)
        return sum(1 for b in _raw_lines(f) if b.strip())


def read_records(path: str, require_label: bool = True, with_lines: bool = False):
    """The records of a file (see :func:`iter_records`) as a list; ``with_lines``: ``(records, line numbers)``.
    A file without records raises :class:`~ltuning.errors.UserError`."""
    records, where = [], []
    for rec, i in iter_records(path, require_label):
        records.append(rec)
        where.append(i)
    if not records:
        raise UserError("no records; expected " + ("a header line and one record per line" if _is_table(path)
                                                   else "one JSON object per line"), path)
    return (records, where) if with_lines else records


def find_split(directory: str, split: str) -> str | None:
    for ext in (".jsonl", ".json", ".csv", ".tsv"):
        p = os.path.join(directory, split + ext)
        if os.path.isfile(p):
            return p
    return None


def split_file(data: str, split: str) -> str | None:
    """The file of ``split`` in ``data`` (a directory, or a file for every split), None for a dataset name."""
    if os.path.isdir(data):
        p = find_split(data, split) or (find_split(data, "validation") if split == "dev" else None)
        if p is None:
            raise FileNotFoundError(f"{data}: expected {split}.jsonl (or .csv / .tsv)")
        return p
    if os.path.isfile(data):
        return data
    return None


def load_split(data: str, split: str) -> list:
    """Records of ``split`` ("train", "dev") from a directory, or from a Hugging Face dataset name if online."""
    p = split_file(data, split)
    return read_records(p) if p is not None else _load_hf_dataset(data, split)


def check_labels(train: list, dev: list, train_file: str | None = None, dev_file: str | None = None,
                 dev_lines: list | None = None) -> list:
    """The label set of ``train`` (the WHOLE training file: a subsample may miss a class, which is still scored);
    raises :class:`UserError` if it has one class only, or if a ``dev`` record has a label ``train`` never has
    (naming the dev file and line). Runs before any model is loaded."""
    names = label_names_of(train)
    if len(names) < 2:
        raise UserError(f"every record has the label {names[0]!r}; expected at least two classes",
                        train_file or "training data")
    known = set(names)
    for j, r in enumerate(dev):
        if str(r["label"]) not in known:
            shown = ", ".join(map(repr, names[:8])) + (f", ... ({len(names)} in all)" if len(names) > 8 else "")
            raise UserError(f"label {r['label']!r} never occurs in {train_file or 'the training data'}; expected "
                            f"one of its labels: {shown}", dev_file or "dev data",
                            dev_lines[j] if dev_lines else None)
    return names


def _load_hf_dataset(name: str, split: str) -> list:
    try:
        import datasets
    except ImportError:
        raise FileNotFoundError(f"{name}: not a directory or file (and the 'datasets' package is not installed "
                                f"to load it as a Hugging Face dataset)") from None
    hf_split = {"dev": "validation"}.get(split, split)
    ds = datasets.load_dataset(*name.split(":"), split=hf_split)
    names = ds.features["label"].names
    out = []
    for row in ds:
        rec = {"label": names[row["label"]]}
        keys = [k for k in ("sentence", "text", "premise", "sentence1", "question") if k in row]
        if "sentence1" in row:
            rec.update(premise=row["sentence1"], hypothesis=row["sentence2"])
        elif "premise" in row:
            rec.update(premise=row["premise"], hypothesis=row["hypothesis"])
        else:
            rec["text"] = row[keys[0]]
        out.append(rec)
    return out


def label_names_of(records: list) -> list:
    """Sorted distinct label names, with the usual negative-first order kept for known pairs."""
    names = sorted({str(r["label"]) for r in records})
    preferred = ["negative", "positive", "unacceptable", "acceptable", "not_equivalent", "equivalent",
                 "entailment", "not_entailment", "neutral", "contradiction"]
    return sorted(names, key=lambda n: (preferred.index(n) if n in preferred else len(preferred), n))


def subsample(records: list, max_examples: Optional[int], seed: int) -> list:
    """At most ``max_examples`` of ``records`` (a seeded sample; all of them, in order, when there are fewer)."""
    if max_examples and len(records) > max_examples:
        return random.Random(seed).sample(records, max_examples)
    return records


def split_validation(records: list, fraction: float, seed: int, max_examples: int = 500, min_examples: int = 50,
                     stratify: bool = False):
    """Carve a seeded validation split off ``records``: ``(train, val)``; at least ``min_examples`` (or a fifth
    of the data, when smaller) so that model selection is not decided by a handful of examples.

    ``stratify``: the split keeps each label's share of ``records`` (largest remainder: label c gets
    floor(n_val * n_c / n) examples plus one for the labels with the largest remainders), so a small split is not
    by chance dominated by one class. Off by default: the published results used the plain split."""
    idx = list(range(len(records)))
    random.Random(seed).shuffle(idx)
    n_val = min(max_examples, max(int(len(records) * fraction), min(min_examples, len(records) // 5), 1))
    if stratify:
        by_label = {}
        for i in idx:  # shuffled order within each label
            by_label.setdefault(records[i]["label"], []).append(i)
        quota = {c: n_val * len(ix) / len(records) for c, ix in by_label.items()}
        take = {c: int(q) for c, q in quota.items()}
        for c in sorted(quota, key=lambda c: (int(quota[c]) - quota[c], str(c)))[:n_val - sum(take.values())]:
            take[c] += 1
        chosen = {i for c, ix in by_label.items() for i in ix[:take[c]]}
        val_idx = [i for i in idx if i in chosen]
        idx = val_idx + [i for i in idx if i not in chosen]
    val = [records[i] for i in idx[:n_val]]
    train = [records[i] for i in idx[n_val:]]
    return train, val


@dataclass
class Encoded:
    """Tokenised records: ``input_ids`` (lists of token ids), ``labels`` (label indices, -1 for a record without
    a label; empty when not asked for) and ``task_ids`` (the task of each record, multi-task data; else None)."""
    input_ids: list
    labels: list
    task_ids: Optional[list] = None

    def __len__(self) -> int:
        return len(self.input_ids)

    def __add__(self, other: "Encoded") -> "Encoded":
        tasks = None if self.task_ids is None and other.task_ids is None else (self.task_ids or []) + (other.task_ids or [])
        return Encoded(self.input_ids + other.input_ids, self.labels + other.labels, tasks)

    def batch(self, rows: list, pad_id: int) -> dict:
        """The dict batch (:func:`collate`) of ``rows`` (indices)."""
        return collate([self.input_ids[i] for i in rows], pad_id, [self.labels[i] for i in rows] if self.labels else None,
                       None if self.task_ids is None else [self.task_ids[i] for i in rows])


def encode(records: list, tokenizer, label_names: list | None, max_length: int, decoder: bool,
           task_id: Optional[int] = None) -> Encoded:
    """Tokenise records (pairs joined by the tokenizer's pair template for encoders, a newline for decoders);
    ``task_id``: every record is of that task (``Encoded.task_ids``)."""
    ids = []
    for r in records:
        if "text" in r:
            enc = tokenizer(r["text"], truncation=True, max_length=max_length)
        elif decoder:
            enc = tokenizer(f"{r['premise']}\n{r['hypothesis']}", truncation=True, max_length=max_length)
        else:
            enc = tokenizer(r["premise"], r["hypothesis"], truncation=True, max_length=max_length)
        ids.append(enc["input_ids"])
    labels = []
    if label_names is not None:
        index = {n: i for i, n in enumerate(label_names)}
        for i, r in enumerate(records):
            lab = r.get("label")
            if lab is None:
                labels.append(-1)
            elif str(lab) not in index:
                raise ValueError(f"record {i}: label {lab!r} is not one of {label_names}")
            else:
                labels.append(index[str(lab)])
    return Encoded(ids, labels, None if task_id is None else [task_id] * len(ids))


def collate(ids: list, pad_id: int, labels: list | None = None, task_ids: list | None = None) -> dict:
    """Dynamic padding (right): ``{"input_ids": (B, L), "attention_mask": (B, L)}`` long tensors, plus
    ``"labels"`` (B,) and ``"task_ids"`` (B,) when given."""
    L = max(len(x) for x in ids)
    out = torch.full((len(ids), L), pad_id, dtype=torch.long)
    mask = torch.zeros(len(ids), L, dtype=torch.long)
    for i, x in enumerate(ids):
        out[i, :len(x)] = torch.tensor(x)
        mask[i, :len(x)] = 1
    batch = {"input_ids": out, "attention_mask": mask}
    if labels is not None:
        batch["labels"] = torch.tensor(labels, dtype=torch.long)
    if task_ids is not None:
        batch["task_ids"] = torch.tensor(task_ids, dtype=torch.long)
    return batch

