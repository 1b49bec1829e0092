"""Command line: ``ltuning train | eval | classify | serve``. Run ``ltuning CMD --help`` for every flag.

This module parses arguments only: each ``cmd_X`` checks the inputs (:mod:`ltuning.preflight`) and calls one library
function; the defaults of the training flags are :class:`ltuning.train.TrainConfig`'s."""
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


def _add_model_args(p, defaults):
    p.add_argument("--model", default="minilm-l6",
                   help="base model: smollm2-135m, minilm-l6 (offline, from PyPI packages) or a hub id / path")
    p.add_argument("--dtype", default=defaults.dtype, choices=["fp32", "bf16"],
                   help="frozen-weight dtype; bf16 also runs the forward under bf16 autocast (fp32 trainables)")
    p.add_argument("--batch-size", type=int, default=defaults.batch_size, help="training / inference batch size")
    p.add_argument("--quantize", default="none", choices=["nf4", "int8", "none"],
                   help="frozen base through bitsandbytes: nf4 (4-bit NormalFloat, double quant, bf16 compute) or "
                        "int8 (LLM.int8); the trainable parts stay fp32")


def build_parser() -> argparse.ArgumentParser:
    from .methods import METHODS, cli_options
    from .train import SELECT_METRICS, TrainConfig
    d = TrainConfig()  # the library's defaults are the CLI's

    ap = _Parser(prog="ltuning", description=__doc__,
                 epilog="--debug (or LTUNING_DEBUG=1) shows the traceback of an error instead of one line")
    sub = ap.add_subparsers(dest="cmd", required=True)

    t = sub.add_parser("train", help="train an adapter and evaluate it on the dev split",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    _add_model_args(t, d)
    t.add_argument("--method", required=True, type=_method_name, metavar="METHOD",
                   help=f"tuning method: {', '.join(sorted(METHODS))}")
    t.add_argument("--data", required=True,
                   help="directory with train.jsonl and dev.jsonl (or .csv/.tsv), or a Hugging Face dataset name; "
                        "DIR1,DIR2,... trains one multi-task model (see ltuning.tasks)")
    t.add_argument("--out", required=True,
                   help="output directory (adapter, config, metrics; OUT/checkpoint while training)")
    t.add_argument("--max-train-examples", type=int, default=None, help="use at most N training examples (seeded)")
    t.add_argument("--max-dev-examples", type=int, default=None, help="evaluate on at most N dev examples")
    t.add_argument("--epochs", type=float, default=d.epochs, help="passes over the training data")
    t.add_argument("--max-steps", type=int, default=d.max_steps, help="stop after this many optimizer steps")
    t.add_argument("--lr", type=float, default=d.lr, help="learning rate (default: the method's default_lr: " + ", ".join(f"{n} {c.default_lr:g}" for n, c in sorted(METHODS.items())) + ")")
    t.add_argument("--head-lr", type=float, default=d.head_lr,
                   help="learning rate of the classification / scoring head next to the method's other trainables "
                        "(linear-probe trains only its head, at --lr)")
    t.add_argument("--weight-decay", type=float, default=d.weight_decay,
                   help="AdamW weight decay (never on prefixes/prompts)")
    t.add_argument("--warmup-ratio", type=float, default=d.warmup_ratio, help="fraction of steps of linear warm-up")
    t.add_argument("--schedule", default=d.schedule, choices=["linear", "cosine", "constant"],
                   help="decay after warm-up")
    t.add_argument("--seed", type=int, default=d.seed, help="random seed (data order, validation split, init)")
    t.add_argument("--max-length", type=int, default=128, help="truncate inputs to this many tokens")
    t.add_argument("--val-fraction", type=float, default=0.1, help="validation split carved from train")
    t.add_argument("--stratify-validation", action="store_true",
                   help="carve the validation split with each label's share of train (recommended for small or "
                        "imbalanced data; off by default, the protocol of the published results)")
    t.add_argument("--eval-every", type=int, default=d.eval_every,
                   help="validate every N steps (default: ~8 times a run)")
    t.add_argument("--patience", type=int, default=d.patience, help="early stopping after N validations without gain")
    t.add_argument("--select-metric", default=d.select_metric, choices=list(SELECT_METRICS),
                   help="validation metric that picks the best step (macro_f1: a constant prediction of the "
                        "majority class, which accuracy can prefer on a small imbalanced split, scores low)")
    t.add_argument("--gradient-checkpointing", action="store_true", help="recompute activations in backward")
    t.add_argument("--pack", action=argparse.BooleanOptionalAction, default=True,
                   help="train on packed batches (each batch's real tokens side by side in one row: the same loss "
                        "and gradients without computing padding; decoders and BERT, where the method allows); "
                        "--no-pack: padded batches")
    t.add_argument("--fsdp", action="store_true",
                   help="torchrun only: shard the frozen base's transformer layers over the ranks with FSDP2 "
                        "(each rank stores 1/N of their weights, all-gathered layer by layer); the trainable "
                        "method and head stay replicated under DDP")
    t.add_argument("--resume", action="store_true", help="resume from OUT/checkpoint if present")
    t.add_argument("--keep-checkpoint", action="store_true",
                   help="keep OUT/checkpoint (model, optimizer and RNG state) after a finished run; by default it is "
                        "deleted once the adapter is saved (it only serves --resume of an interrupted run)")
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


def _method_options(a) -> dict:
    """The method flags given on the command line (each must be a field of the method's config)."""
    from .methods import cli_options, method_class
    from .methods.scoring import SCORINGS
    fields = set(method_class(a.method).config_class.__dataclass_fields__)
    opts = {k: getattr(a, k) for k in cli_options() if getattr(a, k) is not None}
    bad = set(opts) - fields
    if bad:
        raise ValueError(f"--{sorted(bad)[0].replace('_', '-')} does not apply to --method {a.method}")
    if opts.get("scoring", "kpass") not in SCORINGS:
        raise ValueError(f"--scoring must be one of {', '.join(SCORINGS)}, not {opts['scoring']!r}")
    return opts


def cmd_train(a) -> dict:
    from .data import parse_label_texts
    from .preflight import check_train_inputs
    from .train import TrainConfig

    opts = _method_options(a)
    cfg = TrainConfig(epochs=a.epochs, batch_size=a.batch_size, lr=a.lr, head_lr=a.head_lr,
                      weight_decay=a.weight_decay, warmup_ratio=a.warmup_ratio, schedule=a.schedule, dtype=a.dtype,
                      eval_every=a.eval_every, patience=a.patience, seed=a.seed,
                      gradient_checkpointing=a.gradient_checkpointing, max_steps=a.max_steps,
                      select_metric=a.select_metric, fsdp=a.fsdp, pack=a.pack)
    common = dict(max_train_examples=a.max_train_examples, max_dev_examples=a.max_dev_examples,
                  max_length=a.max_length, val_fraction=a.val_fraction, stratify_validation=a.stratify_validation,
                  resume=a.resume, keep_checkpoint=a.keep_checkpoint, progress=not a.quiet)
    if "," in a.data:
        if a.quantize != "none":
            raise ValueError("--quantize is not supported for multi-task training (--data DIR1,DIR2,...) yet")
        from .tasks import train as train_tasks
        check_train_inputs(a)  # output and model, before any data or model is loaded
        return train_tasks([d for d in a.data.split(",") if d], a.out, a.model, a.method, opts, cfg, **common)
    # every check on the inputs runs before the model loads and training starts; the label set is that of the
    # WHOLE training file, so a class that a subsample misses is still scored
    from .classifier import train
    records, dev, label_names = check_train_inputs(a)
    return train(records, dev, label_names, a.out, a.model, a.method, opts, cfg,
                 label_texts=parse_label_texts(a.label_text), quantize=None if a.quantize == "none" else a.quantize,
                 data_name=a.data, **common)


def cmd_eval(a) -> dict:
    from .classifier import evaluate_adapter
    from .preflight import check_eval_inputs
    check_eval_inputs(a)
    return evaluate_adapter(a.adapter, a.data, a.split, a.batch_size, a.model, a.quantize, a.task)


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
