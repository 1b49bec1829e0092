"""The inference engine behind ``ltuning classify`` and ``ltuning serve``: one frozen base, one or more adapters.

Loaded once: the base (fp32, bf16 or dynamic-int8 Linears, see :mod:`ltuning.serving.cpu`), every adapter on it,
and everything label-side (the label cache is restored with the adapter; the prefix bank's K/V after its transforms
is cached by :meth:`ltuning.model.LTuningModel.inference_cached` at the first batch and reused). Per call:

* tokenisation with a stated truncation policy (:meth:`Engine.tokenize`): each input is cut to the adapter's
  ``max_length`` tokens (default 128), keeping its start; a premise/hypothesis pair is truncated longest-first on
  encoders, and joined by a newline then cut from the end on decoders (as in training);
* token-budget batches (:func:`ltuning.batching.plan_batches`): inputs sorted by length and split so that a
  batch's tokens, counted per scored row (label-conditioned methods score all K labels of an input: K
  rows), stay within ``max_batch_tokens`` and its rows within ``max_batch_rows``, minimising the tokens plus a fixed
  cost per forward (:data:`ltuning.inference.OVERHEAD_TOKENS`);
* packed batches (``pack=True``, the default; :mod:`ltuning.models.packing`): on decoders, each batch runs as
  one row of its inputs' real tokens side by side (the packed attention kernel keeps the inputs apart), so no
  padding goes through the Linears and the planner counts real tokens only: inputs of any mix of lengths fill
  one forward (the server's micro-batches of random lengths gain most). Adapters whose layer hooks read the
  batch's (R, L) shape (APT, FL, CGC-LoRA) and encoders keep padded batches (:meth:`Engine.packable`);
* the library's one inference path (:func:`ltuning.inference.run_batches`): ``torch.inference_mode``, bf16
  autocast when the base runs in bf16; all K labels of an input are scored by the model's own forward
  (``model(input_ids, attention_mask)`` -> (B, K)), so a cheaper scoring the model implements is used as is.

Several adapters: each adapter is an ``LTuningModel`` sharing the same base module (no copy of the weights).
Adapters whose method hooks the base's layers (LoRA, FL, APT, CGC-LoRA) have their hooks detached from the base
and attached only while a batch of that adapter runs (:class:`_HookSwitch`). A single LoRA adapter is merged into
the frozen weights at load (no hook cost; before any quantization). A mixed stream (:meth:`Engine.score_mixed`):
with ``shared_bank=True`` (the default; ``--no-shared-bank`` turns it off) the prefix-family adapters share one
bank built at load (:mod:`ltuning.serving.shared_bank`: their entries side by side, each row indexing its own,
each row scored by its own adapter's head), so their inputs are planned and run together in token-budget batches;
the adapters that cannot share (LoRA and the other layer-hooking methods, prompts concatenated to an encoder's
input, shared-input scoring, multi-task adapters) run in batches of their own adapter.
"""
from __future__ import annotations

import os
import threading
from dataclasses import dataclass, field

import torch

from ..batching import plan_batches
from ..data import encode
from ..inference import overhead_tokens_of, run_batches
from ..model import LTuningModel
from ..io import read_adapter_config, read_adapter_meta
from ..methods import scoring
from ..models import enable, fingerprint, load_base
from . import cpu
from ..models.packing import packable
from .shared_bank import SharedBank

class _HookSwitch:
    """Forward (pre-)hooks an adapter installed on the shared base: detached, re-attached while it runs."""
    DICTS = ("_forward_hooks", "_forward_pre_hooks")

    def __init__(self):
        self.entries = {}  # adapter name -> [(module, dict name, key, fn)]

    @classmethod
    def hook_ids(cls, base) -> set:
        return {id(fn) for m in base.modules() for d in cls.DICTS for fn in getattr(m, d).values()}

    def detach(self, base, owned: dict) -> None:
        """``owned``: adapter name -> set of ids of the hook functions it installed."""
        for m in base.modules():
            for d in self.DICTS:
                hooks = getattr(m, d)
                for key, fn in list(hooks.items()):
                    for name, ids in owned.items():
                        if id(fn) in ids:
                            self.entries.setdefault(name, []).append((m, d, key, fn))
                            del hooks[key]

    def attach(self, name: str) -> None:
        for m, d, key, fn in self.entries.get(name, []):
            getattr(m, d)[key] = fn

    def release(self, name: str) -> None:
        for m, d, key, _ in self.entries.get(name, []):
            getattr(m, d).pop(key, None)


@dataclass
class Adapter:
    """One loaded adapter: its model (sharing the engine's base), label names and input policy."""
    name: str
    directory: str
    model: LTuningModel
    label_names: list
    max_length: int
    method: str
    rows_per_input: int = 1
    info: dict = field(default_factory=dict)


def parse_adapter_args(items: list) -> dict:
    """``["DIR", "name=DIR", ...]`` -> {name: DIR}; a bare DIR is named by its last path component."""
    out = {}
    for it in items:
        name, sep, path = it.partition("=")
        if not sep or os.path.isdir(it):
            name, path = os.path.basename(os.path.normpath(it)) or "adapter", it
        name = name.strip()
        if not name:
            raise ValueError(f"--adapter {it!r}: expected DIR or NAME=DIR")
        if name in out:
            raise ValueError(f"--adapter {it!r}: the name {name!r} is given twice (use NAME=DIR)")
        read_adapter_config(path)  # FileNotFoundError naming the path
        out[name] = path
    if not out:
        raise ValueError("--adapter: at least one adapter directory is needed")
    return out


class Engine:
    """Load ``adapters`` ({name: directory}) on one base; classify tokenised or raw inputs.

    ``dtype``: ``"auto"`` (bf16 where the CPU multiplies bf16 natively and a probe GEMM is faster in bf16, else
    fp32), ``"fp32"`` or ``"bf16"``. ``quantize``: None, ``"int8"`` (PyTorch dynamic int8 Linears in the frozen
    base, CPU only; runs in fp32) or ``"nf4"`` (the base loaded through bitsandbytes 4-bit NF4 exactly as
    ``ltuning train --quantize nf4`` loads it, :func:`ltuning.models.load_base`: double-quantized NF4 weights,
    bf16 compute inside the 4-bit Linears, everything else fp32; a single LoRA adapter is then not merged, its
    hook runs). ``model``: override the base recorded in the adapters. ``shared_bank``: mixed batches of the
    prefix-family adapters (module docstring); False: one batch per adapter. ``pack``: run batches packed where
    an adapter allows it (:meth:`packable`); False: padded batches everywhere."""

    def __init__(self, adapters: dict, model: str | None = None, dtype: str = "auto", quantize: str | None = None,
                 max_batch_tokens: int = 4096, max_batch_rows: int = 64, threads: int | None = None,
                 shared_bank: bool = True, pack: bool = True):
        if not adapters:
            raise ValueError("at least one adapter is needed")
        if quantize not in (None, "none", "int8", "nf4"):
            raise ValueError(f"--quantize: expected int8, nf4 or none, got {quantize!r}")
        quantize = None if quantize == "none" else quantize
        if dtype not in ("auto", "fp32", "bf16"):
            raise ValueError(f"--dtype: expected auto, fp32 or bf16, got {dtype!r}")
        if max_batch_tokens < 1 or max_batch_rows < 1:
            raise ValueError("--max-batch-tokens and --max-batch-rows must be >= 1")
        if threads:
            torch.set_num_threads(threads)
        metas = {n: read_adapter_meta(d) for n, d in adapters.items()}
        bases = {m.model_name for m in metas.values()}
        if model is None and len(bases) > 1:
            raise ValueError(f"the adapters were trained on different base models {sorted(bases)}; "
                             f"serve them from separate processes")
        base_name = model or bases.pop()
        if quantize and dtype == "bf16":
            raise ValueError(f"--quantize {quantize} runs the base in fp32 (nf4: bf16 compute inside its 4-bit "
                             f"Linears); do not combine it with --dtype bf16")
        self.dtype = "fp32" if quantize else (cpu.preferred_dtype() if dtype == "auto" else dtype)
        self.quantize = quantize
        self.max_batch_tokens = max_batch_tokens
        self.max_batch_rows = max_batch_rows
        self.base, self.tokenizer = load_base(base_name, "fp32", "nf4" if quantize == "nf4" else None)
        self.base_name = base_name
        enable(self.base)  # the attention patch and fused ops once, before any adapter's own hooks
        self.adapters: dict = {}
        owned = {}
        self.hooks = _HookSwitch()
        for name, d in adapters.items():
            before = _HookSwitch.hook_ids(self.base)
            m = LTuningModel.from_pretrained(self.base, d, self.tokenizer).eval()
            owned[name] = _HookSwitch.hook_ids(self.base) - before
            if len(adapters) > 1 and owned[name]:
                # off the base before the next adapter loads: its label cache (recomputed when the base's
                # fingerprint differs from the saved one, e.g. an NF4 base) must see the frozen base alone
                self.hooks.detach(self.base, {name: owned[name]})
            meta = metas[name]
            self.adapters[name] = Adapter(
                name, d, m, list(m.label_names), meta.max_length,
                m.config.method, scoring.rows_per_input(m),
                {"method": m.config.method, "labels": list(m.label_names), "base_model": base_name,
                 "base_fingerprint": meta.base_fingerprint})
        for name, a in self.adapters.items():
            a.model.pack_inputs = pack and packable(a.model)  # see ltuning.models.packing.packable
        hooked = [n for n, ids in owned.items() if ids]
        if len(self.adapters) == 1 and hooked and self.adapters[hooked[0]].method == "lora" and quantize != "nf4":
            self.adapters[hooked[0]].model.method.merge()  # its hook then adds nothing
        if self.dtype == "bf16":
            self.base.to(torch.bfloat16)
        self.lock = threading.Lock()  # one model call at a time
        if quantize == "int8":
            self._quantize_int8()
        self.fingerprint = fingerprint(self.base)
        self.shared = None
        if shared_bank and len(self.adapters) > 1:
            # hooks that change the base (LoRA & co.) rule an adapter out; gate hooks (APT: prefix scales) do not
            fit = [a for n, a in self.adapters.items() if not owned[n] or a.model.method.prefix_scales() is not None]
            if len(fit) > 1:
                try:
                    self.shared = SharedBank(self.base, fit, self.dtype, self.hooks,
                                             pack=pack and all(a.model.pack_inputs for a in fit))
                except ValueError:
                    self.shared = None
                if self.shared is not None and len(self.shared.members) < 2:
                    self.shared = None

    def _quantize_int8(self) -> None:
        """The base's Linears -> smoothed dynamic int8 (:func:`cpu.quantize_int8`), calibrated on
        :data:`cpu.CALIBRATION_TEXTS` run through every adapter in fp32. Modules are replaced at their paths, so
        the hook switch's detached entries are re-pointed to whatever module now sits at their path (a
        :class:`cpu.SmoothedLinear`, whose hooks see the unsmoothed input), and the label-side caches filled by
        the calibration run are dropped (they are recomputed on the int8 base at the first batch)."""
        paths = {id(m): n for n, m in self.base.named_modules()}

        def calibrate():
            for a in self.adapters.values():
                self.score_ids(a, self.tokenize([{"text": t} for t in cpu.CALIBRATION_TEXTS], a))
        cpu.quantize_int8(self.base, calibrate, alpha=cpu.SMOOTH_ALPHA, max_outlier_ratio=cpu.MAX_OUTLIER_RATIO)
        now = dict(self.base.named_modules())
        self.hooks.entries = {name: [(now[paths[id(m)]], d, key, fn) for m, d, key, fn in entries]
                              for name, entries in self.hooks.entries.items()}
        for a in self.adapters.values():
            a.model.eval()

    # ---------------------------------------------------------------- inputs
    def adapter(self, name: str | None) -> Adapter:
        if name is None:
            if len(self.adapters) == 1:
                return next(iter(self.adapters.values()))
            raise KeyError(f"several adapters are loaded ({', '.join(self.adapters)}): name one")
        if name not in self.adapters:
            raise KeyError(f"unknown adapter {name!r}; loaded: {', '.join(self.adapters)}")
        return self.adapters[name]

    def tokenize(self, records: list, adapter: Adapter) -> list:
        """Token ids per record (``{"text"}`` or ``{"premise", "hypothesis"}``), truncated to the adapter's
        ``max_length`` (see the module docstring)."""
        return encode(records, self.tokenizer, None, adapter.max_length, adapter.model.info.causal).input_ids

    # ---------------------------------------------------------------- scoring
    def score_ids(self, adapter: Adapter, ids: list) -> torch.Tensor:
        """Scores (N, K) float32 of N token-id lists, input order (see the module docstring)."""
        if not ids:
            return torch.empty(0, len(adapter.label_names))
        batches = self.plan(adapter, [len(x) for x in ids])
        with self.lock:
            self.hooks.attach(adapter.name)
            try:
                return run_batches(adapter.model, ids, batches, self.dtype)
            finally:
                self.hooks.release(adapter.name)

    def plan(self, adapter: Adapter, lengths: list) -> list:
        """The batches (lists of input indices) :meth:`score_ids` runs inputs of these token ``lengths`` in:
        :func:`ltuning.batching.plan_batches` with the engine's budgets, by real tokens where the adapter runs
        packed, else by padded tokens."""
        overhead = overhead_tokens_of(adapter.model.head.weight.device)
        return plan_batches(lengths, self.max_batch_rows, overhead, adapter.rows_per_input, self.max_batch_tokens,
                            ties="smaller", packed=adapter.model.pack_inputs)

    def batch_tokens(self, adapter: Adapter, lengths: list, batch: list) -> int:
        """The tokens one planned ``batch`` runs through the per-token layers: its real tokens when packed, its
        padded rows x length otherwise (K rows per input for label-conditioned methods)."""
        rows = adapter.rows_per_input
        if adapter.model.pack_inputs:
            return rows * sum(lengths[i] for i in batch)
        return rows * len(batch) * max(lengths[i] for i in batch)

    def shares(self, adapter: Adapter) -> bool:
        """Whether ``adapter``'s inputs join mixed batches (:mod:`ltuning.serving.shared_bank`)."""
        return self.shared is not None and adapter.name in self.shared

    def score_mixed(self, adapters: list, ids: list) -> list:
        """Scores of a mixed stream: ``adapters[i]`` (an :class:`Adapter`) scores ``ids[i]``; a list of (K_a,)
        float32 tensors in input order. The inputs of adapters that share the bank are planned together
        (token-budget batches over every row they score) and each batch runs the base once; the others run per
        adapter (:meth:`score_ids`)."""
        out = [None] * len(ids)
        own: dict = {}
        mixed = []
        for i, a in enumerate(adapters):
            (mixed if self.shares(a) else own.setdefault(a.name, [])).append(i)
        if len({adapters[i].name for i in mixed}) < 2:  # one adapter: its own batches
            for i in mixed:
                own.setdefault(adapters[i].name, []).append(i)
            mixed = []
        for name, ix in own.items():
            scores = self.score_ids(self.adapters[name], [ids[i] for i in ix])
            for i, s in zip(ix, scores):
                out[i] = s
        if mixed:
            rows = [self.shared.rows_of(adapters[i].name) for i in mixed]
            first = self.adapters[adapters[mixed[0]].name].model
            overhead = overhead_tokens_of(first.head.weight.device)
            batches = plan_batches([len(ids[i]) for i in mixed], self.max_batch_rows, overhead, rows,
                                   self.max_batch_tokens, ties="smaller", packed=self.shared.pack)
            with self.lock:
                for b in batches:
                    scores = self.shared.run([(adapters[mixed[j]].name, ids[mixed[j]]) for j in b],
                                             first.tokenizer.pad_token_id)
                    for j, s in zip(b, scores):
                        out[mixed[j]] = s
        return out

    def classify(self, records: list, adapter: str | None = None) -> list:
        """``[(prediction, {label: score})]`` for raw records (str or dict), input order."""
        a = self.adapter(adapter)
        recs = [{"text": r} if isinstance(r, str) else r for r in records]
        return self.format(a, self.score_ids(a, self.tokenize(recs, a)))

    @staticmethod
    def format(adapter: Adapter, scores: torch.Tensor) -> list:
        names = adapter.label_names
        return [(names[max(range(len(s)), key=s.__getitem__)], dict(zip(names, s))) for s in scores.tolist()]

    def warmup(self) -> None:
        """One small batch per adapter (builds kernels, fills the label-side caches)."""
        for a in self.adapters.values():
            self.score_ids(a, self.tokenize([{"text": "warm up"}], a))

    def describe(self) -> dict:
        return {"base_model": self.base_name, "dtype": self.dtype, "quantize": self.quantize,
                "threads": torch.get_num_threads(),
                "packed": sorted(n for n, a in self.adapters.items() if a.model.pack_inputs),
                "shared_bank": sorted(self.shared.members) if self.shared is not None else [],
                "adapters": {n: {**a.info, "max_length": a.max_length} for n, a in self.adapters.items()}}
