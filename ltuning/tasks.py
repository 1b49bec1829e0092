"""Multi-task training: T tasks with their own label sets in one model (CGC-LoRA's setting).

Labels are namespaced ``task:label``. The head Linear(d, sum_t K_t) is the T per-task heads side by side; the model
knows its ``task_names`` and a row of task t (``task_ids`` in the batch) is scored only on its own K_t columns (the
others are -inf, :meth:`ltuning.model.LTuningModel.forward`), so its loss is task t's K_t-way cross-entropy and its
prediction one of task t's labels. Training examples of all tasks are shuffled together (batches mix tasks) and go
through :func:`ltuning.train.fit` unchanged, each with its task id (:class:`ltuning.data.Encoded`). Task-aware
methods (``cgc-lora``: ``tasks`` in its config) use the ids; others (e.g. ``lora``: one shared LoRA) share
everything but the heads.

Command line: ``ltuning train --method cgc-lora --data DIR1,DIR2,... --out OUT`` (task t = directory name;
``--max-train-examples`` / ``--max-dev-examples`` apply per task). Metrics: dev accuracy per task and their mean.
``ltuning eval --adapter OUT --data DIR1,...`` evaluates the saved model on any of its tasks (task = directory
name, or ``--task``); ``ltuning classify --adapter OUT --task T`` classifies records as task T (a record's own
``task`` field wins); both go through :func:`load`.
"""
from __future__ import annotations

import json
import os
import time
from typing import Optional

import torch

from .data import Encoded, encode, label_names_of, load_split, split_validation, subsample
from .inference import predict_scores
from .io import read_adapter_meta
from .methods import make_config, method_class
from .metrics import classification_metrics
from .model import LTuningModel
from .models import load_base
from .train import TrainConfig, fit, remove_checkpoint


def task_name(directory: str) -> str:
    """The task of a data directory: its name."""
    return os.path.basename(os.path.normpath(directory))


def load_tasks(dirs: list, split: str, max_examples: Optional[int], seed: int) -> dict:
    """``{task name: records}`` of the data directories ``dirs`` (at most ``max_examples`` per task, seeded)."""
    return {task_name(d): subsample(load_split(d, split), max_examples, seed) for d in dirs}


def encode_tasks(tasks: dict, labels: dict, tokenizer, max_length: int, decoder: bool) -> Encoded:
    """Token ids, namespaced label indices and task ids of ``{task: records}`` (``labels``: ``{task: label names}``
    of ALL tasks, in model order)."""
    names = [f"{t}:{n}" for t in labels for n in labels[t]]
    out = Encoded([], [], [])
    for task, recs in tasks.items():
        out = out + encode([{**r, "label": f"{task}:{r['label']}"} for r in recs], tokenizer, names, max_length,
                           decoder, task_id=list(labels).index(task))
    return out


def build(base, tokenizer, method: str, labels: dict, **options) -> LTuningModel:
    """A multi-task model for ``labels`` = ``{task: label names}`` (``tasks`` goes to task-aware methods)."""
    cls = method_class(method)
    if cls.label_conditioned:
        raise ValueError(f"multi-task training needs a method with a classification head, not {method}")
    if "tasks" in cls.config_class.__dataclass_fields__:
        options["tasks"] = list(labels)
    names = [f"{t}:{n}" for t in labels for n in labels[t]]
    return LTuningModel(base, tokenizer, make_config(method, label_names=names, **options), task_names=list(labels))


def evaluate(model: LTuningModel, tasks: dict, max_length: int, batch_size: int = 64, dtype: str = "fp32",
             progress: bool = False) -> dict:
    """Metrics per task of ``tasks`` (``{task: records}``, any subset of the model's tasks; task-local label
    indices) and their mean accuracy."""
    labels = model.task_labels
    out, offset = {}, 0
    for task in labels:
        if task in tasks:
            data = encode_tasks({task: tasks[task]}, labels, model.tokenizer, max_length, model.info.causal)
            scores = predict_scores(model, data.input_ids, batch_size, dtype, progress, task_ids=data.task_ids)
            out[task] = classification_metrics((scores.argmax(-1) - offset).tolist(),
                                               [i - offset for i in data.labels], len(labels[task]))
        offset += len(labels[task])
    out["mean_accuracy"] = sum(out[t]["accuracy"] for t in tasks) / len(tasks)
    return out


def train(data: list, out: str, model: str, method: str, method_options: dict, cfg: TrainConfig,
          max_train_examples: Optional[int] = None, max_dev_examples: Optional[int] = None, max_length: int = 128,
          val_fraction: float = 0.1, stratify_validation: bool = False, resume: bool = False,
          keep_checkpoint: bool = False, progress: bool = True) -> dict:
    """Train one multi-task model on the data directories ``data`` (task = directory name), evaluate it on every
    task's dev split, save it to ``out`` (adapter + ``metrics.json``); returns the metrics."""
    train_recs = load_tasks(data, "train", max_train_examples, cfg.seed)
    dev = load_tasks(data, "dev", max_dev_examples, cfg.seed)
    labels = {t: label_names_of(recs) for t, recs in train_recs.items()}
    torch.manual_seed(cfg.seed)
    base, tok = load_base(model, cfg.dtype)
    mt = build(base, tok, method, labels, **method_options)
    split = {t: split_validation(recs, val_fraction, cfg.seed, stratify=stratify_validation)
             for t, recs in train_recs.items()}
    decoder = mt.info.causal
    tr = encode_tasks({t: s[0] for t, s in split.items()}, labels, tok, max_length, decoder)
    va = encode_tasks({t: s[1] for t, s in split.items()}, labels, tok, max_length, decoder)
    t0 = time.time()
    hist = fit(mt, tr, va, cfg, checkpoint_dir=out, resume=resume, progress=progress)
    wall = time.time() - t0
    m = evaluate(mt, dev, max_length, cfg.batch_size * 4, cfg.dtype)
    trainable, total = mt.count_parameters()
    metrics = {"model": model, "method": method, "data": ",".join(data), "tasks": list(labels),
               "train_examples": len(tr), "dev_examples": {t: len(r) for t, r in dev.items()},
               "accuracy": m["mean_accuracy"], "per_task": {t: m[t] for t in labels},
               "train_examples_per_s": hist["train_examples_per_s"], "trainable_parameters": trainable,
               "total_parameters": total, "best_val": hist["best_val"], "best_step": hist["best_step"],
               "steps": hist["steps"], "wall_seconds": wall, "train_config": hist["train_config"]}
    mt.save_pretrained(out, classifier={"model": model, "dtype": cfg.dtype, "max_length": max_length},
                       files={"metrics.json": json.dumps(metrics, indent=2).encode()})
    if not keep_checkpoint:
        remove_checkpoint(out)
    return metrics


def load(directory: str, base=None, tokenizer=None, dtype=None):
    """A multi-task model saved by ``ltuning train --data DIR1,DIR2,...``: ``(model, labels, max_length, dtype)``
    with ``labels`` = ``{task: label names}`` in model order. ``base`` None loads the recorded base model."""
    meta = read_adapter_meta(directory)
    if meta.multitask is None:
        raise ValueError(f"{directory}: a single-task adapter (no 'multitask' entry in its config)")
    dtype = dtype or meta.dtype
    if base is None:
        base, tokenizer = load_base(meta.model_name, dtype)
    model = LTuningModel.from_pretrained(base, directory, tokenizer, dtype)
    return model, model.task_labels, meta.max_length, dtype


def task_of(name: str, labels: dict, where: str) -> str:
    if name not in labels:
        raise ValueError(f"{where}: task {name!r} is not one of the adapter's tasks {list(labels)} "
                         f"(name the directory after the task or pass --task)")
    return name


def evaluate_adapter(adapter: str, data: list, split: str = "dev", task: Optional[str] = None, batch_size: int = 64,
                     model: Optional[str] = None) -> dict:
    """``ltuning eval`` of a multi-task adapter: metrics per task (``data``: directories, task = directory name or
    ``task`` for a single one) and their mean accuracy."""
    base, tok = load_base(model) if model else (None, None)
    mt, labels, max_length, dtype = load(adapter, base, tok)
    if task and len(data) > 1:
        raise ValueError("--task names the task of a single --data directory")
    tasks = {task_of(task or task_name(d), labels, d): load_split(d, split) for d in data}
    m = evaluate(mt, tasks, max_length, batch_size, dtype, progress=True)
    return {"accuracy": m.pop("mean_accuracy"), "per_task": m}


def classify(model: LTuningModel, labels: dict, records: list, task: str | None, max_length: int,
             batch_size: int = 64, dtype: str = "fp32"):
    """``[(task, {label: score})]`` for unlabelled records, each classified as its ``task`` field or ``task``."""
    order = list(labels)
    rows = []
    for i, r in enumerate(records):
        t = r.get("task", task)
        if t is None:
            raise ValueError(f"record {i + 1}: no 'task' field and no --task for this multi-task adapter "
                             f"(tasks: {order})")
        rows.append(task_of(t, labels, f"record {i + 1}"))
    enc = encode(records, model.tokenizer, None, max_length, model.info.causal)
    scores = predict_scores(model, enc.input_ids, batch_size, dtype, progress=True,
                            task_ids=[order.index(t) for t in rows])
    offsets = {t: sum(len(labels[u]) for u in order[:order.index(t)]) for t in order}
    return [(t, dict(zip(labels[t], s[offsets[t]:offsets[t] + len(labels[t])].tolist())))
            for t, s in zip(rows, scores)]
