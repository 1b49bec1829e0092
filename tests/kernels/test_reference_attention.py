"""The reference shared-prefix attention (the oracle) against independent computations, and the SDPA path."""
import math

import pytest
import torch

from ltuning.kernels import prefix_attention, prefix_attention_reference, prefix_attention_varlen_reference
from testutil import rel_err


def naive(q, k, v, bank_k, bank_v, idx, mask, causal, scale, plen=None):
    """Loop-per-row/head, written independently of the reference: float64 softmax over explicit key lists."""
    B, Hq, Lq, D = q.shape
    Hkv, Lk = k.shape[1], k.shape[2]
    g = Hq // Hkv
    out = torch.zeros(B, Hq, Lq, D, dtype=torch.float64)
    for b in range(B):
        for h in range(Hq):
            kh = h // g
            for i in range(Lq):
                keys, vals, logits = [], [], []
                if bank_k is not None:
                    for j in range(bank_k.shape[2] if plen is None else int(plen[idx[b]])):
                        s = scale[b, j] if scale is not None else 1.0
                        keys.append(bank_k[idx[b], kh, j] * s)
                        vals.append(bank_v[idx[b], kh, j] * s)
                for j in range(Lk):
                    if mask is not None and not mask[b, j]:
                        continue
                    if causal and j > i + Lk - Lq:
                        continue
                    keys.append(k[b, kh, j])
                    vals.append(v[b, kh, j])
                if not keys:
                    continue
                K, V = torch.stack(keys).double(), torch.stack(vals).double()
                p = torch.softmax(K @ q[b, h, i].double() / math.sqrt(D), 0)
                out[b, h, i] = p @ V
    return out


def rand_case(B=3, Hq=6, Hkv=2, Lq=7, Lk=7, P=5, D=8, N=2, pad=True, scale=True, dtype=torch.float64):
    q = torch.randn(B, Hq, Lq, D, dtype=dtype)
    k = torch.randn(B, Hkv, Lk, D, dtype=dtype)
    v = torch.randn(B, Hkv, Lk, D, dtype=dtype)
    bk = torch.randn(N, Hkv, P, D, dtype=dtype) if P else None
    bv = torch.randn(N, Hkv, P, D, dtype=dtype) if P else None
    idx = torch.randint(0, N, (B,)) if P else None
    mask = None
    if pad:
        lens = torch.randint(1, Lk + 1, (B,))
        mask = torch.arange(Lk)[None] < lens[:, None]
    sc = torch.rand(B, P, dtype=dtype) + 0.5 if (scale and P) else None
    return q, k, v, bk, bv, idx, mask, sc


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("shape", [dict(), dict(Hq=3, Hkv=3), dict(Hq=8, Hkv=1, Lq=3, Lk=9), dict(P=0), dict(P=1),
                                   dict(Lq=1, Lk=5)])
def test_reference_matches_naive_loops(causal, shape):
    q, k, v, bk, bv, idx, mask, sc = rand_case(**shape)
    o, lse = prefix_attention_reference(q, k, v, bk, bv, idx, key_padding_mask=mask, causal=causal, prefix_scale=sc)
    ref = naive(q, k, v, bk, bv, idx, mask, causal, sc)
    assert torch.allclose(o, ref, atol=1e-12, rtol=1e-10)
    assert lse.shape == q.shape[:3] and lse.dtype == torch.float32


@pytest.mark.parametrize("causal", [False, True])
def test_reference_prefix_lengths_match_naive_loops(causal):
    """Per-entry prefix lengths (right-padded banks): the naive loops simply stop at each entry's length."""
    q, k, v, bk, bv, idx, mask, sc = rand_case(B=5, N=3, P=6)
    idx = torch.tensor([0, 1, 2, 0, 2])
    plen = torch.tensor([6, 0, 3])
    o, lse = prefix_attention_reference(q, k, v, bk, bv, idx, key_padding_mask=mask, causal=causal, prefix_scale=sc,
                                        prefix_lengths=plen)
    assert torch.allclose(o, naive(q, k, v, bk, bv, idx, mask, causal, sc, plen), atol=1e-12, rtol=1e-10)
    qf, kf, vf, bkf, bvf, scf = (t.float().requires_grad_() for t in (q, k, v, bk, bv, sc))
    kw = dict(key_padding_mask=mask, causal=causal, prefix_lengths=plen)
    o_sdpa = prefix_attention(qf, kf, vf, bkf, bvf, idx, prefix_scale=scf, backend="sdpa", **kw)
    assert rel_err(o_sdpa, o) < 1e-5
    g = torch.autograd.grad(o_sdpa.sum(), [bkf, bvf, scf])
    assert (g[0][1] == 0).all() and (g[0][2, :, 3:] == 0).all() and (g[1][2, :, 3:] == 0).all()
    assert (g[2][[1, 4], 3:] == 0).all()
    with pytest.raises(ValueError, match="prefix_lengths"):
        prefix_attention_reference(q, k, v, bk, bv, idx, prefix_lengths=torch.tensor([1.0, 2.0, 3.0]))


def test_row_with_no_visible_key_is_zero():
    q, k, v, *_ = rand_case(P=0, pad=False)
    mask = torch.ones(3, 7, dtype=torch.bool)
    mask[1] = False
    o, lse = prefix_attention_reference(q, k, v, key_padding_mask=mask)
    assert (o[1] == 0).all() and torch.isinf(lse[1]).all()
    o2 = prefix_attention(q, k, v, key_padding_mask=mask, backend="sdpa")
    assert torch.equal(o2[1], o[1]) and not torch.isnan(o2).any()


@pytest.mark.parametrize("causal", [False, True])
def test_reference_gradcheck_float64(causal):
    q, k, v, bk, bv, idx, mask, sc = rand_case(B=2, Hq=4, Hkv=2, Lq=5, Lk=5, P=3, D=4)
    args = [t.requires_grad_() for t in (q, k, v, bk, bv, sc)]

    def f(q, k, v, bk, bv, sc):
        return prefix_attention_reference(q, k, v, bk, bv, idx, key_padding_mask=mask, causal=causal,
                                          prefix_scale=sc)[0]
    assert torch.autograd.gradcheck(f, args, eps=1e-6, atol=1e-6)


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("shape", [dict(), dict(Hq=9, Hkv=3, Lq=11, Lk=11, P=4, D=16), dict(P=0), dict(Lq=3, Lk=8)])
def test_sdpa_backend_matches_reference_with_grads(causal, shape):
    q, k, v, bk, bv, idx, mask, sc = rand_case(dtype=torch.float32, **shape)
    ins = [t for t in (q, k, v, bk, bv, sc) if t is not None]
    for t in ins:
        t.requires_grad_()
    kw = dict(key_padding_mask=mask, causal=causal, prefix_scale=sc)
    o_ref, _ = prefix_attention_reference(q, k, v, bk, bv, idx, compute_dtype=torch.float64, **kw)
    o = prefix_attention(q, k, v, bk, bv, idx, backend="sdpa", **kw)
    assert rel_err(o, o_ref) < 1e-5
    go = torch.randn_like(o)
    g_ref = torch.autograd.grad(o_ref.double(), ins, go.double())
    g = torch.autograd.grad(o, ins, go)
    for a, b in zip(g, g_ref):
        assert rel_err(a, b) < 1e-4


def test_varlen_reference_equals_padded_dense():
    B, Hq, Hkv, D, P = 3, 4, 2, 8, 3
    lens = [5, 1, 7]
    cu = torch.tensor([0, 5, 6, 13], dtype=torch.int32)
    q = torch.randn(13, Hq, D, dtype=torch.float64)
    k = torch.randn(13, Hkv, D, dtype=torch.float64)
    v = torch.randn(13, Hkv, D, dtype=torch.float64)
    bk, bv = torch.randn(2, Hkv, P, D, dtype=torch.float64), torch.randn(2, Hkv, P, D, dtype=torch.float64)
    idx = torch.tensor([1, 0, 1])
    o, lse = prefix_attention_varlen_reference(q, k, v, cu, bk, bv, idx, causal=True)
    L = max(lens)
    qd = torch.zeros(B, Hq, L, D, dtype=torch.float64)
    kd = torch.zeros(B, Hkv, L, D, dtype=torch.float64)
    vd = torch.zeros(B, Hkv, L, D, dtype=torch.float64)
    for b, (s, n) in enumerate(zip([0, 5, 6], lens)):
        qd[b, :, :n], kd[b, :, :n], vd[b, :, :n] = q[s:s + n].transpose(0, 1), k[s:s + n].transpose(0, 1), \
            v[s:s + n].transpose(0, 1)
    mask = torch.arange(L)[None] < torch.tensor(lens)[:, None]
    od, _ = prefix_attention_reference(qd, kd, vd, bk, bv, idx, key_padding_mask=mask, causal=True)
    for b, (s, n) in enumerate(zip([0, 5, 6], lens)):
        assert torch.allclose(o[s:s + n], od[b, :, :n].transpose(0, 1))
    assert lse.shape == (13, Hq)
