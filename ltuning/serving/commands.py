"""``ltuning classify`` (single-task adapters) and ``ltuning serve``: their flags and what they run.
``ltuning.cli`` only parses and calls these."""
from __future__ import annotations

import argparse
import sys


def add_engine_args(p, batch_rows_default: int = 64) -> None:
    p.add_argument("--adapter", required=True, action="append", metavar="[NAME=]DIR",
                   help="directory written by 'ltuning train' (repeatable: several adapters on one base; named by "
                        "the directory's last component or NAME=)")
    p.add_argument("--model", default=None, help="override the base model recorded in the adapter(s)")
    p.add_argument("--dtype", default="auto", choices=["auto", "fp32", "bf16"],
                   help="inference dtype of the frozen base: auto = bf16 where the CPU multiplies bf16 natively "
                        "(AMX / AVX512-BF16) and a probe GEMM is faster in bf16 here, fp32 otherwise")
    p.add_argument("--quantize", default=None, choices=["int8", "nf4", "none"],
                   help="int8: PyTorch dynamic int8 Linears in the frozen base (CPU inference); nf4: the base "
                        "through bitsandbytes 4-bit NF4 as 'ltuning train --quantize nf4' loads it; none: full "
                        "precision. Default: the adapters' recorded precision (nf4 if all were trained on NF4)")
    p.add_argument("--max-batch-tokens", type=int, default=4096,
                   help="token budget of one forward: tokens x scored rows (K rows per input for "
                        "label-conditioned methods), real tokens when the batch runs packed, else padded")
    p.add_argument("--batch-size", "--max-batch-rows", dest="batch_size", type=int, default=batch_rows_default,
                   help="at most this many scored rows per forward")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    p.add_argument("--shared-bank", action=argparse.BooleanOptionalAction, default=True,
                   help="several prefix-family adapters (prefix, apt, sk-prefix, lt-prefix; prompts on decoders) "
                        "in one batch: their banks side by side, each row indexing its own entry and scored by "
                        "its own head (--no-shared-bank: one batch per adapter)")
    p.add_argument("--pack", action=argparse.BooleanOptionalAction, default=True,
                   help="run each batch packed, its inputs' real tokens side by side in one row (decoders, no "
                        "padding through the Linears; batches planned by real tokens); --no-pack: padded batches")


def add_classify_args(c) -> None:
    add_engine_args(c)
    c.add_argument("--input", required=True,
                   help="JSONL/CSV/TSV with 'text' (or 'premise'+'hypothesis'); with several adapters an optional "
                        "'adapter' field per record")
    c.add_argument("--output", required=True,
                   help="JSONL to write: written chunk by chunk to OUTPUT.partial, renamed to OUTPUT when complete")
    c.add_argument("--resume", action="store_true", help="continue an interrupted run from OUTPUT.partial")
    c.add_argument("--chunk-size", type=int, default=1024, help="records read ahead and written per chunk")
    c.add_argument("--default-adapter", default=None,
                   help="adapter of records without an 'adapter' field when several are loaded")
    c.add_argument("--task", default=None, help="multi-task adapters: the task of records without a 'task' field")
    c.add_argument("--quiet", action="store_true", help="no progress bar")


def add_serve_args(s) -> None:
    add_engine_args(s)
    s.add_argument("--host", default="127.0.0.1", help="address to bind (loopback by default)")
    s.add_argument("--port", type=int, default=8080, help="TCP port")
    s.add_argument("--max-wait-ms", type=float, default=20.0,
                   help="longest a batch waits for more requests once the model is free to run it")
    s.add_argument("--max-idle-ms", type=float, default=5.0,
                   help="a batch runs early when no request arrived for this long (a lone request waits only this)")
    s.add_argument("--max-queue-examples", type=int, default=4096,
                   help="examples waiting at most; beyond it requests get 503 with Retry-After")
    s.add_argument("--max-inputs", type=int, default=256, help="inputs per request at most (else 413)")
    s.add_argument("--max-body-bytes", type=int, default=1 << 20, help="request body size at most (else 413)")


def recorded_quantize(adapters: dict) -> str | None:
    """The base precision to serve ``adapters`` ({name: DIR}) on when ``--quantize`` is not given: "nf4" when
    every adapter was trained on an NF4 base (as ``ltuning eval`` loads the recorded precision), else None (full
    precision; an adapter of another precision loads with a warning)."""
    from ..io import read_adapter_meta
    return "nf4" if {read_adapter_meta(d).quantize for d in adapters.values()} == {"nf4"} else None


def _engine(a):
    from .engine import Engine, parse_adapter_args
    if a.threads is not None and a.threads < 1:
        raise ValueError("--threads must be >= 1")
    adapters = parse_adapter_args(a.adapter)
    quantize = a.quantize if a.quantize is not None else recorded_quantize(adapters)
    return Engine(adapters, model=a.model, dtype=a.dtype, quantize=quantize,
                  max_batch_tokens=a.max_batch_tokens, max_batch_rows=a.batch_size, threads=a.threads,
                  shared_bank=getattr(a, "shared_bank", True), pack=getattr(a, "pack", True))


def run_classify(a) -> dict:
    """``ltuning classify``. Returns the closing summary (printed as the last JSON line).

    Single-task adapters on a full-precision, dynamic-int8 or NF4 base: the streamed engine (:mod:`.stream`; under
    torchrun each rank scores its share of every chunk and rank 0 writes). A multi-task adapter
    (:mod:`ltuning.tasks`), one adapter with ``--quantize none`` (the adapter's recorded precision overridden,
    as ``ltuning eval --quantize`` does) or one adapter trained on an LLM.int8 base without ``--quantize`` (loaded
    on that precision again, through bitsandbytes): held in memory (:func:`classify_in_memory`). Without
    ``--quantize``, adapters trained on an NF4 base are served on one (:func:`recorded_quantize`)."""
    import argparse
    import os

    from ..io import read_adapter_meta
    from ..preflight import check_adapter_and_output
    from .engine import parse_adapter_args
    from .stream import classify_file
    adapters = parse_adapter_args(a.adapter)
    only = next(iter(adapters.values()))
    meta = read_adapter_meta(only)
    if len(adapters) == 1 and (a.quantize == "none" or meta.multitask is not None
                               or (a.quantize is None and meta.quantize == "int8")):
        return classify_in_memory(argparse.Namespace(**{**vars(a), "adapter": only}))
    for d in adapters.values():  # the checks of the preflight, the input not read whole
        check_adapter_and_output(argparse.Namespace(**{**vars(a), "adapter": d}))
    if not os.path.isfile(a.input):
        raise FileNotFoundError(f"--input {a.input}: no such file")
    if a.task:
        raise ValueError("--task applies to multi-task adapters")
    engine = _engine(a)
    engine.warmup()  # kernel builds and label-side caches before the clock starts
    summary = classify_file(engine, a.input, a.output, resume=a.resume, chunk_size=a.chunk_size,
                            progress=not a.quiet, default_adapter=a.default_adapter)
    summary.update(dtype=engine.dtype, quantize=engine.quantize, adapters=list(engine.adapters))
    return summary


def classify_in_memory(a) -> dict:
    """One adapter (``a.adapter``: its directory), every record in memory, the output written atomically by rank 0
    (a single-task adapter's inputs are sharded over the ranks under torchrun)."""
    import json
    import os

    from ..classifier import Classifier
    from ..data import read_records
    from ..distributed import is_main
    from ..io import atomic_write_bytes, read_adapter_meta
    from ..models import load_base
    from ..preflight import check_classify_inputs
    check_classify_inputs(a)
    recs = read_records(a.input, require_label=False)
    meta = read_adapter_meta(a.adapter)
    if meta.multitask is not None:
        from ..tasks import classify, load
        base, tok = load_base(a.model) if a.model else (None, None)
        router, labels, max_length, dtype = load(a.adapter, base, tok)
        per_label = [s for _, s in classify(router, labels, recs, a.task, max_length, a.batch_size, dtype)]
    else:
        if a.task:
            raise ValueError(f"--task applies to multi-task adapters; {a.adapter} has one task")
        quantize = a.quantize or "recorded"
        recorded = meta.classifier or {}
        q = recorded.get("quantize") if quantize == "recorded" else quantize
        base, tok = (load_base(a.model, recorded.get("dtype", "fp32"), None if q == "none" else q) if a.model
                     else (None, None))
        clf = Classifier.from_pretrained(a.adapter, base, tok, quantize=quantize)
        per_label = [dict(zip(clf.label_names, s)) for s in clf.predict_scores(recs, a.batch_size, True).tolist()]
    lines = []
    for r, s in zip(recs, per_label):
        out = dict(r)
        out["prediction"] = max(s, key=s.__getitem__)
        out["scores"] = s
        lines.append(json.dumps(out, ensure_ascii=False))
    if is_main():  # torchrun: rank 0 writes the merged output
        atomic_write_bytes(a.output, ("\n".join(lines) + "\n").encode())
    return {"classified": len(recs), "output": os.path.abspath(a.output)}


def run_serve(a) -> dict:
    from .server import serve
    for flag in ("max_queue_examples", "max_inputs", "max_body_bytes", "max_batch_tokens", "batch_size"):
        if getattr(a, flag) < 1:
            raise ValueError(f"--{flag.replace('_', '-')} must be >= 1")
    if a.max_wait_ms < 0:
        raise ValueError("--max-wait-ms must be >= 0")
    if a.max_idle_ms < 0:
        raise ValueError("--max-idle-ms must be >= 0")
    if not 0 < a.port < 65536:
        raise ValueError(f"--port {a.port}: expected 1..65535")
    from .engine import parse_adapter_args
    parse_adapter_args(a.adapter)  # bad directories fail before the server starts
    import socket
    try:
        with socket.create_server((a.host, a.port)):
            pass
    except OSError as e:
        raise ValueError(f"--host {a.host} --port {a.port}: cannot listen there ({e.strerror})") from None
    serve(a, lambda: _engine(a))
    print("ltuning serve: stopped", file=sys.stderr)
    return {"served": True}
