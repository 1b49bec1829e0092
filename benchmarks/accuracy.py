"""The accuracy table: methods x GLUE tasks x real models, mean +- std over seeds, on GLUE dev.

Protocol: every method gets the same data budget (``--max-train`` examples sampled with the seed, the same
epochs, batch size and schedule); model selection (best validation step, and the learning rate when
``--sweep`` is on) uses a validation split carved from the training sample, never the reported dev set.
LT methods predict argmax over the K label-conditioned scores (paper A.4); the others use an ordinary head.
Metrics: accuracy, and Matthews correlation for CoLA (the GLUE metric). Results are appended run by run to
the JSON (atomically), so an interrupted table resumes where it stopped.

    python benchmarks/accuracy.py                      # the full table (see --help for the budget)
    python benchmarks/accuracy.py --quick              # CI smoke test: 1 seed, 300 examples, 1 task, MiniLM
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import random
import statistics
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

DATA = os.path.join(os.path.dirname(os.path.dirname(HERE)), "shared", "data")
TASK_METRIC = {"sst2": "accuracy", "rte": "accuracy", "cola": "mcc", "mrpc": "accuracy"}
DEFAULT_METHODS = ["linear-probe", "lora", "prompt", "prefix", "lt-prompt", "lt-prefix",  # issue 4
                   "sk-prefix", "sk-prompt", "apt", "fl"]  # issue 5 (cgc-lora is multi-task: RESULTS_methods.md)
LR_GRID = {"prompt": [1e-2, 3e-2, 1e-1], "linear-probe": [3e-3, 1e-2, 3e-2], "lora": [3e-4, 1e-3, 3e-3]}
LR_GRID_DEFAULT = [3e-4, 1e-3, 3e-3]


def parse_method(spec: str) -> tuple[str, dict]:
    """``"lt-prefix"`` or a variant ``"lt-prefix:objective=pairwise+variant=published"`` -> (method, options);
    options are method-config fields (ints, floats and words); ``label_texts=text 1|text 2`` gives the label
    texts in label order (``ltuning.data.label_names_of``; e.g. a control without label semantics)."""
    name, _, rest = spec.partition(":")
    opts = {}
    for kv in filter(None, rest.split("+")):
        k, _, v = kv.partition("=")
        for conv in (int, float):
            try:
                v = conv(v)
                break
            except ValueError:
                pass
        opts[k] = v.split("|") if k == "label_texts" else v
    return name, opts


def default_lr(method: str) -> float:
    from ltuning.cli import DEFAULT_LR
    return DEFAULT_LR.get(parse_method(method)[0], 1e-3)


def atomic_json(path: str, obj) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=1)
    os.replace(tmp, path)


class Bases:
    """Each base model is loaded once and re-patched for every run (unpatch restores it)."""

    def __init__(self, dtype):
        self.dtype, self.cache = dtype, {}

    def get(self, name):
        if name not in self.cache:
            from ltuning.models import load_base
            self.cache = {name: load_base(name, self.dtype)}  # keep one model in memory at a time
        return self.cache[name]


def run_one(bases, model, task, method, seed, lr, a) -> dict:
    import ltuning
    from ltuning.data import load_split

    base, tok = bases.get(model)
    train = load_split(os.path.join(a.data, task), "train")
    dev = load_split(os.path.join(a.data, task), "dev")
    if len(train) > a.max_train:
        train = random.Random(seed).sample(train, a.max_train)
    if a.max_dev and len(dev) > a.max_dev:
        dev = random.Random(1234).sample(dev, a.max_dev)
    import torch
    torch.manual_seed(seed)
    name, opts = parse_method(method)
    texts = opts.pop("label_texts", None)
    if texts is not None:
        from ltuning.data import label_names_of
        names = label_names_of(train)
        if len(texts) != len(names):
            raise SystemExit(f"{method}: {len(texts)} label texts for the {len(names)} labels {names}")
        texts = dict(zip(names, texts))
    clf = ltuning.Classifier(model, name, base=base, tokenizer=tok, dtype=a.dtype, max_length=a.max_length,
                             label_texts=texts, **opts)
    t0 = time.time()
    try:
        hist = clf.fit(train, progress=False, epochs=a.epochs, batch_size=a.batch_size, lr=lr, head_lr=a.head_lr,
                       seed=seed, dtype=a.dtype, select_metric=TASK_METRIC[task])
        m = clf.evaluate(dev, batch_size=64)
    finally:
        if clf.model is not None:
            ltuning.unpatch(clf.model)
    trainable, _ = clf.model.count_parameters()
    return {"model": model, "task": task, "method": method, "seed": seed, "lr": lr, "accuracy": m["accuracy"],
            "mcc": m["mcc"], "macro_f1": m["macro_f1"], "metric": TASK_METRIC[task], "score": m[TASK_METRIC[task]],
            "best_val": hist["best_val"], "trainable_parameters": trainable,
            "train_examples_per_s": hist["train_examples_per_s"], "eval_examples_per_s": m["eval_examples_per_s"],
            "train_examples": hist["train_examples"], "dev_examples": len(dev), "wall_seconds": time.time() - t0}


def summarize(runs: list) -> list:
    """Mean and std over seeds per (model, task, method) (sweep runs excluded)."""
    groups = {}
    for r in runs:
        if r.get("sweep"):
            continue
        groups.setdefault((r["model"], r["task"], r["method"]), []).append(r)
    rows = []
    for (model, task, method), rs in sorted(groups.items()):
        sc = [100 * r["score"] for r in rs]
        acc = [100 * r["accuracy"] for r in rs]
        rows.append({"model": model, "task": task, "method": method, "metric": rs[0]["metric"], "seeds": len(rs),
                     "mean": statistics.mean(sc), "std": statistics.stdev(sc) if len(sc) > 1 else 0.0,
                     "acc_mean": statistics.mean(acc), "acc_std": statistics.stdev(acc) if len(acc) > 1 else 0.0,
                     "lr": rs[0]["lr"], "trainable_parameters": rs[0]["trainable_parameters"],
                     "train_examples_per_s": statistics.median(r["train_examples_per_s"] for r in rs)})
    return rows


def markdown(rows: list, methods: list, tasks: list, models: list) -> str:
    out = []
    for model in models:
        out.append(f"\n**{model}** (CoLA: Matthews corr. x100; others: accuracy %; mean ± std over seeds)\n")
        out.append("| method | " + " | ".join(tasks) + " | trainable params | train ex/s |")
        out.append("|---" * (len(tasks) + 3) + "|")
        for method in methods:
            cells, params, speed = [], "", ""
            for task in tasks:
                r = next((x for x in rows if x["model"] == model and x["task"] == task and x["method"] == method), None)
                if r is None:
                    cells.append("—")
                    continue
                extra = f" (acc {r['acc_mean']:.1f})" if r["metric"] == "mcc" else ""
                cells.append(f"{r['mean']:.1f} ± {r['std']:.1f}{extra} [n={r['seeds']}]")
                params, speed = f"{r['trainable_parameters']:,}", f"{r['train_examples_per_s']:.0f}"
            if not params:  # no run of this method on this model: leave the row out
                continue
            label = method.replace("|", "\\|")  # a literal | would split the Markdown cell
            out.append(f"| {label} | " + " | ".join(cells) + f" | {params} | {speed} |")
    return "\n".join(out) + "\n"


def plot(rows: list, methods: list, tasks: list, models: list, path: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(models), figsize=(6 * len(models), 4.5), squeeze=False)
    w = 0.8 / max(1, len(methods))
    cmap = plt.get_cmap("tab20" if len(methods) > 10 else "tab10")
    color = {m: cmap(i % cmap.N) for i, m in enumerate(methods)}  # one colour per method in every panel
    for ax, model in zip(axes[0], models):
        for i, method in enumerate(methods):
            xs, ys, es = [], [], []
            for j, task in enumerate(tasks):
                r = next((x for x in rows if x["model"] == model and x["task"] == task and x["method"] == method), None)
                if r:
                    xs.append(j + i * w)
                    ys.append(r["mean"])
                    es.append(r["std"])
            ax.bar(xs, ys, w, yerr=es, color=color[method], capsize=2)
        ax.set_xticks([j + 0.4 - w / 2 for j in range(len(tasks))])
        ax.set_xticklabels([f"{t}\n({TASK_METRIC[t]})" for t in tasks])
        ax.set_title(model)
        ax.set_ylabel("score x100 (GLUE dev); missing bar = not run")
        ax.grid(axis="y", alpha=0.3)
    handles = [plt.Rectangle((0, 0), 1, 1, color=color[m]) for m in methods]
    fig.legend(handles, methods, fontsize=7, loc="lower center", ncol=min(len(methods), 5))
    fig.subplots_adjust(bottom=0.28)
    fig.tight_layout(rect=(0, 0.14, 1, 1))
    fig.savefig(path, dpi=110)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="minilm-l6,smollm2-135m")
    ap.add_argument("--tasks", default="sst2,rte,cola")
    ap.add_argument("--methods", default=",".join(DEFAULT_METHODS),
                    help="comma-separated; a variant sets config fields: lt-prefix:objective=pairwise+variant=published")
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--max-train", type=int, default=500, help="training examples per task (same for all methods)")
    ap.add_argument("--max-dev", type=int, default=None, help="evaluate on a fixed sample of dev (default: all)")
    ap.add_argument("--epochs", type=float, default=3.0)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--head-lr", type=float, default=1e-2)
    ap.add_argument("--max-length", type=int, default=128)
    ap.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"])
    ap.add_argument("--sweep", action="store_true", help="pick each method's lr on the validation split (seed 0)")
    ap.add_argument("--data", default=DATA)
    ap.add_argument("--out", default=os.path.join(HERE, "results", "accuracy.json"))
    ap.add_argument("--fresh", action="store_true", help="ignore runs already in --out")
    ap.add_argument("--report-only", action="store_true",
                    help="train nothing: make the table, markdown and chart from the runs in --out (and --include)")
    ap.add_argument("--include", default="",
                    help="comma-separated JSON files of other invocations (same budget, e.g. run in parallel with "
                         "OMP_NUM_THREADS=1) whose runs are merged into --out before the table is made")
    ap.add_argument("--quick", action="store_true", help="smoke test: minilm-l6, sst2, 1 seed, 300 examples")
    a = ap.parse_args(argv)
    if a.quick:
        a.models, a.tasks, a.seeds, a.max_train, a.max_dev = "minilm-l6", "sst2", "0", 300, 300
        a.methods = "linear-probe,prefix,lt-prefix" if a.methods == ",".join(DEFAULT_METHODS) else a.methods
        if a.out == os.path.join(HERE, "results", "accuracy.json"):
            a.out = os.path.join(HERE, "results", "accuracy_quick.json")
    models, tasks, methods = a.models.split(","), a.tasks.split(","), a.methods.split(",")
    seeds = [int(s) for s in a.seeds.split(",")]
    os.makedirs(os.path.dirname(a.out) or ".", exist_ok=True)
    budget = {k: getattr(a, k) for k in ("max_train", "max_dev", "epochs", "batch_size", "head_lr", "max_length",
                                         "dtype", "sweep")}
    state = {"runs": []}
    if os.path.isfile(a.out) and not a.fresh:
        with open(a.out) as f:
            state = json.load(f)
        if state.get("budget") != budget:
            print(f"{a.out} was made with another budget; starting afresh", file=sys.stderr)
            state = {"runs": []}
    cmd = " ".join([os.path.basename(sys.argv[0])] + (argv or sys.argv[1:]))
    state.setdefault("commands", [])
    if cmd not in state["commands"]:
        state["commands"].append(cmd)
    state.update(budget=budget, command=cmd,
                 machine=f"{platform.machine()}, {os.cpu_count()} cores, {platform.processor() or 'cpu'}")
    key = lambda r: (r["model"], r["task"], r["method"], r["seed"], r.get("sweep", False), r["lr"])  # noqa: E731
    for path in filter(None, a.include.split(",")):
        with open(path) as f:
            other = json.load(f)
        if other.get("budget") != budget:
            raise SystemExit(f"{path}: made with budget {other.get('budget')}, not {budget}")
        have = {key(r) for r in state["runs"]}
        state["runs"] += [r for r in other["runs"] if key(r) not in have]
    done = {key(r) for r in state["runs"]}
    t_start = time.time()
    bases = Bases(a.dtype)
    for model in ([] if a.report_only else models):
        for task in tasks:
            for method in methods:
                lr = default_lr(method)
                if a.sweep:
                    grid = LR_GRID.get(parse_method(method)[0], LR_GRID_DEFAULT)
                    for g in grid:
                        if (model, task, method, seeds[0], True, g) not in done:
                            r = run_one(bases, model, task, method, seeds[0], g, a)
                            r["sweep"] = True
                            state["runs"].append(r)
                            atomic_json(a.out, state)
                            print(f"sweep {model} {task} {method} lr={g}: val {r['best_val']:.4f}", flush=True)
                    sw = [r for r in state["runs"] if r.get("sweep") and (r["model"], r["task"], r["method"]) ==
                          (model, task, method)]
                    lr = max(sw, key=lambda r: r["best_val"])["lr"]
                for seed in seeds:
                    if (model, task, method, seed, False, lr) in done:
                        continue
                    r = run_one(bases, model, task, method, seed, lr, a)
                    state["runs"].append(r)
                    atomic_json(a.out, state)
                    print(f"{model} {task} {method} seed={seed} lr={lr}: {r['metric']} {100 * r['score']:.1f} "
                          f"(acc {100 * r['accuracy']:.1f}) {r['train_examples_per_s']:.0f} ex/s "
                          f"{r['wall_seconds']:.0f}s", flush=True)
    rows = summarize(state["runs"])
    state["table"] = rows
    state["wall_seconds_this_invocation"] = time.time() - t_start
    state["date"] = time.strftime("%Y-%m-%d")
    atomic_json(a.out, state)
    md = markdown(rows, methods, tasks, models)
    with open(os.path.splitext(a.out)[0] + ".md", "w") as f:
        f.write(md)
    plot(rows, methods, tasks, models, os.path.splitext(a.out)[0] + ".png")
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
