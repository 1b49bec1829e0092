"""The serving engine and streamed ``ltuning classify`` on real MiniLM with tiny adapters trained here."""
from __future__ import annotations

import json
import os

import pytest
import torch

from ltuning.cli import main
from ltuning.serving.engine import Engine
from serving_helpers import TEXTS, train_tiny, write_jsonl


@pytest.fixture(scope="module")
def adapters(tmp_path_factory, minilm):
    from ltuning.models import load_base
    tmp = tmp_path_factory.mktemp("adapters")
    base, tok = load_base("minilm-l6")
    refs = {m: train_tiny(m, str(tmp / m), base, tok) for m in ("lt-prefix", "lora")}
    return tmp, refs


def test_engine_single_and_shared_base_match_the_classifier(adapters):
    tmp, refs = adapters
    for m in refs:
        e = Engine({m: str(tmp / m)}, dtype="fp32", max_batch_tokens=64, max_batch_rows=8)
        s = torch.tensor([[v for v in d.values()] for _, d in e.classify(TEXTS)])
        assert torch.allclose(s, refs[m], rtol=1e-4, atol=1e-5), m
    # both on one base: LoRA's hooks are attached only while its batches run
    e = Engine({m: str(tmp / m) for m in refs}, dtype="fp32")
    for _ in range(2):
        for m in refs:
            s = torch.tensor([[v for v in d.values()] for _, d in e.classify(TEXTS, m)])
            assert torch.allclose(s, refs[m], rtol=1e-4, atol=1e-5), m


def test_prefix_kv_is_computed_once_and_recomputed_after_a_change(adapters):
    tmp, _ = adapters
    e = Engine({"a": str(tmp / "lt-prefix")}, dtype="fp32")
    model = e.adapters["a"].model
    calls = []
    orig = model.method.prefix
    model.method.prefix = lambda: (calls.append(1), orig())[1]
    before = e.classify(TEXTS[:3])
    e.classify(TEXTS[3:])
    assert len(calls) == 1
    with torch.no_grad():
        next(model.method.parameters()).add_(0.5)
    after = e.classify(TEXTS[:3])
    assert len(calls) == 2 and after != before
    model.train()
    with torch.no_grad():
        model(*[torch.ones(1, 3, dtype=torch.long)] * 2)  # training mode: never cached
    assert len(calls) == 3


def test_int8_engine_runs_and_stays_close(adapters):
    tmp, refs = adapters
    e = Engine({"a": str(tmp / "lora")}, quantize="int8")
    assert e.dtype == "fp32" and e.quantize == "int8"
    s = torch.tensor([[v for v in d.values()] for _, d in e.classify(TEXTS)])
    assert (s - refs["lora"]).abs().max() < 0.5  # int8 error, not garbage
    from ltuning.serving.cpu import SmoothedLinear
    wrapped = [m for m in e.base.modules() if isinstance(m, SmoothedLinear)]  # smoothed on the calibration texts
    assert len(wrapped) >= 36  # every per-token Linear of the 6 layers (and the pooler if the model runs it)
    q8 = [m.linear for m in wrapped if not m.keep_full_precision]
    assert len(q8) >= 30 and all("quantized" in type(q).__module__ for q in q8)
    assert all(q.weight().qscheme() == torch.per_channel_affine for q in q8)
    assert all(type(m.linear) is torch.nn.Linear for m in wrapped if m.keep_full_precision)
    # several adapters: LoRA's detached hooks must point at the modules now in the base, not the replaced Linears
    e = Engine({m: str(tmp / m) for m in refs}, quantize="int8")
    live = {id(m) for m in e.base.modules()}
    entries = [m for es in e.hooks.entries.values() for m, *_ in es]
    assert entries and all(id(m) in live for m in entries)
    s = torch.tensor([[v for v in d.values()] for _, d in e.classify(TEXTS, "lora")])
    assert (s - refs["lora"]).abs().max() < 0.5
    e = Engine({"a": str(tmp / "lt-prefix")}, dtype="bf16")  # bf16 base + autocast, fp32 scores
    assert next(e.base.parameters()).dtype == torch.bfloat16
    s = torch.tensor([[v for v in d.values()] for _, d in e.classify(TEXTS)])
    assert (s - refs["lt-prefix"]).abs().max() < 0.25


def test_stream_classify_jsonl_csv_resume_and_multi_adapter(adapters, tmp_path, capsys):
    tmp, refs = adapters
    rows = [{"text": t, "id": i} for i, t in enumerate(TEXTS * 3)]
    inp, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    write_jsonl(inp, rows)
    ad = str(tmp / "lt-prefix")
    assert main(["classify", "--adapter", ad, "--input", str(inp), "--output", str(out), "--chunk-size", "5",
                 "--dtype", "fp32", "--quiet"]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["rows"] == len(rows) and summary["examples_per_s"] > 0 and summary["seconds"] > 0
    got = [json.loads(x) for x in out.read_text().splitlines()]
    assert [g["id"] for g in got] == list(range(len(rows)))
    want = refs["lt-prefix"].repeat(3, 1)
    s = torch.tensor([[g["scores"]["negative"], g["scores"]["positive"]] for g in got])
    assert torch.allclose(s, want, rtol=1e-4, atol=1e-5)
    assert not os.path.exists(str(out) + ".partial")

    # resume: an interrupted run left 7 complete lines and a torn 8th in OUT.partial
    full = out.read_text().splitlines(keepends=True)
    out.unlink()
    partial = tmp_path / "out.jsonl.partial"
    partial.write_text("".join(full[:7]) + full[7][:10])
    assert main(["classify", "--adapter", ad, "--input", str(inp), "--output", str(out), "--resume",
                 "--dtype", "fp32", "--quiet"]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["resumed_rows"] == 7 and summary["classified"] == len(rows) - 7
    assert [json.loads(x)["id"] for x in out.read_text().splitlines()] == list(range(len(rows)))

    # CSV in, two adapters, a per-record adapter field
    csv_in = tmp_path / "in.csv"
    csv_in.write_text("text,adapter\n" + "".join(f"\"{t}\",{'a' if i % 2 else 'b'}\n" for i, t in enumerate(TEXTS)))
    assert main(["classify", "--adapter", f"a={tmp / 'lt-prefix'}", "--adapter", f"b={tmp / 'lora'}",
                 "--input", str(csv_in), "--output", str(out), "--dtype", "fp32", "--quiet"]) == 0
    got = [json.loads(x) for x in out.read_text().splitlines()]
    for i, g in enumerate(got):
        ref = refs["lt-prefix" if i % 2 else "lora"][i]
        assert torch.allclose(torch.tensor([g["scores"]["negative"], g["scores"]["positive"]]), ref,
                              rtol=1e-4, atol=1e-5)


def test_stream_classify_bad_inputs_one_line_exit_2(adapters, tmp_path, capsys):
    tmp, _ = adapters
    ad = str(tmp / "lt-prefix")
    inp, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    inp.write_text('{"text": "fine"}\n{"txt": "bad"}\n')
    cases = [
        (["--input", str(inp), "--output", str(out)], "in.jsonl:2"),
        (["--input", str(tmp_path / "missing.jsonl"), "--output", str(out)], "missing.jsonl"),
        (["--input", str(inp), "--output", str(tmp_path / "no" / "out.jsonl")], "does not exist"),
        (["--input", str(inp), "--output", str(out), "--max-batch-tokens", "0"], "--max-batch-tokens"),
    ]
    for args, needle in cases:
        assert main(["classify", "--adapter", ad, "--dtype", "fp32", "--quiet", *args]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert needle in err[-1] and "Traceback" not in "\n".join(err)
        assert not out.exists()
    assert main(["classify", "--adapter", str(tmp_path / "nowhere"), "--input", str(inp), "--output",
                 str(out)]) == 2
    assert "nowhere" in capsys.readouterr().err
