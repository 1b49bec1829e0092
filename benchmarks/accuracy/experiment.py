"""An accuracy experiment: which models, tasks, methods (with options), seeds and budget, declared in a spec.

A spec is a small TOML file in ``specs/`` (or any path) whose keys are the runner's options
(``python benchmarks/accuracy/run.py --help``): ``models``, ``tasks``, ``methods`` and ``seeds`` as lists, the budget
(``max_train``, ``max_dev``, ``epochs``, ``batch_size``, ``head_lr``, ``max_length``, ``dtype``), ``sweep``,
``out`` (relative to ``benchmarks/``) and the rest. Options given on the command line override the spec's.

A method is a row of the table: a method name, or a *variant* ``name:field=value+field=value`` setting fields of the
method's config (``lt-prefix:objective=pairwise+variant=published``), the label texts
(``label_texts=text 1|text 2``, in label order) or the learning rate (``lr=1e-4``).
"""
from __future__ import annotations

import os
import tomllib

from ltuning.methods import method_class

SPECS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "specs")
TASK_METRIC = {"sst2": "accuracy", "rte": "accuracy", "cola": "mcc", "mrpc": "accuracy", "snli": "accuracy",
               "banking77": "accuracy"}  # snli: train/dev carved from its dev file (bench_scoring.carve_snli)
# the table of issue 4 (lt-prefix there is the K-pass protocol, spelled out since encoders default to one-pass)
DEFAULT_METHODS = ["linear-probe", "lora", "prompt", "prefix", "lt-prompt", "lt-prefix:scoring=kpass"]
RELATED_METHODS = ["sk-prefix", "sk-prompt", "apt", "fl"]  # issue 5 (cgc-lora is multi-task: multitask.py)
LISTS = ("models", "tasks", "methods", "seeds")  # joined with "," into the runner's options


def spec_path(spec: str) -> str:
    """``quick`` -> ``specs/quick.toml``; a path to a ``.toml`` file is itself."""
    return spec if spec.endswith(".toml") else os.path.join(SPECS, spec + ".toml")


def load_spec(spec: str) -> dict:
    """The runner's option defaults a spec sets: ``{option: value}`` (lists joined with ",", ``out`` and
    ``lrs_from`` made absolute from ``benchmarks/``). Unknown keys are the caller's to reject."""
    with open(spec_path(spec), "rb") as f:
        raw = tomllib.load(f)
    raw.pop("description", None)
    out = {}
    for key, value in raw.items():
        if key == "budget":
            out.update(value)
            continue
        if key in LISTS:
            if any("," in str(v) for v in value):
                raise ValueError(f"{spec}: {key} entries cannot contain ',' ({value})")
            value = ",".join(str(v) for v in value)
        if key in ("out", "lrs_from", "compare") and value:
            value = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), value)
        out[key] = value
    return out


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

