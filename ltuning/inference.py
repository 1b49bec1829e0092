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


@torch.inference_mode()
def predict_scores(model, input_ids: list, batch_size: int = 64, dtype: str = "fp32", progress: bool = False):
    """Scores (N, K) float32 for N tokenised inputs (label-conditioned methods: all B x K pairs per batch)."""
    was_training = model.training
    model.eval()
    device = model.head.weight.device
    pad = model.tokenizer.pad_token_id
    out = torch.empty(len(input_ids), len(model.label_names))
    batches = sorted_batches([len(x) for x in input_ids], batch_size)
    for b in tqdm(batches, desc="classify", disable=not progress, leave=False):
        ids, mask, _ = collate([input_ids[i] for i in b], pad)
        with autocast(dtype):
            s = model(ids.to(device), mask.to(device))
        out[torch.tensor(b)] = s.float().cpu()
    model.train(was_training)
    return out
