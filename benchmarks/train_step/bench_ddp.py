"""1 process x 2 threads vs 2 processes x 1 thread (torchrun, gloo): SmolLM2 LT-prefix training examples/s.

Both run the same ``ltuning train`` command (same seed, data, global batch and steps); the runs alternate
(A B B A ...) and the training-time rate ``train_examples_per_s`` of each run (the optimizer steps only, not
loading or validation) is read from its ``metrics.json``; medians per variant.

    python benchmarks/train_step/bench_ddp.py --json benchmarks/results/ddp_throughput.json
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


def run(variant: str, args: list, out: str) -> float:
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    if variant == "1x2":
        env["OMP_NUM_THREADS"] = "2"
        cmd = [sys.executable, "-m", "ltuning", *args, "--out", out]
    else:
        env["OMP_NUM_THREADS"] = "1"
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-addr", "127.0.0.1",
               "--master-port", str(_port()), "-m", "ltuning", *args, "--out", out]
    p = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if p.returncode:
        raise RuntimeError(p.stderr[-2000:])
    with open(os.path.join(out, "metrics.json")) as f:
        return json.load(f)["train_examples_per_s"]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--reps", type=int, default=2)
    ap.add_argument("--json", default=os.path.join(RESULTS, "ddp_throughput.json"))
    a = ap.parse_args(argv)
    from bench_quantized import machine_info
    args = ["train", "--model", "smollm2-135m", "--method", "lt-prefix", "--data",
            os.path.join(DATA, "sst2"), "--max-train-examples", "96", "--max-dev-examples",
            "8", "--batch-size", "8", "--max-steps", "8", "--eval-every", "8", "--max-length", "64", "--quiet"]
    rates = {"1x2": [], "2x1": []}
    order = []
    for r in range(a.reps):
        order += ["1x2", "2x1"] if r % 2 == 0 else ["2x1", "1x2"]
    load_start = os.getloadavg()
    with tempfile.TemporaryDirectory() as tmp:
        for i, v in enumerate(order):
            rate = run(v, args, os.path.join(tmp, f"{v}_{i}"))
            rates[v].append(rate)
            print(f"{v}: {rate:.2f} examples/s", flush=True)
    med = {v: statistics.median(x) for v, x in rates.items()}
    res = {"what": "SmolLM2-135M LT-prefix training examples/s (optimizer steps only), global batch 8, 8 steps",
           "variants": {"1x2": "1 process, OMP_NUM_THREADS=2", "2x1": "torchrun 2 processes (gloo), OMP_NUM_THREADS=1"},
           "rates": rates, "median": med, "ratio_2x1_over_1x2": med["2x1"] / med["1x2"],
           "command": "python benchmarks/train_step/bench_ddp.py " + " ".join(argv if argv is not None else sys.argv[1:]),
           "train_args": args, "machine": {**machine_info(), "torch_threads": "per variant, see variants",
                                           "load_average_start": load_start, "load_average_end": os.getloadavg()}}
    print(json.dumps({"median": med, "ratio_2x1_over_1x2": res["ratio_2x1_over_1x2"]}))
    atomic_json(a.json, res)
    return 0


if __name__ == "__main__":
    sys.exit(main())
