"""Speed of the three label scorings (issue 20): training and classification examples/s and peak RSS of lt-prefix
with ``scoring`` kpass / onepass / shared-input at K = 2 (SST-2), 3 (SNLI, carved) and 77 (BANKING77), against
LoRA (r=8 on q, v; one pass per example by construction), on SmolLM2-135M and MiniLM-L6, fp32.

Every (model, K, configuration) runs in its own fresh subprocess (so ``ru_maxrss`` is that configuration's peak
RSS; the base model's load is part of it and reported separately as ``rss_after_load_mb``). In it: the same
seeded batch of ``--batch-size`` training examples (the task's train split; SNLI has only a dev file: it is
carved, see :func:`carve_snli`), one warm-up optimizer step (the trainer's AdamW,
:func:`ltuning.train.make_optimizer`; the model's own ``loss``), then ``--steps`` timed steps, median step
time -> train examples/s; then classification of the same ``--classify`` seeded examples
(``ltuning.inference.predict_scores``, batch 16), one warm-up batch, timed pass -> classify examples/s.
kpass at K = 77 is the slowest configuration by far and gets fewer timed steps / classified examples
(``KPASS77``), recorded in the JSON. Configurations run in the order model -> K -> configuration, so the variants
of one (model, K) run back to back. The machine was shared with other jobs during the recorded run: ratios
between neighbouring rows are more reliable than absolute figures.

    OMP_NUM_THREADS=1 python benchmarks/serving/bench_scoring.py [--models smollm2-135m,minilm-l6] [--ks 2,3,77]
        [--json benchmarks/results/scoring_speed_runs.json]
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import random
import resource
import statistics
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [os.path.dirname(os.path.dirname(HERE)), os.path.dirname(HERE),
                os.path.join(os.path.dirname(HERE), "accuracy")]
from common import DATA, RESULTS, ROOT  # noqa: E402
from experiment import parse_method  # noqa: E402
TASKS = {2: "sst2", 3: "snli", 77: "banking77"}
# also "onepass-unmerged" (merge_label_tokens=False), any "<scoring>:<field>=<value>+..." lt-prefix config,
# e.g. "onepass:variant=pooled", and ":pack=false" on any of them (padded batches; decoders pack by default) or
# ":optimizer=default" (torch's default AdamW instead of the trainer's fused one)
CONFIGS = ["kpass", "onepass", "shared-input", "lora"]
KPASS77 = {"steps": 1, "classify": 16}


def carve_snli(seed: int = 0, dev_fraction: float = 0.5):
    """SNLI has only its dev file here: a seeded, disjoint (train, dev) split of it (``dev_fraction`` to dev)."""
    recs = [json.loads(x) for x in open(os.path.join(DATA, "snli", "dev.jsonl"))]
    idx = list(range(len(recs)))
    random.Random(seed).shuffle(idx)
    n_dev = int(len(recs) * dev_fraction)
    return [recs[i] for i in idx[n_dev:]], [recs[i] for i in idx[:n_dev]]


def load_task(K: int, split: str = "train"):
    if TASKS[K] == "snli":
        tr, dv = carve_snli()
        return tr if split == "train" else dv
    return [json.loads(x) for x in open(os.path.join(DATA, TASKS[K], f"{split}.jsonl"))]


def rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def run_one(model_name: str, K: int, config: str, batch_size: int, steps: int, n_classify: int) -> dict:
    import torch

    from ltuning.data import collate, encode, label_names_of
    from ltuning.inference import predict_scores
    from ltuning.models import load_base
    from ltuning.train import make_optimizer

    base, tok = load_base(model_name)
    rss_load = rss_mb()
    recs = load_task(K)
    names = label_names_of(recs)
    assert len(names) == K, (len(names), K)
    torch.manual_seed(0)
    name = parse_method(config)[0]
    model = make_model(config, base, tok, names)
    rng = random.Random(0)
    sample = rng.sample(recs, batch_size + n_classify)
    enc = encode(sample, tok, names, 128, model.info.causal)
    batch = collate(enc.input_ids[:batch_size], tok.pad_token_id, enc.labels[:batch_size])
    ids, mask, lab = batch["input_ids"], batch["attention_mask"], batch["labels"]
    if parse_method(config)[1].get("optimizer") == "default":  # ":optimizer=default": torch's unfused AdamW (A/B)
        opt = torch.optim.AdamW(model.trainable_parameters(), lr=1e-4)
    else:
        opt = make_optimizer(model.trainable_parameters(), 1e-4)  # the trainer's AdamW
    model.train()
    times = []
    for i in range(steps + 1):
        t0 = time.perf_counter()
        loss, _ = model.loss(ids, mask, lab)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if i:
            times.append(time.perf_counter() - t0)
    step = statistics.median(times)
    cls_ids = enc.input_ids[batch_size:]
    predict_scores(model, cls_ids[:16], batch_size=16)  # warm-up
    t0 = time.perf_counter()
    predict_scores(model, cls_ids, batch_size=16)
    cls_s = time.perf_counter() - t0
    return {"model": model_name, "K": K, "task": TASKS[K], "config": config, "batch_size": batch_size,
            "timed_steps": steps, "step_times_s": times, "train_examples_per_s": batch_size / step,
            "classify_examples": len(cls_ids), "classify_seconds": cls_s,
            "classify_examples_per_s": len(cls_ids) / cls_s, "mean_input_tokens": float(mask.sum(1).float().mean()),
            "rss_after_load_mb": rss_load, "peak_rss_mb": rss_mb(),
            "label_tokens": None if name == "lora" else int(model.method.label_mask.sum()),
            "bank_tokens": bank_tokens(model) if name.startswith("onepass") else None,
            "packed": bool(model.pack_inputs), "real_input_tokens": int(mask.sum()),
            "padded_input_tokens": int(mask.numel()),
            "threads": torch.get_num_threads()}


def make_model(config: str, base, tok, names):
    """``config`` patched on ``base``: "lora", "onepass-unmerged", or an lt-prefix scoring ("kpass", "onepass",
    "shared-input") with ``:<field>=<value>+...`` config fields (label texts: the default template) and ``pack=false``
    for padded batches. "kpass" trains the listwise objective (all K rows per example: the K-pass protocol the
    issue's ratios are taken against) on both families; the encoders' K-pass default, the pairwise objective (1 +
    num_negatives rows per example in training, K in classification), is ``kpass:objective=pairwise``."""
    import ltuning
    from ltuning.data import default_label_text

    name, opts = parse_method(config)
    pack = opts.pop("pack", None)  # "<config>:pack=false": padded batches (the default packs where it can)
    opts.pop("optimizer", None)  # "<config>:optimizer=default": read by run_one
    if name == "lora":
        cfg = ltuning.make_config("lora", label_names=names, **opts)
    else:
        texts = [default_label_text(n) for n in names]
        if name == "onepass-unmerged":  # the one-pass bank without merging shared label tokens (to compare)
            name, opts = "onepass", {**opts, "merge_label_tokens": False}
        if name == "kpass":
            opts.setdefault("objective", "listwise")
        cfg = ltuning.make_config("lt-prefix", label_names=names, label_texts=texts, scoring=name, **opts)
    model = ltuning.patch(base, cfg, tok)
    if pack is not None:
        model.pack_inputs = bool(pack)
    return model


def bank_tokens(model) -> int:
    """Tokens of the one-pass bank the kernels read (the distinct label tokens when they are merged, K with
    variant "pooled")."""
    import torch

    from ltuning.methods.scoring import label_bank
    with torch.no_grad():
        return int(label_bank(model)[0][0].shape[2])


def machine() -> dict:
    flags, name = "", platform.processor()
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
        for line in out.splitlines():
            if line.startswith("Model name:"):
                name = line.split(":", 1)[1].strip()
            if line.startswith("Flags:"):
                flags = line
    except OSError:
        pass
    return {"cpu": name, "amx_bf16": "amx_bf16" in flags, "avx512_bf16": "avx512_bf16" in flags,
            "cores": os.cpu_count(), "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
            "load_average_1_5_15_min": os.getloadavg()}  # at the time of writing (after each configuration)


def plot(rows: list, path: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    models = sorted({r["model"] for r in rows})
    fig, axes = plt.subplots(len(models), 2, figsize=(11, 3.6 * len(models)), squeeze=False)
    for i, mname in enumerate(models):
        for j, key in enumerate(("train_examples_per_s", "classify_examples_per_s")):
            ax = axes[i][j]
            ks = sorted({r["K"] for r in rows if r["model"] == mname})
            w = 0.2
            for c, cfg in enumerate(CONFIGS):
                vals = [next((r[key] for r in rows if r["model"] == mname and r["K"] == k and r["config"] == cfg), 0)
                        for k in ks]
                ax.bar([x + (c - 1.5) * w for x in range(len(ks))], vals, w, label=cfg)
            ax.set_xticks(range(len(ks)), [f"K={k}" for k in ks])
            ax.set_yscale("log")
            ax.set_title(f"{mname}: {key.replace('_', ' ')}")
            if i == 0 and j == 0:
                ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def report(path: str) -> str:
    """Markdown: the table of ``path`` and the issue's targets, each marked met / not met."""
    rows = [r for p in path.split(",") for r in json.load(open(p))["rows"]]

    def base_of(r, name):
        """The plain ``name`` row (kpass / lora: no options but packing and the optimizer) of r's model and K run
        with r's packing (``packed``; absent in old records) and r's optimizer, so a ":pack=false" row is divided
        by a padded baseline and an ":optimizer=default" row by one with torch's default AdamW."""
        mine = parse_method(r["config"])[1].get("optimizer")
        for x in rows:
            n, opts = parse_method(x["config"])
            if (x["model"], x["K"], x.get("packed")) == (r["model"], r["K"], r.get("packed")) and n == name \
                    and not set(opts) - {"pack", "optimizer"} and opts.get("optimizer") == mine:
                return x
        return None

    sizes = [r["batch_size"] for r in rows]
    usual = max(set(sizes), key=sizes.count)  # a row trained at another batch (--batch-override) says so

    lines = ["| model | K (task) | scoring | packed | train ex/s | x kpass | x LoRA | classify ex/s | x kpass | "
             "peak RSS MB |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        kp, lo = base_of(r, "kpass"), base_of(r, "lora")
        f = lambda a, b, key: f"{a[key] / b[key]:.2f}" if a and b else "-"  # noqa: E731
        packed = {None: "-", True: "yes", False: "no"}[r.get("packed")]
        cfg = r["config"] + (f" (batch {r['batch_size']})" if r["batch_size"] != usual else "")
        lines.append(f"| {r['model']} | {r['K']} ({r['task']}) | {cfg} | {packed} | "
                     f"{r['train_examples_per_s']:.2f} | {f(r, kp, 'train_examples_per_s')} | "
                     f"{f(r, lo, 'train_examples_per_s')} | {r['classify_examples_per_s']:.2f} | "
                     f"{f(r, kp, 'classify_examples_per_s')} | {r['peak_rss_mb']:.0f} |")
    failed = [f for p in path.split(",") for f in json.load(open(p)).get("failed", [])]
    if failed:
        lines += ["", "Not measured (the configuration's subprocess died):", ""]
        lines += [f"- {f['model']}, K={f['K']} ({f['task']}), {f['config']}, batch {f['batch_size']}: {f['failed']}"
                  for f in failed]
    lines += ["", "Targets (issue 20), per model, library defaults (rows without ``pack=false`` or "
              "``optimizer=default``):", ""]
    default = [r for r in rows if not {"pack", "optimizer"} & set(parse_method(r["config"])[1])]
    for m in sorted({r["model"] for r in default}):
        at = lambda K, name: next((r for r in default if r["model"] == m and r["K"] == K  # noqa: E731
                                   and r["config"] == name), None)
        kp77, lo77 = at(77, "kpass"), at(77, "lora")
        lt77 = [r for r in default if r["model"] == m and r["K"] == 77 and r["config"] not in ("kpass", "lora")]
        for r in (lt77 if lo77 else []):  # every cheap reading measured; which is "best" is an accuracy question
            tr = r["train_examples_per_s"] / lo77["train_examples_per_s"]
            cl = "classify vs kpass: kpass not measured"
            if kp77:
                x = r["classify_examples_per_s"] / kp77["classify_examples_per_s"]
                cl = f"classify {x:.1f}x kpass (target >= 30: {'met' if x >= 30 else 'NOT met'})"
            lines.append(f"- {m}, K=77, {r['config']}: train {tr:.2f}x LoRA (target >= 0.7: "
                         f"{'met' if tr >= 0.7 else 'NOT met'}); {cl}")
        kp2 = at(2, "kpass")
        for c in ("onepass", "shared-input"):
            r = at(2, c)
            if kp2 and r:
                tr = r["train_examples_per_s"] / kp2["train_examples_per_s"]
                cl = r["classify_examples_per_s"] / kp2["classify_examples_per_s"]
                ok = tr >= 1.6 and cl >= 1.6
                lines.append(f"- {m}, K=2, {c}: train {tr:.2f}x, classify {cl:.2f}x kpass (target >= 1.6 both: "
                             f"{'met' if ok else 'NOT met'})")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="smollm2-135m,minilm-l6")
    ap.add_argument("--ks", default="2,3,77")
    ap.add_argument("--configs", default=",".join(CONFIGS))
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--classify", type=int, default=64)
    ap.add_argument("--json", default=os.path.join(RESULTS, "scoring_speed_runs.json"))
    ap.add_argument("--one", default=None, help=argparse.SUPPRESS)  # MODEL:K:CONFIG in this process
    ap.add_argument("--batch-override", default="",
                    help="MODEL:K:CONFIG=N pairs trained at batch N instead of --batch-size (a configuration that does "
                         "not fit in memory at it), e.g. smollm2-135m:77:kpass=4; the row records its batch")
    ap.add_argument("--skip", default="", help="K:CONFIG pairs not to run, e.g. 77:kpass,77:shared-input")
    ap.add_argument("--report", action="store_true", help="print the markdown table of --json and exit")
    ap.add_argument("--report-out", default=None,
                    help="with --report: also write PREFIX.md (the table) and PREFIX.json (the rows of every --json)")
    a = ap.parse_args()
    if a.report:
        text = report(a.json)
        print(text)
        if a.report_out:
            write_report(a.report_out, a.json, text)
        return
    if a.one:
        m, k, c = a.one.split(":", 2)
        k = int(k)
        slow = c == "kpass" and k == 77
        res = run_one(m, k, c, a.batch_size, KPASS77["steps"] if slow else a.steps,
                      KPASS77["classify"] if slow else a.classify)
        print("RESULT " + json.dumps(res))
        return
    rows = []
    commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    cmd = "OMP_NUM_THREADS={} python benchmarks/serving/bench_scoring.py {}".format(
        os.environ.get("OMP_NUM_THREADS", "?"), " ".join(sys.argv[1:]))
    skip = set(filter(None, a.skip.split(",")))
    for c in a.configs.split(","):
        if parse_method(c)[1].get("optimizer", "default") != "default":
            print(f"bench_scoring.py: --configs: {c!r}: the only optimizer option is ':optimizer=default' (torch's "
                  f"default AdamW; without it the trainer's)", file=sys.stderr)
            sys.exit(2)
    override = {}
    runs = {f"{m}:{k}:{c}" for m in a.models.split(",") for k in a.ks.split(",") for c in a.configs.split(",")}
    for item in filter(None, a.batch_override.split(",")):
        key, _, n = item.rpartition("=")
        if key not in runs or not n.isdigit() or int(n) < 1:
            print(f"bench_scoring.py: --batch-override: expected MODEL:K:CONFIG=N naming a configuration of this run "
                  f"(--models x --ks x --configs) and N >= 1, got {item!r}", file=sys.stderr)
            sys.exit(2)
        override[key] = int(n)
    failed = []  # configurations whose subprocess died (recorded, so a missing row says why)
    for m in a.models.split(","):
        for k in [int(x) for x in a.ks.split(",")]:
            for c in a.configs.split(","):
                if f"{k}:{c}" in skip:
                    continue
                t0 = time.time()
                bs = override.get(f"{m}:{k}:{c}", a.batch_size)
                p = subprocess.run([sys.executable, __file__, "--one", f"{m}:{k}:{c}", "--batch-size", str(bs),
                                    "--steps", str(a.steps), "--classify", str(a.classify)],
                                   capture_output=True, text=True, env={**os.environ, "PYTHONPATH": ROOT})
                line = [x for x in p.stdout.splitlines() if x.startswith("RESULT ")]
                if p.returncode or not line:
                    why = (f"killed by signal {-p.returncode} (SIGKILL: on Linux usually the OOM killer; see dmesg)"
                           if p.returncode == -9 else f"exit code {p.returncode}")
                    print(f"{m} K={k} {c}: FAILED, {why}\n{p.stderr[-2000:]}", file=sys.stderr)
                    failed.append({"model": m, "K": k, "task": TASKS[k], "config": c, "batch_size": bs,
                                   "failed": why, "seconds": time.time() - t0})
                    write(a.json, cmd, commit, rows, failed)
                    continue
                r = json.loads(line[0][7:])
                rows.append(r)
                print(f"{m:13s} K={k:<3d} {c:13s} train {r['train_examples_per_s']:8.2f} ex/s  classify "
                      f"{r['classify_examples_per_s']:8.2f} ex/s  peak RSS {r['peak_rss_mb']:7.0f} MB  "
                      f"({time.time() - t0:.0f} s)", flush=True)
                write(a.json, cmd, commit, rows, failed)  # after every configuration: an interrupted run keeps its rows
    plot(rows, os.path.splitext(a.json)[0] + ".png")
    print(f"wrote {a.json}")


def write_report(prefix: str, sources: str, text: str) -> None:
    """``prefix.md``: the report (embedded in RESULTS_scoring.md by sync_results); ``prefix.json``: the records it
    was made from (every row and the run metadata of each source JSON), so each figure of the table has a record."""
    runs = [json.load(open(p)) for p in sources.split(",")]
    out = {"command": "python benchmarks/serving/bench_scoring.py " + " ".join(sys.argv[1:]), "sources": sources.split(","),
           "runs": runs}
    for path, data in ((prefix + ".json", json.dumps(out, indent=1)), (prefix + ".md", text + "\n")):
        with open(path + ".tmp", "w") as f:
            f.write(data)
        os.replace(path + ".tmp", path)


def write(path, cmd, commit, rows, failed=()) -> None:
    out = {"command": cmd, "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
           "git_commit": commit, "machine": machine(), "dtype": "fp32", "method": "lt-prefix (default variant per "
           "family) vs lora r=8 q,v", "rows": rows, "failed": list(failed)}
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(out, f, indent=1)
    os.replace(tmp, path)


if __name__ == "__main__":
    main()
