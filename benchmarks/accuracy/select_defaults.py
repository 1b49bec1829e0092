"""Choose a method's defaults by validation pooled over tasks, confirmed leave-one-task-out (issue 20).

Input: accuracy-runner JSONs (``run.py``'s ``runs``; several comma-separated, all of one ``budget``; runs on a
quantized base are ignored). A *decision* is a model, a base method (``lt-prefix``, possibly with fixed options)
and candidates differing in ONE option: ``--decide "lt-prefix:scoring=kpass|onepass|shared-input"`` (the decided
option is the last ``key=a|b|c`` of the string; for ``label_texts``, whose value is itself ``|``-separated, the
candidates are separated by ``||``; the candidate ``default`` is the option left out), or the learning rate, ``--decide-lr lt-prefix:scoring=onepass`` (candidates:
the method's ``lr_grid``, from its sweep's grid runs at ``--grid-seed``), or whole configurations of one method,
``--decide-reading "lt-prefix;lt-prefix:scoring=onepass+variant=pooled+label_weights=true"`` (candidates that
differ in several options at once; the library default is the candidate equal to the bare method). A candidate equal to the library default
(``ltuning.make_config``; a field left None there is resolved by the model's family as the library does when it
builds the method, see ``FAMILY_DEFAULTS``) also matches the method string without that option: ``kpass`` is
``lt-prefix``. Runs are matched by configuration, not by spelling: options at their default are dropped first.

Protocol, per (model, decision), candidates c, tasks t:

* T = the tasks on which every candidate has runs (the others are dropped, each with the candidate it lacks).
* val(c, t) = mean over seeds s of ``best_val`` (the validation score on the split carved from train, the runner's
  metric: accuracy, MCC on CoLA) of c's runs at c's row lr (``table.row_lr``: its sweep's pick, else its default);
  for the lr decision, the seed-``grid_seed`` grid run's ``best_val``.
* pooled(c) = (1/|T|) sum_t val(c, t); choice = argmax_c pooled(c). Candidates within 1e-9 of the best tie: the
  library default is kept if it is among them, else the first tied candidate in the order given (stated).
* Leave-one-task-out: for each t in T, choice_t = the same rule over T \\ {t}. On t, dev(c, t) = mean over seeds
  of ``score`` (GLUE dev, the runner's metric), regret_t = dev(choice_t, t) - max_c dev(c, t) (<= 0), and
  std_t = the sample std over seeds of the best candidate's dev on t. Dev is only read here, after the choices
  are made: it never chooses. The decision is *confirmed* when choice_t == choice for every t and
  -regret_t <= std_t for every t (a task where std_t is unknown, fewer than 2 seeds, is not confirmed, stated).
  With |T| < 2 there is no held-out task: the report says so.

Output: ``--out`` (JSON: inputs, machine, commit, command, per decision the per-task validation and dev of every
candidate, the choice, the LOTO rows) and ``--report-out PREFIX`` (PREFIX.md, one table per decision).
Uses no model and trains nothing (it reads the model's config only to resolve a family-dependent default).

    python benchmarks/accuracy/select_defaults.py --inputs benchmarks/results/accuracy.json \\
        --decide "lt-prefix:variant=kv|pooling" --decide-lr lt-prefix --report-out /tmp/defaults
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import struct
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [os.path.dirname(os.path.dirname(HERE)), os.path.dirname(HERE), HERE]
from common import RESULTS, ROOT, atomic_json, cpu_name  # noqa: E402  (benchmarks/)
from experiment import default_lr, parse_method  # noqa: E402
from run import code_version, same_budget  # noqa: E402
from table import precision, row_lr, run_key  # noqa: E402

from ltuning import make_config  # noqa: E402
from ltuning.errors import UserError  # noqa: E402
from ltuning.methods import METHODS, method_class  # noqa: E402

TIE = 1e-9
DEFAULT = object()  # the candidate ``default``: the option left out (its library default on each model)
# Config fields whose make_config default is None and that the library resolves by the model's family when it
# builds the method: the method's own ones through ``Method.resolve_defaults`` (lt-prefix: scoring, variant,
# label_weights, position_offset; ltuning/methods/lt.py), which this module calls, and the pooling, resolved in
# ltuning/model.py (LTuningModel) by this table. tests/test_select_defaults.py checks both against the library on a
# tiny BERT and Llama.
FAMILY_DEFAULTS = {"pooling": {"decoder": "last", "encoder": "mean"}}


# ---------------------------------------------------------------------------------------------- model family

def gguf_architecture(path: str) -> str | None:
    """``general.architecture`` of a GGUF file (v2/v3) read from its header without loading the tensors."""
    sizes = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}

    def text(f):
        (n,) = struct.unpack("<Q", f.read(8))
        return f.read(n).decode("utf-8", "replace")

    def skip(f, vtype):
        if vtype in sizes:
            f.seek(sizes[vtype], 1)
        elif vtype == 8:
            text(f)
        elif vtype == 9:
            itype, n = struct.unpack("<IQ", f.read(12))
            if itype in sizes:
                f.seek(n * sizes[itype], 1)
            else:
                for _ in range(n):
                    skip(f, itype)
        else:
            raise ValueError(f"GGUF value type {vtype}")

    with open(path, "rb") as f:
        if f.read(4) != b"GGUF" or struct.unpack("<I", f.read(4))[0] < 2:
            return None
        _, n_kv = struct.unpack("<QQ", f.read(16))
        for _ in range(n_kv):
            key = text(f)
            (vtype,) = struct.unpack("<I", f.read(4))
            if key == "general.architecture" and vtype == 8:
                return text(f)
            skip(f, vtype)
    return None


_FAMILIES: dict = {}


def model_family(model: str) -> str:
    """"decoder" or "encoder" for a model name or path (``--family`` overrides, ``_FAMILIES``), from its
    ``config.json`` ``model_type`` or its GGUF header, with the library's lists of supported types."""
    if model in _FAMILIES:
        return _FAMILIES[model]
    from ltuning.models.families import DECODER_TYPES, ENCODER_TYPES
    from ltuning.models.registry import resolve_model

    kind = None
    try:
        path, gguf = resolve_model(model)
        if gguf:
            kind = gguf_architecture(os.path.join(path, gguf))
        elif os.path.isfile(os.path.join(path, "config.json")):
            with open(os.path.join(path, "config.json")) as f:
                kind = json.load(f).get("model_type")
    except (OSError, ValueError):
        kind = None
    family = "decoder" if kind in DECODER_TYPES else "encoder" if kind in ENCODER_TYPES else None
    if family is None:
        raise UserError(f"cannot tell the family of model {model!r} (model_type {kind!r}), needed for a "
                        "family-dependent default; give it as MODEL=decoder|encoder", "--family")
    _FAMILIES[model] = family
    return family


def library_default(model: str, name: str, option: str, others: dict | None = None):
    """The value ``option`` takes when a method string leaves it out: ``lr`` -> the method's ``default_lr``; a
    config field -> ``make_config(name, **others)``'s value (``others``: the string's other options, on which a
    default may depend: lt-prefix's variant on its scoring), resolved by ``model``'s family where that is None, as
    the library does when it builds the method (``Method.resolve_defaults``, the pooling by ``FAMILY_DEFAULTS``)."""
    if option == "lr":
        return float(method_class(name).default_lr)
    fields = set(make_config(name).to_dict())
    cfg = make_config(name, **{k: v for k, v in (others or {}).items() if k != option and k in fields})
    value = getattr(cfg, option)
    if value is None:
        probe = make_config(name)
        method_class(name).resolve_defaults(probe, True)  # is the option resolved by family at all?
        if getattr(probe, option) is not None or option in FAMILY_DEFAULTS:
            decoder = model_family(model) == "decoder"
            method_class(name).resolve_defaults(cfg, decoder)
            value = getattr(cfg, option)
            if value is None and option in FAMILY_DEFAULTS:
                value = FAMILY_DEFAULTS[option]["decoder" if decoder else "encoder"]
    return value


def _freeze(v):
    if isinstance(v, dict):
        return tuple(sorted((k, _freeze(x)) for k, x in v.items()))
    return tuple(_freeze(x) for x in v) if isinstance(v, list) else v


_CONFIGS: dict = {}


def config_of(model: str, method: str) -> tuple:
    """A method string as ``(name, frozenset of (option, value))``: two strings of one configuration are equal (on
    an encoder ``lt-prefix`` and ``lt-prefix:scoring=onepass+variant=pooled+label_weights=true``;
    ``lt-prefix:scoring=kpass`` and ``lt-prefix:scoring=kpass+variant=pooling+objective=pairwise``). The string's
    options go through ``make_config`` and every option left None is resolved by ``model``'s family as the library
    does when it builds the method (``Method.resolve_defaults``, the pooling by ``FAMILY_DEFAULTS``), so the
    comparison is of whole resolved configurations (exact also where two defaults depend on each other: scoring
    <-> objective). A model whose family is unknown: options at a family-free default are dropped, the others kept
    as spelled (comparable among themselves, never equal to a resolved one)."""
    if (model, method) not in _CONFIGS:
        _CONFIGS[model, method] = _config_of(model, method)
    return _CONFIGS[model, method]


def _config_of(model: str, method: str) -> tuple:
    name, opts = parse_method(method)
    if name not in METHODS:  # not a method of this library (a run of another code version): never a candidate
        return name, frozenset((k, _freeze(v)) for k, v in opts.items())
    fields = set(make_config(name).to_dict())
    extra = {k: _freeze(v) for k, v in opts.items() if k != "lr" and k not in fields}  # not options of the method
    lr = float(opts.get("lr", method_class(name).default_lr))
    cfg = make_config(name, **{k: v for k, v in opts.items() if k in fields})
    try:
        decoder = model_family(model) == "decoder"
    except UserError:
        return name, frozenset({**_spelled(model, name, opts, fields), **extra}.items())
    method_class(name).resolve_defaults(cfg, decoder)
    resolved = cfg.to_dict()
    for k, by_family in FAMILY_DEFAULTS.items():
        if k in resolved and resolved[k] is None:
            resolved[k] = by_family["decoder" if decoder else "encoder"]
    resolved.pop("method", None)
    return name, frozenset({**{k: _freeze(v) for k, v in resolved.items()}, "lr": lr, **extra}.items())


def _spelled(model: str, name: str, opts: dict, fields: set) -> dict:
    """A model of unknown family: the options of ``opts`` not at a family-free library default, as spelled."""
    kept = {}
    for k, v in opts.items():
        if k != "lr" and k not in fields:
            continue
        try:
            d = library_default(model, name, k, opts)
        except UserError:  # family-dependent: kept as spelled (a decision over that option asks for --family)
            kept[k] = _freeze(v)
            continue
        if (float(v) if k == "lr" else v) != d:
            kept[k] = _freeze(v)
    return kept


# ------------------------------------------------------------------------------------------------- inputs

def _same_budget(a, b) -> bool:
    """Equal budgets, ``sweep`` aside (older JSONs recorded it; it is not part of the budget, as in
    ``run.same_budget``); a file without a budget matches nothing."""
    if not isinstance(a, dict) or not isinstance(b, dict):
        return False
    return same_budget(b, {k: v for k, v in a.items() if k != "sweep"}) is True


def load_runs(paths: list) -> tuple[list, dict, list]:
    """``(runs, budget, inputs)``: the full-precision runs of every JSON (one copy of each ``run_key``), their
    common budget, and one record per file (path, budget, runs read, runs ignored as quantized)."""
    runs, budget, inputs, have = [], None, [], set()
    for path in paths:
        if not os.path.isfile(path):
            raise UserError("no such file", path)
        try:
            with open(path) as f:
                state = json.load(f)
            file_runs = state["runs"]
        except (json.JSONDecodeError, KeyError, TypeError):
            raise UserError("expected an accuracy-runner JSON with a 'runs' list", path) from None
        b = state.get("budget")
        if budget is None:
            budget = b
        elif not _same_budget(b, budget):
            raise UserError(f"made with budget {b}, not {budget} (the first file's): its runs are not comparable",
                            path)
        full = [r for r in file_runs if precision(r) == "none"]
        new = [r for r in full if run_key(r) not in have]
        have |= {run_key(r) for r in new}
        runs += new
        inputs.append({"path": path, "budget": b, "runs": len(file_runs), "runs_used": len(new),
                       "quantized_runs_ignored": len(file_runs) - len(full)})
    return runs, budget, inputs


# ---------------------------------------------------------------------------------------------- decisions

def parse_decision(text: str, arg: str = "--decide") -> dict:
    """``"lt-prefix:objective=pairwise+scoring=kpass|onepass"`` -> {base, fixed, option, candidates (typed,
    in order), labels (as written)}. The decided option is the last ``key=`` item."""
    name, _, rest = text.partition(":")
    if name not in METHODS:
        raise UserError(f"{text!r}: unknown method {name!r} (known: {', '.join(sorted(METHODS))})", arg)
    items = [x for x in rest.split("+") if x]
    if not items or "=" not in items[-1]:
        raise UserError(f"{text!r}: expected METHOD[:fixed=v+...]:OPTION=a|b|c", arg)
    *fixed, last = items
    option, _, values = last.partition("=")
    fields = set(make_config(name).to_dict()) - {"method", "label_names"}
    if option not in fields:
        raise UserError(f"{text!r}: {name} has no option {option!r} (options: {', '.join(sorted(fields))}; "
                        "the lr is --decide-lr)", arg)
    labels = values.split("||") if option == "label_texts" else values.split("|")
    if len(labels) < 2 or len(set(labels)) != len(labels) or not all(labels):
        raise UserError(f"{text!r}: expected at least two distinct candidates for {option}", arg)
    fixed_str = "+".join(fixed)
    cands = [DEFAULT if v == "default" else parse_method(f"{name}:{option}={v}")[1][option] for v in labels]
    return {"kind": "option", "text": text, "base": name + (":" + fixed_str if fixed_str else ""), "method": name,
            "option": option, "candidates": cands, "labels": labels}


def parse_lr_decision(text: str, grid_seed: int) -> dict:
    name, _ = parse_method(text)
    if name not in METHODS:
        raise UserError(f"{text!r}: unknown method {name!r} (known: {', '.join(sorted(METHODS))})", "--decide-lr")
    if "lr" in parse_method(text)[1]:
        raise UserError(f"{text!r}: the lr is what is decided; leave it out of the method string", "--decide-lr")
    grid = [float(g) for g in method_class(name).lr_grid]
    return {"kind": "lr", "text": text, "base": text, "method": name, "option": "lr", "candidates": grid,
            "labels": [f"{g:g}" for g in grid], "grid_seed": grid_seed}


def parse_reading_decision(text: str) -> dict:
    """``"lt-prefix;lt-prefix:scoring=onepass+variant=pooled"`` (``--decide-reading``) -> a decision between whole
    configurations of ONE method, which may differ in several options (each candidate a method string, matched
    by configuration; the library default is the candidate equal to the bare method, if any)."""
    specs = [x.strip() for x in text.split(";") if x.strip()]
    names = {parse_method(x)[0] for x in specs}
    if len(specs) < 2 or len(set(specs)) != len(specs):
        raise UserError(f"{text!r}: expected at least two distinct method strings separated by ';'", "--decide-reading")
    if len(names) != 1 or next(iter(names)) not in METHODS:
        raise UserError(f"{text!r}: every candidate must be a configuration of one known method (got "
                        f"{', '.join(sorted(names))})", "--decide-reading")
    if any("lr" in parse_method(x)[1] for x in specs):
        raise UserError(f"{text!r}: each candidate's lr is its sweep's pick; leave lr= out", "--decide-reading")
    name = next(iter(names))
    return {"kind": "reading", "text": text, "base": name, "method": name, "option": "reading",
            "candidates": specs, "labels": specs}


def candidate_method(dec: dict, value) -> str:
    """The method string of a candidate (for matching by configuration)."""
    if dec["kind"] == "lr" or value is None:
        return dec["base"]
    v = "|".join(value) if isinstance(value, list) else ("true" if value is True else "false" if value is False
                                                          else str(value))
    return dec["base"] + ("+" if ":" in dec["base"] else ":") + f"{dec['option']}={v}"


def _std(xs: list):
    return statistics.stdev(xs) if len(xs) > 1 else None


def cell_option(runs: list, model: str, task: str, target: tuple) -> dict | None:
    """The runs of one candidate on one task (``--decide``): the row whose method string has the candidate's
    configuration (the shortest such string, the library default row; others listed) at its row lr."""
    strings = sorted({r["method"] for r in runs if (r["model"], r["task"]) == (model, task)
                      and config_of(model, r["method"]) == target}, key=lambda s: (len(s), s))
    for method in strings:
        lr = row_lr(runs, model, task, method)
        rs = {}
        for r in runs:
            if (r["model"], r["task"], r["method"]) == (model, task, method) and not r.get("sweep") and r["lr"] == lr:
                rs.setdefault(r["seed"], r)
        if rs:
            swept = any(r.get("sweep") and (r["model"], r["task"], r["method"]) == (model, task, method)
                        for r in runs)
            return _cell(rs, method, lr, swept, [s for s in strings if s != method])
    return None


def cell_lr(runs: list, model: str, task: str, target: tuple, lr: float, grid_seed: int) -> dict | None:
    """The grid run at ``lr`` (seed ``grid_seed``) of the configuration ``target`` on one task (``--decide-lr``);
    the seed std of dev from every run of that configuration at that lr (grid and table runs)."""
    mine = [r for r in runs if (r["model"], r["task"]) == (model, task) and r["lr"] == lr
            and config_of(model, r["method"]) == target]
    grid = [r for r in mine if r.get("sweep") and r["seed"] == grid_seed]
    if not grid:
        return None
    grid.sort(key=lambda r: (len(r["method"]), r["method"]))
    c = _cell({grid_seed: grid[0]}, grid[0]["method"], lr, True, [])
    seeds = {}
    for r in sorted(mine, key=lambda r: bool(r.get("sweep"))):
        seeds.setdefault(r["seed"], 100 * r["score"])
    c["dev_seeds_at_lr"] = {str(s): v for s, v in sorted(seeds.items())}
    c["dev_std"] = _std(list(seeds.values()))
    c["dev_std_source"] = f"{len(seeds)} seed(s) at lr {lr:g}"
    if c["dev_std"] is None:  # only the grid run at this lr: the seed std of the row (its seeds at its picked lr)
        method = grid[0]["method"]
        pick = row_lr(runs, model, task, method)
        row = {}
        for r in runs:
            if (r["model"], r["task"], r["method"]) == (model, task, method) and not r.get("sweep") \
                    and r["lr"] == pick:
                row.setdefault(r["seed"], 100 * r["score"])
        if len(row) > 1:
            c["dev_std"] = statistics.stdev(row.values())
            c["dev_std_source"] = (f"1 seed at lr {lr:g}: the std of the row's {len(row)} seeds at its picked lr "
                                   f"{pick:g}")
    return c


def _cell(by_seed: dict, method: str, lr: float, swept: bool, others: list) -> dict:
    seeds = sorted(by_seed)
    val = [100 * by_seed[s]["best_val"] for s in seeds]
    dev = [100 * by_seed[s]["score"] for s in seeds]
    return {"method": method, "lr": lr, "swept": swept, "seeds": seeds, "metric": by_seed[seeds[0]].get("metric"),
            "val": statistics.mean(val), "val_per_seed": val, "dev": statistics.mean(dev), "dev_per_seed": dev,
            "dev_std": _std(dev), "dev_std_source": f"{len(seeds)} seed(s)", "equivalent_rows_not_used": others}


def choose(pooled: dict, order: list, default) -> tuple[int, str]:
    """(index of the choice, note): argmax of ``pooled`` (index -> score); ties within ``TIE`` keep the default
    (if tied) or else the first tied index of ``order``."""
    best = max(pooled.values())
    tied = [i for i in order if pooled[i] >= best - TIE]
    if len(tied) == 1:
        return tied[0], ""
    if default in tied:
        return default, "tie (within 1e-9) between {}: the library default is kept"
    return tied[0], "tie (within 1e-9) between {}: none is the library default; the first given is taken"


def decide(runs: list, model: str, dec: dict, tasks_filter: list | None = None) -> dict:
    """The protocol of the module docstring for one (model, decision)."""
    name, labels, cands = dec["method"], dec["labels"], dec["candidates"]
    if dec["kind"] == "lr":
        default = float(default_lr(dec["base"]))
        targets = [config_of(model, dec["base"])] * len(cands)
    elif dec["kind"] == "reading":
        targets = [config_of(model, c) for c in cands]
        if len(set(targets)) < len(targets):
            raise UserError(f"{dec['text']!r}: on {model} two candidates are the same configuration",
                            "--decide-reading")
        bare = config_of(model, name)
        default = next((c for c, t in zip(cands, targets) if t == bare), name)
    else:
        default = library_default(model, name, dec["option"], parse_method(dec["base"])[1])
        cands = [default if v is DEFAULT else v for v in cands]
        if len({repr(v) for v in cands}) < len(cands):
            raise UserError(f"{dec['text']!r}: on {model} two candidates are the same configuration "
                            f"({dec['option']}={default!r} is the default)", "--decide")
        targets = [config_of(model, candidate_method(dec, v)) for v in cands]
    d_idx = next((i for i, v in enumerate(cands) if v == default), None)
    all_tasks = sorted({r["task"] for r in runs if r["model"] == model})
    if tasks_filter:
        all_tasks = [t for t in all_tasks if t in tasks_filter]
    cells, dropped = {}, []
    for t in all_tasks:
        row = {}
        for i, v in enumerate(cands):
            row[i] = (cell_lr(runs, model, t, targets[i], v, dec["grid_seed"]) if dec["kind"] == "lr"
                      else cell_option(runs, model, t, targets[i]))
        missing = [labels[i] for i in row if row[i] is None]
        if missing:
            what = f"grid run (seed {dec['grid_seed']}) at lr " if dec["kind"] == "lr" else "runs of "
            dropped.append({"task": t, "reason": "no " + what + ", ".join(missing)})
            continue
        cells[t] = row
    tasks = sorted(cells)
    out = {"model": model, "decision": dec["text"], "kind": dec["kind"], "base": dec["base"],
           "option": dec["option"], "candidates": labels,
           "library_default": None if d_idx is None else labels[d_idx],
           "library_default_value": default if not isinstance(default, tuple) else list(default),
           "tasks": tasks, "dropped_tasks": dropped,
           "per_task": {t: {labels[i]: c for i, c in cells[t].items()} for t in tasks}}
    if d_idx is None:
        out["note_default"] = (f"the library default ({default!r}) is not among the candidates: a tie takes the "
                               "first tied candidate")
    if not tasks:
        out.update(choice=None, pooled_val=None, tie_note="", loto=[], confirmed=False,
                   confirmation="No task has runs of every candidate: nothing to choose")
        return out

    def pool(ts):
        return {i: statistics.mean(cells[t][i]["val"] for t in ts) for i in range(len(cands))}

    order = list(range(len(cands)))
    pooled = pool(tasks)
    ci, note = choose(pooled, order, d_idx)
    tied = [labels[i] for i in order if pooled[i] >= max(pooled.values()) - TIE]
    out.update(pooled_val={labels[i]: pooled[i] for i in order}, choice=labels[ci],
               tie_note=note.format(", ".join(tied)) if note else "")
    loto, problems = [], []
    if len(tasks) < 2:
        out.update(loto=[], confirmed=False,
                   confirmation=f"Not confirmable: leave-one-task-out needs at least 2 tasks with every candidate, "
                                f"there is {len(tasks)} ({', '.join(tasks)})")
        return out
    for t in tasks:
        rest = [x for x in tasks if x != t]
        p = pool(rest)
        hi, hnote = choose(p, order, d_idx)
        dev = {i: cells[t][i]["dev"] for i in order}
        bi = max(order, key=lambda i: (dev[i], i == hi))  # the best on dev (the held-out choice if it ties)
        std = cells[t][bi]["dev_std"]
        regret = dev[hi] - dev[bi]
        within = True if regret >= -TIE else None if std is None else -regret <= std + TIE
        row = {"task": t, "chosen_on": rest, "choice": labels[hi], "same_as_pooled": hi == ci,
               "tie_note": hnote.format(", ".join(labels[i] for i in order if p[i] >= max(p.values()) - TIE))
               if hnote else "",
               "pooled_val_without_task": {labels[i]: p[i] for i in order},
               "dev": {labels[i]: dev[i] for i in order}, "best_on_dev": labels[bi], "regret": regret,
               "best_dev_std": std, "best_dev_std_source": cells[t][bi]["dev_std_source"], "within_std": within}
        loto.append(row)
        if hi != ci:
            problems.append(f"{t}: held-out choice {labels[hi]} differs from the pooled choice {labels[ci]}")
        if within is None:
            problems.append(f"{t}: no seed std for {labels[bi]} (fewer than 2 seeds): regret {regret:+.1f} unjudged")
        elif not within:
            problems.append(f"{t}: regret {regret:+.1f} exceeds the seed std {std:.1f} of {labels[bi]}")
    out.update(loto=loto, confirmed=not problems,
               confirmation="Confirmed on every held-out task" if not problems else "NOT confirmed: "
               + "; ".join(problems))
    return out


# ------------------------------------------------------------------------------------------------ report

def _short(labels: list) -> tuple[list, str]:
    """Column names: the candidates, or letters with a legend when one is longer than 14 characters."""
    if all(len(x) <= 14 for x in labels):
        return labels, ""
    names = [chr(ord("A") + i) for i in range(len(labels))]
    return names, "".join(f"\n- {n}: `{x}`" for n, x in zip(names, labels))


def markdown(res: dict) -> str:
    labels = res["candidates"]
    names, legend = _short(labels)
    what = (f"lr (grid runs, seed {res['per_task'][res['tasks'][0]][labels[0]]['seeds'][0]})"
            if res["kind"] == "lr" and res["tasks"] else res["option"])
    default = res["library_default"] or repr(res["library_default_value"]) + " (not a candidate)"
    lines = [f"\n### {res['model']}: {res['base']}, {what} in {{{', '.join(names)}}}\n",
             f"`--decide{'' if res['kind'] == 'option' else '-' + res['kind']} \"{res['decision']}\"`.{legend}", "",
             f"Library default: {default}. Tasks: {', '.join(res['tasks']) or 'none'}."]
    for d in res["dropped_tasks"]:
        lines.append(f"Dropped {d['task']}: {d['reason']}.")
    if res["choice"] is None:
        lines += ["", res["confirmation"] + "."]
        return "\n".join(_wrap(x) for ln in lines for x in ln.split("\n")) + "\n"
    lines += ["", ("Cells: validation / dev (x100, mean over seeds, [seeds]); validation (split carved from train) "
                   "chooses, dev only confirms."),
              ("LOTO: chosen on the other tasks; regret = its dev minus the best candidate's dev on the task; "
               "std = that candidate's seed std."), ""]
    lines.append("| task | " + " | ".join(names) + " | LOTO choice | = pooled | regret | std |")
    lines.append("|---" * (len(names) + 5) + "|")
    loto = {r["task"]: r for r in res["loto"]}
    for t in res["tasks"]:
        cells = [f"{c['val']:.1f} / {c['dev']:.1f} [{len(c['seeds'])}]"
                 for c in (res["per_task"][t][x] for x in labels)]
        r = loto.get(t)
        extra = (["–", "–", "–", "–"] if r is None else
                 [names[labels.index(r["choice"])], "yes" if r["same_as_pooled"] else "**no**",
                  f"{r['regret']:+.1f}" + ("" if r["within_std"] in (True, None) else " **>std**"),
                  "–" if r["best_dev_std"] is None else f"{r['best_dev_std']:.1f}"])
        lines.append(f"| {t} | " + " | ".join(cells) + " | " + " | ".join(extra) + " |")
    pooled = [f"**{res['pooled_val'][x]:.1f}**" if x == res["choice"] else f"{res['pooled_val'][x]:.1f}"
              for x in labels]
    lines.append("| pooled val | " + " | ".join(pooled) + " | | | | |")
    ch = names[labels.index(res["choice"])]
    lines += ["", f"Choice: **{ch}** (pooled validation)" + (f"; {res['tie_note']}" if res["tie_note"] else "")
              + f". {res['confirmation']}."]
    unswept = sorted({f"{x} on {t}" for t in res["tasks"] for x, c in zip(names, (res["per_task"][t][y]
                      for y in labels)) if not c["swept"]})
    if res["kind"] == "option" and unswept:
        lines.append("Not swept (trained at the default lr): " + ", ".join(unswept) + ".")
    return "\n".join(_wrap(x) for ln in lines for x in ln.split("\n")) + "\n"


def _wrap(line: str, width: int = 120) -> str:
    """Prose longer than ``width`` broken at spaces (table rows are left as they are)."""
    if len(line) <= width or line.startswith("|"):
        return line
    out, cur = [], ""
    for word in line.split(" "):
        if cur and len(cur) + 1 + len(word) > width:
            out.append(cur)
            cur = word
        else:
            cur = f"{cur} {word}" if cur else word
    return "\n".join(out + [cur])


def _display(arg: str) -> str:
    """A command-line word for the report: absolute paths relative to the repository (else their file name; the
    JSON records the command as given)."""
    parts = []
    for p in arg.split(","):
        q = p.strip('"')
        if os.path.isabs(q):
            rel = os.path.relpath(q, ROOT)
            q = rel if not rel.startswith("..") else os.path.basename(q)
            p = p.replace(p.strip('"'), q)
        parts.append(p)
    return ",".join(parts)


def machine() -> dict:
    """CPU model, flags, cores, threads, load average (a shared machine: recorded, though nothing is timed)."""
    from ltuning.models.registry import cpu_flags
    return {"cpu": cpu_name(), "flags": " ".join(sorted(f for f in cpu_flags() if f not in ("flags", ":"))), "cores": os.cpu_count(),
            "omp_num_threads": os.environ.get("OMP_NUM_THREADS"), "load_average": list(os.getloadavg())}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--inputs", default=os.path.join(RESULTS, "accuracy.json"),
                    help="comma-separated accuracy-runner JSONs of one budget")
    ap.add_argument("--decide", action="append", default=[], metavar="METHOD:OPTION=a|b|c",
                    help="a decision over one option (repeatable)")
    ap.add_argument("--decide-lr", action="append", default=[], metavar="METHOD",
                    help="the lr of METHOD (with its options) over its lr_grid, from the grid runs (repeatable)")
    ap.add_argument("--decide-reading", action="append", default=[], metavar="METHOD[:opts];METHOD:opts[;...]",
                    help="a decision between whole configurations of one method, separated by ';' (repeatable)")
    ap.add_argument("--models", default="", help="comma-separated (default: every model with runs of the method)")
    ap.add_argument("--tasks", default="", help="comma-separated tasks to consider (default: all in the inputs)")
    ap.add_argument("--grid-seed", type=int, default=0, help="seed of the sweep's grid runs (run.py --grid-seed)")
    ap.add_argument("--family", action="append", default=[], metavar="MODEL=decoder|encoder",
                    help="a model's family, where its config cannot be read (family-dependent defaults)")
    ap.add_argument("--out", default=os.path.join(RESULTS, "defaults_selection.json"))
    ap.add_argument("--report-out", default=None, metavar="PREFIX", help="write PREFIX.md")
    a = ap.parse_args(argv)
    try:
        return _main(a, argv)
    except UserError as e:
        print(f"select_defaults.py: {' '.join(str(e).split())}", file=sys.stderr)
        return 2


def _main(a, argv) -> int:
    _CONFIGS.clear()
    _FAMILIES.clear()
    for f in a.family:
        model, _, fam = f.partition("=")
        if fam not in ("decoder", "encoder") or not model:
            raise UserError(f"{f!r}: expected MODEL=decoder|encoder", "--family")
        _FAMILIES[model] = fam
    decs = ([parse_decision(d) for d in a.decide] + [parse_lr_decision(d, a.grid_seed) for d in a.decide_lr]
            + [parse_reading_decision(d) for d in a.decide_reading])
    if not decs:
        raise UserError("give at least one decision", "--decide/--decide-lr/--decide-reading")
    paths = [p for p in a.inputs.split(",") if p]
    runs, budget, inputs = load_runs(paths)
    models = [m for m in a.models.split(",") if m]
    tasks = [t for t in a.tasks.split(",") if t] or None
    results = []
    for dec in decs:
        ms = models or sorted({r["model"] for r in runs if parse_method(r["method"])[0] == dec["method"]})
        for m in ms:
            results.append(decide(runs, m, dec, tasks))
    cmd = " ".join(["benchmarks/accuracy/select_defaults.py"]
                   + [f'"{x}"' if any(c in x for c in " |;") else x for x in (argv if argv is not None
                                                                          else sys.argv[1:])])
    state = {"command": cmd, "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "code": code_version(),
             "machine": machine(), "inputs": inputs, "budget": budget,
             "protocol": "choose by validation (best_val) pooled over tasks; confirm leave-one-task-out with dev "
                         "(see the docstring of benchmarks/accuracy/select_defaults.py)",
             "decisions": results}
    atomic_json(a.out, state)
    shown = " ".join(["benchmarks/accuracy/select_defaults.py"] + [_display(x) for x in cmd.split(" ")[1:]])
    md = (f"Defaults chosen by validation pooled over tasks, confirmed leave-one-task-out (`{shown}`; "
          f"{', '.join(os.path.basename(p) for p in paths)}; record: {os.path.basename(a.out)}).\n")
    md = _wrap(md) + "\n" + "".join(markdown(r) for r in results)
    if a.report_out:
        with open(a.report_out + ".md", "w") as f:
            f.write(md)
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
