"""Hugging Face PEFT prefix-tuning adapters in ltuning's ``prefix`` method, with PEFT's position convention.

PEFT's ``PrefixEncoder`` for P virtual tokens on a model with L layers and KV width ``token_dim`` = Hkv * D:

* ``prefix_projection=True``: E (P, token_dim) -> Linear(token_dim, h) -> tanh -> Linear(h, L * 2 * token_dim);
* ``prefix_projection=False`` (PEFT's default): E (P, L * 2 * token_dim).

Its output z (P, L * 2 * token_dim) is read as (P, L, 2, Hkv, D): layer i's keys are z[:, i, 0], values z[:, i, 1]
(no RoPE on the prefix keys); ltuning's ``prefix`` method computes and splits z the same way
(:func:`ltuning.methods.prefix_encoder.split_layers`). A *saved* PEFT adapter (``adapter_model.safetensors``) holds z itself
as ``prompt_embeddings`` (P, L * 2 * token_dim) whatever ``prefix_projection`` was, so it loads into ltuning's
``prefix`` with ``prefix_projection=False``; a *live* PEFT encoder with the projection loads with
``prefix_projection=True``, ``encoder_hidden_size=h`` and ``embedding_dim=token_dim``.

Positions: PEFT puts the prefix in the KV cache, so the input's positions are P, P+1, ... (RoPE on decoders);
ltuning's ``prefix`` starts them at 0 by default (``position_offset="zero"``). :func:`prefix_config_from_peft`
sets ``position_offset="prefix"``, which reproduces PEFT's forward exactly (``tests/methods/test_peft_parity.py``).
"""
from __future__ import annotations

import json
import os

import torch

from .methods.base import make_config


def _peft_config_dict(source) -> dict:
    """The PEFT config of ``source``: an adapter directory, a ``PeftModel``, a ``PrefixTuningConfig`` or a dict."""
    if isinstance(source, (str, os.PathLike)):
        path = os.path.join(source, "adapter_config.json")
        if not os.path.isfile(path):
            raise FileNotFoundError(f"{source}: no adapter_config.json (expected a directory written by PEFT's "
                                    "save_pretrained)")
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    if isinstance(source, dict):
        return dict(source)
    cfg = getattr(source, "peft_config", None)
    if isinstance(cfg, dict):  # a PeftModel
        cfg = cfg.get(getattr(source, "active_adapter", "default"), next(iter(cfg.values())))
    cfg = cfg if cfg is not None else source
    if hasattr(cfg, "to_dict"):
        return cfg.to_dict()
    raise TypeError(f"expected a PEFT adapter directory, PeftModel, PrefixTuningConfig or dict, got {type(source)}")


def prefix_config_from_peft(source, label_names: list, live: bool = False, **overrides):
    """An ltuning ``prefix`` config equal to the PEFT prefix-tuning adapter ``source``, with PEFT's positions.

    ``live=False``: for the saved adapter's ``prompt_embeddings`` (``prefix_projection=False``). ``live=True``: for
    a running PEFT encoder's own weights (its projection, if it has one)."""
    c = _peft_config_dict(source)
    kind = str(c.get("peft_type", "")).upper().replace("PEFTTYPE.", "")
    if kind != "PREFIX_TUNING":
        raise ValueError(f"PEFT adapter type {c.get('peft_type')!r}: only PREFIX_TUNING loads into ltuning's prefix")
    opts = {"num_virtual_tokens": int(c["num_virtual_tokens"]), "position_offset": "prefix",
            "prefix_projection": bool(live and c.get("prefix_projection"))}
    if opts["prefix_projection"]:
        opts.update(encoder_hidden_size=int(c["encoder_hidden_size"]), embedding_dim=int(c["token_dim"]))
    opts.update(overrides)
    return make_config("prefix", label_names=list(label_names), **opts)


def _peft_tensors(source) -> dict:
    """Name -> tensor of a PEFT prefix encoder: a saved adapter directory (``prompt_embeddings``), a ``PeftModel``
    (its ``prompt_encoder``), a ``PrefixEncoder`` module or a state dict."""
    if isinstance(source, (str, os.PathLike)):
        st = os.path.join(source, "adapter_model.safetensors")
        if os.path.isfile(st):
            from safetensors.torch import load_file
            sd = load_file(st)
        else:
            sd = torch.load(os.path.join(source, "adapter_model.bin"), map_location="cpu", weights_only=True)
        if "prompt_embeddings" not in sd:
            raise ValueError(f"{source}: no prompt_embeddings in the PEFT adapter (keys: {sorted(sd)[:5]})")
        return {"embedding.weight": sd["prompt_embeddings"]}
    enc = getattr(source, "prompt_encoder", None)
    if enc is not None:  # a PeftModel
        source = enc[getattr(source, "active_adapter", "default")]
    if isinstance(source, torch.nn.Module):
        source = source.state_dict()
    return dict(source)


@torch.no_grad()
def load_peft_prefix(model, source) -> None:
    """Copy a PEFT prefix encoder's weights (see :func:`_peft_tensors` for ``source``) into ``model``, an
    ``LTuningModel`` of method ``prefix`` built with the matching config (:func:`prefix_config_from_peft`).
    Every name and shape is checked before anything is written."""
    if getattr(model.config, "method", None) != "prefix":
        raise ValueError(f"load_peft_prefix needs an ltuning 'prefix' model, got {model.config.method!r}")
    src = _peft_tensors(source)
    own = dict(model.method.named_parameters())
    want = {k for k in own if k.startswith(("embedding.", "transform."))}
    if set(src) != want:
        raise ValueError(f"PEFT encoder tensors {sorted(src)} do not match the prefix method's {sorted(want)}: build "
                         "it with prefix_config_from_peft(..., live=<True for a running PEFT encoder>)")
    for k in sorted(want):
        if tuple(src[k].shape) != tuple(own[k].shape):
            raise ValueError(f"PEFT {k} has shape {tuple(src[k].shape)}, ltuning's prefix expects "
                             f"{tuple(own[k].shape)} (num_virtual_tokens, layers and KV width must match the model)")
    for k in sorted(want):
        own[k].copy_(src[k].to(own[k].dtype))


def from_peft(base, tokenizer, source, label_names: list, live: bool = False, **overrides):
    """Patch ``base`` with ltuning's ``prefix`` method holding the PEFT adapter ``source``; the head is new (PEFT's
    task heads are not read). Returns the ``LTuningModel``."""
    from .model import patch

    model = patch(base, prefix_config_from_peft(source, label_names, live, **overrides), tokenizer)
    load_peft_prefix(model, source)
    return model
