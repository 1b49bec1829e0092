"""``ltuning serve`` under load, loopback only, bounded: a real server process, 1 / 8 / 32 concurrent clients each
sending one-input requests until ``--requests`` are answered or ``--max-seconds`` pass. Reports throughput, p50 /
p99 latency, and the server's throughput as a fraction of offline classify (the same engine in this process, same
inputs, same threads, measured before the server starts), and the single-request forward time for the p99 target
``p99(1 client) <= 1.5 x forward + max-wait``. The forward is timed in process, one call per input, on every input
the 1-client level sends (up to ``--single-n``), so the target compares like with like: the p99 of the latencies
against 1.5 x the p99 of those forwards + max-wait (``p99_target_ms_1_client``). Also recorded: the median
forward, and at 1 client the fraction of requests within their own input's target (``within_own_target``).

Clients hold one keep-alive connection each (``http.client``), so the load generator costs little CPU (its CPU
seconds are recorded per level, with the server process's). Per level the server's ``/metrics`` are read before
and after: engine batches, their mean size and size histogram, and the fraction of the time the engine was busy.
A second offline reference runs the same inputs in engine calls of ``clients`` inputs in input order (what
batches of that many one-input requests can reach without HTTP): ``fraction_of_offline`` splits into the batch
composition (``offline_chunked / offline``) and the serving overhead (``fraction_of_offline_chunked``). Both offline
references run after a warm pass over all inputs, alternated ``--offline-reps`` times; medians (samples recorded).

    OMP_NUM_THREADS=1 python benchmarks/serving/bench_serve.py --out benchmarks/results/serving_server.json
"""
from __future__ import annotations

import argparse
import datetime
import http.client
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

import psutil

sys.path[:0] = [os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."),
                os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")]

import torch  # noqa: E402

from ltuning.data import label_names_of, read_records  # noqa: E402
from ltuning.serving import cpu  # noqa: E402
from ltuning.serving.engine import Engine  # noqa: E402

from common import DATA  # noqa: E402


class Client:
    """One keep-alive HTTP/1.1 connection (``http.client``), as a load generator or a production client holds it:
    no TCP handshake per request, so the client spends little CPU beside the server."""

    def __init__(self, port, timeout=300):
        self.port, self.timeout, self.conn = port, timeout, None

    def post(self, path, body):
        payload = json.dumps(body).encode()
        for attempt in (0, 1):  # one reconnect if the server closed an idle keep-alive connection
            if self.conn is None:
                self.conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=self.timeout)
            try:
                self.conn.request("POST", path, body=payload, headers={"Content-Type": "application/json"})
                r = self.conn.getresponse()
                return r.status, r.read()
            except (http.client.HTTPException, OSError):
                self.conn.close()
                self.conn = None
                if attempt:
                    raise

    def close(self):
        if self.conn is not None:
            self.conn.close()


def load(port, texts, clients, n_requests, max_seconds):
    """Each client posts one input per request on its own keep-alive connection; returns (answered, seconds,
    latencies, errors, the text index of each latency)."""
    lat, sent, errors, lock = [], [], [0], threading.Lock()
    counter = iter(range(n_requests))
    t_end = time.perf_counter() + max_seconds

    def client():
        c = Client(port)
        while time.perf_counter() < t_end:
            with lock:
                i = next(counter, None)
            if i is None:
                break
            t0 = time.perf_counter()
            try:
                code, _ = c.post("/v1/classify", {"inputs": [texts[i % len(texts)]]})
                ok = code == 200
            except OSError:
                ok = False
            with lock:
                if ok:
                    lat.append(time.perf_counter() - t0)
                    sent.append(i % len(texts))
                else:
                    errors[0] += 1
        c.close()
    t0 = time.perf_counter()
    ts = [threading.Thread(target=client) for _ in range(clients)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    return len(lat), time.perf_counter() - t0, lat, errors[0], sent


def scrape(url) -> dict:
    """The server's batch counters from ``/metrics``: engine batches run, inputs in them, engine seconds."""
    with urllib.request.urlopen(url + "/metrics", timeout=10) as r:
        text = r.read().decode()
    out = {"hist": {}}
    for ln in text.splitlines():
        if ln.startswith("ltuning_batch_examples_bucket{"):
            out["hist"][ln.split('le="')[1].split('"')[0]] = float(ln.split()[-1])
        for key, name in (("batches", "ltuning_batch_examples_count"), ("examples", "ltuning_batch_examples_sum"),
                          ("engine_seconds", "ltuning_batch_seconds_sum")):
            if ln.startswith(name + " "):
                out[key] = float(ln.split()[1])
    return out


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
    ap.add_argument("--offline-n", type=int, default=256, help="inputs of the in-process offline reference")
    ap.add_argument("--offline-reps", type=int, default=3,
                    help="alternated repetitions of the offline references (whole stream, each chunk size); medians")
    ap.add_argument("--single-n", type=int, default=512,
                    help="inputs timed one per call for the 1-client target (those the 1-client level sends first)")
    ap.add_argument("--max-wait-ms", type=float, default=20.0)
    ap.add_argument("--max-idle-ms", type=float, default=5.0)
    ap.add_argument("--dtype", default="fp32")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", required=True)
    a = ap.parse_args(argv)
    if a.offline_reps < 1 or a.single_n < 1:
        ap.error("--offline-reps and --single-n must be >= 1")
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
           "max_wait_ms": a.max_wait_ms, "max_idle_ms": a.max_idle_ms, "threads": a.threads,
           "load_average_start": os.getloadavg(),
           "levels": []}
    # offline reference: the same engine, in process
    e = Engine({"a": ad}, dtype=a.dtype, threads=a.threads)
    ad_ = e.adapters["a"]
    n_off = min(len(texts), a.requests, a.offline_n)
    ids = e.tokenize([{"text": t} for t in texts[:n_off]], ad_)
    e.score_ids(ad_, ids)  # warm: the first pass at full batch size pays first-touch costs
    # the whole stream (batches planned over all inputs, as `ltuning classify` runs them) and the same inputs in
    # engine calls of `clients` inputs each, in input order (what batches of that many one-input requests can
    # reach at best, without HTTP); alternated --offline-reps times, medians
    levels = sorted({int(x) for x in a.clients.split(",")})
    whole, chunked = [], {c: [] for c in levels}
    for _ in range(a.offline_reps):
        t0 = time.perf_counter()
        e.score_ids(ad_, ids)
        whole.append(n_off / (time.perf_counter() - t0))
        for c in levels:
            t0 = time.perf_counter()
            for s in range(0, n_off, c):
                e.score_ids(ad_, ids[s:s + c])
            chunked[c].append(n_off / (time.perf_counter() - t0))
    rec["offline_examples"] = n_off
    rec["offline_examples_per_s"] = statistics.median(whole)
    rec["offline_examples_per_s_samples"] = whole
    rec["offline_chunked_examples_per_s"] = {str(c): statistics.median(v) for c, v in chunked.items()}
    rec["offline_chunked_examples_per_s_samples"] = {str(c): v for c, v in chunked.items()}
    # one call per input, on the inputs the 1-client level sends (texts[0], texts[1], ...)
    n_single = min(len(texts), a.requests, a.single_n)
    single_ids = e.tokenize([{"text": t} for t in texts[:n_single]], ad_)
    singles = []
    for x in single_ids:
        t0 = time.perf_counter()
        e.score_ids(ad_, [x])
        singles.append(time.perf_counter() - t0)
    rec["single_request_inputs"] = n_single
    rec["single_request_forward_ms"] = 1000 * statistics.median(singles)
    rec["single_request_forward_p99_ms"] = 1000 * pct(singles, 0.99)
    del e
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    log = open(os.path.join(tmp, "server.log"), "w")
    proc = subprocess.Popen([sys.executable, "-m", "ltuning", "serve", "--adapter", f"a={ad}", "--port", str(port),
                             "--dtype", a.dtype, "--threads", str(a.threads), "--max-wait-ms", str(a.max_wait_ms),
                             "--max-idle-ms", str(a.max_idle_ms)],
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
        server = psutil.Process(proc.pid)
        for c in [int(x) for x in a.clients.split(",")]:
            m0, cpu_s0, cpu_c0 = scrape(url), sum(server.cpu_times()[:2]), time.process_time()
            n, dt, lat, err, sent = load(port, texts, c, a.requests, a.max_seconds)
            m1, cpu_s1, cpu_c1 = scrape(url), sum(server.cpu_times()[:2]), time.process_time()
            batches = m1["batches"] - m0["batches"]
            row = {"clients": c, "answered": n, "errors": err, "seconds": dt, "examples_per_s": n / dt,
                   "p50_ms": 1000 * pct(lat, 0.5), "p99_ms": 1000 * pct(lat, 0.99),
                   "fraction_of_offline": n / dt / rec["offline_examples_per_s"],
                   "fraction_of_offline_chunked": n / dt / rec["offline_chunked_examples_per_s"][str(c)],
                   "engine_batches": batches,
                   "mean_batch_examples": (m1["examples"] - m0["examples"]) / max(batches, 1),
                   "batch_examples_histogram": {le: m1["hist"][le] - m0["hist"].get(le, 0.0) for le in m1["hist"]},
                   "engine_busy_fraction": (m1["engine_seconds"] - m0["engine_seconds"]) / dt,
                   "server_cpu_seconds": cpu_s1 - cpu_s0, "client_cpu_seconds": cpu_c1 - cpu_c0}
            if c == 1:  # each request against its own input's target (inputs beyond the timed ones: not judged)
                own = [t <= (1.5 * singles[i] + a.max_wait_ms / 1000) for t, i in zip(lat, sent) if i < n_single]
                row["within_own_target"] = sum(own) / max(len(own), 1)
                row["judged_against_own_target"] = len(own)
            print(json.dumps(row), flush=True)
            rec["levels"].append(row)
        with urllib.request.urlopen(url + "/metrics", timeout=10) as r:
            m = r.read().decode()
        rec["metrics_batch_examples"] = [ln for ln in m.splitlines() if ln.startswith("ltuning_batch_examples_")
                                         and not ln.startswith("#")][-2:]
    finally:
        proc.send_signal(signal.SIGTERM)
        rec["server_exit_code"] = proc.wait(120)
    rec["p99_target_ms_1_client"] = 1.5 * rec["single_request_forward_p99_ms"] + a.max_wait_ms
    rec["p99_target_ms_1_client_from_median_forward"] = 1.5 * rec["single_request_forward_ms"] + a.max_wait_ms
    rec["load_average_end"] = os.getloadavg()
    os.makedirs(os.path.dirname(os.path.abspath(a.out)), exist_ok=True)
    with open(a.out, "w") as f:
        json.dump(rec, f, indent=1)
    print(json.dumps({k: v for k, v in rec.items() if k != "levels"}))


if __name__ == "__main__":
    main()
