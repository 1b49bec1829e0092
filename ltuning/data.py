"""Classification data: JSONL / CSV / TSV files (or a directory with train/dev files), label texts, batching.

A record is ``{"text": str, "label": name}`` or ``{"premise": str, "hypothesis": str, "label": name}``.
Errors name the file and line and say what was expected.
"""
from __future__ import annotations

import csv
import json
import os
import random
from dataclasses import dataclass

import torch

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


def default_label_text(name: str) -> str:
    return LABEL_TEXTS.get(name, f"The label of the text is {name.replace('_', ' ')}.")


def parse_label_texts(items) -> dict:
    """``["name=text", ...]`` (CLI ``--label-text``) -> dict."""
    out = {}
    for it in items or []:
        if "=" not in it:
            raise ValueError(f"--label-text expects name=\"text\", got {it!r}")
        k, v = it.split("=", 1)
        out[k.strip()] = v.strip()
    return out


def _check_record(rec, where):
    if not isinstance(rec, dict):
        raise ValueError(f"{where}: expected a JSON object, got {type(rec).__name__}")
    if "text" not in rec and not ("premise" in rec and "hypothesis" in rec):
        raise ValueError(f"{where}: expected a 'text' field or 'premise' and 'hypothesis' fields; "
                         f"got fields {sorted(rec)}")
    return rec


def read_records(path: str, require_label: bool = True) -> list:
    """Read a .jsonl / .json / .csv / .tsv file of records."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: no such file")
    ext = os.path.splitext(path)[1].lower()
    records = []
    with open(path, encoding="utf-8", newline="") as f:
        if ext in (".csv", ".tsv"):
            reader = csv.DictReader(f, delimiter="\t" if ext == ".tsv" else ",")
            for i, row in enumerate(reader, start=2):
                records.append((_check_record(row, f"{path}:{i}"), f"{path}:{i}"))
        else:
            for i, line in enumerate(f, start=1):
                if not line.strip():
                    continue
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError as e:
                    raise ValueError(f"{path}:{i}: invalid JSON ({e.msg} at column {e.colno})") from None
                records.append((_check_record(rec, f"{path}:{i}"), f"{path}:{i}"))
    if require_label:
        for rec, where in records:
            if rec.get("label") in (None, ""):
                raise ValueError(f"{where}: expected a 'label' field with the class name")
    if not records:
        raise ValueError(f"{path}: no records")
    return [r for r, _ in records]


def find_split(directory: str, split: str) -> str | None:
    for ext in (".jsonl", ".json", ".csv", ".tsv"):
        p = os.path.join(directory, split + ext)
        if os.path.isfile(p):
            return p
    return None


def load_split(data: str, split: str) -> list:
    """Records of ``split`` ("train", "dev") from a directory, or from a Hugging Face dataset name if online."""
    if os.path.isdir(data):
        p = find_split(data, split) or (find_split(data, "validation") if split == "dev" else None)
        if p is None:
            raise FileNotFoundError(f"{data}: expected {split}.jsonl (or .csv / .tsv)")
        return read_records(p)
    if os.path.isfile(data):
        return read_records(data)
    return _load_hf_dataset(data, split)


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


@dataclass
class Encoded:
    input_ids: list
    labels: list


def encode(records: list, tokenizer, label_names: list | None, max_length: int, decoder: bool) -> Encoded:
    """Tokenise records (pairs joined by the tokenizer's pair template for encoders, a newline for decoders)."""
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
    return Encoded(ids, labels)


def collate(ids: list, pad_id: int, labels: list | None = None):
    """Dynamic padding (right): ``(input_ids (B, L), attention_mask (B, L), labels (B,) or None)``."""
    L = max(len(x) for x in ids)
    out = torch.full((len(ids), L), pad_id, dtype=torch.long)
    mask = torch.zeros(len(ids), L, dtype=torch.long)
    for i, x in enumerate(ids):
        out[i, :len(x)] = torch.tensor(x)
        mask[i, :len(x)] = 1
    lab = torch.tensor(labels, dtype=torch.long) if labels is not None else None
    return out, mask, lab


def length_grouped_batches(lengths: list, batch_size: int, rng: random.Random, mega: int = 50) -> list:
    """Shuffled batches of indices whose lengths are similar (sorted within mega-batches of ``mega`` batches)."""
    idx = list(range(len(lengths)))
    rng.shuffle(idx)
    batches = []
    step = batch_size * mega
    for s in range(0, len(idx), step):
        chunk = sorted(idx[s:s + step], key=lambda i: -lengths[i])
        batches += [chunk[j:j + batch_size] for j in range(0, len(chunk), batch_size)]
    rng.shuffle(batches)
    return batches


def sorted_batches(lengths: list, batch_size: int, overhead_tokens: int | None = None) -> list:
    """Inference batches of at most ``batch_size`` rows, sorted by length (longest first); callers restore the order.

    Without ``overhead_tokens``: consecutive chunks of ``batch_size``. With it: the split of the sorted rows into
    consecutive batches that minimises ``padded tokens + overhead_tokens * batches`` (exact, by dynamic programming
    in O(n * batch_size)), where ``overhead_tokens`` is the fixed cost of one forward pass counted in tokens (streaming
    the weights once: ~40 tokens for SmolLM2 on one CPU core, far more on a GPU). A chunk of 64 rows of 30 to 128
    tokens computes up to 2x its real tokens; the split computes little more than its real ones.
    """
    idx = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    n = len(idx)
    if overhead_tokens is None or n <= 1:
        return [idx[j:j + batch_size] for j in range(0, n, batch_size)]
    ls = [lengths[i] for i in idx]
    best = [0.0] + [float("inf")] * n  # best[j]: least cost of the first j rows
    start = [0] * (n + 1)
    for j in range(1, n + 1):
        for i in range(max(0, j - batch_size), j):  # last batch = rows i..j-1, padded to ls[i]
            c = best[i] + (j - i) * ls[i] + overhead_tokens
            if c < best[j]:
                best[j], start[j] = c, i
    out, j = [], n
    while j > 0:
        out.append(idx[start[j]:j])
        j = start[j]
    return out[::-1]
