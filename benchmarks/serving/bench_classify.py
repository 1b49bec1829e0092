"""Offline classification throughput, side by side in ONE process: ltuning's engine (each method; fp32 / bf16 /
dynamic int8) against what a user would run instead: Hugging Face ``pipeline("text-classification")`` on a
LoRA-merged sequence-classification model, and a PEFT prefix-tuned model's batched forward (batches of 32 in input
order). Also the streamed ``classify_file`` against the in-memory engine on the same inputs, and (with
``--accuracy-adapter``) the accuracy of one trained adapter in fp32 / int8 / bf16 on the dev subset.

Speed does not depend on the adapter's weights, so the throughput adapters are untrained (saved at
initialisation); the matrix rate (median GFLOP/s of a (512, d) x (d, 4d)-class GEMM in the variant's dtype) is
measured just before each variant, and the one-pass ceiling is ``rate / (2 * non-embedding parameters * real
tokens per example)`` examples/s (one forward pass per example; attention flops ignored).

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


def nonembed_params(base) -> int:
    emb = base.get_input_embeddings().weight.numel()
    return sum(p.numel() for p in base.parameters()) - emb


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


def gemm_rate(dtype: str, d: int) -> float:
    return cpu.gemm_gflops(torch.bfloat16 if dtype == "bf16" else torch.float32, m=512, k=d, n=4 * d, reps=5)


def run_engine(adapter_dir, dtype, quantize, ids_by_adapter, threads):
    e = Engine({"a": adapter_dir}, dtype=dtype, quantize=quantize, threads=threads)
    a = e.adapters["a"]
    ids = e.tokenize(ids_by_adapter, a)
    e.score_ids(a, ids[:8])  # warm
    with PeakRSS() as rss:
        t0 = time.perf_counter()
        scores = e.score_ids(a, ids)
        dt = time.perf_counter() - t0
    return e, a, ids, scores, dt, rss.mb


def hf_baselines(model_name, labels, records, threads, which):
    """(name, seconds, rss) of HF pipeline on a LoRA-merged seq-cls model, and PEFT prefix batched forward."""
    from peft import LoraConfig, PrefixTuningConfig, get_peft_model
    from transformers import AutoModelForSequenceClassification, AutoTokenizer, pipeline

    from ltuning.models import resolve_model
    path, gguf = resolve_model(model_name)
    kw = {"gguf_file": gguf} if gguf else {}
    texts = [r["text"] if "text" in r else f"{r['premise']}\n{r['hypothesis']}" for r in records]
    out = []
    for name in which:
        tok = AutoTokenizer.from_pretrained(path, **kw)
        if tok.pad_token is None:
            tok.pad_token = tok.eos_token
        m = AutoModelForSequenceClassification.from_pretrained(path, num_labels=len(labels), **kw)
        m.config.pad_token_id = tok.pad_token_id
        m.eval()
        if name == "hf-pipeline-lora-merged":
            m = get_peft_model(m, LoraConfig(task_type="SEQ_CLS", r=8, lora_alpha=16)).merge_and_unload()
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
                    out.append((name, None, str(e)))
                    continue
                with PeakRSS() as rss:
                    t0 = time.perf_counter()
                    run(m, texts)
                    dt = time.perf_counter() - t0
        out.append((name, dt, rss.mb))
        del m
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="smollm2-135m,minilm-l6")
    ap.add_argument("--datasets", default="sst2,banking77")
    ap.add_argument("--n", type=int, default=256, help="dev examples per dataset (the first N)")
    ap.add_argument("--kpass-n", type=int, default=32, help="dev examples for label-conditioned methods when K > 2")
    ap.add_argument("--methods", default="prefix,lora,lt-prefix,lt-prefix:scoring=onepass",
                    help="methods or variants (lt-prefix:scoring=onepass), comma-separated")
    ap.add_argument("--dtypes", default="fp32,bf16,int8")
    ap.add_argument("--dtype-methods", default="prefix,lora", help="methods also timed in the dtypes besides fp32")
    ap.add_argument("--baselines", default="hf-pipeline-lora-merged,peft-prefix")
    ap.add_argument("--stream-check", action="store_true", help="also time classify_file vs in-memory (prefix fp32)")
    ap.add_argument("--stream-reps", type=int, default=3, help="alternated streamed / in-memory repetitions")
    ap.add_argument("--accuracy-adapter", default=None, help="a trained SST-2 adapter: fp32 / int8 / bf16 accuracy")
    ap.add_argument("--accuracy-n", type=int, default=872)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", required=True)
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    rec = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"), "commit": commit,
           "command": "OMP_NUM_THREADS=%s python benchmarks/serving/bench_classify.py %s" % (
               os.environ.get("OMP_NUM_THREADS", ""), " ".join(sys.argv[1:] if argv is None else argv)),
           "machine": cpu.machine(), "preferred_dtype": cpu.preferred_dtype(),
           "load_average_start": os.getloadavg(),
           "rows": [], "accuracy": []}
    tmp = tempfile.mkdtemp(prefix="bench_classify_")

    def save():
        os.makedirs(os.path.dirname(os.path.abspath(a.out)), exist_ok=True)
        with open(a.out, "w") as f:
            json.dump(rec, f, indent=1)

    for model_name in [m for m in a.models.split(",") if m]:
        base, _ = load_base(model_name)
        n_params = nonembed_params(base)
        d = base.config.hidden_size
        del base
        for ds in a.datasets.split(","):
            dev = read_records(os.path.join(DATA, ds, "dev.jsonl"))
            labels = label_names_of(read_records(os.path.join(DATA, ds, "dev.jsonl")))
            if a.baselines:
                recs = dev[:a.n]
                rate = gemm_rate("fp32", d)
                for name, dt, rss in hf_baselines(model_name, labels, recs, a.threads, a.baselines.split(",")):
                    if dt is None:
                        rec.setdefault("unsupported", []).append({"model": model_name, "system": name, "error": rss})
                        continue
                    row = {"model": model_name, "dataset": ds, "system": name, "dtype": "fp32",
                           "examples": len(recs), "labels": len(labels), "seconds": dt,
                           "examples_per_s": len(recs) / dt, "peak_rss_mb": rss, "matrix_gflops": rate,
                           "subset": f"first {len(recs)} of {len(dev)} dev"}
                    print(json.dumps(row), flush=True)
                    rec["rows"].append(row)
                    save()
            for method in a.methods.split(","):
                ad = make_adapter(model_name, method, labels, os.path.join(tmp, f"{model_name}-{ds}-{method}"))
                name, opts = parse_method(method)
                kpass = name.startswith("lt-") and opts.get("scoring", "kpass") == "kpass" and len(labels) > 2
                recs = dev[:a.kpass_n if kpass else a.n]
                for dtype in a.dtypes.split(","):
                    if dtype == "bf16" and not cpu.native_bf16():
                        continue
                    if dtype != "fp32" and method not in a.dtype_methods.split(","):
                        continue
                    rate = gemm_rate("bf16" if dtype == "bf16" else "fp32", d)
                    e, ad_, ids, _, dt, rss = run_engine(ad, "fp32" if dtype == "int8" else dtype,
                                                         "int8" if dtype == "int8" else None, recs, a.threads)
                    tokens = sum(len(x) for x in ids)
                    ceiling = rate * 1e9 / (2 * n_params * tokens / len(ids))
                    row = {"model": model_name, "dataset": ds, "system": f"ltuning {method}", "dtype": dtype,
                           "examples": len(ids), "labels": len(labels), "tokens_per_example": tokens / len(ids),
                           "seconds": dt, "examples_per_s": len(ids) / dt, "tokens_per_s": tokens / dt,
                           "peak_rss_mb": rss, "matrix_gflops": rate, "one_pass_ceiling_ex_s": ceiling,
                           "utilisation": len(ids) / dt / ceiling, "subset": f"first {len(ids)} of {len(dev)} dev"}
                    if a.stream_check and method == "prefix" and dtype == "fp32":
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
    if a.accuracy_adapter:
        dev = read_records(os.path.join(DATA, "sst2", "dev.jsonl"))[:a.accuracy_n]
        for dtype in ("fp32", "int8", "bf16"):
            if dtype == "bf16" and not cpu.native_bf16():
                continue
            e = Engine({"a": a.accuracy_adapter}, dtype="fp32" if dtype == "int8" else dtype,
                       quantize="int8" if dtype == "int8" else None, threads=a.threads)
            t0 = time.perf_counter()
            preds = [p for p, _ in e.classify(dev)]
            dt = time.perf_counter() - t0
            acc = sum(p == r["label"] for p, r in zip(preds, dev)) / len(dev)
            row = {"adapter": a.accuracy_adapter, "dtype": dtype, "examples": len(dev), "accuracy": acc,
                   "examples_per_s": len(dev) / dt}
            print(json.dumps(row), flush=True)
            rec["accuracy"].append(row)
            del e
            save()
    rec["load_average_end"] = os.getloadavg()
    save()


if __name__ == "__main__":
    main()
