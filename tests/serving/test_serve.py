"""``ltuning serve`` through a real HTTP client against ONE real server process on loopback (MiniLM, two tiny
adapters trained in the module fixture: prefix and LoRA, which hooks the base, so the two share it through the
engine's hook switch). The graceful-shutdown test is last: it stops the server."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

from serving_helpers import TEXTS, free_port, train_tiny

pytest.importorskip("uvicorn")
pytest.importorskip("starlette")
pytest.importorskip("prometheus_client")

LONG = " ".join(["a long and winding review of a film that goes on and on"] * 12)  # > 128 tokens: truncated


@pytest.fixture(scope="module")
def server(tmp_path_factory, minilm):
    from ltuning.models import load_base
    tmp = tmp_path_factory.mktemp("serve")
    base, tok = load_base("minilm-l6")  # a private copy: LoRA hooks must not reach the session model
    refs = {m: train_tiny(m, str(tmp / m), base, tok, extra_texts=[LONG]) for m in ("prefix", "lora")}
    port = free_port()
    cmd = [sys.executable, "-m", "ltuning", "serve", "--adapter", f"sst={tmp / 'prefix'}",
           "--adapter", f"sst-lora={tmp / 'lora'}", "--port", str(port), "--dtype", "fp32", "--max-wait-ms", "20",
           "--max-queue-examples", "48", "--max-inputs", "32", "--max-body-bytes", "40000",
           "--max-batch-tokens", "512", "--threads", "1"]
    log = open(tmp / "server.log", "w+")
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "OMP_NUM_THREADS": "1"})
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 180
    status = None
    while time.time() < deadline and proc.poll() is None:
        try:
            status = request(url, "GET", "/health")[0]
        except OSError:
            status = None
        if status == 200:
            break
        time.sleep(0.3)
    if status != 200:
        proc.kill()
        log.seek(0)
        pytest.fail(f"server did not become ready: {log.read()[-3000:]}")
    yield {"url": url, "proc": proc, "refs": refs, "log": log}
    if proc.poll() is None:
        proc.kill()
        proc.wait()


def request(url, method, path, body=None, raw: bytes | None = None, timeout=120):
    data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
    req = urllib.request.Request(url + path, data=data, method=method, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, r.headers, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.headers, e.read()


def post(server, body, raw=None):
    code, headers, data = request(server["url"], "POST", "/v1/classify", body, raw)
    return code, headers, json.loads(data)


def check(server, adapter, texts, res):
    ref = server["refs"]["prefix" if adapter == "sst" else "lora"]
    allt = list(TEXTS) + [LONG]
    want = torch.stack([ref[allt.index(t)] for t in texts])
    got = torch.tensor([[s["negative"], s["positive"]] for s in res["scores"]])
    assert torch.allclose(got, want, rtol=1e-4, atol=1e-5), (got, want)
    assert res["predictions"] == [["negative", "positive"][i] for i in want.argmax(-1).tolist()]


def test_health_and_adapters(server):
    code, _, body = request(server["url"], "GET", "/health")
    assert code == 200 and json.loads(body) == {"status": "ready"}
    code, _, body = request(server["url"], "GET", "/v1/adapters")
    d = json.loads(body)
    assert code == 200 and set(d["adapters"]) == {"sst", "sst-lora"}
    assert d["adapters"]["sst"]["method"] == "prefix" and d["adapters"]["sst"]["labels"] == ["negative", "positive"]
    assert d["dtype"] == "fp32"


def test_classify_matches_the_in_process_model(server):
    for adapter in ("sst", "sst-lora"):
        texts = list(TEXTS) + [LONG]  # LONG is truncated to 128 tokens, as the in-process reference does
        code, _, res = post(server, {"inputs": texts, "adapter": adapter, "return_scores": True})
        assert code == 200, res
        assert res["adapter"] == adapter
        check(server, adapter, texts, res)
    code, _, res = post(server, {"inputs": [TEXTS[0]], "adapter": "sst"})
    assert code == 200 and "scores" not in res and len(res["predictions"]) == 1


def test_pairs_are_accepted(server):
    code, _, res = post(server, {"inputs": [{"premise": "a cat sat", "hypothesis": "an animal sat"}, "text"],
                                 "adapter": "sst"})
    assert code == 200 and len(res["predictions"]) == 2


@pytest.mark.parametrize("body,raw,code,needle", [
    (None, b"{not json", 400, "invalid JSON"),
    ([1, 2], None, 400, "JSON object"),
    ({"adapter": "sst"}, None, 400, "'inputs'"),
    ({"inputs": "text", "adapter": "sst"}, None, 400, "'inputs'"),
    ({"inputs": [], "adapter": "sst"}, None, 400, "empty"),
    ({"inputs": [3], "adapter": "sst"}, None, 400, "'inputs'[0]"),
    ({"inputs": [{"premise": "x"}], "adapter": "sst"}, None, 400, "'inputs'[0]"),
    ({"inputs": ["x"], "adapter": "sst", "return_scores": "yes"}, None, 400, "return_scores"),
    ({"inputs": ["x"], "adapter": 7}, None, 400, "'adapter'"),
    ({"inputs": ["x"], "adapter": "sst", "extra": 1}, None, 400, "unknown fields"),
    ({"inputs": ["x"]}, None, 400, "several adapters"),
    ({"inputs": ["x"], "adapter": "nope"}, None, 404, "unknown adapter"),
    ({"inputs": ["x"] * 33, "adapter": "sst"}, None, 413, "at most 32"),
    ({"inputs": ["x" * 50000], "adapter": "sst"}, None, 413, "bytes"),
])
def test_errors(server, body, raw, code, needle):
    got, _, res = post(server, body, raw)
    assert got == code and needle in res["error"], res


def test_wrong_method_is_405(server):
    assert request(server["url"], "GET", "/v1/classify")[0] == 405


def test_concurrent_requests_are_answered_in_order(server):
    import random
    rng = random.Random(1234)
    jobs = []
    for i in range(24):  # 12 clients x at most 4 inputs: within the queue limit of 48
        texts = rng.sample(TEXTS, rng.randint(1, 4))
        jobs.append((rng.choice(["sst", "sst-lora"]), texts))
    with ThreadPoolExecutor(12) as ex:
        results = list(ex.map(lambda j: post(server, {"inputs": j[1], "adapter": j[0], "return_scores": True}),
                              jobs))
    for (adapter, texts), (code, _, res) in zip(jobs, results):
        assert code == 200, res
        check(server, adapter, texts, res)


def test_metrics(server):
    code, headers, body = request(server["url"], "GET", "/metrics")
    text = body.decode()
    assert code == 200 and headers.get("Content-Type").startswith("text/plain")
    for name in ("ltuning_requests_total", "ltuning_examples_total", "ltuning_batch_examples_bucket",
                 "ltuning_request_latency_seconds_bucket", "ltuning_queue_depth", "ltuning_batch_seconds_sum"):
        assert name in text
    assert 'code="404"' in text and 'adapter="sst"' in text


def test_overload_gets_503_then_recovers(server):
    body = {"inputs": [LONG] * 32, "adapter": "sst"}  # 32 x 128 tokens per request; queue limit 48 examples
    with ThreadPoolExecutor(10) as ex:
        results = list(ex.map(lambda _: post(server, body), range(10)))
    codes = [c for c, _, _ in results]
    assert 503 in codes and 200 in codes, codes
    for c, h, res in results:
        if c == 503:
            assert h.get("Retry-After") == "1" and "overloaded" in res["error"]
        else:
            assert c == 200 and len(res["predictions"]) == 32
    code, _, res = post(server, {"inputs": TEXTS, "adapter": "sst", "return_scores": True})
    assert code == 200
    check(server, "sst", TEXTS, res)


def test_sigterm_drains_in_flight_requests_and_exits_cleanly(server):
    proc = server["proc"]
    out = {}

    def slow():
        out["res"] = post(server, {"inputs": [LONG] * 32, "adapter": "sst-lora"})
    t = threading.Thread(target=slow)
    t.start()
    time.sleep(0.3)  # the request is in flight (queued or running: 32 x 128 tokens take seconds)
    proc.send_signal(signal.SIGTERM)
    t.join(120)
    assert out["res"][0] == 200 and len(out["res"][2]["predictions"]) == 32
    assert proc.wait(60) == 0
    with pytest.raises(OSError):
        request(server["url"], "GET", "/health", timeout=5)
