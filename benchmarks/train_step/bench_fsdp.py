"""FSDP2 vs plain data parallel, 2 processes x 1 thread (torchrun, gloo): SmolLM2 LT-prefix training examples/s and
the frozen base parameters each rank stores.

Both variants run the same ``ltuning train`` command (same seed, data, global batch and steps), ``--fsdp`` added
for the second; the runs alternate (A B B A ...). From each run's ``metrics.json``: the training-time rate
``train_examples_per_s`` (optimizer steps only, not loading or validation) and, with ``--fsdp``,
``fsdp_frozen_parameters`` (elements of the frozen base held by each rank; the layers are sharded, the embeddings
and the final norm replicated). Medians per variant.

    python benchmarks/train_step/bench_fsdp.py --json benchmarks/results/fsdp_throughput.json
"""
from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [os.path.dirname(os.path.dirname(HERE)), os.path.dirname(HERE)]
sys.path.insert(0, HERE)
from common import DATA, RESULTS, ROOT, atomic_json  # noqa: E402


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run(variant: str, args: list, out: str) -> dict:
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""), OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-addr", "127.0.0.1",
           "--master-port", str(_port()), "-m", "ltuning", *args, "--out", out] + (["--fsdp"] if variant == "fsdp" else [])
    p = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if p.returncode:
        raise RuntimeError(p.stderr[-2000:])
    with open(os.path.join(out, "metrics.json")) as f:
        return json.load(f)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--reps", type=int, default=2)
    ap.add_argument("--json", default=os.path.join(RESULTS, "fsdp_throughput.json"))
    a = ap.parse_args(argv)
    from bench_quantized import machine_info
    args = ["train", "--model", "smollm2-135m", "--method", "lt-prefix", "--data",
            os.path.join(DATA, "sst2"), "--max-train-examples", "96", "--max-dev-examples",
            "8", "--batch-size", "8", "--max-steps", "8", "--eval-every", "8", "--max-length", "64", "--quiet"]
    machine = machine_info()
    rates = {"ddp": [], "fsdp": []}
    frozen = None
    order = []
    for r in range(a.reps):
        order += ["ddp", "fsdp"] if r % 2 == 0 else ["fsdp", "ddp"]
    with tempfile.TemporaryDirectory() as tmp:
        for i, v in enumerate(order):
            m = run(v, args, os.path.join(tmp, f"{v}_{i}"))
            rates[v].append(m["train_examples_per_s"])
            if v == "fsdp":
                frozen = m["fsdp_frozen_parameters"]
            print(f"{v}: {m['train_examples_per_s']:.2f} examples/s", flush=True)
    med = {v: statistics.median(x) for v, x in rates.items()}
    per_rank_share = [n / frozen["total"] for n in frozen["per_rank"]]
    res = {"what": "SmolLM2-135M LT-prefix training examples/s (optimizer steps only), global batch 8, 8 steps, "
                   "2 processes x 1 thread; frozen base elements per rank",
           "variants": {"ddp": "torchrun 2 processes (gloo), DDP over the trainables, every rank the whole base",
                        "fsdp": "the same + --fsdp: the base's transformer layers fully_shard-ed over the 2 ranks"},
           "rates": rates, "median": med, "ratio_fsdp_over_ddp": med["fsdp"] / med["ddp"],
           "frozen_parameters": frozen, "frozen_share_per_rank": per_rank_share,
           "command": "python benchmarks/train_step/bench_fsdp.py " + " ".join(argv if argv is not None else sys.argv[1:]),
           "train_args": args, "machine": {**machine, "torch_threads": 1,
                                           "load_average_at_end": os.getloadavg()}}
    print(json.dumps({"median": med, "ratio_fsdp_over_ddp": res["ratio_fsdp_over_ddp"],
                      "frozen_share_per_rank": per_rank_share}))
    atomic_json(a.json, res)
    return 0


if __name__ == "__main__":
    sys.exit(main())
