"""``ltuning serve``: an HTTP classification server (Starlette on uvicorn, one process holding the model).

Why Starlette rather than FastAPI: the API is four routes whose error codes are part of the contract (400 for a
malformed body or a wrong type, where FastAPI's automatic validation answers 422; 413 for a body too large,
checked on the raw bytes before any parsing), so the validation is explicit code here, and FastAPI's extra layer
(pydantic models, OpenAPI) would bring nothing but weight. FastAPI is built on Starlette; uvicorn is the
standard ASGI server for both.

Routes:
  POST /v1/classify  {"inputs": [text | {"premise", "hypothesis"}, ...], "adapter": name?, "return_scores": bool?}
                     -> {"adapter", "predictions": [label, ...], "scores": [{label: score}, ...] (if asked)}
  GET  /v1/adapters  -> the loaded adapters (method, labels, max_length), dtype, quantization
  GET  /health       -> 200 {"status": "ready"} once the model is loaded and warmed; 503 {"status": "loading"}
  GET  /metrics      -> Prometheus text format (requests by route and code, examples, batch sizes, queue depth,
                        request and batch latency histograms)
Errors are JSON ``{"error": message}``: 400 malformed JSON / wrong types / empty inputs / unknown fields; 404 unknown
adapter; 413 more than ``--max-inputs`` inputs or more than ``--max-body-bytes`` bytes; 503 with ``Retry-After``
while loading or when the bounded queue is full; 500 if the model fails. Inputs longer than the adapter's
``max_length`` tokens are truncated (the engine's policy: keep the start; pairs longest-first on encoders).
SIGTERM / Ctrl-C: uvicorn stops accepting connections, in-flight requests are answered (the batcher drains its
queue), then the process exits 0.
"""
from __future__ import annotations

import asyncio
import contextlib
import json
import sys
import threading
import time

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client import CONTENT_TYPE_LATEST
from starlette.applications import Starlette
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from .batcher import Batcher, QueueFull

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
SIZE_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)


class HTTPError(Exception):
    def __init__(self, status: int, message: str, headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.headers = status, message, headers or {}


class Metrics:
    def __init__(self):
        r = self.registry = CollectorRegistry()
        self.requests = Counter("ltuning_requests", "HTTP requests by route and status code", ["route", "code"],
                                registry=r)
        self.examples = Counter("ltuning_examples", "inputs classified, by adapter", ["adapter"], registry=r)
        self.batch_examples = Histogram("ltuning_batch_examples", "inputs per engine batch", buckets=SIZE_BUCKETS,
                                        registry=r)
        self.batch_tokens = Histogram("ltuning_batch_tokens", "scored tokens per engine batch",
                                      buckets=tuple(16 * b for b in SIZE_BUCKETS), registry=r)
        self.batch_seconds = Histogram("ltuning_batch_seconds", "engine time per batch", buckets=LATENCY_BUCKETS,
                                       registry=r)
        self.latency = Histogram("ltuning_request_latency_seconds", "POST /v1/classify latency (answered 200)",
                                 buckets=LATENCY_BUCKETS, registry=r)
        self.queue_depth = Gauge("ltuning_queue_depth", "inputs waiting for the model", registry=r)

    def on_batch(self, examples: int, tokens: int, seconds: float) -> None:
        self.batch_examples.observe(examples)
        self.batch_tokens.observe(tokens)
        self.batch_seconds.observe(seconds)


class App:
    """The server state: the engine (loaded in a background thread), the batcher, the metrics, the limits."""

    def __init__(self, load_engine, max_batch_tokens=4096, max_wait_ms=20.0, max_queue_examples=4096,
                 max_inputs=256, max_body_bytes=1 << 20, max_idle_ms=5.0):
        self.load_engine = load_engine
        self.limits = dict(max_batch_tokens=max_batch_tokens, max_wait_ms=max_wait_ms,
                           max_queue_examples=max_queue_examples, max_idle_ms=max_idle_ms)
        self.max_inputs, self.max_body_bytes = max_inputs, max_body_bytes
        self.engine = self.batcher = None
        self.ready = threading.Event()
        self.load_error = None
        self.metrics = Metrics()
        self.on_load_error = None
        self.app = Starlette(routes=[Route("/v1/classify", self.classify, methods=["POST"]),
                                     Route("/v1/adapters", self.adapters, methods=["GET"]),
                                     Route("/health", self.health, methods=["GET"]),
                                     Route("/metrics", self.prom, methods=["GET"])],
                             lifespan=self.lifespan)

    # ---------------------------------------------------------------- lifecycle
    @contextlib.asynccontextmanager
    async def lifespan(self, app):
        threading.Thread(target=self._load, name="ltuning-load", daemon=True).start()
        yield
        if self.batcher is not None:
            await asyncio.get_running_loop().run_in_executor(None, self.batcher.stop)

    def _load(self) -> None:
        try:
            engine = self.load_engine()
            engine.warmup()
            self.batcher = Batcher(engine, self.limits["max_batch_tokens"], self.limits["max_wait_ms"],
                                   self.limits["max_queue_examples"], self.metrics.on_batch,
                                   max_idle_ms=self.limits["max_idle_ms"])
            self.engine = engine
            self.ready.set()
        except Exception as e:  # reported by serve(); the server stops
            self.load_error = e
            if self.on_load_error:
                self.on_load_error(e)

    # ---------------------------------------------------------------- routes
    async def health(self, request):
        if self.ready.is_set():
            return self._json(request, 200, {"status": "ready"})
        return self._json(request, 503, {"status": "loading"}, {"Retry-After": "1"})

    async def adapters(self, request):
        if not self.ready.is_set():
            return self._json(request, 503, {"error": "the model is loading"}, {"Retry-After": "1"})
        return self._json(request, 200, self.engine.describe())

    async def prom(self, request):
        self.metrics.queue_depth.set(self.batcher.depth() if self.batcher else 0)
        return Response(generate_latest(self.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    async def classify(self, request):
        t0 = time.perf_counter()
        try:
            if not self.ready.is_set():
                raise HTTPError(503, "the model is loading", {"Retry-After": "1"})
            body = await self._body(request)
            adapter, records, return_scores = self._parse(body)
            ids = self.engine.tokenize(records, adapter)
            loop = asyncio.get_running_loop()
            fut = loop.create_future()

            def done(scores, error):
                def settle():
                    if fut.done():  # the client went away
                        return
                    if error is not None:
                        fut.set_exception(error)
                    else:
                        fut.set_result(scores)
                loop.call_soon_threadsafe(settle)
            try:
                self.batcher.submit(adapter, ids, done)
            except QueueFull as e:
                raise HTTPError(503, f"overloaded: {e}; retry later", {"Retry-After": "1"}) from None
            try:
                scores = await fut
            except Exception as e:
                raise HTTPError(500, f"the model failed on this batch: {type(e).__name__}: {e}") from None
        except HTTPError as e:
            return self._json(request, e.status, {"error": e.message}, e.headers)
        results = self.engine.format(adapter, scores)
        out = {"adapter": adapter.name, "predictions": [p for p, _ in results]}
        if return_scores:
            out["scores"] = [s for _, s in results]
        self.metrics.examples.labels(adapter.name).inc(len(records))
        self.metrics.latency.observe(time.perf_counter() - t0)
        return self._json(request, 200, out)

    # ---------------------------------------------------------------- helpers
    def _json(self, request, status: int, payload: dict, headers: dict | None = None):
        self.metrics.requests.labels(request.url.path, str(status)).inc()
        return JSONResponse(payload, status_code=status, headers=headers)

    async def _body(self, request) -> dict:
        length = request.headers.get("content-length")
        if length is not None:
            if not length.isdigit():
                raise HTTPError(400, "Content-Length: expected a number of bytes")
            if int(length) > self.max_body_bytes:
                raise HTTPError(413, f"body of {length} bytes; at most {self.max_body_bytes} (--max-body-bytes)")
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > self.max_body_bytes:
                raise HTTPError(413, f"body over {self.max_body_bytes} bytes (--max-body-bytes)")
            chunks.append(chunk)
        try:
            body = json.loads(b"".join(chunks))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise HTTPError(400, f"body: invalid JSON ({e})") from None
        if not isinstance(body, dict):
            raise HTTPError(400, f"body: expected a JSON object, got {type(body).__name__}")
        return body

    def _parse(self, body: dict):
        unknown = set(body) - {"inputs", "adapter", "return_scores"}
        if unknown:
            raise HTTPError(400, f"unknown fields {sorted(unknown)}; expected inputs, adapter, return_scores")
        inputs = body.get("inputs")
        if not isinstance(inputs, list):
            raise HTTPError(400, f"'inputs': expected a list of texts or {{premise, hypothesis}} objects, got "
                                 f"{type(inputs).__name__ if 'inputs' in body else 'nothing'}")
        if not inputs:
            raise HTTPError(400, "'inputs': empty list")
        if len(inputs) > self.max_inputs:
            raise HTTPError(413, f"'inputs': {len(inputs)} inputs; at most {self.max_inputs} (--max-inputs)")
        records = []
        for i, x in enumerate(inputs):
            if isinstance(x, str):
                records.append({"text": x})
            elif (isinstance(x, dict) and set(x) == {"premise", "hypothesis"}
                  and all(isinstance(v, str) for v in x.values())):
                records.append(dict(x))
            else:
                raise HTTPError(400, f"'inputs'[{i}]: expected a string or an object with string 'premise' and "
                                     f"'hypothesis' only")
        rs = body.get("return_scores", False)
        if not isinstance(rs, bool):
            raise HTTPError(400, f"'return_scores': expected true or false, got {json.dumps(rs)}")
        name = body.get("adapter")
        if name is not None and not isinstance(name, str):
            raise HTTPError(400, f"'adapter': expected a string, got {type(name).__name__}")
        try:
            adapter = self.engine.adapter(name)
        except KeyError as e:
            raise HTTPError(404 if name is not None else 400, e.args[0]) from None
        return adapter, records, rs


def serve(a, load_engine) -> None:
    """Run the server until SIGTERM / SIGINT (``a``: the parsed ``ltuning serve`` flags)."""
    import uvicorn

    state = App(load_engine, a.max_batch_tokens, a.max_wait_ms, a.max_queue_examples, a.max_inputs,
                a.max_body_bytes, a.max_idle_ms)
    config = uvicorn.Config(state.app, host=a.host, port=a.port, log_level="warning", access_log=False,
                            timeout_graceful_shutdown=60, lifespan="on")
    server = uvicorn.Server(config)

    def failed(e):
        server.should_exit = True

    state.on_load_error = failed

    def announce():
        state.ready.wait()
        q = f", {state.engine.quantize}" if state.engine.quantize else ""
        print(f"ltuning serve: ready on http://{a.host}:{a.port} ({', '.join(state.engine.adapters)}; "
              f"{state.engine.dtype}{q})", file=sys.stderr, flush=True)

    threading.Thread(target=announce, daemon=True).start()
    # uvicorn handles SIGTERM / SIGINT while it runs (graceful shutdown) and re-raises the signal to the handler
    # that was there before once it is done: a no-op here, so a drained shutdown exits 0 rather than dying by it
    import signal
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: None)
    server.run()
    if state.load_error is not None:
        e = state.load_error
        raise ValueError(f"loading the model failed: {e.args[0] if isinstance(e, KeyError) else e}")
    if not server.started:
        raise ValueError(f"--host {a.host} --port {a.port}: could not listen there (in use?)")
