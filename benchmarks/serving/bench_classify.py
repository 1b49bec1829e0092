"""Offline classification throughput, side by side in ONE process: ltuning's engine (each method; fp32 / bf16 /
dynamic int8) against what a user would run instead: Hugging Face ``pipeline("text-classification")`` on a
LoRA-merged sequence-classification model (in fp32, and in bf16 too when bf16 rows are timed on a native-bf16
CPU: the merged model ``.to(torch.bfloat16)``, the same pipeline call), and a PEFT prefix-tuned model's batched
forward (fp32, batches of 32 in input order). Also the streamed ``classify_file`` against the in-memory engine on
the same inputs, and (``--accuracy-adapter``, repeatable) the accuracy of trained adapters in fp32 / int8 / bf16
on the dev set of each adapter's own dataset.

Speed does not depend on the adapter's weights, so the throughput adapters are untrained (saved at
initialisation).

The one-pass ceiling, per row, from the model's OWN matrix products in the row's own numeric path:

* After the Engine is loaded (bf16 conversion, LoRA merge, int8 dynamic quantization done), forward hooks on a
  short warm batch find the Linear modules of the frozen transformer (``torch.nn.Linear`` and
  ``torch.ao.nn.quantized.dynamic.Linear``) that run per token: called in the forward, with at least one row per
  padded input token of the batch (so a BERT pooler, which sees one row per input, is out; the input embedding,
  a tied lm_head and the classification head are not Linears of the transformer and are out). Each module counts
  once per call per forward: ``P_lin = sum(in * out * calls per forward)``.
* ``m`` = the median tokens through the per-token layers (rows x padded length, K rows per input for
  label-conditioned K-pass methods; the real tokens where the engine runs the batch packed) of the forwards that the engine's planner (:func:`ltuning.batching.plan_batches`, the engine's own arguments)
  makes of THESE inputs.
* The probe: one sweep = every module (each as many times as it is called per forward) on a random (m, in)
  input in the dtype the model feeds it (bf16 under the engine's bf16 autocast; fp32 for fp32 and for int8's
  dynamic Linears), ``2 * m * P_lin`` flops. Rate = median over ``--probe-samples`` (>= 5) samples of whole
  sweeps, each sample >= ``--probe-min-seconds`` (0.05 s). Measured BEFORE and AFTER the timed row; the row
  uses the median of the two samples' sets (both recorded: a large gap says the machine's load changed).
* ``one-pass ceiling (ex/s) = rate / (2 * P_lin * real tokens per example)``, real tokens = the unpadded input
  tokens (prefix / bank tokens excluded: they are the method's extra work). ``utilisation = ex/s / ceiling``.

So the ceiling counts only the per-token Linear products at the rate they run at in this model, shape and dtype;
attention, padding, norms, activations, embedding, the head, the label side and Python overhead all count as lost
time. Utilisation is therefore <= ~100 % by construction (above it only when the probe ran slow, e.g. under load:
compare ``probe_gflops_before`` / ``_after``). A K-pass method runs K forwards per example against a one-pass
ceiling, by design (that is its cost).

Row fields (record version 2): ``probe_gflops_before``, ``probe_gflops_after``, ``probe_gflops`` (the median of
both sets' samples), ``probe_m``, ``probe_modules``, ``p_lin``, ``tokens_per_example``, ``one_pass_ceiling_ex_s``,
``utilisation``, ``packed`` (the engine ran the row's batches packed, :mod:`ltuning.models.packing`; rows of
``--padded-methods`` repeat a method with padded batches, system ``"ltuning METHOD --no-pack"``). The version-1 field ``matrix_gflops`` (one (512, d) x (d, 4d) GEMM in fp32/bf16 before the
row) is gone; HF baseline rows carry no probe.

    OMP_NUM_THREADS=1 python benchmarks/serving/bench_classify.py --out benchmarks/results/serving_classify.json
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time

sys.path[:0] = [os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."),
                os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."),
                os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "accuracy")]

import psutil  # noqa: E402
import torch  # noqa: E402

import ltuning  # noqa: E402
from ltuning.data import default_label_text, label_names_of, read_records  # noqa: E402
from ltuning.io import read_adapter_config  # noqa: E402
from ltuning.models import load_base  # noqa: E402
from ltuning.serving import cpu  # noqa: E402
from ltuning.serving.engine import Engine  # noqa: E402
from ltuning.serving.stream import classify_file  # noqa: E402

from experiment import parse_method  # noqa: E402
from common import DATA  # noqa: E402


class PeakRSS:
    """Peak resident memory of this process while the block runs (sampled every 10 ms)."""

    def __enter__(self):
        self.proc = psutil.Process()
        self.peak = self.proc.memory_info().rss
        self.stop = threading.Event()
        self.t = threading.Thread(target=self._poll, daemon=True)
        self.t.start()
        return self

    def _poll(self):
        while not self.stop.wait(0.01):
            self.peak = max(self.peak, self.proc.memory_info().rss)

    def __exit__(self, *exc):
        self.stop.set()
        self.t.join()
        self.mb = self.peak / 2**20


def parse_accuracy_adapters(items: list, default_data: str = "sst2") -> list:
    """``["DIR", "DIR@sst2", ...]`` -> ``[(DIR, dataset)]`` (a DIR that exists as given keeps any "@" in it);
    each dataset must be a folder of the shared data with a dev.jsonl."""
    out = []
    for it in items:
        d, sep, ds = it.rpartition("@")
        if not sep or os.path.isdir(it):
            d, ds = it, default_data
        if not os.path.isfile(os.path.join(DATA, ds, "dev.jsonl")):
            raise ValueError(f"--accuracy-adapter {it!r}: no dataset {ds!r} (expected {DATA}/{ds}/dev.jsonl)")
        out.append((d, ds))
    return out


def make_adapter(model_name, method, labels, out):
    """An untrained adapter of ``method`` (a name or a variant, ``lt-prefix:scoring=onepass``) saved to ``out``."""
    base, tok = load_base(model_name)
    texts = [default_label_text(n) for n in labels]
    torch.manual_seed(0)
    name, opts = parse_method(method)
    clf = ltuning.Classifier(model_name, name, label_names=labels, base=base, tokenizer=tok, **opts)
    clf.build(labels)
    clf.model.config.label_texts = texts
    clf.save_pretrained(out)
    ltuning.unpatch(clf.model)
    return out


def _linear_types() -> tuple:
    from torch.ao.nn.quantized.dynamic import Linear as DynamicLinear
    return (torch.nn.Linear, DynamicLinear)


def per_token_linears(model, base, run) -> list:
    """``[(name, module, calls per forward)]``: the Linears of ``base`` (the frozen transformer) that run per token
    when ``run()`` runs ``model`` (an ``LTuningModel``) on a batch of padded inputs of >= 2 tokens: called, each
    call with >= B * T rows (B * T = the padded input tokens of that forward; its real tokens when the model runs
    packed, :mod:`ltuning.models.packing`). Modules whose weight is the input
    embedding's (tied) are out. Forward hooks count the calls (module docstring)."""
    emb = base.get_input_embeddings()
    emb_ptr = emb.weight.data_ptr() if emb is not None else None
    forwards, calls, short = [], {}, set()
    cands = [(n, mod) for n, mod in base.named_modules() if isinstance(mod, _linear_types())]

    def pre(_, args, kwargs):
        ids = kwargs.get("input_ids", args[0] if args else None)
        mask = kwargs.get("attention_mask", args[1] if len(args) > 1 else None)
        packed = getattr(model, "pack_inputs", False) and mask is not None  # the Linears see the real tokens
        forwards.append(int(mask.sum()) if packed else ids.shape[0] * ids.shape[1])

    def hook(name, mod):
        def fn(_, inputs, output):
            x = inputs[0]
            calls[name] = calls.get(name, 0) + 1
            if x.numel() // mod.in_features < forwards[-1]:
                short.add(name)
        return fn
    handles = [model.register_forward_pre_hook(pre, with_kwargs=True)]
    handles += [mod.register_forward_hook(hook(n, mod)) for n, mod in cands]
    try:
        run()
    finally:
        for h in handles:
            h.remove()
    if not forwards or min(forwards) < 2:
        raise ValueError("per_token_linears needs at least one forward of padded inputs of >= 2 tokens")
    out = []
    for n, mod in cands:
        if n not in calls or n in short:
            continue
        w = getattr(mod, "weight", None)
        w = w() if callable(w) else w  # dynamic int8 Linear: weight() is a method
        if emb_ptr is not None and isinstance(w, torch.Tensor) and not w.is_quantized and w.data_ptr() == emb_ptr:
            continue
        per = calls[n] / len(forwards)
        if per != int(per):
            raise ValueError(f"{n}: {calls[n]} calls in {len(forwards)} forwards (not a whole number per forward)")
        out.append((n, mod, int(per)))
    return out


def linear_params(mods: list) -> int:
    """``P_lin = sum(in * out * calls per forward)`` of ``[(name, module, calls)]``."""
    return sum(mod.in_features * mod.out_features * c for _, mod, c in mods)


def adapter_scoring(directory: str) -> str | None:
    """The label scoring an adapter was built with (its saved, resolved method config), or None for methods
    that score no labels."""
    with open(os.path.join(directory, "adapter_config.json")) as f:
        mc = json.load(f).get("method_config", {})
    return mc.get("scoring", "kpass") if mc.get("method", "").startswith("lt-") else None


def one_pass_ceiling(rate_gflops: float, p_lin: int, tokens_per_example: float) -> float:
    """Examples/s if every real input token went once through the per-token Linears at the probed rate:
    ``rate * 1e9 / (2 * P_lin * tokens per example)``."""
    return rate_gflops * 1e9 / (2 * p_lin * tokens_per_example)


def planned_tokens(engine, adapter, ids) -> list:
    """Tokens through the per-token layers of each forward the engine's planner makes of ``ids`` (the arguments
    of :meth:`Engine.score_ids`): real tokens where the adapter runs packed, else padded rows x padded length."""
    lengths = [len(x) for x in ids]
    return [engine.batch_tokens(adapter, lengths, b) for b in engine.plan(adapter, lengths)]


def probe_samples(mods: list, m: int, dtype: str, samples: int = 5, min_seconds: float = 0.05) -> list:
    """GFLOP/s of ``samples`` timed samples, each of whole sweeps over ``mods`` (each module ``calls`` times) on a
    random (m, in_features) input in the dtype it is fed (``dtype`` "bf16": bf16 under the engine's autocast;
    fp32 otherwise, which a dynamic int8 Linear takes), for >= ``min_seconds``."""
    from ltuning.inference import autocast
    g = torch.Generator().manual_seed(0)
    xs = {}
    for _, mod, _ in mods:
        w = getattr(mod, "weight", None)
        dt = w.dtype if isinstance(w, torch.Tensor) and not callable(w) and w.is_floating_point() else torch.float32
        if (mod.in_features, dt) not in xs:
            xs[(mod.in_features, dt)] = torch.randn(m, mod.in_features, generator=g).to(dt)
    plan = []
    for _, mod, c in mods:
        w = getattr(mod, "weight", None)
        dt = w.dtype if isinstance(w, torch.Tensor) and not callable(w) and w.is_floating_point() else torch.float32
        plan += [(mod, xs[(mod.in_features, dt)])] * c
    flops = 2 * m * linear_params(mods)

    def sweep():
        for mod, x in plan:
            mod(x)
    with torch.inference_mode(), autocast(dtype):
        sweep()  # warm
        t0 = time.perf_counter()
        sweep()
        inner = max(1, int(-(-min_seconds // max(time.perf_counter() - t0, 1e-9))))
        rates = []
        for _ in range(samples):
            t0 = time.perf_counter()
            for _ in range(inner):
                sweep()
            rates.append(flops * inner / (time.perf_counter() - t0) / 1e9)
    return rates


def probe_engine(e, a, ids, samples: int = 5, min_seconds: float = 0.05) -> dict:
    """What the probe needs from a loaded engine: the per-token Linears (found on a warm batch of ``ids``), P_lin,
    the module count and ``m`` (the median planned tokens per forward of ``ids``, :func:`planned_tokens`)."""
    warm = [x for x in ids if len(x) >= 2][:8] or [list(ids[0]) * 2]
    mods = per_token_linears(a.model, e.base, lambda: e.score_ids(a, warm))
    if not mods:
        raise ValueError("no per-token Linear found in the engine's forward")
    return {"mods": mods, "p_lin": linear_params(mods), "modules": len(mods),
            "m": int(statistics.median(planned_tokens(e, a, ids))), "samples": samples, "min_seconds": min_seconds}


def run_engine(adapter_dir, dtype, quantize, ids_by_adapter, threads, probe_samples_n=5, probe_min_seconds=0.05,
               pack=True):
    """Load, warm, probe (before), time ``score_ids`` over all inputs, probe (after). Returns
    ``(engine, adapter, ids, scores, seconds, peak RSS MB, probe)``; ``probe``: the fields of a row (module
    docstring). ``pack``: the engine's packed batches (False: padded, for the side-by-side rows)."""
    e = Engine({"a": adapter_dir}, dtype=dtype, quantize=quantize, threads=threads, pack=pack)
    a = e.adapters["a"]
    ids = e.tokenize(ids_by_adapter, a)
    e.score_ids(a, ids[:8])  # warm
    pr = probe_engine(e, a, ids, probe_samples_n, probe_min_seconds)
    before = probe_samples(pr["mods"], pr["m"], e.dtype, pr["samples"], pr["min_seconds"])
    with PeakRSS() as rss:
        t0 = time.perf_counter()
        scores = e.score_ids(a, ids)
        dt = time.perf_counter() - t0
    after = probe_samples(pr["mods"], pr["m"], e.dtype, pr["samples"], pr["min_seconds"])
    probe = {"probe_gflops_before": statistics.median(before), "probe_gflops_after": statistics.median(after),
             "probe_gflops": statistics.median(before + after), "probe_samples_before": before,
             "probe_samples_after": after, "probe_m": pr["m"], "probe_modules": pr["modules"], "p_lin": pr["p_lin"],
             "packed": bool(a.model.pack_inputs)}
    return e, a, ids, scores, dt, rss.mb, probe


def hf_baselines(model_name, labels, records, threads, which, pipeline_dtypes=("fp32",)):
    """``(name, dtype, seconds, rss MB)`` of the HF pipeline on a LoRA-merged seq-cls model (once per dtype of
    ``pipeline_dtypes``: "fp32", "bf16" = the merged model ``.to(torch.bfloat16)``), and of the PEFT prefix
    batched forward (fp32); ``(name, dtype, None, error)`` when PEFT refuses the model."""
    from peft import LoraConfig, PrefixTuningConfig, get_peft_model
    from transformers import AutoModelForSequenceClassification, AutoTokenizer, pipeline

    from ltuning.models import resolve_model
    path, gguf = resolve_model(model_name)
    kw = {"gguf_file": gguf} if gguf else {}
    texts = [r["text"] if "text" in r else f"{r['premise']}\n{r['hypothesis']}" for r in records]
    out = []
    jobs = [(n, d) for n in which for d in (pipeline_dtypes if n == "hf-pipeline-lora-merged" else ("fp32",))]
    for name, dtype in jobs:
        tok = AutoTokenizer.from_pretrained(path, **kw)
        if tok.pad_token is None:
            tok.pad_token = tok.eos_token
        m = AutoModelForSequenceClassification.from_pretrained(path, num_labels=len(labels), **kw)
        m.config.pad_token_id = tok.pad_token_id
        m.eval()
        if name == "hf-pipeline-lora-merged":
            m = get_peft_model(m, LoraConfig(task_type="SEQ_CLS", r=8, lora_alpha=16)).merge_and_unload()
            if dtype == "bf16":
                m = m.to(torch.bfloat16)
            pipe = pipeline("text-classification", model=m, tokenizer=tok, device=-1, top_k=None)
            pipe(texts[:4], batch_size=4, truncation=True, max_length=128)
            with PeakRSS() as rss, torch.inference_mode():
                t0 = time.perf_counter()
                pipe(texts, batch_size=32, truncation=True, max_length=128)
                dt = time.perf_counter() - t0
        else:
            m = get_peft_model(m, PrefixTuningConfig(task_type="SEQ_CLS", num_virtual_tokens=20))
            m.eval()

            def run(model, ts):  # the model passed in: `del m` below makes a closure over m read as undefined
                for s in range(0, len(ts), 32):
                    b = tok(ts[s:s + 32], padding=True, truncation=True, max_length=128, return_tensors="pt")
                    model(**b)
            with torch.inference_mode():
                try:
                    run(m, texts[:4])
                except ValueError as e:  # e.g. PEFT: BERT "does not support past key values"
                    out.append((name, dtype, None, str(e)))
                    continue
                with PeakRSS() as rss:
                    t0 = time.perf_counter()
                    run(m, texts)
                    dt = time.perf_counter() - t0
        out.append((name, dtype, dt, rss.mb))
        del m
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="smollm2-135m,minilm-l6")
    ap.add_argument("--datasets", default="sst2,banking77")
    ap.add_argument("--n", type=int, default=256, help="dev examples per dataset (the first N)")
    ap.add_argument("--kpass-n", type=int, default=32, help="dev examples for label-conditioned methods when K > 2")
    ap.add_argument("--methods", default="prefix,lora,lt-prefix:scoring=kpass,lt-prefix:scoring=onepass",
                    help="methods or variants (lt-prefix:scoring=onepass), comma-separated")
    ap.add_argument("--dtypes", default="fp32,bf16,int8")
    ap.add_argument("--dtype-methods", default="prefix,lora", help="methods also timed in the dtypes besides fp32")
    ap.add_argument("--baselines", default="hf-pipeline-lora-merged,peft-prefix")
    ap.add_argument("--stream-check", action="store_true", help="also time classify_file vs in-memory (prefix fp32)")
    ap.add_argument("--stream-reps", type=int, default=3, help="alternated streamed / in-memory repetitions")
    ap.add_argument("--accuracy-adapter", action="append", default=[],
                    help="a trained adapter, DIR or DIR@DATASET (repeatable): its fp32 / int8 / bf16 accuracy on "
                         "the dev set of its dataset")
    ap.add_argument("--accuracy-data", default="sst2", help="the dataset of the adapters given without @DATASET")
    ap.add_argument("--accuracy-n", type=int, default=None, help="the first N dev examples (default: all)")
    ap.add_argument("--padded-methods", default="",
                    help="methods (of --methods) also run with padded batches (Engine pack=False), beside the "
                         "packed default, in each of their dtypes: rows 'ltuning METHOD --no-pack'")
    ap.add_argument("--probe-samples", type=int, default=5, help="timed samples per probe (before and after a row)")
    ap.add_argument("--probe-min-seconds", type=float, default=0.05, help="least duration of one probe sample")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", required=True)
    a = ap.parse_args(argv)
    if a.probe_samples < 5 or a.probe_min_seconds <= 0:
        ap.error("--probe-samples must be >= 5 and --probe-min-seconds > 0")
    try:
        accuracy_jobs = parse_accuracy_adapters(a.accuracy_adapter, a.accuracy_data)
    except ValueError as e:
        ap.error(str(e))
    torch.set_num_threads(a.threads)
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    rec = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"), "commit": commit,
           "command": "OMP_NUM_THREADS=%s python benchmarks/serving/bench_classify.py %s" % (
               os.environ.get("OMP_NUM_THREADS", ""), " ".join(sys.argv[1:] if argv is None else argv)),
           "record_version": 2, "machine": cpu.machine(), "preferred_dtype": cpu.preferred_dtype(),
           "load_average_start": os.getloadavg(),
           "rows": [], "accuracy": []}
    tmp = tempfile.mkdtemp(prefix="bench_classify_")

    def save():
        os.makedirs(os.path.dirname(os.path.abspath(a.out)), exist_ok=True)
        with open(a.out, "w") as f:
            json.dump(rec, f, indent=1)

    for model_name in [m for m in a.models.split(",") if m]:
        for ds in a.datasets.split(","):
            dev = read_records(os.path.join(DATA, ds, "dev.jsonl"))
            labels = label_names_of(read_records(os.path.join(DATA, ds, "dev.jsonl")))
            if a.baselines:
                recs = dev[:a.n]
                hf_dtypes = ["fp32"] + (["bf16"] if "bf16" in a.dtypes.split(",") and cpu.native_bf16() else [])
                for name, hdt, dt, rss in hf_baselines(model_name, labels, recs, a.threads, a.baselines.split(","),
                                                       hf_dtypes):
                    if dt is None:
                        rec.setdefault("unsupported", []).append({"model": model_name, "system": name, "error": rss})
                        continue
                    row = {"model": model_name, "dataset": ds, "system": name, "dtype": hdt,
                           "examples": len(recs), "labels": len(labels), "seconds": dt,
                           "examples_per_s": len(recs) / dt, "peak_rss_mb": rss,
                           "subset": f"first {len(recs)} of {len(dev)} dev"}
                    print(json.dumps(row), flush=True)
                    rec["rows"].append(row)
                    save()
            for method in a.methods.split(","):
                ad = make_adapter(model_name, method, labels, os.path.join(tmp, f"{model_name}-{ds}-{method}"))
                # the scoring as built: a bare lt-prefix is onepass on encoders
                kpass = adapter_scoring(ad) == "kpass" and len(labels) > 2
                recs = dev[:a.kpass_n if kpass else a.n]
                runs = [(d, p) for d in a.dtypes.split(",") for p in
                        ((True, False) if method in a.padded_methods.split(",") else (True,))]
                for dtype, pack in runs:
                    if dtype == "bf16" and not cpu.native_bf16():
                        continue
                    if dtype != "fp32" and method not in a.dtype_methods.split(","):
                        continue
                    e, ad_, ids, _, dt, rss, probe = run_engine(
                        ad, "fp32" if dtype == "int8" else dtype, "int8" if dtype == "int8" else None, recs,
                        a.threads, a.probe_samples, a.probe_min_seconds, pack)
                    tokens = sum(len(x) for x in ids)  # real (unpadded) input tokens
                    ceiling = one_pass_ceiling(probe["probe_gflops"], probe["p_lin"], tokens / len(ids))
                    system = f"ltuning {method}" + ("" if pack else " --no-pack")
                    row = {"model": model_name, "dataset": ds, "system": system, "dtype": dtype,
                           "examples": len(ids), "labels": len(labels), "tokens_per_example": tokens / len(ids),
                           "seconds": dt, "examples_per_s": len(ids) / dt, "tokens_per_s": tokens / dt,
                           "peak_rss_mb": rss, **probe, "one_pass_ceiling_ex_s": ceiling,
                           "utilisation": len(ids) / dt / ceiling, "subset": f"first {len(ids)} of {len(dev)} dev"}
                    if a.stream_check and method == "prefix" and dtype == "fp32" and pack:
                        path = os.path.join(tmp, "in.jsonl")
                        with open(path, "w") as f:
                            f.write("".join(json.dumps(r) + "\n" for r in recs))
                        mem, st = [dt], []
                        for _ in range(a.stream_reps):  # streamed, then in-memory again (medians over the runs)
                            t0 = time.perf_counter()
                            classify_file(e, path, os.path.join(tmp, "out.jsonl"), progress=False)
                            st.append(time.perf_counter() - t0)
                            t0 = time.perf_counter()
                            e.score_ids(ad_, e.tokenize(recs, ad_))
                            mem.append(time.perf_counter() - t0)
                        row["stream_seconds_median"] = statistics.median(st)
                        row["in_memory_seconds_median"] = statistics.median(mem)
                        row["stream_loss"] = 1 - statistics.median(mem) / statistics.median(st)
                    print(json.dumps(row), flush=True)
                    rec["rows"].append(row)
                    del e
                    save()
    for directory, ds in accuracy_jobs:
        cfg = read_adapter_config(directory)
        mc = cfg.get("method_config", {})
        dev = read_records(os.path.join(DATA, ds, "dev.jsonl"))
        dev = dev[:a.accuracy_n] if a.accuracy_n else dev
        for dtype in ("fp32", "int8", "bf16"):
            if dtype == "bf16" and not cpu.native_bf16():
                continue
            e = Engine({"a": directory}, dtype="fp32" if dtype == "int8" else dtype,
                       quantize="int8" if dtype == "int8" else None, threads=a.threads)
            t0 = time.perf_counter()
            preds = [p for p, _ in e.classify(dev)]
            dt = time.perf_counter() - t0
            acc = sum(p == r["label"] for p, r in zip(preds, dev)) / len(dev)
            row = {"adapter": directory, "dataset": ds, "method": mc.get("method"),
                   "scoring": mc.get("scoring", cfg.get("scoring")), "base_model": cfg.get("base_model"),
                   "dtype": dtype, "examples": len(dev), "accuracy": acc, "examples_per_s": len(dev) / dt}
            print(json.dumps(row), flush=True)
            rec["accuracy"].append(row)
            del e
            save()
    rec["load_average_end"] = os.getloadavg()
    save()


if __name__ == "__main__":
    main()
