"""C++ CPU shared-prefix attention kernel vs the float64 reference (forward, backward, varlen, fuzzing).

Errors are relative to the float64 reference: fp32 uses max|a - r| / max|r| < 1e-5; bf16 uses
||a - r|| / ||r|| < 1e-2 (inputs are the same bf16 tensors upcast, so only the kernel's rounding counts).
"""
import math
import random

import pytest
import torch

from ltuning.kernels.cpu import prefix_attention as cpa
from ltuning.kernels import prefix_attention_reference, prefix_attention_varlen_reference
from testutil import max_rel, rel_err

pytestmark = pytest.mark.skipif(not cpa.is_available(), reason="C++ prefix-attention extension did not build")


def assert_close(a, r, dtype, what):
    assert a.shape == r.shape, f"{what}: shape {tuple(a.shape)} != {tuple(r.shape)}"
    if r.numel() == 0:
        return
    assert not torch.isnan(a).any(), f"{what}: NaN"
    if dtype == torch.bfloat16:
        err, tol = rel_err(a, r), 1e-2
    else:
        err, tol = max_rel(a, r), 1e-5 if dtype == torch.float32 else 1e-10
    assert err < tol, f"{what}: rel. error {err:.2e} >= {tol:.0e}"


def make_inputs(B, Hq, Hkv, Lq, Lk, D, P, N, dtype, *, mask=False, scale=False, empty_rows=False, gen=None):
    """HF-style non-contiguous q/k/v (transposes of (B, L, H, D)), a bank, prefix_idx, optional mask and scale."""
    g = gen or torch.Generator().manual_seed(0)
    q = torch.randn(B, Lq, Hq, D, generator=g).to(dtype).transpose(1, 2)
    k = torch.randn(B, Lk, Hkv, D, generator=g).to(dtype).transpose(1, 2)
    v = torch.randn(B, Lk, Hkv, D, generator=g).to(dtype).transpose(1, 2)
    bank_k = torch.randn(N, Hkv, P, D, generator=g).to(dtype) if P else None
    bank_v = torch.randn(N, Hkv, P, D, generator=g).to(dtype) if P else None
    idx = torch.randint(0, N, (B,), generator=g) if P else None
    kpm = None
    if mask:
        kpm = torch.rand(B, Lk, generator=g) > 0.3
        if empty_rows:
            kpm[0] = False  # a sequence whose keys are all padding
    ps = (torch.rand(B, P, generator=g) + 0.5).to(dtype) if (scale and P) else None
    return q, k, v, bank_k, bank_v, idx, kpm, ps


def run_both(q, k, v, bank_k, bank_v, idx, kpm, ps, causal, grad=True, gen=None, softmax_scale=None,
             prefix_lengths=None, prefix_bias=None):
    """(ours, reference) lists [o, lse, dq, dk, dv, dbank_k, dbank_v, dprefix_scale] (None where absent)."""
    leaves = [t.detach().clone().requires_grad_() if t is not None else None for t in (q, k, v, bank_k, bank_v, ps)]
    ref_leaves = [t.detach().double().requires_grad_() if t is not None else None for t in (q, k, v, bank_k, bank_v, ps)]
    o, lse = cpa.prefix_attention_cpu(*leaves[:5], idx, key_padding_mask=kpm, causal=causal, prefix_scale=leaves[5],
                                      softmax_scale=softmax_scale, prefix_lengths=prefix_lengths,
                                      prefix_bias=prefix_bias)
    ro, rlse = prefix_attention_reference(*ref_leaves[:5], idx, key_padding_mask=kpm, causal=causal,
                                          prefix_scale=ref_leaves[5], softmax_scale=softmax_scale,
                                          prefix_lengths=prefix_lengths,
                                          prefix_bias=None if prefix_bias is None else prefix_bias.double())
    out, ref = [o, lse], [ro, rlse]
    if grad:  # loss = <o, go> + <lse, gl> over finite lse entries (exercises the lse gradient too)
        g = gen or torch.Generator().manual_seed(1)
        go = torch.randn(o.shape, generator=g).to(o.dtype)
        gl = torch.randn(lse.shape, generator=g) * torch.isfinite(rlse)
        loss = (o.double() * go.double()).sum() + (lse.double().nan_to_num(0, 0, 0) * gl).sum()
        rloss = (ro * go.double()).sum() + (rlse.nan_to_num(0, 0, 0) * gl).sum()
        gs = iter(torch.autograd.grad(loss, [t for t in leaves if t is not None]))
        rs = iter(torch.autograd.grad(rloss, [t for t in ref_leaves if t is not None]))
        out += [next(gs) if t is not None else None for t in leaves]
        ref += [next(rs) if t is not None else None for t in ref_leaves]
    return out, ref


NAMES = ["o", "lse", "dq", "dk", "dv", "dbank_k", "dbank_v", "dprefix_scale"]


def check(out, ref, dtype, tag=""):
    for name, a, r in zip(NAMES, out, ref):
        if r is None:
            assert a is None, f"{tag} {name}: expected no gradient"
            continue
        if name == "lse":
            fin = torch.isfinite(r)
            assert torch.equal(torch.isfinite(a), fin), f"{tag} lse: -inf pattern differs"
            a, r = a[fin], r[fin]
            if r.numel() == 0:
                continue
            assert_close(a, r, torch.float32 if dtype != torch.float64 else dtype, f"{tag} {name}")
            continue
        assert_close(a, r, dtype, f"{tag} {name}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("Hq,Hkv", [(4, 4), (9, 3), (8, 1)])
def test_matches_reference(dtype, causal, Hq, Hkv):
    B, L, D, P, N = 3, 45, 64, 20, 2
    inputs = make_inputs(B, Hq, Hkv, L, L, D, P, N, dtype, mask=not causal, scale=True,
                         gen=torch.Generator().manual_seed(Hq * 10 + causal))
    out, ref = run_both(*inputs, causal)
    check(out, ref, dtype, f"{dtype} causal={causal} g={Hq // Hkv}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("causal", [False, True])
def test_prefix_lengths_match_reference(dtype, causal):
    """Right-padded bank entries (label texts of unequal length): row b sees only the first
    prefix_lengths[idx[b]] prefix keys; lengths 0, odd and full P, GQA, padding (with an all-padding row)."""
    B, Hq, Hkv, L, D, P, N = 6, 9, 3, 29, 64, 21, 4
    inputs = make_inputs(B, Hq, Hkv, L, L, D, P, N, dtype, mask=True, scale=True, empty_rows=True,
                         gen=torch.Generator().manual_seed(7 + causal))
    idx = torch.tensor([0, 1, 2, 3, 1, 2])  # row 0 (all keys padded) uses the length-0 entry: no key at all
    plen = torch.tensor([0, 13, P, 1], dtype=torch.int32)
    inputs = inputs[:5] + (idx,) + inputs[6:]
    out, ref = run_both(*inputs, causal, prefix_lengths=plen)
    check(out, ref, dtype, f"{dtype} causal={causal} prefix_lengths")
    assert torch.isinf(out[1][0]).all() and (out[0][0] == 0).all()  # nothing visible: o = 0, lse = -inf
    for n in range(N):  # d(bank) beyond an entry's length is exactly zero
        assert (out[5][n, :, int(plen[n]):] == 0).all() and (out[6][n, :, int(plen[n]):] == 0).all()
    assert (out[7][torch.arange(P)[None] >= plen[idx].long()[:, None]] == 0).all()  # d(prefix_scale) too


def test_prefix_lengths_hide_the_padded_bank_positions():
    """What sits beyond an entry's length has no influence; all lengths = P equals no lengths, bit for bit."""
    q, k, v, bk, bv, idx, kpm, ps = make_inputs(3, 6, 2, 17, 17, 32, 11, 2, torch.float32, mask=True, scale=True)
    plen = torch.tensor([4, 9])
    o1, _ = cpa.prefix_attention_cpu(q, k, v, bk, bv, idx, key_padding_mask=kpm, prefix_scale=ps, prefix_lengths=plen)
    bk2, bv2 = bk.clone(), bv.clone()
    bk2[0, :, 4:], bv2[1, :, 9:] = 1e3, float("nan")
    o2, _ = cpa.prefix_attention_cpu(q, k, v, bk2, bv2, idx, key_padding_mask=kpm, prefix_scale=ps,
                                     prefix_lengths=plen)
    assert torch.equal(o1, o2)
    full = torch.full((2,), 11)
    o3, _ = cpa.prefix_attention_cpu(q, k, v, bk, bv, idx, key_padding_mask=kpm, prefix_scale=ps, prefix_lengths=full)
    o4, _ = cpa.prefix_attention_cpu(q, k, v, bk, bv, idx, key_padding_mask=kpm, prefix_scale=ps)
    assert torch.equal(o3, o4)
    with pytest.raises(ValueError, match="prefix_lengths"):
        cpa.prefix_attention_cpu(q, k, v, bk, bv, idx, prefix_lengths=torch.tensor([1, 2, 3]))
    with pytest.raises(ValueError, match="prefix_lengths"):
        cpa.prefix_attention_cpu(q, k, v, bk, bv, idx, prefix_lengths=torch.tensor([1, 12]))
    cu = torch.tensor([0, 3, 6])  # varlen (two sequences of 3 tokens): the same one-line check
    packed = [t[:2, :, :3].transpose(1, 2).reshape(6, t.shape[1], t.shape[3]) for t in (q, k, v)]
    with pytest.raises(ValueError, match=r"prefix_lengths must be an \(N=2,\) integer tensor"):
        cpa.prefix_attention_varlen_cpu(*packed, cu, bk, bv, idx[:2], prefix_lengths=torch.tensor([1.0, 2.0]))


def test_no_prefix_and_padding_only_rows():
    """P = 0 and a sequence whose keys are all padding: o = 0, lse = -inf, zero gradients there."""
    inputs = make_inputs(3, 4, 2, 17, 17, 32, 0, 1, torch.float32, mask=True, empty_rows=True)
    out, ref = run_both(*inputs, causal=False)
    check(out, ref, torch.float32)
    assert (out[0][0] == 0).all() and torch.isinf(out[1][0]).all()
    # causal with more queries than keys: the first queries see no sequence key
    inputs = make_inputs(2, 6, 3, 20, 7, 16, 0, 1, torch.float32)
    out, ref = run_both(*inputs, causal=True)
    check(out, ref, torch.float32)
    # no sequence keys at all: the prefix alone
    inputs = make_inputs(2, 4, 2, 5, 0, 16, 3, 2, torch.float32)
    out, ref = run_both(*inputs, causal=False, softmax_scale=0.3)
    check(out, ref, torch.float32)


def test_gradcheck_float64():
    g = torch.Generator().manual_seed(3)
    for causal, mask, P in [(True, False, 3), (False, True, 2), (True, True, 1)]:
        q, k, v, bk, bv, idx, kpm, ps = make_inputs(2, 4, 2, 5, 5, 4, P, 2, torch.float64, mask=mask, scale=True, gen=g)
        if kpm is not None:
            kpm[:, 0] = True  # every row keeps a visible key so lse stays finite
        leaves = [t.detach().clone().requires_grad_() for t in (q, k, v, bk, bv, ps)]

        def fn(q, k, v, bk, bv, ps):  # lse is float32 by contract, too coarse for finite differences
            return cpa.prefix_attention_cpu(q, k, v, bk, bv, idx, key_padding_mask=kpm, causal=causal,
                                            prefix_scale=ps)[0]

        assert torch.autograd.gradcheck(fn, leaves, eps=1e-6, atol=1e-8, rtol=1e-6, fast_mode=True)


def test_varlen():
    g = torch.Generator().manual_seed(5)
    lens = [5, 1, 0, 33, 64, 17]
    cu = torch.tensor([0] + list(torch.tensor(lens).cumsum(0)), dtype=torch.int32)
    T, Hq, Hkv, D, P, N = int(cu[-1]), 6, 2, 32, 7, 3
    for dtype in (torch.float32, torch.bfloat16):
        for causal, scale in [(True, True), (False, False)]:
            q = torch.randn(T, Hq, D, generator=g).to(dtype)
            k = torch.randn(T, Hkv, D, generator=g).to(dtype)
            v = torch.randn(T, Hkv, D, generator=g).to(dtype)
            bk = torch.randn(N, Hkv, P, D, generator=g).to(dtype)
            bv = torch.randn(N, Hkv, P, D, generator=g).to(dtype)
            idx = torch.randint(0, N, (len(lens),), generator=g)
            ps = (torch.rand(len(lens), P, generator=g) + 0.5) if scale else None
            plen = torch.randint(0, P + 1, (N,), generator=g) if scale else None
            leaves = [t.clone().requires_grad_() if t is not None else None for t in (q, k, v, bk, bv, ps)]
            rleaves = [t.double().requires_grad_() if t is not None else None for t in (q, k, v, bk, bv, ps)]
            o, lse = cpa.prefix_attention_varlen_cpu(*leaves[:3], cu, *leaves[3:5], idx, max_seqlen=max(lens),
                                                     causal=causal, prefix_scale=leaves[5], prefix_lengths=plen)
            ro, rlse = prefix_attention_varlen_reference(*rleaves[:3], cu, *rleaves[3:5], idx, causal=causal,
                                                         prefix_scale=rleaves[5], prefix_lengths=plen)
            go = torch.randn(o.shape, generator=g)
            used = [t for t in leaves if t is not None]
            rused = [t for t in rleaves if t is not None]
            grads = torch.autograd.grad(o, used, go.to(dtype))
            rgrads = torch.autograd.grad(ro, rused, go.double())
            assert_close(o, ro, dtype, "varlen o")
            fin = torch.isfinite(rlse)
            assert torch.equal(torch.isfinite(lse), fin), "varlen lse: -inf pattern differs"
            assert_close(lse[fin], rlse[fin], torch.float32, "varlen lse")
            for name, a, r in zip(["dq", "dk", "dv", "dbank_k", "dbank_v", "dprefix_scale"], grads, rgrads):
                assert_close(a, r, dtype, f"varlen {name}")


@pytest.mark.parametrize("dtype,cases", [(torch.float32, 24), (torch.bfloat16, 8)])
def test_fuzz(dtype, cases):
    """Random shapes: odd lengths and head dims, Lq != Lk, P in {0, 1, odd}, GQA 1/3/8, masks, prefix_scale,
    per-entry prefix lengths, causal or not."""
    rng = random.Random(cases)
    for case in range(cases):
        Hkv = rng.choice([1, 2, 3])
        Hq = Hkv * rng.choice([1, 3, 8])
        D = rng.choice([7, 8, 16, 24, 33, 64, 80])
        Lk = rng.randint(1, 150)
        Lq = Lk if rng.random() < 0.5 else rng.randint(1, Lk + 10)
        P = rng.choice([0, 1, 5, 16, 17, 33])
        causal, mask = rng.random() < 0.5, rng.random() < 0.4
        N = rng.randint(1, 3)
        inputs = make_inputs(rng.randint(1, 4), Hq, Hkv, Lq, Lk, D, P, N, dtype, mask=mask,
                             scale=rng.random() < 0.5, empty_rows=mask and rng.random() < 0.5,
                             gen=torch.Generator().manual_seed(case))
        plen = torch.tensor([rng.randint(0, P) for _ in range(N)]) if (P and rng.random() < 0.5) else None
        out, ref = run_both(*inputs, causal, prefix_lengths=plen)
        check(out, ref, dtype, f"case {case}")


def test_every_output_written():
    """With deterministic mode torch.empty fills NaN: any element the kernel forgets to write shows up."""
    prev = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        assert torch.isnan(torch.empty(4)).all()
        for dtype in (torch.float32, torch.bfloat16):
            inputs = make_inputs(3, 6, 2, 19, 23, 40, 9, 4, dtype, mask=True, scale=True, empty_rows=True)
            out, ref = run_both(*inputs, causal=True)
            for name, a in zip(NAMES, out):
                if a is not None:
                    assert not torch.isnan(a).any(), f"{dtype} {name} has NaN elements (unwritten, or read from an unpacked slot)"
            check(out, ref, dtype)
    finally:
        torch.use_deterministic_algorithms(prev)


def test_deterministic_bank_gradient():
    """d(bank) is reduced in a fixed order: bitwise identical across runs and thread counts."""
    inputs = make_inputs(8, 8, 2, 64, 64, 32, 12, 2, torch.float32, scale=True)
    threads = torch.get_num_threads()
    grads = []
    try:
        for nt in (1, max(2, threads), max(2, threads)):
            torch.set_num_threads(nt)
            out, _ = run_both(*inputs, causal=True)
            grads.append([t for t in out[2:] if t is not None])
    finally:
        torch.set_num_threads(threads)
    for gs in grads[1:]:
        for a, b in zip(grads[0], gs):
            assert torch.equal(a, b)


def test_float16_and_dtype_mix():
    """float16 runs in float32; an fp32 bank with bf16 activations is cast to the activations' dtype."""
    q, k, v, bk, bv, idx, _, _ = make_inputs(2, 4, 2, 9, 9, 16, 3, 2, torch.float16)
    o, lse = cpa.prefix_attention_cpu(q, k, v, bk, bv, idx, causal=True)
    ro, _ = prefix_attention_reference(q.double(), k.double(), v.double(), bk.double(), bv.double(), idx, causal=True)
    assert o.dtype == torch.float16 and lse.dtype == torch.float32
    assert max_rel(o, ro) < 2e-3
    q, k, v, bk, bv, idx, _, _ = make_inputs(2, 4, 2, 9, 9, 16, 3, 2, torch.bfloat16)
    bk32 = bk.float().requires_grad_()
    o, _ = cpa.prefix_attention_cpu(q, k, v, bk32, bv.float(), idx)
    o.float().sum().backward()
    assert o.dtype == torch.bfloat16 and bk32.grad.dtype == torch.float32


def test_dispatch_and_compile():
    """Reachable through the dispatcher; a custom op, so torch.compile traces it without a graph break."""
    from ltuning.kernels import prefix_attention

    q, k, v, bk, bv, idx, _, ps = make_inputs(2, 6, 3, 11, 11, 16, 4, 2, torch.float32, scale=True)
    o = prefix_attention(q, k, v, bk, bv, idx, causal=True, prefix_scale=ps, backend="cpu")
    ro, _ = prefix_attention_reference(q, k, v, bk, bv, idx, causal=True, prefix_scale=ps)
    assert max_rel(o, ro) < 1e-5

    leaves = [t.clone().requires_grad_() for t in (q, k, v, bk, bv)]

    def f(q, k, v, bk, bv):
        o, lse = cpa.prefix_attention_cpu(q, k, v, bk, bv, idx, causal=True, prefix_scale=ps)
        return (o * o).sum() + lse.sum()

    compiled = torch.compile(f, backend="aot_eager", fullgraph=True)
    loss = compiled(*leaves)
    grads = torch.autograd.grad(loss, leaves)
    ref_leaves = [t.clone().requires_grad_() for t in (q, k, v, bk, bv)]
    rgrads = torch.autograd.grad(f(*ref_leaves), ref_leaves)
    assert math.isclose(loss.item(), f(*ref_leaves).item(), rel_tol=1e-6)
    for a, b in zip(grads, rgrads):
        assert max_rel(a, b) < 1e-6


def test_fallback_without_compiler(tmp_path):
    """No C++ compiler: is_available() is False with one warning and the reference answers instead."""
    import subprocess
    import sys
    import textwrap

    code = textwrap.dedent("""
        import warnings, torch
        from ltuning.kernels.cpu import prefix_attention as cpa
        from ltuning.kernels import prefix_attention_reference
        with warnings.catch_warnings(record=True) as w:
            warnings.simplefilter("always")
            ok = cpa.is_available()
            q = torch.randn(1, 2, 3, 4)
            o, lse = cpa.prefix_attention_cpu(q, q, q, causal=True)
        ro, _ = prefix_attention_reference(q, q, q, causal=True)
        assert not ok and torch.allclose(o, ro), ok
        assert len([x for x in w if "unavailable" in str(x.message)]) == 1, [str(x.message) for x in w]
    """)
    env = dict(__import__("os").environ, CXX=str(tmp_path / "no-such-compiler"), LTUNING_BUILD_DIR=str(tmp_path))
    res = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr[-2000:]


@pytest.mark.filterwarnings("ignore:TF32 acceleration")
def test_without_onednn_ukernel():
    """With oneDNN disabled brgemm falls back to plain GEMMs: the non-VNNI operand layouts must agree too."""
    with torch.backends.mkldnn.flags(enabled=False):
        for dtype in (torch.float32, torch.bfloat16):
            inputs = make_inputs(2, 6, 2, 37, 37, 24, 5, 2, dtype, mask=True, scale=True)
            out, ref = run_both(*inputs, causal=True)
            check(out, ref, dtype, f"no-oneDNN {dtype}")


def test_inductor_with_strided_views():
    """torch.compile (inductor) through forward and backward with the layouts models produce: q/k/v as
    transposed (B, L, H, D) views and the bank as a permuted view of an MLP output. Inductor asserts the
    strides the fake kernels promise, so a kernel returning another layout fails here (it once did for
    the bank gradient)."""
    B, H, Hkv, L, D, P, N = 2, 6, 3, 9, 16, 5, 2
    raw = [torch.randn(B, L, H, D), torch.randn(B, L, Hkv, D), torch.randn(B, L, Hkv, D),
           torch.randn(N, P, Hkv, D), torch.randn(N, P, Hkv, D)]
    idx = torch.tensor([1, 0])

    def f(q, k, v, bk, bv):  # (B, L, H, D) -> (B, H, L, D) and (N, P, H, D) -> (N, H, P, D) views, as in models
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))
        bk, bv = (t.permute(0, 2, 1, 3) for t in (bk, bv))
        o, lse = cpa.prefix_attention_cpu(q, k, v, bk, bv, idx, causal=True)
        return (o * o).sum() + lse.sum()

    la, lb = ([t.clone().requires_grad_() for t in raw] for _ in range(2))
    loss = torch.compile(f, backend="inductor", fullgraph=True)(*la)
    grads = torch.autograd.grad(loss, la)
    ref = f(*lb)
    rgrads = torch.autograd.grad(ref, lb)
    assert math.isclose(loss.item(), ref.item(), rel_tol=1e-5)
    for a, b in zip(grads, rgrads):
        assert max_rel(a, b) < 1e-5


# ---------------------------------------------------------------------------------------------------------------
# Bank entries packed once per call (the forward packs every used (entry, KV head) block before its task loop):
# one long entry shared by many short sequences (one-pass label scoring), several entries of unequal length with
# unused ones. Outputs are NaN-prefilled (deterministic mode: torch.empty fills NaN, and so does the kernel's
# packed-bank buffer, so an element that is read but never packed shows up as NaN too).

class _NanFill:
    def __enter__(self):
        self.prev = torch.are_deterministic_algorithms_enabled()
        torch.use_deterministic_algorithms(True)
        assert torch.isnan(torch.empty(4)).all()

    def __exit__(self, *exc):
        torch.use_deterministic_algorithms(self.prev)


def run_varlen_both(lens, Hq, Hkv, D, P, N, dtype, idx, causal, gen, plen=None, scale=False, bias=None):
    """(ours, reference) lists [o, lse, dq, dk, dv, dbank_k, dbank_v, dprefix_scale] for the packed form; the loss
    is <o, go> + <lse, gl> over the finite lse entries."""
    cu = torch.tensor([0] + list(torch.tensor(lens).cumsum(0)), dtype=torch.int32)
    T = int(cu[-1])
    base = [torch.randn(T, Hq, D, generator=gen), torch.randn(T, Hkv, D, generator=gen),
            torch.randn(T, Hkv, D, generator=gen), torch.randn(N, Hkv, P, D, generator=gen),
            torch.randn(N, Hkv, P, D, generator=gen)]
    sdt = torch.float64 if dtype == torch.float64 else torch.float32  # prefix_scale: fp32, or fp64 for fp64
    base = [t.to(dtype) for t in base] + [(torch.rand(len(lens), P, generator=gen) + 0.5).to(sdt) if scale else None]
    leaves = [t.clone().requires_grad_() if t is not None else None for t in base]
    rleaves = [t.double().requires_grad_() if t is not None else None for t in base]
    o, lse = cpa.prefix_attention_varlen_cpu(*leaves[:3], cu, *leaves[3:5], idx, causal=causal,
                                             prefix_scale=leaves[5], prefix_lengths=plen, prefix_bias=bias)
    ro, rlse = prefix_attention_varlen_reference(*rleaves[:3], cu, *rleaves[3:5], idx, causal=causal,
                                                 prefix_scale=rleaves[5], prefix_lengths=plen,
                                                 prefix_bias=None if bias is None else bias.double())
    go = torch.randn(o.shape, generator=gen).to(o.dtype)
    gl = torch.randn(lse.shape, generator=gen) * torch.isfinite(rlse)
    loss = (o.double() * go.double()).sum() + (lse.double().nan_to_num(0, 0, 0) * gl).sum()
    rloss = (ro * go.double()).sum() + (rlse.nan_to_num(0, 0, 0) * gl).sum()
    gs = iter(torch.autograd.grad(loss, [t for t in leaves if t is not None]))
    rs = iter(torch.autograd.grad(rloss, [t for t in rleaves if t is not None]))
    return ([o, lse] + [next(gs) if t is not None else None for t in leaves],
            [ro, rlse] + [next(rs) if t is not None else None for t in rleaves])


def assert_all_written(out, tag):
    for name, a in zip(NAMES, out):
        if a is not None:
            assert not torch.isnan(a).any(), f"{tag} {name} has NaN elements (unwritten, or read from an unpacked slot)"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("Hq,Hkv,D", [(9, 3, 64), (12, 12, 32)])
@pytest.mark.parametrize("layout", ["dense", "varlen"])
def test_long_entry_shared_by_many_short_sequences(dtype, causal, Hq, Hkv, D, layout, seed):
    """One-pass scoring shape: N = 1 entry of P ~ 600-900 tokens (a right-padded length below P) read by 20-40
    short sequences; dense with key padding (one all-padding sequence) or varlen with lengths 1..20; half the
    cases pass prefix_scale."""
    gen = torch.Generator().manual_seed(seed)
    rng = random.Random(seed)
    B, P = rng.randint(20, 40), rng.randint(600, 900)
    plen = torch.tensor([P - rng.randint(1, 40)])
    idx = torch.zeros(B, dtype=torch.long)
    tag = f"{dtype} causal={causal} g={Hq // Hkv} D={D} {layout} B={B} P={P}"
    with _NanFill():
        if layout == "dense":
            L = rng.randint(10, 20)
            inputs = make_inputs(B, Hq, Hkv, L, L, D, P, 1, dtype, mask=not causal, scale=causal, empty_rows=True,
                                 gen=gen)
            out, ref = run_both(*inputs[:5], idx, *inputs[6:], causal, gen=gen, prefix_lengths=plen)
        else:
            lens = [rng.randint(1, 20) for _ in range(B)]
            out, ref = run_varlen_both(lens, Hq, Hkv, D, P, 1, dtype, idx, causal, gen, plen=plen, scale=not causal)
    assert_all_written(out, tag)
    check(out, ref, dtype, tag)
    assert (out[5][:, :, int(plen):] == 0).all() and (out[6][:, :, int(plen):] == 0).all(), tag


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("scale", [False, True])
def test_entries_of_unequal_length_some_unused(dtype, causal, scale, seed):
    """N = 5 entries of P = 300 slots with lengths (0, 300, 37, 251, 1); entries 1 and 4 are read by no sequence
    (not packed: their bank gradient is exactly zero), the zero-length entry by a few; GQA 9/3, D = 64; with and
    without prefix_scale."""
    gen = torch.Generator().manual_seed(seed)
    B, Hq, Hkv, L, D, P, N = 12, 9, 3, 13, 64, 300, 5
    plen = torch.tensor([0, P, 37, 251, 1])
    idx = torch.tensor([0, 2, 3, 2, 3, 3, 0, 2, 2, 3, 0, 3])
    with _NanFill():
        inputs = make_inputs(B, Hq, Hkv, L, L, D, P, N, dtype, mask=True, scale=scale, gen=gen)
        out, ref = run_both(*inputs[:5], idx, *inputs[6:], causal, gen=gen, prefix_lengths=plen)
    tag = f"{dtype} causal={causal} scale={scale}"
    assert_all_written(out, tag)
    check(out, ref, dtype, tag)
    for n in range(N):
        assert (out[5][n, :, int(plen[n]):] == 0).all() and (out[6][n, :, int(plen[n]):] == 0).all(), f"{tag} n={n}"
    for n in (1, 4):
        assert (out[5][n] == 0).all() and (out[6][n] == 0).all(), f"{tag} unused entry {n}"


def random_bias(N, P, gen):
    """(N, P) fp32 prefix biases: log of multiplicities 1..5 (a deduplicated bank) minus a little noise."""
    return (torch.randint(1, 6, (N, P), generator=gen).float().log() - 0.5 * torch.rand(N, P, generator=gen))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("layout", ["dense", "varlen"])
def test_prefix_bias_matches_reference(dtype, causal, layout, seed):
    """prefix_bias (N, P) adds bias[idx[b], j] to prefix logit j, in the forward and the backward alike; with
    entries of unequal length (one zero-length, one unused), GQA 9/3, prefix_scale in the causal cases, odd P."""
    gen = torch.Generator().manual_seed(seed)
    rng = random.Random(seed)
    Hq, Hkv, D, N, P = 9, 3, 32, 4, rng.randint(40, 90)
    plen = torch.tensor([P, 0, rng.randint(1, P - 1), P])
    bias = random_bias(N, P, gen)
    tag = f"{dtype} causal={causal} {layout} P={P}"
    with _NanFill():
        if layout == "dense":
            B, L = 6, rng.randint(3, 17)
            idx = torch.tensor([0, 2, 1, 2, 0, 2])
            inputs = make_inputs(B, Hq, Hkv, L, L, D, P, N, dtype, mask=not causal, scale=causal, gen=gen)
            out, ref = run_both(*inputs[:5], idx, *inputs[6:], causal, gen=gen, prefix_lengths=plen,
                                prefix_bias=bias)
        else:
            lens = [rng.randint(1, 15) for _ in range(7)]
            idx = torch.tensor([2, 0, 1, 0, 2, 2, 0])
            out, ref = run_varlen_both(lens, Hq, Hkv, D, P, N, dtype, idx, causal, gen, plen=plen, scale=causal,
                                       bias=bias)
    assert_all_written(out, tag)
    check(out, ref, dtype, tag)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_prefix_bias_log_multiplicity_equals_duplicated_tokens(dtype, seed):
    """The identity a deduplicated bank relies on: a bank whose tokens repeat (m_j copies of token j) attends
    exactly as the bank of its distinct tokens with bias log m_j, and the distinct token's bank gradient is the
    sum of its copies' gradients."""
    gen = torch.Generator().manual_seed(seed)
    B, Hq, Hkv, L, D, U = 5, 9, 3, 11, 64, 23
    mult = torch.randint(1, 5, (U,), generator=gen)
    owner = torch.repeat_interleave(torch.arange(U), mult)  # full-bank token -> distinct token
    owner = owner[torch.randperm(owner.numel(), generator=gen)]
    uk, uv = (torch.randn(1, Hkv, U, D, generator=gen).to(dtype) for _ in range(2))
    q = torch.randn(B, Hq, L, D, generator=gen).to(dtype)
    k, v = (torch.randn(B, Hkv, L, D, generator=gen).to(dtype) for _ in range(2))
    idx = torch.zeros(B, dtype=torch.long)

    def grads(bank_k, bank_v, bias):
        leaves = [t.clone().requires_grad_() for t in (q, k, v, bank_k, bank_v)]
        o, lse = cpa.prefix_attention_cpu(*leaves, idx, causal=True, prefix_bias=bias)
        go = torch.randn(o.shape, generator=torch.Generator().manual_seed(7)).to(dtype)
        return [o, lse, *torch.autograd.grad((o * go).sum() + lse.sum(), leaves)]

    full = grads(uk[:, :, owner], uv[:, :, owner], None)
    dedup = grads(uk, uv, mult.to(dtype).log()[None])
    tol = 1e-5 if dtype == torch.float32 else 1e-12
    for name, a, r in zip(["o", "lse", "dq", "dk", "dv"], dedup, full):
        assert max_rel(a, r) < tol, f"{name}: {max_rel(a, r):.2e}"
    for name, a, r in zip(["dbank_k", "dbank_v"], dedup[5:], full[5:]):
        summed = torch.zeros_like(a).index_add_(2, owner, r)  # copies' gradients summed per distinct token
        assert max_rel(a, summed) < tol, f"{name}: {max_rel(a, summed):.2e}"


def test_prefix_bias_validation():
    q, k, v, bk, bv, idx, _, _ = make_inputs(2, 4, 2, 3, 3, 8, 5, 3, torch.float32)
    for bias, msg in ((torch.zeros(3, 4), r"prefix_bias must be \(N=3, P=5\)"),
                      (torch.zeros(3, 5, dtype=torch.long), "prefix_bias must be floating"),
                      (torch.full((3, 5), float("inf")), "prefix_bias values must be finite")):
        with pytest.raises(ValueError, match=msg):
            cpa.prefix_attention_cpu(q, k, v, bk, bv, idx, prefix_bias=bias)
    with pytest.raises(ValueError, match="prefix_bias values must be finite"):  # the raw op checks too
        cpa._ext().forward(q, k, v, bk, bv, idx, None, None, None, False, 0.3, None, torch.full((3, 5), float("nan")))
