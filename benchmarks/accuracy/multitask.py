"""Multi-task comparison (issue 5): CGC-LoRA vs one shared LoRA vs one LoRA per task, over seeds.

Every setting sees exactly the same examples per seed (``--max-train`` per task, sampled with the seed; the
validation split is carved from them; ``--max-dev`` dev examples per task). Each run is one ``ltuning train``
process; a finished run (its ``metrics.json`` exists) is not repeated, so an interrupted table resumes.

    python benchmarks/accuracy/multitask.py                       # 3 seeds, MiniLM, SST-2 + CoLA + RTE + MRPC
    python benchmarks/accuracy/multitask.py --report-only         # table/chart from the runs already in --work

Writes ``--out`` (JSON with every run), the Markdown table next to it and a PNG chart.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [os.path.dirname(os.path.dirname(HERE)), os.path.dirname(HERE)]
import sync_results  # noqa: E402  (benchmarks/)
from common import DATA, RESULTS  # noqa: E402
SETTINGS = ("cgc-lora", "shared-lora", "lora-per-task")


def runs_of(setting: str, tasks: list, work: str, seed: int) -> list:
    """``[(out_dir, method, data_dirs)]`` of one setting and seed."""
    base = os.path.join(work, f"seed{seed}")
    if setting == "lora-per-task":
        return [(os.path.join(base, f"lora-{t}"), "lora", [t]) for t in tasks]
    method = "cgc-lora" if setting == "cgc-lora" else "lora"
    return [(os.path.join(base, setting), method, tasks)]


def run(out: str, method: str, tasks: list, seed: int, a) -> dict:
    path = os.path.join(out, "metrics.json")
    if not os.path.exists(path):
        cmd = [sys.executable, "-m", "ltuning", "train", "--method", method, "--model", a.model,
               "--data", ",".join(os.path.join(a.data, t) for t in tasks), "--out", out,
               "--max-train-examples", str(a.max_train), "--max-dev-examples", str(a.max_dev),
               "--epochs", str(a.epochs), "--batch-size", str(a.batch_size), "--lr", str(a.lr),
               "--seed", str(seed), "--select-metric", "accuracy", "--quiet"]
        print("+", " ".join(cmd), flush=True)
        subprocess.run(cmd, check=True)
    with open(path) as f:
        return json.load(f)


def per_task(setting: str, metrics: list, tasks: list) -> dict:
    """``{task: {"accuracy", "mcc"}}`` of one setting (per-task runs: one metrics file per task)."""
    if setting == "lora-per-task":
        return {t: {"accuracy": m["accuracy"], "mcc": m["mcc"]} for t, m in zip(tasks, metrics)}
    return {t: {"accuracy": metrics[0]["per_task"][t]["accuracy"], "mcc": metrics[0]["per_task"][t]["mcc"]}
            for t in tasks}


def fmt(xs: list, scale: float = 100.0, digits: int = 1) -> str:
    xs = [x * scale for x in xs]
    if len(xs) == 1:
        return f"{xs[0]:.{digits}f}"
    return f"{statistics.mean(xs):.{digits}f} ± {statistics.stdev(xs):.{digits}f}"


def report(results: dict, tasks: list, seeds: list, a) -> str:
    lines = [f"| setting | {' | '.join(t.upper() + (' acc (MCC)' if t == 'cola' else ' acc') for t in tasks)} "
             f"| mean acc | trainable params | wall s / seed |",
             "|---" * (len(tasks) + 4) + "|"]
    for s in SETTINGS:
        rs = [results[s][str(seed)] for seed in seeds if str(seed) in results.get(s, {})]
        if not rs:
            continue
        cells = []
        for t in tasks:
            c = fmt([r["per_task"][t]["accuracy"] for r in rs])
            if t == "cola":
                c += f" ({fmt([r['per_task'][t]['mcc'] for r in rs], 1.0, 3)})"
            cells.append(c)
        mean = fmt([statistics.mean(r["per_task"][t]["accuracy"] for t in tasks) for r in rs])
        lines.append(f"| {s} | {' | '.join(cells)} | {mean} | {rs[0]['trainable_parameters']:,d} "
                     f"| {statistics.median(r['wall_seconds'] for r in rs):.0f} |")
    n = len(seeds)
    lines.append("")
    lines.append(f"Mean ± std over {n} seed(s) ({', '.join(map(str, seeds))}); {a.model}, {a.max_train} training "
                 f"examples per task (a validation split carved from them, 10 % but at least 50, picks the step "
                 f"of best validation accuracy), "
                 f"{a.max_dev} dev examples per task, {a.epochs:g} epochs, batch {a.batch_size}, lr {a.lr:g}.")
    return "\n".join(lines)


def plot(results: dict, tasks: list, seeds: list, path: str, model: str = "") -> None:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed: no chart")
        return
    fig, ax = plt.subplots(figsize=(8, 3.6))
    width = 0.8 / len(SETTINGS)
    for i, s in enumerate(SETTINGS):
        rs = [results[s][str(seed)] for seed in seeds if str(seed) in results.get(s, {})]
        if not rs:
            continue
        xs = [j + (i - (len(SETTINGS) - 1) / 2) * width for j in range(len(tasks))]
        vals = [[100 * r["per_task"][t]["accuracy"] for r in rs] for t in tasks]
        means = [statistics.mean(v) for v in vals]
        errs = [statistics.stdev(v) if len(v) > 1 else 0 for v in vals]
        ax.bar(xs, means, width, yerr=errs, capsize=3, label=s)
    ax.set_xticks(range(len(tasks)), [t.upper() for t in tasks])
    ax.set_ylabel("dev accuracy (%)")
    ax.set_ylim(40, 90)
    ax.set_title(f"multi-task {model}, mean ± std over {len(seeds)} seeds".replace("  ", " "))
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    print(f"wrote {path}")


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="minilm-l6")
    ap.add_argument("--tasks", default="sst2,cola,rte,mrpc")
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--max-train", type=int, default=300, help="training examples per task")
    ap.add_argument("--max-dev", type=int, default=200, help="dev examples per task")
    ap.add_argument("--epochs", type=float, default=3.0)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--data", default=DATA)
    ap.add_argument("--work", default=os.path.join("runs", "multitask"), help="run directories (resumable)")
    ap.add_argument("--out", default=os.path.join(RESULTS, "multitask.json"))
    ap.add_argument("--report-only", action="store_true", help="only collect finished runs")
    a = ap.parse_args(argv)
    tasks, seeds = a.tasks.split(","), [int(s) for s in a.seeds.split(",")]
    results: dict = {}
    t0 = time.time()
    for seed in seeds:
        for s in SETTINGS:
            rs = runs_of(s, tasks, a.work, seed)
            if a.report_only and not all(os.path.exists(os.path.join(o, "metrics.json")) for o, _, _ in rs):
                continue
            ms = [run(o, m, ts, seed, a) for o, m, ts in rs]
            results.setdefault(s, {})[str(seed)] = {
                "per_task": per_task(s, ms, tasks),
                "trainable_parameters": sum(m["trainable_parameters"] for m in ms),
                "wall_seconds": sum(m["wall_seconds"] for m in ms),
            }
    done = sorted({int(k) for r in results.values() for k in r})
    table = report(results, tasks, done, a)
    print(table)
    os.makedirs(os.path.dirname(os.path.abspath(a.out)), exist_ok=True)
    payload = {"config": {k: v for k, v in vars(a).items() if k not in ("data", "work")}, "results": results,
               "seconds_this_invocation": time.time() - t0, "command": "python " + " ".join(sys.argv)}
    tmp = a.out + ".tmp"
    with open(tmp, "w") as f:
        json.dump(payload, f, indent=1)
    os.replace(tmp, a.out)
    md_path = os.path.splitext(a.out)[0] + ".md"
    with open(md_path, "w") as f:
        f.write(table + "\n")
    for doc, src in sync_results.sync(only=md_path):  # RESULTS*.md blocks that embed this report
        print(f"{doc}: {src} updated", file=sys.stderr)
    plot(results, tasks, done, os.path.splitext(a.out)[0] + ".png", a.model)


if __name__ == "__main__":
    main()
