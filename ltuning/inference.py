"""Inference: scores (or pooled features) of token-id lists, in planned batches, no grad, in input order.

The one path every caller takes (evaluation in :mod:`ltuning.train`, ``Classifier.predict``, the serving engine):
:func:`run_batches` pads each batch of ``batches`` (index lists from :func:`ltuning.batching.plan_batches`) on the
right (:func:`ltuning.data.collate`), runs ``model(input_ids, attention_mask) -> (B, K)`` (or
``model.encode(...) -> (B, d)``) under ``torch.inference_mode`` and :func:`autocast`, and scatters the rows back to
the input order as float32 (N, K). Label-conditioned methods score all K labels of an input in that one call.
:func:`predict_scores` / :func:`pooled_features` plan the batches themselves: at most ``batch_size`` inputs each,
sorted by length, split to minimise padded tokens plus :data:`OVERHEAD_TOKENS` per forward on the model's device.
"""
from __future__ import annotations

import contextlib

import torch
from tqdm.auto import tqdm

from .batching import plan_batches
from .data import collate


def autocast(dtype: str):
    """bf16 / fp16 autocast on the current device type for ``dtype`` "bf16" / "fp16"; no-op for "fp32"."""
    if dtype in ("bf16", "fp16"):
        return torch.autocast("cpu" if not torch.cuda.is_available() else "cuda",
                              dtype=torch.bfloat16 if dtype == "bf16" else torch.float16)
    return contextlib.nullcontext()


# The fixed cost of one forward pass in tokens (reading every weight once), by device type, that the batch planner
# trades padding against (``benchmarks/train_step/profile_step.py`` measures it; its record:
# ``benchmarks/results/profile_step_prompt_sst2.json``). GPUs: unmeasured, so plain chunks (None).
OVERHEAD_TOKENS = {"cpu": 48}


def overhead_tokens_of(device: torch.device) -> int | None:
    """:data:`OVERHEAD_TOKENS` of ``device``'s type (None where unmeasured)."""
    return OVERHEAD_TOKENS.get(torch.device(device).type)


@torch.inference_mode()
def run_batches(model, input_ids: list, batches: list, dtype: str = "fp32", progress: bool = False,
                features: bool = False, task_ids: list | None = None) -> torch.Tensor:
    """``model`` (an ``LTuningModel``, in the mode the caller set) over ``batches`` of ``input_ids``: scores (N, K)
    float32, or with ``features`` the pooled representations (N, d) the head reads; rows in input order.
    ``task_ids``: the task of each input (multi-task models; other tasks' label columns are masked)."""
    device = model.head.weight.device
    pad = model.tokenizer.pad_token_id
    fn = model.encode if features else model
    out = torch.empty(len(input_ids), model.info.hidden_size if features else len(model.label_names))
    for b in tqdm(batches, desc="classify", disable=not progress, leave=False):
        batch = collate([input_ids[i] for i in b], pad, task_ids=None if task_ids is None else [task_ids[i] for i in b])
        with autocast(dtype):
            s = fn(**{k: v.to(device) for k, v in batch.items()})
        out[torch.tensor(b)] = s.float().cpu()
    return out


def _in_eval_mode(model, input_ids, batch_size, dtype, progress, overhead_tokens, features, task_ids=None):
    """:func:`run_batches` over planned batches in eval mode (``eval()`` also drops the label-side inference
    cache, see ``LTuningModel.inference_cached``), the model's mode restored after."""
    if overhead_tokens == "auto":
        overhead_tokens = overhead_tokens_of(model.head.weight.device)
    batches = plan_batches([len(x) for x in input_ids], batch_size, overhead_tokens)
    was_training = model.training
    model.eval()
    try:
        return run_batches(model, input_ids, batches, dtype, progress, features, task_ids)
    finally:
        model.train(was_training)


def predict_scores(model, input_ids: list, batch_size: int = 64, dtype: str = "fp32", progress: bool = False,
                   overhead_tokens: int | str | None = "auto", task_ids: list | None = None) -> torch.Tensor:
    """Scores (N, K) float32 for N tokenised inputs, batches of at most ``batch_size`` inputs planned by
    :func:`ltuning.batching.plan_batches` (``overhead_tokens`` "auto": :data:`OVERHEAD_TOKENS` of the model's
    device; None: chunks of ``batch_size``); ``task_ids``: the task of each input (multi-task models)."""
    return _in_eval_mode(model, input_ids, batch_size, dtype, progress, overhead_tokens, False, task_ids)


def pooled_features(model, input_ids: list, batch_size: int = 64, dtype: str = "fp32", progress: bool = False,
                    overhead_tokens: int | str | None = "auto") -> torch.Tensor:
    """The pooled representations (N, d) float32 the head of ``model`` reads, batches as in :func:`predict_scores`."""
    return _in_eval_mode(model, input_ids, batch_size, dtype, progress, overhead_tokens, True)
