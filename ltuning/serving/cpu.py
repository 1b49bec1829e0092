"""CPU capabilities for inference: native bf16 detection, the measured matrix rate, dynamic int8 Linears.

* :func:`native_bf16`: the CPU multiplies bf16 in hardware (``amx_bf16`` or ``avx512_bf16`` in /proc/cpuinfo);
  elsewhere bf16 is emulated and far slower than fp32.
* :func:`preferred_dtype`: ``"bf16"`` only when it is native AND a probe GEMM at a transformer's shape is faster
  in bf16 than in fp32 on this machine, now (measured once per process, a fraction of a second); else ``"fp32"``.
* :func:`gemm_gflops`: the matrix rate, median of timed ``(m, k) @ (k, n)`` products, 2mkn flops each.
* :func:`quantize_int8`: every ``nn.Linear`` of a frozen model becomes a PyTorch dynamic int8 Linear (weights int8
  per output channel, activations quantized per batch at run time; VNNI / AMX-INT8 kernels through oneDNN/FBGEMM).
  Inference only.
"""
from __future__ import annotations

import functools
import os
import platform
import statistics
import time
import warnings

import torch
from torch import nn


@functools.lru_cache(maxsize=1)
def cpu_flags() -> frozenset:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    return frozenset()


def native_bf16() -> bool:
    return bool({"amx_bf16", "avx512_bf16"} & cpu_flags())


def machine() -> dict:
    """What a benchmark record needs to say about the CPU."""
    name = platform.processor()
    try:
        with open("/proc/cpuinfo") as f:
            name = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), name)
    except OSError:
        pass
    fl = cpu_flags()
    return {"cpu": name, "amx_bf16": "amx_bf16" in fl, "amx_int8": "amx_int8" in fl,
            "avx512_bf16": "avx512_bf16" in fl, "avx512_vnni": "avx512_vnni" in fl, "cores": os.cpu_count(),
            "torch_threads": torch.get_num_threads(), "torch": torch.__version__}


def gemm_gflops(dtype: torch.dtype = torch.float32, m: int = 512, k: int = 576, n: int = 1536, reps: int = 9,
                min_seconds: float = 0.02) -> float:
    """Median GFLOP/s of ``(m, k) @ (k, n)`` in ``dtype`` (each timing repeats the product for >= min_seconds)."""
    g = torch.Generator().manual_seed(0)
    a = torch.randn(m, k, generator=g).to(dtype)
    b = torch.randn(k, n, generator=g).to(dtype)
    with torch.inference_mode():
        a @ b  # warm
        t0 = time.perf_counter()
        a @ b
        inner = max(1, int(min_seconds / max(time.perf_counter() - t0, 1e-6)))
        rates = []
        for _ in range(reps):
            t0 = time.perf_counter()
            for _ in range(inner):
                a @ b
            rates.append(2 * m * k * n * inner / (time.perf_counter() - t0) / 1e9)
    return statistics.median(rates)


@functools.lru_cache(maxsize=1)
def preferred_dtype() -> str:
    """``"bf16"`` if native and measured >= 1.1x faster than fp32 at a SmolLM2 MLP shape here; else ``"fp32"``."""
    if not native_bf16():
        return "fp32"
    fp32 = gemm_gflops(torch.float32, reps=5)
    bf16 = gemm_gflops(torch.bfloat16, reps=5)
    return "bf16" if bf16 >= 1.1 * fp32 else "fp32"


def quantize_int8(model: nn.Module) -> nn.Module:
    """In place: every ``nn.Linear`` of ``model`` -> a dynamic int8 Linear (CPU, fp32 weights expected). Forward
    hooks on the Linears are carried over. Returns ``model``."""
    p = next(model.parameters(), None)
    if p is not None and (p.device.type != "cpu" or p.dtype != torch.float32):
        raise ValueError(f"--quantize int8 needs an fp32 model on the CPU, got {p.dtype} on {p.device}")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.ao.quantization's deprecation notice (moving to torchao)
        from torch.ao.quantization import per_channel_dynamic_qconfig, quantize_dynamic
        return quantize_dynamic(model, {nn.Linear: per_channel_dynamic_qconfig}, dtype=torch.qint8, inplace=True)
