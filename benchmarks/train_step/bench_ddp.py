"""Two layouts of the same SmolLM2 LT-prefix training run, alternated: training examples/s per layout.

``--mode ddp`` (the default): 1 process x 2 threads vs 2 processes x 1 thread (torchrun, gloo).
``--mode fsdp``: FSDP2 vs plain data parallel, both 2 processes x 1 thread (torchrun, gloo), ``--fsdp`` added for
the second; it also records the frozen base parameters each rank stores. (``results/fsdp_throughput.json`` was
recorded with the former ``bench_fsdp.py``, merged here after commit 272af27: the same runs and record.)

Both variants of a mode run the same ``ltuning train`` command (same seed, data, global batch and steps); the runs
alternate (A B B A ...) and from each run's ``metrics.json`` come the training-time rate ``train_examples_per_s``
(the optimizer steps only, not loading or validation) and, with ``--fsdp``, ``fsdp_frozen_parameters`` (elements of
the frozen base held by each rank; the layers are sharded, the embeddings and the final norm replicated); medians
per variant. ``--plan`` prints the runs (threads and command) and runs nothing.

    python benchmarks/train_step/bench_ddp.py --json benchmarks/results/ddp_throughput.json
    python benchmarks/train_step/bench_ddp.py --mode fsdp --json benchmarks/results/fsdp_throughput.json
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

# variant: (processes, OMP_NUM_THREADS, extra train options, description in the record)
VARIANTS = {"1x2": (1, 2, [], "1 process, OMP_NUM_THREADS=2"),
            "2x1": (2, 1, [], "torchrun 2 processes (gloo), OMP_NUM_THREADS=1"),
            "ddp": (2, 1, [], "torchrun 2 processes (gloo), DDP over the trainables, every rank the whole base"),
            "fsdp": (2, 1, ["--fsdp"],
                     "the same + --fsdp: the base's transformer layers fully_shard-ed over the 2 ranks")}
# mode: (variant A, variant B, default JSON, what the record measures)
WHAT = "SmolLM2-135M LT-prefix training examples/s (optimizer steps only), global batch 8, 8 steps"
MODES = {"ddp": ("1x2", "2x1", "ddp_throughput.json", WHAT),
         "fsdp": ("ddp", "fsdp", "fsdp_throughput.json",
                  WHAT + ", 2 processes x 1 thread; frozen base elements per rank")}


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def command(variant: str, args: list, out: str, port) -> list:
    """The command line of one run of ``variant`` (``port``: torchrun's master port)."""
    procs, _, extra, _ = VARIANTS[variant]
    launch = [] if procs == 1 else ["-m", "torch.distributed.run", "--nproc-per-node", str(procs), "--master-addr",
                                    "127.0.0.1", "--master-port", str(port)]
    return [sys.executable, *launch, "-m", "ltuning", *args, "--out", out, *extra]


def run(variant: str, args: list, out: str) -> dict:
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""),
               OMP_NUM_THREADS=str(VARIANTS[variant][1]))
    p = subprocess.run(command(variant, args, out, _port()), env=env, capture_output=True, text=True)
    if p.returncode:
        raise RuntimeError(p.stderr[-2000:])
    with open(os.path.join(out, "metrics.json")) as f:
        return json.load(f)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--mode", choices=sorted(MODES), default="ddp",
                    help="ddp: 1 process x 2 threads vs 2 processes x 1 thread; fsdp: --fsdp vs DDP, 2 x 1")
    ap.add_argument("--reps", type=int, default=2)
    ap.add_argument("--json", default=None, help="default: benchmarks/results/{ddp,fsdp}_throughput.json by --mode")
    ap.add_argument("--plan", action="store_true", help="print the runs (threads, command) and run nothing")
    a = ap.parse_args(argv)
    va, vb, default_json, what = MODES[a.mode]
    args = ["train", "--model", "smollm2-135m", "--method", "lt-prefix", "--data",
            os.path.join(DATA, "sst2"), "--max-train-examples", "96", "--max-dev-examples",
            "8", "--batch-size", "8", "--max-steps", "8", "--eval-every", "8", "--max-length", "64", "--quiet"]
    order = []
    for r in range(a.reps):
        order += [va, vb] if r % 2 == 0 else [vb, va]
    if a.plan:
        for i, v in enumerate(order):
            cmd = command(v, args, os.path.join("TMP", f"{v}_{i}"), "PORT")
            print(f"{v}: OMP_NUM_THREADS={VARIANTS[v][1]} {' '.join(cmd)}")
        return 0
    from bench_quantized import machine_info
    machine = machine_info()
    rates = {va: [], vb: []}
    frozen = None
    with tempfile.TemporaryDirectory() as tmp:
        for i, v in enumerate(order):
            m = run(v, args, os.path.join(tmp, f"{v}_{i}"))
            rates[v].append(m["train_examples_per_s"])
            if v == "fsdp":
                frozen = m["fsdp_frozen_parameters"]
            print(f"{v}: {m['train_examples_per_s']:.2f} examples/s", flush=True)
    med = {v: statistics.median(x) for v, x in rates.items()}
    ratio = f"ratio_{vb}_over_{va}"
    threads = {VARIANTS[v][1] for v in (va, vb)}
    res = {"what": what, "variants": {v: VARIANTS[v][3] for v in (va, vb)},
           "rates": rates, "median": med, ratio: med[vb] / med[va]}
    if frozen is not None:
        res.update(frozen_parameters=frozen, frozen_share_per_rank=[n / frozen["total"] for n in frozen["per_rank"]])
    cmdline = " ".join(argv if argv is not None else sys.argv[1:])
    res.update(command="python benchmarks/train_step/bench_ddp.py " + cmdline, train_args=args,
               machine={**machine, "torch_threads": threads.pop() if len(threads) == 1 else "per variant, see variants",
                        "load_average_at_end": os.getloadavg()})
    print(json.dumps({k: res[k] for k in ("median", ratio, "frozen_share_per_rank") if k in res}))
    atomic_json(a.json or os.path.join(RESULTS, default_json), res)
    return 0


if __name__ == "__main__":
    sys.exit(main())
