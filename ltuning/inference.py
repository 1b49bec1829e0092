"""Batch classification: length-sorted batches, no grad, the model's dtype; scores in the input order."""
from __future__ import annotations

import contextlib

import torch
from tqdm.auto import tqdm

from .data import collate, sorted_batches


def autocast(dtype: str):
    if dtype in ("bf16", "fp16"):
        return torch.autocast("cpu" if not torch.cuda.is_available() else "cuda",
                              dtype=torch.bfloat16 if dtype == "bf16" else torch.float16)
    return contextlib.nullcontext()


# The fixed cost of one forward pass in tokens (reading every weight once), by device type: the batches of
# ``predict_scores`` trade padding against it. CPU: SmolLM2-135M on one Xeon core, fp32, a batch of 1 x 8 tokens took
# 182 ms and 8 x 128 tokens 3.55 ms per token, i.e. ~43 tokens of overhead (``OMP_NUM_THREADS=1 python
# benchmarks/profile_step.py lt-prompt rte`` prints it). GPUs: unmeasured here, so plain chunks of ``batch_size`` rows (None).
OVERHEAD_TOKENS = {"cpu": 48}


@torch.inference_mode()
def predict_scores(model, input_ids: list, batch_size: int = 64, dtype: str = "fp32", progress: bool = False,
                   overhead_tokens: int | str | None = "auto", task_ids: list | None = None):
    """Scores (N, K) float32 for N tokenised inputs (label-conditioned methods: all B x K pairs per batch).

    Batches hold at most ``batch_size`` inputs of similar length: see :func:`ltuning.data.sorted_batches` for
    ``overhead_tokens`` (``"auto"``: :data:`OVERHEAD_TOKENS` of the model's device; None: chunks of ``batch_size``).
    ``task_ids``: the task of each input (multi-task models)."""
    return _map_batches(model, model, len(model.label_names), input_ids, batch_size, dtype, progress, overhead_tokens,
                        task_ids)


@torch.inference_mode()
def pooled_features(model, input_ids: list, batch_size: int = 64, dtype: str = "fp32", progress: bool = False,
                    overhead_tokens: int | str | None = "auto"):
    """The pooled representations (N, d) float32 the head of ``model`` (an ``LTuningModel``) reads, in input order;
    batches as in :func:`predict_scores`."""
    return _map_batches(model, model.encode, model.info.hidden_size, input_ids, batch_size, dtype, progress,
                        overhead_tokens)


def _map_batches(model, fn, width, input_ids, batch_size, dtype, progress, overhead_tokens, task_ids=None):
    """``fn(**batch)`` over length-sorted batches of ``input_ids`` in eval mode: (N, width) float32, input order."""
    was_training = model.training
    model.eval()
    device = model.head.weight.device
    pad = model.tokenizer.pad_token_id
    out = torch.empty(len(input_ids), width)
    if overhead_tokens == "auto":
        overhead_tokens = OVERHEAD_TOKENS.get(device.type)
    batches = sorted_batches([len(x) for x in input_ids], batch_size, overhead_tokens)
    for b in tqdm(batches, desc="classify", disable=not progress, leave=False):
        batch = collate([input_ids[i] for i in b], pad, task_ids=None if task_ids is None else [task_ids[i] for i in b])
        with autocast(dtype):
            s = fn(**{k: v.to(device) for k, v in batch.items()})
        out[torch.tensor(b)] = s.float().cpu()
    model.train(was_training)
    return out
