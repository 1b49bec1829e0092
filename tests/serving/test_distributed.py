"""torchrun with 2 CPU processes (gloo): the same seed and global batch give the same adapter as one process
(relative 1e-5, fp32), and the streamed ``classify`` shards every chunk over ranks and writes it back in input order."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import torch

from testutil import rel_err
from ltuning.data import load_split

REPO = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run(args, nproc: int, tmp_path, name: str):
    env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""), OMP_NUM_THREADS="1")
    env.pop("WORLD_SIZE", None)
    if nproc > 1:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc), "--master-addr",
               "127.0.0.1", "--master-port", str(_free_port()), "-m", "ltuning", *args]
    else:
        cmd = [sys.executable, "-m", "ltuning", *args]
    p = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
    (tmp_path / f"{name}.log").write_text(p.stdout + p.stderr)
    assert p.returncode == 0, p.stderr[-3000:]
    return p.stdout


def test_torchrun_two_processes_train_same_adapter_and_classify_in_order(minilm, sst2_dir, tmp_path):
    from safetensors.torch import load_file
    # 23 examples -> 19 train + 4 validation; global batch 3 over 2 ranks: slices of 1 and 2 rows (unequal,
    # so the loss weighting matters) and a last batch of 1 row (one rank runs at weight 0)
    common = ["train", "--model", "minilm-l6", "--method", "lt-prefix", "--data", sst2_dir,
              "--max-train-examples", "23", "--max-dev-examples", "6", "--epochs", "1", "--batch-size", "3",
              "--max-length", "24", "--eval-every", "3", "--quiet", "--seed", "3"]
    one, two = tmp_path / "one", tmp_path / "two"
    _run([*common, "--out", str(one)], 1, tmp_path, "one")
    out2 = _run([*common, "--out", str(two)], 2, tmp_path, "two")
    assert len([ln for ln in out2.splitlines() if ln.startswith("{")]) == 1  # rank 0 alone prints the metrics
    a, b = load_file(str(one / "adapter.safetensors")), load_file(str(two / "adapter.safetensors"))
    assert a.keys() == b.keys()
    m1, m2 = json.loads((one / "metrics.json").read_text()), json.loads((two / "metrics.json").read_text())
    assert m1["steps"] == m2["steps"] == 7 and m1["best_step"] == m2["best_step"]
    # head.bias is left out: with the listwise loss over K pair scores its gradient is exactly zero (a constant
    # added to all K scores leaves the softmax unchanged), so AdamW moves it by normalised round-off noise
    trained = [k for k in a if a[k].is_floating_point() and k != "head.bias"]
    assert len(trained) >= 5
    for k in trained:
        assert rel_err(b[k], a[k]) < 1e-5, f"{k}: {rel_err(b[k], a[k])}"
    # classify: 2 ranks, 7 records (odd: the ranks get 4 and 3), output in input order, scores as 1 process
    dev = load_split(sst2_dir, "dev")[:7]
    inp = tmp_path / "in.jsonl"
    inp.write_text("".join(json.dumps({"text": r["text"], "id": i}) + "\n" for i, r in enumerate(dev)))
    _run(["classify", "--adapter", str(one), "--input", str(inp), "--output", str(tmp_path / "c1.jsonl"), "--dtype", "fp32"], 1,
         tmp_path, "c1")
    # chunks of 3 (3, 3, 1 records): every chunk sharded over both ranks, the last one smaller than the world
    _run(["classify", "--adapter", str(one), "--input", str(inp), "--output", str(tmp_path / "c2.jsonl"), "--dtype", "fp32",
          "--chunk-size", "3"], 2, tmp_path, "c2")
    r1 = [json.loads(x) for x in (tmp_path / "c1.jsonl").read_text().splitlines()]
    r2 = [json.loads(x) for x in (tmp_path / "c2.jsonl").read_text().splitlines()]
    assert [r["id"] for r in r2] == list(range(7))
    s1 = torch.tensor([[r["scores"][k] for k in ("negative", "positive")] for r in r1])
    s2 = torch.tensor([[r["scores"][k] for k in ("negative", "positive")] for r in r2])
    assert rel_err(s2, s1) < 1e-5


def test_local_slice_gives_the_global_mean_gradient(monkeypatch):
    """Rank r's loss mean_{b_r} l_i x weight_r, averaged by DDP over W ranks, is mean_b l_i: each row must have
    coefficient weight_r / (W |b_r|) = 1 / |b|, the slices must partition b, idle ranks weigh 0."""
    from ltuning import distributed as D
    for W in (2, 3, 4):
        monkeypatch.setattr(D, "world_size", lambda W=W: W)
        for n in (1, 2, 5, 7, 16):
            rows = []
            for r in range(W):
                monkeypatch.setattr(D, "rank", lambda r=r: r)
                local, w = D.local_slice(list(range(100, 100 + n)))
                assert len(local) >= 1
                if w == 0.0:
                    assert n < W
                    continue
                assert abs(w / (W * len(local)) - 1.0 / n) < 1e-12
                rows += local
            assert rows == list(range(100, 100 + n))
