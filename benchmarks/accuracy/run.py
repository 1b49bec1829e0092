"""The accuracy runner: methods x GLUE tasks x real models, mean +- std over seeds, on GLUE dev.

An experiment is a spec (``specs/*.toml``, see ``experiment.py``): models, tasks, methods (with their options),
seeds, budget, sweep. Options on the command line override the spec's (``--help`` lists them all).

Protocol: every method gets the same data budget (``max_train`` examples sampled with the seed, the same epochs,
batch size and schedule); model selection (the step of best validation accuracy, MCC on CoLA, and the learning
rate when ``sweep`` is on, its grid run at ``grid_seed``) uses a validation split carved from the training sample,
never the reported dev set. Without ``sweep`` each row trains at the lr the committed table reports for it
(``--lrs-from``: its sweep's pick), so ``--fresh`` regenerates the committed table's runs. LT methods predict argmax
over the K label-conditioned scores (paper A.4); the others use an ordinary head. Metrics: accuracy, and Matthews
correlation for CoLA (the GLUE metric). Results are appended run by run to the JSON (atomically), so an
interrupted table resumes where it stopped.

    python benchmarks/accuracy/run.py quick                 # CI smoke test: 1 seed, 300 examples, SST-2, MiniLM
    python benchmarks/accuracy.py --quick                   # the same (the historical command)
    python benchmarks/accuracy/run.py table --jobs 2        # the six issue-4 rows, 2 single-thread workers
    python benchmarks/accuracy/run.py table --plan --fresh  # train nothing: the runs from scratch, estimated time
    python benchmarks/accuracy/run.py table --jobs 2 --stop-after 60   # start no run after 60 min; rerun resumes
    python benchmarks/accuracy/run.py report                # results/accuracy.md + .png from results/accuracy.json
    python benchmarks/accuracy/run.py nf4 --jobs 2          # LoRA, LT-prefix on an NF4 SmolLM2 base vs the fp32 table

``--quantize nf4|int8`` (spec key ``quantize``) loads the frozen base through bitsandbytes; the precision is recorded
in every run and is part of its key and of its row, so quantized and full-precision runs never mix (records without
the key are full precision); ``--compare`` with a full-precision JSON adds the paired per-seed deltas.

A table made in several invocations records each one (``training_invocations``: command, machine, code
commit, runs, elapsed) and the report gives their total elapsed time.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import random
import statistics
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [os.path.dirname(os.path.dirname(HERE)), os.path.dirname(HERE), HERE]
import sync_results  # noqa: E402  (benchmarks/)
from common import DATA, RESULTS, ROOT, atomic_json, cpu_name, group  # noqa: E402
from experiment import (DEFAULT_METHODS, RELATED_METHODS, TASK_METRIC, default_lr, load_spec,  # noqa: E402,F401
                        parse_method, spec_path)
from table import (chart_methods, compare_markdown, delta_markdown, markdown, plot, precision,  # noqa: E402,F401
                   precision_deltas, row_lr, row_runs, run_key, summarize, sweep_markdown, wall_note)
from ltuning.methods import method_class  # noqa: E402


class Bases:
    """Each base model is loaded once (in ``dtype``; its Linears quantized if ``quantize`` is "nf4" / "int8") and
    re-patched for every run (unpatch restores it)."""

    def __init__(self, dtype, quantize="none"):
        self.dtype, self.quantize, self.cache = dtype, quantize, {}

    def get(self, name):
        if name not in self.cache:
            from ltuning.models import load_base
            q = None if self.quantize == "none" else self.quantize
            self.cache = {name: load_base(name, self.dtype, q)}  # keep one model in memory at a time
        return self.cache[name]


def run_one(bases, model, task, method, seed, lr, a) -> dict:
    import ltuning
    from ltuning.data import load_split

    base, tok = bases.get(model)
    if task == "snli":  # only a dev file: a fixed seeded disjoint split of it (the same for every run)
        group("serving")
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
                             label_texts=texts, quantize=None if a.quantize == "none" else a.quantize, **opts)
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
    # the configuration the method string resolved to (family-dependent defaults filled in): what the run means
    # whatever later defaults make of the string; label names and texts are the task's
    config = {k: v for k, v in clf.model.config.to_dict().items() if k not in ("label_names", "label_texts")}
    return {"model": model, "task": task, "method": method, "config": config, "seed": seed, "lr": lr,
            "quantize": a.quantize,
            "accuracy": m["accuracy"],
            "mcc": m["mcc"], "macro_f1": m["macro_f1"], "metric": TASK_METRIC[task], "score": m[TASK_METRIC[task]],
            "best_val": hist["best_val"], "trainable_parameters": trainable,
            "train_examples_per_s": hist["train_examples_per_s"], "eval_examples_per_s": m["eval_examples_per_s"],
            "train_examples": hist["train_examples"], "dev_examples": len(dev), "wall_seconds": time.time() - t0,
            "date": time.strftime("%Y-%m-%d"), "machine": machine(), "threads": torch_threads(),
            "load_average_at_end": list(os.getloadavg())}  # a shared machine: wall time is not the method's alone


def torch_threads() -> int:
    import torch
    return torch.get_num_threads()


def machine() -> str:
    """What ran a run: architecture, cores and the CPU's model name (from /proc/cpuinfo where there is one)."""
    return f"{platform.machine()}, {os.cpu_count()} cores, {cpu_name()}"


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
    """A copy of the run ``key`` = (model, task, method, seed, swept, lr, base precision) (``run_key``),
    relabelled as a sweep run or as a table run (``sweep``), or None. A sweep's seed-0 run at the picked lr is
    exactly the table's seed-0 run (same config, data sample, seed and base), so it is reused instead of trained
    twice; the copy says so."""
    for r in runs:
        if run_key(r) == key:
            return dict(r, sweep=sweep, copied_from="table run" if sweep else "sweep run")
    return None


def plan(runs: list, models: list, tasks: list, methods: list, seeds: list, sweep: bool, grid_seed: int,
         timed: list | None = None, quantize: str = "none", extend_edge: int = 0) -> list:
    """The runs an invocation still has to train (those not in ``runs``), in queue order, as
    ``(model, task, method, seed, lr, minutes)``. ``minutes`` is the median wall time of finished runs of the same
    model, task and method in ``timed`` (default ``runs``; of the same method with any options, failing that), or
    None when there is none. For a swept row whose grid is not finished the seeds are listed at the default lr
    (the pick is not known yet); an unswept row's at ``row_lr`` (a pick in ``runs``, e.g. ``frozen_sweeps``).
    ``quantize``: the frozen base's precision of the runs to do (runs on another base are not these; timed by
    runs on the same base if there are any, else by any). ``extend_edge``: as ``--extend-edge``, a finished grid
    whose pick is its highest or lowest lr also lists the seed-0 run one half-decade beyond it (``beyond_edge``;
    up to ``extend_edge`` such steps; each step is known only once the previous one has run)."""
    timed = runs if timed is None else timed
    q = quantize

    def minutes(model, task, method):
        base = parse_method(method)[0]
        for same in (lambda r: r["method"] == method and precision(r) == q,
                     lambda r: parse_method(r["method"])[0] == base and precision(r) == q,
                     lambda r: r["method"] == method, lambda r: parse_method(r["method"])[0] == base):
            w = [r["wall_seconds"] for r in timed if (r["model"], r["task"]) == (model, task) and same(r)
                 and "wall_seconds" in r and "copied_from" not in r]  # a copy is another run's time
            if w:
                return statistics.median(w) / 60
        return None

    have = {run_key(r) for r in runs}
    todo = []
    for model in models:
        for task in tasks:
            for method in methods:
                est = minutes(model, task, method)
                lr = default_lr(method) if sweep else row_lr(runs, model, task, method, q)
                if sweep:
                    grid = list(method_class(parse_method(method)[0]).lr_grid)
                    for step in range(1 + extend_edge):  # as the main loop: grid, then lrs beyond an edge pick
                        left = [g for g in grid if (model, task, method, grid_seed, True, g, q) not in have
                                and (model, task, method, grid_seed, False, g, q) not in have]
                        todo += [(model, task, method, grid_seed, g, est) for g in left]
                        if not all((model, task, method, grid_seed, True, g, q) in have for g in grid):
                            break  # the pick is not known yet
                        lr = row_lr(runs, model, task, method, q)  # the pick is known
                        beyond = beyond_edge(grid, lr) if step < extend_edge else None
                        if beyond is None:
                            break
                        grid.append(beyond)
                todo += [(model, task, method, s, lr, est) for s in seeds
                         if (model, task, method, s, False, lr, q) not in have
                         and not (sweep and s == grid_seed)]  # a swept row's grid-seed run is its grid's run
    return todo


def beyond_edge(grid, lr: float):
    """The next lr of the half-decade ladder (..., 1e-3, 3e-3, 1e-2, ...) beyond the grid's edge when ``lr`` (the
    pick) is its highest or lowest value, else None: 3e-3 -> 1e-2, 3e-4 -> 1e-4."""
    ladder = [m * 10.0 ** e for e in range(-7, 1) for m in (1, 3)]

    def rung(x):
        return min(range(len(ladder)), key=lambda i: abs(math.log(ladder[i] / x)))

    if lr == max(grid) and rung(lr) + 1 < len(ladder):
        return float(f"{ladder[rung(lr) + 1]:.0e}")
    if lr == min(grid) and rung(lr) > 0 and len(grid) > 1:
        return float(f"{ladder[rung(lr) - 1]:.0e}")
    return None


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

    root = ROOT
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True, text=True,
                              check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "ltuning", "csrc", "benchmarks/accuracy"],
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
    ap.add_argument("spec", nargs="?", default=None,
                    help="an experiment spec: a name in benchmarks/accuracy/specs/ (quick, table, related, report) "
                         "or a path to a .toml file; its keys are these options' defaults")
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
    ap.add_argument("--quantize", default="none", choices=["none", "nf4", "int8"],
                    help="the frozen base's Linears through bitsandbytes (nf4: double quantization, bf16 compute; "
                         "int8: LLM.int8), trainable parts fp32. Recorded in every run and part of its key: runs "
                         "on a quantized base are rows of their own, never mixed with full-precision ones (records "
                         "without the key are full precision); without --sweep each row trains at the lr of the "
                         "full-precision row of --lrs-from")
    ap.add_argument("--sweep", action="store_true", help="pick each method's lr on the validation split")
    ap.add_argument("--extend-edge", type=int, default=0, metavar="N",
                    help="with --sweep: while a row's validation pick is the grid's highest (lowest) lr, try the next "
                         "half-decade above (below) it too, at most N times per row (default 0: the method's grid "
                         "only). The pick stays the best validation score over every grid run in the JSON")
    ap.add_argument("--grid-seed", type=int, default=0,
                    help="seed of the sweep's grid runs (whatever --seeds lists: adding seeds to a swept row with "
                         "--seeds 1,2 reuses the seed-0 grid already in --out/--include)")
    ap.add_argument("--data", default=DATA)
    ap.add_argument("--out", default=os.path.join(RESULTS, "accuracy.json"))
    ap.add_argument("--fresh", action="store_true", help="ignore runs already in --out")
    ap.add_argument("--lrs-from", default=os.path.join(RESULTS, "accuracy.json"),
                    help="without --sweep: train each row at the lr this JSON's table reports for it (its sweep's "
                         "pick, else the method's default), its sweep runs copied into --out as the record of the "
                         "pick; default: the committed table; '' for every method's default lr")
    ap.add_argument("--report-only", action="store_true",
                    help="train nothing: make the table, markdown and chart from the runs in --out (and --include)")
    ap.add_argument("--include", default="",
                    help="comma-separated JSON files of other invocations (same budget, e.g. run in parallel with "
                         "OMP_NUM_THREADS=1) whose runs are merged into --out before the table is made")
    ap.add_argument("--quick", action="store_true", help="the spec quick (specs/quick.toml): minilm-l6, sst2, 1 seed, "
                    "300 examples")
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
    spec = a.spec or ("quick" if a.quick else None)
    if spec:
        if not os.path.isfile(spec_path(spec)):
            raise SystemExit(f"no spec {spec_path(spec)}")
        defaults = load_spec(spec)
        unknown = sorted(set(defaults) - set(vars(a)))
        if unknown:
            raise SystemExit(f"{spec_path(spec)}: unknown keys {unknown}")
        ap.set_defaults(**defaults)
        a = ap.parse_args(argv)
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
    script = os.path.relpath(os.path.abspath(sys.argv[0]), os.path.dirname(HERE))
    cmd = " ".join([script if not script.startswith("..") else os.path.basename(sys.argv[0])] + (argv or sys.argv[1:]))
    state.setdefault("commands", [])
    if cmd not in state["commands"]:
        state["commands"].append(cmd)
    state.update(budget=budget, command=cmd, machine=machine())
    key = run_key
    merged = []
    for path in filter(None, a.include.split(",")):
        with open(path) as f:
            other = json.load(f)
        if same_budget(other.get("budget"), budget) is False:
            raise SystemExit(f"{path}: made with budget {other.get('budget')}, not {budget}")
        have = {key(r) for r in state["runs"]}
        new = [r for r in other["runs"] if key(r) not in have]
        state["runs"] += new
        if other["runs"]:  # the report says where they came from (their invocations are in that file)
            merged.append((os.path.relpath(path), len(other["runs"])))
    if not a.sweep:
        have = {key(r) for r in state["runs"]}
        rows = {(m, t, x) for m in models for t in tasks for x in methods}
        state["runs"] += [r for r in frozen_sweeps(a.lrs_from, budget, rows) if key(r) not in have]
    if a.plan:
        timed = state["runs"]
        if a.fresh and os.path.isfile(a.out):  # plan the table from scratch, timed by the runs already made
            with open(a.out) as f:
                timed = json.load(f)["runs"]
        print(plan_text(plan(state["runs"], models, tasks, methods, seeds, a.sweep, a.grid_seed, timed, a.quantize,
                             a.extend_edge), a.jobs))
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
    bases = Bases(a.dtype, a.quantize)
    q = a.quantize
    for model in ([] if a.report_only else models):
        for task in tasks:
            for method in methods:
                lr = default_lr(method) if a.sweep else row_lr(state["runs"], model, task, method, q)
                if a.sweep and not claim(a.claims, model, task, method, q, deadline=a.deadline):
                    continue
                if a.sweep:
                    grid = list(method_class(parse_method(method)[0]).lr_grid)
                    for _ in range(1 + a.extend_edge):
                        for g in grid:
                            if (model, task, method, a.grid_seed, True, g, q) not in done:
                                r = same_run(state["runs"], (model, task, method, a.grid_seed, False, g, q),
                                             sweep=True)
                                r = r or run_one(bases, model, task, method, a.grid_seed, g, a)
                                r["sweep"] = True
                                state["runs"].append(r)
                                done.add(key(r))
                                atomic_json(a.out, state)
                                print(f"sweep {model} {task} {method} lr={g}: val {r['best_val']:.4f}", flush=True)
                        lr = row_lr(state["runs"], model, task, method, q)
                        beyond = beyond_edge(grid, lr)
                        if beyond is None:
                            break
                        grid.append(beyond)  # --extend-edge: the pick sits at the grid's edge
                for seed in seeds:
                    if (model, task, method, seed, False, lr, q) in done:
                        continue
                    if not a.sweep and not claim(a.claims, model, task, method, q, seed, deadline=a.deadline):
                        continue
                    r = same_run(state["runs"], (model, task, method, seed, True, lr, q), sweep=False) if a.sweep else None
                    r = r or run_one(bases, model, task, method, seed, lr, a)
                    state["runs"].append(r)
                    atomic_json(a.out, state)
                    print(f"{model} {task} {method} seed={seed} lr={lr} base={q}: {r['metric']} {100 * r['score']:.1f} "
                          f"(acc {100 * r['accuracy']:.1f}) {r['train_examples_per_s']:.0f} ex/s "
                          f"{r['wall_seconds']:.0f}s", flush=True)
    if a.claims:  # a worker of --jobs: the parent makes the table
        return 0
    rows = summarize(state["runs"])
    state["table"] = rows
    state["wall_seconds_this_invocation"] = time.time() - t_start
    if own() > own_before:  # this invocation trained runs (itself or by its --jobs workers): its elapsed time
        left = len(plan(state["runs"], models, tasks, methods, seeds, a.sweep, a.grid_seed, quantize=q,
                        extend_edge=a.extend_edge))
        inv = {"command": cmd, "date": time.strftime("%Y-%m-%d %H:%M"), "machine": machine(), "code": code_version(),
               "runs_trained": own() - own_before, "elapsed_seconds": state["wall_seconds_this_invocation"],
               "runs_left": left, "load_average_at_end": list(os.getloadavg())}
        state["last_training_invocation"] = inv
        state.setdefault("training_invocations", []).append(inv)
    state["date"] = time.strftime("%Y-%m-%d")
    atomic_json(a.out, state)
    shown = [x for x in rows if x["model"] in models and x["task"] in tasks and x["method"] in methods
             and precision(x) == q]  # the rows of this invocation's base precision
    mine = [x for x in rows if precision(x) == q]
    md = ("" if q == "none" else f"\nFrozen base quantized: **{q}** (bitsandbytes; trainable parts fp32). A row "
          f"trains at its own {q} sweep's pick if it has one, else at the full-precision row's lr (the sweeps listed "
          "below are then fp32 ones).\n")
    md += markdown(mine, methods, tasks, models) + wall_note(state["runs"], shown, state.get("last_training_invocation"),
                                                                   state.get("training_invocations"), merged) + sweep_markdown(
        [x for x in state["runs"] if x["model"] in models and x["task"] in tasks and x["method"] in methods])
    if a.compare:
        with open(a.compare) as f:
            other = json.load(f)
        if same_budget(other.get("budget"), budget) is False:
            raise SystemExit(f"--compare {a.compare}: made with budget {other.get('budget')}, not {budget}")
        # the shown rows' runs and sweeps (an nf4 row's lr is the pick of its copied fp32 sweep); both functions
        # below pair runs of one precision here with runs there
        keep = lambda r: (r["model"], r["task"], r["method"]) in {  # noqa: E731
            (x["model"], x["task"], x["method"]) for x in shown}
        mine_runs = [r for r in state["runs"] if keep(r) and (precision(r) == q or r.get("sweep"))]
        md += compare_markdown(mine_runs, other["runs"], os.path.basename(a.compare))
        if q != "none":  # the same rows on the full-precision base there: the accuracy delta of quantizing it
            state["precision_deltas"] = precision_deltas(mine_runs, other["runs"], q)
            state["precision_deltas_against"] = os.path.relpath(a.compare, os.path.dirname(HERE))
            atomic_json(a.out, state)
            md += delta_markdown(state["precision_deltas"], os.path.basename(a.compare))
    md_path = os.path.splitext(a.out)[0] + ".md"
    with open(md_path, "w") as f:
        f.write(md)
    for doc, src in sync_results.sync(only=md_path):  # RESULTS*.md blocks that embed this report
        print(f"{doc}: {src} updated", file=sys.stderr)
    plot(mine, methods, tasks, models, os.path.splitext(a.out)[0] + ".png")
    print(md)
    return 0



if __name__ == "__main__":
    sys.exit(main())
