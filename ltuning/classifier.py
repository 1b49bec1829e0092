"""``Classifier``: the high-level object (load a base, patch it with a method, fit / predict / save / load), and
the whole runs the command line starts: :func:`train` (``ltuning train``) and :func:`evaluate_adapter`
(``ltuning eval``), multi-task adapters through :mod:`ltuning.tasks`."""
from __future__ import annotations

import json
import sys
import time
from typing import Optional

import torch

from . import tasks
from .data import Encoded, default_label_text, encode, label_names_of, load_split, split_validation, subsample
from .distributed import is_main
from .io import read_adapter_meta
from .methods import make_config, method_class
from .metrics import classification_metrics
from .model import LTuningModel
from .models import load_base
from .train import TrainConfig, fit, remove_checkpoint, scores_of


class Classifier:
    """A text classifier trained with one of ltuning's methods.

    >>> clf = Classifier("minilm-l6", "lt-prefix")
    >>> clf.fit(train_records)               # records: {"text": ..., "label": name}
    >>> clf.predict(["a gripping film"])     # -> ["positive"]
    """

    def __init__(self, model: str = "minilm-l6", method: str = "lt-prefix", label_names: Optional[list] = None,
                 label_texts: Optional[dict] = None, dtype: str = "fp32", max_length: int = 128, base=None,
                 tokenizer=None, quantize: Optional[str] = None, **method_options):
        self.model_name = model
        self.method = method
        self.label_names = label_names
        self.label_text_overrides = dict(label_texts or {})
        self.dtype = dtype
        self.quantize = quantize  # None, "nf4" or "int8": the frozen base through bitsandbytes
        self.max_length = max_length
        self.method_options = method_options
        self._base, self._tokenizer = base, tokenizer
        self.model: Optional[LTuningModel] = None
        self.history: dict = {}

    # ------------------------------------------------------------------ building
    def _load_base(self):
        if self._base is None:
            self._base, self._tokenizer = load_base(self.model_name, self.dtype, self.quantize)
        return self._base, self._tokenizer

    def build(self, label_names: list) -> LTuningModel:
        base, tok = self._load_base()
        self.label_names = list(label_names)
        unknown = set(self.label_text_overrides) - set(self.label_names)
        if unknown:
            raise ValueError(f"--label-text names {sorted(unknown)} are not labels of the data {self.label_names}")
        template = self.method_options.get("label_template", "curated")  # lt-prefix / lt-prompt option
        texts = [self.label_text_overrides.get(n, default_label_text(n, template)) for n in self.label_names]
        cfg = make_config(self.method, label_names=self.label_names, label_texts=texts, **self.method_options)
        self.model = LTuningModel(base, tok, cfg)
        return self.model

    @property
    def decoder(self) -> bool:
        return self.model.info.causal

    def encode(self, records: list, with_labels: bool = True) -> Encoded:
        return encode(records, self.model.tokenizer, self.label_names if with_labels else None,
                      self.max_length, self.decoder)

    # ------------------------------------------------------------------ training / inference
    def fit(self, train: list, val: Optional[list] = None, out_dir: Optional[str] = None, resume: bool = False,
            val_fraction: float = 0.1, progress: bool = True, stratify_validation: bool = False,
            **train_options) -> dict:
        """Train on ``train`` records; model selection on ``val`` (default: a seeded split of ``train``, with each
        label's share of ``train`` if ``stratify_validation``). ``train_options``: fields of
        :class:`~ltuning.train.TrainConfig` (its defaults are those of ``ltuning train``); ``out_dir``: where
        checkpoints go (``out_dir/checkpoint``, ``resume`` continues from it)."""
        cfg = TrainConfig(**train_options)
        if self.model is None:
            # the adapter's random initialisation follows cfg.seed, not whatever ran before in this process (the
            # same order as the CLI: seed, load the base if needed, build)
            torch.manual_seed(cfg.seed)
            self.build(self.label_names or label_names_of(train))
        note = scoring_hint(self.model.config, len(self.label_names))
        if note and progress and is_main():
            print(note, file=sys.stderr)
        if val is None:
            train, val = split_validation(train, val_fraction, cfg.seed, stratify=stratify_validation)
        tr, va = self.encode(train), self.encode(val)
        t0 = time.time()
        self.history = fit(self.model, tr, va, cfg, checkpoint_dir=out_dir, resume=resume, progress=progress)
        self.history.update(wall_seconds=time.time() - t0, train_examples=len(train), val_examples=len(val))
        return self.history

    def predict_scores(self, records: list, batch_size: int = 64, progress: bool = False) -> torch.Tensor:
        """Scores (N, K) of records (or texts); torchrun: inputs sharded over ranks, scores gathered in order."""
        records = [{"text": r} if isinstance(r, str) else r for r in records]
        return scores_of(self.model, self.encode(records, with_labels=False), batch_size, self.dtype, progress)

    def predict(self, records: list, batch_size: int = 64) -> list:
        return [self.label_names[i] for i in self.predict_scores(records, batch_size).argmax(-1).tolist()]

    def evaluate(self, records: list, batch_size: int = 64, progress: bool = False) -> dict:
        enc = self.encode(records)
        t0 = time.perf_counter()
        scores = scores_of(self.model, enc, batch_size, self.dtype, progress)
        dt = time.perf_counter() - t0
        m = classification_metrics(scores.argmax(-1).tolist(), enc.labels, len(self.label_names))
        m["eval_examples_per_s"] = len(records) / dt
        return m

    def add_labels(self, names: list, texts: Optional[list] = None) -> None:
        """Add classes at inference without retraining (label-conditioned methods; see ``ltuning.methods.scoring``)."""
        self.model.add_labels(names, texts)
        self.label_names = list(self.model.label_names)

    # ------------------------------------------------------------------ persistence
    def save_pretrained(self, directory: str, metrics: Optional[dict] = None) -> None:
        info = {"model": self.model_name, "dtype": self.dtype, "max_length": self.max_length, "quantize": self.quantize}
        files = None if metrics is None else {"metrics.json": json.dumps(metrics, indent=2).encode()}
        self.model.save_pretrained(directory, classifier=info, files=files)  # all files or none

    @classmethod
    def from_pretrained(cls, directory: str, base=None, tokenizer=None, dtype: Optional[str] = None,
                        quantize: Optional[str] = "recorded", model: Optional[str] = None) -> "Classifier":
        """``quantize``: "recorded" (the adapter's own base precision), None / "none", "nf4" or "int8"; a base of
        another precision than the adapter was trained on loads with a warning. ``model``: another base model name
        than the recorded one (``base``: a loaded one)."""
        meta = read_adapter_meta(directory)
        quantize = meta.quantize if quantize == "recorded" else quantize
        clf = cls(model or meta.model_name, meta.method, meta.label_names, dtype=dtype or meta.dtype,
                  max_length=meta.max_length, base=base, tokenizer=tokenizer,
                  quantize=None if quantize == "none" else quantize)
        b, tok = clf._load_base()
        clf.model = LTuningModel.from_pretrained(b, directory, tok)
        return clf


MANY_LABELS = 8  # from here on, a K-pass label-conditioned run gets a note about one-pass scoring


def scoring_hint(config, n_labels: int) -> Optional[str]:
    """A one-line note (printed by :meth:`Classifier.fit` with progress on, so by ``ltuning train``) when a built
    label-conditioned model (``config``: its resolved config) scores K >= ``MANY_LABELS`` labels with the K-pass
    protocol (every input runs K times per step), else None."""
    if not method_class(config.method).label_conditioned or getattr(config, "scoring", None) != "kpass" \
            or n_labels < MANY_LABELS:
        return None
    return (f"ltuning: {n_labels} labels with --scoring kpass run every input {n_labels} times per step; "
            "--scoring onepass runs it once (the default of lt-prefix on encoders; README, Label scoring)")


def train(train_records: list, dev: list, label_names: list, out: str, model: str, method: str, method_options: dict,
          cfg: TrainConfig, label_texts: Optional[dict] = None, max_length: int = 128, quantize: Optional[str] = None,
          max_train_examples: Optional[int] = None, max_dev_examples: Optional[int] = None, val_fraction: float = 0.1,
          stratify_validation: bool = False, resume: bool = False, keep_checkpoint: bool = False,
          progress: bool = True, data_name: str = "") -> dict:
    """``ltuning train`` of one task: subsample (seeded), train with model selection on a validation split of
    ``train_records``, evaluate on ``dev``, save the adapter + ``metrics.json`` to ``out`` (torchrun: rank 0) and
    drop ``out/checkpoint`` unless ``keep_checkpoint``. ``label_names``: those of the WHOLE training file (a class the
    subsample misses is still scored). Returns the metrics."""
    train_records = subsample(train_records, max_train_examples, cfg.seed)
    dev = subsample(dev, max_dev_examples, cfg.seed)
    clf = Classifier(model, method, label_names=label_names, label_texts=label_texts, dtype=cfg.dtype,
                     max_length=max_length, quantize=quantize, **method_options)
    hist = clf.fit(train_records, out_dir=out, resume=resume, val_fraction=val_fraction,
                   stratify_validation=stratify_validation, progress=progress, **vars(cfg))
    m = clf.evaluate(dev, cfg.batch_size * 4, progress=progress)
    trainable, total = clf.model.count_parameters()
    metrics = {"model": model, "method": method, "data": data_name, "dev_examples": len(dev),
               "train_examples": hist["train_examples"], "accuracy": m["accuracy"], "macro_f1": m["macro_f1"],
               "mcc": m["mcc"], "train_examples_per_s": hist["train_examples_per_s"],
               "eval_examples_per_s": m["eval_examples_per_s"], "trainable_parameters": trainable,
               "total_parameters": total, "best_val": hist["best_val"], "best_step": hist["best_step"],
               "steps": hist["steps"], "wall_seconds": hist["wall_seconds"], "train_config": hist["train_config"]}
    if "fsdp_frozen_parameters" in hist:  # --fsdp: frozen base parameters stored by each rank
        metrics["fsdp_frozen_parameters"] = hist["fsdp_frozen_parameters"]
    if is_main():  # torchrun: rank 0 writes the adapter
        clf.save_pretrained(out, metrics)
        if not keep_checkpoint:
            remove_checkpoint(out)
    return metrics


def evaluate_adapter(adapter: str, data: str, split: str = "dev", batch_size: int = 64, model: Optional[str] = None,
                     quantize: Optional[str] = None, task: Optional[str] = None) -> dict:
    """``ltuning eval``: metrics of the adapter in ``adapter`` on the ``split`` records of ``data`` (multi-task
    adapters: per task of ``data`` = DIR1,DIR2,..., see :func:`ltuning.tasks.evaluate_adapter`). ``model``: another
    base model than the recorded one; ``quantize``: another base precision (default: the recorded one)."""
    if read_adapter_meta(adapter).multitask is not None:
        return tasks.evaluate_adapter(adapter, [d for d in data.split(",") if d], split, task, batch_size, model)
    if task:
        raise ValueError(f"--task applies to multi-task adapters; {adapter} has one task")
    clf = Classifier.from_pretrained(adapter, quantize=quantize or "recorded", model=model)
    return clf.evaluate(load_split(data, split), batch_size, progress=True)
