"""Label scoring whose cost does not grow with K: ``scoring="kpass" | "onepass" | "shared-input"`` (issue 20).

Label-conditioned methods (``lt-prefix``, ``lt-prompt``) score every (input, label) pair. Notation: B inputs x_b
of L tokens (right-padded, n_b real), K labels, label k's text y_k has n_k tokens (right-padded to l = max n_k),
d = hidden size, layers of Hkv key/value heads of size D.

``kpass`` (the paper's protocol and the default on decoders, ``LTuningModel.forward``; encoders default to
``onepass`` for lt-prefix, :meth:`ltuning.methods.lt.LTPrefix.resolve_defaults`): B x K rows ``[p_k ; x_b]``, one per pair,
  s_{b,k} = C(pool(M(x_b; p_k))). Cost: B x K x L tokens through every layer, forward and backward.

``onepass``: the prefix holds ALL K label blocks at once and the input runs ONCE, B x L tokens:
      bank   = [p_1[:n_1] ; p_2[:n_2] ; ... ; p_K[:n_K]]     one bank entry, T = sum_k n_k tokens per layer
      h_b    = pool(M(x_b; bank))                           (B, d)
      u_k    = pool(M_frozen(y_k))                          (K, d), from the label cache (no extra forward)
      s_{b,k} = tau (LN(h_b) (I + A/sqrt(d))) . (LN(u_k) (I + C/sqrt(d))) / d
                                                             A, C (d, d) zero-initialised, LN without weights
  (:class:`BilinearLabelHead`, the model's ``head``). Each label block is p_k exactly as the K-pass protocol
  builds it (lt-prefix: the method's per-label K/V; lt-prompt: the K/V the frozen model computes on the label
  prompt e(y_k), each prompt run on its own), packed without its padding (:func:`label_bank`; lt-prefix's
  ``packed_prefix()`` runs its generator on the T real label tokens only, not on the K x l padded positions).
  Position layout ("parallel blocks"): every block keeps the positions it was computed with, 0..n_k-1 (RoPE is
  applied to K before the cache; block k never sees block j), and the input starts at l = max_k n_k
  (lt-prefix with position_offset "zero": at 0). Why: (1) each block is then exactly the K/V the frozen model
  computes for y_k alone, so nothing is re-encoded when labels are added; (2) the blocks are interchangeable:
  attention over a set of blocks at equal positions is invariant to their order, so s_{b,k} does not depend on
  where label k sits in the bank (a sequential layout would put label 77 at distance ~600 and label 1 at ~8 and
  exceed BERT's 512 positions at K = 77). Cost: the matmuls of B x L tokens (the dominant term) do not grow with
  K; attention over T = sum n_k bank tokens does (B x L x T per layer, ~800 bank tokens at K = 77 on SmolLM2).
  Shared label tokens are merged where they are equal by construction (decoders, variant "kv": labels whose
  texts start alike have equal K/V over their common first tokens): one token with logit + log(multiplicity)
  attends exactly as its copies (``LTPrefix.dedup_index``; 802 -> 299 bank tokens on SmolLM2 BANKING77).
  ``bank_tokens="last"`` (lt-prefix, variant "kv" on decoders; an approximation, ``LTPrefix.last_token_index``)
  keeps only the tokens every label text shares and each label's last token, the causal summary of its text
  (83 bank tokens on SmolLM2 BANKING77), for large K where the bank's attention is a visible share of the forward.
  (:class:`BilinearLabelHead`: a dual-encoder metric that starts as the correlation of the two states.)
  Trainable: the method's label-side generator (as in kpass) + A, C, tau (+ one free vector w_k per label with
  ``label_weights``: s_{b,k} += LN(h_b).w_k / sqrt(d)). A label is added at inference by encoding its text
  (:meth:`ltuning.model.LTuningModel.add_labels`): its block joins the bank and its u_k the score, no retraining
  (nothing else in the model is per-label: with ``label_weights`` the new label gets w_k = 0;
  ``variant="published"`` excepted when l grows).
  Encoders: the input attends to all label blocks bidirectionally, the blocks do not see the input (they are a
  prefix); as in kpass lt-prefix on encoders.

``shared-input`` (cascade, after Hydragen / FlashInfer cascade attention): the input runs once, alone, and its
  per-layer K/V become the SHARED bank: N = B entries (one per input, right-padded, per-entry lengths n_b);
  then the K label texts run as suffixes, B x K rows ``[x_b ; y_k]``: row (b, k) attends to bank entry b
  (index = row -> input, never expanded per row) and causally to its own tokens, with positions n_b .. n_b+n_k-1
  (per row: inputs differ in length):
      s_{b,k} = C(pool_suffix(M([x_b ; y_k])))   pool: last real suffix token (decoders), mean of its real
                                                  tokens (encoders), C the usual Linear(d, 1) head
  What is trainable, and why the backward never enters the input pass: the input's forward runs under no_grad
  (nothing trainable sits before or inside it). lt-prefix: label-side per-layer near-identity maps on the
  input's K/V as the label suffix reads them, K' = K (I + dWk) + bk, V' = V (I + dWv) + bv (zero-initialised,
  so training starts from the frozen model on [x ; y_k]); the suffix is the label text's frozen embeddings.
  Their gradient comes from the bank gradient, reduced over the K rows per input inside the attention kernel.
  lt-prompt: the suffix is the trainable label prompt e(y_k) = E(y_k) + MLP(h_k) (starts as the label text).
  Cost: B x L + B x K x n tokens forward, only the B x K x n suffix tokens backward. Encoders: a one-directional
  cascade: the input tokens do not see the label (unlike a concatenated encoder input), the label sees the input.

Only the ``listwise`` objective (cross-entropy over the K scores) is defined for onepass / shared-input.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ..models import PrefixInputs, capture_kv
from .injection import prompt_bank_kv, run_base
from .kv_maps import apply_kv_maps

SCORINGS = ("kpass", "onepass", "shared-input")
LABEL_WEIGHT_SCALES = ("rsqrt-d", "one")


def check_scoring(config) -> str:
    """The config's scoring mode, validated (``kpass`` when the config has none)."""
    scoring = getattr(config, "scoring", "kpass")
    if scoring not in SCORINGS:
        raise ValueError(f"scoring must be one of {', '.join(SCORINGS)}; got {scoring!r}")
    if scoring != "kpass" and getattr(config, "objective", "listwise") != "listwise":
        raise ValueError(f"scoring {scoring!r} needs objective 'listwise' (got {config.objective!r})")
    if getattr(config, "label_weights", False) and scoring != "onepass":
        raise ValueError(f"label_weights applies to scoring 'onepass' only (got scoring {scoring!r})")
    lws = getattr(config, "label_weight_scale", "rsqrt-d")
    if lws not in LABEL_WEIGHT_SCALES:
        raise ValueError(f"label_weight_scale must be one of {LABEL_WEIGHT_SCALES}, not {lws!r}")
    if lws != "rsqrt-d" and getattr(config, "label_weights", None) is False:
        raise ValueError(f"label_weight_scale {lws!r} scales the label weights: it needs label_weights on (onepass)")
    return scoring


def rows_per_input(model) -> int:
    """Rows of the model's forward per input, what a batch planner budgets: K for K-pass label conditioning
    (B x K rows ``[p_k ; x_b]``) and for shared-input (B x K suffix rows, besides the B input rows); 1 for one-pass
    (the input runs once whatever K) and for methods with an ordinary head."""
    if not model.method.label_conditioned or check_scoring(model.config) == "onepass":
        return 1
    return len(model.label_names)


class BilinearLabelHead(nn.Module):
    """s_{b,k} = tau * (h'_b (I + A / sqrt(d))) . (u'_k (I + C / sqrt(d))) / d, h' = LN(h), u' = LN(u) (no
    weights): h (B, d) pooled inputs, u (K, d) label encodings -> (B, K).

    A, C (d, d) start at zero, so the head starts as tau x the correlation of the input's and the label text's
    states (a dual-encoder prior that holds for a label never trained on) and learns a metric in which both
    sides stay in the same space; a bilinear map with a free label-side projection fits the trained labels but
    scores an unseen label at chance (nothing ties its projection to the trained ones). The 1/sqrt(d)
    keeps Adam's per-entry steps from swamping the identity at the head's learning rate. tau = exp(log_tau),
    log_tau starts at log 10.

    ``n_label_weights`` = K > 0 (``config.label_weights``) adds a free, zero-initialised per-label vector w_k:
    s_{b,k} += h'_b . w_k / sqrt(d) (``label_weight_scale="one"``: h'_b . w_k), a linear probe's term on top of the
    shared metric. It gives the trained labels
    what a probe learns beyond their texts (at K = 77 intents the label texts alone under-separate); a label added
    at inference gets w_k = 0 and is scored by the shared metric alone, as without the option."""

    def __init__(self, d: int, n_label_weights: int = 0, label_weight_scale: str = "rsqrt-d"):
        super().__init__()
        if label_weight_scale not in LABEL_WEIGHT_SCALES:
            raise ValueError(f"label_weight_scale must be one of {LABEL_WEIGHT_SCALES}, not {label_weight_scale!r}")
        # the factor on the label-weight term: 1/sqrt(d) (the default) or 1 (a probe on LN(h))
        self.label_weight_scale = d ** -0.5 if label_weight_scale == "rsqrt-d" else 1.0
        self.query_delta = nn.Parameter(torch.zeros(d, d))
        self.key_delta = nn.Parameter(torch.zeros(d, d))
        self.log_tau = nn.Parameter(torch.tensor(math.log(10.0)))
        # (K, d) free per-label vectors (config.label_weights), or None
        self.label_weight = nn.Parameter(torch.zeros(n_label_weights, d)) if n_label_weights else None
        self.d = d
        self.no_weight_decay = ("log_tau",)

    def add_label_rows(self, n: int) -> None:
        """Labels added at inference: n zero rows of ``label_weight`` (their score is the shared metric alone)."""
        if self.label_weight is not None and n > 0:
            w = self.label_weight.data
            self.label_weight = nn.Parameter(torch.cat([w, w.new_zeros(n, self.d)]),
                                             requires_grad=self.label_weight.requires_grad)

    @property
    def weight(self) -> torch.Tensor:  # the model's device is read from ``head.weight``
        return self.query_delta

    def forward(self, h: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
        if h.dim() != 2 or u.dim() != 2 or h.shape[1] != self.d or u.shape[1] != self.d:
            raise ValueError(f"h must be (B, d={self.d}) and u (K, d={self.d}); got {tuple(h.shape)}, "
                             f"{tuple(u.shape)}")
        r = self.d ** -0.5
        hn, un = F.layer_norm(h, h.shape[-1:]), F.layer_norm(u, u.shape[-1:])
        q = hn + hn @ self.query_delta * r
        k = un + un @ self.key_delta * r
        s = self.log_tau.exp() * (q @ k.T) / self.d
        if self.label_weight is None:
            return s
        if self.label_weight.shape[0] != u.shape[0]:
            raise ValueError(f"u has {u.shape[0]} labels but the head's label_weight {self.label_weight.shape[0]}")
        return s + hn @ self.label_weight.T * self.label_weight_scale


def make_head(config, info, n_out: int) -> nn.Module:
    """The model's head: the bilinear label head for onepass, else ``Linear(d, n_out)`` (as before)."""
    if check_scoring(config) == "onepass":
        return BilinearLabelHead(info.hidden_size, len(config.label_names) if config.label_weights else 0,
                                 getattr(config, "label_weight_scale", "rsqrt-d"))
    return nn.Linear(info.hidden_size, n_out)


def _fp32_at_least(x: torch.Tensor) -> torch.Tensor:
    """x in fp32, or float64 if it is float64 (scores and losses never run in a half type)."""
    return x if x.dtype == torch.float64 else x.float()


def pool_rows(h, mask, pooling: str) -> torch.Tensor:
    """Pooled (R, d) of hidden states h (R, n, d) over right-padded rows with real-token mask (R, n)."""
    if pooling == "last":
        return h[torch.arange(h.shape[0], device=h.device), mask.long().sum(-1).clamp_min(1) - 1]
    if pooling == "cls":
        return h[:, 0]
    m = mask.to(h.dtype)[..., None]
    return (h * m).sum(1) / m.sum(1).clamp_min(1)


def label_vectors(model) -> torch.Tensor:
    """u (K, d) fp32: the frozen model's pooled encoding of each label text (label cache)."""
    m = model.method
    return pool_rows(_fp32_at_least(m.label_hidden), m.label_mask, model.pooling)


def pack_blocks(keys, values, lengths):
    """Per-layer (K, Hkv, l, D) label blocks -> per-layer (1, Hkv, T, D), T = sum of ``lengths`` (K,) (None: all
    l): the real tokens of block 1, then block 2, ... (a differentiable gather)."""
    K, H, P, D = keys[0].shape
    dev = keys[0].device
    if lengths is None:
        idx = torch.arange(K * P, device=dev)
    else:
        lens = lengths.long().to(dev)
        if lens.shape != (K,) or bool((lens < 1).any()) or bool((lens > P).any()):
            raise ValueError(f"label block lengths must be (K={K},) in [1, {P}]; got {lengths.tolist()}")
        j = torch.arange(P, device=dev)
        idx = (torch.arange(K, device=dev)[:, None] * P + j[None])[j[None] < lens[:, None]]

    def pack(x):
        return x.transpose(0, 1).reshape(H, K * P, D).index_select(1, idx)[None]

    return [pack(k) for k in keys], [pack(v) for v in values]


def label_blocks(model):
    """The K label blocks as the K-pass protocol builds them: ``(keys, values, lengths, start)``, per-layer
    (K, Hkv, l, D) lists, lengths (K,) or None, ``start`` the input's first position (None: default positions)."""
    m = model.method
    if m.kind == "prefix":
        keys, values = m.prefix()
        lengths = m.prefix_lengths()
        P = keys[0].shape[2]
        start = P if model.config.position_offset == "prefix" else None  # P = l = max_k n_k
        return keys, values, lengths, start
    prompts, pmask = m.prompts()
    keys, values, lengths = prompt_bank_kv(model.base, prompts, pmask)
    return keys, values, lengths, prompts.shape[1]


def label_bank(model):
    """The one-pass bank, ``(keys, values, start, bias)``: per-layer (1, Hkv, T, D) lists, the K label blocks of
    :func:`label_blocks` without their padding (``pack_blocks``), ``start`` as there, ``bias`` (1, T) float32
    kernel ``prefix_bias`` or None. lt-prefix builds it with its ``onepass_bank()``: the generator on the
    T = sum_k n_k real label tokens only (``packed_prefix()``, equal in value), or, where label tokens are equal
    by construction (variant "kv" on decoders: labels sharing their first tokens), on the U < T distinct ones with
    bias log(multiplicity), which attends exactly as the T tokens (``LTPrefix.dedup_index``). lt-prompt packs the
    blocks of :func:`label_blocks`."""
    m = model.method
    if m.kind == "prefix" and hasattr(m, "onepass_bank"):
        keys, values, bias = m.onepass_bank()
        l = m.label_mask.shape[1]  # = the P of label_blocks: the longest label text
        return keys, values, (l if model.config.position_offset == "prefix" else None), bias
    keys, values, lengths, start = label_blocks(model)
    keys, values = pack_blocks(keys, values, lengths)
    return keys, values, start, None


def onepass_scores(model, input_ids, attention_mask) -> torch.Tensor:
    """(B, K) scores of the one-pass reading (module docstring)."""
    B, L = input_ids.shape
    dev = input_ids.device
    mask = attention_mask.to(dev).bool()
    model.method.begin_forward(input_ids, mask)
    # label-side only: built once per adapter state while inferring (LTuningModel.inference_cached)
    pk, pv, start, bias = model.inference_cached("onepass_bank", lambda: label_bank(model))
    kwargs = {"ltuning_prefix": PrefixInputs(pk, pv, torch.zeros(B, dtype=torch.long, device=dev), None,
                                             model.config.backend, None, bias)}
    if start is not None:
        kwargs["position_ids"] = torch.arange(L, device=dev)[None].expand(B, L) + start
    h = run_base(model, input_ids, mask, **kwargs)
    pooled = _fp32_at_least(pool_rows(h, mask, model.pooling))
    with torch.autocast(dev.type, enabled=False):
        return model.head(pooled, label_vectors(model).to(device=dev, dtype=pooled.dtype))


def input_kv(model, input_ids, mask):
    """The input's own per-layer K/V (layers, B, Hkv, L, D) each, from one no-grad forward (positions 0..L-1)."""
    with torch.no_grad():
        kv = capture_kv(model.base, input_ids=input_ids, attention_mask=mask)
    return torch.stack([k for k, _ in kv]), torch.stack([v for _, v in kv])


def shared_input_scores(model, input_ids, attention_mask) -> torch.Tensor:
    """(B, K) scores of the shared-input (cascade) reading (module docstring)."""
    m = model.method
    B, L = input_ids.shape
    dev = input_ids.device
    mask = attention_mask.to(dev).bool()
    m.begin_forward(input_ids, mask)
    keys, values = input_kv(model, input_ids, mask)
    if m.kind == "prefix":  # lt-prefix: label-side maps on the input's K/V, the frozen label text as suffix
        keys, values = apply_kv_maps(m, _fp32_at_least(keys), _fp32_at_least(values))
        suffix = m.label_embeds
    else:  # lt-prompt: the trainable label prompt as suffix
        suffix, _ = m.prompts()
    smask = m.label_mask.to(dev)
    K, n = smask.shape
    index = torch.arange(B, device=dev).repeat_interleave(K)  # row b*K + k -> input b
    in_len = mask.long().sum(-1)
    positions = in_len[index][:, None] + torch.arange(n, device=dev)[None]
    prefix = PrefixInputs(list(keys.unbind(0)), list(values.unbind(0)), index, None, model.config.backend,
                          None if bool(mask.all()) else in_len)
    emb = suffix.to(model.base.get_input_embeddings().weight.dtype).repeat(B, 1, 1)
    rmask = smask.repeat(B, 1)
    h = model.base(inputs_embeds=emb, attention_mask=rmask, position_ids=positions, use_cache=False,
                   ltuning_prefix=prefix).last_hidden_state
    pooled = _fp32_at_least(pool_rows(h, rmask, model.pooling))
    with torch.autocast(dev.type, enabled=False):
        return model.head(pooled).view(B, K)


def scores(model, input_ids, attention_mask, **batch) -> torch.Tensor:
    """(B, K) scores of ``model`` under its config's non-kpass scoring mode."""
    scoring = check_scoring(model.config)
    if batch:
        raise ValueError(f"scoring {scoring!r} takes no extra per-row inputs; got {sorted(batch)}")
    if input_ids.dim() != 2 or attention_mask.shape != input_ids.shape:
        raise ValueError(f"input_ids and attention_mask must both be (B, L); got {tuple(input_ids.shape)}, "
                         f"{tuple(attention_mask.shape)}")
    if scoring == "onepass":
        return onepass_scores(model, input_ids, attention_mask)
    return shared_input_scores(model, input_ids, attention_mask)


def add_labels(model, names, texts=None) -> None:
    """Append classes ``names`` (texts default to :func:`ltuning.data.default_label_text` under the adapter's
    ``label_template``) to a label-conditioned
    ``model``: one frozen forward re-encodes the label cache with the new texts; scores gain K' columns. Every
    trainable of lt-prefix / lt-prompt is shared by the labels, so a new label is scored with what was learned
    for the others (lt-prefix ``variant="published"`` maps l tokens, so it refuses texts longer than the
    longest label text it was trained with)."""
    from ..data import default_label_text
    m = model.method
    if not m.label_conditioned:
        raise TypeError(f"method {model.config.method!r} has a fixed classification head: labels cannot be added")
    names = [str(n) for n in names]
    texts = (list(texts) if texts is not None
             else [default_label_text(n, model.config.label_template) for n in names])
    old = list(model.config.label_names)
    clash = sorted(set(names) & set(old)) or sorted({n for n in names if names.count(n) > 1})
    if not names or len(texts) != len(names) or clash:
        raise ValueError(f"add_labels needs new, distinct names and one text per name; got names {names} "
                         f"(already labels or repeated: {clash}), {len(texts)} texts")
    old_texts = model.config.resolved_label_texts()
    l_old = m.label_hidden.shape[1]
    model.config.label_names = old + names
    model.config.label_texts = old_texts + texts
    try:
        m.refresh_cache(model.base, model.tokenizer)
        if getattr(model.config, "variant", None) == "published" and m.label_hidden.shape[1] != l_old:
            raise ValueError("lt-prefix variant 'published' maps exactly l label tokens: the new label texts "
                             f"must not be longer than {l_old} tokens")
    except Exception:
        model.config.label_names, model.config.label_texts = old, old_texts
        m.refresh_cache(model.base, model.tokenizer)
        raise
    if isinstance(model.head, BilinearLabelHead):
        model.head.add_label_rows(len(names))
