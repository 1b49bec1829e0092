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


def test_method_variant_specs():
    """The accuracy table's row syntax: method, options joined by +, label texts separated by |."""
    acc = _load("accuracy")
    assert acc.parse_method("lt-prefix") == ("lt-prefix", {})
    assert acc.parse_method("lt-prefix:variant=kv+num_negatives=2+lr=1e-3") == (
        "lt-prefix", {"variant": "kv", "num_negatives": 2, "lr": 1e-3})
    assert acc.parse_method("lt-prompt:label_texts=Class A.|Class B.") == (
        "lt-prompt", {"label_texts": ["Class A.", "Class B."]})


def test_multitask_report_from_finished_runs(tmp_path):
    """benchmarks/multitask.py --report-only collects finished runs (per task and multi-task metrics files)
    into the JSON, the Markdown table (mean ± std over seeds) and the chart, and skips unfinished settings."""
    mt = _load("multitask")
    tasks = ["sst2", "rte"]
    for seed, acc in ((0, 0.7), (1, 0.8)):
        for out, method, ts in mt.runs_of("cgc-lora", tasks, str(tmp_path), seed) + \
                mt.runs_of("lora-per-task", tasks, str(tmp_path), seed):
            os.makedirs(out)
            m = {"accuracy": acc, "mcc": 0.1, "trainable_parameters": 10, "wall_seconds": 5.0,
                 "per_task": {t: {"accuracy": acc, "mcc": 0.1} for t in ts}}
            (open(os.path.join(out, "metrics.json"), "w")).write(json.dumps(m))
    out = tmp_path / "mt.json"
    mt.main(["--tasks", ",".join(tasks), "--seeds", "0,1", "--work", str(tmp_path), "--out", str(out),
             "--report-only"])
    res = json.loads(out.read_text())["results"]
    assert set(res) == {"cgc-lora", "lora-per-task"}  # shared-lora never ran
    assert res["lora-per-task"]["1"]["trainable_parameters"] == 20
    md = (tmp_path / "mt.md").read_text()
    assert "| cgc-lora | 75.0 ± 7.1 | 75.0 ± 7.1 | 75.0 ± 7.1 |" in md
