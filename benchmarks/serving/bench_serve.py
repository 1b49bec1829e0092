"""``ltuning serve`` under load, loopback only, bounded: a real server process, 1 / 8 / 32 concurrent clients each
sending one-input requests until ``--requests`` are answered or ``--max-seconds`` pass. Reports throughput, p50 /
p99 latency, and the server's throughput as a fraction of offline classify (the same engine in this process, same
inputs, same threads, measured before the server starts), and the single-request forward time (median, in
process) for the p99 target ``p99(1 client) <= 1.5 x forward + max-wait``.

    OMP_NUM_THREADS=1 python benchmarks/serving/bench_serve.py --out benchmarks/results/serving_server.json
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request

sys.path[:0] = [os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."),
                os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")]

import torch  # noqa: E402

from ltuning.data import label_names_of, read_records  # noqa: E402
from ltuning.serving import cpu  # noqa: E402
from ltuning.serving.engine import Engine  # noqa: E402

from common import DATA  # noqa: E402


def post(url, body, timeout=300):
    req = urllib.request.Request(url, data=json.dumps(body).encode(), method="POST",
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=timeout) as r:
        return r.status, r.read()


def load(url, texts, clients, n_requests, max_seconds):
    """Each client posts one input per request; returns (answered, seconds, latencies, errors)."""
    lat, errors, lock = [], [0], threading.Lock()
    counter = iter(range(n_requests))
    t_end = time.perf_counter() + max_seconds

    def client():
        while time.perf_counter() < t_end:
            with lock:
                i = next(counter, None)
            if i is None:
                return
            t0 = time.perf_counter()
            try:
                code, _ = post(url, {"inputs": [texts[i % len(texts)]]})
                ok = code == 200
            except OSError:
                ok = False
            with lock:
                if ok:
                    lat.append(time.perf_counter() - t0)
                else:
                    errors[0] += 1
    t0 = time.perf_counter()
    ts = [threading.Thread(target=client) for _ in range(clients)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    return len(lat), time.perf_counter() - t0, lat, errors[0]


def pct(xs, q):
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(q * (len(xs) - 1))))]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--method", default="prefix")
    ap.add_argument("--dataset", default="sst2")
    ap.add_argument("--clients", default="1,8,32")
    ap.add_argument("--requests", type=int, default=256, help="requests per client level (one input each)")
    ap.add_argument("--max-seconds", type=float, default=90)
    ap.add_argument("--max-wait-ms", type=float, default=5.0)
    ap.add_argument("--dtype", default="fp32")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", required=True)
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from bench_classify import make_adapter
    dev = read_records(os.path.join(DATA, a.dataset, "dev.jsonl"))
    labels = label_names_of(dev)
    texts = [r["text"] for r in dev]
    tmp = tempfile.mkdtemp(prefix="bench_serve_")
    ad = make_adapter(a.model, a.method, labels, os.path.join(tmp, "adapter"))
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    rec = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"), "commit": commit,
           "command": "OMP_NUM_THREADS=%s python benchmarks/serving/bench_serve.py %s" % (
               os.environ.get("OMP_NUM_THREADS", ""), " ".join(sys.argv[1:] if argv is None else argv)),
           "machine": cpu.machine(), "model": a.model, "method": a.method, "dataset": a.dataset, "dtype": a.dtype,
           "max_wait_ms": a.max_wait_ms, "threads": a.threads,
           "load_average_start": os.getloadavg(),
           "levels": []}
    # offline reference: the same engine, in process
    e = Engine({"a": ad}, dtype=a.dtype, threads=a.threads)
    ad_ = e.adapters["a"]
    n_off = min(len(texts), a.requests)
    ids = e.tokenize([{"text": t} for t in texts[:n_off]], ad_)
    e.score_ids(ad_, ids[:8])
    t0 = time.perf_counter()
    e.score_ids(ad_, ids)
    rec["offline_examples_per_s"] = n_off / (time.perf_counter() - t0)
    singles = []
    for i in range(15):
        t0 = time.perf_counter()
        e.score_ids(ad_, [ids[i]])
        singles.append(time.perf_counter() - t0)
    rec["single_request_forward_ms"] = 1000 * statistics.median(singles)
    del e
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    log = open(os.path.join(tmp, "server.log"), "w")
    proc = subprocess.Popen([sys.executable, "-m", "ltuning", "serve", "--adapter", f"a={ad}", "--port", str(port),
                             "--dtype", a.dtype, "--threads", str(a.threads), "--max-wait-ms", str(a.max_wait_ms)],
                            stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 300
        while time.time() < deadline:
            try:
                with urllib.request.urlopen(url + "/health", timeout=5) as r:
                    if r.status == 200:
                        break
            except OSError:
                time.sleep(0.5)
        for c in [int(x) for x in a.clients.split(",")]:
            n, dt, lat, err = load(url + "/v1/classify", texts, c, a.requests, a.max_seconds)
            row = {"clients": c, "answered": n, "errors": err, "seconds": dt, "examples_per_s": n / dt,
                   "p50_ms": 1000 * pct(lat, 0.5), "p99_ms": 1000 * pct(lat, 0.99),
                   "fraction_of_offline": n / dt / rec["offline_examples_per_s"]}
            print(json.dumps(row), flush=True)
            rec["levels"].append(row)
        with urllib.request.urlopen(url + "/metrics", timeout=10) as r:
            m = r.read().decode()
        rec["metrics_batch_examples"] = [ln for ln in m.splitlines() if ln.startswith("ltuning_batch_examples_")
                                         and not ln.startswith("#")][-2:]
    finally:
        proc.send_signal(signal.SIGTERM)
        rec["server_exit_code"] = proc.wait(120)
    rec["p99_target_ms_1_client"] = 1.5 * rec["single_request_forward_ms"] + a.max_wait_ms
    rec["load_average_end"] = os.getloadavg()
    os.makedirs(os.path.dirname(os.path.abspath(a.out)), exist_ok=True)
    with open(a.out, "w") as f:
        json.dump(rec, f, indent=1)
    print(json.dumps({k: v for k, v in rec.items() if k != "levels"}))


if __name__ == "__main__":
    main()
