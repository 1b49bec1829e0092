"""``LTuningModel``: a frozen Hugging Face backbone + one method module + a head (PEFT-style wrapper).

Scoring. Methods with an ordinary head give logits (B, K) = W pool(M(x)) from one pass per input. Label-
conditioned methods (L-Tuning) score every (input, label) pair: all B x K pairs run as ONE batch, row
(b, k) selecting bank entry k of the shared prefix/prompt bank, and s_{b,k} = C_phi(pool(M(x_b; p_k))).
Prediction is argmax_k s_{b,k}. Losses: ``listwise`` = cross-entropy over the K scores; ``pairwise`` =
binary cross-entropy on the true pair and ``num_negatives`` sampled wrong labels (the paper's objective).

How the method's bank enters the frozen model (a prefix; prompts as a shared prefix on decoders, concatenated on
encoders): :mod:`ltuning.methods.injection`.

Multi-task models (``task_names``): the K labels are the T tasks' label sets side by side, named ``task:label``
(the head Linear(d, sum_t K_t) is the T per-task heads). ``forward(task_ids=...)`` (B,) scores a row of task t on
its own K_t columns only (the others are -inf), so its cross-entropy is task t's K_t-way loss and its argmax one of
task t's labels; ``task_ids`` also reaches the method (task-aware methods such as cgc-lora use it).
"""
from __future__ import annotations

import hashlib
import json
import os
from typing import Optional
import warnings

import torch
import torch.nn.functional as F
from safetensors.torch import save as save_safetensors
from torch import nn

from .errors import UserError
from .methods import config_from_dict, injection, method_class, scoring
from .models import disable, enable, fingerprint, load_base, model_info, packing
from .models.registry import base_identity
from .outputs import atomic_write_files
from .io import (CONFIG_NAME, WEIGHTS_NAME, AdapterMeta, read_adapter_meta, read_adapter_weights,
                 warn_if_other_precision)
from .models.quantize import keep_trainable_layout



class LTuningModel(nn.Module):
    """Frozen ``base`` + trainable ``method`` + ``head``. Build it with :func:`ltuning.patch`.

    ``cache``: base-derived buffers of the method saved with an adapter (label-text encodings), reused when valid.
    ``fused_ops``: see :func:`ltuning.models.enable`. ``task_names``: the tasks of a multi-task model (labels named
    ``task:label``, see the module docstring), else None."""

    def __init__(self, base, tokenizer, config, cache=None, fused_ops="auto", task_names: Optional[list] = None):
        super().__init__()
        self._base_mode = base.training  # restored by unpatch (train() below turns the base's flag on)
        self.info = model_info(base)
        keep_trainable_layout(base)  # a bitsandbytes 4-bit base: gradients must flow through its Linears
        enable(base, fused_ops=fused_ops)
        self.base = base
        self.tokenizer = tokenizer
        self.config = config
        if len(config.label_names) < 2:
            raise ValueError("config.label_names must name at least two classes")
        self.task_names = None if task_names is None else list(task_names)
        self.label_task = None if task_names is None else torch.tensor(label_tasks(config.label_names, task_names))
        self.method = method_class(config.method)(config, self.info, base, tokenizer, cache)
        n_out = 1 if self.method.label_conditioned else len(config.label_names)
        self.head = scoring.make_head(config, self.info, n_out)  # Linear(d, n_out), bilinear for onepass
        self.pooling = config.pooling or ("last" if self.info.causal else "mean")
        if self.pooling not in ("last", "mean", "cls"):
            raise ValueError(f"pooling must be 'last', 'mean' or 'cls', not {self.pooling!r}")
        for p in self.base.parameters():
            p.requires_grad_(False)
        self.prompt_as_prefix = self.info.causal  # see the module docstring; False: concatenate [p_e ; x]
        device = base.get_input_embeddings().weight.device
        self.method.to(device)
        self.head.to(device)
        # padded batches run packed, in training and inference, wherever that is the same function
        # (ltuning.models.packing.packable: decoders and absolute-position BERTs, a packed kernel, per-token
        # hooks only); settable
        self.pack_inputs = packing.packable(self)

    # ---------------------------------------------------------------- modes and bookkeeping
    def train(self, mode: bool = True):
        """Train mode for the method and head; the frozen base keeps its dropout off (train flag on only so
        that gradient checkpointing, which transformers applies in training mode, works)."""
        super().train(mode)
        self.__dict__.pop("_inference_cache", None)  # see inference_cached
        for m in self.base.modules():
            if isinstance(m, nn.Dropout):
                m.eval()
        return self

    @property
    def label_names(self) -> list:
        return list(self.config.label_names)

    @property
    def task_labels(self) -> Optional[dict]:
        """``{task: its label names (without the task prefix)}`` of a multi-task model, else None."""
        if self.task_names is None:
            return None
        names = self.label_names
        return {t: [names[k][len(t) + 1:] for k in range(len(names)) if int(self.label_task[k]) == i]
                for i, t in enumerate(self.task_names)}

    @property
    def features_are_frozen(self) -> bool:
        """True when training can change nothing but the head's input-independent weights: only ``head.*``
        parameters are trainable and the method injects nothing (no prefix, prompt or hook with trainable state,
        not label-conditioned). The base keeps its dropout off in train mode (:meth:`train`), so the pooled
        features of an input are the same at every step (:func:`ltuning.train.fit` computes them once)."""
        trainable = [n for n, p in self.named_parameters() if p.requires_grad]
        return (bool(trainable) and all(n.startswith("head.") for n in trainable) and self.method.kind == "none"
                and not self.method.label_conditioned)

    def trainable_parameters(self):
        return [p for p in self.parameters() if p.requires_grad]

    def count_parameters(self) -> tuple[int, int]:
        trainable = sum(p.numel() for p in self.trainable_parameters())
        total = sum(p.numel() for p in self.parameters())
        return trainable, total

    def print_trainable_parameters(self) -> None:
        t, a = self.count_parameters()
        print(f"trainable params: {t:,d} || all params: {a:,d} || trainable%: {100 * t / a:.4f}")

    # ---------------------------------------------------------------- forward
    def encode(self, input_ids, attention_mask, entry_index=None, **batch) -> torch.Tensor:
        """Pooled representation (R, d) in fp32 of R rows; row r uses bank entry ``entry_index[r]`` (default 0).
        ``batch``: extra per-row inputs for the method (e.g. ``task_ids``), see :meth:`Method.begin_forward`.
        How the method's bank enters the frozen model: :mod:`ltuning.methods.injection`."""
        R = input_ids.shape[0]
        if entry_index is None:
            entry_index = torch.zeros(R, dtype=torch.long, device=input_ids.device)
        attention_mask = attention_mask.to(input_ids.device).bool()
        self.method.begin_forward(input_ids, attention_mask, **batch)
        h, full_mask, offset = injection.inject(self, input_ids, attention_mask, entry_index)
        return injection.pool(h, full_mask, attention_mask, offset, self.pooling).float()

    def inference_cached(self, name: str, fn):
        """``fn()`` (label-side work that does not depend on the input, e.g. the prefix bank's K/V after its
        transforms), computed once and reused while inferring (eval mode, grad off): the key is the method's
        parameters and buffers (storage and in-place version counter) and the autocast state, so an optimizer
        step, ``load_state_dict`` or a dtype change recomputes it (writes through ``.data`` bypass the version counter:
        ``train()`` / ``eval()`` also clear the cache). Training or grad on: ``fn()`` every call."""
        if self.training or torch.is_grad_enabled():
            return fn()
        dev = self.head.weight.device.type
        key = (torch.is_autocast_enabled(dev), torch.get_autocast_dtype(dev),
               tuple((t.data_ptr(), t._version) for t in (*self.method.parameters(), *self.method.buffers())))
        cache = self.__dict__.setdefault("_inference_cache", {})
        hit = cache.get(name)
        if hit is None or hit[0] != key:
            hit = cache[name] = (key, fn())
        return hit[1]

    def head_scores(self, pooled: torch.Tensor) -> torch.Tensor:
        """The head on pooled features (R, d): (R, K), or (R, 1) for label-conditioned methods; fp32 even under
        autocast (scores and losses stay fp32)."""
        with torch.autocast(pooled.device.type, enabled=False):
            return self.head(pooled.float())

    def pair_scores(self, input_ids, attention_mask, label_index, **batch) -> torch.Tensor:
        """Scores (R,) of (input r, label ``label_index[r]``) pairs (label-conditioned methods)."""
        if not self.method.label_conditioned:
            raise TypeError(f"method {self.config.method!r} is not label-conditioned")
        return self.head_scores(self.encode(input_ids, attention_mask, label_index, **batch)).squeeze(-1)

    def forward(self, input_ids, attention_mask, *, task_ids=None, **batch) -> torch.Tensor:
        """K-way scores (B, K). ``task_ids`` (B,): the task of each row (multi-task models: other tasks' columns
        are -inf). ``batch``: extra per-row tensors (B, ...) for the method."""
        if task_ids is None:
            return self._scores(input_ids, attention_mask, **batch)
        scores = self._scores(input_ids, attention_mask, task_ids=task_ids, **batch)
        if self.label_task is None:
            return scores
        other = self.label_task.to(scores.device)[None] != task_ids.to(scores.device)[:, None]
        return scores.masked_fill(other, float("-inf"))

    def _scores(self, input_ids, attention_mask, **batch) -> torch.Tensor:
        B = input_ids.shape[0]
        if not self.method.label_conditioned:
            return self.head_scores(self.encode(input_ids, attention_mask, **batch))
        if getattr(self.config, "scoring", "kpass") != "kpass":  # input once (ltuning.methods.scoring)
            return scoring.scores(self, input_ids, attention_mask, **batch)
        K = len(self.config.label_names)
        ids = input_ids.repeat_interleave(K, 0)
        mask = attention_mask.repeat_interleave(K, 0)
        labels = torch.arange(K, device=input_ids.device).repeat(B)
        rep = {k: v.repeat_interleave(K, 0) for k, v in batch.items()}
        return self.pair_scores(ids, mask, labels, **rep).view(B, K)

    def loss(self, input_ids, attention_mask, labels, *, task_ids=None, generator=None, **batch):
        """Training loss of a batch; returns ``(loss, scores or None)``. ``generator``: draws the pairwise
        objective's negatives."""
        if task_ids is not None:
            batch["task_ids"] = task_ids
        objective = getattr(self.config, "objective", "listwise")
        if not self.method.label_conditioned or objective == "listwise":
            scores = self(input_ids, attention_mask, **batch)
            return F.cross_entropy(scores, labels), scores
        K = len(self.config.label_names)
        n = min(self.config.num_negatives, K - 1)
        B = input_ids.shape[0]
        shift = torch.stack([torch.randperm(K - 1, generator=generator)[:n] + 1 for _ in range(B)]).to(labels.device)
        neg = (labels[:, None] + shift) % K  # n distinct wrong labels per row
        pair_labels = torch.cat([labels[:, None], neg], 1).reshape(-1)
        target = torch.zeros(B, n + 1, device=labels.device)
        target[:, 0] = 1
        ids = input_ids.repeat_interleave(n + 1, 0)
        mask = attention_mask.repeat_interleave(n + 1, 0)
        rep = {k: v.repeat_interleave(n + 1, 0) for k, v in batch.items()}
        s = self.pair_scores(ids, mask, pair_labels, **rep)
        return F.binary_cross_entropy_with_logits(s, target.view(-1)), None

    def add_labels(self, names: list, texts: list | None = None) -> None:
        """Add classes at inference (label-conditioned methods): their texts are encoded by the frozen model and
        join the label cache; nothing is retrained (see :func:`ltuning.methods.scoring.add_labels`)."""
        scoring.add_labels(self, names, texts)

    # ---------------------------------------------------------------- save / load
    def adapter_state_dict(self) -> dict:
        return {k: v.detach().contiguous().cpu() for k, v in self.state_dict().items() if not k.startswith("base.")}

    def save_pretrained(self, directory: str, classifier: Optional[dict] = None, files: Optional[dict] = None) -> None:
        """Write ``adapter.safetensors`` + ``adapter_config.json`` (and ``files``: {name: bytes}) all or nothing:
        complete temporaries renamed over the targets (:func:`ltuning.outputs.atomic_write_files`). The config
        (:class:`ltuning.io.AdapterMeta`) records the weights' sha256 and the base model's identity, both checked by
        :meth:`from_pretrained`, the tasks of a multi-task model and ``classifier`` (how
        :class:`ltuning.Classifier` loads it: model name, dtype, max_length, quantize)."""
        os.makedirs(directory, exist_ok=True)
        weights = save_safetensors(self.adapter_state_dict())
        meta = AdapterMeta(
            base_model=getattr(self.base, "name_or_path", None) or self.base.config._name_or_path,
            base_fingerprint=fingerprint(self.base),
            base_identity=base_identity(self.base),
            weights_sha256=hashlib.sha256(weights).hexdigest(),
            method_config=self.config.to_dict(),
            cache_keys=[f"method.{k}" for k in self.method.cache_keys()],
            multitask=None if self.task_names is None else {"tasks": list(self.task_names),
                                                            "labels": self.task_labels},
            classifier=classifier,
        )
        out = {os.path.join(directory, WEIGHTS_NAME): weights,
               os.path.join(directory, CONFIG_NAME): json.dumps(meta.to_dict(), indent=2).encode()}
        out.update({os.path.join(directory, k): v for k, v in (files or {}).items()})
        atomic_write_files(out)

    @classmethod
    def from_pretrained(cls, base, directory: str, tokenizer=None, dtype: str = "fp32", check_base: bool = True,
                        quantize: str | None = None, fused_ops="auto", **overrides):
        """Restore an adapter on ``base`` (a loaded backbone, or None / a name to load the recorded one, in
        ``dtype``, quantized if ``quantize`` is "nf4" / "int8"). A multi-task adapter restores its ``task_names``.

        ``check_base``: refuse (:class:`UserError`) a base model other than the one the adapter was trained on
        (its identity: config + a sample of the embedding weights, rounded to bf16 so that the dtype it is loaded
        in does not matter; the quantization is not part of it). A corrupted or truncated weights file is refused
        too. Saved base-derived buffers (``cache_keys``) are reused only on the same base and label texts
        (:func:`saved_cache`)."""
        meta = read_adapter_meta(directory)
        wpath = os.path.join(directory, WEIGHTS_NAME)
        state = read_adapter_weights(directory, meta)
        if base is None or isinstance(base, str):
            base, tokenizer = load_base(base or meta.base_model, dtype, quantize)
        elif tokenizer is None:
            raise ValueError("pass the tokenizer together with a loaded base model")
        if check_base and meta.base_identity is not None and base_identity(base) != meta.base_identity:
            got = getattr(base, "name_or_path", None) or base.config._name_or_path
            raise UserError(f"the adapter was trained on base model {meta.base_model!r}, not on {got!r} (their "
                            "config or weights differ); expected the same base model (--model)",
                            os.path.join(directory, CONFIG_NAME))
        config = config_from_dict({**meta.method_config, **overrides}, saved=True)
        cache = saved_cache(meta, state, config, fingerprint(base))
        cache_keys = meta.cache_keys or []
        model = cls(base, tokenizer, config, cache=cache, fused_ops=fused_ops,
                    task_names=None if meta.multitask is None else meta.multitask["tasks"])
        try:
            missing, unexpected = model.load_state_dict(state, strict=False)
        except RuntimeError as e:  # size mismatch
            raise UserError(f"the weights do not fit {config.method} on this base model "
                            f"({' '.join(str(e).split())[:300]}); expected weights of the same method and base",
                            wpath) from None
        missing = [k for k in missing if not k.startswith("base.") and k not in cache_keys]
        if missing or unexpected:
            raise UserError(f"the weights do not match {config.method}: missing {missing[:5]}, unexpected "
                            f"{unexpected[:5]}; expected the weights written with {CONFIG_NAME}", wpath)
        return model


def saved_cache(meta: AdapterMeta, state: dict, config, base_fingerprint: str) -> Optional[dict]:
    """The method's saved base-derived buffers ``{name: tensor}`` (the ``cache_keys`` of ``state``), or None when
    they must be computed again: the base differs from the one they were computed on, or so do the config fields
    they depend on (the method's ``cache_fields``, default ``label_texts``). Not reused, they leave ``state``."""
    other_precision = warn_if_other_precision(meta.base_fingerprint, base_fingerprint)
    keys = meta.cache_keys or []
    if not keys:
        return None
    same_base = base_fingerprint == meta.base_fingerprint
    fields = getattr(method_class(config.method), "cache_fields", ("label_texts",))
    same_texts = all(getattr(config, f) == meta.method_config.get(f) for f in fields)
    if same_base and same_texts and all(k in state for k in keys):
        return {k[len("method."):]: state[k] for k in keys}
    if not same_base and not other_precision:
        warnings.warn("base model differs from the one the adapter was trained on; re-encoding label texts")
    for k in keys:
        state.pop(k, None)
    return None


def label_tasks(label_names: list, task_names: list) -> list:
    """The task index of each label ``task:label`` (the longest task name that prefixes it)."""
    out = []
    for name in label_names:
        hits = [i for i, t in enumerate(task_names) if name.startswith(f"{t}:")]
        if not hits:
            raise ValueError(f"label {name!r} does not start with one of the tasks {task_names} ('task:label')")
        out.append(max(hits, key=lambda i: len(task_names[i])))
    return out


def patch(model, config, tokenizer, cache=None, fused_ops="auto") -> LTuningModel:
    """Drop-in: wrap a Hugging Face backbone with the method ``config`` describes (its weights stay frozen).

    ``cache``: saved base-derived buffers of the method (see :func:`saved_cache`). ``fused_ops``: the fused CPU
    kernels of Llama-family models, ``"auto"`` (on for a Llama-family model on the CPU unless
    ``LTUNING_FUSED_OPS=0``), True (on; an error for other models) or False (off); see
    :func:`ltuning.models.enable`."""
    return LTuningModel(model, tokenizer, config, cache=cache, fused_ops=fused_ops)


def unpatch(model: LTuningModel):
    """Undo :func:`patch`: the backbone with its original attention implementation, hooks and train/eval mode."""
    base = model.base
    model.method.uninstall()
    disable(base)
    base.train(model.__dict__.get("_base_mode", False))
    return base
