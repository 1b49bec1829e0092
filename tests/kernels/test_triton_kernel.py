"""Triton shared-prefix attention kernels against the float64 reference (forward, lse and every gradient).

Runs on CUDA when present, otherwise in the Triton interpreter on the CPU (``TRITON_INTERPRET=1`` is set before
the kernels are imported). Every kernel output buffer is poisoned with NaN, so an element no program writes
shows up as a NaN in the checked results. Shapes are tiny and the interpreter uses 16x16 blocks, so lengths
17..40 cross block boundaries; with ``PACK_GQA`` the forward and dQ kernels tile ``Lq * GROUP`` packed (position,
query head) rows, so with GQA shorter queries cross them too. The GQA tests force the launcher's ``pack_gqa``
decision (fixture ``pack``) so both code paths -- one program per query head, and packed rows -- are checked.
"""
import math
import os
import subprocess
import sys
import textwrap

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
pytest.importorskip("triton")

from testutil import rel_err  # noqa: E402
from ltuning.kernels import prefix_attention, prefix_attention_reference, prefix_attention_varlen_reference  # noqa: E402
from ltuning.kernels.triton import prefix_attention as tpa  # noqa: E402
from ltuning.kernels.validation import KernelInputError  # noqa: E402

if not tpa.is_available():
    pytest.skip("triton needs CUDA or TRITON_INTERPRET=1", allow_module_level=True)

DEV = "cuda" if torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1" else "cpu"
INTERPRET = DEV == "cpu"
DTYPES = [torch.float32, torch.float16, pytest.param(torch.bfloat16, marks=pytest.mark.skipif(
    INTERPRET, reason="the Triton interpreter computes bf16 dot products wrongly"))]
TOL = {torch.float32: (2e-5, 5e-5), torch.float16: (3e-3, 1e-2), torch.bfloat16: (2e-2, 5e-2)}  # (fwd, grad)


@pytest.fixture(autouse=True)
def poison(monkeypatch):
    """Kernel outputs start as NaN: every element must be written."""
    monkeypatch.setattr(tpa, "_alloc", lambda shape, dtype, device: torch.full(shape, float("nan"), dtype=dtype,
                                                                                 device=device))


@pytest.fixture
def pack(request, monkeypatch):
    """Forces the launcher's ``PACK_GQA`` decision: True packs whenever GROUP > 1 (any length), False never."""
    on = request.param
    monkeypatch.setattr(tpa, "pack_gqa", lambda group, max_lq: on and group > 1)
    return on


# both code paths of the forward and dQ kernels: one program per query head ("rows") and GQA-packed rows
BOTH = pytest.mark.parametrize("pack", [False, True], ids=["rows", "packed"], indirect=True)


def make_case(seed, B=2, Hq=4, Hkv=2, Lq=19, Lk=23, P=5, D=16, N=3, pad=0.3, scale=True, dtype=torch.float32,
              transposed=False, empty_rows=False):
    """Random inputs; ``transposed`` makes q/k/v non-contiguous views of (B, L, H, D) storage (the HF layout)."""
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape):
        return torch.randn(*shape, generator=g, dtype=torch.float32)

    def qkv(H, L):
        x = rnd(B, L, H, D).transpose(1, 2) if transposed else rnd(B, H, L, D)
        return x.to(DEV, dtype)

    q, k, v = qkv(Hq, Lq), qkv(Hkv, Lk), qkv(Hkv, Lk)
    bk = rnd(N, Hkv, P, D).to(DEV, dtype) if P else None
    bv = rnd(N, Hkv, P, D).to(DEV, dtype) if P else None
    idx = torch.randint(0, N, (B,), generator=g).to(DEV) if P else None
    mask = None
    if pad:
        mask = torch.rand(B, Lk, generator=g) > pad
        if empty_rows:
            mask[0] = False
        mask = mask.to(DEV)
    sc = (torch.rand(B, P, generator=g) + 0.5).to(DEV) if (scale and P) else None
    return q, k, v, bk, bv, idx, mask, sc


def grads(fn, inputs, seed):
    """Gradients of ``<o, go> + <lse, gl>`` (random cotangents; lse's on finite entries) w.r.t. ``inputs``."""
    leaves = [t.detach().requires_grad_(True) if t is not None else None for t in inputs]
    o, lse = fn(*leaves)
    g = torch.Generator().manual_seed(seed + 1)
    go = torch.randn(o.shape, generator=g).to(o.device, o.dtype)
    gl = torch.randn(lse.shape, generator=g).to(lse.device) * torch.isfinite(lse)
    loss = (o.float() * go.float()).sum() + torch.where(torch.isfinite(lse), lse * gl, 0.0).sum()
    live = [t for t in leaves if t is not None]
    got = iter(torch.autograd.grad(loss, live, allow_unused=True))
    return o, lse, [next(got) if t is not None else None for t in leaves]


def check(name, got, want, tol):
    assert got.shape == want.shape, name
    assert not torch.isnan(got).any(), f"{name}: NaN (an unwritten element or a bad row)"
    err = rel_err(got.float(), want)
    assert err < tol, f"{name}: relative error {err:.2e} >= {tol:.0e}"


def compare(tri, ref, inputs, dtype, seed):
    """Forward (o, lse with -inf pattern) and the gradients of every float input, against float64."""
    to, tl_, tg = grads(tri, inputs, seed)
    ro, rl, rg = grads(ref, [t.double() if t is not None and t.is_floating_point() else t for t in inputs], seed)
    fwd_tol, grad_tol = TOL[dtype]
    assert to.dtype == dtype and tl_.dtype == torch.float32
    check(f"o (seed {seed})", to, ro, fwd_tol)
    assert torch.equal(torch.isinf(tl_), torch.isinf(rl)), f"lse = -inf exactly on rows that see no key (seed {seed})"
    fin = torch.isfinite(rl)
    check(f"lse (seed {seed})", tl_[fin], rl[fin], fwd_tol)
    for name, a, b in zip(("dq", "dk", "dv", "dbank_k", "dbank_v", "dprefix_scale"), tg, rg):
        if b is not None:
            check(f"{name} (seed {seed})", a, b, grad_tol)


def run_dense(case, causal, dtype, seed, softmax_scale=None, prefix_lengths=None, prefix_bias=None):
    q, k, v, bk, bv, idx, mask, sc = case
    kw = dict(key_padding_mask=mask, causal=causal, softmax_scale=softmax_scale, prefix_lengths=prefix_lengths)
    if prefix_bias is not None:
        kw["prefix_bias"] = prefix_bias

    def tri(q, k, v, bk, bv, sc):
        return tpa.prefix_attention_triton(q, k, v, bk, bv, idx, prefix_scale=sc, **kw)

    def ref(q, k, v, bk, bv, sc):
        return prefix_attention_reference(q, k, v, bk, bv, idx, prefix_scale=sc, compute_dtype=torch.float64, **kw)

    compare(tri, ref, [q, k, v, bk, bv, sc], dtype, seed)


SHAPES = {
    "base": dict(),
    "P0": dict(P=0),
    "P1_gqa3": dict(P=1, Hq=3, Hkv=1),
    "gqa8_odd": dict(Hq=8, Hkv=1, Lq=17, Lk=17, P=7, N=1),
    "mha_noscale": dict(Hq=2, Hkv=2, scale=False, pad=0.0),
    "decode": dict(Lq=3, Lk=37, P=17),
    "lq_gt_lk": dict(Lq=21, Lk=6, P=2, pad=0.0),
    "empty_rows_P0": dict(P=0, empty_rows=True),
    "empty_rows_P3": dict(P=3, empty_rows=True),
    "d24_transposed": dict(D=24, transposed=True, B=3, N=5),
    "d64": dict(D=64, Lq=9, Lk=9, B=1, Hq=2, Hkv=1),
    # GQA packed rows (row r = position r // 3 of head r % 3): Lq * 3 = 15, 21, 39 rows over 16-row tiles, so
    # tiles end mid-position and mix the group's heads; causal with Lq < Lk (full + masked key blocks) and Lq > Lk
    "pack5": dict(Hq=3, Hkv=1, Lq=5, Lk=8, P=4),
    "pack7_hkv2": dict(Hq=6, Hkv=2, Lq=7, Lk=12, P=6, N=2),
    "pack13_lk40": dict(Hq=6, Hkv=2, Lq=13, Lk=40, P=5, B=1),
    "pack13_gt_lk": dict(Hq=3, Hkv=1, Lq=13, Lk=5, P=3, pad=0.0),
}


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("shape,pack", [(s, p) for s in SHAPES for p in (False, True)
                                        if p is False or SHAPES[s].get("Hq", 4) != SHAPES[s].get("Hkv", 2)],
                         ids=lambda x: x if isinstance(x, str) else ("packed" if x else "rows"), indirect=["pack"])
def test_dense_fp32(shape, causal, pack):
    seed = sum(map(ord, shape)) + causal
    run_dense(make_case(seed, **SHAPES[shape]), causal, torch.float32, seed)


@pytest.mark.parametrize("dtype", DTYPES[1:], ids=["fp16", "bf16"])
@pytest.mark.parametrize("shape,causal,pack", [("base", True, False), ("gqa8_odd", False, False),
                                               ("empty_rows_P3", False, False), ("d24_transposed", True, False),
                                               ("pack7_hkv2", True, True)], indirect=["pack"])
def test_dense_half(shape, causal, dtype, pack):
    seed = 7 + sum(map(ord, shape))
    run_dense(make_case(seed, dtype=dtype, **SHAPES[shape]), causal, dtype, seed)


@pytest.mark.parametrize("seed", range(4))
def test_dense_fuzz(seed, monkeypatch):
    """Random shapes: lengths 1..40, P 0..20, GQA ratio 1/2/3/8, padding, prefix scale, causal, custom scale;
    odd seeds pack the GQA group (when GROUP > 1), even seeds keep one program per query head."""
    monkeypatch.setattr(tpa, "pack_gqa", lambda group, max_lq: group > 1 and seed % 2 == 1)
    g = torch.Generator().manual_seed(1000 + seed)

    def pick(*xs):
        return xs[int(torch.randint(len(xs), (1,), generator=g))]

    hkv, ratio = pick(1, 2), pick(1, 2, 3, 8)
    shape = dict(B=pick(1, 2, 3), Hq=hkv * ratio, Hkv=hkv, Lq=pick(1, 5, 16, 33), Lk=pick(1, 9, 17, 40),
                 P=pick(0, 1, 6, 20), D=pick(16, 32), N=pick(1, 4), pad=pick(0.0, 0.4), scale=pick(False, True))
    dtype, causal = pick(torch.float32, torch.float16), pick(False, True)
    run_dense(make_case(seed, dtype=dtype, **shape), causal, dtype, seed, softmax_scale=pick(None, 0.3))


@pytest.mark.parametrize("dtype,pack", [(torch.float32, False), (torch.float32, True), (torch.float16, False)],
                         ids=["fp32-rows", "fp32-packed", "fp16-rows"], indirect=["pack"])
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_varlen(causal, dtype, pack):
    """Packed sequences (one of length 0, one crossing two blocks) with a shared bank and prefix scale."""
    g = torch.Generator().manual_seed(11 + causal)
    lens = [5, 0, 33, 1, 16]
    B, Hq, Hkv, D, P, N, T = len(lens), 6, 2, 16, 9, 2, sum(lens)
    cu = torch.tensor([0] + lens).cumsum(0).to(DEV, torch.int32)
    q, k, v = (torch.randn(T, h, D, generator=g).to(DEV, dtype) for h in (Hq, Hkv, Hkv))
    bk, bv = (torch.randn(N, Hkv, P, D, generator=g).to(DEV, dtype) for _ in range(2))
    idx = torch.tensor([1, 0, 1, 1, 0], device=DEV)
    sc = (torch.rand(B, P, generator=g) + 0.5).to(DEV)

    def tri(q, k, v, bk, bv, sc):
        return tpa.prefix_attention_varlen_triton(q, k, v, cu, bk, bv, idx, causal=causal, prefix_scale=sc,
                                                  max_seqlen=max(lens))

    def ref(q, k, v, bk, bv, sc):
        return prefix_attention_varlen_reference(q, k, v, cu, bk, bv, idx, causal=causal, prefix_scale=sc,
                                                 compute_dtype=torch.float64)

    compare(tri, ref, [q, k, v, bk, bv, sc], dtype, 11)


@BOTH
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_varlen_gqa3_packed(causal, pack):
    """Packed sequences of lengths 1, 0, 11 (3, 0, 33 packed rows) with GROUP = 3 and two KV heads."""
    g = torch.Generator().manual_seed(31 + causal)
    lens = [1, 0, 11]
    B, Hq, Hkv, D, P, N, T = len(lens), 6, 2, 16, 7, 2, sum(lens)
    cu = torch.tensor([0] + lens).cumsum(0).to(DEV, torch.int32)
    q, k, v = (torch.randn(T, h, D, generator=g).to(DEV) for h in (Hq, Hkv, Hkv))
    bk, bv = (torch.randn(N, Hkv, P, D, generator=g).to(DEV) for _ in range(2))
    idx = torch.tensor([1, 0, 0], device=DEV)
    sc = (torch.rand(B, P, generator=g) + 0.5).to(DEV)

    def tri(q, k, v, bk, bv, sc):
        return tpa.prefix_attention_varlen_triton(q, k, v, cu, bk, bv, idx, causal=causal, prefix_scale=sc)

    def ref(q, k, v, bk, bv, sc):
        return prefix_attention_varlen_reference(q, k, v, cu, bk, bv, idx, causal=causal, prefix_scale=sc,
                                                 compute_dtype=torch.float64)

    compare(tri, ref, [q, k, v, bk, bv, sc], torch.float32, 31)


@pytest.mark.parametrize("dtype", DTYPES[:2], ids=["fp32", "fp16"])
def test_one_pass_like_gqa3(dtype):
    """One-pass label scoring in miniature: a 100-key right-padded bank (lengths 100 and 61) shared by 12-token
    causal inputs with key padding, GROUP = 3 (36 packed rows of each KV head); o, lse and every gradient."""
    case = list(make_case(71, dtype=dtype, B=3, Hq=6, Hkv=2, Lq=12, Lk=12, P=100, N=2, pad=0.2))
    case[5] = torch.tensor([0, 1, 0], device=DEV)
    run_dense(tuple(case), True, dtype, 71, prefix_lengths=torch.tensor([100, 61], device=DEV))


# Right-padded banks: P = 19 is not a multiple of the 16-wide interpreter blocks; entry 0 has length 0 and is used
# by sequence 0, whose keys are all padded (rows that see no key), entry 1 is full, entry 2 ends in the first
# block, entry 3 one token into the second; entry 2 is shared by two sequences.
PLEN_SHAPE = dict(B=5, Hq=4, Hkv=2, Lq=18, Lk=21, P=19, D=16, N=4, empty_rows=True)
PLEN = [0, 19, 6, 17]
PLEN_IDX = [0, 1, 2, 3, 2]


def plen_case(seed, dtype=torch.float32, scale=True, lengths_dtype=torch.int64, **shape):
    case = list(make_case(seed, dtype=dtype, scale=scale, **{**PLEN_SHAPE, **shape}))
    case[5] = torch.tensor(PLEN_IDX[:case[0].shape[0]], device=DEV)
    return tuple(case), torch.tensor(PLEN, device=DEV, dtype=lengths_dtype)


@pytest.mark.parametrize("scale,pack", [(False, False), (True, True)], ids=["noscale-rows", "scale-packed"],
                         indirect=["pack"])
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_prefix_lengths_dense_fp32(causal, scale, pack):
    seed = 40 + 2 * causal + scale
    case, lengths = plen_case(seed, scale=scale, lengths_dtype=torch.int32 if scale else torch.int64)
    run_dense(case, causal, torch.float32, seed, prefix_lengths=lengths)


def test_prefix_lengths_dense_fp16():
    case, lengths = plen_case(45, dtype=torch.float16)
    run_dense(case, True, torch.float16, 45, prefix_lengths=lengths)


def varlen_bank_case(seed, lens, Hq, Hkv, D=16, P=21):
    """Packed sequences of lengths ``lens`` over a right-padded bank of N = 3 entries (P = 21; lengths 21, 0, 9),
    rows indexing entries 1, 0, 2, 1, 0: ``cu_seqlens, (q, k, v, bank_k, bank_v, prefix_scale), idx, lengths``."""
    g = torch.Generator().manual_seed(seed)
    B, N, T = len(lens), 3, sum(lens)
    cu = torch.tensor([0] + lens).cumsum(0).to(DEV, torch.int32)
    q, k, v = (torch.randn(T, h, D, generator=g).to(DEV) for h in (Hq, Hkv, Hkv))
    bk, bv = (torch.randn(N, Hkv, P, D, generator=g).to(DEV) for _ in range(2))
    idx = torch.tensor([1, 0, 2, 1, 0][:B], device=DEV)
    lengths = torch.tensor([21, 0, 9], device=DEV)
    sc = (torch.rand(B, P, generator=g) + 0.5).to(DEV)
    return cu, (q, k, v, bk, bv, sc), idx, lengths


@pytest.mark.parametrize("causal,pack", [(False, False), (True, True)], ids=["full-rows", "causal-packed"],
                         indirect=["pack"])
def test_prefix_lengths_varlen(causal, pack):
    """Packed sequences over a right-padded bank (P = 21; lengths 21, 0, 9), with prefix scale."""
    lens = [5, 0, 20, 1, 17]
    cu, (q, k, v, bk, bv, sc), idx, lengths = varlen_bank_case(21 + causal, lens, Hq=4, Hkv=2)

    def tri(q, k, v, bk, bv, sc):
        return tpa.prefix_attention_varlen_triton(q, k, v, cu, bk, bv, idx, causal=causal, prefix_scale=sc,
                                                  max_seqlen=max(lens), prefix_lengths=lengths)

    def ref(q, k, v, bk, bv, sc):
        return prefix_attention_varlen_reference(q, k, v, cu, bk, bv, idx, causal=causal, prefix_scale=sc,
                                                 compute_dtype=torch.float64, prefix_lengths=lengths)

    compare(tri, ref, [q, k, v, bk, bv, sc], torch.float32, 21)


def test_prefix_lengths_padding_is_invisible():
    """Bank positions past an entry's length: exactly zero d(bank) / d(prefix_scale), and no influence at all
    (even NaN there) on o, lse or any gradient. Lengths all equal to P reproduce the no-lengths result bitwise."""
    (q, k, v, bk, bv, idx, mask, sc), lengths = plen_case(50)

    def tri(bk, bv, lengths):
        def fn(q, k, v, bk, bv, sc):
            return tpa.prefix_attention_triton(q, k, v, bk, bv, idx, key_padding_mask=mask, causal=True,
                                               prefix_scale=sc, prefix_lengths=lengths)
        return grads(fn, [q, k, v, bk, bv, sc], 50)

    o, lse, g = tri(bk, bv, lengths)
    dbk, dbv, dsc = g[3:]
    pad = torch.arange(bk.shape[2], device=DEV)[None, :] >= lengths[:, None]  # (N, P)
    assert pad.sum() > 0 and set(PLEN_IDX) == set(range(len(PLEN)))  # every entry is used by some row
    for name, d in (("dbank_k", dbk), ("dbank_v", dbv)):
        assert not torch.isnan(d).any(), name
        assert (d.permute(0, 2, 1, 3)[pad] == 0).all(), f"{name}: nonzero gradient past an entry's length"
        assert (d.permute(0, 2, 1, 3)[~pad] != 0).any(), name
    assert (dsc[pad[idx]] == 0).all() and not torch.isnan(dsc).any(), "d(prefix_scale) past the length"

    bad_k, bad_v = bk.clone(), bv.clone()
    p4 = pad[:, None, :, None].expand_as(bk)
    bad_k[p4] = float("nan")
    bad_v[p4] = 1e4 * torch.randn(int(p4.sum()), device=DEV)
    o2, lse2, g2 = tri(bad_k, bad_v, lengths)
    assert torch.equal(o, o2) and torch.equal(lse, lse2), "a bank position past the length changed the output"
    for a, b in zip(g, g2):
        assert torch.equal(a, b), "a bank position past the length changed a gradient"

    full = torch.full_like(lengths, bk.shape[2])
    o3, lse3, g3 = tri(bk, bv, full)
    o4, lse4, g4 = tri(bk, bv, None)
    assert torch.equal(o3, o4) and torch.equal(lse3, lse4)
    for a, b in zip(g3, g4):
        assert torch.equal(a, b)


def test_prefix_lengths_validation():
    (q, k, v, bk, bv, idx, mask, sc), lengths = plen_case(60)
    for bad in (lengths[:-1], lengths.float(), lengths.to(torch.int16), lengths[None]):
        with pytest.raises(ValueError, match="prefix_lengths"):
            tpa.prefix_attention_triton(q, k, v, bk, bv, idx, prefix_lengths=bad)


def bias_values(seed, N, P, dtype=torch.float32):
    """A random finite prefix bias (N, P): log multiplicities log(1..5) (dedup banks), and ~1/3 negative logits."""
    g = torch.Generator().manual_seed(seed + 2)
    mult = torch.randint(1, 6, (N, P), generator=g).double().log()
    neg = -3.0 * torch.rand(N, P, generator=g, dtype=torch.float64)
    return torch.where(torch.rand(N, P, generator=g) < 0.35, neg, mult).to(DEV, dtype)


# prefix_bias over the right-padded banks of the prefix_lengths tests (entry 0: length 0 under a nonzero bias,
# used by rows that see no key at all), GQA 9/3 or 4/2; the float64 bias case checks the cast to float32
@pytest.mark.parametrize("shape,scale,causal,pack,bias_dtype", [
    (dict(Hq=9, Hkv=3, Lq=7, Lk=10), True, False, False, torch.float32),
    (dict(Hq=9, Hkv=3, Lq=7, Lk=10, B=3), False, True, True, torch.float64),
    (dict(), False, True, False, torch.float32),
], ids=["gqa3-scale-full-rows", "gqa3-causal-packed-f64bias", "gqa2-causal-rows"], indirect=["pack"])
def test_prefix_bias_dense_fp32(shape, scale, causal, pack, bias_dtype):
    seed = 80 + 2 * causal + scale + 4 * pack
    case, lengths = plen_case(seed, scale=scale, **shape)
    run_dense(case, causal, torch.float32, seed, prefix_lengths=lengths,
              prefix_bias=bias_values(seed, len(PLEN), PLEN_SHAPE["P"], bias_dtype))


def test_prefix_bias_dense_fp16():
    case, lengths = plen_case(87, dtype=torch.float16)
    run_dense(case, True, torch.float16, 87, prefix_lengths=lengths,
              prefix_bias=bias_values(87, len(PLEN), PLEN_SHAPE["P"]))


@pytest.mark.parametrize("causal,pack", [(False, False), (True, True)], ids=["full-rows", "causal-packed"],
                         indirect=["pack"])
def test_prefix_bias_varlen(causal, pack):
    """Packed sequences (GQA 9/3) over a right-padded bank (P = 21; lengths 21, 0, 9) with a prefix bias and
    prefix scale: o, lse and every gradient, prefix scale's included."""
    seed = 90 + causal
    lens = [5, 0, 17, 1, 9]
    cu, (q, k, v, bk, bv, sc), idx, lengths = varlen_bank_case(seed, lens, Hq=9, Hkv=3)
    bias = bias_values(seed, 3, 21)
    kw = dict(causal=causal, prefix_lengths=lengths, prefix_bias=bias)

    def tri(q, k, v, bk, bv, sc):
        return tpa.prefix_attention_varlen_triton(q, k, v, cu, bk, bv, idx, prefix_scale=sc, max_seqlen=max(lens),
                                                  **kw)

    def ref(q, k, v, bk, bv, sc):
        return prefix_attention_varlen_reference(q, k, v, cu, bk, bv, idx, prefix_scale=sc,
                                                 compute_dtype=torch.float64, **kw)

    compare(tri, ref, [q, k, v, bk, bv, sc], torch.float32, seed)


def test_prefix_bias_is_token_multiplicity():
    """Dedup identity: a bank token that appears twice attends exactly as one copy with bias + log 2 -- o, lse,
    dq, dk, dv equal, and the merged token's d(bank) is the sum of its two copies'. Entry 0 repeats token 1 at
    position 4; entry 1 (length 4 of 6) repeats token 0 at position 2. A zero bias is the no-bias result bitwise,
    and a bias that requires grad is a constant (no gradient)."""
    seed = 95
    q, k, v, bk, bv, _, mask, _ = make_case(seed, B=3, Hq=4, Hkv=2, Lq=7, Lk=9, P=6, N=2, scale=False)
    idx = torch.tensor([0, 1, 0], device=DEV)
    bk[0, :, 4], bv[0, :, 4] = bk[0, :, 1], bv[0, :, 1]
    bk[1, :, 2], bv[1, :, 2] = bk[1, :, 0], bv[1, :, 0]
    bias = bias_values(seed, 2, 6)
    bias[0, 4], bias[1, 2] = bias[0, 1], bias[1, 0]  # copies of one token carry the same logit
    keep = [[0, 1, 2, 3, 5], [0, 1, 3, 4, 5]]  # the dedup bank (P = 5): second copies dropped
    dk_, dv_ = (torch.stack([t[e][:, keep[e]] for e in range(2)]) for t in (bk, bv))
    dbias = torch.stack([bias[e, keep[e]] for e in range(2)])
    dbias[0, 1] += math.log(2)
    dbias[1, 0] += math.log(2)
    dbias.requires_grad_(True)

    def run(bank_k, bank_v, lengths, b):
        def fn(q, k, v, bk, bv):
            return tpa.prefix_attention_triton(q, k, v, bk, bv, idx, key_padding_mask=mask, causal=True,
                                               prefix_lengths=lengths, prefix_bias=b)
        return grads(fn, [q, k, v, bank_k, bank_v], seed)

    o, lse, g = run(bk, bv, torch.tensor([6, 4], device=DEV), bias)
    o2, lse2, g2 = run(dk_, dv_, torch.tensor([5, 3], device=DEV), dbias)
    check("o", o2, o, 1e-5)
    check("lse", lse2, lse, 1e-5)
    for name, a, b in zip(("dq", "dk", "dv"), g2, g):
        check(name, a, b, 1e-5)
    for name, a, b in zip(("dbank_k", "dbank_v"), g2[3:], g[3:]):
        want = torch.stack([b[e][:, keep[e]] for e in range(2)])
        want[0, :, 1] += b[0, :, 4]
        want[1, :, 0] += b[1, :, 2]
        check(name, a, want, 1e-5)
    o3, _ = tpa.prefix_attention_triton(q, k, v, dk_, dv_, idx, prefix_bias=dbias)
    assert not o3.requires_grad, "prefix_bias must be a constant (no gradient)"

    zero = run(bk, bv, None, torch.zeros(2, 6, device=DEV))
    none = run(bk, bv, None, None)
    for a, b in zip((*zero[:2], *zero[2]), (*none[:2], *none[2])):
        assert torch.equal(a, b), "a zero prefix_bias changed a result"


def test_prefix_bias_validation():
    (q, k, v, bk, bv, idx, mask, sc), lengths = plen_case(96)
    N, P = bk.shape[0], bk.shape[2]
    good = torch.zeros(N, P, device=DEV)
    nonfinite = good.clone()
    nonfinite[1, 3] = float("-inf")
    cu = torch.tensor([0, 3, 3, 8, 9, 9], device=DEV, dtype=torch.int32)
    qp, kp, vp = (t[0, :, :9].transpose(0, 1) for t in (q, k, v))  # packed (T = 9, H, D)
    for bad in (good[:-1], good[:, :-1], good[0], good[None], good.long(), nonfinite):
        with pytest.raises(KernelInputError, match="prefix_bias"):
            tpa.prefix_attention_triton(q, k, v, bk, bv, idx, prefix_lengths=lengths, prefix_bias=bad)
        with pytest.raises(KernelInputError, match="prefix_bias"):
            tpa.prefix_attention_varlen_triton(qp, kp, vp, cu, bk, bv, idx, prefix_bias=bad)


def test_bank_grad_split_is_deterministic(monkeypatch):
    """Prefix dK/dV split over 3 chunks of each entry's sequences: exact and bitwise reproducible."""
    monkeypatch.setattr(tpa, "prefix_splits", lambda *a: 3)
    case = make_case(5, B=5, N=4, Lq=9, Lk=9, P=18)
    run_dense(case, True, torch.float32, 5)
    q, k, v, bk, bv, idx, mask, sc = case
    bk.requires_grad_(True)
    outs = []
    for _ in range(2):
        o, lse = tpa.prefix_attention_triton(q, k, v, bk, bv, idx, key_padding_mask=mask, prefix_scale=sc)
        outs.append(torch.autograd.grad(o.sum() + lse.sum(), bk)[0])
    assert torch.equal(outs[0], outs[1])


def test_lse_only_and_mixed_bank_dtype():
    """Backward through lse alone (o unused), with a float32 bank under float16 activations."""
    q, k, v, bk, bv, idx, mask, sc = make_case(3, dtype=torch.float16, Lq=9, Lk=11)
    bk, bv = bk.float().requires_grad_(True), bv.float().requires_grad_(True)
    q.requires_grad_(True)
    _, lse = tpa.prefix_attention_triton(q, k, v, bk, bv, idx, key_padding_mask=mask, prefix_scale=sc)
    got = torch.autograd.grad(lse.sum(), [q, bk])
    ref_in = [t.double().detach().requires_grad_(True) for t in (q, bk)]
    _, rl = prefix_attention_reference(ref_in[0], k.double(), v.double(), ref_in[1], bv.double(), idx,
                                       key_padding_mask=mask, prefix_scale=sc.double())
    want = torch.autograd.grad(rl.sum(), ref_in)
    assert got[1].dtype == torch.float32
    for a, b in zip(got, want):
        check("grad", a, b, 1e-2)


def test_pack_gqa_rule():
    """The launcher packs the GQA group only for GROUP > 1 and (max) query lengths up to PACK_MAX_LQ = 64."""
    assert tpa.PACK_MAX_LQ == 64
    assert tpa.pack_gqa(3, 12) and tpa.pack_gqa(8, 1) and tpa.pack_gqa(2, 64)
    assert not tpa.pack_gqa(1, 12) and not tpa.pack_gqa(3, 65) and not tpa.pack_gqa(4, 4096)


def test_dispatch_uses_triton():
    q, k, v, bk, bv, idx, mask, sc = make_case(2, Lq=5, Lk=5)
    o = prefix_attention(q, k, v, bk, bv, idx, key_padding_mask=mask, prefix_scale=sc, backend="triton")
    ro, _ = prefix_attention_reference(q, k, v, bk, bv, idx, key_padding_mask=mask, prefix_scale=sc)
    check("o", o, ro, 1e-5)


def _run(code, env):
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True,
                          env={**os.environ, **env}, cwd=os.path.dirname(os.path.dirname(__file__)))


def test_module_imports_without_triton():
    r = _run("""
        import sys; sys.modules["triton"] = None
        import ltuning
        from ltuning.kernels.triton import prefix_attention as m
        assert not m.is_available()
    """, {})
    assert r.returncode == 0, r.stderr


@pytest.mark.skipif(not INTERPRET, reason="on a GPU the kernels are compiled and run by the other tests")
def test_kernels_compile_for_sm80_sm90():
    """Without a GPU, lower every kernel to a cubin for sm80 and sm90a (ptxas) with a large tuning config, the
    forward and dQ kernels with both PACK_GQA values.

    The interpreter accepts code the compiler rejects (e.g. non-constexpr globals); this catches it.
    """
    r = _run("""
        import triton
        from triton.backends.compiler import GPUTarget
        from triton.compiler import ASTSource
        from ltuning.kernels.triton import bwd as bw, fwd as fw

        flags = dict(GROUP=4, HEAD_DIM=128, D_PAD=128, HAS_PREFIX=True, HAS_KPM=True, HAS_SCALE=True,
                     CAUSAL=True, IS_VARLEN=False, HAS_DLSE=True, HAS_PLEN=True, HAS_PBIAS=True, DOT_PREC="tf32")
        ptr = dict(IDX="*i64", PLEN="*i32", PBIAS="*fp32", KPM="*u8", SCALE="*fp32", CU="*i32", LSE="*fp32",
                   DELTA="*fp32", DLSE="*fp32", PERM="*i32", SEG="*i32", DBK="*fp32", DBV="*fp32", DSC="*fp32")
        ints = ("P", "SPLIT", "LEN_BUCKET")
        for kern, bm, bn, warps in [(fw.fwd_kernel, 128, 64, 8), (bw.dq_kernel, 128, 64, 8),
                                    (bw.dkdv_seq_kernel, 64, 128, 8), (bw.dkdv_prefix_kernel, 64, 64, 4),
                                    (bw.preprocess_kernel, 64, None, 4)]:
            fn = kern.fn if isinstance(kern, triton.runtime.Autotuner) else kern
            consts = {a: v for a, v in {**flags, "BLOCK_M": bm, "BLOCK_N": bn}.items() if a in fn.arg_names}
            sig = {a: "constexpr" if a in consts else ptr.get(a, "*bf16" if a.isupper() and a not in ints
                   else "fp32" if a.endswith("scale") else "i32") for a in fn.arg_names}
            for pack in ((False, True) if "PACK_GQA" in fn.arg_names else (None,)):
                if pack is not None:
                    consts["PACK_GQA"] = pack
                    sig["PACK_GQA"] = "constexpr"
                for cap in (80, 90):
                    k = triton.compile(ASTSource(fn, sig, consts), target=GPUTarget("cuda", cap, 32),
                                       options=dict(num_warps=warps, num_stages=2))
                    assert k.asm["cubin"], (fn.__name__, pack, cap)
    """, {"TRITON_INTERPRET": "0", "TRITON_DEFAULT_FP_FUSION": "1"})
    if "No module named" in r.stderr or "ptxas" in r.stderr and "not found" in r.stderr:
        pytest.skip("triton's NVIDIA backend / ptxas is not installed")
    assert r.returncode == 0, r.stderr[-3000:]
