"""Drop-in patching of real Hugging Face models (SmolLM2 = Llama family, MiniLM = BERT family)."""
import os

import pytest
import torch

import ltuning
from ltuning.models import PrefixInputs, disable, enable, model_info
from testutil import checkpointing_grads, rel_err

TEXTS = ["a gripping, beautifully acted film", "dull", "the plot never comes together , and the jokes fall flat"]


def batch(tok):
    return tok(TEXTS, padding=True, return_tensors="pt")


def hidden(model, enc, **kw):
    with torch.no_grad():
        return model(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"], **kw).last_hidden_state


def real_rows(h, enc):
    return h[enc["attention_mask"].bool()]


@pytest.mark.parametrize("backend", ["auto", "sdpa", "reference"])
def test_patched_without_prefix_equals_unpatched(real_model, backend):
    model, tok = real_model
    enc = batch(tok)
    disable(model)
    ref = hidden(model, enc)
    enable(model)
    info = model_info(model)
    empty = torch.zeros(1, info.num_kv_heads, 0, info.head_dim)
    prefix = PrefixInputs([empty] * info.num_layers, [empty] * info.num_layers, torch.zeros(3, dtype=torch.long),
                          backend=backend)
    try:
        for kw in ({}, {"ltuning_prefix": prefix}):
            out = hidden(model, enc, **kw)
            assert rel_err(real_rows(out, enc), real_rows(ref, enc)) < 1e-5
    finally:
        disable(model)


def test_unsupported_architecture_is_a_clear_error():
    from transformers import GPT2Config, GPT2Model
    m = GPT2Model(GPT2Config(n_layer=1, n_head=2, n_embd=8, vocab_size=10))
    with pytest.raises(NotImplementedError, match="supported: Llama family"):
        model_info(m)


def _peft_prefix_model(model, P):
    peft = pytest.importorskip("peft")
    cfg = peft.PrefixTuningConfig(task_type="FEATURE_EXTRACTION", num_virtual_tokens=P)
    return peft.get_peft_model(model, cfg)


@pytest.fixture(scope="module")
def smollm64(smollm):
    """A float64 copy of SmolLM2 (its RMSNorm still rounds the normalised activations to fp32)."""
    import copy
    model, tok = smollm
    disable(model)
    return copy.deepcopy(model).double(), tok


def _peft_vs_ours(model, tok, backend, P=6, offset=None):
    """Hidden states of PEFT prefix tuning (prefix K/V in the cache, positions after P) and of ours (the same K/V
    as a shared bank, positions offset by ``offset``, default P), for one fresh N(0, 1) prefix embedding (PEFT's
    own init)."""
    disable(model)
    pm = _peft_prefix_model(model, P)
    enc = batch(tok)
    with torch.no_grad():
        w = pm.prompt_encoder.default.embedding.weight
        w.copy_(torch.randn(w.shape, dtype=torch.float64).to(w.dtype))
        ref = pm(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"]).last_hidden_state
        cache = pm.get_prompt(batch_size=1)
    base = pm.get_base_model()
    enable(base)
    try:
        info = model_info(base)
        keys = [cache.layers[i].keys for i in range(info.num_layers)]
        values = [cache.layers[i].values for i in range(info.num_layers)]
        assert keys[0].shape == (1, info.num_kv_heads, P, info.head_dim)
        prefix = PrefixInputs(keys, values, torch.zeros(3, dtype=torch.long), backend=backend)
        L = enc["input_ids"].shape[1]
        start = P if offset is None else offset
        out = hidden(base, enc, ltuning_prefix=prefix, position_ids=(torch.arange(L) + start)[None])
    finally:
        disable(base)
    return real_rows(ref, enc), real_rows(out, enc)


@pytest.mark.parametrize("backend", ["auto", "sdpa", "reference"])
def test_same_prefix_kv_as_peft_gives_same_hidden_states(smollm64, backend):
    """Same semantics as PEFT prefix tuning, checked where round-off cannot hide a mistake: in float64 the two
    paths agree to fp32 rounding (the model's RMSNorm computes in fp32), far inside the issue's 1e-5."""
    model, tok = smollm64
    ref, out = _peft_vs_ours(model, tok, backend)
    assert ref.dtype == torch.float64
    err = rel_err(out, ref)
    print(f"float64 ours ({backend}) vs PEFT: {err:.2e}")
    assert err < 1e-6
    if backend == "auto":  # the check can fail: positions one step off (RoPE) already break it
        torch.manual_seed(0)
        ref, out = _peft_vs_ours(model, tok, backend, offset=5)
        assert rel_err(out, ref) > 1e-3


def test_fp32_prefix_as_accurate_as_peft(smollm, smollm64):
    """In fp32, 30 layers amplify round-off chaotically with N(0, 1) prefixes (PEFT's own error against float64
    ranges 2.5e-6..2e-4 over seeds), so a fixed 1e-5 bound between two fp32 paths is noise. The claim that
    holds: our fp32 result is as close to the float64 truth as PEFT's fp32 result (SDPA or eager attention).
    Over 12 seeds ours / max(PEFT sdpa, PEFT eager) was 0.45..1.95; bound 5."""
    model, tok = smollm
    seed = int(torch.randint(0, 2**31 - 1, ()).item())
    runs = {}
    for name, m, impl in (("truth", smollm64[0], "sdpa"), ("peft-sdpa", model, "sdpa"), ("peft-eager", model, "eager")):
        torch.manual_seed(seed)
        disable(m)
        prev = m.config._attn_implementation
        m.set_attn_implementation(impl)
        try:
            runs[name] = _peft_vs_ours(m, tok, "auto")
        finally:
            m.set_attn_implementation(prev)
    truth = runs["truth"][0]
    peft_err = max(rel_err(runs["peft-sdpa"][0], truth), rel_err(runs["peft-eager"][0], truth))
    ours_err = rel_err(runs["peft-sdpa"][1], truth)
    print(f"vs float64: ours {ours_err:.2e}, PEFT {peft_err:.2e}")
    assert ours_err < 5 * peft_err + 1e-6


def test_patch_unpatch_roundtrip_and_frozen_base(real_model):
    model, tok = real_model
    enc = batch(tok)
    disable(model)
    ref = hidden(model, enc)
    cfg = ltuning.make_config("lt-prefix", label_names=["negative", "positive"])
    m = ltuning.patch(model, cfg, tok)
    assert all(not p.requires_grad for p in m.base.parameters())
    assert all(p.requires_grad for p in m.method.parameters()) and m.head.weight.requires_grad
    base = ltuning.unpatch(m)
    assert base.config._attn_implementation == "sdpa"
    assert torch.equal(hidden(base, enc), ref)


def test_bf16_autocast_close_to_fp32(smollm):
    """bf16 autocast keeps the pooled features (what the head reads) within bf16 accuracy of fp32 after 30
    layers; the scores stay fp32. (Scores of a freshly initialised head are a near-cancelling projection of
    the features, so their relative error says little about the model and is not the quantity tested.)"""
    model, tok = smollm
    torch.manual_seed(0)
    cfg = ltuning.make_config("lt-prefix", label_names=["negative", "positive"])
    m = ltuning.patch(model, cfg, tok)
    enc = batch(tok)
    idx = torch.tensor([0, 1, 0])
    with torch.no_grad():
        f32 = m.encode(enc["input_ids"], enc["attention_mask"], idx)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            f16 = m.encode(enc["input_ids"], enc["attention_mask"], idx)
            s16 = m(enc["input_ids"], enc["attention_mask"])
    ltuning.unpatch(m)
    assert s16.dtype == torch.float32 and f16.dtype == torch.float32
    assert rel_err(f16, f32) < 5e-2
    cos = torch.nn.functional.cosine_similarity(f16, f32, dim=-1)
    assert cos.min() > 0.99


def test_torch_compile_matches_eager(minilm):
    model, tok = minilm
    cfg = ltuning.make_config("lt-prefix", label_names=["negative", "positive"])
    m = ltuning.patch(model, cfg, tok)
    enc = batch(tok)
    with torch.no_grad():
        eager = m(enc["input_ids"], enc["attention_mask"])
        compiled = torch.compile(m, dynamic=True)(enc["input_ids"], enc["attention_mask"])
    ltuning.unpatch(m)
    assert rel_err(compiled, eager) < 1e-4


@pytest.mark.parametrize("method", ["prompt", "prefix", "lt-prefix", "lt-prompt"])
def test_gradient_checkpointing_gives_same_gradients(real_model, method):
    """Recomputation by non-reentrant checkpointing in backward gives the same gradients; on SmolLM2 that covers
    the model as patched for CPU training: fused RMSNorm/SwiGLU/rotary ops and prompts run as a shared prefix
    (captured by a hook)."""
    from ltuning.kernels import fused_ops_available
    from ltuning.models.fused_ops import fused_ops_enabled
    model, tok = real_model
    cfg = ltuning.make_config(method, label_names=["negative", "positive"])
    torch.manual_seed(0)
    m = ltuning.patch(model, cfg, tok)
    if model.config.model_type == "llama":
        assert m.prompt_as_prefix  # used by the prompt methods
        assert fused_ops_enabled(model) == (fused_ops_available()
                                            and os.environ.get("LTUNING_FUSED_OPS") != "0")
    enc = batch(tok)
    try:
        grads = checkpointing_grads(model, m, lambda: m.loss(enc["input_ids"], enc["attention_mask"],
                                                             torch.tensor([1, 0, 0]))[0])
    finally:
        ltuning.unpatch(m)
    assert grads[0].abs().sum() > 0 and rel_err(grads[1], grads[0]) < 1e-5


def test_decoder_torch_compile_matches_eager(smollm):
    """torch.compile traces the patched decoder (custom-op kernels, the rotary dispatcher, the shared prompt
    prefix); ``aot_eager`` checks the graph and the backward without inductor's slow code generation."""
    model, tok = smollm
    m = ltuning.patch(model, ltuning.make_config("lt-prompt", label_names=["negative", "positive"]), tok)
    enc = batch(tok)
    labels = torch.tensor([1, 0, 0])
    try:
        out = []
        for fn in (m.loss, torch.compile(m.loss, backend="aot_eager")):
            m.zero_grad()
            loss, scores = fn(enc["input_ids"], enc["attention_mask"], labels)
            loss.backward()
            out.append((scores.detach(), torch.cat([p.grad.flatten() for p in m.trainable_parameters()])))
    finally:
        ltuning.unpatch(m)
    (s0, g0), (s1, g1) = out
    assert rel_err(s1, s0) < 1e-5 and rel_err(g1, g0) < 1e-5
