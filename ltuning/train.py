"""The training loop: AdamW (torch's fused implementation where it applies, :func:`make_optimizer`) with warm-up +
linear/cosine decay, clipping, bf16 autocast with fp32 trainable parameters and optimizer state, length-grouped
batches with dynamic padding, model selection on a validation split carved from train (never on the reported dev
set), early stopping, atomic resumable checkpoints.

:class:`TrainConfig` holds the defaults of every entry point (the CLI's flags default to its fields). Each step is
``model.loss(**batch)`` on a dict batch (:func:`ltuning.data.collate`); :func:`evaluate` scores ``model(**batch)``.
"""
from __future__ import annotations

import io
import math
import os
import random
import shutil
import time
from dataclasses import asdict, dataclass, replace
from typing import Optional

import torch
from tqdm.auto import tqdm

from . import distributed
import torch.nn.functional as F

from .batching import length_grouped_batches
from .data import Encoded
from .errors import UserError
from .inference import autocast, pooled_features, predict_scores
from .metrics import classification_metrics
from .outputs import atomic_write_files


DEFAULT_HEAD_LR = 1e-2  # the head's learning rate next to other trainables
# Validation metrics that can pick the best step. The default, macro-F1, gives a constant prediction a low score;
# accuracy on a small imbalanced split can prefer an early step that predicts the majority class for everything
# (seen on MiniLM SST-2 with 300 examples: validation 62 % = the split's majority at step 6, 0 MCC).
SELECT_METRICS = ("macro_f1", "accuracy", "mcc")


@dataclass
class TrainConfig:
    """Training options; the defaults of the Python API and of ``ltuning train`` alike. ``lr`` None: the method's
    ``default_lr``. ``head_lr``: the head's rate next to other trainables (None: ``lr``; a model that trains only its
    head uses ``lr``). ``cache_features``: a model whose features cannot change (``features_are_frozen``) computes
    them once. ``fsdp``: under torchrun, shard the frozen base's transformer layers over the ranks with FSDP2
    (:func:`ltuning.distributed.shard_frozen_base`) before training; the trainables stay replicated. ``pack``: run
    padded batches packed where the model can (``LTuningModel.pack_inputs``, :mod:`ltuning.models.packing`: the
    same loss and gradients without padding); False turns ``pack_inputs`` off, so the model trains and then
    infers on padded batches."""
    epochs: float = 3.0
    batch_size: int = 16
    lr: Optional[float] = None
    head_lr: Optional[float] = DEFAULT_HEAD_LR
    weight_decay: float = 0.01
    warmup_ratio: float = 0.06
    schedule: str = "linear"
    max_grad_norm: float = 1.0
    dtype: str = "fp32"
    eval_every: Optional[int] = None
    patience: Optional[int] = None
    select_metric: str = SELECT_METRICS[0]
    seed: int = 0
    gradient_checkpointing: bool = False
    eval_batch_size: int = 64
    max_steps: Optional[int] = None
    cache_features: bool = True
    fsdp: bool = False
    pack: bool = True

    def __post_init__(self):
        if self.select_metric not in SELECT_METRICS:
            raise ValueError(f"select_metric must be one of {SELECT_METRICS}, got {self.select_metric!r}")


def no_decay_names(model) -> set:
    """Parameters that take no weight decay besides the rule in ``param_groups``: those a module lists in its
    ``no_weight_decay`` attribute (leaf names, e.g. a stacked per-layer bias not called ``*bias``)."""
    return {f"{mod_name}.{leaf}" if mod_name else leaf
            for mod_name, mod in model.named_modules() for leaf in getattr(mod, "no_weight_decay", ())}


def make_optimizer(params, lr: float) -> torch.optim.AdamW:
    """AdamW over ``params`` (tensors or :func:`param_groups` groups). torch's fused implementation (one kernel
    over every tensor) where it applies: every trainable a plain floating tensor on the CPU or a CUDA device (not a
    DTensor). On one CPU thread it steps 6.8-9.2x faster than torch's default per-tensor loop over MiniLM's one-pass
    and K-pass trainables (2.6-2.9M: ~15-19 ms -> ~2 ms per step; ``benchmarks/train_step/bench_optimizer.py``,
    ``benchmarks/RESULTS_scoring.md``). The same update up to float rounding (``tests/test_train.py`` holds it to
    the default's in float64). Elsewhere: torch's default."""
    groups = list(params)
    tensors = [t for g in groups for t in (g["params"] if isinstance(g, dict) else [g])]
    fused = bool(tensors) and all(type(t) in (torch.Tensor, torch.nn.Parameter) and t.is_floating_point()
                                  and t.device.type in ("cpu", "cuda") for t in tensors)
    return torch.optim.AdamW(groups, lr=lr, fused=True if fused else None)


def param_groups(model, cfg: TrainConfig) -> list:
    """AdamW groups. Weight decay only on weight matrices (ndim >= 2): never on prefixes, prompts, embeddings or
    biases (also stacked per-layer ones: leaf names containing ``bias`` or listed by ``no_weight_decay``).
    The head (parameters named ``head.*``) trains at ``cfg.head_lr`` when that is set and the model also trains
    something else; a model that trains nothing but its head (linear probe) has one rate, ``cfg.lr``."""
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    head_only = all(n.startswith("head.") for n, _ in named)
    skip = no_decay_names(model)
    groups = {}
    for name, p in named:
        leaf = name.rsplit(".", 1)[-1]
        decay = (p.ndim >= 2 and "embedding" not in name and "bias" not in leaf and name not in skip
                 and cfg.weight_decay > 0)
        head = name.startswith("head.") and cfg.head_lr is not None and not head_only
        key = (decay, head)
        if key not in groups:
            groups[key] = {"params": [], "weight_decay": cfg.weight_decay if decay else 0.0,
                           "lr": cfg.head_lr if head else cfg.lr}
        groups[key]["params"].append(p)
    return list(groups.values())


def lr_lambda(total: int, warmup: int, schedule: str):
    def f(step):
        if step < warmup:
            return (step + 1) / max(1, warmup)
        frac = (step - warmup) / max(1, total - warmup)
        if schedule == "cosine":
            return 0.5 * (1 + math.cos(math.pi * min(1.0, frac)))
        if schedule == "constant":
            return 1.0
        return max(0.0, 1.0 - frac)
    return f


def scores_of(model, data: Encoded, batch_size: int = 64, dtype: str = "fp32", progress=False) -> torch.Tensor:
    """Scores (N, K) of ``data`` (torchrun: rows sharded over ranks, gathered in input order)."""
    def part(rows):
        tasks = None if data.task_ids is None else [data.task_ids[i] for i in rows]
        return predict_scores(model, [data.input_ids[i] for i in rows], batch_size, dtype, progress, task_ids=tasks)
    return distributed.map_sharded(part, list(range(len(data))), lockstep=distributed.is_sharded(model))


def evaluate(model, data: Encoded, batch_size: int = 64, dtype: str = "fp32", progress=False) -> dict:
    """Classification metrics of ``model`` on labelled ``data`` (over all of its labels)."""
    pred = scores_of(model, data, batch_size, dtype, progress).argmax(-1).tolist()
    return classification_metrics(pred, data.labels, len(model.label_names))


def remove_checkpoint(directory: str) -> None:
    """Delete ``directory/checkpoint`` (and a ``.old`` left by a kill): once the adapter is saved, it is only needed
    to resume an interrupted run."""
    for p in ("checkpoint", "checkpoint.old", "checkpoint.tmp"):
        shutil.rmtree(os.path.join(directory, p), ignore_errors=True)


def _save_checkpoint(path: str, model, opt, sched, state: dict, gen=None) -> None:
    """Write ``path`` atomically: a fresh directory renamed over the old one. A failure (a full disk) removes the
    partial directory and keeps the previous checkpoint; a kill between the two renames leaves ``path.old``, which
    :func:`_checkpoint_dir` takes back."""
    tmp = path + ".tmp"
    old = path + ".old"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        os.makedirs(tmp)
        model.save_pretrained(tmp)
        blob = {"optimizer": opt.state_dict(), "scheduler": sched.state_dict(), "state": state,
                "torch_rng": torch.get_rng_state(), "generator": None if gen is None else gen.get_state()}
        buf = io.BytesIO()
        torch.save(blob, buf)
        atomic_write_files({os.path.join(tmp, "trainer_state.pt"): buf.getvalue()})
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(e, (OSError, UserError)):
            why = getattr(e, "reason", None) or getattr(e, "strerror", None) or e
            raise UserError(f"could not write the checkpoint ({why}); the previous checkpoint, if any, is "
                            "kept, and --resume continues from it", path) from None
        raise
    if os.path.isdir(path):
        shutil.rmtree(old, ignore_errors=True)
        os.replace(path, old)
    os.replace(tmp, path)
    shutil.rmtree(old, ignore_errors=True)


def _checkpoint_dir(path: str):
    """The checkpoint to resume from: ``path``, or ``path.old`` when a kill came between the renames of
    :func:`_save_checkpoint` (it is moved back); None when there is none."""
    if not os.path.isdir(path) and os.path.isfile(os.path.join(path + ".old", "trainer_state.pt")):
        os.replace(path + ".old", path)
    return path if os.path.isfile(os.path.join(path, "trainer_state.pt")) else None


def fit(model, train: Encoded, val: Encoded, cfg: TrainConfig, checkpoint_dir: Optional[str] = None,
        resume: bool = False, progress: bool = True) -> dict:
    """Train ``model`` (an :class:`~ltuning.model.LTuningModel`) on ``train`` in place; the best adapter (on
    ``val``) is loaded back at the end. ``checkpoint_dir``: checkpoints go to ``checkpoint_dir/checkpoint`` at every
    validation (``resume``: continue from there). Returns a history dict (evaluations, best step, throughput)."""
    if cfg.lr is None:
        cfg = replace(cfg, lr=model.method.default_lr)
    torch.manual_seed(cfg.seed)
    if not cfg.pack:
        model.pack_inputs = False
    shards = distributed.shard_frozen_base(model) if cfg.fsdp else None  # before the optimizer and the device
    if cfg.gradient_checkpointing:
        model.base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    device = model.head.weight.device
    pad = model.tokenizer.pad_token_id
    lengths = [len(x) for x in train.input_ids]
    steps_per_epoch = math.ceil(len(train) / cfg.batch_size)
    total = max(1, int(round(steps_per_epoch * cfg.epochs)))
    if cfg.max_steps:
        total = min(total, cfg.max_steps)
    eval_every = cfg.eval_every or max(1, min(steps_per_epoch, total // 8 or 1))
    opt = make_optimizer(param_groups(model, cfg), cfg.lr)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(total, int(cfg.warmup_ratio * total), cfg.schedule))
    state = {"step": 0, "best": None, "best_step": 0, "evals": [], "bad_evals": 0, "examples": 0,
             "train_seconds": 0.0}
    best_state = None
    ckpt = os.path.join(checkpoint_dir, "checkpoint") if checkpoint_dir else None
    gen = torch.Generator().manual_seed(cfg.seed)
    if resume and ckpt and _checkpoint_dir(ckpt):
        from .io import WEIGHTS_NAME
        from safetensors.torch import load_file
        model.load_state_dict(load_file(os.path.join(ckpt, WEIGHTS_NAME)), strict=False)
        blob = torch.load(os.path.join(ckpt, "trainer_state.pt"), weights_only=False)
        opt.load_state_dict(blob["optimizer"])
        sched.load_state_dict(blob["scheduler"])
        state = blob["state"]
        torch.set_rng_state(blob["torch_rng"])
        if blob.get("generator") is not None:  # the pairwise objective's negatives continue where they were
            gen.set_state(blob["generator"])
        else:  # a checkpoint of an earlier version
            gen.manual_seed(cfg.seed + state["step"])
        best_state = state.pop("best_state", None)
    features = val_features = None
    if cfg.cache_features and model.features_are_frozen:  # one pass of the frozen encoder, then head steps
        t0 = time.perf_counter()
        features = pooled_features(model, train.input_ids, cfg.eval_batch_size, cfg.dtype)
        state["train_seconds"] += time.perf_counter() - t0  # the features' cost counts as training time
        val_features = pooled_features(model, val.input_ids, cfg.eval_batch_size, cfg.dtype)
        model.train()
    ddp = distributed.wrap_trainables(model)  # torchrun: DDP over the trainables only (see ltuning.distributed)
    progress = progress and distributed.is_main()
    bar = tqdm(total=total, initial=state["step"], desc="train", disable=not progress, dynamic_ncols=True)
    stop = False
    while state["step"] < total and not stop:
        epoch, skip = divmod(state["step"], steps_per_epoch)
        batches = length_grouped_batches(lengths, cfg.batch_size, random.Random(cfg.seed * 1000 + epoch))
        for b in batches[skip:]:
            t0 = time.perf_counter()
            local, weight = distributed.local_slice(b) if ddp is not None else (b, 1.0)

            def batch_loss(local=local, weight=weight):
                if features is not None:
                    lab = torch.tensor([train.labels[i] for i in local], device=device)
                    loss = F.cross_entropy(model.head_scores(features[local].to(device)), lab)
                else:
                    batch = {k: v.to(device) for k, v in train.batch(local, pad).items()}
                    with autocast(cfg.dtype):
                        loss, _ = model.loss(**batch, generator=gen)
                return loss if weight == 1.0 else loss * weight

            loss = ddp(batch_loss) if ddp is not None else batch_loss()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if cfg.max_grad_norm:
                torch.nn.utils.clip_grad_norm_(model.trainable_parameters(), cfg.max_grad_norm)
            opt.step()
            sched.step()
            state["train_seconds"] += time.perf_counter() - t0
            state["examples"] += len(b)
            state["step"] += 1
            bar.update(1)
            bar.set_postfix(loss=f"{loss.item():.4f}", lr=f"{sched.get_last_lr()[0]:.2e}")
            if state["step"] % eval_every == 0 or state["step"] == total:
                if val_features is not None:
                    with torch.no_grad():
                        pred = model.head_scores(val_features.to(device)).argmax(-1).tolist()
                    m = classification_metrics(pred, val.labels, len(model.label_names))
                else:
                    m = evaluate(model, val, cfg.eval_batch_size, cfg.dtype)
                model.train()
                m["step"] = state["step"]
                state["evals"].append(m)
                score = m[cfg.select_metric]
                if state["best"] is None or score > state["best"]:
                    state.update(best=score, best_step=state["step"], bad_evals=0)
                    best_state = {k: v.clone() for k, v in model.adapter_state_dict().items()}
                else:
                    state["bad_evals"] += 1
                if progress:
                    bar.write(f"step {state['step']}: val {cfg.select_metric} {score:.4f} (best {state['best']:.4f} "
                               f"@ {state['best_step']})")
                if ckpt and distributed.is_main():
                    _save_checkpoint(ckpt, model, opt, sched, {**state, "best_state": best_state}, gen)
                if cfg.patience is not None and state["bad_evals"] > cfg.patience:
                    stop = True
            if state["step"] >= total or stop:
                break
    bar.close()
    if best_state is not None:
        model.load_state_dict(best_state, strict=False)
    model.eval()
    return {
        "train_config": asdict(cfg), "steps": state["step"], "best_step": state["best_step"],
        "best_val": state["best"], "evals": state["evals"],
        "train_examples_per_s": state["examples"] / max(state["train_seconds"], 1e-9),
        "train_seconds": state["train_seconds"],
        **({"fsdp_frozen_parameters": shards} if shards is not None else {}),
    }
