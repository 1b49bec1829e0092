"""Checks on a CLI command's inputs that run BEFORE any model is loaded or any training step is taken.

Everything that can be known from the arguments and files is checked first, so that a bad input costs seconds,
not a training run: the output location (writable, creatable), the model name (built-in, a path, a cached or
reachable hub id), the data files (fields, UTF-8, line lengths, CSV headers), the label sets (at least two
classes in train; every dev label occurs in train: the label set comes from the whole training file, before
``--max-train-examples`` subsamples it), numeric arguments, and an adapter's config and weights (checksum).
Each problem raises :class:`ltuning.errors.UserError` (one line, exit status 2 in the CLI).
"""
from __future__ import annotations

import os

from .data import check_labels, load_split, parse_label_texts, read_records, split_file
from .errors import UserError
from .models.registry import check_model
from .outputs import check_output_dir, check_output_file


def _positive(a, names: tuple) -> None:
    for n in names:
        v = getattr(a, n, None)
        if v is not None and not v > 0:
            raise UserError(f"{v}; expected a positive number", "--" + n.replace("_", "-"))


def _read(data: str, split: str):
    """``(records, file or None, line numbers or None)`` of a split."""
    path = split_file(data, split)
    if path is None:  # a Hugging Face dataset name
        return load_split(data, split), None, None
    recs, lines = read_records(path, with_lines=True)
    return recs, path, lines


def _check_fsdp(a) -> None:
    """``--fsdp`` shards the base over torchrun's processes: refused in one process and on a quantized base."""
    if not getattr(a, "fsdp", False):
        return
    from .distributed import env_world_size
    if env_world_size() < 2:
        raise UserError("shards the frozen base over several processes; run it under torchrun --nproc-per-node N "
                        "(N >= 2) -m ltuning train ... --fsdp", "--fsdp")
    if getattr(a, "quantize", "none") not in (None, "none"):
        raise UserError(f"cannot shard a bitsandbytes-quantized base (--quantize {a.quantize}); use one or the "
                        "other", "--fsdp")


def check_train_inputs(a):
    """``ltuning train``: returns ``(train, dev, label_names)`` of the whole files (None for multi-task data,
    whose files :mod:`ltuning.tasks` reads)."""
    _positive(a, ("epochs", "batch_size", "max_length", "max_train_examples", "max_dev_examples", "max_steps",
                  "lr", "eval_every"))
    if not 0 < a.val_fraction < 1:
        raise UserError(f"{a.val_fraction}; expected a fraction between 0 and 1", "--val-fraction")
    overrides = parse_label_texts(a.label_text)
    _check_fsdp(a)
    check_output_dir(a.out, "--out")
    check_model(a.model)
    if "," in a.data:  # multi-task: the same file and label checks on every task's directory
        for d in a.data.split(","):
            train, train_file, _ = _read(d, "train")
            dev, dev_file, dev_lines = _read(d, "dev")
            check_labels(train, dev, train_file, dev_file, dev_lines)
        return None
    train, train_file, _ = _read(a.data, "train")
    dev, dev_file, dev_lines = _read(a.data, "dev")
    names = check_labels(train, dev, train_file, dev_file, dev_lines)
    unknown = sorted(set(overrides) - set(names))
    if unknown:
        raise UserError(f"names {unknown}, which are not labels of {train_file or a.data}; expected some of "
                        f"{names[:8]}", "--label-text")
    return train, dev, names


def _check_adapter(a):
    from .io import read_adapter_meta, read_adapter_weights
    meta = read_adapter_meta(a.adapter)
    read_adapter_weights(a.adapter, meta)
    if a.model:
        check_model(a.model)
    return meta


def check_eval_inputs(a) -> None:
    """``ltuning eval``: the adapter (config, weights), the model override, and the data's labels against the
    adapter's (single-task adapters)."""
    _positive(a, ("batch_size",))
    meta = _check_adapter(a)
    if meta.multitask is not None or "," in a.data:
        return
    recs, path, lines = _read(a.data, a.split)
    known = set(meta.label_names)
    for j, r in enumerate(recs):
        if str(r["label"]) not in known:
            raise UserError(f"label {r['label']!r} is not a label of the adapter in {a.adapter}; expected one of "
                            f"{sorted(known)[:8]}", path or a.data, lines[j] if lines else None)


def check_adapter_and_output(a) -> None:
    """``ltuning classify`` (streamed): the checks of :func:`check_classify_inputs` except reading the input."""
    _positive(a, ("batch_size",))
    _check_adapter(a)
    if os.path.abspath(a.output) == os.path.abspath(a.input):
        raise UserError("is the input file; expected another path (the input is read while the output is written)",
                        "--output")
    check_output_file(a.output, "--output")


def check_classify_inputs(a) -> None:
    """``ltuning classify``: the adapter, the model override, the output file's directory and the input file."""
    check_adapter_and_output(a)
    read_records(a.input, require_label=False)
