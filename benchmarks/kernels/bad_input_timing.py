"""How long a mistyped ``--model`` takes to be reported (issue 18: it used to be 49 s of network retries, then a
92-line traceback). Measures, alternating the variants, median of ``--repeats``:

- ``check_s``: in one process, :func:`ltuning.models.registry.check_model` on the mistyped name (the check itself);
- ``process_s``: the wall time of ``python -m ltuning train --model minilm-l7 ...`` (imports included), its exit
  status and the number of stderr lines;

each with ``HF_HUB_OFFLINE=1`` and without it (then the hub's reachability decides: on a machine with no route to
huggingface.co the connection fails at once).

    python benchmarks/kernels/bad_input_timing.py --out benchmarks/results/bad_input_timing.json
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def machine() -> dict:
    flags, model = set(), platform.processor()
    try:
        with open("/proc/cpuinfo") as f:
            for ln in f:
                if ln.startswith("model name") and model in ("", platform.processor()):
                    model = ln.split(":", 1)[1].strip()
                if ln.startswith("flags"):
                    flags = set(ln.split(":", 1)[1].split())
                    break
    except OSError:
        pass
    return {"cpu": model, "amx_bf16": "amx_bf16" in flags, "avx512_bf16": "avx512_bf16" in flags,
            "cores": os.cpu_count()}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=os.path.join(REPO, "benchmarks", "results", "bad_input_timing.json"))
    ap.add_argument("--repeats", type=int, default=3)
    a = ap.parse_args(argv)
    sys.path.insert(0, REPO)
    from ltuning.errors import UserError
    from ltuning.models.registry import check_model

    with tempfile.TemporaryDirectory() as d:
        with open(os.path.join(d, "train.jsonl"), "w") as f:
            f.write('{"text": "good", "label": "positive"}\n{"text": "bad", "label": "negative"}\n')
        with open(os.path.join(d, "dev.jsonl"), "w") as f:
            f.write('{"text": "good", "label": "positive"}\n')
        cmd = [sys.executable, "-m", "ltuning", "train", "--model", "minilm-l7", "--method", "lt-prefix", "--data", d,
               "--out", os.path.join(d, "out")]
        res = {"offline": {"check_s": [], "process_s": []}, "online_env": {"check_s": [], "process_s": []}}
        status, lines = {}, {}
        for _ in range(a.repeats):
            for variant in res:  # alternate the variants
                env = {**os.environ, "PYTHONPATH": REPO, "OMP_NUM_THREADS": "1"}
                for v in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
                    env.pop(v, None)
                    os.environ.pop(v, None)
                if variant == "offline":
                    env["HF_HUB_OFFLINE"] = os.environ["HF_HUB_OFFLINE"] = "1"
                t0 = time.perf_counter()
                try:
                    check_model("minilm-l7")
                except UserError:
                    pass
                res[variant]["check_s"].append(time.perf_counter() - t0)
                t0 = time.perf_counter()
                p = subprocess.run(cmd, capture_output=True, text=True, env=env)
                res[variant]["process_s"].append(time.perf_counter() - t0)
                status[variant] = p.returncode
                lines[variant] = p.stderr.strip().splitlines()
    os.environ.pop("HF_HUB_OFFLINE", None)
    commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True).stdout.strip()
    record = {
        "command": "python benchmarks/kernels/bad_input_timing.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "commit": commit, "machine": machine(), "threads": 1,
        "note": "machine shared with other jobs while measuring (load average ~9 on 2 cores): wall times are upper "
                "bounds; process_s is mostly importing torch and transformers",
        "results": {v: {"check_s_median": statistics.median(r["check_s"]),
                        "process_s_median": statistics.median(r["process_s"]), "check_s": r["check_s"],
                        "process_s": r["process_s"], "exit_status": status[v], "stderr_lines": len(lines[v]),
                        "stderr": lines[v]} for v, r in res.items()},
    }
    os.makedirs(os.path.dirname(a.out), exist_ok=True)
    with open(a.out, "w") as f:
        json.dump(record, f, indent=2)
    print(json.dumps({v: {k: r[k] for k in ("check_s_median", "process_s_median", "exit_status", "stderr_lines")}
                      for v, r in record["results"].items()}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
