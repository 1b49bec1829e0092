"""``LTuningModel``: a frozen Hugging Face backbone + one method module + a head (PEFT-style wrapper).

Scoring. Methods with an ordinary head give logits (B, K) = W pool(M(x)) from one pass per input. Label-
conditioned methods (L-Tuning) score every (input, label) pair: all B x K pairs run as ONE batch, row
(b, k) selecting bank entry k of the shared prefix/prompt bank, and s_{b,k} = C_phi(pool(M(x_b; p_k))).
Prediction is argmax_k s_{b,k}. Losses: ``listwise`` = cross-entropy over the K scores; ``pairwise`` =
binary cross-entropy on the true pair and ``num_negatives`` sampled wrong labels (the paper's objective).

How the method's bank enters the frozen model (a prefix; prompts as a shared prefix on decoders, concatenated on
encoders): :mod:`ltuning.methods.injection`.
"""
from __future__ import annotations

import hashlib
import json
import os
import warnings

import torch
import torch.nn.functional as F
from safetensors.torch import save as save_safetensors
from torch import nn

from .errors import UserError
from .methods import config_from_dict, injection, method_class, scoring
from .models import disable, enable, fingerprint, load_base, model_info
from .models.registry import base_identity
from .outputs import atomic_write_files
from .io import (CONFIG_NAME, FORMAT_VERSION, WEIGHTS_NAME, read_adapter_config, read_adapter_weights,
                 warn_if_other_precision)
from .models.quantize import keep_trainable_layout



class LTuningModel(nn.Module):
    """Frozen ``base`` + trainable ``method`` + ``head``. Build it with :func:`ltuning.patch`."""

    def __init__(self, base, tokenizer, config, cache=None):
        super().__init__()
        self.info = model_info(base)
        keep_trainable_layout(base)  # a bitsandbytes 4-bit base: gradients must flow through its Linears
        enable(base)
        self.base = base
        self.tokenizer = tokenizer
        self.config = config
        if len(config.label_names) < 2:
            raise ValueError("config.label_names must name at least two classes")
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

    def _head(self, pooled: torch.Tensor) -> torch.Tensor:
        """The head in fp32 even under autocast (scores and losses stay fp32)."""
        with torch.autocast(pooled.device.type, enabled=False):
            return self.head(pooled.float())

    def pair_scores(self, input_ids, attention_mask, label_index, **batch) -> torch.Tensor:
        """Scores (R,) of (input r, label ``label_index[r]``) pairs (label-conditioned methods)."""
        if not self.method.label_conditioned:
            raise TypeError(f"method {self.config.method!r} is not label-conditioned")
        return self._head(self.encode(input_ids, attention_mask, label_index, **batch)).squeeze(-1)

    def forward(self, input_ids, attention_mask, **batch) -> torch.Tensor:
        """K-way scores (B, K). ``batch``: extra per-row tensors (B, ...) for the method, e.g. ``task_ids``."""
        B = input_ids.shape[0]
        if not self.method.label_conditioned:
            return self._head(self.encode(input_ids, attention_mask, **batch))
        if getattr(self.config, "scoring", "kpass") != "kpass":  # input once (ltuning.methods.scoring)
            return scoring.scores(self, input_ids, attention_mask, **batch)
        K = len(self.config.label_names)
        ids = input_ids.repeat_interleave(K, 0)
        mask = attention_mask.repeat_interleave(K, 0)
        labels = torch.arange(K, device=input_ids.device).repeat(B)
        rep = {k: v.repeat_interleave(K, 0) for k, v in batch.items()}
        return self.pair_scores(ids, mask, labels, **rep).view(B, K)

    def loss(self, input_ids, attention_mask, labels, generator=None, **batch):
        """Training loss of a batch; returns ``(loss, scores or None)``."""
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

    def save_pretrained(self, directory: str, extra: dict | None = None, files: dict | None = None) -> None:
        """Write ``adapter.safetensors`` + ``adapter_config.json`` (and ``files``: {name: bytes}) all or nothing:
        complete temporaries renamed over the targets (:func:`ltuning.outputs.atomic_write_files`). The config
        records the weights' sha256 and the base model's identity, both checked by :meth:`from_pretrained`."""
        os.makedirs(directory, exist_ok=True)
        weights = save_safetensors(self.adapter_state_dict())
        meta = {
            "format_version": FORMAT_VERSION,
            "base_model": getattr(self.base, "name_or_path", None) or self.base.config._name_or_path,
            "base_fingerprint": fingerprint(self.base),
            "base_identity": base_identity(self.base),
            "weights_sha256": hashlib.sha256(weights).hexdigest(),
            "method_config": self.config.to_dict(),
            "cache_keys": [f"method.{k}" for k in self.method.cache_keys()],
            **(extra or {}),
        }
        out = {os.path.join(directory, WEIGHTS_NAME): weights,
               os.path.join(directory, CONFIG_NAME): json.dumps(meta, indent=2).encode()}
        out.update({os.path.join(directory, k): v for k, v in (files or {}).items()})
        atomic_write_files(out)

    @classmethod
    def from_pretrained(cls, base, directory: str, tokenizer=None, dtype: str = "fp32", check_base: bool = True,
                        quantize: str | None = None, **overrides):
        """Restore an adapter on ``base`` (a loaded backbone, or None / a name to load the recorded one, in
        ``dtype``, quantized if ``quantize`` is "nf4" / "int8").

        ``check_base``: refuse (:class:`UserError`) a base model other than the one the adapter was trained on
        (its identity: config + a sample of the embedding weights, rounded to bf16 so that the dtype it is loaded
        in does not matter; the quantization is not part of it). A corrupted or truncated weights file is refused
        too."""
        meta = read_adapter_config(directory)
        wpath = os.path.join(directory, WEIGHTS_NAME)
        state = read_adapter_weights(directory, meta)
        if base is None or isinstance(base, str):
            base, tokenizer = load_base(base or meta["base_model"], dtype, quantize)
        elif tokenizer is None:
            raise ValueError("pass the tokenizer together with a loaded base model")
        ident = meta.get("base_identity")
        if check_base and ident is not None and base_identity(base) != ident:
            got = getattr(base, "name_or_path", None) or base.config._name_or_path
            raise UserError(f"the adapter was trained on base model {meta['base_model']!r}, not on {got!r} (their "
                            "config or weights differ); expected the same base model (--model)",
                            os.path.join(directory, CONFIG_NAME))
        cfg_dict = dict(meta["method_config"])
        cfg_dict.update(overrides)
        config = config_from_dict(cfg_dict, saved=True)
        cache = None
        cache_keys = meta.get("cache_keys", [])
        same_base = fingerprint(base) == meta.get("base_fingerprint")
        other_precision = warn_if_other_precision(meta.get("base_fingerprint"), fingerprint(base))
        fields = getattr(method_class(config.method), "cache_fields", ("label_texts",))
        same_texts = all(getattr(config, f) == meta["method_config"].get(f) for f in fields)
        if cache_keys and same_base and same_texts and all(k in state for k in cache_keys):
            cache = {k[len("method."):]: state[k] for k in cache_keys}
        elif cache_keys:
            if not same_base and not other_precision:
                warnings.warn("base model differs from the one the adapter was trained on; re-encoding label texts")
            for k in cache_keys:
                state.pop(k, None)
        model = cls(base, tokenizer, config, cache=cache)
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


def patch(model, config, tokenizer, cache=None) -> LTuningModel:
    """Drop-in: wrap a Hugging Face backbone with the method ``config`` describes (its weights stay frozen)."""
    return LTuningModel(model, tokenizer, config, cache=cache)


def unpatch(model: LTuningModel):
    """Undo :func:`patch`: the backbone with its original attention implementation."""
    base = model.base
    model.method.uninstall()
    disable(base)
    return base
