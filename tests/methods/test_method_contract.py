"""The contract every registered method keeps (run over ``METHODS``: a new method is covered without an edit here).

On a tiny random model of each family (BERT encoder, Llama decoder with GQA; the real tokenizers' vocabularies,
fp32), with every trainable moved away from its initialisation (zero / identity starts would hide mistakes):
  * forward gives (B, K) finite scores;
  * a save / load round trip restores the weights and the base-derived caches bit for bit (the caches are not
    recomputed) and gives identical scores;
  * patch then unpatch leaves the base computing exactly what it computed before;
  * gradients reach every trainable parameter and no base parameter.
"""
import pytest
import torch

import ltuning
from ltuning.methods import METHODS
from ltuning.model import LTuningModel
from method_helpers import tiny_base

LABELS = ["negative", "positive", "neutral"]
TEXTS = ["The sentiment is negative.", "The sentiment of the text is clearly positive.", "Neutral."]
XS = ["a gripping film", "dull and far too long for what it is", "ok", "fine"]


@pytest.fixture(params=["encoder", "decoder"])
def tiny(request):
    tok = request.getfixturevalue("minilm" if request.param == "encoder" else "smollm")[1]
    return tiny_base(request.param, tok), tok


def patch(base, tok, method, seed):
    m = ltuning.patch(base, ltuning.make_config(method, label_names=LABELS, label_texts=TEXTS), tok)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in m.trainable_parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.1)
    return m


def inputs(tok):
    x = tok(XS, padding=True, return_tensors="pt")
    return x["input_ids"], x["attention_mask"]


ALL = sorted(METHODS)


@pytest.mark.parametrize("method", ALL)
def test_scores_are_batch_by_labels(tiny, method, seed):
    base, tok = tiny
    m = patch(base, tok, method, seed)
    try:
        ids, mask = inputs(tok)
        with torch.no_grad():
            s = m(ids, mask)
    finally:
        ltuning.unpatch(m)
    assert s.shape == (len(XS), len(LABELS)) and s.dtype == torch.float32 and bool(s.isfinite().all())


@pytest.mark.parametrize("method", ALL)
def test_save_load_round_trip_gives_identical_scores(tiny, method, seed, tmp_path, monkeypatch):
    base, tok = tiny
    ids, mask = inputs(tok)
    m = patch(base, tok, method, seed)
    try:
        with torch.no_grad():
            before = m(ids, mask)
        m.save_pretrained(tmp_path)
        saved = m.adapter_state_dict()
    finally:
        ltuning.unpatch(m)
    cls = METHODS[method]

    def recompute(*a, **k):
        raise AssertionError("the saved base-derived cache was recomputed instead of restored")
    monkeypatch.setattr(cls, "refresh_cache", recompute)
    m2 = LTuningModel.from_pretrained(base, str(tmp_path), tok)
    try:
        restored = m2.adapter_state_dict()
        with torch.no_grad():
            after = m2(ids, mask)
    finally:
        ltuning.unpatch(m2)
    assert type(m2.method) is cls and m2.config == m.config
    assert saved.keys() == restored.keys() and all(torch.equal(saved[k], restored[k]) for k in saved)
    assert torch.equal(after, before)


@pytest.mark.parametrize("method", ALL)
def test_unpatch_restores_the_base_exactly(tiny, method, seed):
    base, tok = tiny
    ids, mask = inputs(tok)
    with torch.no_grad():
        ref = base(input_ids=ids, attention_mask=mask).last_hidden_state
    impl = base.config._attn_implementation
    m = patch(base, tok, method, seed)
    with torch.no_grad():
        patched = m.encode(ids, mask)
    back = ltuning.unpatch(m)
    with torch.no_grad():
        out = base(input_ids=ids, attention_mask=mask).last_hidden_state
    assert back is base and base.config._attn_implementation == impl
    assert torch.equal(out, ref)
    assert patched.shape == (len(XS), ref.shape[-1])


@pytest.mark.parametrize("method", ALL)
def test_gradients_reach_every_trainable_and_no_base_parameter(tiny, method, seed):
    """One listwise loss backward. The one trainable allowed a zero gradient: the head's bias of a
    label-conditioned method (one score per (input, label) pair from the same Linear(d, 1), so the bias shifts
    all K scores of a row alike and the cross-entropy over them does not move: d loss / d bias = sum_k (p_k -
    y_k) = 0); it must still receive a (zero) gradient."""
    base, tok = tiny
    ids, mask = inputs(tok)
    m = patch(base, tok, method, seed)
    try:
        m.train()
        loss, _ = m.loss(ids, mask, torch.tensor([0, 1, 2, 1]))
        loss.backward()
        grads = {n: p.grad for n, p in m.named_parameters() if p.requires_grad}
        base_grads = [n for n, p in base.named_parameters() if p.grad is not None or p.requires_grad]
    finally:
        m.eval()
        ltuning.unpatch(m)
    assert not base_grads, base_grads[:3]
    assert grads and all(n.startswith(("method.", "head.")) for n in grads)
    assert any(n.startswith("method.") for n in grads) or method == "linear-probe"
    missing = [n for n, g in grads.items() if g is None]
    assert not missing, missing
    # (one-pass label scoring, the encoders' lt-prefix default, has a bilinear head without a bias)
    zero_allowed = {"head.bias"} if m.method.label_conditioned and "head.bias" in grads else set()
    zero = {n for n, g in grads.items() if not bool(g.abs().gt(0).any())}
    assert zero <= zero_allowed, sorted(zero - zero_allowed)
    if zero_allowed:
        assert grads["head.bias"].abs().max() < 1e-6 * (1 + loss.abs())
