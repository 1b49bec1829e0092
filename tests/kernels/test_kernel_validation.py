"""Malformed inputs at every kernel boundary must raise one ValueError naming the argument, never return a result.

A systematic enumeration: each argument x each kind of malformation (wrong rank, wrong size in each constrained
dim, empty, wrong dtype, out-of-range / negative / float index, bad cu_seqlens, bad lengths, mismatched dtypes,
another device, bad scalars), against every backend of the public functions (reference, sdpa, cpu, triton in the
interpreter), the raw C++ ops ``torch.ops.ltuning.prefix_attention_cpu_fwd`` / ``_bwd`` (which must check
everything themselves) and the fused RMSNorm / SwiGLU / rotary ops (public functions and raw ops). The well-formed
base case of every family runs first and is compared with the float64 reference, so a malformation's exception
comes from the check, not from a broken base case. Seeds are derived from the test id (printed on failure).
"""
from __future__ import annotations

import os
import re
import zlib

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from testutil import rel_err  # noqa: E402
from ltuning.kernels import (KernelInputError, prefix_attention, prefix_attention_reference,  # noqa: E402
                             prefix_attention_varlen, prefix_attention_varlen_reference)
from ltuning.kernels.cpu import fused_ops as fo  # noqa: E402
from ltuning.kernels.cpu import prefix_attention as cpa  # noqa: E402

try:
    from ltuning.kernels.triton import prefix_attention as tpa
    HAVE_TRITON = tpa.is_available()
except ImportError:  # pragma: no cover - triton is a dev dependency
    HAVE_TRITON = False

B, HQ, HKV, LQ, LK, D, N, P = 3, 4, 2, 5, 6, 8, 2, 3
LENS = [2, 0, 4]  # varlen: one empty sequence
T = sum(LENS)


@pytest.fixture
def seed(request):
    s = zlib.crc32(request.node.nodeid.encode())
    print(f"seed {s} (from the test id {request.node.nodeid})")
    return s


@pytest.fixture(scope="module", autouse=True)
def _cpu_kernels_built():
    """The raw-op cases need the C++ kernels: a missing compiler fails here, never skips."""
    assert cpa.is_available(), "the C++ prefix-attention kernel did not build"
    assert fo.is_available(), "the C++ fused ops did not build"


def base(seed, varlen=False, dtype=torch.float32):
    """A well-formed call: q, k, v, bank, idx, mask (dense) or cu_seqlens (varlen), scale and lengths."""
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape):
        return torch.randn(*shape, generator=g).to(dtype)

    a = dict(bank_k=rnd(N, HKV, P, D), bank_v=rnd(N, HKV, P, D), prefix_idx=torch.tensor([1, 0, 1]),
             prefix_scale=torch.rand(B, P, generator=g), prefix_lengths=torch.tensor([P, 1]))
    if varlen:
        a.update(q=rnd(T, HQ, D), k=rnd(T, HKV, D), v=rnd(T, HKV, D),
                 cu_seqlens=torch.tensor([0] + torch.tensor(LENS).cumsum(0).tolist(), dtype=torch.int32))
    else:
        mask = torch.rand(B, LK, generator=g) > 0.3
        mask[:, -1] = True
        a.update(q=rnd(B, HQ, LQ, D), k=rnd(B, HKV, LK, D), v=rnd(B, HKV, LK, D), key_padding_mask=mask)
    return a


# ------------------------------------------------------------------------------------------------------------
# The malformations: (id, mutate(args) -> args, argument names one of which the message must name).

def _set(**kw):
    return lambda a: {**a, **kw}


def _map(name, fn):
    return lambda a: {**a, name: fn(a[name])}


def _grow(dim, by=1):
    """The same tensor with dimension ``dim`` larger by ``by`` (smaller with a negative ``by``)."""
    def f(t):
        if by > 0:
            pad = torch.zeros(*t.shape[:dim], by, *t.shape[dim + 1:], dtype=t.dtype)
            return torch.cat([t, pad], dim)
        return t.narrow(dim, 0, t.shape[dim] + by)
    return f


def _shape_cases(name, dims, partners=()):
    """Wrong rank (one more / one fewer dim) and a wrong size in each listed dim (larger and smaller)."""
    names = (name, *partners)
    out = [(f"{name}-rank+1", _map(name, lambda t: t.unsqueeze(0)), names),
           (f"{name}-rank-1", _map(name, lambda t: t[0]), names)]
    for d in dims:
        out.append((f"{name}-dim{d}+1", _map(name, _grow(d, 1)), names))
        out.append((f"{name}-dim{d}-1", _map(name, _grow(d, -1)), names))
    return out


def _common_cases():
    """Malformations shared by the dense and the packed form (bank, index, scale, lengths, dtypes, scalars)."""
    c = []
    c += _shape_cases("bank_k", (1, 3), ("bank_v",)) + _shape_cases("bank_v", (0, 1, 2, 3))
    c += [("bank_k-dim0+1", _map("bank_k", _grow(0, 1)), ("bank_v",)),
          ("bank_k-dim2+1", _map("bank_k", _grow(2, 1)), ("bank_v",))]
    c += _shape_cases("prefix_idx", (0,))
    c += _shape_cases("prefix_scale", (0, 1))
    c += _shape_cases("prefix_lengths", (0,))
    c += [
        ("prefix_idx-empty", _map("prefix_idx", lambda t: t[:0]), ("prefix_idx",)),
        ("prefix_idx-out-of-range", _map("prefix_idx", lambda t: t.clone().index_fill_(0, torch.tensor([1]), N)),
         ("prefix_idx",)),
        ("prefix_idx-far-out-of-range", _map("prefix_idx", lambda t: torch.full_like(t, 7)), ("prefix_idx",)),
        ("prefix_idx-negative", _map("prefix_idx", lambda t: t.clone().index_fill_(0, torch.tensor([2]), -3)),
         ("prefix_idx",)),
        ("prefix_idx-huge", _map("prefix_idx", lambda t: t.clone().index_fill_(0, torch.tensor([0]), 2 ** 40)),
         ("prefix_idx",)),
        ("prefix_idx-float", _map("prefix_idx", lambda t: t.float()), ("prefix_idx",)),
        ("prefix_idx-bool", _map("prefix_idx", lambda t: t.bool()), ("prefix_idx",)),
        ("prefix_idx-int16", _map("prefix_idx", lambda t: t.to(torch.int16)), ("prefix_idx",)),
        ("prefix_idx-missing", _set(prefix_idx=None), ("prefix_idx",)),
        ("prefix_lengths-above-P", _map("prefix_lengths", lambda t: t + P), ("prefix_lengths",)),
        ("prefix_lengths-negative", _map("prefix_lengths", lambda t: t - P - 1), ("prefix_lengths",)),
        ("prefix_lengths-float", _map("prefix_lengths", lambda t: t.float()), ("prefix_lengths",)),
        ("prefix_lengths-empty", _map("prefix_lengths", lambda t: t[:0]), ("prefix_lengths",)),
        ("prefix_scale-int", _map("prefix_scale", lambda t: (t * 2).long()), ("prefix_scale",)),
        ("prefix_scale-empty", _map("prefix_scale", lambda t: t[:, :0]), ("prefix_scale",)),
        ("bank_v-missing", _set(bank_v=None), ("bank_k", "bank_v")),
        ("bank_k-missing", _set(bank_k=None), ("bank_k", "bank_v")),
        ("bank_v-dtype", _map("bank_v", lambda t: t.double()), ("bank_v",)),
        ("bank_k-int", lambda a: {**a, "bank_k": a["bank_k"].long(), "bank_v": a["bank_v"].long()}, ("bank_k",)),
        ("bank-empty-N", lambda a: {**a, "bank_k": a["bank_k"][:0], "bank_v": a["bank_v"][:0],
                                    "prefix_lengths": None}, ("prefix_idx",)),
        ("k-dtype", _map("k", lambda t: t.double()), ("k",)),
        ("v-dtype", _map("v", lambda t: t.double()), ("v",)),
        ("q-int", lambda a: {**a, **{n: (a[n] * 4).long() for n in ("q", "k", "v")}}, ("q",)),
        ("head-dim-0", lambda a: {**a, **{n: a[n][..., :0] for n in ("q", "k", "v", "bank_k", "bank_v")}},
         ("D",)),
        ("kv-heads-0", lambda a: {**a, **{n: a[n][:, :0] if n in ("bank_k", "bank_v") or a[n].dim() == 4
                                          else a[n][:, :0] for n in ("k", "v", "bank_k", "bank_v")}},
         ("Hkv", "k")),
        ("q-heads-not-multiple", _map("q", _grow(1, -1)), ("Hq",)),
        ("softmax_scale-nan", _set(softmax_scale=float("nan")), ("softmax_scale",)),
        ("softmax_scale-inf", _set(softmax_scale=float("inf")), ("softmax_scale",)),
        ("softmax_scale-tensor", _set(softmax_scale=torch.tensor(0.5)), ("softmax_scale",)),
    ]
    for name in ("k", "v", "bank_k", "bank_v", "prefix_idx", "prefix_scale", "prefix_lengths"):
        c.append((f"{name}-meta-device", _map(name, lambda t: t.to("meta")), (name,)))
    return c


def dense_cases():
    c = _common_cases()
    c += _shape_cases("q", (0, 3), ("k",)) + _shape_cases("k", (0, 3)) + _shape_cases("v", (0, 1, 2, 3))
    c += _shape_cases("key_padding_mask", (0, 1))
    c += [("k-dim1+1", _map("k", _grow(1, 1)), ("k", "v")),
          ("k-dim2+1", _map("k", _grow(2, 1)), ("v",)),
          ("key_padding_mask-float", _map("key_padding_mask", lambda t: t.float()), ("key_padding_mask",)),
          ("key_padding_mask-empty", _map("key_padding_mask", lambda t: t[:, :0]), ("key_padding_mask",)),
          ("key_padding_mask-meta-device", _map("key_padding_mask", lambda t: t.to("meta")), ("key_padding_mask",))]
    return c


def varlen_cases():
    c = _common_cases()
    c += _shape_cases("q", (0, 2), ("k",)) + _shape_cases("k", (0, 2)) + _shape_cases("v", (0, 1, 2))
    c += _shape_cases("cu_seqlens", ())
    c += [
        ("cu_seqlens-not-from-0", _map("cu_seqlens", lambda t: t + 1), ("cu_seqlens",)),
        ("cu_seqlens-short-of-T", _map("cu_seqlens", lambda t: t.clone().index_fill_(0, torch.tensor([B]), T - 1)),
         ("cu_seqlens",)),
        ("cu_seqlens-past-T", _map("cu_seqlens", lambda t: t.clone().index_fill_(0, torch.tensor([B]), T + 5)),
         ("cu_seqlens",)),
        ("cu_seqlens-decreasing", _map("cu_seqlens", lambda t: t.clone().index_fill_(0, torch.tensor([1]), T)),
         ("cu_seqlens",)),
        ("cu_seqlens-negative", _map("cu_seqlens", lambda t: t.clone().index_fill_(0, torch.tensor([1]), -2)),
         ("cu_seqlens",)),
        ("cu_seqlens-float", _map("cu_seqlens", lambda t: t.float()), ("cu_seqlens",)),
        ("cu_seqlens-int16", _map("cu_seqlens", lambda t: t.to(torch.int16)), ("cu_seqlens",)),
        ("cu_seqlens-empty", _map("cu_seqlens", lambda t: t[:0]), ("cu_seqlens",)),
        ("cu_seqlens-extra-sequence", _map("cu_seqlens", lambda t: torch.cat([t, t[-1:]])), ("prefix_idx",)),
        ("cu_seqlens-meta-device", _map("cu_seqlens", lambda t: t.to("meta")), ("cu_seqlens",)),
        ("cu_seqlens-missing", _set(cu_seqlens=None), ("cu_seqlens", "q")),  # raw op: then it is the dense form
    ]
    return c


DENSE = dense_cases()
VARLEN = varlen_cases()
BACKENDS = ["reference", "sdpa", "cpu", "raw-fwd", "raw-bwd"] + (["triton"] if HAVE_TRITON else [])
VARLEN_BACKENDS = ["reference", "cpu", "raw-fwd", "raw-bwd"] + (["triton"] if HAVE_TRITON else [])
# cases that are well-formed for the public functions (the entry points cast) but not for the raw ops
RAW_ONLY = [("q-float16", lambda a: {**a, **{n: a[n].half() for n in ("q", "k", "v", "bank_k", "bank_v")}}, ("q",)),
            ("bank-dtype-differs-from-q", lambda a: {**a, "bank_k": a["bank_k"].double(),
                                                     "bank_v": a["bank_v"].double()}, ("bank_k",))]


def _raw_args(a, varlen):
    """Positional arguments of the raw forward op (no conversion: the op must check what it is given)."""
    scale = a.get("softmax_scale", 0.35)
    return (a["q"], a["k"], a["v"], a.get("bank_k"), a.get("bank_v"), a.get("prefix_idx"),
            None if varlen else a.get("key_padding_mask"), a.get("cu_seqlens"), a.get("prefix_scale"), False,
            scale, a.get("prefix_lengths"))


def call(backend, a, varlen):
    """Run ``backend`` on the argument dict ``a``; returns what it returns (a result means the check failed)."""
    a = dict(a)
    if backend.startswith("raw"):
        args = _raw_args(a, varlen)
        if backend == "raw-fwd":
            return torch.ops.ltuning.prefix_attention_cpu_fwd(*args)
        q = a["q"]
        shape = tuple(q.shape) if isinstance(q, torch.Tensor) else ()
        lse = torch.zeros(shape[:-1]) if shape else None
        return torch.ops.ltuning.prefix_attention_cpu_bwd(torch.zeros(shape), None, *args[:9], lse, False,
                                                          args[10], args[11])
    q, k, v = a.pop("q"), a.pop("k"), a.pop("v")
    bk, bv, idx = a.pop("bank_k", None), a.pop("bank_v", None), a.pop("prefix_idx", None)
    if varlen:
        cu = a.pop("cu_seqlens", None)
        return prefix_attention_varlen(q, k, v, cu, bk, bv, idx, backend=backend, **a)
    return prefix_attention(q, k, v, bk, bv, idx, backend=backend, **a)


PUBLIC_ONLY = {"softmax_scale-tensor"}  # the raw ops' schema takes a float: torch converts a 0-d tensor itself


def _expect_error(backend, a, varlen, names, seed):
    with pytest.raises(ValueError) as ei:
        out = call(backend, a, varlen)
        pytest.fail(f"seed {seed}: {backend} returned a result for a malformed input: "
                    f"{type(out).__name__}")  # pragma: no cover
    msg = str(ei.value)
    assert any(re.search(rf"\b{re.escape(n)}\b", msg) for n in names), \
        f"seed {seed}: the error does not name any of {names}: {msg}"
    if not backend.startswith("raw"):
        assert isinstance(ei.value, KernelInputError) or "prefix_attention_cpu:" in msg, msg


def test_base_cases_run_and_match_the_reference(seed):
    """The unmutated inputs run on every backend and agree with the float64 reference (o and lse)."""
    for varlen, backends in ((False, BACKENDS), (True, VARLEN_BACKENDS)):
        a = base(seed, varlen)
        a64 = {n: (t.double() if isinstance(t, torch.Tensor) and t.is_floating_point() else t) for n, t in a.items()}
        if varlen:
            ro, rl = prefix_attention_varlen_reference(a64.pop("q"), a64.pop("k"), a64.pop("v"),
                                                       a64.pop("cu_seqlens"), a64.pop("bank_k"), a64.pop("bank_v"),
                                                       a64.pop("prefix_idx"), **a64)
        else:
            ro, rl = prefix_attention_reference(a64.pop("q"), a64.pop("k"), a64.pop("v"), a64.pop("bank_k"),
                                                a64.pop("bank_v"), a64.pop("prefix_idx"), **a64)
        for backend in backends:
            if backend == "raw-bwd":
                continue
            b = dict(a)
            if backend == "raw-fwd":
                b["softmax_scale"] = D ** -0.5
                b["prefix_scale"] = b["prefix_scale"]
                b["prefix_idx"] = b["prefix_idx"]
                o, lse = call(backend, b, varlen)
            else:
                o, lse = call(backend, {**b, "return_lse": True}, varlen)
            assert rel_err(o, ro) < 1e-5, (seed, backend, varlen)
            fin = torch.isfinite(rl)
            assert torch.equal(fin, torch.isfinite(lse)) and rel_err(lse[fin], rl[fin]) < 1e-5, (seed, backend)


def _pairs(cases, backends):
    """Every (case, backend) pair that is malformed for that backend: RAW_ONLY cases run on the raw ops only,
    PUBLIC_ONLY ones on the public functions only."""
    raw_only = {c[0] for c in RAW_ONLY}
    return [pytest.param(c, b, id=f"{c[0]}@{b}") for c in cases for b in backends
            if not (c[0] in raw_only and not b.startswith("raw")) and not (c[0] in PUBLIC_ONLY and b.startswith("raw"))]


@pytest.mark.parametrize("case,backend", _pairs(DENSE + RAW_ONLY, BACKENDS))
def test_dense_malformed_inputs_raise(case, backend, seed):
    _expect_error(backend, case[1](base(seed)), False, case[2], seed)


@pytest.mark.parametrize("case,backend", _pairs(VARLEN, VARLEN_BACKENDS))
def test_varlen_malformed_inputs_raise(case, backend, seed):
    _expect_error(backend, case[1](base(seed, varlen=True)), True, case[2], seed)


@pytest.mark.parametrize("backend", ["cpu"] + (["triton"] if HAVE_TRITON else []))
def test_varlen_max_seqlen_shorter_than_a_sequence_raises(backend, seed):
    a = base(seed, varlen=True)
    with pytest.raises(ValueError, match="max_seqlen"):
        call(backend, {**a, "max_seqlen": max(LENS) - 1}, True)
    with pytest.raises(ValueError, match="max_seqlen"):
        call(backend, {**a, "max_seqlen": -1}, True)


def test_backend_specific_dtypes_and_devices(seed):
    a = base(seed)
    with pytest.raises(ValueError, match=r"\bq\b"):  # the C++ kernel takes float16/32/64 and bfloat16 only
        call("cpu", {**a, **{n: a[n].to(torch.float8_e4m3fn) for n in ("q", "k", "v")}}, False)
    if HAVE_TRITON:
        with pytest.raises(ValueError, match=r"\bq\b"):  # Triton: float16, bfloat16, float32
            call("triton", {**a, **{n: a[n].double() for n in ("q", "k", "v")}}, False)


def test_raw_backward_checks_its_own_arguments(seed):
    """grad_o, lse and grad_lse of the raw backward op must have q's geometry."""
    a = base(seed)
    args = _raw_args({**a, "prefix_idx": a["prefix_idx"]}, False)
    q = a["q"]
    go, lse = torch.zeros_like(q), torch.zeros(q.shape[:-1])
    bwd = torch.ops.ltuning.prefix_attention_cpu_bwd
    bad = [("grad_o", dict(go=go[:, :, :-1])), ("grad_o", dict(go=go[None])), ("grad_o", dict(go=go.long())),
           ("lse", dict(lse=lse[..., :-1])), ("lse", dict(lse=lse[None])), ("grad_lse", dict(dlse=lse[:1])),
           ("lse", dict(lse=lse.to("meta"))), ("grad_o", dict(go=go.to("meta")))]
    for name, kw in bad:
        with pytest.raises(ValueError, match=rf"\b{name}\b"):
            bwd(kw.get("go", go), kw.get("dlse"), *args[:9], kw.get("lse", lse), False, args[10], args[11])


# ------------------------------------------------------------------------------------------------------------
# Fused RMSNorm / SwiGLU / rotary: public functions and raw ops.

def fused_base(seed):
    g = torch.Generator().manual_seed(seed)
    Bf, L, d, Dh = 2, 3, 16, 8
    return dict(x=torch.randn(Bf, L, d, generator=g), w=torch.randn(d, generator=g),
                gate=torch.randn(Bf, L, d, generator=g), up=torch.randn(Bf, L, d, generator=g),
                q=torch.randn(Bf, 4, L, Dh, generator=g), k=torch.randn(Bf, 2, L, Dh, generator=g),
                cos=torch.randn(1, L, Dh, generator=g), sin=torch.randn(1, L, Dh, generator=g))


def _fused_calls():
    """(op, callable(args dict), argument names the op takes)."""
    rstd = lambda f: torch.ones(f["x"].shape[:-1]) if f["x"].dim() >= 1 else torch.ones(())  # noqa: E731
    ops = torch.ops.ltuning
    return {
        "rms_norm": (lambda f: fo.rms_norm(f["x"], f["w"], f.get("eps", 1e-6)), ("x", "w")),
        "raw-rms-fwd": (lambda f: ops.fused_rms_norm_fwd(f["x"], f["w"], f.get("eps", 1e-6)), ("x", "w")),
        "raw-rms-bwd": (lambda f: ops.fused_rms_norm_bwd(f.get("dy", torch.ones(f["x"].shape)), f["x"], f["w"],
                                                         f.get("rstd", rstd(f)), True, True), ("x", "w")),
        "swiglu": (lambda f: fo.swiglu(f["gate"], f["up"]), ("gate", "up")),
        "raw-swiglu-fwd": (lambda f: ops.fused_swiglu_fwd(f["gate"], f["up"]), ("gate", "up")),
        "raw-swiglu-bwd": (lambda f: ops.fused_swiglu_bwd(f.get("dout", torch.ones(f["gate"].shape)), f["gate"],
                                                          f["up"], True, True), ("gate", "up")),
        "rotary": (lambda f: fo.rotary(f["q"], f["k"], f["cos"], f["sin"]), ("q", "k", "cos", "sin")),
        "raw-rotary": (lambda f: ops.fused_rotary(f["q"], f["k"], f["cos"], f["sin"], False),
                       ("q", "k", "cos", "sin")),
    }


FUSED = _fused_calls()
ARG_NAME = {"w": "weight"}  # how the messages call the argument


def _fused_cases():
    """(id, mutate, names): the constrained dims of each argument (x: only its last dim; q: not its head count)."""
    c = []
    shapes = dict(x=(2,), w=(0,), gate=(0, 1, 2), up=(0, 1, 2), q=(0, 2, 3), k=(0, 2, 3), cos=(1, 2),
                  sin=(0, 1, 2))
    partner = dict(x=("weight",), gate=("up",), q=("k", "cos"), cos=("sin",))
    for name, dims in shapes.items():
        shown = ARG_NAME.get(name, name)
        names = (shown, *partner.get(name, ()))
        for cid, mut, _ in _shape_cases(name, dims):
            if name != "x" or "rank" not in cid:  # x may have any rank >= 1
                c.append((cid, mut, names))
        c.append((f"{name}-int", _map(name, lambda t: (t * 4).long()), (shown,)))
        c.append((f"{name}-meta-device", _map(name, lambda t: t.to("meta")), names))
    c += [("cos-batch-3", _map("cos", lambda t: t.expand(3, *t.shape[1:])), ("cos",)),
          ("head-dim-odd", lambda f: {**f, **{n: f[n][..., :-1] for n in ("q", "k", "cos", "sin")}}, ("D",)),
          ("eps-nan", _set(eps=float("nan")), ("eps",)), ("eps-negative", _set(eps=-1.0), ("eps",)),
          ("x-scalar", _map("x", lambda t: t.sum()), ("x", "weight")),
          ("rstd-shape", lambda f: {**f, "rstd": torch.ones(f["x"].shape[:-2])}, ("rstd",)),
          ("dy-shape", lambda f: {**f, "dy": torch.ones(f["x"].shape[:-1])}, ("dy",)),
          ("dout-shape", lambda f: {**f, "dout": torch.ones(f["gate"].shape[1:])}, ("dout",))]
    c += [(f"{n}-dtype", _map(n, lambda t: t.double()), (ARG_NAME.get(n, n),)) for n in FUSED_RAW_ONLY_DTYPE]
    return c


# mixed dtypes are well-formed for the public functions (they run the reference); the raw ops refuse them
FUSED_RAW_ONLY_DTYPE = ("w", "up", "k", "cos", "sin")


def _fused_pairs():
    """Every (case, op) pair where the case mutates an argument the op takes (or one of its scalars)."""
    pairs = []
    for case in _fused_cases():
        cid = case[0]
        arg = cid.split("-")[0]
        for op, (_, takes) in FUSED.items():
            rms = op.startswith(("rms", "raw-rms"))
            if cid.endswith("-dtype") and not op.startswith("raw"):
                continue
            if arg in takes or (arg == "head" and op.endswith("rotary")) or (arg == "eps" and rms and "bwd" not in op) \
                    or (arg in ("rstd", "dy") and op == "raw-rms-bwd") or (arg == "dout" and op == "raw-swiglu-bwd"):
                pairs.append(pytest.param(case, op, id=f"{cid}@{op}"))
    return pairs


def test_fused_base_cases_match_the_references(seed):
    f = fused_base(seed)
    x64 = {n: t.double() for n, t in f.items()}
    assert rel_err(FUSED["rms_norm"][0](f), fo.rms_norm_reference(x64["x"], x64["w"], 1e-6)) < 1e-5
    assert rel_err(FUSED["raw-rms-fwd"][0](f)[0], fo.rms_norm_reference(x64["x"], x64["w"], 1e-6)) < 1e-5
    assert rel_err(FUSED["swiglu"][0](f), fo.swiglu_reference(x64["gate"], x64["up"])) < 1e-5
    rq, rk = fo.rotary_reference(x64["q"], x64["k"], x64["cos"], x64["sin"])
    for op in ("rotary", "raw-rotary"):
        oq, ok = FUSED[op][0](f)
        assert rel_err(oq, rq) < 1e-5 and rel_err(ok, rk) < 1e-5
    for op in ("raw-rms-bwd", "raw-swiglu-bwd"):
        assert all(torch.isfinite(t).all() for t in FUSED[op][0](f))


@pytest.mark.parametrize("case,op", _fused_pairs())
def test_fused_malformed_inputs_raise(case, op, seed):
    cid, mutate, names = case
    f = mutate(fused_base(seed))
    with pytest.raises(ValueError) as ei:
        out = FUSED[op][0](f)
        pytest.fail(f"seed {seed}: {op} returned a result for {cid}: {type(out).__name__}")  # pragma: no cover
    msg = str(ei.value)
    assert any(re.search(rf"\b{re.escape(n)}\b", msg) for n in names), \
        f"seed {seed}: {op} error does not name any of {names}: {msg}"
