"""The accuracy table from the runs of a JSON: which runs a row averages, the Markdown report and the chart.

A row is (model, task, method); it averages its seeds at the row's learning rate (``row_lr``: the method's
default or, for a swept row, the pick of its sweep on the validation split). Runs at other learning rates stay in
the JSON and never mix into a row.
"""
from __future__ import annotations

import statistics

from experiment import TASK_METRIC, default_lr


def precision(r: dict) -> str:
    """The frozen base's precision a run (or row) was made with: "none" (full precision, ``dtype``), "nf4" or
    "int8" (``--quantize``). Records older than the option have no key: full precision."""
    return r.get("quantize") or "none"


def run_key(r: dict) -> tuple:
    """What identifies a run: (model, task, method, seed, sweep run?, lr, base precision). Runs on a quantized base
    and on a full-precision one never stand for each other (resuming, ``--include``, ``same_run``)."""
    return r["model"], r["task"], r["method"], r["seed"], bool(r.get("sweep")), r["lr"], precision(r)


def row_lr(runs: list, model: str, task: str, method: str, quantize: str = "none") -> float:
    """The lr a table row reports: the sweep's pick (best validation score; the default on a tie) if the row was
    swept, else the default (``default_lr``). Runs at any other lr stay in the JSON but are not averaged into the row.
    A row on a quantized base (``quantize``) takes its own sweep's pick if it has one, else the full-precision
    row's (the lr picked on the fp32 base: a quantized table is trained at the committed table's lrs)."""
    sw = [r for r in runs if r.get("sweep") and (r["model"], r["task"], r["method"]) == (model, task, method)]
    mine = [r for r in sw if precision(r) == (quantize or "none")]
    sw = mine or [r for r in sw if precision(r) == "none"]
    if not sw:
        return default_lr(method)
    # a tie (common: 50 validation examples score in steps of 2 %) keeps the default lr
    return max(sw, key=lambda r: (r["best_val"], r["lr"] == default_lr(method)))["lr"]


def row_runs(runs: list) -> list:
    """The runs a table row averages: its seeds at the row's lr (``row_lr``); sweep runs excluded."""
    return [r for r in runs if not r.get("sweep")
            and r["lr"] == row_lr(runs, r["model"], r["task"], r["method"], precision(r))]


def summarize(runs: list) -> list:
    """Mean and std over seeds per (model, task, method, base precision) of ``row_runs``: a row on an NF4 base is
    a row of its own (``quantize``), never averaged with the full-precision one."""
    groups = {}
    for r in row_runs(runs):
        groups.setdefault((r["model"], r["task"], r["method"], precision(r)), []).append(r)
    rows = []
    for (model, task, method, quant), rs in sorted(groups.items()):
        sc = [100 * r["score"] for r in rs]
        acc = [100 * r["accuracy"] for r in rs]
        rows.append({"model": model, "task": task, "method": method, "quantize": quant, "metric": rs[0]["metric"],
                     "seeds": len(rs),
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


def wall_note(runs: list, rows: list, invocation: dict | None = None, invocations: list | None = None,
              merged: list | None = None) -> str:
    """One line for the report: the summed wall time of the runs averaged into ``rows``, and of every run in the
    JSON (sweep grids and other lrs too; a run reused from another, ``copied_from``, is counted once there); and
    the elapsed time of the last ``invocation`` that trained runs (``state["last_training_invocation"]``), or,
    when several did (``state["training_invocations"]``: a table stopped with ``--stop-after`` and resumed),
    each one's and their total, with the code each ran. ``merged``: (file, runs) merged from ``--include`` files,
    named after that (the invocations above are the --out file's; each included file records its own)."""
    keys = {(x["model"], x["task"], x["method"], precision(x)) for x in rows}
    in_rows = [r for r in row_runs(runs) if "wall_seconds" in r
               and (r["model"], r["task"], r["method"], precision(r)) in keys]
    own = [r for r in runs if "wall_seconds" in r and "copied_from" not in r]
    hours = lambda rs: sum(r["wall_seconds"] for r in rs) / 3600  # noqa: E731
    out = (f"\nWall time (summed over runs, as recorded in the JSON): the {len(in_rows)} runs averaged into these "
           f"rows took {hours(in_rows):.1f} h; all {len(own)} runs in the JSON (sweep grids, other learning rates "
           f"and rows not shown too) {hours(own):.1f} h.\n")
    if merged:
        out += ("Runs merged from other records (`--include`; their invocations, code and dates are in each file): "
                + ", ".join(f"{n} from `{f}`" for f, n in merged) + ". The invocations below are this file's own.\n")
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


def compare_markdown(runs: list, other: list, name: str) -> str:
    """Each row of ``runs`` next to the same row (model, task, method, lr) of ``other`` (e.g. the committed
    table, when this JSON regenerated it from scratch): the means, and on how many seeds the dev score is the same
    (same data sample, seed and config: a difference is the code or the machine's arithmetic, not chance); and
    the median wall time of the runs both trained themselves (not ``copied_from``), with the total over them."""
    mine, theirs, wall_mine, wall_theirs = {}, {}, {}, {}
    for dst, wall, src in ((mine, wall_mine, runs), (theirs, wall_theirs, other)):
        for r in row_runs(src):
            k = (r["model"], r["task"], r["method"], r["lr"], precision(r))  # an NF4 row is not the fp32 row
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


def precision_deltas(runs: list, other: list, quantize: str) -> list:
    """The rows of ``runs`` on the ``quantize`` base (e.g. "nf4") beside the same rows (model, task, method, lr)
    of ``other`` on the full-precision base: per row, both means and sample stds (score x100, each side over all
    its seeds), and the paired difference ``quantized - full`` per seed both have (same data sample, seed and
    config: only the base's precision differs) and its mean. One dict per row, for the JSON and the report."""
    sides = {}
    for side, src, prec in (("quantized", runs, quantize), ("full", other, "none")):
        for r in row_runs(src):
            if precision(r) == prec:
                k = (r["model"], r["task"], r["method"], r["lr"])
                sides.setdefault(k, {}).setdefault(side, {})[r["seed"]] = 100 * r["score"]
    out = []
    for (model, task, method, lr), s in sorted(sides.items()):
        if len(s) < 2:
            continue
        q, f = s["quantized"], s["full"]
        seeds = sorted(set(q) & set(f))
        sd = lambda v: statistics.stdev(v) if len(v) > 1 else 0.0  # noqa: E731
        d = {x: q[x] - f[x] for x in seeds}
        out.append({"model": model, "task": task, "method": method, "lr": lr, "quantize": quantize,
                    "metric": TASK_METRIC.get(task, "accuracy"),
                    "full_seeds": sorted(f), "full_mean": statistics.mean(f.values()), "full_std": sd(list(f.values())),
                    "quantized_seeds": sorted(q), "quantized_mean": statistics.mean(q.values()),
                    "quantized_std": sd(list(q.values())),
                    "delta_per_seed": {str(x): d[x] for x in seeds},
                    "delta_mean": statistics.mean(d.values()) if d else None,
                    "delta_std": sd(list(d.values())) if d else None})
    return out


def delta_markdown(deltas: list, name: str) -> str:
    """The report of :func:`precision_deltas`: one line per row."""
    if not deltas:
        return ""
    q = deltas[0]["quantize"]
    out = [f"\n**{q} base vs the full-precision base of {name}** (the same rows at the same lr; score x100, "
           f"mean ± sample std over seeds; {q} - full per seed: same data sample, seed and config, only the frozen "
           "base's precision differs)\n",
           f"| model | task | method | lr | full precision | {q} | {q} - full per seed | mean ± std of {q} - full |",
           "|---" * 8 + "|"]
    for d in deltas:
        per = ", ".join(f"{v:+.1f} (seed {k})" for k, v in d["delta_per_seed"].items()) or "–"
        mean = "–" if d["delta_mean"] is None else f"{d['delta_mean']:+.1f}" + (
            f" ± {d['delta_std']:.1f}" if len(d["delta_per_seed"]) > 1 else "")
        out.append(f"| {d['model']} | {d['task']} | {d['method'].replace('|', chr(92) + '|')} | {d['lr']:g} "
                   f"| {d['full_mean']:.1f} ± {d['full_std']:.1f} [n={len(d['full_seeds'])}] "
                   f"| {d['quantized_mean']:.1f} ± {d['quantized_std']:.1f} [n={len(d['quantized_seeds'])}] "
                   f"| {per} | {mean} |")
    return "\n".join(out) + "\n"


def chart_methods(methods: list) -> list:
    """The rows the chart shows: one per method, so that the bars stay readable and one colour means one method:
    its plain row, or where it has none its first variant row (``lt-prefix:scoring=kpass``); the other variant
    rows (``method:options``) are in the table only."""
    plain = {m for m in methods if ":" not in m}
    out, seen = [], set()
    for m in methods:
        name = m.partition(":")[0]
        if m in plain or (name not in plain and name not in seen):
            out.append(m)
            seen.add(name)
    return out


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
               title="mean ± std over seeds; one row per method (its plain or first row); other variants in the table only")
    fig.subplots_adjust(bottom=0.28)
    fig.tight_layout(rect=(0, 0.14, 1, 1))
    fig.savefig(path, dpi=110)

