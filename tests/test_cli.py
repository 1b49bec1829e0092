"""The command line: train / eval / classify end to end, and bad input, one test per row of the README's table:
exit status 2, ONE line on stderr naming the file (and line) and what was expected, no traceback, no partial output
file, and the check runs before the model is loaded. In-process (``ltuning.cli.main``) except a few real
subprocesses that prove "no traceback, exit 2"."""
from __future__ import annotations

import errno
import json
import os
import subprocess
import sys
import time

import pytest
import torch

import ltuning.classifier
import ltuning.model
from ltuning import outputs
from ltuning.cli import main
from ltuning.data import load_split
from tiny_bert import make_tiny_bert, write_data

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """Two different tiny random BERTs (another seed = other weights, same config)."""
    d = tmp_path_factory.mktemp("tiny")
    return make_tiny_bert(str(d / "a"), seed=0), make_tiny_bert(str(d / "b"), seed=1)


@pytest.fixture(scope="module")
def adapter(tiny, tmp_path_factory):
    """A trained lt-prefix adapter on tiny model a (2 steps) and its data."""
    d = tmp_path_factory.mktemp("adapter")
    data = write_data(str(d / "data"))
    out = str(d / "out")
    assert main(["train", "--model", tiny[0], "--method", "lt-prefix", "--data", data, "--out", out, "--quiet",
                 "--max-steps", "2", "--batch-size", "8"]) == 0
    return out, data


@pytest.fixture
def no_model_load(monkeypatch):
    """Fail the test if a command loads a model: the check must come before."""
    def boom(*a, **k):
        raise AssertionError("the model was loaded before the bad input was reported")
    monkeypatch.setattr(ltuning.classifier, "load_base", boom)
    monkeypatch.setattr(ltuning.model, "load_base", boom)


def one_line(capsys, rc, *fragments):
    """rc == 2, exactly one line on stderr, starting 'ltuning', holding every fragment; returns it."""
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert rc == 2, err
    assert len(lines) == 1 and "Traceback" not in err, err
    assert lines[0].startswith("ltuning"), lines[0]
    for f in fragments:
        assert f in lines[0], (f, lines[0])
    return lines[0]


def train(data, out, model="minilm-l6", method="lt-prefix", *extra):
    return main(["train", "--model", model, "--method", method, "--data", str(data), "--out", str(out), "--quiet",
                 *extra])


def data_dir(tmp_path, train_lines, dev_lines=None, ext="jsonl"):
    d = tmp_path / "data"
    d.mkdir(exist_ok=True)
    enc = lambda x: x if isinstance(x, bytes) else (json.dumps(x) if isinstance(x, dict) else x).encode() + b"\n"
    (d / f"train.{ext}").write_bytes(b"".join(enc(x) for x in train_lines))
    dev = dev_lines if dev_lines is not None else [{"text": "good film", "label": "positive"}]
    (d / f"dev.{ext}").write_bytes(b"".join(enc(x) for x in dev))
    return d


GOOD = [{"text": "good film", "label": "positive"}, {"text": "bad film", "label": "negative"}]


def no_files_in(directory):
    return not os.path.exists(directory) or not any(f for _, _, fs in os.walk(directory) for f in fs)


# ---------------------------------------------------------------------------------------------------- end to end
def test_cli_train_eval_classify(minilm, sst2_dir, tmp_path, capsys):
    out = tmp_path / "adapter"
    rc = main(["train", "--model", "minilm-l6", "--method", "lt-prefix", "--data", sst2_dir, "--out", str(out),
               "--max-train-examples", "64", "--max-dev-examples", "32", "--epochs", "1", "--batch-size", "16",
               "--quiet", "--label-text", "positive=The review is positive."])
    assert rc == 0
    metrics = json.loads((out / "metrics.json").read_text())
    for k in ("accuracy", "macro_f1", "train_examples_per_s", "trainable_parameters"):
        assert k in metrics
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert cfg["method_config"]["label_texts"][1] == "The review is positive."
    capsys.readouterr()
    data = tmp_path / "data"
    data.mkdir()
    dev = load_split(sst2_dir, "dev")[:20]
    (data / "dev.jsonl").write_text("".join(json.dumps(r) + "\n" for r in dev))
    assert main(["eval", "--adapter", str(out), "--data", str(data)]) == 0
    last = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    inp, outp = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    inp.write_text("".join(json.dumps({"text": r["text"], "id": i, "gold": r["label"]}) + "\n"
                           for i, r in enumerate(dev)))
    assert main(["classify", "--adapter", str(out), "--input", str(inp), "--output", str(outp)]) == 0
    rows = [json.loads(x) for x in outp.read_text().splitlines()]
    assert [r["id"] for r in rows] == list(range(20))
    assert all(r["prediction"] == max(r["scores"], key=r["scores"].get) and set(r["scores"]) == {"negative", "positive"}
               for r in rows)
    # eval's accuracy is the share of classify's predictions that match the labels, on the same 20 records
    assert last["n"] == 20 and last["accuracy"] == sum(r["prediction"] == r["gold"] for r in rows) / 20


def test_cli_clear_error_for_missing_data(tmp_path, capsys):
    rc = main(["train", "--model", "minilm-l6", "--method", "prefix", "--data", str(tmp_path), "--out",
               str(tmp_path / "o")])
    assert rc == 2
    assert "expected train.jsonl" in capsys.readouterr().err


def test_stratify_validation_cli_switch():
    """``--stratify-validation`` is a switch of ``ltuning train`` (single- and multi-task share the parser)."""
    from ltuning.cli import build_parser

    p = build_parser()
    a = p.parse_args(["train", "--model", "m", "--method", "lora", "--data", "d", "--out", "o", "--stratify-validation"])
    assert a.stratify_validation is True
    assert p.parse_args(["train", "--model", "m", "--method", "lora", "--data", "d", "--out", "o"]).stratify_validation is False


# ---------------------------------------------------------------------------------------------------- data files
def test_missing_and_empty_files(tmp_path, capsys, no_model_load):
    (tmp_path / "empty").mkdir()
    one_line(capsys, train(tmp_path / "empty", tmp_path / "o"), "empty: expected train.jsonl")
    d = data_dir(tmp_path, [])
    one_line(capsys, train(d, tmp_path / "o"), f"{d / 'train.jsonl'}: no records; expected one JSON object per line")
    (d / "train.jsonl").write_text(json.dumps(GOOD[0]) + "\n" + json.dumps(GOOD[1]) + "\n")
    (d / "dev.jsonl").write_text("\n\n")
    one_line(capsys, train(d, tmp_path / "o"), "dev.jsonl: no records")
    assert no_files_in(tmp_path / "o")


@pytest.mark.parametrize("bad,expect", [
    ({"text": "", "label": "positive"}, "train.jsonl:2: field 'text' is an empty string; expected non-empty text"),
    ({"text": "   ", "label": "positive"}, "train.jsonl:2: field 'text' is an empty string"),
    ({"text": None, "label": "positive"}, "train.jsonl:2: field 'text' is null"),
    ({"premise": "a", "hypothesis": "", "label": "x"}, "train.jsonl:2: field 'hypothesis' is an empty string"),
    ({"sentence": "hi", "label": "positive"}, "train.jsonl:2: expected a 'text' field or 'premise' and 'hypothesis'"),
    ({"text": "hi"}, "train.jsonl:2: expected a 'label' field"),
    ({"text": "hi", "label": [1]}, "train.jsonl:2: label [1] is a list; expected a class name"),
    ('{"text": "hi", "label": ', "train.jsonl:2: invalid JSON"),
    ('["hi", "positive"]', "train.jsonl:2: expected a JSON object, got list"),
])
def test_bad_record_names_file_and_line(tmp_path, capsys, no_model_load, bad, expect):
    d = data_dir(tmp_path, [GOOD[0], bad, GOOD[1]])
    one_line(capsys, train(d, tmp_path / "o"), expect)


def test_invalid_utf8_names_the_line_and_byte(tmp_path, capsys, no_model_load):
    d = data_dir(tmp_path, [GOOD[0], GOOD[1], b'{"text": "caf\xe9", "label": "positive"}\n'])
    one_line(capsys, train(d, tmp_path / "o"), "train.jsonl:3: invalid UTF-8 (byte 0xe9 at column 14)")


def test_a_1mb_line(tmp_path, capsys, no_model_load):
    d = data_dir(tmp_path, [GOOD[0], {"text": "x" * 1_000_000, "label": "positive"}, GOOD[1]])
    one_line(capsys, train(d, tmp_path / "o"), "train.jsonl:2: line of 1,000,033 characters; expected at most 100,000")


def test_csv_with_a_wrong_header_and_a_short_row(tmp_path, capsys, no_model_load):
    d = data_dir(tmp_path, ["sentence,label", "good film,positive"], ["text,label", "good,positive"], ext="csv")
    one_line(capsys, train(d, tmp_path / "o"),
             "train.csv:1: header has columns ['sentence', 'label']; expected 'text' (or 'premise' and 'hypothesis') "
             "and 'label'")
    (d / "train.csv").write_text('text,label\n"good, film",positive\nbad film\n')
    one_line(capsys, train(d, tmp_path / "o"), "train.csv:3: 1 fields; expected 2 as in the header")
    (d / "train.csv").write_text("")
    one_line(capsys, train(d, tmp_path / "o"), "train.csv: empty file")


def test_one_class_only(tmp_path, capsys, no_model_load):
    d = data_dir(tmp_path, [GOOD[0], GOOD[0]])
    one_line(capsys, train(d, tmp_path / "o"), "train.jsonl: every record has the label 'positive'; expected at least "
                                               "two classes")


def test_dev_label_that_train_never_has_is_reported_before_the_model_loads(tmp_path, capsys, no_model_load):
    dev = [GOOD[0], GOOD[1], {"text": "meh", "label": "neutral"}]
    d = data_dir(tmp_path, GOOD, dev)
    one_line(capsys, train(d, tmp_path / "o", "minilm-l6", "lt-prefix", "--max-train-examples", "1"),
             f"{d / 'dev.jsonl'}:3: label 'neutral' never occurs in {d / 'train.jsonl'}; expected one of its labels: "
             "'negative', 'positive'")


def test_multitask_dev_label_is_reported_before_the_model_loads(tmp_path, capsys, no_model_load):
    """Multi-task data (``--data D1,D2``) gets the same label checks on every task's directory, before loading."""
    (tmp_path / "t1").mkdir()
    (tmp_path / "t2").mkdir()
    good = data_dir(tmp_path / "t1", GOOD, GOOD[:2])
    bad = data_dir(tmp_path / "t2", GOOD, [GOOD[0], {"text": "meh", "label": "neutral"}])
    one_line(capsys, train(f"{good},{bad}", tmp_path / "o", "minilm-l6", "cgc-lora"),
             f"{bad / 'dev.jsonl'}:2: label 'neutral' never occurs in {bad / 'train.jsonl'}; expected one of its "
             "labels: 'negative', 'positive'")


def test_label_set_comes_from_the_whole_training_file(tiny, tmp_path, capsys, seed):
    """BANKING77 found: a subsample that missed a class stopped after training. The label set is the whole
    file's: training runs, and the class with no training example is still scored."""
    import random
    rng = random.Random(seed)
    recs = [{"text": rng.choice(["good", "fine", "bad", "awful"]) + " film", "label": lab}
            for lab in ["a"] * 30 + ["b"] * 30 + ["rare"]]
    d = data_dir(tmp_path, recs, [{"text": "good film", "label": "rare"}, {"text": "bad film", "label": "a"}])
    out = tmp_path / "o"
    assert train(d, out, tiny[0], "lt-prefix", "--max-train-examples", "20", "--max-steps", "1") == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["dev_examples"] == 2 and metrics["train_examples"] < 20  # trained on the subsample (minus val)
    assert json.loads((out / "adapter_config.json").read_text())["method_config"]["label_names"] == ["a", "b", "rare"]


def test_a_finished_run_leaves_no_checkpoint_unless_asked(tiny, tmp_path):
    """OUT/checkpoint only serves --resume of an interrupted run: a finished run deletes it once the adapter is
    saved; --keep-checkpoint keeps it (the last step's adapter, not the best step's)."""
    from safetensors.torch import load_file
    data = write_data(str(tmp_path / "data"))
    kept = {}
    for keep in (False, True):
        out = tmp_path / f"out{int(keep)}"
        assert train(data, out, tiny[0], "lt-prefix", "--max-steps", "3", "--eval-every", "1", "--batch-size", "8",
                     *(["--keep-checkpoint"] if keep else [])) == 0
        files = ["adapter.safetensors", "adapter_config.json", "metrics.json"] + (["checkpoint"] if keep else [])
        assert sorted(os.listdir(out)) == sorted(files)
        kept[keep] = load_file(str(out / "adapter.safetensors"))
    assert all(torch.equal(kept[False][k], kept[True][k]) for k in kept[False])  # the same run either way
    assert (tmp_path / "out1" / "checkpoint" / "trainer_state.pt").exists()


# ---------------------------------------------------------------------------------------------------- adapters
def test_truncated_or_corrupted_adapter_weights(adapter, tmp_path, capsys, no_model_load):
    import shutil
    src, data = adapter
    bad = tmp_path / "bad"
    shutil.copytree(src, bad)
    w = bad / "adapter.safetensors"
    w.write_bytes(w.read_bytes()[: w.stat().st_size // 2])  # truncated
    one_line(capsys, main(["eval", "--adapter", str(bad), "--data", data]),
             f"{w}: checksum differs from the one in adapter_config.json: the file is truncated or corrupted")
    with open(os.path.join(src, "adapter.safetensors"), "rb") as f:
        raw = bytearray(f.read())
    raw[len(raw) // 2] ^= 0xFF  # one flipped bit in the tensor data: readable, but not the trained weights
    w.write_bytes(bytes(raw))
    one_line(capsys, main(["eval", "--adapter", str(bad), "--data", data]), "checksum differs")
    cfg = json.loads((bad / "adapter_config.json").read_text())
    del cfg["weights_sha256"]  # an adapter of an earlier version: no checksum, so the safetensors header decides
    (bad / "adapter_config.json").write_text(json.dumps(cfg))
    w.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not a header")
    one_line(capsys, main(["eval", "--adapter", str(bad), "--data", data]), f"{w}: not a readable safetensors file")


@pytest.mark.parametrize("edit,expect", [
    (lambda c: c.pop("method_config"), "adapter_config.json: missing key 'method_config'"),
    (lambda c: c.pop("base_model"), "adapter_config.json: missing key 'base_model'"),
    (lambda c: c["method_config"].update(method="lt-prefx"), "adapter_config.json: unknown method 'lt-prefx'; "
                                                              "expected one of apt, cgc-lora"),
    (lambda c: c["method_config"].pop("label_names"), "adapter_config.json: missing or invalid key "
                                                      "'method_config.label_names'"),
    (None, "adapter_config.json:1: invalid JSON"),
])
def test_adapter_config_missing_key_or_unknown_method(adapter, tmp_path, capsys, no_model_load, edit, expect):
    import shutil
    src, data = adapter
    bad = tmp_path / "bad"
    shutil.copytree(src, bad)
    cfg = json.loads((bad / "adapter_config.json").read_text())
    if edit is None:
        (bad / "adapter_config.json").write_text("{" + json.dumps(cfg)[:40])
    else:
        edit(cfg)
        (bad / "adapter_config.json").write_text(json.dumps(cfg))
    one_line(capsys, main(["eval", "--adapter", str(bad), "--data", data]), expect)
    one_line(capsys, main(["classify", "--adapter", str(bad), "--input", os.path.join(data, "dev.jsonl"),
                           "--output", str(tmp_path / "pred.jsonl")]), expect)
    assert not (tmp_path / "pred.jsonl").exists()


def test_adapter_on_a_different_base_model(adapter, tiny, capsys):
    out, data = adapter
    err = one_line_last(capsys, main(["eval", "--adapter", out, "--data", data, "--model", tiny[1]]))
    assert f"{out}/adapter_config.json: the adapter was trained on base model {tiny[0]!r}, not on {tiny[1]!r}" in err
    assert main(["eval", "--adapter", out, "--data", data, "--model", tiny[0]]) == 0  # the same base: fine
    capsys.readouterr()


def test_base_identity_ignores_the_load_dtype_but_not_the_weights(tiny):
    """An adapter trained in fp32 loads onto the same base loaded in bf16; another base (other weights, same
    config) has another identity."""
    from ltuning.models import load_base
    from ltuning.models.registry import base_identity
    a32, a16, b32 = load_base(tiny[0])[0], load_base(tiny[0], "bf16")[0], load_base(tiny[1])[0]
    assert base_identity(a32) == base_identity(a16) != base_identity(b32)


def one_line_last(capsys, rc):
    """Like one_line, for commands that load a model first (its loading bar may precede the error line)."""
    err = capsys.readouterr().err
    assert rc == 2 and "Traceback" not in err, err
    lines = [ln for ln in err.splitlines() if ln.startswith("ltuning")]
    assert len(lines) == 1, err
    return lines[0]


def test_eval_data_with_a_label_the_adapter_lacks(adapter, tmp_path, capsys, no_model_load):
    out, _ = adapter
    d = data_dir(tmp_path, GOOD, GOOD + [{"text": "meh", "label": "neutral"}])
    one_line(capsys, main(["eval", "--adapter", out, "--data", str(d)]),
             f"{d / 'dev.jsonl'}:3: label 'neutral' is not a label of the adapter")


# ---------------------------------------------------------------------------------------------------- arguments
def test_mistyped_model_fails_fast_offline(tmp_path, capsys, monkeypatch, no_model_load):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    d = data_dir(tmp_path, GOOD)
    t0 = time.perf_counter()
    rc = train(d, tmp_path / "o", "minilm-l7")
    assert time.perf_counter() - t0 < 2.0
    one_line(capsys, rc, "--model: 'minilm-l7' is not a built-in model (smollm2-135m, minilm-l6)",
             "HF_HUB_OFFLINE is set (did you mean 'minilm-l6'?)")
    one_line(capsys, train(d, tmp_path / "o", str(tmp_path)), "is a directory without config.json")
    one_line(capsys, train(d, tmp_path / "o", "no such/../model"), "is not a built-in model")


def test_mistyped_model_with_an_unreachable_hub(tmp_path, capsys, monkeypatch, no_model_load):
    from ltuning.models import registry
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # the discard port: connection refused at once
    assert not registry.hub_reachable()
    one_line(capsys, train(data_dir(tmp_path, GOOD), tmp_path / "o", "someone/no-such-model"),
             "'someone/no-such-model' is not a built-in model", "the Hugging Face hub is unreachable")


def test_mistyped_method_is_one_line(capsys):
    with pytest.raises(SystemExit) as e:
        main(["train", "--model", "minilm-l6", "--method", "lt-prefx", "--data", "d", "--out", "o"])
    one_line(capsys, e.value.code, "argument --method: unknown method 'lt-prefx'; did you mean 'lt-prefix'? expected "
                                   "one of apt, cgc-lora, fl, linear-probe, lora, lt-prefix")


def test_bad_numbers_and_label_texts(tmp_path, capsys, no_model_load):
    d = data_dir(tmp_path, GOOD)
    one_line(capsys, train(d, tmp_path / "o", "minilm-l6", "lt-prefix", "--batch-size", "0"),
             "--batch-size: 0; expected a positive number")
    one_line(capsys, train(d, tmp_path / "o", "minilm-l6", "lt-prefix", "--label-text", "neutral=meh"),
             "--label-text: names ['neutral'], which are not labels of")


# ---------------------------------------------------------------------------------------------------- outputs
def _unwritable_dir(tmp_path):
    """A directory nobody can write in: /sys as root (permission bits do not stop root), else mode 0555."""
    if os.geteuid() == 0:
        return "/sys"
    d = tmp_path / "ro"
    d.mkdir(mode=0o555)
    return str(d)


def test_output_in_a_read_only_or_missing_directory(adapter, tmp_path, capsys, no_model_load):
    ro = _unwritable_dir(tmp_path)
    d = data_dir(tmp_path, GOOD)
    one_line(capsys, train(d, os.path.join(ro, "out")), f"{ro}/out: --out: cannot write in {ro}")
    (tmp_path / "file").write_text("x")
    one_line(capsys, train(d, tmp_path / "file" / "out"), "--out: ", "is a file, so the directory cannot be created")
    out, data = adapter
    inp = os.path.join(data, "dev.jsonl")
    missing = tmp_path / "no" / "such" / "pred.jsonl"
    one_line(capsys, main(["classify", "--adapter", out, "--input", inp, "--output", str(missing)]),
             f"{missing}: --output: the directory {missing.parent} does not exist; expected an existing directory")
    one_line(capsys, main(["classify", "--adapter", out, "--input", inp, "--output", os.path.join(ro, "p.jsonl")]),
             f"--output: cannot write in {ro}")
    assert not missing.parent.exists()


def _disk_full_after(monkeypatch, n_ok, directory=None):
    """The n_ok-th+1 file write (in ``directory``, if given) fills the disk half way through: ENOSPC after writing
    part of the bytes."""
    real = outputs.write_synced
    calls = []

    def write(path, data):
        if directory is not None and os.path.dirname(path) != str(directory):
            return real(path, data)
        calls.append(path)
        if len(calls) > n_ok:
            with open(path, "wb") as f:
                f.write(data[: len(data) // 2])
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), path)
        real(path, data)
    monkeypatch.setattr(outputs, "write_synced", write)
    return calls


def test_disk_full_classify_leaves_no_partial_output(adapter, tmp_path, capsys, monkeypatch):
    out, data = adapter
    pred = tmp_path / "pred.jsonl"
    pred.write_text("previous\n")
    _disk_full_after(monkeypatch, 0)
    rc = main(["classify", "--adapter", out, "--input", os.path.join(data, "dev.jsonl"), "--output", str(pred)])
    one_line_last(capsys, rc)
    assert pred.read_text() == "previous\n" and os.listdir(tmp_path) == ["pred.jsonl"]  # untouched, no temporary


@pytest.mark.parametrize("n_ok", [0, 1, 2])
def test_disk_full_at_the_final_save_leaves_no_partial_adapter(tiny, tmp_path, capsys, monkeypatch, n_ok):
    """adapter.safetensors, adapter_config.json and metrics.json are one group: the disk fills at the 1st, 2nd or
    3rd file, and none of them is written (the checkpoint, written before, stays for --resume)."""
    d = data_dir(tmp_path, GOOD * 8)
    out = tmp_path / "o"
    calls = _disk_full_after(monkeypatch, n_ok, out)
    rc = train(d, out, tiny[0], "lt-prefix", "--max-steps", "1")
    line = one_line_last(capsys, rc)
    assert f"{out}/" in line and "No space left on device" in line and "no output file was written" in line
    assert len(calls) == n_ok + 1
    assert sorted(os.listdir(out)) == ["checkpoint"], os.listdir(out)


def test_disk_full_at_a_checkpoint_keeps_the_previous_one(tiny, tmp_path, capsys, monkeypatch):
    d = data_dir(tmp_path, GOOD * 16)
    out = tmp_path / "o"
    from ltuning import train as training
    real = training._save_checkpoint
    saves = []

    def save(*a):
        saves.append(1)
        if len(saves) == 2:
            _disk_full_after(monkeypatch, 1)  # the 2nd checkpoint: its config file fills the disk
        real(*a)
    monkeypatch.setattr(training, "_save_checkpoint", save)
    rc = train(d, out, tiny[0], "lt-prefix", "--max-steps", "4", "--eval-every", "1", "--batch-size", "4")
    line = one_line_last(capsys, rc)
    assert f"{out}/checkpoint: could not write the checkpoint (No space left on device)" in line
    assert "--resume continues from it" in line
    ckpt = out / "checkpoint"
    assert sorted(os.listdir(out)) == ["checkpoint"] and (ckpt / "trainer_state.pt").exists()
    import torch
    assert torch.load(ckpt / "trainer_state.pt", weights_only=False)["state"]["step"] == 1


def test_disk_full_on_a_real_tiny_tmpfs(adapter, tmp_path, capsys):
    """A real full disk where one can be mounted (root): a 64 KiB tmpfs, classify writes ~150 KB (500 records)."""
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(mnt)], capture_output=True).returncode:
        pytest.skip("cannot mount a tmpfs here (not root); the failing-writer tests above cover this row")
    try:
        out, _ = adapter
        inp = tmp_path / "in.jsonl"
        inp.write_text("".join(json.dumps({"text": "good film was nice " * 8, "id": i}) + "\n" for i in range(500)))
        rc = main(["classify", "--adapter", out, "--input", str(inp), "--output", str(mnt / "pred.jsonl")])
        assert f"{mnt}/pred.jsonl: could not write it (No space left on device)" in one_line_last(capsys, rc)
        assert os.listdir(mnt) == []
    finally:
        subprocess.run(["umount", str(mnt)], check=True)


def test_debug_shows_the_traceback(tmp_path, monkeypatch):
    from ltuning.errors import UserError
    d = data_dir(tmp_path, [GOOD[0], GOOD[0]])
    with pytest.raises(UserError, match="expected at least two classes"):
        main(["train", "--model", "minilm-l6", "--method", "prefix", "--data", str(d), "--out", str(tmp_path / "o"),
              "--debug"])
    monkeypatch.setenv("LTUNING_DEBUG", "1")
    with pytest.raises(UserError):
        main(["train", "--model", "minilm-l6", "--method", "prefix", "--data", str(d), "--out", str(tmp_path / "o")])


# ---------------------------------------------------------------------------------------------------- real processes
@pytest.mark.parametrize("case", ["model", "method", "utf8"])
def test_subprocess_exit_2_one_line_no_traceback(tmp_path, case):
    d = data_dir(tmp_path, [GOOD[0], b'{"text": "\xff", "label": "positive"}\n'] if case == "utf8" else GOOD)
    args = {"model": ["--model", "minilm-l7", "--method", "prefix"],
            "method": ["--model", "minilm-l6", "--method", "lt-prefx"],
            "utf8": ["--model", "minilm-l6", "--method", "prefix"]}[case]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": REPO + os.pathsep + os.environ.get("PYTHONPATH", "")}
    env.pop("LTUNING_DEBUG", None)
    t0 = time.perf_counter()
    p = subprocess.run([sys.executable, "-m", "ltuning", "train", *args, "--data", str(d), "--out",
                        str(tmp_path / "o")], capture_output=True, text=True, env=env, timeout=120)
    wall = time.perf_counter() - t0
    lines = [ln for ln in p.stderr.splitlines() if ln.strip()]
    assert p.returncode == 2 and len(lines) == 1 and "Traceback" not in p.stderr and p.stdout == "", p.stderr
    assert {"model": "'minilm-l7' is not a built-in model", "method": "unknown method 'lt-prefx'",
            "utf8": "train.jsonl:2: invalid UTF-8"}[case] in lines[0]
    assert wall < 60, wall  # the mistyped model used to take 49 s of retries; now it is the imports' time
    assert not (tmp_path / "o").exists()
