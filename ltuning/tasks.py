"""Multi-task training: T tasks with their own label sets in one model (CGC-LoRA's setting).

Labels are namespaced ``task:label``. The head Linear(d, sum_t K_t) is the T per-task heads side by side: a row
of task t is scored only on its own K_t columns (the others are -inf), so its loss is task t's K_t-way
cross-entropy and its prediction one of task t's labels. Training examples of all tasks are shuffled
together (batches mix tasks) and go through :func:`ltuning.train.fit` unchanged: each example's task id
travels as a sentinel token ``-1 - t`` in front of its token ids, which :class:`TaskRouter` strips and passes
to the model as ``task_ids``. Task-aware methods (``cgc-lora``: ``tasks`` in its config) use the ids; others
(e.g. ``lora``: one shared LoRA) share everything but the heads.

Command line: ``ltuning train --method cgc-lora --data DIR1,DIR2,... --out OUT`` (task t = directory name;
``--max-train-examples`` / ``--max-dev-examples`` apply per task). Metrics: dev accuracy per task and their mean.
``ltuning eval --adapter OUT --data DIR1,...`` evaluates the saved model on any of its tasks (task = directory
name, or ``--task``); ``ltuning classify --adapter OUT --task T`` classifies records as task T (a record's own
``task`` field wins); both go through :func:`load`.
"""
from __future__ import annotations

import json
import os
import random
import time

import torch
import torch.nn.functional as F

from .classifier import split_validation
from .data import encode, label_names_of, load_split
from .inference import predict_scores
from .methods import make_config, method_class
from .metrics import classification_metrics
from .model import LTuningModel
from .io import atomic_write_bytes, read_adapter_config
from .models import load_base
from .train import TrainConfig, fit


class TaskRouter:
    """Wraps an :class:`LTuningModel` for :func:`fit` / :func:`predict_scores`: strips the task sentinel in front
    of every row, passes ``task_ids`` and masks other tasks' label columns. Everything else is delegated."""

    def __init__(self, model: LTuningModel, label_task: list):
        self.model = model
        self.label_task = torch.tensor(label_task)  # (sum K_t,) task of each label column

    def __getattr__(self, name):
        return getattr(self.model, name)

    def __call__(self, input_ids, attention_mask):
        task_ids = -1 - input_ids[:, 0]
        scores = self.model(input_ids[:, 1:], attention_mask[:, 1:], task_ids=task_ids)
        other = self.label_task.to(scores.device)[None] != task_ids[:, None]
        return scores.masked_fill(other, float("-inf"))

    def loss(self, input_ids, attention_mask, labels, generator=None):
        scores = self(input_ids, attention_mask)
        return F.cross_entropy(scores, labels), scores


def load_tasks(data: str, split: str, max_examples, seed: int) -> dict:
    """``{task name: records}`` for ``data`` = ``DIR1,DIR2,...`` (at most ``max_examples`` per task, seeded)."""
    tasks = {}
    for d in [x for x in data.split(",") if x]:
        recs = load_split(d, split)
        if max_examples and len(recs) > max_examples:
            recs = random.Random(seed).sample(recs, max_examples)
        tasks[os.path.basename(os.path.normpath(d))] = recs
    return tasks


def encode_tasks(tasks: dict, labels: dict, tokenizer, max_length: int, decoder: bool):
    """Token ids with the task sentinel in front, and namespaced label indices, of ``{task: records}``
    (``labels``: ``{task: label names}`` of ALL tasks, in model order)."""
    names = [f"{t}:{n}" for t in labels for n in labels[t]]
    ids, y = [], []
    for task, recs in tasks.items():
        t = list(labels).index(task)
        enc = encode([{**r, "label": f"{task}:{r['label']}"} for r in recs], tokenizer, names, max_length, decoder)
        ids += [[-1 - t] + x for x in enc.input_ids]
        y += enc.labels
    return ids, y


def build(base, tokenizer, method: str, labels: dict, **options) -> TaskRouter:
    """A multi-task model for ``labels`` = ``{task: label names}`` (``tasks`` goes to task-aware methods)."""
    cls = method_class(method)
    if cls.label_conditioned:
        raise ValueError(f"multi-task training needs a method with a classification head, not {method}")
    if "tasks" in cls.config_class.__dataclass_fields__:
        options["tasks"] = list(labels)
    names = [f"{t}:{n}" for t in labels for n in labels[t]]
    model = LTuningModel(base, tokenizer, make_config(method, label_names=names, **options))
    return TaskRouter(model, [t for t, task in enumerate(labels) for _ in labels[task]])


def evaluate(router: TaskRouter, tasks: dict, labels: dict, max_length: int, batch_size: int = 64,
             dtype: str = "fp32", progress: bool = False) -> dict:
    """Metrics per task of ``tasks`` (any subset of the model's ``labels``; task-local label indices) and
    their mean accuracy."""
    out, offset = {}, 0
    for task in labels:
        if task in tasks:
            ids, y = encode_tasks({task: tasks[task]}, labels, router.tokenizer, max_length, router.info.causal)
            scores = predict_scores(router, ids, batch_size, dtype, progress)
            out[task] = classification_metrics((scores.argmax(-1) - offset).tolist(), [i - offset for i in y],
                                               len(labels[task]))
        offset += len(labels[task])
    out["mean_accuracy"] = sum(out[t]["accuracy"] for t in tasks) / len(tasks)
    return out


def cmd_train(a, method_options: dict, lr: float) -> dict:
    """``ltuning train --data DIR1,DIR2,...``: train one multi-task model, evaluate on every task's dev split."""
    train = load_tasks(a.data, "train", a.max_train_examples, a.seed)
    dev = load_tasks(a.data, "dev", a.max_dev_examples, a.seed)
    labels = {t: label_names_of(recs) for t, recs in train.items()}
    torch.manual_seed(a.seed)
    base, tok = load_base(a.model, a.dtype)
    router = build(base, tok, a.method, labels, **method_options)
    split = {t: split_validation(recs, a.val_fraction, a.seed, stratify=a.stratify_validation)
             for t, recs in train.items()}
    decoder = router.info.causal
    tr_ids, tr_y = encode_tasks({t: s[0] for t, s in split.items()}, labels, tok, a.max_length, decoder)
    va_ids, va_y = encode_tasks({t: s[1] for t, s in split.items()}, labels, tok, a.max_length, decoder)
    cfg = TrainConfig(epochs=a.epochs, batch_size=a.batch_size, lr=lr, head_lr=a.head_lr,
                      weight_decay=a.weight_decay, warmup_ratio=a.warmup_ratio, schedule=a.schedule, dtype=a.dtype,
                      eval_every=a.eval_every, patience=a.patience, seed=a.seed,
                      gradient_checkpointing=a.gradient_checkpointing, max_steps=a.max_steps,
                      select_metric=a.select_metric)
    t0 = time.time()
    hist = fit(router, tr_ids, tr_y, va_ids, va_y, cfg, checkpoint_dir=a.out, resume=a.resume,
               progress=not a.quiet)
    wall = time.time() - t0
    m = evaluate(router, dev, labels, a.max_length, a.batch_size * 4, a.dtype)
    trainable, total = router.count_parameters()
    metrics = {"model": a.model, "method": a.method, "data": a.data, "tasks": list(labels),
               "train_examples": len(tr_ids), "dev_examples": {t: len(r) for t, r in dev.items()},
               "accuracy": m["mean_accuracy"], "per_task": {t: m[t] for t in labels},
               "train_examples_per_s": hist["train_examples_per_s"], "trainable_parameters": trainable,
               "total_parameters": total, "best_val": hist["best_val"], "best_step": hist["best_step"],
               "steps": hist["steps"], "wall_seconds": wall, "train_config": hist["train_config"]}
    router.save_pretrained(a.out, extra={"multitask": {"tasks": list(labels), "labels": labels},
                                         "classifier": {"model": a.model, "dtype": a.dtype,
                                                        "max_length": a.max_length}})
    atomic_write_bytes(os.path.join(a.out, "metrics.json"), json.dumps(metrics, indent=2).encode())
    return metrics


def load(directory: str, base=None, tokenizer=None, dtype=None):
    """A multi-task model saved by ``ltuning train --data DIR1,DIR2,...``: ``(router, labels, max_length, dtype)``
    with ``labels`` = ``{task: label names}`` in model order. ``base`` None loads the recorded base model."""
    meta = read_adapter_config(directory)
    if "multitask" not in meta:
        raise ValueError(f"{directory}: a single-task adapter (no 'multitask' entry in its config)")
    info = meta.get("classifier", {})
    dtype = dtype or info.get("dtype", "fp32")
    if base is None:
        base, tokenizer = load_base(info.get("model", meta["base_model"]), dtype)
    model = LTuningModel.from_pretrained(base, directory, tokenizer, dtype)
    labels = meta["multitask"]["labels"]
    router = TaskRouter(model, [t for t, task in enumerate(labels) for _ in labels[task]])
    return router, labels, info.get("max_length", 128), dtype


def task_of(name: str, labels: dict, where: str) -> str:
    if name not in labels:
        raise ValueError(f"{where}: task {name!r} is not one of the adapter's tasks {list(labels)} "
                         f"(name the directory after the task or pass --task)")
    return name


def cmd_eval(a, loaded=None) -> dict:
    """``ltuning eval`` of a multi-task adapter: metrics per task (``--data DIR1,DIR2,...``) and their mean
    accuracy. ``loaded``: what :func:`load` returned (else the adapter is loaded here)."""
    router, labels, max_length, dtype = loaded or load(a.adapter)
    dirs = [d for d in a.data.split(",") if d]
    if a.task and len(dirs) > 1:
        raise ValueError("--task names the task of a single --data directory")
    tasks = {task_of(a.task or os.path.basename(os.path.normpath(d)), labels, d): load_split(d, a.split)
             for d in dirs}
    m = evaluate(router, tasks, labels, max_length, a.batch_size, dtype, progress=True)
    return {"accuracy": m.pop("mean_accuracy"), "per_task": m}


def classify(router, labels: dict, records: list, task: str | None, max_length: int, batch_size: int = 64,
             dtype: str = "fp32"):
    """``[(task, {label: score})]`` for unlabelled records, each classified as its ``task`` field or ``task``."""
    order = list(labels)
    rows = []
    for i, r in enumerate(records):
        t = r.get("task", task)
        if t is None:
            raise ValueError(f"record {i + 1}: no 'task' field and no --task for this multi-task adapter "
                             f"(tasks: {order})")
        rows.append(task_of(t, labels, f"record {i + 1}"))
    enc = encode(records, router.tokenizer, None, max_length, router.info.causal)
    ids = [[-1 - order.index(t)] + x for t, x in zip(rows, enc.input_ids)]
    scores = predict_scores(router, ids, batch_size, dtype, progress=True)
    offsets = {t: sum(len(labels[u]) for u in order[:order.index(t)]) for t in order}
    return [(t, dict(zip(labels[t], s[offsets[t]:offsets[t] + len(labels[t])].tolist())))
            for t, s in zip(rows, scores)]
