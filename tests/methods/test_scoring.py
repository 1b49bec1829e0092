"""Issue 20: ``scoring="onepass"`` and ``"shared-input"`` (ltuning/methods/scoring.py) pinned in float64 against materialised
references, forward and backward; save/load; the CLI; a label added at inference."""
from __future__ import annotations

import json
import os
import random
import zlib

import pytest
import torch

import ltuning
from ltuning.models import PrefixInputs
from ltuning.models.families import model_info
from ltuning.methods.scoring import BilinearLabelHead, check_scoring, label_bank

from method_helpers import tiny_base
from conftest import shared_data
from testutil import rel_err

TEXTS3 = ["The sentiment is negative.", "The sentiment of the text is clearly positive.", "Neutral."]
NAMES3 = ["negative", "positive", "neutral"]
XS = ["a gripping film", "dull and far too long for what it is", "ok"]


def seed_of(request) -> int:
    s = zlib.crc32(request.node.nodeid.encode())
    print(f"seed {s} ({request.node.nodeid})")
    return s


@pytest.fixture(params=["decoder", "encoder"])
def tiny(request):
    if request.param == "decoder":
        tok = request.getfixturevalue("smollm")[1]
    else:
        tok = request.getfixturevalue("minilm")[1]
    return tiny_base(request.param, tok).double(), tok


def build(base, tok, method, scoring, seed, **kw):
    """A float64 model of ``method`` with ``scoring``, every trainable moved off its initialisation. One-pass
    lt-prefix on an encoder keeps the per-token ``pooling`` bank and no label weights unless ``kw`` says otherwise
    (the encoder default is the pooled bank with label weights; each has tests of its own below)."""
    if scoring == "onepass":
        kw.setdefault("label_weights", False)
        if method == "lt-prefix" and not model_info(base).causal:
            kw.setdefault("variant", "pooling")
    m = ltuning.patch(base, ltuning.make_config(method, label_names=NAMES3, label_texts=TEXTS3, scoring=scoring,
                                                encoder_hidden_size=16, **kw), tok)
    m.double()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():  # every trainable away from its (often zero / identity) initialisation
        for p in m.trainable_parameters():
            p.add_(torch.randn(p.shape, generator=g, dtype=p.dtype) * 0.3)
    return m


def grads(m, s, w):
    m.zero_grad()
    (s * w).sum().backward()
    return [p.grad.clone() if p.grad is not None else torch.zeros_like(p) for p in m.trainable_parameters()]


def inputs(tok):
    x = tok(XS, padding=True, return_tensors="pt")
    return x["input_ids"], x["attention_mask"]


def reference_onepass_scores(m, ids, mask, bank_k, bank_v, start):
    """(B, K) one-pass scores from the float64 reference attention over ONE materialised bank entry (per-layer
    (1, Hkv, P, D) lists), the input's positions starting at ``start``, then the bilinear head on u_k (the frozen
    model's pooled encoding of each label text)."""
    B, T = ids.shape
    pos = torch.arange(T)[None].expand(B, T) + start
    out = m.base(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=False,
                 ltuning_prefix=PrefixInputs(bank_k, bank_v, torch.zeros(B, dtype=torch.long), None, "reference"))
    h = out.last_hidden_state
    if m.pooling == "last":
        pooled = h[torch.arange(B), mask.sum(-1) - 1]
    else:
        pooled = (h * mask[..., None]).sum(1) / mask.sum(1, keepdim=True)
    hid, lens = m.method.label_hidden, m.method.label_mask.sum(-1).tolist()
    u = torch.stack([hid[i, n - 1] if m.pooling == "last" else hid[i, :n].mean(0) for i, n in enumerate(lens)])
    return m.head(pooled, u)


@pytest.mark.parametrize("method", ["lt-prefix", "lt-prompt"])
def test_onepass_equals_reference_on_materialised_label_blocks(tiny, method, request):
    """One pass of the input over ONE bank entry [p_1[:n_1]; ...; p_K[:n_K]] (packed in-kernel path) equals the
    float64 reference attention on that concatenation built label by label (each lt-prompt block prefilled on
    its own, unpadded), then the bilinear head on u_k; scores and every trainable's gradient."""
    base, tok = tiny
    seed = seed_of(request)
    m = build(base, tok, method, "onepass", seed)
    try:
        ids, mask = inputs(tok)
        s = m(ids, mask)
        w = torch.randn(s.shape, generator=torch.Generator().manual_seed(seed + 1), dtype=s.dtype)
        g = grads(m, s, w)
        meth, lens = m.method, m.method.label_mask.sum(-1).tolist()
        assert len(set(lens)) > 1  # unequal label lengths: padding must be dropped from the bank
        if method == "lt-prefix":
            keys, values = meth.prefix()
            blocks = [([k[i, :, :n] for k in keys], [v[i, :, :n] for v in values]) for i, n in enumerate(lens)]
            start = max(lens) if m.config.position_offset == "prefix" else 0
        else:
            e, _ = meth.prompts()
            blocks = []
            for i, n in enumerate(lens):
                cap = {}
                base(inputs_embeds=e[i:i + 1, :n], use_cache=False, ltuning_capture=cap)
                blocks.append(([cap[j][0][0] for j in sorted(cap)], [cap[j][1][0] for j in sorted(cap)]))
            start = e.shape[1]
        L = len(blocks[0][0])
        bank_k = [torch.cat([b[0][j] for b in blocks], 1)[None] for j in range(L)]
        bank_v = [torch.cat([b[1][j] for b in blocks], 1)[None] for j in range(L)]
        assert bank_k[0].shape[2] == sum(lens)
        ref = reference_onepass_scores(m, ids, mask, bank_k, bank_v, start)
        g_ref = grads(m, ref, w)
        assert s.dtype == torch.float64
        assert rel_err(s, ref) < 1e-10, rel_err(s, ref)
        for a, b in zip(g, g_ref):
            assert rel_err(a, b) < 1e-9
        assert any(a.abs().sum() > 0 for a in g[:-3])  # the label-side generator gets a gradient too
    finally:
        ltuning.unpatch(m)


def test_pooled_variant_is_one_token_per_label(tiny, request):
    """lt-prefix ``variant="pooled"``, one-pass: the bank is K tokens per layer, token k = Z(sum_t a_t h_{k,t}) with
    a = softmax over label k's REAL tokens of h_k w (built here in plain torch from the label cache), and the
    scores and every trainable's gradient equal the float64 reference over that materialised bank (float64, random
    generator and pooling weights, label texts of unequal token counts)."""
    base, tok = tiny
    seed = seed_of(request)
    m = build(base, tok, "lt-prefix", "onepass", seed, variant="pooled")
    try:
        ids, mask = inputs(tok)
        s = m(ids, mask)
        w = torch.randn(s.shape, generator=torch.Generator().manual_seed(seed + 1), dtype=s.dtype)
        g = grads(m, s, w)
        meth, info = m.method, m.info
        hid, lens = meth.label_hidden, meth.label_mask.sum(-1).tolist()
        assert len(set(lens)) > 1 and meth.prefix_lengths() is None
        vecs = []
        for k, n in enumerate(lens):
            a = torch.softmax(hid[k, :n] @ meth.pool.weight[0], 0)
            vecs.append((a[:, None] * hid[k, :n]).sum(0))
        K, L, H, D = len(lens), info.num_layers, info.num_kv_heads, info.head_dim
        z = meth.transform(torch.stack(vecs)).view(K, L, 2, H, D)
        bank_k = [z[:, i, 0].transpose(0, 1)[None] for i in range(L)]  # (1, Hkv, K, D)
        bank_v = [z[:, i, 1].transpose(0, 1)[None] for i in range(L)]
        keys, _, start, bias = label_bank(m)
        assert keys[0].shape == (1, H, K, D) and bias is None and start is None
        ref = reference_onepass_scores(m, ids, mask, bank_k, bank_v, 0)
        g_ref = grads(m, ref, w)
        assert rel_err(s, ref) < 1e-10, rel_err(s, ref)
        for a, b in zip(g, g_ref):
            assert rel_err(a, b) < 1e-9
        assert meth.pool.weight.grad is not None and meth.pool.weight.grad.abs().sum() > 0
    finally:
        ltuning.unpatch(m)


@pytest.mark.parametrize("variant", ["pooling", "kv", "published"])
def test_packed_prefix_equals_packed_padded_prefix(tiny, variant, request):
    """lt-prefix ``packed_prefix()`` (the one-pass bank with the generator run on the real label tokens only) equals
    ``pack_blocks`` of the padded per-label ``prefix()``: label texts of unequal token counts, random generator
    weights, float64; every (1, Hkv, T, D) bank tensor in value and the gradient of a random weighted sum of them
    w.r.t. every trainable of the method ("published" mixes positions: it falls back to that very expression)."""
    from ltuning.methods.scoring import pack_blocks
    base, tok = tiny
    seed = seed_of(request)
    m = build(base, tok, "lt-prefix", "onepass", seed, variant=variant)
    try:
        meth, info = m.method, m.info
        lengths = meth.prefix_lengths()
        assert lengths is not None and len(set(lengths.tolist())) > 1
        T = int(lengths.sum())
        params = [p for p in meth.parameters() if p.requires_grad]
        got, ref = meth.packed_prefix(), pack_blocks(*meth.prefix(), lengths)
        g = torch.Generator().manual_seed(seed + 1)
        ws = [torch.randn(x.shape, generator=g, dtype=x.dtype) for x in ref[0] + ref[1]]
        assert len(got[0]) == len(got[1]) == len(ref[0]) == info.num_layers
        for a, b in zip(got[0] + got[1], ref[0] + ref[1]):
            assert a.dtype == torch.float64
            assert a.shape == b.shape == (1, info.num_kv_heads, T, info.head_dim)
            assert rel_err(a, b) < 1e-12, rel_err(a, b)

        def grad_of(bank):
            loss = sum((x * w).sum() for x, w in zip(bank[0] + bank[1], ws))
            return torch.autograd.grad(loss, params, allow_unused=True)

        for name, a, b in zip([n for n, p in meth.named_parameters() if p.requires_grad], grad_of(got), grad_of(ref)):
            assert b is not None and b.abs().sum() > 0, name  # every generator parameter gets a gradient
            assert a is not None and rel_err(a, b) < 1e-12, (name, rel_err(a, b))
        keys, _, start, bias = label_bank(m)  # what onepass_scores hands the kernel
        if meth.dedup_index() is None:  # else the merged bank: test_dedup_bank_is_exact
            assert bias is None and all(torch.equal(a, b) for a, b in zip(keys, meth.packed_prefix()[0]))
        assert start == (max(lengths.tolist()) if m.config.position_offset == "prefix" else None)
    finally:
        ltuning.unpatch(m)


def test_dedup_bank_is_exact(smollm, request):
    """Decoder, variant "kv": label texts that start alike share bank tokens. The merged bank (distinct tokens,
    prefix_bias = log multiplicity) gives the scores and every trainable's gradient of the full T-token bank
    (float64, relative 1e-10), on the C++ kernel and the reference; the trie is what the texts say (TEXTS3: "The
    sentiment" shared by two labels -> 2 tokens merged)."""
    base, tok = tiny_base("decoder", smollm[1]).double(), smollm[1]
    seed = seed_of(request)
    m = build(base, tok, "lt-prefix", "onepass", seed)
    try:
        meth = m.method
        assert m.config.variant == "kv"
        idx, counts = meth.dedup_index()
        lens = meth.label_mask.sum(-1)
        ids3 = [tok(t)["input_ids"] for t in TEXTS3]
        shared = next(i for i, (a, b) in enumerate(zip(ids3[0], ids3[1])) if a != b)  # common first tokens
        assert shared >= 1 and idx.numel() == int(lens.sum()) - shared and int(counts.sum()) == int(lens.sum())
        assert sorted(counts.tolist())[-shared:] == [2] * shared
        keys, values, _, bias = label_bank(m)
        assert keys[0].shape[2] == idx.numel() and torch.equal(bias, counts.double().log()[None])
        ids, mask = inputs(tok)
        for backend in ("cpu", "reference"):
            m.config.backend = backend
            m.config.merge_label_tokens = True
            s = m(ids, mask)
            w = torch.randn(s.shape, generator=torch.Generator().manual_seed(seed + 1), dtype=s.dtype)
            g = grads(m, s, w)
            m.config.merge_label_tokens = False
            assert meth.dedup_index() is None
            s_full = m(ids, mask)
            g_full = grads(m, s_full, w)
            assert rel_err(s, s_full) < 1e-10, (backend, rel_err(s, s_full))
            for a, b in zip(g, g_full):
                assert rel_err(a, b) < 1e-9, (backend, rel_err(a, b))
    finally:
        ltuning.unpatch(m)


def test_dedup_bank_on_banking77_label_texts(smollm):
    """BANKING77's 77 default label texts ("The label of the text is <intent>.") on the SmolLM2 tokenizer: 802
    real bank tokens, 299 distinct prefixes (the trie of the texts), each label still seeing its own n_k tokens."""
    tok = smollm[1]
    with open(os.path.join(shared_data("banking77"), "dev.jsonl")) as f:
        names = sorted({json.loads(line)["label"] for line in f})
    base = tiny_base("decoder", tok).double()
    texts = [ltuning.data.default_label_text(n) for n in names]  # what the CLI passes
    m = ltuning.patch(base, ltuning.make_config("lt-prefix", label_names=names, label_texts=texts,
                                                scoring="onepass"), tok)
    try:
        idx, counts = m.method.dedup_index()
        ids = [tuple(tok(t)["input_ids"]) for t in texts]
        trie = {t[:j] for t in ids for j in range(1, len(t) + 1)}
        assert int(counts.sum()) == sum(map(len, ids)) and idx.numel() == len(trie) < sum(map(len, ids))
        print(f"banking77 bank tokens {sum(map(len, ids))} -> {idx.numel()} distinct")
    finally:
        ltuning.unpatch(m)


def test_last_token_bank_equals_reference_on_materialised_tokens(smollm, request):
    """``bank_tokens="last"`` (decoder, variant "kv"): the one-pass scores and every trainable's gradient equal the
    float64 reference attention over a bank materialised by hand from the label blocks (``prefix()``): K copies of
    each token every label text shares (their common first tokens), then each label's last real token; no bias
    (the copies stand for it). On the C++ kernel and the reference backend; kpass and encoders refuse it."""
    tok = smollm[1]
    base = tiny_base("decoder", tok).double()
    seed = seed_of(request)
    texts = ["The sentiment is negative.", "The sentiment of the text is clearly positive.", "The end."]
    m = ltuning.patch(base, ltuning.make_config("lt-prefix", label_names=NAMES3, label_texts=texts,
                                                scoring="onepass", bank_tokens="last", encoder_hidden_size=16), tok)
    m.double()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in m.trainable_parameters():
            p.add_(torch.randn(p.shape, generator=g, dtype=p.dtype) * 0.3)
    try:
        meth = m.method
        ids3 = [tok(t)["input_ids"] for t in texts]
        common = next(i for i, col in enumerate(zip(*ids3)) if len(set(col)) > 1)  # shared by all three
        lens = [len(t) for t in ids3]
        assert common >= 1 and meth.label_mask.sum(-1).tolist() == lens
        idx, counts = meth.bank_index()
        assert idx.numel() == common + 3 and counts.tolist() == [3] * common + [1, 1, 1]
        keys, values = meth.prefix()  # (K, Hkv, l, D) per layer
        L = len(keys)
        bank_k = [torch.cat([keys[j][0:1, :, :common].expand(3, -1, -1, -1).transpose(0, 1).flatten(1, 2)]
                            + [keys[j][k, :, n - 1:n] for k, n in enumerate(lens)], 1)[None] for j in range(L)]
        bank_v = [torch.cat([values[j][0:1, :, :common].expand(3, -1, -1, -1).transpose(0, 1).flatten(1, 2)]
                            + [values[j][k, :, n - 1:n] for k, n in enumerate(lens)], 1)[None] for j in range(L)]
        assert bank_k[0].shape[2] == 3 * common + 3
        ids, mask = inputs(tok)
        ref = reference_onepass_scores(m, ids, mask, bank_k, bank_v, max(lens))
        w = torch.randn(ref.shape, generator=torch.Generator().manual_seed(seed + 1), dtype=ref.dtype)
        g_ref = grads(m, ref, w)
        for backend in ("cpu", "reference"):
            m.config.backend = backend
            s = m(ids, mask)
            g_got = grads(m, s, w)
            assert rel_err(s, ref) < 1e-10, (backend, rel_err(s, ref))
            for a, b in zip(g_got, g_ref):
                assert rel_err(a, b) < 1e-9, (backend, rel_err(a, b))
        assert any(a.abs().sum() > 0 for a in g_ref[:-3])  # the label-side maps get a gradient
        m.config.bank_tokens = "all"  # the full bank scores differently: "last" is not a no-op
        assert rel_err(m(ids, mask), ref) > 1e-6
    finally:
        ltuning.unpatch(m)
    for kw in ({"scoring": "kpass"}, {"scoring": "onepass", "variant": "pooling"}, {"bank_tokens": "some"}):
        cfg = ltuning.make_config("lt-prefix", label_names=NAMES3, label_texts=texts, encoder_hidden_size=16,
                                  **{"scoring": "onepass", "bank_tokens": "last", **kw})
        with pytest.raises(ValueError, match="bank_tokens"):
            ltuning.patch(base, cfg, tok)


def test_last_token_bank_on_banking77_label_texts(smollm):
    """BANKING77's default label texts on SmolLM2 with ``bank_tokens="last"``: the 6 template tokens every text
    shares + one last token per label = 83 bank tokens (299 for the full merged bank)."""
    tok = smollm[1]
    with open(os.path.join(shared_data("banking77"), "dev.jsonl")) as f:
        names = sorted({json.loads(line)["label"] for line in f})
    base = tiny_base("decoder", tok).double()
    texts = [ltuning.data.default_label_text(n) for n in names]
    m = ltuning.patch(base, ltuning.make_config("lt-prefix", label_names=names, label_texts=texts,
                                                scoring="onepass", bank_tokens="last"), tok)
    try:
        ids = [tuple(tok(t)["input_ids"]) for t in texts]
        common = next(i for i, col in enumerate(zip(*ids)) if len(set(col)) > 1)
        idx, counts = m.method.bank_index()
        assert len(set(ids)) == 77 and idx.numel() == common + 77
        assert counts.tolist().count(77) == common and label_bank(m)[0][0].shape[2] == common + 77
        print(f"banking77 bank_tokens=last: {idx.numel()} bank tokens ({common} shared)")
    finally:
        ltuning.unpatch(m)


def pair_reference(base, m, ids, mask, suffix, causal):
    """Per (input b, label k): the base on the materialised sequence [x_b real tokens ; y_k real tokens] (encoders:
    a 4-D mask keeps the input from seeing the label, the one-directional cascade) -> pooled suffix -> head."""
    emb = base.get_input_embeddings()
    lens = m.method.label_mask.sum(-1).tolist()
    out = []
    for b in range(ids.shape[0]):
        nb = int(mask[b].sum())
        row = []
        for k, nk in enumerate(lens):
            e = torch.cat([emb(ids[b:b + 1, :nb]), suffix[k:k + 1, :nk]], 1)
            kw = {}
            if not causal:
                T = nb + nk
                vis = torch.ones(T, T, dtype=torch.bool)
                vis[:nb, nb:] = False
                kw["attention_mask"] = vis[None, None]
            h = base(inputs_embeds=e, use_cache=False, **kw).last_hidden_state[0, nb:]
            pooled = h[-1] if m.pooling == "last" else h.mean(0)
            row.append(m.head(pooled[None])[0, 0])
        out.append(torch.stack(row))
    return torch.stack(out)


@pytest.mark.parametrize("method", ["lt-prompt", "lt-prefix"])
def test_shared_input_equals_base_on_materialised_input_then_label(tiny, method, request):
    """Shared-input (the input's K/V as a never-expanded bank, the label suffixes at positions n_b..) equals the
    float64 base on each materialised [x_b ; y_k]: lt-prompt with a random trainable label prompt, scores and
    gradients; lt-prefix with its label-side K/V maps at the identity (the maps are a change of the bank only the
    suffix reads: their gradient is tested against an expanded per-row bank below)."""
    base, tok = tiny
    causal = m_causal = tiny[0].config.model_type == "llama"
    seed = seed_of(request)
    m = build(base, tok, method, "shared-input", seed)
    try:
        if method == "lt-prefix":
            with torch.no_grad():
                for n in ("key_delta", "key_bias", "value_delta", "value_bias"):
                    getattr(m.method, n).zero_()
        ids, mask = inputs(tok)
        s = m(ids, mask)
        w = torch.randn(s.shape, generator=torch.Generator().manual_seed(seed + 1), dtype=s.dtype)
        g = grads(m, s, w)
        suffix = m.method.prompts()[0] if method == "lt-prompt" else m.method.label_embeds
        ref = pair_reference(base, m, ids, mask, suffix, m_causal)
        g_ref = grads(m, ref, w)
        assert rel_err(s, ref) < 1e-10, rel_err(s, ref)
        if method == "lt-prefix":  # the reference has no maps: compare the head's gradient
            g, g_ref = g[-2:], g_ref[-2:]
        for a, b in zip(g, g_ref):
            assert rel_err(a, b) < 1e-9
        assert causal == m.info.causal
    finally:
        ltuning.unpatch(m)


def test_shared_input_label_side_maps_backward_matches_expanded_bank(tiny, request):
    """lt-prefix shared-input with random label-side K/V maps: the in-kernel reduction of the bank gradient over the
    K rows of each input equals autograd through a per-row EXPANDED copy of the bank in the float64 reference."""
    import ltuning.methods.scoring as sc
    base, tok = tiny
    seed = seed_of(request)
    m = build(base, tok, "lt-prefix", "shared-input", seed)
    try:
        ids, mask = inputs(tok)
        w = torch.randn(len(XS), 3, generator=torch.Generator().manual_seed(seed + 1), dtype=torch.float64)
        s = m(ids, mask)
        g = grads(m, s, w)
        orig = sc.PrefixInputs

        def expanded(keys, values, index, scales, backend, lengths):
            return orig([k[index] for k in keys], [v[index] for v in values], torch.arange(len(index)), scales,
                        "reference", None if lengths is None else lengths[index])

        sc.PrefixInputs = expanded
        try:
            ref = m(ids, mask)
        finally:
            sc.PrefixInputs = orig
        g_ref = grads(m, ref, w)
        assert rel_err(s, ref) < 1e-10
        for a, b in zip(g, g_ref):
            assert rel_err(a, b) < 1e-9
        assert m.method.key_delta.grad.abs().sum() > 0
    finally:
        ltuning.unpatch(m)


def test_bank_packing_validates_lengths():
    from ltuning.methods.scoring import pack_blocks
    k = [torch.randn(2, 1, 3, 4)]
    with pytest.raises(ValueError, match="lengths"):
        pack_blocks(k, k, torch.tensor([0, 3]))
    with pytest.raises(ValueError, match="lengths"):
        pack_blocks(k, k, torch.tensor([4, 3]))
    pk, _ = pack_blocks(k, k, torch.tensor([1, 3]))
    assert torch.equal(pk[0][0], torch.cat([k[0][0, :, :1], k[0][1]], 1))
    from ltuning.methods.scoring import check_scoring
    with pytest.raises(ValueError, match="scoring"):
        check_scoring(ltuning.make_config("lt-prefix", label_names=NAMES3, scoring="twopass"))
    with pytest.raises(ValueError, match="listwise"):
        check_scoring(ltuning.make_config("lt-prefix", label_names=NAMES3, scoring="onepass", objective="pairwise"))
    with pytest.raises(ValueError, match="h must be"):
        BilinearLabelHead(4)(torch.zeros(2, 3), torch.zeros(2, 4))


def save_perturbed_lt_prefix(base, tok, scoring, path):
    """An lt-prefix adapter with ``scoring`` on ``base``, trainables moved off their initialisation, saved to
    ``path`` and unpatched: (input_ids, attention_mask, its scores on them)."""
    m = ltuning.patch(base, ltuning.make_config("lt-prefix", label_names=NAMES3, label_texts=TEXTS3,
                                                scoring=scoring), tok)
    try:
        with torch.no_grad():
            for p in m.trainable_parameters():
                p.add_(torch.randn_like(p) * 0.05)
        ids, mask = inputs(tok)
        with torch.no_grad():
            s = m(ids, mask)
        m.save_pretrained(str(path))
    finally:
        ltuning.unpatch(m)
    return ids, mask, s


@pytest.mark.parametrize("scoring", ["kpass", "onepass", "shared-input"])
def test_save_load_round_trip(minilm, scoring, tmp_path):
    base, tok = minilm
    ids, mask, s = save_perturbed_lt_prefix(base, tok, scoring, tmp_path)
    meta = json.loads((tmp_path / "adapter_config.json").read_text())
    assert meta["method_config"]["scoring"] == scoring
    r = ltuning.LTuningModel.from_pretrained(base, str(tmp_path), tok)
    try:
        assert r.config.scoring == scoring
        with torch.no_grad():
            assert torch.equal(r(ids, mask), s)
    finally:
        ltuning.unpatch(r)
    if scoring == "kpass":  # an adapter saved before the option existed has no key: it loads as kpass
        del meta["method_config"]["scoring"]
        (tmp_path / "adapter_config.json").write_text(json.dumps(meta))
        r = ltuning.LTuningModel.from_pretrained(base, str(tmp_path), tok)
        try:
            assert r.config.scoring == "kpass"
            with torch.no_grad():
                assert torch.equal(r(ids, mask), s)
        finally:
            ltuning.unpatch(r)


def test_cli_train_eval_classify_with_scoring(tmp_path, sst2_dir, minilm):
    from ltuning.cli import main
    out = tmp_path / "run"
    small = tmp_path / "dev.jsonl"
    small.write_text("".join(open(os.path.join(sst2_dir, "dev.jsonl")).readlines()[:12]))
    for scoring in ("onepass", "shared-input"):
        d = str(out) + scoring
        assert main(["train", "--model", "minilm-l6", "--method", "lt-prompt", "--scoring", scoring, "--data", sst2_dir,
                     "--out", d, "--max-train-examples", "60", "--max-dev-examples", "16", "--max-steps", "2",
                     "--batch-size", "8", "--quiet"]) == 0
        assert json.load(open(os.path.join(d, "adapter_config.json")))["method_config"]["scoring"] == scoring
        assert main(["eval", "--adapter", d, "--data", str(small)]) == 0
        inp = tmp_path / "in.jsonl"
        inp.write_text('{"text": "a gripping film"}\n{"text": "dull"}\n')
        assert main(["classify", "--adapter", d, "--input", str(inp), "--output", str(tmp_path / "o.jsonl")]) == 0
        assert len((tmp_path / "o.jsonl").read_text().splitlines()) == 2


def test_cli_bad_scoring_is_one_line_exit_2(tmp_path, sst2_dir, capsys, minilm):
    from ltuning.cli import main
    rc = main(["train", "--model", "minilm-l6", "--method", "lt-prefix", "--scoring", "twopass", "--data", sst2_dir,
               "--out", str(tmp_path / "x"), "--max-train-examples", "20", "--quiet"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and "scoring" in err[0] and "twopass" in err[0], err
    assert not os.path.exists(tmp_path / "x" / "adapter_config.json")
    rc = main(["train", "--model", "minilm-l6", "--method", "lora", "--scoring", "onepass", "--data", sst2_dir,
               "--out", str(tmp_path / "y"), "--quiet"])
    assert rc == 2
    capsys.readouterr()
    rc = main(["train", "--model", "minilm-l6", "--method", "lt-prefix", "--bank-tokens", "last", "--data", sst2_dir,
               "--out", str(tmp_path / "z"), "--max-train-examples", "20", "--quiet"])  # "last": decoders only
    err = [e for e in capsys.readouterr().err.strip().splitlines() if e.startswith("ltuning")]  # not the loading bars
    assert rc == 2 and len(err) == 1 and "bank_tokens" in err[0] and "decoder" in err[0], err
    assert not os.path.exists(tmp_path / "z" / "adapter_config.json")
    rc = main(["train", "--model", "minilm-l6", "--method", "lt-prefix", "--label-weight-scale", "sqrt", "--data",
               sst2_dir, "--out", str(tmp_path / "w"), "--max-train-examples", "20", "--quiet"])
    err = [e for e in capsys.readouterr().err.strip().splitlines() if e.startswith("ltuning")]
    assert rc == 2 and len(err) == 1 and "label_weight_scale" in err[0] and "rsqrt-d" in err[0], err
    assert not os.path.exists(tmp_path / "w" / "adapter_config.json")


BANK_CLASSES = ["card_arrival", "exchange_rate", "lost_or_stolen_phone", "age_limit", "top_up_failed"]


@pytest.mark.parametrize("label_weights", [False, True])
def test_onepass_label_added_at_inference_scores_above_chance(minilm, sst2_dir, label_weights):
    """Train one-pass lt-prefix on 4 BANKING77 intents, then add a 5th (held back from training) by encoding its
    text only: on that intent's dev examples the new label is the top-1 of the 5 well above chance (1/5). With
    ``label_weights`` the trained labels have free vectors the new one lacks (w = 0): it must still win its own
    examples."""
    path = os.path.join(os.path.dirname(sst2_dir), "banking77")  # beside the shared SST-2
    if not os.path.isdir(path):
        pytest.skip(f"{path} not found")
    recs = {s: [json.loads(x) for x in open(os.path.join(path, f"{s}.jsonl"))] for s in ("train", "dev")}
    held = BANK_CLASSES[-1]
    rng = random.Random(0)
    train = [r for c in BANK_CLASSES[:-1] for r in rng.sample([r for r in recs["train"] if r["label"] == c], 24)]
    base, tok = minilm
    torch.manual_seed(0)
    clf = ltuning.Classifier("minilm-l6", "lt-prefix", label_names=BANK_CLASSES[:-1], base=base, tokenizer=tok,
                             scoring="onepass", label_weights=label_weights)
    try:
        clf.fit(train, val=train[::6], epochs=4, batch_size=16, lr=1e-3, head_lr=1e-2, progress=False, seed=0)
        dev_held = [r for r in recs["dev"] if r["label"] == held]
        dev_seen = [r for r in recs["dev"] if r["label"] in BANK_CLASSES[:-1]][::2]
        clf.add_labels([held])
        if label_weights:  # the 4 trained labels' vectors moved; the added label has none
            w = clf.model.head.label_weight
            assert w.shape[0] == 5 and bool((w[:4].abs().amax(1) > 0).all()) and not bool(w[4].any())
        assert clf.label_names[-1] == held and clf.model.config.label_texts[-1].endswith("top up failed.")
        top1_held = sum(p == held for p in clf.predict(dev_held)) / len(dev_held)
        acc_seen = sum(p == r["label"] for p, r in zip(clf.predict(dev_seen), dev_seen)) / len(dev_seen)
        print(f"held-back intent top-1 {top1_held:.3f}, seen intents accuracy {acc_seen:.3f} (5 labels)")
        assert top1_held > 0.5, top1_held
        assert acc_seen > 0.6, acc_seen
    finally:
        ltuning.unpatch(clf.model)


@pytest.mark.parametrize("scoring,rows", [("kpass", 3), ("onepass", 1), ("shared-input", 3)])
def test_engine_budgets_rows_per_input_by_scoring(minilm, scoring, rows, tmp_path):
    """The serving engine's batch planner budgets K rows per input for K-pass and shared-input, one for one-pass
    (its input runs once whatever K), and its scores equal the model's own forward."""
    from ltuning.serving.engine import Engine
    ids, mask, want = save_perturbed_lt_prefix(*minilm, scoring, tmp_path)
    e = Engine({"a": str(tmp_path)}, dtype="fp32")  # its own base, loaded from disk
    a = e.adapters["a"]
    assert a.rows_per_input == rows
    got = e.score_ids(a, [row[mk.bool()].tolist() for row, mk in zip(ids, mask)])
    assert rel_err(got, want) < 1e-5


def reference_bilinear(head, h, u, scale="rsqrt-d"):
    """float64 reference of BilinearLabelHead with per-label weights, written out from its docstring."""
    d = h.shape[1]
    ln = lambda x: (x - x.mean(-1, keepdim=True)) / torch.sqrt(x.var(-1, unbiased=False, keepdim=True) + 1e-5)
    hn, un = ln(h), ln(u)
    q = hn @ (torch.eye(d, dtype=h.dtype) + head.query_delta / d ** 0.5)
    k = un @ (torch.eye(d, dtype=h.dtype) + head.key_delta / d ** 0.5)
    s = torch.exp(head.log_tau) * (q @ k.T) / d
    return s + hn @ head.label_weight.T / (d ** 0.5 if scale == "rsqrt-d" else 1.0)


@pytest.mark.parametrize("scale", ["rsqrt-d", "one"])
def test_label_weights_head_equals_reference_forward_and_backward(request, scale):
    seed = seed_of(request)
    g = torch.Generator().manual_seed(seed)
    d, B, K = 24, 5, 7
    head = BilinearLabelHead(d, K, scale).double()
    with torch.no_grad():
        for p in head.parameters():
            p.add_(torch.randn(p.shape, generator=g, dtype=p.dtype) * 0.3)
    h = torch.randn(B, d, generator=g, dtype=torch.float64, requires_grad=True)
    u = torch.randn(K, d, generator=g, dtype=torch.float64, requires_grad=True)
    w = torch.randn(B, K, generator=g, dtype=torch.float64)
    s, r = head(h, u), reference_bilinear(head, h, u, scale)
    assert s.shape == (B, K) and torch.isfinite(s).all()
    assert ((s - r).norm() / r.norm()).item() < 1e-12, seed
    got = torch.autograd.grad((s * w).sum(), [h, u, *head.parameters()])
    ref = torch.autograd.grad((r * w).sum(), [h, u, *head.parameters()])
    for a, b in zip(got, ref):
        assert ((a - b).norm() / b.norm().clamp_min(1e-30)).item() < 1e-12, seed
    assert head.label_weight.grad is None  # autograd.grad above, nothing accumulated
    with pytest.raises(ValueError, match="label_weight"):
        head(h, u[:3])
    with pytest.raises(ValueError, match="label_weight_scale must be one of"):
        BilinearLabelHead(d, K, "sqrt")
    with pytest.raises(ValueError, match="needs label_weights on"):
        check_scoring(ltuning.make_config("lt-prefix", label_names=["a", "b"], scoring="kpass", label_weights=False,
                                          label_weight_scale="one"))


def test_label_weights_in_model_add_labels_save_load(minilm, tmp_path, request):
    """onepass lt-prefix with label_weights: every label's score moves with its w_k; add_labels keeps the trained
    rows and appends a zero row; the adapter round-trips; kpass refuses the option."""
    tok = minilm[1]
    base = tiny_base("encoder", tok).double()
    seed = seed_of(request)
    m = build(base, tok, "lt-prefix", "onepass", seed, label_weights=True)
    try:
        ids, mask = inputs(tok)
        assert m.head.label_weight.shape == (3, m.info.hidden_size)
        assert "head.label_weight" in dict(m.named_parameters()) and m.head.label_weight.requires_grad
        with torch.no_grad():
            s = m(ids, mask)
            w = m.head.label_weight.data.clone()
            m.head.label_weight.data.zero_()
            s0 = m(ids, mask)
            m.head.label_weight.data.copy_(w)
        # the difference is the per-label term on the pooled input: rank <= d, nonzero in every label's column
        assert ((s - s0).abs().amax(0) > 1e-6).all()
        m.save_pretrained(str(tmp_path))
        with torch.no_grad():
            m.add_labels(["other"], ["Something else entirely."])
            s4 = m(ids, mask)
        # (the old labels' scores move: the input now also attends the new label's bank block)
        assert s4.shape == (3, 4) and torch.isfinite(s4).all()
        assert torch.equal(m.head.label_weight[:3], w) and torch.equal(m.head.label_weight[3], torch.zeros_like(w[0]))
    finally:
        ltuning.unpatch(m)
    r = ltuning.LTuningModel.from_pretrained(base, str(tmp_path), tok)
    try:
        assert r.config.label_weights is True
        r.double()  # (loaded into the fp32 model first, then cast: fp32 rounding of the saved weights)
        with torch.no_grad():
            assert ((r(ids, mask) - s).abs().max() / s.abs().max()).item() < 1e-6
    finally:
        ltuning.unpatch(r)
    with pytest.raises(ValueError, match="label_weights"):
        ltuning.patch(base, ltuning.make_config("lt-prefix", label_names=NAMES3, scoring="kpass", label_weights=True),
                      tok)


def test_train_notes_onepass_when_kpass_meets_many_labels():
    """``ltuning train`` prints one note when a built label-conditioned model runs every input K >= 8 times."""
    from ltuning.classifier import MANY_LABELS, scoring_hint
    note = scoring_hint(ltuning.make_config("lt-prefix", scoring="kpass"), 77)
    assert note and "77 labels" in note and "--scoring onepass" in note and "\n" not in note
    assert scoring_hint(ltuning.make_config("lt-prompt", scoring="kpass"), MANY_LABELS)
    assert scoring_hint(ltuning.make_config("lt-prefix", scoring="kpass"), MANY_LABELS - 1) is None
    assert scoring_hint(ltuning.make_config("lt-prefix", scoring="onepass"), 77) is None
    assert scoring_hint(ltuning.make_config("lora"), 77) is None


def test_kpass_at_many_labels_warns_and_names_onepass(minilm):
    """kpass with more than KPASS_WARN_LABELS labels warns once at build, naming the one-pass alternative; at
    KPASS_WARN_LABELS labels, and with onepass at any K, nothing is said."""
    import warnings as w

    from ltuning.methods.lt import KPASS_WARN_LABELS
    tok = minilm[1]
    base = tiny_base("encoder", tok)

    def caught(n, scoring):
        names = [f"label{i}" for i in range(n)]
        with w.catch_warnings(record=True) as got:
            w.simplefilter("always")
            m = ltuning.patch(base, ltuning.make_config("lt-prefix", label_names=names, scoring=scoring,
                                                        encoder_hidden_size=8), tok)
            ltuning.unpatch(m)
        return [str(x.message) for x in got if issubclass(x.category, UserWarning) and "kpass" in str(x.message)]

    msgs = caught(KPASS_WARN_LABELS + 1, "kpass")
    assert len(msgs) == 1 and f"{KPASS_WARN_LABELS + 1} rows per example" in msgs[0] and "onepass" in msgs[0]
    assert caught(KPASS_WARN_LABELS, "kpass") == [] and caught(KPASS_WARN_LABELS + 1, "onepass") == []
