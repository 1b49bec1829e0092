"""``Classifier``: the high-level object (load a base, patch it with a method, fit / predict / save / load)."""
from __future__ import annotations

import json
import random
import time
from typing import Optional

import torch

from .data import default_label_text, encode, label_names_of
from .distributed import map_sharded
from .inference import predict_scores
from .methods import make_config
from .metrics import classification_metrics
from .model import LTuningModel
from .io import read_adapter_config
from .models import load_base
from .train import TrainConfig, fit


def split_validation(records: list, fraction: float, seed: int, max_examples: int = 500, min_examples: int = 50,
                     stratify: bool = False):
    """Carve a seeded validation split off ``records``: ``(train, val)``; at least ``min_examples`` (or a fifth
    of the data, when smaller) so that model selection is not decided by a handful of examples.

    ``stratify``: the split keeps each label's share of ``records`` (largest remainder: label c gets
    floor(n_val * n_c / n) examples plus one for the labels with the largest remainders), so a small split is not
    by chance dominated by one class. Off by default: the published results used the plain split."""
    idx = list(range(len(records)))
    random.Random(seed).shuffle(idx)
    n_val = min(max_examples, max(int(len(records) * fraction), min(min_examples, len(records) // 5), 1))
    if stratify:
        by_label = {}
        for i in idx:  # shuffled order within each label
            by_label.setdefault(records[i]["label"], []).append(i)
        quota = {c: n_val * len(ix) / len(records) for c, ix in by_label.items()}
        take = {c: int(q) for c, q in quota.items()}
        for c in sorted(quota, key=lambda c: (int(quota[c]) - quota[c], str(c)))[:n_val - sum(take.values())]:
            take[c] += 1
        chosen = {i for c, ix in by_label.items() for i in ix[:take[c]]}
        val_idx = [i for i in idx if i in chosen]
        idx = val_idx + [i for i in idx if i not in chosen]
    val = [records[i] for i in idx[:n_val]]
    train = [records[i] for i in idx[n_val:]]
    return train, val


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
        texts = [self.label_text_overrides.get(n, default_label_text(n)) for n in self.label_names]
        cfg = make_config(self.method, label_names=self.label_names, label_texts=texts, **self.method_options)
        self.model = LTuningModel(base, tok, cfg)
        return self.model

    @property
    def decoder(self) -> bool:
        return self.model.info.causal

    def encode(self, records: list, with_labels: bool = True):
        return encode(records, self.model.tokenizer, self.label_names if with_labels else None,
                      self.max_length, self.decoder)

    # ------------------------------------------------------------------ training / inference
    def fit(self, train: list, val: Optional[list] = None, out_dir: Optional[str] = None, resume: bool = False,
            val_fraction: float = 0.1, progress: bool = True, stratify_validation: bool = False,
            **train_options) -> dict:
        """Train on ``train`` records; model selection on ``val`` (default: a seeded split of ``train``, with each
        label's share of ``train`` if ``stratify_validation``)."""
        cfg = TrainConfig(**train_options)
        if self.model is None:
            # the adapter's random initialisation follows cfg.seed, not whatever ran before in this process (the
            # same order as the CLI: seed, load the base if needed, build)
            torch.manual_seed(cfg.seed)
            self.build(self.label_names or label_names_of(train))
        if val is None:
            train, val = split_validation(train, val_fraction, cfg.seed, stratify=stratify_validation)
        tr, va = self.encode(train), self.encode(val)
        t0 = time.time()
        self.history = fit(self.model, tr.input_ids, tr.labels, va.input_ids, va.labels, cfg,
                           checkpoint_dir=out_dir, resume=resume, progress=progress)
        self.history.update(wall_seconds=time.time() - t0, train_examples=len(train), val_examples=len(val))
        return self.history

    def predict_scores(self, records: list, batch_size: int = 64, progress: bool = False) -> torch.Tensor:
        records = [{"text": r} if isinstance(r, str) else r for r in records]
        enc = self.encode(records, with_labels=False)
        return map_sharded(lambda ids: predict_scores(self.model, ids, batch_size, self.dtype, progress),
                           enc.input_ids)

    def predict(self, records: list, batch_size: int = 64) -> list:
        return [self.label_names[i] for i in self.predict_scores(records, batch_size).argmax(-1).tolist()]

    def evaluate(self, records: list, batch_size: int = 64, progress: bool = False) -> dict:
        enc = self.encode(records)
        t0 = time.perf_counter()
        scores = map_sharded(lambda ids: predict_scores(self.model, ids, batch_size, self.dtype, progress),
                             enc.input_ids)  # torchrun: inputs sharded over ranks, scores gathered in order
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
        extra = {"classifier": {"model": self.model_name, "dtype": self.dtype, "max_length": self.max_length,
                                "quantize": self.quantize}}
        files = None if metrics is None else {"metrics.json": json.dumps(metrics, indent=2).encode()}
        self.model.save_pretrained(directory, extra=extra, files=files)  # all files or none

    @classmethod
    def from_pretrained(cls, directory: str, base=None, tokenizer=None, dtype: Optional[str] = None,
                        quantize: Optional[str] = "recorded") -> "Classifier":
        """``quantize``: "recorded" (the adapter's own base precision), None / "none", "nf4" or "int8"; a base of
        another precision than the adapter was trained on loads with a warning."""
        meta = read_adapter_config(directory)
        info = meta.get("classifier", {})
        dtype = dtype or info.get("dtype", "fp32")
        quantize = info.get("quantize") if quantize == "recorded" else quantize
        cfg = meta["method_config"]
        clf = cls(info.get("model", meta["base_model"]), cfg["method"], cfg["label_names"], dtype=dtype,
                  max_length=info.get("max_length", 128), base=base, tokenizer=tokenizer,
                  quantize=None if quantize == "none" else quantize)
        b, tok = clf._load_base()
        clf.model = LTuningModel.from_pretrained(b, directory, tok)
        return clf
