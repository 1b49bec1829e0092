"""FSDP2 over the frozen base (``ltuning train --fsdp``) with 2 CPU processes (gloo), one torchrun launch of
``fsdp_worker.py``:

* the CLI (MiniLM, LT-prefix, the configuration of ``test_distributed.py``): the adapter equals the one-process
  adapter within relative 1e-5 (fp32), and each rank stores its half of every layer weight plus the replicated
  embeddings (the counts in ``metrics.json``);
* in process (tiny Llama LT-prompt with gradient checkpointing: the prompt bank's K/V captured from inside the
  sharded layers every step; tiny BERT LoRA: hooks on Linears inside the sharded layers): the FSDP adapter is
  bit-identical to plain data parallel (DDP over the trainables), and every local shard is the rank's rows of the
  full weight;
* ``--fsdp`` outside torchrun or with a quantized base: one line, exit status 2, before any model loads.
"""
from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys

import pytest

from testutil import rel_err
from tiny_bert import make_tiny_bert, make_tiny_llama, write_data

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.abspath(os.path.join(HERE, "..", ".."))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_fsdp_two_processes_same_adapter_half_the_layers_each(minilm, sst2_dir, tmp_path):
    from safetensors.torch import load_file

    from ltuning.cli import main
    work = tmp_path
    make_tiny_llama(str(work / "llama"), layers=4)
    make_tiny_bert(str(work / "bert"))
    write_data(str(work / "data"))
    common = ["train", "--model", "minilm-l6", "--method", "lt-prefix", "--data", sst2_dir,
              "--max-train-examples", "23", "--max-dev-examples", "6", "--epochs", "1", "--batch-size", "3",
              "--max-length", "24", "--eval-every", "3", "--quiet", "--seed", "3"]
    one, two = work / "one", work / "two"
    import torch
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the ranks run one thread each: the same reduction order inside each matrix product
    try:
        assert main([*common, "--out", str(one)]) == 0
    finally:
        torch.set_num_threads(threads)
    env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""), OMP_NUM_THREADS="1")
    env.pop("WORLD_SIZE", None)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-addr", "127.0.0.1",
           "--master-port", str(_free_port()), os.path.join(HERE, "fsdp_worker.py"), str(work),
           *common, "--out", str(two), "--fsdp"]
    p = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
    (work / "torchrun.log").write_text(p.stdout + p.stderr)
    assert p.returncode == 0, p.stderr[-3000:]
    assert len([ln for ln in p.stdout.splitlines() if ln.startswith("{")]) == 1  # rank 0 alone prints

    # the CLI: same adapter as one process (head.bias: zero gradient under the listwise loss, see
    # test_distributed.py), same steps and model selection
    a, b = load_file(str(one / "adapter.safetensors")), load_file(str(two / "adapter.safetensors"))
    assert a.keys() == b.keys()
    trained = [k for k in a if a[k].is_floating_point() and k != "head.bias"]
    assert len(trained) >= 5
    for k in trained:
        assert rel_err(b[k], a[k]) < 1e-5, f"{k}: {rel_err(b[k], a[k])}"
    m1, m2 = json.loads((one / "metrics.json").read_text()), json.loads((two / "metrics.json").read_text())
    assert m1["steps"] == m2["steps"] == 7 and m1["best_step"] == m2["best_step"]
    assert m2["train_config"]["fsdp"] is True and "fsdp_frozen_parameters" not in m1
    _check_halves(m2["fsdp_frozen_parameters"], layers_fraction=0.4)

    # in process: FSDP == plain data parallel bit for bit; local shards = the rank's rows
    cases = json.loads((work / "fsdp_cases.json").read_text())
    assert set(cases) == {"llama-lt-prompt-ckpt", "bert-lora"}
    for name, c in cases.items():
        assert c["local_rows_ok"], name
        assert all(v == 0.0 for v in c["fsdp_vs_ddp"].values()), (name, c["fsdp_vs_ddp"])
        assert any(k.startswith("method.") for k in c["fsdp_vs_ddp"]), name
        _check_halves(c["frozen"], layers_fraction=0.6)
    # the tiny Llama's layers hold 92 % of its weights: each rank stores 54 % of the frozen base
    frozen = cases["llama-lt-prompt-ckpt"]["frozen"]
    assert max(frozen["per_rank"]) / frozen["total"] < 0.56


def _check_halves(f: dict, layers_fraction: float) -> None:
    """Rank r stores the replicated rest (total - sharded) and half of the sharded layer weights."""
    total, sharded, per_rank = f["total"], f["sharded_total"], f["per_rank"]
    assert len(per_rank) == 2 and sharded >= layers_fraction * total, f
    assert sum(n - (total - sharded) for n in per_rank) == sharded, f  # the shards partition the layers
    assert all(abs(n - (total - sharded) - sharded / 2) <= 0.01 * sharded for n in per_rank), f


def _args(**kw):
    base = dict(fsdp=True, quantize="none", epochs=1, batch_size=2, max_length=8, max_train_examples=None,
                max_dev_examples=None, max_steps=None, lr=None, eval_every=None, val_fraction=0.1, label_text=[],
                out="unused", model="unused", data="unused")
    return argparse.Namespace(**{**base, **kw})


def test_fsdp_needs_torchrun_and_a_full_precision_base(tmp_path, capsys, monkeypatch):
    from ltuning import preflight
    from ltuning.cli import main
    from ltuning.errors import UserError
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    data = write_data(str(tmp_path / "data"), n_train=10, n_dev=4)
    model = make_tiny_bert(str(tmp_path / "bert"))
    capsys.readouterr()
    rc = main(["train", "--model", model, "--method", "lt-prefix", "--data", data, "--out", str(tmp_path / "o"),
               "--fsdp", "--quiet"])
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert rc == 2 and len(lines) == 1 and "Traceback" not in err, err
    assert lines[0].startswith("ltuning") and "--fsdp" in lines[0] and "torchrun" in lines[0], lines[0]
    assert not (tmp_path / "o").exists()
    monkeypatch.setenv("WORLD_SIZE", "2")  # under torchrun, but a quantized base
    with pytest.raises(UserError, match="--fsdp.*quantized"):
        preflight._check_fsdp(_args(quantize="nf4"))
    preflight._check_fsdp(_args())  # 2 processes, full precision: accepted
    # the library refuses too (Classifier.fit in one process)
    from ltuning.classifier import Classifier
    from ltuning.data import load_split
    with pytest.raises(UserError, match="--fsdp.*torchrun"):
        Classifier(model, "lt-prefix").fit(load_split(data, "train"), progress=False, fsdp=True, max_steps=1)
