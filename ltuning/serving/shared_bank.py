"""Several prefix-family adapters in one batch: their banks side by side, each row indexing its own entry.

Adapters on one frozen base whose whole contribution is a prefix bank (per layer keys/values (N_a, Hkv, P_a, D),
:mod:`ltuning.methods.injection`) differ only in WHICH entry a row attends to and in the head that reads the row's
pooled state. So the banks of A adapters are concatenated ONCE at load into one bank per layer

    bank_k[l] = [K^1_l ; K^2_l ; ... ; K^A_l]   (N, Hkv, P, D),   N = sum_a N_a,   P = max_a P_a

(entries shorter than P zero-padded on the right and masked: ``lengths`` (N,) = each entry's real length), and a
mixed batch of R rows runs the frozen base ONCE with ``PrefixInputs(bank_k, bank_v, index, scales, lengths)``:
row r of adapter a, input b (and label k for label-conditioned K-pass adapters: K_a rows per input, entry
``offset_a + k``) attends to entry ``index[r] = offset_a + k`` (0 for one-entry adapters), with input positions
starting at ``start[index[r]]`` (0, or after the entry for ``position_offset="prefix"`` / decoder prompts). Then
each adapter's rows (contiguous in the batch) are pooled with the adapter's pooling and scored by its own head:

    s_{b,:} = W_a pool_a(h_b)                       (ordinary head, (B_a, K_a))
    s_{b,k} = C_a(pool_a(h_{b,k}))                  (label-conditioned K-pass, B_a x K_a rows -> (B_a, K_a))
    s_{b,k} = bilinear_a(pool_a(h_b), u^a_k)        (one-pass scoring: one packed entry, the label vectors u^a)

Attention per row only reads its own entry (the others get no probability), so every row's scores equal those of
its adapter's own batch (up to floating-point summation order in the matrix products).

Which adapters share (:func:`bank_of` returns None for the others; they run in batches of their own):
* kind ``"prefix"`` (prefix, apt, sk-prefix, lt-prefix K-pass or one-pass): the method's ``prefix()`` bank
  (one-pass: the packed label blocks of :func:`ltuning.methods.scoring.label_bank`);
* kind ``"prompt"`` where it runs as a prefix: decoders (prompt, sk-prompt, lt-prompt K-pass; the prompt bank
  prefilled once by :func:`ltuning.methods.injection.prompt_bank_kv`, input positions after the n prompt
  tokens), and one-pass lt-prompt on any model;
* APT's gates compose: its hooks compute alpha_i for every row of the batch from the hidden state entering layer
  i (a per-row function), and row r's scale in layer i is lambda_i alpha_i[r] for APT rows, 1 elsewhere
  ((R, P) per layer, built lazily as the layer runs).
Not shared: methods that change the base's layers (LoRA, FL, CGC-LoRA: kind ``"none"``, hooks), prompts
concatenated to an encoder's input (their input is longer: not a prefix), ``scoring="shared-input"`` (its bank is
the input's own K/V, computed per batch), multi-task adapters (task-masked heads). Everything adapter-side is
computed at load (:class:`SharedBank`); nothing but the input runs per batch (APT's gates excepted: they read
the input).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..data import collate
from ..inference import autocast
from ..methods import injection, scoring
from ..models import PrefixInputs
from ..models.packing import packed_last_hidden


@dataclass
class Bank:
    """One adapter's bank as a mixed batch uses it: per-layer ``keys`` / ``values`` (N_a, Hkv, P_a, D),
    ``lengths`` (N_a,) real entry lengths, ``start`` (N_a,) first input position of a row of each entry,
    ``rows`` per input (K_a for K-pass label-conditioned methods, else 1), ``onepass`` (bilinear label head) and
    ``bias`` optional (N_a, P_a) additive logits of its tokens (a merged one-pass bank: log multiplicities)."""
    keys: list
    values: list
    lengths: torch.Tensor
    start: torch.Tensor
    rows: int
    onepass: bool = False
    bias: torch.Tensor | None = None


def bank_of(model) -> Bank | None:
    """The bank of an ``LTuningModel`` for a mixed batch, computed now (call under the inference dtype's autocast
    and no grad), or None when the adapter cannot share (module docstring)."""
    m, cfg = model.method, model.config
    if model.task_names is not None or m.kind not in ("prefix", "prompt"):
        return None
    mode = scoring.check_scoring(cfg) if m.label_conditioned else "kpass"
    if mode == "shared-input":
        return None
    if mode == "onepass":
        keys, values, start, bias = scoring.label_bank(model)
        T = keys[0].shape[2]
        return Bank(keys, values, torch.tensor([T]), torch.tensor([start or 0]), 1, onepass=True, bias=bias)
    rows = scoring.rows_per_input(model)  # kpass here (onepass / shared-input handled above): K or 1
    if m.kind == "prefix":
        keys, values = m.prefix()
        N, P = keys[0].shape[0], keys[0].shape[2]
        lengths = m.prefix_lengths()
        lengths = torch.full((N,), P) if lengths is None else lengths.long().cpu()
        start = lengths.clone() if cfg.position_offset == "prefix" else torch.zeros(N, dtype=torch.long)
    elif model.prompt_as_prefix:
        prompts, pmask = m.prompts()
        keys, values, lengths = injection.prompt_bank_kv(model.base, prompts, pmask.to(prompts.device))
        N, n = prompts.shape[:2]
        lengths = torch.full((N,), n) if lengths is None else lengths.long().cpu()
        start = torch.full((N,), n)
    else:  # a prompt concatenated to an encoder's input
        return None
    if N != rows:
        return None
    return Bank(list(keys), list(values), lengths, start, rows)


class _MixedScales:
    """Indexable by layer: the (R, P) prefix scales of a mixed batch (1 everywhere, lambda_i alpha_i[r] on the
    rows of gated adapters: ``gated`` = [(method, row slice, P_a)]), built when layer i asks for it."""

    def __init__(self, R: int, P: int, gated: list, device, dtype):
        self.R, self.P, self.gated, self.device, self.dtype = R, P, gated, device, dtype

    def __getitem__(self, layer: int) -> torch.Tensor:
        s = torch.ones(self.R, self.P, device=self.device, dtype=self.dtype)
        for method, rows, P in self.gated:
            s[rows, :P] = method.prefix_scales()[layer][rows].to(self.dtype)
        return s


@dataclass
class Member:
    adapter: object    # the engine's Adapter
    offset: int        # its first entry in the shared bank
    bank: Bank
    gated: bool        # APT-like: per-row scales from its hooks


class SharedBank:
    """The concatenated bank of ``adapters`` (engine ``Adapter`` objects; those whose :func:`bank_of` is None are
    left out, ValueError if none is left), computed once under ``dtype``'s autocast and kept in the compute dtype
    (bf16 for ``"bf16"``, else fp32). ``hooks``: the engine's hook switch (a gated adapter's gate hooks are
    attached while a batch holding its rows runs). ``pack``: run each mixed batch packed
    (:mod:`ltuning.models.packing`; the engine decides, every member must allow it)."""

    def __init__(self, base, adapters: list, dtype: str, hooks, pack: bool = False):
        self.base, self.dtype, self.hooks, self.pack = base, dtype, hooks, pack
        self.members: dict = {}
        banks = []
        with torch.inference_mode(), autocast(dtype):
            for a in adapters:
                b = bank_of(a.model)
                if b is not None:
                    banks.append((a, b))
        if not banks:
            raise ValueError("no adapter can share a prefix bank")
        cdtype = torch.bfloat16 if dtype == "bf16" else torch.float32
        P = max(b.keys[0].shape[2] for _, b in banks)
        layers = len(banks[0][1].keys)
        keys, values, lengths, start = [[] for _ in range(layers)], [[] for _ in range(layers)], [], []
        offset = 0
        for a, b in banks:
            pad = P - b.keys[0].shape[2]
            for i in range(layers):
                keys[i].append(F.pad(b.keys[i].to(cdtype), (0, 0, 0, pad)))
                values[i].append(F.pad(b.values[i].to(cdtype), (0, 0, 0, pad)))
            lengths.append(b.lengths)
            start.append(b.start)
            self.members[a.name] = Member(a, offset, b, a.model.method.prefix_scales() is not None)
            offset += b.keys[0].shape[0]
        dev = base.get_input_embeddings().weight.device
        self.keys = [torch.cat(k).to(dev).contiguous() for k in keys]
        self.values = [torch.cat(v).to(dev).contiguous() for v in values]
        self.P = P
        lengths = torch.cat(lengths).long()
        self.lengths = None if bool((lengths == P).all()) else lengths.to(dev)
        self.start = torch.cat(start).long().to(dev)
        self.bias = None  # (N, P) float32 prefix_bias when some member has one (zero for the others' tokens)
        if any(b.bias is not None for _, b in banks):
            self.bias = torch.cat([F.pad(b.bias.float(), (0, P - b.keys[0].shape[2])) if b.bias is not None
                                   else torch.zeros(b.keys[0].shape[0], P) for _, b in banks]).to(dev)
        self.any_start = bool((self.start != 0).any())
        backends = {a.model.config.backend for a, _ in banks}
        self.backend = backends.pop() if len(backends) == 1 else "auto"

    def __contains__(self, name: str) -> bool:
        return name in self.members

    def rows_of(self, name: str) -> int:
        return self.members[name].bank.rows

    @torch.inference_mode()
    def run(self, items: list, pad_id: int) -> list:
        """One forward of a mixed batch: ``items`` [(adapter name, token ids)] -> scores (K_a,) float32 per item,
        in the order given."""
        rank = {name: k for k, name in enumerate(self.members)}
        order = sorted(range(len(items)), key=lambda i: rank[items[i][0]])  # each adapter's rows contiguous
        ids, index, spans = [], [], []  # spans: (member, first row, rows, item positions)
        r = 0
        j = 0
        while j < len(order):
            name = items[order[j]][0]
            mem = self.members[name]
            pos = []
            while j < len(order) and items[order[j]][0] == name:
                pos.append(order[j])
                j += 1
            k = mem.bank.rows
            for p in pos:
                ids += [items[p][1]] * k
                index += [mem.offset + e for e in range(k)] if k > 1 else [mem.offset]
            spans.append((mem, r, len(pos) * k, pos))
            r += len(pos) * k
        dev = self.keys[0].device
        batch = collate(ids, pad_id)
        input_ids, mask = batch["input_ids"].to(dev), batch["attention_mask"].to(dev).bool()
        index = torch.tensor(index, device=dev)
        R, L = input_ids.shape
        gated = []
        for mem, first, n, _ in spans:
            mem.adapter.model.method.begin_forward(input_ids, mask)
            if mem.gated:
                gated.append((mem.adapter.model.method, slice(first, first + n), mem.bank.keys[0].shape[2]))
        names = [mem.adapter.name for mem, *_ in spans if mem.gated]
        for name in names:
            self.hooks.attach(name)
        try:
            with autocast(self.dtype):
                # float32 gates whatever the compute dtype: the kernels apply them in their fp32 accumulation,
                # as the adapter's own batches do (rounding them to bf16 moved APT rows by ~3 % of the scores)
                scales = _MixedScales(R, self.P, gated, dev, torch.float32) if gated else None
                kwargs = {"ltuning_prefix": PrefixInputs(self.keys, self.values, index, scales, self.backend,
                                                         self.lengths, self.bias)}
                if self.any_start:
                    kwargs["position_ids"] = torch.arange(L, device=dev)[None] + self.start[index][:, None]
                if self.pack and not bool(mask.all()):
                    h = packed_last_hidden(self.base, input_ids, mask, **kwargs)
                else:
                    h = self.base(input_ids=input_ids, attention_mask=mask, use_cache=False,
                                  **kwargs).last_hidden_state
                out = [None] * len(items)
                for mem, first, n, pos in spans:
                    model = mem.adapter.model
                    rows = slice(first, first + n)
                    pooled = injection.pool(h[rows], mask[rows], mask[rows], 0, model.pooling).float()
                    if mem.bank.onepass:
                        with torch.autocast(dev.type, enabled=False):
                            s = model.head(pooled, scoring.label_vectors(model).to(device=dev, dtype=pooled.dtype))
                    else:
                        s = model.head_scores(pooled)
                        if mem.bank.rows > 1:
                            s = s.view(len(pos), mem.bank.rows)
                    for p, row in zip(pos, s.float().cpu()):
                        out[p] = row
        finally:
            for name in names:
                self.hooks.release(name)
        return out
