"""The accuracy table: methods x GLUE tasks x real models, mean +- std over seeds, on GLUE dev.

Protocol: every method gets the same data budget (``--max-train`` examples sampled with the seed, the same
epochs, batch size and schedule); model selection (the step of best validation accuracy, MCC on CoLA, and the
learning rate when ``--sweep`` is on, its grid run at ``--grid-seed``) uses a validation split carved from the
training sample, never the reported dev set. Without ``--sweep`` each row trains at the lr the committed table
reports for it (``--lrs-from``: its sweep's pick), so ``--fresh`` regenerates the committed table's runs.
LT methods predict argmax over the K label-conditioned scores (paper A.4); the others use an ordinary head.
Metrics: accuracy, and Matthews correlation for CoLA (the GLUE metric). Results are appended run by run to
the JSON (atomically), so an interrupted table resumes where it stopped.

    python benchmarks/accuracy.py                      # the full table (see --help for the budget)
    python benchmarks/accuracy.py --jobs 2             # the same, as 2 single-thread workers on a 2-core CPU
    python benchmarks/accuracy.py --quick              # CI smoke test: 1 seed, 300 examples, 1 task, MiniLM
    python benchmarks/accuracy.py --plan --fresh       # train nothing: the runs from scratch and their estimated time
    python benchmarks/accuracy.py --jobs 2 --stop-after 60   # start no run after 60 min; rerun (no --fresh) resumes

A table made in several invocations records each one (``training_invocations``: command, machine, code
commit, runs, elapsed) and the report gives their total elapsed time.
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
sys.path.insert(0, HERE)
import sync_results  # noqa: E402  (beside this script)
from ltuning.methods import method_class  # noqa: E402

DATA = os.path.join(os.path.dirname(os.path.dirname(HERE)), "shared", "data")
TASK_METRIC = {"sst2": "accuracy", "rte": "accuracy", "cola": "mcc", "mrpc": "accuracy", "snli": "accuracy",
               "banking77": "accuracy"}  # snli: train/dev carved from its dev file (bench_scoring.carve_snli)
DEFAULT_METHODS = ["linear-probe", "lora", "prompt", "prefix", "lt-prompt", "lt-prefix"]  # the table of issue 4
RELATED_METHODS = ["sk-prefix", "sk-prompt", "apt", "fl"]  # issue 5, by --methods (cgc-lora is multi-task:
# RESULTS_methods.md)


def parse_method(spec: str) -> tuple[str, dict]:
    """``"lt-prefix"`` or a variant ``"lt-prefix:objective=pairwise+variant=published"`` -> (method, options);
    options are method-config fields (ints, floats, true/false and words); ``label_texts=text 1|text 2`` gives the label
    texts in label order (``ltuning.data.label_names_of``; e.g. a control without label semantics) and
    ``lr=1e-4`` the learning rate instead of the method's default (a row of its own in the table)."""
    name, _, rest = spec.partition(":")
    opts = {}
    for kv in filter(None, rest.split("+")):
        k, _, v = kv.partition("=")
        if v.lower() in ("true", "false"):
            opts[k] = v.lower() == "true"
            continue
        for conv in (int, float):
            try:
                v = conv(v)
                break
            except ValueError:
                pass
        opts[k] = v.split("|") if k == "label_texts" else v
    return name, opts


def default_lr(method: str) -> float:
    """The lr a row is trained at without ``--sweep``: the spec's ``lr=`` or the CLI's default for the method."""
    name, opts = parse_method(method)
    return float(opts.get("lr", method_class(name).default_lr))


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
    if task == "snli":  # only a dev file: a fixed seeded disjoint split of it (the same for every run)
        from bench_scoring import carve_snli
        train, dev = carve_snli(0)
    else:
        train = load_split(os.path.join(a.data, task), "train")
        dev = load_split(os.path.join(a.data, task), "dev")
    if len(train) > a.max_train:
        train = random.Random(seed).sample(train, a.max_train)
    if a.max_dev and len(dev) > a.max_dev:
        dev = random.Random(1234).sample(dev, a.max_dev)
    name, opts = parse_method(method)
    opts.pop("lr", None)  # the learning rate is not a method-config field (default_lr reads it)
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
        # linear-probe trains only its head, at lr (param_groups); head_lr is the head's rate for the others
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
            "train_examples": hist["train_examples"], "dev_examples": len(dev), "wall_seconds": time.time() - t0,
            "date": time.strftime("%Y-%m-%d"), "machine": machine()}


def machine() -> str:
    """What ran a run: architecture, cores and the CPU's model name (from /proc/cpuinfo where there is one)."""
    name = platform.processor() or "cpu"
    try:
        with open("/proc/cpuinfo") as f:
            name = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), name)
    except OSError:
        pass
    return f"{platform.machine()}, {os.cpu_count()} cores, {name}"


def same_budget(old, new):
    """False if the budgets differ in anything but ``sweep`` (older JSONs recorded it); None if old is None."""
    if old is None:
        return None
    return {k: v for k, v in old.items() if k != "sweep"} == new


def frozen_sweeps(path: str, budget: dict, rows: set) -> list:
    """The sweep runs of the JSON ``path`` for ``rows`` (``(model, task, method)``), as copies marked
    ``copied_from``: added to a table made without ``--sweep``, they make ``row_lr`` train and report each row at
    the lr its sweep picked, without re-running the grid (a table regenerated with ``--fresh`` then trains the
    committed table's runs). Nothing from a JSON made with another budget (its picks need not apply)."""
    if not path or not os.path.isfile(path):
        return []
    with open(path) as f:
        src = json.load(f)
    if same_budget(src.get("budget"), budget) is False:
        print(f"--lrs-from {path}: made with another budget; every row at its method's default lr", file=sys.stderr)
        return []
    return [dict(r, copied_from=f"sweep in {os.path.basename(path)}") for r in src["runs"]
            if r.get("sweep") and (r["model"], r["task"], r["method"]) in rows]


def same_run(runs: list, key: tuple, sweep: bool):
    """A copy of the run ``key`` = (model, task, method, seed, swept, lr), relabelled as a sweep run or as a table
    run (``sweep``), or None. A sweep's seed-0 run at the picked lr is exactly the table's seed-0 run (same
    config, data sample and seed), so it is reused instead of trained twice; the copy says so."""
    model, task, method, seed, swept, lr = key
    for r in runs:
        if (r["model"], r["task"], r["method"], r["seed"], bool(r.get("sweep")), r["lr"]) == key:
            return dict(r, sweep=sweep, copied_from="table run" if sweep else "sweep run")
    return None


def plan(runs: list, models: list, tasks: list, methods: list, seeds: list, sweep: bool, grid_seed: int,
         timed: list | None = None) -> list:
    """The runs an invocation still has to train (those not in ``runs``), in queue order, as
    ``(model, task, method, seed, lr, minutes)``. ``minutes`` is the median wall time of finished runs of the same
    model, task and method in ``timed`` (default ``runs``; of the same method with any options, failing that), or
    None when there is none. For a swept row whose grid is not finished the seeds are listed at the default lr
    (the pick is not known yet); an unswept row's at ``row_lr`` (a pick in ``runs``, e.g. ``frozen_sweeps``)."""
    timed = runs if timed is None else timed

    def minutes(model, task, method):
        base = parse_method(method)[0]
        for same in (lambda r: r["method"] == method, lambda r: parse_method(r["method"])[0] == base):
            w = [r["wall_seconds"] for r in timed if (r["model"], r["task"]) == (model, task) and same(r)
                 and "wall_seconds" in r and "copied_from" not in r]  # a copy is another run's time
            if w:
                return statistics.median(w) / 60
        return None

    have = {(r["model"], r["task"], r["method"], r["seed"], bool(r.get("sweep")), r["lr"]) for r in runs}
    todo = []
    for model in models:
        for task in tasks:
            for method in methods:
                est = minutes(model, task, method)
                lr = default_lr(method) if sweep else row_lr(runs, model, task, method)
                if sweep:
                    grid = list(method_class(parse_method(method)[0]).lr_grid)
                    left = [g for g in grid if (model, task, method, grid_seed, True, g) not in have
                            and (model, task, method, grid_seed, False, g) not in have]
                    todo += [(model, task, method, grid_seed, g, est) for g in left]
                    if all((model, task, method, grid_seed, True, g) in have for g in grid):
                        lr = row_lr(runs, model, task, method)  # the pick is known
                todo += [(model, task, method, s, lr, est) for s in seeds
                         if (model, task, method, s, False, lr) not in have
                         and not (sweep and s == grid_seed)]  # a swept row's grid-seed run is its grid's run
    return todo


def plan_text(todo: list, jobs: int) -> str:
    known = [t[5] for t in todo if t[5] is not None]
    lines = [f"{m} {t} {meth} seed={s} lr={lr:g}: " + (f"~{est:.0f} min" if est is not None else "no timing yet")
             for m, t, meth, s, lr, est in todo]
    total = sum(known)
    lines.append(f"{len(todo)} runs to train; {len(known)} with a timing from earlier runs, summing to "
                 f"~{total / 60:.1f} h on one worker, ~{total / 60 / max(1, jobs):.1f} h elapsed with --jobs {jobs} "
                 f"(estimate from the wall times in the JSON, as measured on the machine that ran them, "
                 f"with whatever else shared its cores)")
    return "\n".join(lines)


def sweep_markdown(runs: list) -> str:
    """Validation score (the selection criterion) and dev score per swept lr; * marks the row's pick."""
    swept = sorted({(r["model"], r["task"], r["method"]) for r in runs if r.get("sweep")})
    if not swept:
        return ""
    copies = {r.get("copied_from", "") for r in runs if r.get("sweep")}
    origin = (f"; the sweeps of {', '.join(sorted(c[len('sweep in '):] for c in copies))}, copied, not re-run: each "
              "row above trains at their pick") if all(c.startswith("sweep in ") for c in copies) else ""
    out = ["\n**Learning-rate sweeps** (seed 0; pick = best validation score on the split carved from train; "
           f"validation / dev, %{origin})\n", "| model | task | method | lr: validation / dev |", "|---|---|---|---|"]
    for model, task, method in swept:
        pick = row_lr(runs, model, task, method)
        pts = sorted((r["lr"], r["best_val"], r["score"]) for r in runs if r.get("sweep")
                     and (r["model"], r["task"], r["method"]) == (model, task, method))
        cells = ", ".join(f"{'*' if lr == pick else ''}{lr:g}: {100 * v:.1f} / {100 * d:.1f}" for lr, v, d in pts)
        out.append(f"| {model} | {task} | {method.replace('|', chr(92) + '|')} | {cells} |")
    return "\n".join(out) + "\n"


def row_lr(runs: list, model: str, task: str, method: str) -> float:
    """The lr a table row reports: the sweep's pick (best validation score; the default on a tie) if the row was
    swept, else the default (``default_lr``). Runs at any other lr stay in the JSON but are not averaged into the row."""
    sw = [r for r in runs if r.get("sweep") and (r["model"], r["task"], r["method"]) == (model, task, method)]
    if not sw:
        return default_lr(method)
    # a tie (common: 50 validation examples score in steps of 2 %) keeps the default lr
    return max(sw, key=lambda r: (r["best_val"], r["lr"] == default_lr(method)))["lr"]


def row_runs(runs: list) -> list:
    """The runs a table row averages: its seeds at the row's lr (``row_lr``); sweep runs excluded."""
    return [r for r in runs if not r.get("sweep") and r["lr"] == row_lr(runs, r["model"], r["task"], r["method"])]


def summarize(runs: list) -> list:
    """Mean and std over seeds per (model, task, method) of ``row_runs``."""
    groups = {}
    for r in row_runs(runs):
        groups.setdefault((r["model"], r["task"], r["method"]), []).append(r)
    rows = []
    for (model, task, method), rs in sorted(groups.items()):
        sc = [100 * r["score"] for r in rs]
        acc = [100 * r["accuracy"] for r in rs]
        rows.append({"model": model, "task": task, "method": method, "metric": rs[0]["metric"], "seeds": len(rs),
                     "mean": statistics.mean(sc), "std": statistics.stdev(sc) if len(sc) > 1 else 0.0,
                     "acc_mean": statistics.mean(acc), "acc_std": statistics.stdev(acc) if len(acc) > 1 else 0.0,
                     "lr": rs[0]["lr"], "trainable_parameters": rs[0]["trainable_parameters"],
                     "trainable_parameters_range": [min(r["trainable_parameters"] for r in rs),
                                                    max(r["trainable_parameters"] for r in rs)],
                     "train_examples_per_s": statistics.median(r["train_examples_per_s"] for r in rs)})
    return rows


def markdown(rows: list, methods: list, tasks: list, models: list) -> str:
    out = []
    for model in models:
        out.append(f"\n**{model}** (CoLA: Matthews corr. x100; others: accuracy %; mean ± std over seeds)\n")
        out.append("| method | " + " | ".join(tasks) + " | lr | trainable params | train ex/s (median over tasks) |")
        out.append("|---" * (len(tasks) + 4) + "|")
        for method in methods:
            cells, counts, speeds, lrs = [], [], [], []
            for task in tasks:
                r = next((x for x in rows if x["model"] == model and x["task"] == task and x["method"] == method), None)
                if r is None:
                    cells.append("—")
                    continue
                extra = f" (acc {r['acc_mean']:.1f})" if r["metric"] == "mcc" else ""
                cells.append(f"{r['mean']:.1f} ± {r['std']:.1f}{extra} [n={r['seeds']}]")
                counts += r.get("trainable_parameters_range", [r["trainable_parameters"]])
                speeds.append(r["train_examples_per_s"])
                lrs += [f"{r['lr']:g}"] if f"{r['lr']:g}" not in lrs else []
            if not counts:  # no run of this method on this model: leave the row out
                continue
            # one count, or the range over tasks and seeds (sk-prompt's prompt is as long as each task's description)
            params = f"{min(counts):,}" + (f"-{max(counts):,}" if max(counts) != min(counts) else "")
            label = method.replace("|", "\\|")  # a literal | would split the Markdown cell
            out.append(f"| {label} | " + " | ".join(cells) + f" | {'/'.join(lrs)} | {params} | {statistics.median(speeds):.0f} |")
    return "\n".join(out) + "\n"


def wall_note(runs: list, rows: list, invocation: dict | None = None, invocations: list | None = None) -> str:
    """One line for the report: the summed wall time of the runs averaged into ``rows``, and of every run in the
    JSON (sweep grids and other lrs too; a run reused from another, ``copied_from``, is counted once there); and
    the elapsed time of the last ``invocation`` that trained runs (``state["last_training_invocation"]``), or,
    when several did (``state["training_invocations"]``: a table stopped with ``--stop-after`` and resumed),
    each one's and their total, with the code each ran."""
    keys = {(x["model"], x["task"], x["method"]) for x in rows}
    in_rows = [r for r in row_runs(runs) if "wall_seconds" in r and (r["model"], r["task"], r["method"]) in keys]
    own = [r for r in runs if "wall_seconds" in r and "copied_from" not in r]
    hours = lambda rs: sum(r["wall_seconds"] for r in rs) / 3600  # noqa: E731
    out = (f"\nWall time (summed over runs, as recorded in the JSON): the {len(in_rows)} runs averaged into these "
           f"rows took {hours(in_rows):.1f} h; all {len(own)} runs in the JSON (sweep grids, other learning rates "
           f"and rows not shown too) {hours(own):.1f} h.\n")
    if invocations and len(invocations) > 1:
        codes = {i.get("code") for i in invocations}
        same = (f"all with the code of commit {codes.pop()}" if len(codes) == 1 and None not in codes
                else "NOT all with the same code: " + ", ".join(str(i.get("code")) for i in invocations))
        parts = "; ".join(f"`{i['command']}` ({i['date']}, {i['machine']}): {i['runs_trained']} runs in "
                          f"{i['elapsed_seconds'] / 3600:.2f} h" for i in invocations)
        return out + (f"{len(invocations)} invocations trained these runs, one after another, "
                      f"**{sum(i['elapsed_seconds'] for i in invocations) / 3600:.2f} h elapsed in total**, {same}: "
                      f"{parts}; {invocations[-1].get('runs_left', '?')} runs left.\n")
    if invocation:
        out += (f"The last invocation that trained runs, `{invocation['command']}` ({invocation['date']}, "
                f"{invocation['machine']}), trained {invocation['runs_trained']} runs in "
                f"**{invocation['elapsed_seconds'] / 3600:.2f} h elapsed**.\n")
    return out


def compare_markdown(runs: list, other: list, name: str) -> str:
    """Each row of ``runs`` next to the same row (model, task, method, lr) of ``other`` (e.g. the committed
    table, when this JSON regenerated it from scratch): the means, and on how many seeds the dev score is the same
    (same data sample, seed and config: a difference is the code or the machine's arithmetic, not chance); and
    the median wall time of the runs both trained themselves (not ``copied_from``), with the total over them."""
    mine, theirs, wall_mine, wall_theirs = {}, {}, {}, {}
    for dst, wall, src in ((mine, wall_mine, runs), (theirs, wall_theirs, other)):
        for r in row_runs(src):
            k = (r["model"], r["task"], r["method"], r["lr"])
            dst.setdefault(k, {})[r["seed"]] = 100 * r["score"]
            if "wall_seconds" in r and "copied_from" not in r:
                wall.setdefault(k, {})[r["seed"]] = r["wall_seconds"]
    shared = sorted(k for k in mine if k in theirs and set(mine[k]) & set(theirs[k]))
    if not shared:
        return ""
    out = [f"\n**Against {name}** (the same rows at the same lr; score x100, mean over the seeds both have; wall time: "
           "median minutes per run over the seeds both trained)\n",
           "| model | task | method | here | there | here - there | seeds with the same score | wall here / there "
           "| there / here |", "|---" * 9 + "|"]
    total = [0.0, 0.0, 0]
    for k in shared:
        seeds = sorted(set(mine[k]) & set(theirs[k]))
        a = statistics.mean(mine[k][s] for s in seeds)
        b = statistics.mean(theirs[k][s] for s in seeds)
        same = sum(abs(mine[k][s] - theirs[k][s]) < 1e-9 for s in seeds)
        timed = sorted(set(wall_mine.get(k, {})) & set(wall_theirs.get(k, {})))
        wall = ratio = "–"
        if timed:
            wa = statistics.median(wall_mine[k][s] for s in timed) / 60
            wb = statistics.median(wall_theirs[k][s] for s in timed) / 60
            wall, ratio = f"{wa:.1f} / {wb:.1f}", f"{wb / wa:.2f}x"
            total[0] += sum(wall_mine[k][s] for s in timed)
            total[1] += sum(wall_theirs[k][s] for s in timed)
            total[2] += len(timed)
        label = k[2].replace("|", "\\|")
        out.append(f"| {k[0]} | {k[1]} | {label} | {a:.1f} | {b:.1f} | {a - b:+.1f} | {same} of {len(seeds)} | {wall} "
                   f"| {ratio} |")
    if total[2]:
        out.append(f"\nThe {total[2]} run{'s' if total[2] != 1 else ''} both trained took {total[0] / 3600:.2f} h here and {total[1] / 3600:.2f} h "
                   f"there (summed wall time): {total[1] / total[0]:.2f}x.")
    return "\n".join(out) + "\n"


def chart_methods(methods: list) -> list:
    """The rows the chart shows: the plain methods (a variant row, ``method:options``, is in the table only, so
    that the bars stay readable and one colour means one method), or every row when all are variants."""
    return [m for m in methods if ":" not in m] or list(methods)


def plot(rows: list, methods: list, tasks: list, models: list, path: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    methods = chart_methods(methods)
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
    fig.legend(handles, methods, fontsize=7, loc="lower center", ncol=min(len(methods), 5), title_fontsize=7,
               title="mean ± std over seeds; variant rows (method:options) are in the table only")
    fig.subplots_adjust(bottom=0.28)
    fig.tight_layout(rect=(0, 0.14, 1, 1))
    fig.savefig(path, dpi=110)


def claim(folder, *unit, deadline: float | None = None) -> bool:
    """A worker of ``--jobs`` takes a unit of work (one run; one swept row) if no other worker has: the first
    to create the unit's claim file wins. Without a queue folder every unit is this process's. Nothing is taken
    once ``deadline`` (``--stop-after``) has passed or the queue folder holds a file ``STOP``."""
    if deadline is not None and time.time() >= deadline:
        return False
    if folder is None:
        return True
    if os.path.exists(os.path.join(folder, "STOP")):
        return False
    name = "_".join(str(u) for u in unit).replace("/", "%").replace("|", "%")[:200]
    try:
        os.close(os.open(os.path.join(folder, name), os.O_CREAT | os.O_EXCL | os.O_WRONLY))
        return True
    except FileExistsError:
        return False


def code_version() -> str | None:
    """The git commit of this checkout (``+dirty`` with uncommitted changes under ltuning/, csrc/ or benchmarks/),
    or None outside a git checkout: recorded per invocation, so a table resumed with other code says so."""
    import subprocess

    root = os.path.dirname(HERE)
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True, text=True,
                              check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "ltuning", "csrc", "benchmarks/accuracy.py"],
                               cwd=root, capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None
    return head + ("+dirty" if dirty else "")


def run_workers(a, argv: list) -> list:
    """Start ``a.jobs`` copies of this script on one queue; each writes its own JSON (seeded with the runs
    already in ``a.out`` so that none is repeated). Returns the workers' JSON paths."""
    import shutil
    import subprocess

    queue = a.out + ".queue"
    shutil.rmtree(queue, ignore_errors=True)  # claims of an interrupted invocation: their runs are not in a.out
    os.makedirs(queue)
    drop = {"--jobs", "--out", "--include", "--fresh", "--stop-after"}
    rest, skip = [], False
    for x in argv:
        if skip:
            skip = False
            continue
        if x.split("=")[0] in drop:
            skip = "=" not in x and x != "--fresh"
            continue
        rest.append(x)
    env = dict(os.environ, OMP_NUM_THREADS=str(max(1, (os.cpu_count() or 1) // a.jobs)))
    paths = [f"{os.path.splitext(a.out)[0]}.worker{i}.json" for i in range(a.jobs)]
    procs = [subprocess.Popen([sys.executable, os.path.abspath(__file__), *rest, "--out", p, "--fresh",
                               "--include", a.out, "--claims", queue]
                              + (["--deadline", repr(a.deadline)] if a.deadline else []), env=env) for p in paths]
    codes = [p.wait() for p in procs]
    shutil.rmtree(queue, ignore_errors=True)
    if any(codes):
        print(f"worker exit codes {codes}: the finished runs are merged; rerun to do the rest", file=sys.stderr)
    return paths


def main(argv=None) -> int:
    from ltuning.train import DEFAULT_HEAD_LR

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="minilm-l6,smollm2-135m")
    ap.add_argument("--tasks", default="sst2,rte,cola")
    ap.add_argument("--methods", default=",".join(DEFAULT_METHODS),
                    help="comma-separated (default: the six rows of the issue-4 table; the related methods "
                         f"{','.join(RELATED_METHODS)} by name); a variant sets config fields: "
                         "lt-prefix:objective=pairwise+variant=published")
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--max-train", type=int, default=500, help="training examples per task (same for all methods)")
    ap.add_argument("--max-dev", type=int, default=None, help="evaluate on a fixed sample of dev (default: all)")
    ap.add_argument("--epochs", type=float, default=3.0)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--head-lr", type=float, default=DEFAULT_HEAD_LR)
    ap.add_argument("--max-length", type=int, default=128)
    ap.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"])
    ap.add_argument("--sweep", action="store_true", help="pick each method's lr on the validation split")
    ap.add_argument("--grid-seed", type=int, default=0,
                    help="seed of the sweep's grid runs (whatever --seeds lists: adding seeds to a swept row with "
                         "--seeds 1,2 reuses the seed-0 grid already in --out/--include)")
    ap.add_argument("--data", default=DATA)
    ap.add_argument("--out", default=os.path.join(HERE, "results", "accuracy.json"))
    ap.add_argument("--fresh", action="store_true", help="ignore runs already in --out")
    ap.add_argument("--lrs-from", default=os.path.join(HERE, "results", "accuracy.json"),
                    help="without --sweep: train each row at the lr this JSON's table reports for it (its sweep's "
                         "pick, else the method's default), its sweep runs copied into --out as the record of the "
                         "pick; default: the committed table; '' for every method's default lr")
    ap.add_argument("--report-only", action="store_true",
                    help="train nothing: make the table, markdown and chart from the runs in --out (and --include)")
    ap.add_argument("--include", default="",
                    help="comma-separated JSON files of other invocations (same budget, e.g. run in parallel with "
                         "OMP_NUM_THREADS=1) whose runs are merged into --out before the table is made")
    ap.add_argument("--quick", action="store_true", help="smoke test: minilm-l6, sst2, 1 seed, 300 examples")
    ap.add_argument("--jobs", type=int, default=1,
                    help="run the table as N worker processes (each with cores/N threads) that take runs from a "
                         "shared queue, then merge their results into --out (on 2 cores, 2 single-thread "
                         "workers train about twice as many runs per hour as one 2-thread process)")
    ap.add_argument("--plan", action="store_true",
                    help="train nothing: list the runs still to do, each with an estimated wall time (the median of "
                         "finished runs of the same model, task and method in --out/--include), and the total")
    ap.add_argument("--compare", default="",
                    help="a JSON of the same budget (e.g. the committed table): the report adds each row next to "
                         "the same row there, and on how many seeds the dev score is identical")
    ap.add_argument("--stop-after", type=float, default=None, metavar="MINUTES",
                    help="start no run after MINUTES minutes (the runs in progress finish, the table is made from "
                         "what is done); the same command without --fresh resumes. With --jobs, creating the file "
                         "STOP in OUT.queue/ drains the workers the same way at any time")
    ap.add_argument("--claims", default=None, help=argparse.SUPPRESS)  # a worker of --jobs: the queue's folder
    ap.add_argument("--deadline", type=float, default=None, help=argparse.SUPPRESS)  # a worker: --stop-after's end
    a = ap.parse_args(argv)
    if a.quick:
        a.models, a.tasks, a.seeds, a.max_train, a.max_dev = "minilm-l6", "sst2", "0", 300, 300
        a.methods = "linear-probe,prefix,lt-prefix" if a.methods == ",".join(DEFAULT_METHODS) else a.methods
        if a.out == os.path.join(HERE, "results", "accuracy.json"):
            a.out = os.path.join(HERE, "results", "accuracy_quick.json")
    models, tasks, methods = a.models.split(","), a.tasks.split(","), a.methods.split(",")
    seeds = [int(s) for s in a.seeds.split(",")]
    os.makedirs(os.path.dirname(a.out) or ".", exist_ok=True)
    # --sweep is not part of the budget: swept and unswept rows share one JSON (row_lr picks each row's lr)
    budget = {k: getattr(a, k) for k in ("max_train", "max_dev", "epochs", "batch_size", "head_lr", "max_length",
                                         "dtype")}
    state = {"runs": []}
    if os.path.isfile(a.out) and not a.fresh:
        with open(a.out) as f:
            state = json.load(f)
        if same_budget(state.get("budget"), budget) is False:
            print(f"{a.out} was made with another budget; starting afresh", file=sys.stderr)
            state = {"runs": []}
    cmd = " ".join([os.path.basename(sys.argv[0])] + (argv or sys.argv[1:]))
    state.setdefault("commands", [])
    if cmd not in state["commands"]:
        state["commands"].append(cmd)
    state.update(budget=budget, command=cmd, machine=machine())
    key = lambda r: (r["model"], r["task"], r["method"], r["seed"], r.get("sweep", False), r["lr"])  # noqa: E731
    for path in filter(None, a.include.split(",")):
        with open(path) as f:
            other = json.load(f)
        if same_budget(other.get("budget"), budget) is False:
            raise SystemExit(f"{path}: made with budget {other.get('budget')}, not {budget}")
        have = {key(r) for r in state["runs"]}
        state["runs"] += [r for r in other["runs"] if key(r) not in have]
    if not a.sweep:
        have = {key(r) for r in state["runs"]}
        rows = {(m, t, x) for m in models for t in tasks for x in methods}
        state["runs"] += [r for r in frozen_sweeps(a.lrs_from, budget, rows) if key(r) not in have]
    if a.plan:
        timed = state["runs"]
        if a.fresh and os.path.isfile(a.out):  # plan the table from scratch, timed by the runs already made
            with open(a.out) as f:
                timed = json.load(f)["runs"]
        print(plan_text(plan(state["runs"], models, tasks, methods, seeds, a.sweep, a.grid_seed, timed), a.jobs))
        return 0
    t_start = time.time()
    if a.stop_after is not None and a.deadline is None:
        a.deadline = t_start + 60 * a.stop_after
    own = lambda: sum("copied_from" not in r for r in state["runs"])  # noqa: E731  (runs trained, not copies)
    own_before = own()
    if a.jobs > 1 and not a.report_only:
        atomic_json(a.out, state)
        shards = run_workers(a, argv if argv is not None else sys.argv[1:])
        for path in shards:  # merge what every worker finished, even if one failed
            if os.path.isfile(path):
                with open(path) as f:
                    have = {key(r) for r in state["runs"]}
                    state["runs"] += [r for r in json.load(f)["runs"] if key(r) not in have]
        atomic_json(a.out, state)
        for path in shards:
            if os.path.isfile(path):
                os.remove(path)
        a.report_only = True
    done = {key(r) for r in state["runs"]}
    bases = Bases(a.dtype)
    for model in ([] if a.report_only else models):
        for task in tasks:
            for method in methods:
                lr = default_lr(method) if a.sweep else row_lr(state["runs"], model, task, method)
                if a.sweep and not claim(a.claims, model, task, method, deadline=a.deadline):
                    continue
                if a.sweep:
                    grid = list(method_class(parse_method(method)[0]).lr_grid)
                    for g in grid:
                        if (model, task, method, a.grid_seed, True, g) not in done:
                            r = same_run(state["runs"], (model, task, method, a.grid_seed, False, g), sweep=True)
                            r = r or run_one(bases, model, task, method, a.grid_seed, g, a)
                            r["sweep"] = True
                            state["runs"].append(r)
                            atomic_json(a.out, state)
                            print(f"sweep {model} {task} {method} lr={g}: val {r['best_val']:.4f}", flush=True)
                    lr = row_lr(state["runs"], model, task, method)
                for seed in seeds:
                    if (model, task, method, seed, False, lr) in done:
                        continue
                    if not a.sweep and not claim(a.claims, model, task, method, seed, deadline=a.deadline):
                        continue
                    r = same_run(state["runs"], (model, task, method, seed, True, lr), sweep=False) if a.sweep else None
                    r = r or run_one(bases, model, task, method, seed, lr, a)
                    state["runs"].append(r)
                    atomic_json(a.out, state)
                    print(f"{model} {task} {method} seed={seed} lr={lr}: {r['metric']} {100 * r['score']:.1f} "
                          f"(acc {100 * r['accuracy']:.1f}) {r['train_examples_per_s']:.0f} ex/s "
                          f"{r['wall_seconds']:.0f}s", flush=True)
    if a.claims:  # a worker of --jobs: the parent makes the table
        return 0
    rows = summarize(state["runs"])
    state["table"] = rows
    state["wall_seconds_this_invocation"] = time.time() - t_start
    if own() > own_before:  # this invocation trained runs (itself or by its --jobs workers): its elapsed time
        left = len(plan(state["runs"], models, tasks, methods, seeds, a.sweep, a.grid_seed))
        inv = {"command": cmd, "date": time.strftime("%Y-%m-%d %H:%M"), "machine": machine(), "code": code_version(),
               "runs_trained": own() - own_before, "elapsed_seconds": state["wall_seconds_this_invocation"],
               "runs_left": left}
        state["last_training_invocation"] = inv
        state.setdefault("training_invocations", []).append(inv)
    state["date"] = time.strftime("%Y-%m-%d")
    atomic_json(a.out, state)
    shown = [x for x in rows if x["model"] in models and x["task"] in tasks and x["method"] in methods]
    md = markdown(rows, methods, tasks, models) + wall_note(state["runs"], shown, state.get("last_training_invocation"),
                                                                   state.get("training_invocations")) + sweep_markdown(state["runs"])
    if a.compare:
        with open(a.compare) as f:
            other = json.load(f)
        if same_budget(other.get("budget"), budget) is False:
            raise SystemExit(f"--compare {a.compare}: made with budget {other.get('budget')}, not {budget}")
        keep = lambda r: (r["model"], r["task"], r["method"]) in {(x["model"], x["task"], x["method"]) for x in shown}  # noqa: E731
        md += compare_markdown([r for r in state["runs"] if keep(r)], other["runs"], os.path.basename(a.compare))
    md_path = os.path.splitext(a.out)[0] + ".md"
    with open(md_path, "w") as f:
        f.write(md)
    for doc, src in sync_results.sync(only=md_path):  # RESULTS*.md blocks that embed this report
        print(f"{doc}: {src} updated", file=sys.stderr)
    plot(rows, methods, tasks, models, os.path.splitext(a.out)[0] + ".png")
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
