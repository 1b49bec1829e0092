"""Every method through the command line (method flags, multi-task cgc-lora)."""
import copy
import json
import os
import random

import pytest
import torch

import ltuning
from ltuning.cli import main
from method_helpers import enc, randomize
from testutil import rel_err


@pytest.fixture
def fresh_minilm(minilm, monkeypatch):
    """The CLI loads its own base: hand it a copy of the session MiniLM (no 2nd load, no hooks left behind)."""
    base, tok = minilm

    def load(name, dtype="fp32", quantize=None):
        assert quantize is None, "this fixture hands out the full-precision session MiniLM only"
        return copy.deepcopy(base), tok
    monkeypatch.setattr("ltuning.classifier.load_base", load)
    monkeypatch.setattr("ltuning.tasks.load_base", load)


@pytest.mark.parametrize("method,flags", [
    ("sk-prefix", ["--task-text", "Is this movie review positive or negative?"]),
    ("sk-prompt", ["--projection"]),
    ("lt-prompt", ["--no-scale-to-embeddings"]),
    ("lt-prefix", ["--no-mask-label-padding", "--variant", "kv"]),
    ("apt", ["--num-virtual-tokens", "4"]),
    ("fl", ["--num-units", "8"]),
    ("lora", ["--r", "4", "--lora-alpha", "8", "--stratify-validation"]),
    ("cgc-lora", ["--target-modules", "query,key,value"]),
])
def test_cli_train_every_method(fresh_minilm, sst2_dir, tmp_path, method, flags):
    out = tmp_path / method
    rc = main(["train", "--model", "minilm-l6", "--method", method, "--data", sst2_dir, "--out", str(out),
               "--max-train-examples", "24", "--max-dev-examples", "8", "--max-steps", "1", "--batch-size", "8",
               "--max-length", "32", "--quiet"] + flags)
    assert rc == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["method"] == method and metrics["dev_examples"] == 8 and metrics["trainable_parameters"] > 0
    assert metrics["accuracy"] * 8 == round(metrics["accuracy"] * 8)  # a share of the 8 dev examples
    cfg = json.loads((out / "adapter_config.json").read_text())["method_config"]
    if method == "cgc-lora":
        assert cfg["target_modules"] == ["query", "key", "value"]
    switches = {"sk-prompt": ("projection", True), "lt-prompt": ("scale_to_embeddings", False),
                "lt-prefix": ("mask_label_padding", False)}
    if method in switches:  # --name / --no-name reach the config
        name, value = switches[method]
        assert cfg[name] is value


def test_cli_linear_probe_trains_its_head_at_lr(fresh_minilm, sst2_dir, tmp_path):
    """linear-probe has no parameters but its head: --lr is the head's learning rate (not silently ignored)."""
    from safetensors.torch import load_file
    heads = []
    for lr in ("1e-5", "1e-1"):
        out = tmp_path / lr
        assert main(["train", "--model", "minilm-l6", "--method", "linear-probe", "--data", sst2_dir, "--out", str(out),
                     "--max-train-examples", "24", "--max-dev-examples", "8", "--max-steps", "2", "--batch-size", "8",
                     "--max-length", "32", "--quiet", "--lr", lr, "--patience", "100"]) == 0
        heads.append(load_file(str(out / "adapter.safetensors")))
    assert heads[0].keys() == heads[1].keys()
    assert any(not torch.equal(heads[0][k], heads[1][k]) for k in heads[0])


def test_cli_switch_of_another_method_is_a_clear_error(tmp_path, capsys):
    rc = main(["train", "--model", "minilm-l6", "--method", "prefix", "--data", str(tmp_path), "--out",
               str(tmp_path / "o"), "--no-scale-to-embeddings"])
    assert rc == 2 and "--scale-to-embeddings does not apply to --method prefix" in capsys.readouterr().err


def test_cli_multitask_cgc_lora(fresh_minilm, sst2_dir, tmp_path, capsys):
    """--data DIR1,DIR2: one model, a head per task (SST-2 and CoLA label sets), mixed-task batches."""
    cola = sst2_dir.replace("sst2", "cola")
    out = tmp_path / "mt"
    rc = main(["train", "--model", "minilm-l6", "--method", "cgc-lora", "--data", f"{sst2_dir},{cola}",
               "--out", str(out), "--max-train-examples", "40", "--max-dev-examples", "12", "--max-steps", "3",
               "--batch-size", "16", "--max-length", "32", "--stratify-validation", "--quiet"])
    assert rc == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["tasks"] == ["sst2", "cola"] and set(metrics["per_task"]) == {"sst2", "cola"}
    assert all(metrics["per_task"][t]["n"] == 12 for t in ("sst2", "cola"))
    cfg = json.loads((out / "adapter_config.json").read_text())["method_config"]
    assert cfg["tasks"] == ["sst2", "cola"] and "cola:acceptable" in cfg["label_names"]

    # the saved model evaluates per task (on training's dev sample: its metrics again) and classifies records
    from ltuning.data import load_split
    dirs = []
    for d in (sst2_dir, cola):
        task = os.path.basename(d)
        os.makedirs(tmp_path / "dev" / task)
        dev = random.Random(0).sample(load_split(d, "dev"), 12)  # the CLI's --max-dev-examples sample
        (tmp_path / "dev" / task / "dev.jsonl").write_text("\n".join(json.dumps(r) for r in dev))
        dirs.append(str(tmp_path / "dev" / task))
    capsys.readouterr()
    rc = main(["eval", "--adapter", str(out), "--data", ",".join(dirs), "--batch-size", "8"])
    assert rc == 0
    ev = json.loads(capsys.readouterr().out.splitlines()[-1])
    for t in ("sst2", "cola"):
        assert ev["per_task"][t]["accuracy"] == metrics["per_task"][t]["accuracy"]
        assert ev["per_task"][t]["n"] == 12
    assert abs(ev["accuracy"] - metrics["accuracy"]) < 1e-12
    ev = tmp_path / "classified.jsonl"
    rc = main(["eval", "--adapter", str(out), "--data", cola, "--split", "train", "--task", "sst2"])
    assert rc == 2  # CoLA's labels are not SST-2's: a one-line error, not a crash
    recs = [{"text": "a gripping film", "task": "sst2"}, {"text": "Him went home."}]
    (tmp_path / "in.jsonl").write_text("\n".join(json.dumps(r) for r in recs))
    rc = main(["classify", "--adapter", str(out), "--input", str(tmp_path / "in.jsonl"), "--output", str(ev),
               "--task", "cola"])
    assert rc == 0
    got = [json.loads(x) for x in ev.read_text().splitlines()]
    assert set(got[0]["scores"]) == {"negative", "positive"} and got[0]["prediction"] in got[0]["scores"]
    assert set(got[1]["scores"]) == {"acceptable", "unacceptable"} and got[1]["prediction"] in got[1]["scores"]
