"""C++ fused Llama ops (RMSNorm, SwiGLU, rotary embedding) vs the float64 references, and the patched model.

Inputs are fresh random tensors every run (the seed is printed on failure). Errors are relative to the float64
reference run on the same (rounded) inputs: fp32 max|a - r| / max|r| < 1e-5, bf16 ||a - r|| / ||r|| < 1e-2,
float64 < 1e-12. The kernels' outputs are checked for NaN, so an element left unwritten (the C++ code allocates
with ``empty``; the allocator's recycled memory is NaN-poisoned below) would fail.
"""
import random

import pytest
import torch

from ltuning.kernels.cpu import fused_ops as fo
from testutil import max_rel, rel_err

pytestmark = pytest.mark.skipif(not fo.is_available(), reason="C++ fused-ops extension did not build")

DTYPES = [torch.float32, torch.bfloat16, torch.float64]
SEED = random.SystemRandom().randrange(2**31)


def gen():
    return torch.Generator().manual_seed(SEED)


def assert_close(a, r, dtype, what):
    assert a is not None, f"{what}: missing"
    assert a.shape == r.shape, f"{what}: shape {tuple(a.shape)} != {tuple(r.shape)}"
    assert a.dtype == dtype, f"{what}: dtype {a.dtype} != {dtype}"
    if r.numel() == 0:
        return
    assert not torch.isnan(a).any(), f"{what}: NaN (unwritten element?) seed={SEED}"
    if dtype == torch.bfloat16:
        err, tol = rel_err(a, r), 1e-2
    else:
        err, tol = max_rel(a, r), 1e-5 if dtype == torch.float32 else 1e-12
    assert err < tol, f"{what}: rel. error {err:.2e} >= {tol:.0e} (seed={SEED})"


def poison_allocator():
    """Allocate-fill-free NaN buffers so that ``empty`` in the kernels likely returns NaN-filled memory."""
    for n in (1 << 10, 1 << 14, 1 << 18, 1 << 20):
        torch.full((n,), float("nan"))


def leaf(t, dtype, requires_grad=True):
    return t.to(dtype).requires_grad_(requires_grad)


def grads_of(out, inputs, cot):
    outs = out if isinstance(out, tuple) else (out,)
    cots = cot if isinstance(cot, tuple) else (cot,)
    want = [t for t in inputs if t.requires_grad]
    got = torch.autograd.grad(outs, want, cots, allow_unused=True)
    it = iter(got)
    return [next(it) if t.requires_grad else None for t in inputs]


# ------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(1, 7), (3, 33), (2, 5, 576), (1, 1, 16), (4100, 40)])
@pytest.mark.parametrize("weight_grad", [False, True])
def test_rms_norm(dtype, shape, weight_grad):
    g = gen()
    d = shape[-1]
    x = leaf(torch.randn(*shape, generator=g) * 3, dtype)
    w = leaf(torch.rand(d, generator=g) + 0.5, dtype, weight_grad)
    dy = torch.randn(*shape, generator=g).to(dtype)
    poison_allocator()
    y = fo.rms_norm(x, w, 1e-5)
    dx, dw = grads_of(y, (x, w), dy)
    xr, wr = x.detach().double().requires_grad_(), w.detach().double().requires_grad_(weight_grad)
    yr = fo.rms_norm_reference(xr, wr, 1e-5)
    dxr, dwr = grads_of(yr, (xr, wr), dy.double())
    assert_close(y, yr, dtype, "y")
    assert_close(dx, dxr, dtype, "dx")
    if weight_grad:
        assert_close(dw, dwr, dtype, "dweight")
    else:
        assert dw is None


def test_rms_norm_noncontiguous_and_rstd():
    g = gen()
    base = torch.randn(6, 20, 48, generator=g)
    x = base.transpose(0, 1)[..., :40].requires_grad_()  # strided view
    w = torch.rand(40, generator=g) + 0.5
    y = fo.rms_norm(x, w, 1e-6)
    yr = fo.rms_norm_reference(x.detach().double(), w.double(), 1e-6)
    assert_close(y, yr, torch.float32, "y (non-contiguous x)")
    y2, rstd = torch.ops.ltuning.fused_rms_norm_fwd(x.detach(), w, 1e-6)
    want = torch.rsqrt(x.detach().double().pow(2).mean(-1) + 1e-6)
    assert rstd.shape == x.shape[:-1] and rstd.dtype == torch.float32
    assert max_rel(rstd, want) < 1e-6
    dx, = torch.autograd.grad(y, x, torch.ones_like(y))
    assert dx.shape == x.shape and not torch.isnan(dx).any()


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(1, 1), (3, 7, 33), (5, 1536), (37, 1001)])
@pytest.mark.parametrize("need", ["both", "gate", "up"])
def test_swiglu(dtype, shape, need):
    g = gen()
    gate = leaf(torch.randn(*shape, generator=g) * 4, dtype, need in ("both", "gate"))
    up = leaf(torch.randn(*shape, generator=g), dtype, need in ("both", "up"))
    dout = torch.randn(*shape, generator=g).to(dtype)
    poison_allocator()
    o = fo.swiglu(gate, up)
    dg, du = grads_of(o, (gate, up), dout)
    gr = gate.detach().double().requires_grad_(gate.requires_grad)
    ur = up.detach().double().requires_grad_(up.requires_grad)
    orf = fo.swiglu_reference(gr, ur)
    dgr, dur = grads_of(orf, (gr, ur), dout.double())
    assert_close(o, orf, dtype, "out")
    for got, ref, t, name in ((dg, dgr, gate, "dgate"), (du, dur, up, "dup")):
        if t.requires_grad:
            assert_close(got, ref, dtype, name)
        else:
            assert got is None


def test_swiglu_extreme_and_strided():
    gate = torch.tensor([[-200.0, -90.0, -20.0, 0.0, 20.0, 90.0, 200.0]]).requires_grad_()
    up = torch.randn(1, 7).requires_grad_()
    o = fo.swiglu(gate, up)
    dg, du = torch.autograd.grad(o, (gate, up), torch.ones_like(o))
    gr, ur = gate.detach().double().requires_grad_(), up.detach().double().requires_grad_()
    orf = fo.swiglu_reference(gr, ur)
    dgr, dur = torch.autograd.grad(orf, (gr, ur), torch.ones_like(orf))
    for a, r, n in ((o, orf, "out"), (dg, dgr, "dgate"), (du, dur, "dup")):
        assert torch.isfinite(a).all(), n
        assert_close(a, r, torch.float32, n)
    base = torch.randn(9, 64, generator=gen())
    gs, us = base[:, :30].requires_grad_(), base[:, 32:62]
    assert_close(fo.swiglu(gs, us), fo.swiglu_reference(gs.detach().double(), us.double()), torch.float32, "strided")


def rope_inputs(B, Hq, Hkv, L, D, dtype, *, batch_cos=True, layout="hf", g=None):
    """q, k as transformers passes them (transposed views of (B, L, H, D)) or contiguous; cos/sin as Llama's
    rotary embedding builds them (emb = cat(freqs, freqs)) or arbitrary."""
    if layout == "hf":
        q = torch.randn(B, L, Hq, D, generator=g).transpose(1, 2)
        k = torch.randn(B, L, Hkv, D, generator=g).transpose(1, 2)
    else:
        q = torch.randn(B, Hq, L, D, generator=g)
        k = torch.randn(B, Hkv, L, D, generator=g)
    Bc = B if batch_cos else 1
    if batch_cos:
        pos = torch.randint(0, 100, (Bc, L), generator=g).double()
        inv = 1.0 / (10000 ** (torch.arange(0, D, 2).double() / D))
        freqs = pos[..., None] * inv
        emb = torch.cat((freqs, freqs), -1)
        cos, sin = emb.cos(), emb.sin()
    else:  # halves differ: checks the general formula
        cos, sin = torch.randn(Bc, L, D, generator=g), torch.randn(Bc, L, D, generator=g)
    return (leaf(q, dtype), leaf(k, dtype), cos.to(dtype), sin.to(dtype))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("dims", [(2, 4, 2, 5, 8), (1, 9, 3, 1, 64), (3, 2, 1, 17, 6), (2, 9, 3, 61, 64)])
@pytest.mark.parametrize("variant", ["hf", "contiguous-broadcast-cos"])
def test_rotary(dtype, dims, variant):
    g = gen()
    layout = "hf" if variant == "hf" else "contiguous"
    q, k, cos, sin = rope_inputs(*dims, dtype, batch_cos=variant == "hf", layout=layout, g=g)
    dq = torch.randn(q.shape, generator=g).to(dtype)
    dk = torch.randn(k.shape, generator=g).to(dtype)
    poison_allocator()
    qo, ko = fo.rotary(q, k, cos, sin)
    assert qo.stride() == q.stride() and ko.stride() == k.stride()  # layout kept: no copy for transformers
    gq, gk = torch.autograd.grad((qo, ko), (q, k), (dq, dk))
    qr, kr = q.detach().double().requires_grad_(), k.detach().double().requires_grad_()
    qor, kor = fo.rotary_reference(qr, kr, cos.double(), sin.double())
    gqr, gkr = torch.autograd.grad((qor, kor), (qr, kr), (dq.double(), dk.double()))
    for a, r, n in ((qo, qor, "q_embed"), (ko, kor, "k_embed"), (gq, gqr, "dq"), (gk, gkr, "dk")):
        assert_close(a, r, dtype, n)


def test_rotary_one_output_used_and_transformers_equivalence():
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb
    g = gen()
    q, k, cos, sin = rope_inputs(2, 4, 2, 7, 16, torch.float32, g=g)
    qo, ko = fo.rotary(q, k, cos, sin)
    qh, kh = apply_rotary_pos_emb(q.detach(), k.detach(), cos, sin)
    assert max_rel(qo, qh) < 1e-6 and max_rel(ko, kh) < 1e-6
    gq, gk = torch.autograd.grad(qo.sum(), (q, k), allow_unused=True)
    assert gk is None or torch.count_nonzero(gk) == 0
    qr = q.detach().double().requires_grad_()
    gqr, = torch.autograd.grad(fo.rotary_reference(qr, k.detach().double(), cos.double(), sin.double())[0].sum(), qr)
    assert_close(gq, gqr, torch.float32, "dq (k unused)")


def test_custom_ops_opcheck():
    g = gen()
    x, w = torch.randn(5, 24, generator=g, requires_grad=True), torch.rand(24, generator=g, requires_grad=True)
    torch.library.opcheck(torch.ops.ltuning.fused_rms_norm_fwd, (x, w, 1e-6))
    gate, up = torch.randn(4, 19, generator=g, requires_grad=True), torch.randn(4, 19, generator=g, requires_grad=True)
    torch.library.opcheck(torch.ops.ltuning.fused_swiglu_fwd, (gate, up))
    q, k, cos, sin = rope_inputs(2, 4, 2, 5, 8, torch.float32, g=g)
    torch.library.opcheck(torch.ops.ltuning.fused_rotary, (q, k, cos, sin, False))


def test_fallback_when_unavailable(monkeypatch):
    monkeypatch.setattr(fo._EXT, "ok", False)
    x, w = torch.randn(3, 8), torch.rand(8)
    assert torch.equal(fo.rms_norm(x, w, 1e-6), fo.rms_norm_reference(x, w, 1e-6))
    from ltuning.models.fused_ops import enable_fused_ops
    m = torch.nn.Linear(2, 2)
    assert sum(enable_fused_ops(m).values()) == 0


# ------------------------------------------------------------------------------------------------------------
# The patched transformers model

def tiny_llama(dtype=torch.float32, seed=0):
    from transformers import LlamaConfig, LlamaModel
    torch.manual_seed(seed)
    cfg = LlamaConfig(hidden_size=40, intermediate_size=72, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=64, max_position_embeddings=128, rms_norm_eps=1e-5)
    m = LlamaModel(cfg).eval().to(dtype)
    with torch.no_grad():  # non-trivial norm weights
        for mod in m.modules():
            if type(mod).__name__ == "LlamaRMSNorm":
                mod.weight.uniform_(0.5, 1.5)
    return m


def run_model(m, emb, dout, mask=None):
    e = emb.clone().requires_grad_()
    out = m(inputs_embeds=e, attention_mask=mask).last_hidden_state
    params = [p for n, p in m.named_parameters() if p.requires_grad and "embed_tokens" not in n]
    grads = torch.autograd.grad(out, [e] + params, dout)
    return out.detach(), grads[0], grads[1:]


@pytest.mark.parametrize("weights_trainable", [False, True])
def test_patched_llama_matches(weights_trainable):
    import transformers.models.llama.modeling_llama as ml
    from ltuning.models.fused_ops import disable_fused_ops, enable_fused_ops
    m = tiny_llama()
    for p in m.parameters():
        p.requires_grad_(weights_trainable)
    g = gen()
    emb = torch.randn(3, 13, 40, generator=g)
    dout = torch.randn(3, 13, 40, generator=g)
    mask = torch.ones(3, 13, dtype=torch.long)
    mask[1, 9:] = 0
    original_rope = ml.apply_rotary_pos_emb
    ref = run_model(m, emb, dout, mask)
    counts = enable_fused_ops(m)
    assert counts == {"rms_norm": 5, "swiglu": 2, "rotary": 2}
    assert ml.apply_rotary_pos_emb is not original_rope
    assert enable_fused_ops(m) == {"rms_norm": 0, "swiglu": 0, "rotary": 0}  # idempotent
    fused = run_model(m, emb, dout, mask)
    disable_fused_ops(m)
    assert ml.apply_rotary_pos_emb is original_rope
    assert all("forward" not in mod.__dict__ for mod in m.modules())
    again = run_model(m, emb, dout, mask)
    assert torch.equal(again[0], ref[0]) and torch.equal(again[1], ref[1])
    m64 = tiny_llama(torch.float64)
    m64.load_state_dict(m.state_dict())
    for p in m64.parameters():
        p.requires_grad_(weights_trainable)
    exact = run_model(m64, emb.double(), dout.double(), mask)
    for name, got, want, oracle in (("last_hidden_state", fused[0], ref[0], exact[0]),
                                    ("input grad", fused[1], ref[1], exact[1])):
        assert max_rel(got, want) < 1e-5, f"{name}: fused vs unpatched {max_rel(got, want):.2e}"
        assert max_rel(got, oracle) < 2 * max_rel(want, oracle) + 1e-6, name
    if weights_trainable:  # including the RMSNorm weights
        assert len(fused[2]) == len(ref[2]) > 0
        for gf, gr in zip(fused[2], ref[2]):
            assert max_rel(gf, gr) < 1e-5


def test_patch_scoped_to_enabled_model_and_bf16():
    import transformers.models.llama.modeling_llama as ml
    from ltuning.models import fused_ops as patching
    from ltuning.models.fused_ops import disable_fused_ops, enable_fused_ops
    a, b = tiny_llama(seed=1), tiny_llama(seed=1)
    enable_fused_ops(a)
    calls = []
    orig = patching.rotary  # the fused kernel as the patched model calls it
    try:
        patching.rotary = lambda *args: calls.append(1) or orig(*args)
        emb = torch.randn(2, 6, 40, generator=gen())
        with torch.no_grad():
            b(inputs_embeds=emb)  # unpatched model of the same class: original RoPE
            assert not calls
            a(inputs_embeds=emb)
            assert len(calls) == 2
    finally:
        patching.rotary = orig
        disable_fused_ops(a)
    assert ml.apply_rotary_pos_emb.__module__ == ml.__name__
    m16, m32 = tiny_llama(torch.bfloat16, seed=2), tiny_llama(seed=2)
    m32.load_state_dict({k: v.float() for k, v in m16.state_dict().items()})
    emb = torch.randn(2, 9, 40, generator=gen())
    enable_fused_ops(m16)
    with torch.no_grad():
        out16 = m16(inputs_embeds=emb.bfloat16()).last_hidden_state
        out32 = m32(inputs_embeds=emb).last_hidden_state
    disable_fused_ops(m16)
    assert out16.dtype == torch.bfloat16 and rel_err(out16, out32) < 3e-2


def test_bert_left_unpatched():
    from transformers import BertConfig, BertModel
    from ltuning.models.fused_ops import enable_fused_ops
    m = BertModel(BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64))
    assert enable_fused_ops(m) == {"rms_norm": 0, "swiglu": 0, "rotary": 0}
