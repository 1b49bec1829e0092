"""``--quantize nf4`` in the serving engine (``ltuning classify`` / ``ltuning serve``): the frozen base loaded through
bitsandbytes NF4 as ``ltuning train --quantize nf4`` loads it; the same predictions as ``Classifier`` on an NF4 base;
combinations that cannot work refused in one line (exit 2). On a tiny random BERT (loads in milliseconds)."""
from __future__ import annotations

import json

import pytest
import torch

from ltuning.cli import main
from tiny_bert import make_tiny_bert, write_data

bnb = pytest.importorskip("bitsandbytes")


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A LoRA and an lt-prefix adapter trained 2 steps on a tiny BERT (full-precision base), and input records."""
    tmp = tmp_path_factory.mktemp("nf4")
    model = make_tiny_bert(str(tmp / "bert"))
    data = str(tmp / "data")
    write_data(data, n_train=24, n_dev=8)
    out = {}
    for m in ("lora", "lt-prefix"):
        out[m] = str(tmp / m)
        assert main(["train", "--model", model, "--method", m, "--data", data, "--out", out[m], "--quiet",
                     "--max-steps", "2", "--batch-size", "8", "--eval-every", "2", "--max-length", "16"]) == 0
    recs = [json.loads(x) for x in open(f"{data}/dev.jsonl")]
    return out, [{"id": i, "text": r["text"], "adapter": m} for i, r in enumerate(recs)
                 for m in ("lora", "lt-prefix")]


def test_classify_nf4_matches_the_classifier_on_an_nf4_base(trained, tmp_path, capsys):
    from ltuning import Classifier
    dirs, recs = trained
    inp, outp = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    inp.write_text("".join(json.dumps(r) + "\n" for r in recs))
    capsys.readouterr()
    assert main(["classify", *[a for m, d in dirs.items() for a in ("--adapter", f"{m}={d}")], "--input", str(inp),
                 "--output", str(outp), "--quantize", "nf4", "--quiet"]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["quantize"] == "nf4" and summary["dtype"] == "fp32"
    rows = [json.loads(x) for x in outp.read_text().splitlines()]
    assert [r["id"] for r in rows] == [r["id"] for r in recs]
    for m, d in dirs.items():
        clf = Classifier.from_pretrained(d, quantize="nf4")
        assert type(clf.model.base.encoder.layer[0].attention.self.query).__name__ == "Linear4bit"
        mine = [r for r in rows if r["adapter"] == m]
        ref = clf.predict_scores([r["text"] for r in mine])
        got = torch.tensor([list(r["scores"].values()) for r in mine])
        assert [r["prediction"] for r in mine] == [clf.label_names[i] for i in ref.argmax(-1).tolist()]
        # (an fp32 base scores these 4e-3 apart; bf16 compute inside the 4-bit Linears rounds per element). LoRA
        # loads first: its hooks must be off the base while lt-prefix recomputes its label cache on the NF4 base
        # (with them on, the one-pass label vectors moved by 2e-4)
        assert ((got - ref).abs().max() / ref.abs().max()).item() < 1e-4, m


def test_engine_nf4_describes_itself_and_keeps_lora_unmerged(trained):
    from ltuning.serving.engine import Engine
    dirs, _ = trained
    e = Engine({"lora": dirs["lora"]}, quantize="nf4")
    assert e.describe()["quantize"] == "nf4" and e.dtype == "fp32" and e.fingerprint.endswith("-nf4")
    assert e.adapters["lora"].model.method._saved_weights is None  # 4-bit weights are not merged into


@pytest.mark.parametrize("extra,needle", [(["--dtype", "bf16"], "--quantize nf4 runs the base in fp32"),
                                          (["--quantize", "nf3"], "--quantize")])
def test_nf4_combinations_that_cannot_work_fail_in_one_line(trained, tmp_path, capsys, extra, needle):
    dirs, recs = trained
    inp = tmp_path / "in.jsonl"
    inp.write_text(json.dumps({"text": "good film"}) + "\n")
    args = ["classify", "--adapter", dirs["lora"], "--input", str(inp), "--output", str(tmp_path / "o.jsonl")]
    if extra[0] != "--quantize":
        args += ["--quantize", "nf4"]
    with pytest.raises(SystemExit) if extra[0] == "--quantize" else _nothing():
        rc = main(args + extra)
        assert rc == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and needle in err[0]


class _nothing:
    def __enter__(self):
        return self

    def __exit__(self, *a):
        return False


def test_adapters_trained_on_nf4_are_served_on_nf4_by_default(trained, tmp_path, capsys):
    """Without --quantize the engine loads the precision the adapter records (as ``ltuning eval`` does)."""
    dirs, recs = trained
    data = tmp_path / "data"
    write_data(str(data), n_train=16, n_dev=4)
    model = json.load(open(f"{dirs['lora']}/adapter_config.json"))["base_model"]
    out = str(tmp_path / "q")
    assert main(["train", "--model", model, "--method", "prefix", "--data", str(data), "--out", out, "--quiet",
                 "--max-steps", "1", "--batch-size", "8", "--eval-every", "1", "--quantize", "nf4"]) == 0
    inp = tmp_path / "in.jsonl"
    inp.write_text(json.dumps({"text": "good film"}) + "\n")
    capsys.readouterr()
    assert main(["classify", "--adapter", out, "--input", str(inp), "--output", str(tmp_path / "o.jsonl")]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["quantize"] == "nf4"
