"""Method configs, the registry and the interface every method module implements.

A method contributes one of:
  * a prefix bank (``kind = "prefix"``): per layer, keys/values (N, Hkv, P, D) shared by all rows; row b uses
    entry ``index[b]`` (optionally scaled per row by ``prefix_scales``);
  * a prompt bank (``kind = "prompt"``): embeddings (N, P, d) prepended to the input embeddings, with a
    (N, P) bool mask of real prompt tokens;
  * nothing at the input (``kind = "none"``): it changes the frozen model's layers through hooks.
``label_conditioned`` methods have one bank entry per label (N = K) and score every (input, label) pair with a
one-output head; the others have N = 1 and an ordinary K-way classification head. How each kind enters the
frozen model: :mod:`.injection`.

A method is one module in this package that defines a config dataclass (a :class:`MethodConfig` subclass with
``cli_help``) and a :class:`Method` subclass decorated with :func:`register_method`; the package imports every
module it holds, so nothing else needs an edit.
"""
from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field
from typing import ClassVar, Optional

from torch import nn

METHODS: dict[str, type] = {}


def register_method(name: str):
    """Class decorator: make a :class:`Method` subclass available under ``name``."""
    def deco(cls):
        cls.method_name = name
        METHODS[name] = cls
        return cls
    return deco


@dataclass
class MethodConfig:
    """Options shared by all methods (PEFT-style config dataclass; serialised to ``adapter_config.json``).

    label_names: the K class names, in score order. label_texts: the natural-language text of each label
    (label-conditioned methods), defaults to the names. pooling: ``"last"`` (last real token, decoders),
    ``"mean"`` (mean of real input tokens, encoders) or ``"cls"``; None picks by family. position_offset:
    ``"zero"`` (input positions start at 0) or ``"prefix"`` (start at P, as PEFT does). backend: attention
    backend (see :mod:`ltuning.kernels.api`).
    """
    method: str = ""
    label_names: list = field(default_factory=list)
    label_texts: Optional[list] = None
    pooling: Optional[str] = None
    position_offset: str = "zero"
    backend: str = "auto"
    # Options added after adapters of the method were already being saved, whose current default changes what
    # those adapters compute: a saved config without the key gets this (old) value instead of the default.
    legacy_defaults: ClassVar[dict] = {}
    # Fields the command line exposes as ``--field-name`` (``ltuning train``), with their help; a subclass extends
    # it (``cli_help = {**Parent.cli_help, "x": "..."}``). bool fields become ``--x / --no-x``, int fields take ints.
    cli_help: ClassVar[dict] = {
        "pooling": "pooling of the output: last, mean or cls (default: last for decoders, mean for encoders)",
        "position_offset": "input positions start at 0 (zero) or after the prefix (prefix); default by method",
        "backend": "attention backend: auto, cpu, triton, sdpa, reference",
    }

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "MethodConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - names
        if unknown:
            raise ValueError(f"unknown options for {cls.__name__}: {sorted(unknown)}")
        return cls(**d)

    def resolved_label_texts(self) -> list:
        texts = self.label_texts or list(self.label_names)
        if len(texts) != len(self.label_names):
            raise ValueError(f"{len(texts)} label texts for {len(self.label_names)} labels")
        return list(texts)


class Method(nn.Module):
    """Base of every method module. Subclasses set ``kind`` and ``label_conditioned`` and implement the hooks."""
    method_name = ""
    config_class = MethodConfig
    kind = "prefix"
    label_conditioned = False
    default_lr = 1e-3  # learning rate of the method's trainables when none is given (CLI and Python API)
    lr_grid = (3e-4, 1e-3, 3e-3)  # the lrs a validation sweep tries (benchmarks/accuracy.py --sweep)

    def __init__(self, config: MethodConfig, info, base, tokenizer, cache: dict | None = None):
        """``cache``: base-derived buffers restored from a saved adapter (see :meth:`cache_keys`)."""
        super().__init__()
        self.config = config
        self.info = info
        self._hook_handles = []

    @classmethod
    def resolve_defaults(cls, config: MethodConfig, causal: bool) -> None:
        """Fill, in place, the config options the method leaves None to be chosen by model family (``causal``:
        a decoder). Called when the method is built; a method without such options does nothing."""

    def add_hook(self, handle):
        """Keep a hook ``handle`` (from ``register_forward_hook`` & co. on a base module) for :meth:`uninstall`."""
        self._hook_handles.append(handle)
        return handle

    @property
    def num_entries(self) -> int:
        return len(self.config.label_names) if self.label_conditioned else 1

    def prefix(self):
        """Per-layer ``(keys, values)`` lists of (N, Hkv, P, D) tensors (kind ``"prefix"``)."""
        raise NotImplementedError

    def prefix_scales(self, hidden_states=None):
        """Per-layer (B, P) scales or None (gated prefixes)."""
        return None

    def prefix_lengths(self):
        """(N,) real length of each bank entry of a right-padded bank (the rest is masked in attention), or None
        when every entry uses all P positions."""
        return None

    def prompts(self):
        """``(embeds (N, P, d), mask (N, P) bool)`` (kind ``"prompt"``)."""
        raise NotImplementedError

    def begin_forward(self, input_ids, attention_mask, **batch) -> None:
        """Called at the start of every model forward with the batch (``batch`` carries extra per-row inputs
        such as ``task_ids``); methods that need per-forward state (gates, task mixtures) set it here."""

    def uninstall(self) -> None:
        """Remove anything the method installed in the base model (the hooks of :meth:`add_hook`); called by
        :func:`ltuning.unpatch`."""
        for h in self._hook_handles:
            h.remove()
        self._hook_handles = []

    def refresh_cache(self, base, tokenizer) -> None:
        """Recompute anything derived from the frozen base (e.g. the label cache)."""

    def load_cache(self, cache: dict | None, base, tokenizer) -> None:
        """The base-derived buffers: restored from ``cache`` (a saved adapter's) if given, else computed."""
        if cache is not None:
            self.set_cache(cache)
        else:
            self.refresh_cache(base, tokenizer)

    def set_cache(self, cache: dict) -> None:
        for k in self.cache_keys():
            self.register_buffer(k, cache[k])

    def cache_keys(self) -> list:
        """Names of buffers in the state dict that are caches derived from the base model."""
        return []


def method_class(name: str) -> type:
    if name not in METHODS:
        raise ValueError(f"unknown method {name!r}; available: {sorted(METHODS)}")
    return METHODS[name]


def _cli_kind(f) -> str:
    """"bool", "int" or "str" for a config field: from its default, or from its annotation when the default is None
    (an option resolved by model family, e.g. ``label_weights: Optional[bool] = None``)."""
    d = f.default
    if d is None:
        ann = str(f.type)
        return "bool" if re.search(r"\bbool\b", ann) else "int" if re.search(r"\bint\b", ann) else "str"
    return "bool" if isinstance(d, bool) else "int" if isinstance(d, int) else "str"


def cli_options() -> dict:
    """``{field: (help, kind)}`` of every config field some registered method exposes on the command line
    (:attr:`MethodConfig.cli_help`); kind is ``"int"``, ``"bool"`` (a switch) or ``"str"``, from the field's default
    (its annotation when the default is None: :func:`_cli_kind`).
    The first method (by name) that declares a field gives its help."""
    out = {}
    for name in sorted(METHODS):
        cfg = METHODS[name].config_class
        fields = {f.name: f for f in dataclasses.fields(cfg)}
        for fname, help_ in cfg.cli_help.items():
            kind = _cli_kind(fields[fname])
            prev = out.get(fname)
            if prev is not None and prev[1] != kind:
                raise TypeError(f"config field {fname!r} is {prev[1]} in one method and {kind} in {name}")
            out.setdefault(fname, (help_, kind))
    return out


def config_from_dict(d: dict, saved: bool = False) -> MethodConfig:
    """``saved``: ``d`` was read from an adapter's config file, so options it lacks take the method's
    ``legacy_defaults`` (the behaviour the adapter was trained with), not today's defaults."""
    cls = method_class(d["method"]).config_class
    return cls.from_dict({**cls.legacy_defaults, **d} if saved else d)


def make_config(method: str, **kwargs) -> MethodConfig:
    """Build the config dataclass of ``method`` from keyword options."""
    return method_class(method).config_class.from_dict({"method": method, **kwargs})
