"""Command line: ``ltuning train | eval | classify``. Run ``ltuning CMD --help`` for every flag."""
from __future__ import annotations

import argparse
import json
import sys

class _Parser(argparse.ArgumentParser):
    """Usage errors in ONE line (``ltuning train: error: ...``), exit status 2; ``--help`` shows the usage."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _method_name(name: str) -> str:
    """``--method``: a known method, else one line with the list and the closest name."""
    import difflib

    from .methods import METHODS
    if name in METHODS:
        return name
    close = difflib.get_close_matches(name, list(METHODS), n=1)
    hint = f"did you mean {close[0]!r}? " if close else ""
    raise argparse.ArgumentTypeError(f"unknown method {name!r}; {hint}expected one of {', '.join(sorted(METHODS))}")


def _is_main() -> bool:
    """False on the ranks other than 0 under torchrun (they neither print nor write files)."""
    from .distributed import is_main
    return is_main()


def _add_model_args(p):
    p.add_argument("--model", default="minilm-l6",
                   help="base model: smollm2-135m, minilm-l6 (offline, from PyPI packages) or a hub id / path")
    p.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"],
                   help="frozen-weight dtype; bf16 also runs the forward under bf16 autocast (fp32 trainables)")
    p.add_argument("--batch-size", type=int, default=16, help="training / inference batch size")
    p.add_argument("--quantize", default="none", choices=["nf4", "int8", "none"],
                   help="frozen base through bitsandbytes: nf4 (4-bit NormalFloat, double quant, bf16 compute) or "
                        "int8 (LLM.int8); the trainable parts stay fp32")


def build_parser() -> argparse.ArgumentParser:
    from .methods import METHODS, cli_options
    from .train import DEFAULT_HEAD_LR, SELECT_METRICS

    ap = _Parser(prog="ltuning", description=__doc__,
                 epilog="--debug (or LTUNING_DEBUG=1) shows the traceback of an error instead of one line")
    sub = ap.add_subparsers(dest="cmd", required=True)

    t = sub.add_parser("train", help="train an adapter and evaluate it on the dev split",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    _add_model_args(t)
    t.add_argument("--method", required=True, type=_method_name, metavar="METHOD",
                   help=f"tuning method: {', '.join(sorted(METHODS))}")
    t.add_argument("--data", required=True,
                   help="directory with train.jsonl and dev.jsonl (or .csv/.tsv), or a Hugging Face dataset name; "
                        "DIR1,DIR2,... trains one multi-task model (see ltuning.tasks)")
    t.add_argument("--out", required=True, help="output directory (adapter, config, metrics, checkpoint)")
    t.add_argument("--max-train-examples", type=int, default=None, help="use at most N training examples (seeded)")
    t.add_argument("--max-dev-examples", type=int, default=None, help="evaluate on at most N dev examples")
    t.add_argument("--epochs", type=float, default=3.0, help="passes over the training data")
    t.add_argument("--max-steps", type=int, default=None, help="stop after this many optimizer steps")
    t.add_argument("--lr", type=float, default=None, help="learning rate (default: the method's default_lr: " + ", ".join(f"{n} {c.default_lr:g}" for n, c in sorted(METHODS.items())) + ")")
    t.add_argument("--head-lr", type=float, default=DEFAULT_HEAD_LR,
                   help="learning rate of the classification / scoring head next to the method's other trainables "
                        "(linear-probe trains only its head, at --lr)")
    t.add_argument("--weight-decay", type=float, default=0.01, help="AdamW weight decay (never on prefixes/prompts)")
    t.add_argument("--warmup-ratio", type=float, default=0.06, help="fraction of steps of linear warm-up")
    t.add_argument("--schedule", default="linear", choices=["linear", "cosine", "constant"], help="decay after warm-up")
    t.add_argument("--seed", type=int, default=0, help="random seed (data order, validation split, init)")
    t.add_argument("--max-length", type=int, default=128, help="truncate inputs to this many tokens")
    t.add_argument("--val-fraction", type=float, default=0.1, help="validation split carved from train")
    t.add_argument("--stratify-validation", action="store_true",
                   help="carve the validation split with each label's share of train (recommended for small or "
                        "imbalanced data; off by default, the protocol of the published results)")
    t.add_argument("--eval-every", type=int, default=None, help="validate every N steps (default: ~8 times a run)")
    t.add_argument("--patience", type=int, default=None, help="early stopping after N validations without gain")
    t.add_argument("--select-metric", default=SELECT_METRICS[0], choices=list(SELECT_METRICS),
                   help="validation metric that picks the best step (macro_f1: a constant prediction of the "
                        "majority class, which accuracy can prefer on a small imbalanced split, scores low)")
    t.add_argument("--gradient-checkpointing", action="store_true", help="recompute activations in backward")
    t.add_argument("--resume", action="store_true", help="resume from OUT/checkpoint if present")
    t.add_argument("--label-text", action="append", default=[], metavar='NAME="TEXT"',
                   help="label text of a label (repeatable); defaults per label name")
    t.add_argument("--quiet", action="store_true", help="no progress bars")
    for name, (help_, kind) in cli_options().items():  # each method's config declares its flags (cli_help)
        flag = "--" + name.replace("_", "-")
        if kind == "bool":
            t.add_argument(flag, default=None, action=argparse.BooleanOptionalAction, help=help_)
        else:
            t.add_argument(flag, default=None, help=help_, **({"type": int} if kind == "int" else {}))

    e = sub.add_parser("eval", help="evaluate a trained adapter; prints metrics as JSON on the last line")
    e.add_argument("--adapter", required=True, help="directory written by 'ltuning train'")
    e.add_argument("--data", required=True, help="directory with dev.jsonl, or a file of records")
    e.add_argument("--split", default="dev", help="split to evaluate when --data is a directory")
    e.add_argument("--batch-size", type=int, default=64, help="inference batch size")
    e.add_argument("--model", default=None, help="override the base model recorded in the adapter")
    e.add_argument("--task", default=None, help="multi-task adapters: the task of --data (default: its directory "
                                                "name; --data DIR1,DIR2,... evaluates several tasks)")
    e.add_argument("--quantize", default=None, choices=["nf4", "int8", "none"],
                   help="precision of the frozen base (default: the one the adapter was trained on; another one "
                        "loads with a warning)")

    from .serving.commands import add_classify_args, add_serve_args
    add_classify_args(sub.add_parser("classify", help="classify records, streamed; each output line = input record + "
                                                      "prediction + scores; a closing JSON line with examples/s"))
    add_serve_args(sub.add_parser("serve", help="HTTP server: POST /v1/classify with dynamic micro-batching"))
    return ap


def cmd_train(a) -> dict:
    import random

    from .classifier import Classifier
    from .data import parse_label_texts
    from .methods import cli_options, method_class

    fields = set(method_class(a.method).config_class.__dataclass_fields__)
    opts = {k: getattr(a, k) for k in cli_options() if getattr(a, k) is not None}
    bad = set(opts) - fields
    if bad:
        raise ValueError(f"--{sorted(bad)[0].replace('_', '-')} does not apply to --method {a.method}")
    from .methods.scoring import SCORINGS
    if opts.get("scoring", "kpass") not in SCORINGS:
        raise ValueError(f"--scoring must be one of {', '.join(SCORINGS)}, not {opts['scoring']!r}")
    lr = a.lr if a.lr is not None else method_class(a.method).default_lr
    from .preflight import check_train_inputs
    if "," in a.data:
        if a.quantize != "none":
            raise ValueError("--quantize is not supported for multi-task training (--data DIR1,DIR2,...) yet")
        from .tasks import cmd_train as train_tasks
        check_train_inputs(a)  # output and model, before any data or model is loaded
        return train_tasks(a, opts, lr)
    # every check on the inputs runs before the model loads and training starts; the label set is that of the
    # WHOLE training file, so a class that a subsample misses is still scored
    train, dev, label_names = check_train_inputs(a)
    if a.max_train_examples and len(train) > a.max_train_examples:
        train = random.Random(a.seed).sample(train, a.max_train_examples)
    if a.max_dev_examples and len(dev) > a.max_dev_examples:
        dev = random.Random(a.seed).sample(dev, a.max_dev_examples)
    clf = Classifier(a.model, a.method, label_names=label_names, label_texts=parse_label_texts(a.label_text),
                     dtype=a.dtype, max_length=a.max_length,
                     quantize=None if a.quantize == "none" else a.quantize, **opts)
    hist = clf.fit(train, out_dir=a.out, resume=a.resume, val_fraction=a.val_fraction,
                   stratify_validation=a.stratify_validation, progress=not a.quiet,
                   epochs=a.epochs, batch_size=a.batch_size, lr=lr, head_lr=a.head_lr, weight_decay=a.weight_decay,
                   warmup_ratio=a.warmup_ratio, schedule=a.schedule, dtype=a.dtype, eval_every=a.eval_every,
                   patience=a.patience, seed=a.seed, gradient_checkpointing=a.gradient_checkpointing,
                   max_steps=a.max_steps, select_metric=a.select_metric)
    m = clf.evaluate(dev, a.batch_size * 4, progress=not a.quiet)
    trainable, total = clf.model.count_parameters()
    metrics = {"model": a.model, "method": a.method, "data": a.data, "dev_examples": len(dev),
               "train_examples": hist["train_examples"], "accuracy": m["accuracy"], "macro_f1": m["macro_f1"],
               "mcc": m["mcc"], "train_examples_per_s": hist["train_examples_per_s"],
               "eval_examples_per_s": m["eval_examples_per_s"], "trainable_parameters": trainable,
               "total_parameters": total, "best_val": hist["best_val"], "best_step": hist["best_step"],
               "steps": hist["steps"], "wall_seconds": hist["wall_seconds"], "train_config": hist["train_config"]}
    if _is_main():  # torchrun: rank 0 writes the adapter
        clf.save_pretrained(a.out, metrics)
    return metrics


def _load_classifier(a):
    from .classifier import Classifier
    base = None
    quantize = getattr(a, "quantize", None) or "recorded"
    if a.model:
        from .io import read_adapter_config
        from .models import load_base
        info = read_adapter_config(a.adapter).get("classifier", {})
        q = info.get("quantize") if quantize == "recorded" else quantize
        base = load_base(a.model, info.get("dtype", "fp32"), None if q == "none" else q)
        return Classifier.from_pretrained(a.adapter, base[0], base[1])
    return Classifier.from_pretrained(a.adapter, quantize=quantize)


def _multitask(a):
    """:func:`ltuning.tasks.load`'s (router, labels, max_length, dtype) for a multi-task adapter, else None."""
    from .io import read_adapter_config
    if "multitask" not in read_adapter_config(a.adapter):
        return None
    from .models import load_base
    from .tasks import load
    base, tok = load_base(a.model) if a.model else (None, None)
    return load(a.adapter, base, tok)


def cmd_eval(a) -> dict:
    from .data import load_split
    from .preflight import check_eval_inputs
    check_eval_inputs(a)
    mt = _multitask(a)
    if mt is not None:
        from .tasks import cmd_eval as eval_tasks
        return eval_tasks(a, mt)
    if a.task:
        raise ValueError(f"--task applies to multi-task adapters; {a.adapter} has one task")
    clf = _load_classifier(a)
    recs = load_split(a.data, a.split)
    return clf.evaluate(recs, a.batch_size, progress=True)


def cmd_classify(a) -> dict:
    from .serving.commands import run_classify
    return run_classify(a)


def cmd_serve(a) -> dict:
    from .serving.commands import run_serve
    return run_serve(a)


def main(argv=None) -> int:
    from .distributed import init_from_env, shutdown
    from .errors import debug_requested, run_command
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = debug_requested(argv)
    a = build_parser().parse_args([x for x in argv if x != "--debug"])
    distributed = init_from_env()  # under torchrun: join the process group (gloo on the CPU, nccl on GPUs)
    status, result = run_command(lambda: {"train": cmd_train, "eval": cmd_eval, "classify": cmd_classify,
                                                 "serve": cmd_serve}[a.cmd](a),
                                 debug)
    if status:
        return status
    main_rank = _is_main()
    if distributed:
        shutdown()
    if main_rank:  # torchrun: rank 0 alone prints the result
        print(json.dumps(result, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
