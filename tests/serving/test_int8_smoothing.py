"""Int8 smoothing (``ltuning/serving/cpu.py``: SmoothQuant-style per-input-channel scales before dynamic int8
Linears). Float64 where the claim is an identity; seeded random inputs with an outlier channel otherwise."""
from __future__ import annotations

import torch
from torch import nn

from ltuning.serving import cpu


def _mlp(seed, d=16, h=32):
    g = torch.Generator().manual_seed(seed)
    m = nn.Sequential(nn.Linear(d, h), nn.ReLU(), nn.Linear(h, d))
    with torch.no_grad():
        for p in m.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    x = torch.randn(64, d, generator=g)
    x[:, 3] *= 80.0  # an outlier input channel, as after a decoder's SwiGLU
    return m, x


def test_smoothing_is_an_identity_in_float64_and_hooks_see_the_raw_input():
    seed = 1234
    m, x = _mlp(seed)
    m, x = m.double(), x.double()
    ref = m(x)
    seen = []
    m[0].register_forward_hook(lambda mod, inp, out: seen.append(inp[0]))
    n, kept = cpu.smooth_linears(m, lambda: m(x))
    assert n == 2 and kept == 0 and all(isinstance(m[i], cpu.SmoothedLinear) for i in (0, 2))
    seen.clear()
    out = m(x)
    err = ((out - ref).norm() / ref.norm()).item()
    assert err < 1e-12, f"seed {seed}: relative error {err}"
    assert len(seen) == 1 and torch.equal(seen[0], x), "the moved hook must see the unsmoothed input"
    assert torch.all(m[0].inv_scale > 0) and m[0].inv_scale[3] < m[0].inv_scale.median(), "outlier channel not scaled down"


def test_smoothing_cuts_the_int8_error_of_an_outlier_channel():
    seed = 99
    errs = {}
    for smooth in (False, True):
        m, x = _mlp(seed)
        ref = m(x)
        cpu.quantize_int8(m, (lambda: m(x)) if smooth else None)
        with torch.inference_mode():
            out = m(x)
        errs[smooth] = ((out - ref).norm() / ref.norm()).item()
    assert errs[True] < errs[False] / 2, f"seed {seed}: int8 relative error {errs}"


def test_smoothing_rejects_a_bad_alpha():
    m, x = _mlp(0)
    try:
        cpu.smooth_linears(m, lambda: m(x), alpha=1.5)
    except ValueError as e:
        assert "alpha" in str(e)
    else:
        raise AssertionError("alpha 1.5 accepted")


def test_a_linear_with_outliers_left_after_smoothing_stays_fp32():
    m, x = _mlp(7)
    x[:, 5] *= 1e4  # far beyond what alpha = 0.5 can flatten
    cpu.quantize_int8(m, lambda: m(x), max_outlier_ratio=50.0)
    assert m[0].keep_full_precision and type(m[0].linear) is nn.Linear
    assert not m[2].keep_full_precision and "quantized" in type(m[2].linear).__module__
