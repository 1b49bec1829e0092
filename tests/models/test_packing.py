"""Packed forwards (ltuning.models.packing): R padded rows run as one row of their real tokens give the padded
forward's hidden states, scores, loss and every trainable's gradient, in float64, for every method that packs;
which models pack by default; the packed attention call validates its inputs; the planner counts real tokens for
packed batches."""
import contextlib

import pytest
import torch

import ltuning
from ltuning.batching import plan_batches
from ltuning.methods import injection
from ltuning.models import PrefixInputs
from ltuning.models.packing import can_pack, cu_seqlens, packable, packed_last_hidden
from method_helpers import LT_LABELS, LT_TEXTS, patched, randomize, tiny_base
from testutil import max_rel

TEXTS = ("great fun", "awful , just awful and long , so long that it pads the others", "ok", "it exists , sadly")


def float64_tiny(family, tok):
    """A random 2-layer model of ``family`` over the real tokenizer, float64, ltuning attention enabled."""
    base = tiny_base(family, tok).double()
    ltuning.models.enable(base)
    return base, tok


@pytest.fixture(scope="module")
def tiny(smollm):
    """A random 2-layer Llama (6 query / 2 KV heads: GQA) over SmolLM2's tokenizer."""
    return float64_tiny("decoder", smollm[1])


@pytest.fixture(scope="module")
def tiny_enc(minilm):
    """A random 2-layer BERT over MiniLM's tokenizer."""
    return float64_tiny("encoder", minilm[1])


def batch(tok, texts=TEXTS):
    e = tok(list(texts), padding=True, return_tensors="pt")
    assert tok.padding_side == "right" and not bool(e["attention_mask"].bool().all())
    return e["input_ids"], e["attention_mask"].bool()


def test_packed_hidden_equals_padded_with_bank_gates_and_offsets(tiny, seed):
    """A random bank (entries of unequal real lengths), per-row gates and per-row position offsets: the packed
    forward equals the padded one at every real position, and leaves zeros at the padded ones."""
    base, tok = tiny
    ids, mask = batch(tok)
    R, L = ids.shape
    ltuning.models.enable(base)  # (a previous test's unpatch may have restored the model's own attention)
    cfg = base.config
    Hkv, D, N, P = cfg.num_key_value_heads, cfg.hidden_size // cfg.num_attention_heads, 3, 5
    g = torch.Generator().manual_seed(seed)
    keys = [torch.randn(N, Hkv, P, D, generator=g, dtype=torch.float64) for _ in range(cfg.num_hidden_layers)]
    values = [torch.randn(N, Hkv, P, D, generator=g, dtype=torch.float64) for _ in range(cfg.num_hidden_layers)]
    index = torch.tensor([2, 0, 1, 2])
    scales = [torch.rand(R, P, generator=g, dtype=torch.float64) for _ in range(cfg.num_hidden_layers)]
    lengths = torch.tensor([5, 0, 3])
    pos = torch.arange(L)[None] + lengths[index][:, None]
    prefix = PrefixInputs(keys, values, index, scales, "auto", lengths)
    with torch.inference_mode():
        ref = base(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=False,
                   ltuning_prefix=prefix).last_hidden_state
        got = packed_last_hidden(base, ids, mask, position_ids=pos, ltuning_prefix=prefix)
    assert got.shape == ref.shape
    assert max_rel(got[mask], ref[mask]) < 1e-12, f"seed {seed}"
    assert bool((got[~mask] == 0).all())


PACKED_METHODS = [
    ("prefix", {"num_virtual_tokens": 4}),
    ("lt-prefix", {}),                                        # K-pass: K rows per input
    ("lt-prefix", {"variant": "kv", "position_offset": "prefix"}),  # per-entry lengths and input positions
    ("lt-prefix", {"scoring": "onepass"}),
    ("lt-prefix", {"scoring": "onepass", "variant": "pooled"}),
    ("lt-prompt", {}),
    ("prompt", {"num_virtual_tokens": 3}),                    # prefilled once, then a shared prefix
    ("lora", {}),                                             # hooks that act per token
    ("linear-probe", {}),
]


ENCODER_METHODS = [
    ("prefix", {"num_virtual_tokens": 4}),
    ("lt-prefix", {"scoring": "kpass"}),                      # K-pass, the pooling variant, pairwise objective
    ("lt-prefix", {"scoring": "kpass", "objective": "listwise"}),
    ("lt-prefix", {"scoring": "onepass", "variant": "pooling"}),
    ("lt-prefix", {"scoring": "onepass", "variant": "pooled", "label_weights": False}),
    ("lt-prefix", {}),                                        # the encoder default: onepass, pooled, label weights
    ("lora", {}),
    ("linear-probe", {}),
]


@contextlib.contextmanager
def packed_and_padded(tiny, seed, method, options, monkeypatch):
    """``(model, ids, mask, calls)``: ``method`` patched on the tiny float64 decoder with random trainables,
    ``pack_inputs`` off; ``calls`` records every packed forward."""
    base, tok = tiny
    ids, mask = batch(tok)
    calls = []
    real = injection.packed_last_hidden
    monkeypatch.setattr(injection, "packed_last_hidden", lambda *a, **k: calls.append(1) or real(*a, **k))
    labels = LT_LABELS if method.startswith("lt") else ["negative", "positive"]
    extra = {"label_texts": LT_TEXTS} if method.startswith("lt") else {}
    with patched(base, tok, method, labels=labels, **extra, **options) as m:
        assert m.pack_inputs  # the C++ kernel, positions from ids and no shape-reading hooks: packs by default
        m.pack_inputs = False
        m.method.double()  # the base is float64 too; the head stays fp32 (scores are fp32 by contract)
        if getattr(m.config, "scoring", None) == "onepass":
            m.head.double()  # the bilinear head takes the pooled states in their own (float64) dtype
        torch.manual_seed(seed)
        randomize(m)
        yield m, ids, mask, calls


FAMILY_CASES = ([pytest.param("tiny", m, o, id=f"decoder-{m}-{'-'.join(map(str, o.values()))}")
                 for m, o in PACKED_METHODS]
                + [pytest.param("tiny_enc", m, o, id=f"encoder-{m}-{'-'.join(map(str, o.values()))}")
                   for m, o in ENCODER_METHODS])


@pytest.mark.parametrize("family,method,options", FAMILY_CASES)
def test_packed_scores_equal_padded(request, family, seed, method, options, monkeypatch):
    tiny = request.getfixturevalue(family)
    with packed_and_padded(tiny, seed, method, options, monkeypatch) as (m, ids, mask, calls):
        m.eval()
        with torch.inference_mode():
            ref = m(ids, mask)
            assert not calls
            m.pack_inputs = True
            assert can_pack(m, mask)
            got = m(ids, mask)
        assert calls, "the packed path did not run"
        assert max_rel(got, ref) < 1e-6, f"seed {seed}"  # float64 forwards, the fp32 head's rounding
        assert not can_pack(m, torch.ones_like(mask))  # nothing to unpad


@pytest.mark.parametrize("family,method,options", FAMILY_CASES)
def test_packed_training_loss_and_gradients_equal_padded(request, family, seed, method, options, monkeypatch):
    """Training packs too: the loss and the gradient of every trainable (label-side generators, banks, LoRA,
    head) equal the padded forward's, on a decoder (causal) and on a BERT (bidirectional within each input)."""
    tiny = request.getfixturevalue(family)
    with packed_and_padded(tiny, seed, method, options, monkeypatch) as (m, ids, mask, calls):
        m.train()
        labels = torch.tensor([0, 1, 1, 0]) % len(m.label_names)
        out = {}
        for pack in (False, True):
            m.pack_inputs = pack
            m.zero_grad(set_to_none=True)
            loss, _ = m.loss(ids, mask, labels, generator=torch.Generator().manual_seed(seed))  # pairwise negatives
            loss.backward()
            out[pack] = (loss.detach(), {n: p.grad.clone() for n, p in m.named_parameters()
                                         if p.requires_grad and p.grad is not None})
        assert calls, "the packed path did not run"
        (l0, g0), (l1, g1) = out[False], out[True]
        assert max_rel(l1, l0) < 1e-6, f"seed {seed}"
        assert g0.keys() == g1.keys()
        if method != "linear-probe":  # the method's own trainables get a gradient through the packed kernel
            assert any(g.abs().sum() > 0 for n, g in g0.items() if n.startswith("method.")), sorted(g0)
        for name in g0:
            assert max_rel(g1[name], g0[name]) < 1e-5, (name, f"seed {seed}")


def test_which_models_pack(tiny, tiny_enc):
    """Decoders and absolute-position BERTs with a packed kernel pack by default; a BERT with relative positions,
    the SDPA backend and methods whose layer hooks read the batch's (R, L) shape (APT's gates, FL's, CGC-LoRA's)
    do not."""
    base, tok = tiny
    with patched(base, tok, "lora") as m:
        assert m.pack_inputs and packable(m)
    for method in ("apt", "fl", "cgc-lora"):
        with patched(base, tok, method) as m:
            assert not m.pack_inputs, method
    with patched(base, tok, "prefix", backend="sdpa") as m:
        assert not m.pack_inputs
    enc, etok = tiny_enc
    with patched(enc, etok, "lora") as m:
        assert m.pack_inputs
    enc.config.position_embedding_type = "relative_key"
    try:
        with patched(enc, etok, "lora") as m:
            assert not m.pack_inputs
    finally:
        enc.config.position_embedding_type = "absolute"


def test_packed_attention_rejects_a_padded_batch(tiny):
    base, tok = tiny
    ids, mask = batch(tok)
    ltuning.models.disable(base)
    with pytest.raises(ValueError, match="needs the ltuning attention"):
        packed_last_hidden(base, ids, mask)
    ltuning.models.enable(base)
    with torch.inference_mode(), pytest.raises(ValueError, match="one packed row"):
        base(input_ids=ids, attention_mask=mask, use_cache=False, ltuning_cu_seqlens=cu_seqlens(mask))
    with pytest.raises(ValueError, match="mask must be"):
        packed_last_hidden(base, ids, mask.long())


def test_cu_seqlens():
    mask = torch.tensor([[1, 1, 1, 0], [1, 0, 0, 0], [1, 1, 1, 1]]).bool()
    assert cu_seqlens(mask).tolist() == [0, 3, 4, 8]


def test_planner_counts_real_tokens_when_packed():
    """Packed, a long input no longer pads the short ones: with a fixed cost per forward the planner puts
    inputs of very different lengths in one batch, and the token budget bounds real tokens."""
    lengths = [40, 3, 3, 3, 3, 3, 3, 3]
    padded = plan_batches(lengths, 64, overhead_tokens=48, max_tokens=4096)
    packed = plan_batches(lengths, 64, overhead_tokens=48, max_tokens=4096, packed=True)
    assert len(padded) == 2 and len(packed) == 1
    assert sorted(i for b in packed for i in b) == list(range(len(lengths)))
    budget = plan_batches(lengths, 64, overhead_tokens=48, max_tokens=45, packed=True)
    assert all(sum(lengths[i] for i in b) <= 45 or len(b) == 1 for b in budget)
    assert len(budget) == 2  # e.g. 40 + 3 | 3 x 6: two forwards, each within 45 real tokens
