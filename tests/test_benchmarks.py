"""Smoke tests of the benchmark scripts (the CI run of ``benchmarks/accuracy.py --quick``)."""
import importlib.util
import json
import os

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _load(name):
    spec = importlib.util.spec_from_file_location(name, os.path.join(ROOT, "benchmarks", f"{name}.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_accuracy_quick_smoke(tmp_path, minilm, sst2_dir):
    """--quick: MiniLM, SST-2, 1 seed, 300 training examples, 300 dev examples, three methods; writes the JSON,
    the markdown table and the chart, and resumes (a second call trains nothing)."""
    acc = _load("accuracy")
    out = tmp_path / "quick.json"
    args = ["--quick", "--out", str(out), "--data", os.path.dirname(sst2_dir)]
    assert acc.main(args) == 0
    state = json.loads(out.read_text())
    runs = state["runs"]
    assert sorted(r["method"] for r in runs) == ["linear-probe", "lt-prefix", "prefix"]
    for r in runs:
        assert r["task"] == "sst2" and r["dev_examples"] == 300 and r["train_examples"] > 0
        assert 0.0 <= r["accuracy"] <= 1.0 and r["trainable_parameters"] > 0 and r["train_examples_per_s"] > 0
    # every method must beat the majority class of the 300-example dev sample by a margin (SST-2 dev ~51 % positive)
    assert min(r["accuracy"] for r in runs) > 0.6, [(r["method"], r["accuracy"]) for r in runs]
    md = (tmp_path / "quick.md").read_text()
    assert "| lt-prefix |" in md and (tmp_path / "quick.png").stat().st_size > 1000
    wall = state["wall_seconds_this_invocation"]
    assert acc.main(args) == 0
    again = json.loads(out.read_text())
    assert len(again["runs"]) == 3 and again["wall_seconds_this_invocation"] < wall
