"""Smoke tests of the benchmark scripts (the CI run of ``benchmarks/accuracy/run.py quick``)."""
import importlib.util
import json
import os

import pytest

from ltuning.methods import method_class

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _load(name):
    """A script of benchmarks/ by its path there without .py: "check_figures", "accuracy/run"."""
    spec = importlib.util.spec_from_file_location(name.replace("/", "_"), os.path.join(ROOT, "benchmarks", f"{name}.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_accuracy_quick_smoke(tmp_path, minilm, sst2_dir):
    """--quick: MiniLM, SST-2, 1 seed, 300 training examples, 300 dev examples, three methods; writes the JSON,
    the markdown table and the chart, and resumes (a second call trains nothing)."""
    acc = _load("accuracy/run")
    out = tmp_path / "quick.json"
    args = ["quick", "--out", str(out), "--data", os.path.dirname(sst2_dir)]  # the spec specs/quick.toml
    assert acc.main(args) == 0
    state = json.loads(out.read_text())
    runs = state["runs"]
    assert sorted(r["method"] for r in runs) == ["linear-probe", "lt-prefix", "prefix"]
    for r in runs:
        assert r["task"] == "sst2" and r["dev_examples"] == 300 and r["train_examples"] > 0
        assert 0.0 <= r["accuracy"] <= 1.0 and r["trainable_parameters"] > 0 and r["train_examples_per_s"] > 0
        assert r["machine"] == acc.machine() and r["date"] == state["date"]  # each run says when and where it ran
    # every method must beat the majority class of the 300-example dev sample by a margin (SST-2 dev ~51 % positive)
    assert min(r["accuracy"] for r in runs) > 0.6, [(r["method"], r["accuracy"]) for r in runs]
    md = (tmp_path / "quick.md").read_text()
    assert "| lt-prefix |" in md and (tmp_path / "quick.png").stat().st_size > 1000
    wall = state["wall_seconds_this_invocation"]
    inv = state["last_training_invocation"]
    assert inv["runs_trained"] == 3 and inv["elapsed_seconds"] == wall and "3 runs in" in md
    assert acc.main(args) == 0
    again = json.loads(out.read_text())
    assert len(again["runs"]) == 3 and again["wall_seconds_this_invocation"] < wall
    assert again["last_training_invocation"] == inv  # an invocation that trains nothing keeps the last one's record


def test_experiment_specs_set_the_runner_options(tmp_path, capsys):
    """An experiment is a spec (benchmarks/accuracy/specs/*.toml) whose keys are the runner's options: quick is what
    --quick always was; table trains at the committed table's budget (so --lrs-from lends it the sweeps' picks); every
    spec plans (no training); a key that is no option is refused; options on the command line override a spec's."""
    acc = _load("accuracy/run")
    quick = acc.load_spec("quick")
    assert {k: quick[k] for k in ("models", "tasks", "methods", "seeds", "max_train", "max_dev")} == {
        "models": "minilm-l6", "tasks": "sst2", "methods": "linear-probe,prefix,lt-prefix", "seeds": "0",
        "max_train": 300, "max_dev": 300}
    assert quick["out"] == os.path.join(ROOT, "benchmarks", "results", "accuracy_quick.json")
    with open(os.path.join(ROOT, "benchmarks", "results", "accuracy.json")) as f:
        committed = json.load(f)["budget"]
    table = acc.load_spec("table")
    assert {k: table.get(k) for k in committed} == committed
    assert table["methods"].split(",") == acc.DEFAULT_METHODS
    specs = sorted(f[:-5] for f in os.listdir(os.path.join(ROOT, "benchmarks", "accuracy", "specs")))
    assert {"quick", "table", "related", "report"} <= set(specs)
    for name in specs:
        capsys.readouterr()
        assert acc.main([name, "--plan", "--out", str(tmp_path / f"{name}.json")]) == 0, name
        assert "runs to train" in capsys.readouterr().out
    capsys.readouterr()
    assert acc.main(["quick", "--plan", "--seeds", "0,1", "--out", str(tmp_path / "q.json")]) == 0
    assert "seed=1" in capsys.readouterr().out  # the command line overrides the spec
    bad = tmp_path / "bad.toml"
    bad.write_text('models = ["minilm-l6"]\nnot_an_option = 1\n')
    with pytest.raises(SystemExit, match="not_an_option"):
        acc.main([str(bad), "--plan"])


def test_the_historical_quick_command_runs_the_quick_spec(tmp_path):
    """``python benchmarks/accuracy.py --quick`` (the command CI and the docs used) is the runner with the quick spec."""
    import subprocess
    import sys

    r = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "accuracy.py"), "--quick", "--plan", "--fresh",
                        "--lrs-from", "", "--out", str(tmp_path / "q.json")], capture_output=True, text=True,
                       env=dict(os.environ, PYTHONPATH=ROOT), timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    planned = [ln.split(":")[0] for ln in r.stdout.splitlines() if " seed=" in ln]
    assert planned == [f"minilm-l6 sst2 {m} seed=0 lr={method_class(m).default_lr:g}"
                       for m in ("linear-probe", "prefix", "lt-prefix")], r.stdout


def test_method_variant_specs():
    """The accuracy table's row syntax: method, options joined by +, label texts separated by |."""
    acc = _load("accuracy/run")
    assert acc.parse_method("lt-prefix") == ("lt-prefix", {})
    assert acc.parse_method("lt-prefix:variant=kv+num_negatives=2+lr=1e-3") == (
        "lt-prefix", {"variant": "kv", "num_negatives": 2, "lr": 1e-3})
    assert acc.parse_method("lt-prompt:label_texts=Class A.|Class B.") == (
        "lt-prompt", {"label_texts": ["Class A.", "Class B."]})
    assert acc.parse_method("lt-prompt:scale_to_embeddings=false") == ("lt-prompt", {"scale_to_embeddings": False})
    assert acc.default_lr("lt-prompt:lr=1e-4") == 1e-4 and acc.default_lr("prompt") == 3e-2


def test_table_rows_average_only_the_rows_learning_rate():
    """A row averages the seeds run at its own lr: the default (or the spec's lr=), or the sweep's pick on the
    validation split; runs at other learning rates stay in the JSON but never mix into the mean."""
    acc = _load("accuracy/run")

    def run(method, lr, score, seed=0, sweep=False, val=0.5):
        r = {"model": "m", "task": "sst2", "method": method, "seed": seed, "lr": lr, "score": score,
             "accuracy": score, "metric": "accuracy", "best_val": val, "trainable_parameters": 1,
             "train_examples_per_s": 1.0}
        return dict(r, sweep=True) if sweep else r

    runs = [run("prefix", 1e-3, 0.8), run("prefix", 1e-3, 0.6, seed=1), run("prefix", 1e-2, 0.1),
            run("lt-prompt:lr=1e-4", 1e-4, 0.9), run("lt-prompt:lr=1e-4", 1e-3, 0.2),
            run("fl", 3e-3, 0.0, sweep=True, val=0.9), run("fl", 1e-3, 0.0, sweep=True, val=0.7),
            run("fl", 1e-3, 0.3), run("fl", 3e-3, 0.7),
            run("apt", 3e-4, 0.0, sweep=True, val=0.8), run("apt", 1e-3, 0.0, sweep=True, val=0.8),
            run("apt", 1e-3, 0.6), run("apt", 3e-4, 0.9)]
    rows = {r["method"]: r for r in acc.summarize(runs)}
    assert (rows["prefix"]["seeds"], round(rows["prefix"]["mean"], 6), rows["prefix"]["lr"]) == (2, 70.0, 1e-3)
    assert (rows["lt-prompt:lr=1e-4"]["seeds"], rows["lt-prompt:lr=1e-4"]["mean"]) == (1, 90.0)
    assert (rows["fl"]["seeds"], rows["fl"]["mean"], rows["fl"]["lr"]) == (1, 70.0, 3e-3)
    assert (rows["apt"]["lr"], rows["apt"]["mean"]) == (1e-3, 60.0)  # a validation tie keeps the default lr


def test_multitask_report_from_finished_runs(tmp_path):
    """benchmarks/accuracy/multitask.py --report-only collects finished runs (per task and multi-task metrics files)
    into the JSON, the Markdown table (mean ± std over seeds) and the chart, and skips unfinished settings."""
    mt = _load("accuracy/multitask")
    tasks = ["sst2", "rte"]
    for seed, acc in ((0, 0.7), (1, 0.8)):
        for out, method, ts in mt.runs_of("cgc-lora", tasks, str(tmp_path), seed) + \
                mt.runs_of("lora-per-task", tasks, str(tmp_path), seed):
            os.makedirs(out)
            m = {"accuracy": acc, "mcc": 0.1, "trainable_parameters": 10, "wall_seconds": 5.0,
                 "per_task": {t: {"accuracy": acc, "mcc": 0.1} for t in ts}}
            (open(os.path.join(out, "metrics.json"), "w")).write(json.dumps(m))
    out = tmp_path / "mt.json"
    mt.main(["--tasks", ",".join(tasks), "--seeds", "0,1", "--work", str(tmp_path), "--out", str(out),
             "--report-only"])
    res = json.loads(out.read_text())["results"]
    assert set(res) == {"cgc-lora", "lora-per-task"}  # shared-lora never ran
    assert res["lora-per-task"]["1"]["trainable_parameters"] == 20
    md = (tmp_path / "mt.md").read_text()
    assert "| cgc-lora | 75.0 ± 7.1 | 75.0 ± 7.1 | 75.0 ± 7.1 |" in md


def test_accuracy_jobs_share_one_queue(tmp_path, minilm, sst2_dir):
    """--jobs 2: two worker processes take the runs from one queue; every run is done exactly once, the
    results are merged into --out (the workers' files removed), and a rerun with more seeds does only the
    new ones."""
    acc = _load("accuracy/run")
    out = tmp_path / "jobs.json"
    base = ["--models", "minilm-l6", "--tasks", "sst2", "--methods", "linear-probe", "--max-train", "80",
            "--max-dev", "64", "--epochs", "1", "--out", str(out), "--data", os.path.dirname(sst2_dir), "--jobs", "2"]
    assert acc.main(base + ["--seeds", "0,1"]) == 0
    runs = json.loads(out.read_text())["runs"]
    assert sorted(r["seed"] for r in runs) == [0, 1]
    assert sorted(os.listdir(tmp_path)) == ["jobs.json", "jobs.md", "jobs.png"]
    first = {r["seed"]: r["wall_seconds"] for r in runs}
    assert acc.main(base + ["--seeds", "0,1,2"]) == 0
    runs = json.loads(out.read_text())["runs"]
    assert sorted(r["seed"] for r in runs) == [0, 1, 2]
    assert {r["seed"]: r["wall_seconds"] for r in runs if r["seed"] < 2} == first  # not rerun
    md = (tmp_path / "jobs.md").read_text()
    assert "| linear-probe | " in md
    invs = json.loads(out.read_text())["training_invocations"]
    assert [i["runs_trained"] for i in invs] == [2, 1] and [i["runs_left"] for i in invs] == [0, 0]
    total = sum(i["elapsed_seconds"] for i in invs) / 3600
    assert f"2 invocations trained these runs, one after another, **{total:.2f} h elapsed in total**" in md
    assert acc.main(base + ["--seeds", "0,1,2,3", "--stop-after", "0"]) == 0  # drained before the first run
    state = json.loads(out.read_text())
    assert len(state["runs"]) == 3 and len(state["training_invocations"]) == 2
    assert sorted(os.listdir(tmp_path)) == ["jobs.json", "jobs.md", "jobs.png"]


def test_claim_stops_at_the_deadline_or_a_stop_file(tmp_path):
    """--stop-after / OUT.queue/STOP: no unit is taken after the deadline or once the STOP file exists; before
    that each unit goes to exactly one caller."""
    import time

    acc = _load("accuracy/run")
    q = str(tmp_path)
    assert acc.claim(q, "m", "t", "x", 0, deadline=time.time() + 60)
    assert not acc.claim(q, "m", "t", "x", 0)  # taken
    assert not acc.claim(q, "m", "t", "x", 1, deadline=time.time() - 1)
    assert not acc.claim(None, "m", "t", "x", 1, deadline=time.time() - 1)  # one process, no queue: same rule
    assert acc.claim(None, "m", "t", "x", 1)
    (tmp_path / "STOP").touch()
    assert not acc.claim(q, "m", "t", "x", 2)


def test_accuracy_sweep_reuses_runs_and_reports_the_pick(tmp_path, minilm, sst2_dir):
    """--sweep: the grid point at an lr the table already ran (seed 0) is reused, not retrained; the row then
    reports 2 seeds at the pick (best validation score), the pick's seed-0 run being the sweep's own; the
    Markdown lists validation / dev per lr."""
    acc = _load("accuracy/run")
    out = tmp_path / "sw.json"
    base = ["--models", "minilm-l6", "--tasks", "sst2", "--methods", "linear-probe", "--max-train", "80",
            "--max-dev", "64", "--epochs", "1", "--out", str(out), "--data", os.path.dirname(sst2_dir)]
    assert acc.main(base + ["--seeds", "0"]) == 0
    assert acc.main(base + ["--seeds", "0,1", "--sweep"]) == 0
    state = json.loads(out.read_text())
    runs = state["runs"]
    grid = list(method_class("linear-probe").lr_grid)
    assert sorted(r["lr"] for r in runs if r.get("sweep")) == sorted(grid)
    assert [r["copied_from"] for r in runs if r.get("sweep") and r["lr"] == 1e-2] == ["table run"]
    trained = [r for r in runs if "copied_from" not in r]
    pick = acc.row_lr(runs, "minilm-l6", "sst2", "linear-probe")
    best = max(r["best_val"] for r in runs if r.get("sweep"))
    assert [r["best_val"] for r in runs if r.get("sweep") and r["lr"] == pick] == [best]
    assert len(trained) == 1 + (len(grid) - 1) + 1  # table seed 0, the other grid points, seed 1 at the pick
    row = next(r for r in state["table"] if r["method"] == "linear-probe")
    assert (row["lr"], row["seeds"]) == (pick, 2)
    md = (tmp_path / "sw.md").read_text()
    assert "Learning-rate sweeps" in md and f"*{pick:g}:" in md
    # a later seed added to the swept row reuses the seed-0 grid: one new run (seed 2 at the pick), no new grid
    assert acc.main(base + ["--seeds", "2", "--sweep"]) == 0
    again = json.loads(out.read_text())["runs"]
    assert [(r["seed"], r["lr"]) for r in again[len(runs):]] == [(2, pick)]


def test_extend_edge_tries_one_lr_beyond_an_edge_pick(tmp_path, minilm, sst2_dir, monkeypatch):
    """--extend-edge 1: a pick at the grid's top edge adds the next half-decade (3e-3 -> 1e-2) to the sweep; an
    interior pick adds nothing; the row's lr stays the best validation score over every grid run."""
    acc = _load("accuracy/run")
    assert (acc.beyond_edge([3e-4, 1e-3, 3e-3], 3e-3), acc.beyond_edge([3e-4, 1e-3, 3e-3], 3e-4),
            acc.beyond_edge([3e-4, 1e-3, 3e-3], 1e-3), acc.beyond_edge([3e-3, 1e-2, 3e-2], 3e-2)) == (1e-2, 1e-4, None, 0.1)
    scores = {}

    def fake_run(bases, model, task, method, seed, lr, a):
        v = scores[lr]
        return {"model": model, "task": task, "method": method, "seed": seed, "lr": lr, "best_val": v, "score": v,
                "accuracy": v, "metric": "accuracy", "train_examples_per_s": 1.0, "wall_seconds": 1.0,
                "quantize": "none", "trainable_parameters": 1, "train_examples": 1, "dev_examples": 1}

    monkeypatch.setattr(acc, "run_one", fake_run)

    def swept(name, extend, vals):
        scores.clear()
        scores.update(vals)
        out = tmp_path / f"{name}.json"
        assert acc.main(["--models", "minilm-l6", "--tasks", "sst2", "--methods", "linear-probe", "--seeds", "0",
                         "--sweep", "--extend-edge", str(extend), "--out", str(out),
                         "--data", os.path.dirname(sst2_dir)]) == 0
        runs = json.loads(out.read_text())["runs"]
        return sorted(r["lr"] for r in runs if r.get("sweep")), acc.row_lr(runs, "minilm-l6", "sst2", "linear-probe")

    edge = {3e-3: 0.5, 1e-2: 0.7, 3e-2: 0.9, 0.1: 0.6}  # the probe's grid is (3e-3, 1e-2, 3e-2): top edge wins
    assert swept("edge", 1, edge) == ([3e-3, 1e-2, 3e-2, 0.1], 3e-2)  # tried beyond, kept the better 3e-2
    assert swept("edge0", 0, edge) == ([3e-3, 1e-2, 3e-2], 3e-2)  # without the option: the grid only
    assert swept("up", 1, {**edge, 0.1: 0.95}) == ([3e-3, 1e-2, 3e-2, 0.1], 0.1)  # the new edge is the pick
    assert swept("inner", 1, {3e-3: 0.5, 1e-2: 0.9, 3e-2: 0.6}) == ([3e-3, 1e-2, 3e-2], 1e-2)  # interior: nothing


def test_results_docs_embed_the_current_reports(tmp_path):
    """The tables in benchmarks/RESULTS*.md are copies of the reports the scripts write
    (``<!-- report: results/X.md -->`` blocks): every committed copy equals its file, and sync_results rewrites
    a stale block (only the named report's when asked), leaving the text around it alone."""
    sync = _load("sync_results")
    assert sync.stale() == [], "run: python benchmarks/sync_results.py"
    embedded = set()
    for doc in sync._docs(sync.HERE):
        embedded |= {m["src"] for m in sync.BLOCK.finditer(open(doc, encoding="utf-8").read())}
    assert {"results/accuracy.md", "results/multitask.md", "results/multitask_smollm2.md"} <= embedded

    (tmp_path / "results").mkdir()
    (tmp_path / "results" / "a.md").write_text("| new a |\n")
    (tmp_path / "results" / "b.md").write_text("\n| new b |\n\n")
    doc = tmp_path / "RESULTS_x.md"
    block = "<!-- report: results/{} -->\n{}<!-- /report -->\n"
    doc.write_text("intro\n" + block.format("a.md", "| old |\n") + "middle\n" + block.format("b.md", "") + "end\n")
    assert sync.stale(str(tmp_path)) == [("RESULTS_x.md", "results/a.md"), ("RESULTS_x.md", "results/b.md")]
    assert sync.sync(only=str(tmp_path / "results" / "a.md"), folder=str(tmp_path)) == [("RESULTS_x.md", "results/a.md")]
    assert doc.read_text() == ("intro\n" + block.format("a.md", "| new a |\n") + "middle\n"
                               + block.format("b.md", "") + "end\n")
    assert sync.sync(folder=str(tmp_path)) == [("RESULTS_x.md", "results/b.md")]
    assert doc.read_text().endswith("middle\n" + block.format("b.md", "| new b |\n") + "end\n")
    assert sync.stale(str(tmp_path)) == []
    doc.write_text(block.format("missing.md", ""))
    with pytest.raises(FileNotFoundError, match="missing.md"):
        sync.stale(str(tmp_path))


def test_table_params_cell_shows_the_range_over_tasks():
    """A method whose trainable-parameter count differs between tasks (sk-prompt: one prompt vector per token of
    each task's description) shows the range, not one task's count; a method with one count shows it alone."""
    acc = _load("accuracy/run")
    runs = [{"model": "m", "task": t, "method": meth, "seed": 0, "lr": 1e-3, "score": 0.5, "accuracy": 0.5,
             "metric": "accuracy", "best_val": 0.5, "trainable_parameters": n, "train_examples_per_s": 1.0}
            for meth, t, n in [("sk-prompt", "sst2", 5378), ("sk-prompt", "rte", 4226), ("prefix", "sst2", 2000),
                               ("prefix", "rte", 2000)]]
    md = acc.markdown(acc.summarize(runs), ["sk-prompt", "prefix"], ["sst2", "rte"], ["m"])
    assert "| 0.001 | 4,226-5,378 | 1 |" in md
    assert "| 0.001 | 2,000 | 1 |" in md


def test_plan_lists_the_runs_left_with_estimated_times():
    """--plan: the runs not yet in the JSON, in queue order, each timed by the median wall of finished runs of
    the same model/task/method (of the same base method, failing that); a finished sweep grid plans the seeds
    at its pick and reuses its seed-0 run."""
    acc = _load("accuracy/run")

    def run(method, seed, lr, wall, sweep=False, val=0.5):
        return {"model": "m", "task": "sst2", "method": method, "seed": seed, "lr": lr, "sweep": sweep,
                "best_val": val, "wall_seconds": wall}

    runs = [run("prefix", 0, 1e-3, 60), run("prefix", 1, 1e-3, 180), run("prefix", 2, 1e-3, 600)]
    todo = acc.plan(runs, ["m"], ["sst2"], ["prefix", "prefix:variant=x", "lora"], [0, 1, 2], False, 0)
    assert [(t[2], t[3], t[5]) for t in todo] == [("prefix:variant=x", s, 3.0) for s in (0, 1, 2)] + \
        [("lora", s, None) for s in (0, 1, 2)]
    text = acc.plan_text(todo, 2)
    assert "6 runs to train; 3 with a timing" in text and "~0.1 h on one worker, ~0.1 h elapsed with --jobs 2" in text

    grid = [run("fl", 0, g, 120, sweep=True, val=v) for g, v in zip(list(method_class("fl").lr_grid), (0.5, 0.6, 0.9))]
    todo = acc.plan(grid, ["m"], ["sst2"], ["fl"], [0, 1, 2], True, 0)
    assert [(t[3], t[4]) for t in todo] == [(1, 3e-3), (2, 3e-3)]  # the pick; its seed-0 run is the grid's
    todo = acc.plan(grid[:1], ["m"], ["sst2"], ["fl"], [0, 1], True, 0)
    assert [(t[3], t[4]) for t in todo] == [(0, 1e-3), (0, 3e-3), (1, 1e-3)]  # seed 1 at the default for now

    # --extend-edge 1: the top-edge pick 3e-3 also lists its seed-0 run at 1e-2; once run, the pick is the best of all
    assert list(method_class("fl").lr_grid)[-1] == 3e-3
    todo = acc.plan(grid, ["m"], ["sst2"], ["fl"], [0, 1, 2], True, 0, extend_edge=1)
    assert [(t[3], t[4]) for t in todo] == [(0, 1e-2), (1, 3e-3), (2, 3e-3)]
    for val, pick in ((0.7, 3e-3), (0.95, 1e-2)):
        todo = acc.plan(grid + [run("fl", 0, 1e-2, 120, sweep=True, val=val)], ["m"], ["sst2"], ["fl"], [0, 1, 2],
                        True, 0, extend_edge=1)
        assert [(t[3], t[4]) for t in todo] == [(1, pick), (2, pick)]
    inner = [dict(r, best_val=v) for r, v in zip(grid, (0.5, 0.9, 0.6))]  # an interior pick: nothing beyond
    todo = acc.plan(inner, ["m"], ["sst2"], ["fl"], [0, 1], True, 0, extend_edge=1)
    assert [(t[3], t[4]) for t in todo] == [(1, 1e-3)]


def test_chart_shows_plain_methods_and_leaves_variants_to_the_table():
    chart_methods = _load("accuracy/run").chart_methods
    rows = ["linear-probe", "lt-prefix", "lt-prefix:variant=kv", "prefix:num_virtual_tokens=5", "prefix"]
    assert chart_methods(rows) == ["linear-probe", "lt-prefix", "prefix"]
    assert chart_methods(rows[2:4]) == rows[2:4]  # an invocation of variants only still gets its chart
    # a method without a plain row is charted by its first variant row (the table's lt-prefix:scoring=kpass)
    assert chart_methods(["lora", "lt-prefix:scoring=kpass", "lt-prefix:scoring=kpass+variant=kv"]) == [
        "lora", "lt-prefix:scoring=kpass"]


def test_report_states_the_summed_wall_time_of_its_runs():
    """The report's wall-time line sums the runs averaged into the shown rows (a seed-0 run copied from the sweep
    counts, at the original's wall time) and, separately, every run once (copies not twice)."""
    acc = _load("accuracy/run")

    def run(method, lr, seed, wall, sweep=False, **kw):
        return dict({"model": "m", "task": "sst2", "method": method, "seed": seed, "lr": lr, "score": 0.5,
                     "accuracy": 0.5, "metric": "accuracy", "best_val": 0.5, "trainable_parameters": 1,
                     "train_examples_per_s": 1.0, "wall_seconds": wall}, sweep=sweep, **kw)

    runs = [run("prefix", 1e-3, 0, 3600, sweep=True, best_val=0.9), run("prefix", 3e-3, 0, 7200, sweep=True),
            run("prefix", 1e-3, 0, 3600, copied_from="sweep run"), run("prefix", 1e-3, 1, 1800),
            run("prefix", 3e-3, 1, 900),  # another lr: not in the row
            run("fl", 1e-3, 0, 540)]  # a row not shown
    rows = [x for x in acc.summarize(runs) if x["method"] == "prefix"]
    note = acc.wall_note(runs, rows)
    assert "the 2 runs averaged into these rows took 1.5 h" in note, note
    assert "all 5 runs in the JSON (sweep grids, other learning rates and rows not shown too) 3.9 h" in note, note
    inv = {"command": "accuracy.py --jobs 2 --fresh", "date": "2026-12-01 20:00", "machine": "x86_64, 2 cores, cpu",
           "runs_trained": 108, "elapsed_seconds": 9000}
    assert ("`accuracy.py --jobs 2 --fresh` (2026-12-01 20:00, x86_64, 2 cores, cpu), trained 108 runs in "
            "**2.50 h elapsed**") in acc.wall_note(runs, rows, inv)


def test_fresh_table_trains_each_row_at_its_committed_pick(tmp_path):
    """Without --sweep a row trains at the lr the --lrs-from table picked for it: its sweep runs are copied in
    (marked), so row_lr, the plan and the report use the pick; rows never swept keep the method's default; a JSON
    of another budget lends no picks."""
    acc = _load("accuracy/run")
    budget = {"max_train": 500, "epochs": 3.0}

    def run(method, lr, val, sweep=True):
        return {"model": "m", "task": "sst2", "method": method, "seed": 0, "lr": lr, "sweep": sweep,
                "best_val": val, "wall_seconds": 60}

    src = tmp_path / "committed.json"
    src.write_text(json.dumps({"budget": budget, "runs": [
        run("fl", 3e-4, 0.5), run("fl", 1e-3, 0.6), run("fl", 3e-3, 0.9), run("fl", 3e-3, 0.9, sweep=False),
        run("apt", 3e-3, 0.9)]}))  # apt: swept, but not a row asked for
    rows = {("m", "sst2", "fl"), ("m", "sst2", "prefix")}
    copies = acc.frozen_sweeps(str(src), budget, rows)
    assert sorted(r["lr"] for r in copies) == [3e-4, 1e-3, 3e-3]
    assert all(r["sweep"] and r["copied_from"] == "sweep in committed.json" for r in copies)
    todo = acc.plan(copies, ["m"], ["sst2"], ["fl", "prefix"], [0, 1], False, 0)
    assert [(t[2], t[3], t[4]) for t in todo] == [("fl", 0, 3e-3), ("fl", 1, 3e-3), ("prefix", 0, 1e-3),
                                                   ("prefix", 1, 1e-3)]
    assert acc.wall_note(copies, []).endswith("all 0 runs in the JSON (sweep grids, other learning rates and rows "
                                              "not shown too) 0.0 h.\n")  # copies are not this table's work
    assert acc.frozen_sweeps(str(src), dict(budget, max_train=300), rows) == []
    assert acc.frozen_sweeps("", budget, rows) == [] and acc.frozen_sweeps(str(tmp_path / "none.json"), budget, rows) == []


def test_compare_lists_each_row_next_to_the_same_row_elsewhere():
    """--compare: a row here beside the same row (same lr) of another JSON, over the seeds both have, with the count
    of seeds whose dev score is identical; rows at another lr or only on one side are left out."""
    acc = _load("accuracy/run")

    def run(method, lr, seed, score, wall=None, **kw):
        r = {"model": "m", "task": "rte", "method": method, "seed": seed, "lr": lr, "score": score, **kw}
        return dict(r, wall_seconds=wall) if wall else r

    here = [run("prefix", 1e-3, 0, 0.50, 60, copied_from="sweep in x"), run("prefix", 1e-3, 1, 0.60, 120),
            run("prefix", 1e-3, 2, 0.70, 600), run("lora", 1e-3, 0, 0.55)]
    there = [run("prefix", 1e-3, 0, 0.50, 600), run("prefix", 1e-3, 1, 0.50, 240), run("lora", 3e-3, 0, 0.55)]
    md = acc.compare_markdown(here, there, "committed.json")
    # seed 0 is a copy here: scored, not timed; seed 2 is not there
    assert "| m | rte | prefix | 55.0 | 50.0 | +5.0 | 1 of 2 | 2.0 / 4.0 | 2.00x |" in md, md
    assert "The 1 run both trained took 0.03 h here and 0.07 h there (summed wall time): 2.00x." in md, md
    assert "lora" not in md and "Against committed.json" in md
    assert acc.compare_markdown(here, [], "x") == ""


def test_runs_on_a_quantized_base_never_mix_with_full_precision_ones(tmp_path, capsys):
    """--quantize nf4 (issue 22): the base precision is in every run's key and row. A JSON holding fp32 runs (old
    records without the key are fp32) and nf4 runs of the same (model, task, method, seed, lr) gives two rows; the
    fp32 runs neither stand for nf4 ones in the plan nor in same_run; an nf4 row trains at the fp32 sweep's pick
    (the committed lr) unless it has a sweep of its own; the delta is paired by seed. No training."""
    acc = _load("accuracy/run")

    def run(method, seed, score, lr=3e-3, quantize=None, sweep=False, val=0.5):
        r = {"model": "m", "task": "sst2", "method": method, "seed": seed, "lr": lr, "score": score,
             "accuracy": score, "metric": "accuracy", "best_val": val, "trainable_parameters": 1,
             "train_examples_per_s": 1.0, "wall_seconds": 60.0, "sweep": sweep}
        return dict(r, quantize=quantize) if quantize else r  # an old record: no key, full precision

    fp32 = [run("lora", s, x) for s, x in ((0, 0.80), (1, 0.70), (2, 0.90))]
    sweeps = [run("lora", 0, 0.1, lr=1e-3, sweep=True, val=0.7), run("lora", 0, 0.1, lr=3e-3, sweep=True, val=0.9)]
    nf4 = [run("lora", s, x, quantize="nf4") for s, x in ((0, 0.75), (1, 0.71))]
    assert acc.run_key(fp32[0]) != acc.run_key(nf4[0]) and acc.precision(fp32[0]) == "none"
    assert acc.run_key(run("lora", 0, 0.8, quantize="none")) == acc.run_key(fp32[0])  # "none" == no key
    rows = {x["quantize"]: x for x in acc.summarize(fp32 + sweeps + nf4)}
    assert (rows["none"]["seeds"], round(rows["none"]["mean"], 6)) == (3, 80.0)
    assert (rows["nf4"]["seeds"], round(rows["nf4"]["mean"], 6), rows["nf4"]["lr"]) == (2, 73.0, 3e-3)
    # the plan: fp32 runs do not count as nf4 ones, and the nf4 row is trained at the fp32 sweep's pick
    todo = acc.plan(fp32 + sweeps, ["m"], ["sst2"], ["lora"], [0, 1, 2], False, 0, quantize="nf4")
    assert [(t[3], t[4]) for t in todo] == [(0, 3e-3), (1, 3e-3), (2, 3e-3)]
    assert acc.plan(fp32 + sweeps, ["m"], ["sst2"], ["lora"], [0, 1, 2], False, 0) == []
    assert [t[3] for t in acc.plan(fp32 + sweeps + nf4, ["m"], ["sst2"], ["lora"], [0, 1, 2], False, 0,
                                   quantize="nf4")] == [2]
    nf4_sweep = [run("lora", 0, 0.1, lr=1e-3, quantize="nf4", sweep=True, val=0.95)]
    assert acc.row_lr(sweeps + nf4_sweep, "m", "sst2", "lora", "nf4") == 1e-3  # its own sweep's pick
    assert acc.row_lr(sweeps + nf4_sweep, "m", "sst2", "lora") == 3e-3  # the fp32 row ignores the nf4 sweep
    assert acc.same_run(fp32, ("m", "sst2", "lora", 0, False, 3e-3, "nf4"), sweep=True) is None
    assert acc.same_run(fp32, ("m", "sst2", "lora", 0, False, 3e-3, "none"), sweep=True)["score"] == 0.80
    # the report: a same-lr fp32 row is not "the same row" for --compare; the delta is paired per seed
    assert acc.compare_markdown(nf4 + sweeps, fp32 + sweeps, "fp32.json") == ""
    assert "| m | sst2 | lora | 80.0 | 80.0 | +0.0 | 3 of 3 |" in acc.compare_markdown(fp32 + sweeps + nf4, fp32 + sweeps, "x")
    (d,) = acc.precision_deltas(nf4 + sweeps, fp32 + sweeps, "nf4")
    assert d["delta_per_seed"] == pytest.approx({"0": -5.0, "1": 1.0}) and d["delta_mean"] == pytest.approx(-2.0)
    assert (d["full_mean"], d["quantized_mean"], d["full_seeds"]) == (pytest.approx(80.0), pytest.approx(73.0),
                                                                       [0, 1, 2])
    md = acc.delta_markdown([d], "fp32.json")
    assert "| m | sst2 | lora | 0.003 | 80.0 ± 10.0 [n=3] | 73.0 ± 2.8 [n=2] | -5.0 (seed 0), +1.0 (seed 1) | -2.0 ± 4.2 |" in md
    # through the CLI: the spec's quantize reaches the plan, and a JSON holding both kinds reports them apart
    out = tmp_path / "mixed.json"
    out.write_text(json.dumps({"runs": fp32 + sweeps + nf4}))
    common = ["--models", "m", "--tasks", "sst2", "--methods", "lora", "--out", str(out), "--lrs-from", ""]
    assert acc.main(common + ["--plan", "--quantize", "nf4"]) == 0
    assert "m sst2 lora seed=2 lr=0.003" in capsys.readouterr().out
    assert acc.main(common + ["--plan"]) == 0
    assert capsys.readouterr().out.startswith("0 runs to train")
    there = tmp_path / "fp32.json"
    there.write_text(json.dumps({"runs": fp32 + sweeps}))
    assert acc.main(common + ["--report-only", "--quantize", "nf4", "--compare", str(there)]) == 0
    state = json.loads(out.read_text())
    assert sorted((x["quantize"], x["seeds"]) for x in state["table"]) == [("nf4", 2), ("none", 3)]
    assert state["precision_deltas"][0]["delta_per_seed"] == pytest.approx({"0": -5.0, "1": 1.0})
    md = (tmp_path / "mixed.md").read_text()
    assert "| lora | 73.0 ± 2.8 [n=2] |" in md and "80.0 ± 10.0 [n=2]" not in md.split("**nf4 base vs")[0]
    assert "-5.0 (seed 0), +1.0 (seed 1) | -2.0 ± 4.2 |" in md and "Against fp32.json" not in md  # fp32 rows not shown
    spec = acc.load_spec("nf4")
    assert (spec["quantize"], spec["models"], spec["methods"], spec["seeds"]) == ("nf4", "smollm2-135m",
                                                                                  "lora,lt-prefix:scoring=kpass", "0,1,2")
    with pytest.raises(SystemExit):
        acc.main(common + ["--plan", "--quantize", "nf8"])
    assert "--quantize: invalid choice: 'nf8'" in capsys.readouterr().err


def test_sweep_list_says_when_its_sweeps_are_copied_from_another_table():
    acc = _load("accuracy/run")
    runs = [{"model": "m", "task": "rte", "method": "fl", "seed": 0, "lr": g, "sweep": True, "best_val": v,
             "score": 0.5, "copied_from": "sweep in accuracy.json"} for g, v in zip(list(method_class("fl").lr_grid), (0.5, 0.6, 0.7))]
    assert "the sweeps of accuracy.json, copied, not re-run" in acc.sweep_markdown(runs)
    runs[0] = dict(runs[0], copied_from="table run")  # a sweep of this JSON (its seed-0 run reused): no such note
    assert "copied, not re-run" not in acc.sweep_markdown(runs) and "*0.003: 70.0 / 50.0" in acc.sweep_markdown(runs)


def test_every_published_figure_has_a_record():
    """Issue 18: every measured figure in README.md, benchmarks/RESULTS*.md and ltuning's module docstrings is found
    in a JSON record under benchmarks/results/ named in its section (benchmarks/check_figures.py)."""
    problems = _load("check_figures").check()
    assert not problems, "figures without a record:\n" + "\n".join(problems)


def test_figure_checker_fails_on_an_invented_figure(tmp_path):
    """The checker accepts recorded figures at the rounding shown, ignores numbers that are not measurements and
    code, and names every figure it cannot find: an invented ratio, a figure whose section names no record, a
    figure in a module docstring."""
    chk = _load("check_figures")
    (tmp_path / "benchmarks" / "results").mkdir(parents=True)
    (tmp_path / "ltuning").mkdir()
    (tmp_path / "benchmarks" / "results" / "x.json").write_text(json.dumps(
        {"speedup": 1.2214, "acc": 0.8523, "std": 0.0052, "step_s": 3.733, "ms": [2.87, 17.14]}))
    (tmp_path / "ltuning" / "m.py").write_text('"""A method: 30 layers, lr 1e-3, r=8, shapes 16 x 16."""\n')
    good = ("# R\n\n## Speed\n\nRecord: [x](results/x.json). A step is 1.22x faster, 3733 ms, at 85.2 ± 0.5 %;\n"
            "SmolLM2-135M (30 layers, 9 query / 3 KV heads), lr 1e-3, r=8, issue 18, 500 examples, target >= 5x.\n\n"
            "| shape | ours ms | SDPA ms | SDPA/ours |\n|---|---:|---:|---:|\n| (8, 128, 20) | 2.87 | 17.14 | 5.97x |\n\n"
            "```bash\npython bench.py --speedup 9.99x\n```\n")
    (tmp_path / "benchmarks" / "RESULTS.md").write_text(good)
    (tmp_path / "README.md").write_text("# ltuning\n\nNo figures here: 135M parameters, 2 cores.\n")
    assert chk.check(str(tmp_path)) == []
    (tmp_path / "benchmarks" / "RESULTS.md").write_text(
        good.replace("1.22x faster", "1.23x faster") + "\n## Other\n\nIt took 12.5 min.\n")
    (tmp_path / "ltuning" / "m.py").write_text('"""A method that reaches 91.3 % on SST-2."""\n')
    problems = chk.check(str(tmp_path))
    assert len(problems) == 3, problems
    invented, unsourced, docstring = problems
    assert "'1.23x'" in invented and "is in none of results/x.json" in invented
    assert "'12.5 min'" in unsourced and "names no results" in unsourced
    assert "m.py (module docstring)" in docstring and "'91.3 %'" in docstring
    assert chk.main(["--root", str(tmp_path)]) == 1


def test_bench_ddp_plans_both_modes_without_running(capsys):
    """benchmarks/train_step/bench_ddp.py (``--mode fsdp`` is the former bench_fsdp.py): ``--plan`` lists the runs,
    alternating A B B A; 1x2 is one process with 2 threads, every other run torchrun with 2 processes x 1 thread, and
    only the fsdp runs add ``--fsdp``."""
    bench = _load("train_step/bench_ddp")
    runs = {}
    for mode in ("ddp", "fsdp"):
        assert bench.main(["--mode", mode, "--reps", "2", "--plan"]) == 0
        runs[mode] = [ln.split(" ", 2) for ln in capsys.readouterr().out.splitlines()]
    assert [r[0] for r in runs["ddp"]] == ["1x2:", "2x1:", "2x1:", "1x2:"]
    assert [r[0] for r in runs["fsdp"]] == ["ddp:", "fsdp:", "fsdp:", "ddp:"]
    for variant, threads, cmd in runs["ddp"] + runs["fsdp"]:
        one = variant == "1x2:"
        assert threads == f"OMP_NUM_THREADS={2 if one else 1}"
        assert ("torch.distributed.run --nproc-per-node 2" in cmd) != one
        assert cmd.endswith(" --fsdp") == (variant == "fsdp:") and " -m ltuning train --model smollm2-135m" in cmd


def test_bank_attention_share_counts_the_bank_and_refuses_bad_banks(tmp_path):
    """benchmarks/serving/bank_attention_share.py: one row per bank size (P = 0 first), the bank's FLOPs are
    4 Hq D P T, the bounds are relative to P = 0 (1 there), and a bad --banks value exits 2 naming it."""
    bench = _load("serving/bank_attention_share")
    out = tmp_path / "share.json"
    assert bench.main(["--banks", "5,17", "--batch", "3", "--reps", "1", "--dtypes", "fp32", "--json", str(out)]) == 0
    rows = json.loads(out.read_text())["rows"]
    assert [r["bank_tokens"] for r in rows] == [0, 5, 17]
    for r in rows:
        assert r["bank_flops"] == 4 * bench.HQ * bench.D * r["bank_tokens"] * r["tokens"]
        assert r["linear_ms"] > 0 and r["attention_ms"] > 0
    assert rows[0]["bound_vs_no_bank"] == 1.0 and rows[0]["bound_vs_no_bank_free_softmax"] == 1.0
    assert rows[2]["bound_vs_no_bank_free_softmax"] < rows[1]["bound_vs_no_bank_free_softmax"] < 1.0
    with pytest.raises(SystemExit) as e:
        bench.main(["--banks", "5,x", "--json", str(out)])
    assert e.value.code == 2
    record = tmp_path / "classify.json"  # --lora-from: LoRA's utilisation times the bound, per dtype
    record.write_text(json.dumps({"rows": [{"system": "ltuning lora", "dtype": "fp32", "utilisation": u}
                                           for u in (0.8, 0.9, 1.0)] + [{"system": "ltuning prefix", "dtype": "fp32",
                                                                          "utilisation": 0.1}]}))
    assert bench.main(["--banks", "5", "--batch", "2", "--reps", "1", "--dtypes", "fp32", "--lora-from", str(record),
                       "--json", str(out)]) == 0
    rows = json.loads(out.read_text())["rows"]
    assert rows[1]["dtype"] == "fp32" and rows[1]["lora_utilisation"] == 0.9
    assert rows[1]["allowed_utilisation"] == pytest.approx(0.9 * rows[1]["bound_vs_no_bank"])
