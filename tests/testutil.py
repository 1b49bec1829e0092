"""Helpers shared by the tests (not fixtures): error measures and gradient capture."""
from __future__ import annotations

import torch


def max_rel(a, r):
    """Largest elementwise error relative to the largest reference element."""
    a, r = a.double(), r.double()
    return ((a - r).abs().max() / r.abs().max().clamp_min(1e-30)).item()


def rel_err(a, b):
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def checkpointing_grads(base, m, loss_fn):
    """The trainable gradients of ``loss_fn()`` (returns a scalar loss) on the patched ``m`` in train mode, without
    and with non-reentrant gradient checkpointing of ``base``."""
    grads = []
    try:
        for ckpt in (False, True):
            if ckpt:
                base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            m.train()
            m.zero_grad()
            loss_fn().backward()
            grads.append(torch.cat([p.grad.flatten() for p in m.trainable_parameters()]))
    finally:
        base.gradient_checkpointing_disable()
        m.eval()
    return grads
