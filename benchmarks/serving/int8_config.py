"""Label-free choice of the int8 configuration of the serving engine (``ltuning/serving/cpu.py``: smoothing alpha,
``max_outlier_ratio``): for each trained adapter, the int8 engine's predictions and scores are compared with the
fp32 engine's on 200 seeded TRAINING texts of SST-2 (never dev; no labels used): agreement of the argmax and the
relative error of the scores, with the number of Linears kept in fp32 and the int8 examples/s.

    OMP_NUM_THREADS=1 python benchmarks/serving/int8_config.py ADAPTER [ADAPTER ...] --out benchmarks/results/int8_config.json
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import random
import sys
import time

sys.path[:0] = [os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."),
                os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")]

import torch  # noqa: E402

from common import DATA, git_commit  # noqa: E402
from ltuning.data import read_records  # noqa: E402
from ltuning.serving import cpu  # noqa: E402
from ltuning.serving.engine import Engine  # noqa: E402

CONFIGS = {"plain": None, "a0.5": dict(alpha=0.5), "a0.8": dict(alpha=0.8),
           "a0.5+r20": dict(alpha=0.5, max_outlier_ratio=20.0), "a0.8+r20": dict(alpha=0.8, max_outlier_ratio=20.0)}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("adapters", nargs="+")
    ap.add_argument("--n", type=int, default=200)
    ap.add_argument("--out", required=True)
    a = ap.parse_args(argv)
    torch.set_num_threads(1)
    recs = random.Random(0).sample(read_records(os.path.join(DATA, "sst2", "train.jsonl")), a.n)
    orig = cpu.quantize_int8
    rec = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
           "commit": git_commit(os.path.dirname(os.path.abspath(__file__))), "command": "python benchmarks/serving/int8_config.py " + " ".join(sys.argv[1:]),
           "machine": cpu.machine(), "load_average_start": os.getloadavg(), "rows": []}
    for ad in a.adapters:
        e = Engine({"a": ad}, dtype="fp32", threads=1)
        ref = torch.tensor([list(d.values()) for _, d in e.classify(recs)])
        for name, kw in CONFIGS.items():
            cpu.quantize_int8 = ((lambda model, calibrate=None, **k: orig(model, None)) if kw is None else
                                 (lambda model, calibrate=None, _kw=kw, **k: orig(model, calibrate, **_kw)))
            try:
                e8 = Engine({"a": ad}, dtype="fp32", quantize="int8", threads=1)
            finally:
                cpu.quantize_int8 = orig
            kept = sum(1 for m in e8.base.modules() if getattr(m, "keep_full_precision", False))
            t0 = time.perf_counter()
            s = torch.tensor([list(d.values()) for _, d in e8.classify(recs)])
            dt = time.perf_counter() - t0
            row = {"adapter": os.path.basename(os.path.normpath(ad)), "config": name,
                   "agree": (s.argmax(1) == ref.argmax(1)).float().mean().item(),
                   "rel_err": ((s - ref).norm() / ref.norm()).item(), "kept_fp32": kept, "ex_s": len(recs) / dt}
            print(json.dumps(row), flush=True)
            rec["rows"].append(row)
    rec["load_average_end"] = os.getloadavg()
    with open(a.out, "w") as f:
        json.dump(rec, f, indent=1)


if __name__ == "__main__":
    main()
