"""L-Tuning (Kowsher et al. 2024): prefixes and prompts derived from the label texts.

For each label k its text y_k is encoded ONCE by the frozen model (:mod:`.label_cache`):
h_k = M_frozen(y_k) in R^{l x d} (l = longest label text in tokens; shorter texts are padded).

``lt-prefix`` -- p_k = Z_psi(F_theta(h_k)) in R^{layers x l x 2 x kv_dim}; input x is run with prefix p_k.
  Our reading of F and Z (the paper leaves them open):
  * F_theta, self-attention pooling that keeps the l positions:
      a = softmax_t(h_k w) over real tokens,  F(h_k)_t = (n_k * a_t) * h_{k,t}
    (n_k real tokens; w is zero-initialised, so F starts as the identity on real tokens). Padding positions
    of shorter label texts are masked in attention (``mask_label_padding=True``, per-entry prefix lengths in
    the kernels): label k's prefix has n_k tokens, not l. Before that option they entered as Z(0), learned
    label-independent filler tokens; adapters saved then still load that way.
  * Z_psi, a per-token MLP: Linear(d, r) -> tanh -> Linear(r, layers * 2 * kv_dim): l prefix tokens per
    layer per label.
  ``variant="kv"`` (ours, for decoders): the frozen model's OWN per-layer keys/values of y_k, captured in the
  same single batched forward as h_k, are the prefix, adapted per layer like SK-Tuning's text cache:
      K'_{k,i} = K_{k,i} (I + dWk_i) + bk_i,  V'_{k,i} = V_{k,i} (I + dWv_i) + bv_i   (dW, b zero-initialised)
  so training starts from what the model computes on "[y_k ; x]" (use ``position_offset="prefix"``).
  F_theta/Z_psi collapse to the frozen layers' K/V maps; padding positions of shorter label texts are masked
  and the input's positions start right after its own label text, so scoring x against y_k is exactly the
  frozen model on "[y_k ; x]" at initialisation, whatever the label lengths (tested). Motivation: on a decoder an
  MLP-generated prefix moves K/V far from the model's own statistics, while the model's own K/V of a text keep
  them (``benchmarks/train_step/feature_probe.py``; figures in ``benchmarks/RESULTS.md``).
  ``variant="pooled"`` (ours, for one-pass scoring at large K): ONE prefix token per label and layer,
      p_k = Z_psi(sum_t a_t h_{k,t}),  a = softmax_t(h_k w) over real tokens (w zero-initialised: the mean),
  Z_psi the same per-token MLP as "pooling". The attention-pooled label vector replaces the l per-token rows, so
  the label side costs K rows instead of sum_k n_k (77 vs 967 on BANKING77 with MiniLM), in the generator and in
  every input token's attention over the one-pass bank. It drops the within-label token structure the paper's
  prefix keeps; how much that costs is measured (``benchmarks/RESULTS_scoring.md``); validation picked it,
  with label weights, for one-pass scoring on encoders, where it is the default.
  ``variant="published"`` follows the released code instead: every token squashed to one scalar
  s_t = h_{k,t} w, then Linear(l, l * layers * 2 * kv_dim) on the vector s.
``lt-prompt`` -- e(y_k) = G_omega(h_k) in R^{l x d} prepended to E(x). Our reading:
  G(h_k)_t = E(y_k)_t + MLP(h_{k,t}), MLP = Linear(d, r) -> tanh -> Linear(r, d) with the last layer
  zero-initialised, so training starts from the label text itself as a hard prompt (``residual=False``
  drops the E(y_k) term: plain G = MLP). Padding positions of the label texts are masked out.
  ``scale_to_embeddings=True`` (default) multiplies the MLP's output by s = rms(E(y_k)) over real tokens, so
  a learning rate moves the prompt by the same fraction of the embedding scale on every model. Without it
  the MLP's absolute steps swamp a decoder's small token embeddings within a few steps (lt-prompt then stays at
  chance on SmolLM2 at the default lr); BERT hides the problem because its embedding LayerNorm renormalises the
  prompt.

Both are label-conditioned: the head C_phi = Linear(d, 1) scores "is y_k the label of x" for every pair;
the prediction is the argmax over the K scores (the paper's inference rule, A.4).

Defaults and how they were chosen (figures: ``benchmarks/RESULTS.md`` and ``benchmarks/RESULTS_scoring.md``; the
selections: ``benchmarks/results/defaults_selection.json``). ``scoring`` / ``variant`` / ``label_weights`` by
family (:meth:`LTPrefix.resolve_defaults`): on encoders one-pass scoring with the ``"pooled"`` bank and label
weights, the reading that validation carved from train (pooled over SST-2, RTE and SNLI on MiniLM) chose over the
K-pass protocol and plain one-pass, confirmed leave-one-task-out; with ``scoring="kpass"`` the encoder variant
stays ``"pooling"`` (our reading of the paper's F/Z). On decoders the K-pass protocol with ``"kv"``: validation on
SmolLM2 keeps kpass against one-pass with and without label weights (confirmed over SST-2 and RTE).
``objective`` by family and scoring: with K-pass scoring on an encoder, lt-prefix trains the paper's ``"pairwise"``
objective (binary matched/unmatched, ``num_negatives`` sampled wrong labels per example, so a step runs
1 + num_negatives rows per input instead of K): validation on MiniLM prefers it to ``"listwise"`` for kpass (pooled
over CoLA, RTE, SNLI and SST-2, confirmed leave-one-task-out, RESULTS_scoring.md). Everywhere else ``"listwise"``
(cross-entropy over the K label-conditioned scores; the only objective one-pass and shared-input define): decoders
(validation on SmolLM2 keeps listwise over pairwise, confirmed over SST-2 and CoLA), lt-prompt, and the encoder
one-pass default, which validation prefers to both.
Choosing ``objective="pairwise"`` makes ``scoring`` default to kpass. ``"published"`` collapsed on a seed.
``"kv"`` on decoders and lt-prompt's ``scale_to_embeddings=True`` were first chosen by GLUE dev scores (SST-2, 500
training examples, 3 seeds); validation carved from train has since confirmed ``"kv"`` (below), while
scale_to_embeddings was not re-selected.
Label semantics matter on decoders: meaningless label texts ("The text is in class A/B.") lower the ``"kv"`` scores.
``label_template="curated"`` (hand-written texts for the GLUE / NLI label names, "The label of the text is NAME."
otherwise): validation on MiniLM (encoder default, pooled over SST-2, RTE, SNLI and MRPC) keeps it over "sentence"
and "name", confirmed; for unseen names "sentence" against "name" is a tie (not confirmed), so they keep "sentence".
On SmolLM2 (kpass, "kv"; SST-2 and CoLA) validation keeps "curated" too, confirmed, and confirms ``"kv"`` against
``"pooling"``; "sentence" over "name" there is not confirmed (kept).
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import ClassVar, Optional

import torch
from torch import nn

from .base import Method, MethodConfig, register_method
from .kv_maps import add_kv_maps, apply_kv_maps
from .label_cache import encode_texts
from .prefix_encoder import split_layers
from ..data import LABEL_TEMPLATES
from .scoring import check_scoring, pack_blocks


KPASS_WARN_LABELS = 8  # more labels than this with scoring="kpass": a UserWarning names the one-pass alternative


@dataclass
class LTConfig(MethodConfig):
    cli_help: ClassVar[dict] = {**MethodConfig.cli_help, 'encoder_hidden_size': 'hidden width r of the reparameterisation / label-transform MLP', 'objective': 'label-conditioned training objective: listwise (CE over K labels) or pairwise (paper; kpass only); default pairwise for lt-prefix kpass on encoders, else listwise', 'num_negatives': 'sampled wrong labels per example for the pairwise objective', 'scoring': 'lt-prefix / lt-prompt: kpass (one pass per label), onepass (all labels in one prefix, the input once) or shared-input (the input once, the label texts as suffixes); default kpass, except lt-prefix on encoders: onepass; see ltuning.methods.scoring', 'label_weights': 'onepass: add a free per-label vector to the bilinear label score (zero-initialised; labels added at inference get none); default on for lt-prefix onepass on encoders, else off', 'label_weight_scale': 'onepass with label weights: rsqrt-d (the label-weight term is LN(h).w_k / sqrt(d); default) or one (LN(h).w_k: a linear probe on the normalised state, learning sqrt(d) times faster in logit space)', 'label_template': 'label text of a label without --label-text: curated (hand-written sentences for the GLUE/NLI label names, else sentence; default), sentence ("The label of the text is NAME.") or name (the name itself)'}
    """``scoring``: "kpass" (one row per (input, label) pair, the paper's protocol), "onepass" (all K label
    blocks in one prefix, the input once, a bilinear label head) or "shared-input" (the input once, the label
    texts as suffixes attending to its K/V): see :mod:`.scoring`. None picks by family when the method is built
    (:meth:`LabelConditioned.resolve_defaults`): kpass on decoders, and on encoders kpass for lt-prompt, onepass
    for lt-prefix. Adapters without the key are kpass. ``label_weights`` (onepass only): the bilinear head gets a
    free per-label vector w_k, s_{b,k} += LN(h_b).w_k / sqrt(d) (:class:`.scoring.BilinearLabelHead`); None: on
    for lt-prefix's one-pass scoring on encoders, else off; adapters without the key load without it.
    ``label_weight_scale``: the factor on that term, "rsqrt-d" (1/sqrt(d), the default) or "one".
    ``label_template``: how a label without a given text gets one (:func:`ltuning.data.default_label_text`:
    "curated", "sentence" or "name"); the texts themselves are saved in ``label_texts``, the template is kept so
    that labels added at inference (``add_labels``) get texts of the same form. ``objective``: "listwise" or
    "pairwise" (K-pass only); None picks by family and scoring (:meth:`LabelConditioned.resolve_defaults`):
    pairwise for lt-prefix's K-pass scoring on encoders, else listwise; adapters without the key are listwise."""
    encoder_hidden_size: int = 512
    objective: Optional[str] = None
    num_negatives: int = 1
    scoring: Optional[str] = None
    label_weights: Optional[bool] = None
    label_weight_scale: str = "rsqrt-d"
    label_template: str = "curated"
    legacy_defaults: ClassVar[dict] = {"scoring": "kpass", "label_weights": False, "objective": "listwise"}


@dataclass
class LTPrefixConfig(LTConfig):
    cli_help: ClassVar[dict] = {**LTConfig.cli_help, 'variant': 'lt-prefix reading: kv (the label texts\' own K/V; default on decoders), pooling (default on encoders with kpass / shared-input), pooled (one prefix token per label: the attention-pooled label text; default on encoders with onepass) or published (the released code\'s)', 'mask_label_padding': 'lt-prefix: hide the padding of label texts of unequal token counts from attention', 'merge_label_tokens': 'lt-prefix onepass on decoders (variant kv): merge the label tokens that label texts share (exact; off only to compare)', 'bank_tokens': 'lt-prefix onepass on decoders (variant kv): all (every label token: the exact one-pass reading) or last (the tokens all label texts share + each label\'s last token: a smaller bank, ~K tokens; an approximation, see ltuning.methods.lt)'}
    """``variant``: "kv", "pooling", "pooled" or "published"; None picks by family and scoring ("kv" for decoders;
    on encoders "pooled" with one-pass scoring, else "pooling"). ``position_offset`` None: "prefix" for "kv" (the input continues after the label
    text), else "zero". Both are resolved into the config when the method is built (the adapter records them).
    ``mask_label_padding``: label texts of unequal token counts are right-padded to one length l; attention then
    sees only each label's real tokens (per-entry prefix lengths in the kernels) and, with position_offset
    "prefix", the input's positions start right after its own label text. Adapters saved before the option
    existed load with False (the pad positions stay visible, as they were trained). ``merge_label_tokens``
    (one-pass scoring, variant "kv" on decoders): the bank keeps each distinct label-text prefix token once, with
    logit + log(multiplicity) (:meth:`LTPrefix.dedup_index`); exact, so it is on for every adapter, old ones too;
    False only to measure what it saves. ``bank_tokens`` (one-pass scoring, variant "kv" on decoders): "all" (the
    default: every real label token, the exact one-pass reading) or "last" (the tokens every label text shares plus
    each label's last token, :meth:`LTPrefix.bank_index`): a bank of ~K tokens instead of the trie's ~4K."""
    variant: Optional[str] = None
    position_offset: Optional[str] = None
    mask_label_padding: bool = True
    merge_label_tokens: bool = True
    bank_tokens: str = "all"
    legacy_defaults: ClassVar[dict] = {**LTConfig.legacy_defaults, "mask_label_padding": False}


@dataclass
class LTPromptConfig(LTConfig):
    cli_help: ClassVar[dict] = {**LTConfig.cli_help, 'scale_to_embeddings': 'lt-prompt: scale the label MLP\'s output to the label embeddings\' rms', 'residual': 'lt-prompt: prompt = label embeddings + MLP (else the MLP alone)'}
    """``residual``: prompt = E(y_k) + MLP(h_k) (else MLP(h_k) alone); ``scale_to_embeddings``: the MLP's
    output is multiplied by the label embeddings' rms (see the module docstring). Adapters saved before the
    option existed load with ``scale_to_embeddings=False``, which is what they were trained with."""
    residual: bool = True
    scale_to_embeddings: bool = True
    legacy_defaults: ClassVar[dict] = {**LTConfig.legacy_defaults, "scale_to_embeddings": False}


class LabelConditioned(Method):
    """Holds the label cache (``label_hidden``, ``label_mask``, ``label_embeds`` buffers, saved with the adapter)."""
    label_conditioned = True
    uses_label_kv = False  # also cache the label texts' own per-layer K/V (lt-prefix variant "kv")

    encoder_scoring = "kpass"  # scoring left None on an encoder (resolve_defaults); decoders: always "kpass"
    encoder_kpass_objective = "listwise"  # objective left None with K-pass scoring on an encoder; else "listwise"

    @classmethod
    def resolve_defaults(cls, config, causal: bool) -> None:
        """Fill the options left None, by model family (in place; the adapter records the result): ``scoring``
        -> "kpass" on decoders and with the pairwise objective (a K-pass objective), else ``encoder_scoring``;
        ``label_weights`` -> True only for one-pass scoring on an encoder of a method whose encoder default is
        one-pass (the reading validation chose, see the module docstring), else False; ``objective`` ->
        ``encoder_kpass_objective`` with K-pass scoring on an encoder, else "listwise" (scoring is resolved first: an
        explicit pairwise objective makes it kpass, a None objective does not)."""
        if config.scoring is None:
            config.scoring = "kpass" if causal or config.objective == "pairwise" else cls.encoder_scoring
        if config.objective is None:
            config.objective = (cls.encoder_kpass_objective if not causal and config.scoring == "kpass"
                                else "listwise")
        if config.label_weights is None:
            config.label_weights = bool(not causal and config.scoring == "onepass" and cls.encoder_scoring == "onepass")

    def __init__(self, config, info, base, tokenizer, cache=None):
        self.resolve_defaults(config, info.causal)
        super().__init__(config, info, base, tokenizer, cache)
        if config.objective not in ("listwise", "pairwise"):
            raise ValueError(f"objective must be 'listwise' or 'pairwise', not {config.objective!r}")
        if config.label_template not in LABEL_TEMPLATES:
            raise ValueError(f"label_template must be one of {', '.join(LABEL_TEMPLATES)}, not "
                             f"{config.label_template!r}")
        check_scoring(config)
        K = len(config.label_names)
        if config.scoring == "kpass" and K > KPASS_WARN_LABELS:
            warnings.warn(f"{type(self).__name__} with scoring='kpass' runs every input once per label: {K} rows per "
                          f"example in classification (and in training with the listwise objective). At many labels "
                          f"use scoring='onepass' (with label_weights=True; CLI --scoring onepass --label-weights), "
                          f"which runs the input once (benchmarks/RESULTS_scoring.md)", UserWarning, stacklevel=3)
        self.load_cache(cache, base, tokenizer)

    def refresh_cache(self, base, tokenizer) -> None:
        res = encode_texts(base, tokenizer, self.config.resolved_label_texts(), with_kv=self.uses_label_kv)
        for name, t in zip(self.cache_keys(), res):
            old = getattr(self, name, None)  # a refresh (add_labels) keeps a cast model's dtype (.double(), bf16)
            if isinstance(old, torch.Tensor) and old.is_floating_point() and t.is_floating_point():
                t = t.to(old.dtype)
            self.register_buffer(name, t)

    def cache_keys(self) -> list:
        return ["label_hidden", "label_mask", "label_embeds"] + (["label_keys", "label_values"]
                                                                 if self.uses_label_kv else [])


@register_method("lt-prefix")
class LTPrefix(LabelConditioned):
    config_class = LTPrefixConfig
    kind = "prefix"

    encoder_scoring = "onepass"
    encoder_kpass_objective = "pairwise"  # validation's choice for kpass on MiniLM (module docstring)

    @classmethod
    def resolve_defaults(cls, config, causal: bool) -> None:
        """:meth:`LabelConditioned.resolve_defaults`, then ``variant`` -> "kv" on decoders; on encoders "pooled"
        with one-pass scoring, else "pooling"; ``position_offset`` -> "prefix" for "kv", else "zero"."""
        super().resolve_defaults(config, causal)
        if config.variant is None:
            config.variant = "kv" if causal else "pooled" if config.scoring == "onepass" else "pooling"
        if config.position_offset is None:
            config.position_offset = "prefix" if config.variant == "kv" else "zero"

    def __init__(self, config: LTPrefixConfig, info, base, tokenizer, cache=None):
        self.resolve_defaults(config, info.causal)
        bank_tokens = getattr(config, "bank_tokens", "all")
        if bank_tokens not in ("all", "last"):
            raise ValueError(f"bank_tokens must be 'all' or 'last', not {bank_tokens!r}")
        if bank_tokens == "last" and not (config.scoring == "onepass" and config.variant == "kv" and info.causal
                                          and config.mask_label_padding):
            raise ValueError("bank_tokens='last' needs scoring 'onepass' with variant 'kv' on a decoder (label "
                             f"padding masked); got scoring {config.scoring!r}, variant {config.variant!r} on "
                             f"{'a decoder' if info.causal else 'an encoder'} (encoders: variant 'pooled' is one "
                             "token per label)")
        shared_input = config.scoring == "shared-input"
        self.uses_label_kv = config.variant == "kv" and not shared_input
        super().__init__(config, info, base, tokenizer, cache)
        d, r, out = info.hidden_size, config.encoder_hidden_size, info.num_layers * 2 * info.kv_dim
        l = self.label_hidden.shape[1]
        if shared_input:  # label-side maps on the input's K/V (.scoring); no label prefix is generated
            add_kv_maps(self, info.num_layers, info.head_dim)
            return
        if config.variant != "kv":
            self.pool = nn.Linear(d, 1, bias=False)  # a bias is a constant shift: softmax and Z's bias absorb it
            nn.init.zeros_(self.pool.weight)
        if config.variant in ("pooling", "pooled"):
            self.transform = nn.Sequential(nn.Linear(d, r), nn.Tanh(), nn.Linear(r, out))
        elif config.variant == "published":
            nn.init.normal_(self.pool.weight, std=d ** -0.5)
            self.transform = nn.Linear(l, l * out)
        elif config.variant == "kv":
            add_kv_maps(self, info.num_layers, info.head_dim)
        else:
            raise ValueError(f"variant must be 'pooling', 'pooled', 'kv' or 'published', not {config.variant!r}")

    def label_token_attention(self) -> torch.Tensor:
        """(K, l): softmax_t(h_{k,t} w + b) over each label text's real tokens (0 on padding)."""
        return self.pool(self.label_hidden).squeeze(-1).masked_fill(~self.label_mask, float("-inf")).softmax(-1)

    def pooled_label_tokens(self) -> torch.Tensor:
        """F_theta(h): (K, l, d), real tokens re-weighted by n_k * softmax(h w + b), padding -> 0."""
        a = self.label_token_attention()
        return self.label_hidden * (a * self.label_mask.sum(-1, keepdim=True))[..., None]

    def pooled_label_vectors(self) -> torch.Tensor:
        """Variant "pooled": (K, d) = sum_t softmax_t(h_k w)_t h_{k,t} over each label text's real tokens."""
        return (self.label_hidden * self.label_token_attention()[..., None]).sum(1)

    def prefix_lengths(self):
        """(K,) token counts of the label texts when they differ (masked padding), else None (also for variant
        "pooled": one token per label). A constant of the label cache: worked out once per cache (no device sync
        per forward)."""
        if not self.config.mask_label_padding or self.config.variant == "pooled":
            return None
        m = self.label_mask
        key = (m.data_ptr(), m._version, m.device)
        if getattr(self, "_lengths_key", None) != key:
            self._lengths = None if bool(m.all()) else m.sum(-1)
            self._lengths_key = key
        return self._lengths

    def real_token_index(self):
        """(T,) flat indices into the K x l label positions of the real label tokens (label 1's, then label 2's,
        ...; T = sum_k n_k), or None when the generator must see every position (see :meth:`packed_prefix`). A
        constant of the label cache, worked out once per cache like :meth:`prefix_lengths`."""
        if self.config.variant == "published" or self.prefix_lengths() is None:
            return None
        m = self.label_mask
        key = (m.data_ptr(), m._version, m.device)
        if getattr(self, "_real_index_key", None) != key:
            self._real_index = m.reshape(-1).nonzero().squeeze(1)
            self._real_index_key = key
        return self._real_index

    def packed_prefix(self):
        """The one-pass bank (:mod:`.scoring`): per-layer lists of (1, Hkv, T, D) keys and values of the REAL label
        tokens only, label 1's n_1 tokens, then label 2's, ... (T = sum_k n_k). Equal in value to
        ``pack_blocks(*self.prefix(), self.prefix_lengths())`` but the generator runs on the T real tokens only,
        not on the K x l padded positions, and its backward writes no padded gradient:
          "pooling": Z(F(h)[real]) (T, layers * 2 * kv_dim), read as (T, layers, 2, Hkv, D), permuted once to
                     (layers * 2, 1, Hkv, T, D) (layer i's keys at 2i, values at 2i + 1) and split with one
                     ``unbind`` (per-layer indexing would make the backward add one full-size zero gradient per
                     layer and per K/V);
          "kv":      the label texts' own K/V (layers, K, Hkv, l, D) gathered to (layers, Hkv, T, D) first, then
                     the per-layer maps.
        ``variant="published"`` (its Linear mixes the l positions), ``mask_label_padding=False`` (the padding is
        part of the prefix) or label texts of equal token counts (no padding): ``pack_blocks`` of :meth:`prefix`."""
        idx = self.real_token_index()
        if idx is None:
            return pack_blocks(*self.prefix(), self.prefix_lengths())
        if self.config.variant == "kv":
            return self._kv_bank(idx)
        L, H, D = self.info.num_layers, self.info.num_kv_heads, self.info.head_dim
        F = self.pooled_label_tokens()  # (K, l, d)
        z = self.transform(F.reshape(-1, F.shape[-1]).index_select(0, idx))  # (T, layers * 2 * kv_dim)
        z = z.view(-1, L * 2, H, D).permute(1, 2, 0, 3).contiguous().unsqueeze(1)  # (layers * 2, 1, Hkv, T, D)
        kv = z.unbind(0)  # one unbind: its backward stacks the layers' gradients once
        return list(kv[0::2]), list(kv[1::2])

    def label_trie(self):
        """The trie of the label texts' tokens, ``(index, counts, ends)`` lists over its U nodes in label order: the
        flat K x l position of each node's first occurrence, how many label blocks hold it, how many labels END at
        it. Two positions are one node when their texts agree on every token up to and including it (tokens compared
        as embedding rows, exactly). A constant of the label cache, worked out once per cache."""
        m, e = self.label_mask, self.label_embeds
        key = (m.data_ptr(), m._version, e.data_ptr(), e._version, m.device)
        if getattr(self, "_trie_key", None) != key:
            K, l = m.shape
            _, tok = torch.unique(e.reshape(K * l, -1), dim=0, return_inverse=True)  # exact row equality
            tok, lens = tok.view(K, l).tolist(), m.sum(-1).tolist()
            nodes, index, counts, ends = {}, [], [], []
            for k in range(K):
                parent = -1
                for t in range(lens[k]):  # right-padded cache: a label's real tokens come first
                    node = nodes.setdefault((parent, tok[k][t]), len(index))
                    if node == len(index):
                        index.append(k * l + t)
                        counts.append(0)
                        ends.append(0)
                    counts[node] += 1
                    parent = node
                ends[parent] += 1
            self._trie = (index, counts, ends)
            self._trie_key = key
        return self._trie

    def _trie_applies(self) -> bool:
        return self.config.variant == "kv" and self.info.causal and self.config.mask_label_padding

    def dedup_index(self):
        """``(index, counts)`` of the one-pass bank's DISTINCT label tokens: (U,) flat indices into the K x l label
        positions (first occurrence, in label order) and (U,) how many label blocks hold each; None when nothing
        can be merged (``config.merge_label_tokens`` off, variant other than "kv", an encoder, no shared tokens).

        Why merging is exact: on a causal model with variant "kv" the bank token t of label k is the frozen model's
        K/V at position t given the label text's tokens 0..t, then the per-layer maps (token-wise). Two labels whose
        texts start with the same t + 1 token embeddings therefore carry identical K/V at positions 0..t (a trie of
        the label texts, :meth:`label_trie`: "The label of the text is ..." shares its first 6 tokens across
        BANKING77's 77 labels, 802 real tokens of which 299 are distinct on SmolLM2). Attention over m identical
        (key, value) tokens equals attention over one of them with its logit raised by log m (the kernels'
        ``prefix_bias``), and the kept token's gradient is the sum of the copies' gradients, so the scores and every
        gradient are unchanged. On an encoder every label token sees its whole text, and "pooling" / "published"
        re-weight tokens per label: nothing is merged there."""
        if not (getattr(self.config, "merge_label_tokens", True) and self._trie_applies()):
            return None
        def merged():
            index, counts, _ = self.label_trie()
            return (index, counts) if len(index) < sum(counts) else None
        return self._trie_tensors("all", merged)

    def last_token_index(self):
        """``bank_tokens="last"``: ``(index, counts)`` of a smaller one-pass bank, (V,) flat K x l positions and
        (V,) multiplicities: the trie nodes every label text holds (their common first tokens, "The label of the
        text is" on the default template; multiplicity K, as in the full bank) and each label's LAST real token
        (multiplicity: the labels ending there, 1 unless two texts are equal). Our reading, not exact: on a causal
        model label k's last token is the frozen model's K/V given the whole text y_k, its summary (the label
        vector u_k of the bilinear head is that token's hidden state too), so the input attends to K summaries
        instead of sum_k n_k tokens. Its cost: V = K + (common tokens) bank tokens (83 instead of 299 on SmolLM2
        BANKING77); what it costs in accuracy is measured (``benchmarks/RESULTS_scoring.md``)."""
        def common_and_last():
            index, counts, ends = self.label_trie()
            K = self.label_mask.shape[0]
            keep = [i for i in range(len(index)) if counts[i] == K or ends[i] > 0]
            return [index[i] for i in keep], [K if counts[i] == K else ends[i] for i in keep]
        return self._trie_tensors("last", common_and_last)

    def _trie_tensors(self, name: str, build):
        """``build()`` -> ``(index, counts)`` lists (or None) as two tensors on the label cache's device, made once
        per label trie (:meth:`label_trie`) and kept under ``name`` until the label cache changes."""
        self.label_trie()
        cache = self.__dict__.get("_trie_tensor_cache")
        if cache is None or cache["key"] != self._trie_key:
            cache = self.__dict__["_trie_tensor_cache"] = {"key": self._trie_key}
        if name not in cache:
            built, dev = build(), self.label_mask.device
            cache[name] = None if built is None else tuple(torch.tensor(x, device=dev) for x in built)
        return cache[name]

    def bank_index(self):
        """``(index, counts)`` of the one-pass bank's tokens on the K x l label grid with their multiplicities
        (:meth:`last_token_index` for ``bank_tokens="last"``, else :meth:`dedup_index`), or None for the packed
        real tokens (:meth:`packed_prefix`)."""
        if getattr(self.config, "bank_tokens", "all") == "last":
            return self.last_token_index()
        return self.dedup_index()

    def onepass_bank(self):
        """The one-pass bank as the kernels read it: ``(keys, values, bias)``, per-layer (1, Hkv, U, D) lists and
        bias (1, U) float32 (float64 for a float64 model) = log(multiplicity) of each token, or None. With
        :meth:`bank_index` its U label tokens (the distinct ones, or with ``bank_tokens="last"`` the common and
        last ones; their K/V through the maps); else :meth:`packed_prefix` (U = T real tokens) and no bias."""
        dedup = self.bank_index()
        if dedup is None:
            keys, values = self.packed_prefix()
            return keys, values, None
        idx, counts = dedup
        keys, values = self._kv_bank(idx)
        bias = counts.to(torch.float64 if keys[0].dtype == torch.float64 else torch.float32).log()[None]  # never a half
        return keys, values, bias

    def _kv_bank(self, idx: torch.Tensor):
        """Variant "kv": the label tokens at flat positions ``idx`` (U,) of the K x l label grid, gathered from the
        label texts' own K/V (layers, K, Hkv, l, D) to (layers, Hkv, U, D) BEFORE the per-layer maps (so the maps
        run on U tokens only), returned as per-layer lists of (1, Hkv, U, D) keys and values."""
        H, D = self.info.num_kv_heads, self.info.head_dim

        def gather(x):
            n, K, _, l, _ = x.shape
            return x.transpose(1, 2).reshape(n, H, K * l, D).index_select(2, idx)

        k, v = apply_kv_maps(self, gather(self.label_keys), gather(self.label_values))
        return list(k.unsqueeze(1).unbind(0)), list(v.unsqueeze(1).unbind(0))

    def prefix(self):
        if self.config.variant == "kv":
            k, v = apply_kv_maps(self, self.label_keys, self.label_values)
            return list(k.unbind(0)), list(v.unbind(0))
        if self.config.variant == "pooling":
            z = self.transform(self.pooled_label_tokens())
        elif self.config.variant == "pooled":
            z = self.transform(self.pooled_label_vectors())[:, None]  # (K, 1, layers * 2 * kv_dim)
        else:
            s = self.pool(self.label_hidden).squeeze(-1) * self.label_mask
            K, l = s.shape
            z = self.transform(s).view(K, l, -1)
        return split_layers(z, self.info)


@register_method("lt-prompt")
class LTPrompt(LabelConditioned):
    config_class = LTPromptConfig
    kind = "prompt"

    def __init__(self, config: LTPromptConfig, info, base, tokenizer, cache=None):
        super().__init__(config, info, base, tokenizer, cache)
        d, r = info.hidden_size, config.encoder_hidden_size
        self.transform = nn.Sequential(nn.Linear(d, r), nn.Tanh(), nn.Linear(r, d))
        if config.residual:
            nn.init.zeros_(self.transform[2].weight)
            nn.init.zeros_(self.transform[2].bias)

    def embedding_scale(self) -> torch.Tensor:
        """rms of the label texts' token embeddings over real tokens (a constant of the label cache)."""
        m = self.label_mask[..., None]
        return (self.label_embeds.pow(2) * m).sum().div(m.sum() * self.label_embeds.shape[-1]).sqrt()

    def prompts(self):
        e = self.transform(self.label_hidden)
        if self.config.scale_to_embeddings:
            e = e * self.embedding_scale()
        if self.config.residual:
            e = e + self.label_embeds
        return e, self.label_mask
