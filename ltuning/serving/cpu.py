"""CPU capabilities for inference: native bf16 detection, the measured matrix rate, dynamic int8 Linears.

* :func:`native_bf16`: the CPU multiplies bf16 in hardware (``amx_bf16`` or ``avx512_bf16`` in /proc/cpuinfo);
  elsewhere bf16 is emulated and far slower than fp32.
* :func:`preferred_dtype`: ``"bf16"`` only when it is native AND a probe GEMM at a transformer's shape is faster
  in bf16 than in fp32 on this machine, now (measured once per process, a fraction of a second); else ``"fp32"``.
* :func:`gemm_gflops`: the matrix rate, median of timed ``(m, k) @ (k, n)`` products, 2mkn flops each.
* :func:`quantize_int8`: every ``nn.Linear`` of a frozen model becomes a PyTorch dynamic int8 Linear (weights int8
  per output channel, activations quantized per batch at run time; VNNI / AMX-INT8 kernels through oneDNN/FBGEMM).
  Inference only. With ``calibrate`` (what the engine passes), the Linears are *smoothed* first (SmoothQuant,
  Xiao et al. 2023): activation quantization is per tensor (one scale for a whole batch), so a few input channels
  of outsized magnitude -- decoder MLP down-projections after SwiGLU have them -- leave every other channel a
  handful of int8 levels. Per input channel j of each Linear, from the calibration run's ``max|x_j|`` and the
  weight's ``max_i |W_ij|``: ``s_j = max|x_j|^alpha / max|W_:j|^(1 - alpha)`` (alpha = 0.5); the weight's
  column j is multiplied by ``s_j`` and the input divided by it at run time (:class:`SmoothedLinear`: one
  elementwise multiply before the int8 product), so ``y = (x / s) (W s)^T`` equals ``x W^T`` exactly in real
  arithmetic and the outliers move into the per-channel weight scales, where they cost nothing. The calibration
  inputs are :data:`CALIBRATION_TEXTS`, run through every adapter's model once at load (fp32, before quantizing).
  A Linear whose smoothed input still has a channel over ``MAX_OUTLIER_RATIO`` x the median channel's magnitude
  stays fp32 (the few decoder down-projections with massive activations; on SmolLM2 1 to 6 of its 210 Linears,
  depending on the adapter, in ``benchmarks/results/int8_config.json``).
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


# Generic calibration sentences for int8 smoothing (statements, questions, reviews, requests, a premise/hypothesis
# pair as the engine joins it on decoders): the outlier channels that smoothing moves are a property of the model,
# present on any text, so a small varied set is enough; no dataset's data is in it.
CALIBRATION_TEXTS = (
    "The quick brown fox jumps over the lazy dog.",
    "I loved this movie: the acting was superb and the story kept me hooked until the very end.",
    "What a waste of two hours, the plot made no sense and the dialogue was painfully flat.",
    "How do I reset my password if I no longer have access to my email address?",
    "My card payment was declined at the shop this morning, can you tell me why?",
    "The committee will meet on Tuesday to discuss the budget for next year.",
    "A man is playing a guitar on a crowded street.\nA musician is performing outdoors.",
    "Scientists have found that the new material conducts heat twice as well as copper.",
    "Please cancel my order, I bought the wrong size.",
    "It is neither the best nor the worst book I have read this year.",
    "The weather turned cold overnight and the roads were covered with ice.",
    "Can you transfer 200 dollars from my savings account to my checking account?",
    "The results of the study were inconclusive, and the authors call for more research.",
    "she said it was fine but i do not believe her at all",
    "Two children are sitting at a table eating lunch.\nThe kids are asleep in their beds.",
    "Breaking: the central bank raised interest rates by a quarter of a percentage point.",
)


# The engine's int8 configuration, chosen without labels and without dev data: agreement of int8 with fp32
# predictions on 200 SST-2 training texts for three trained SmolLM2 adapters (benchmarks/serving/int8_config.py,
# record benchmarks/results/int8_config.json; alpha 0.5 is SmoothQuant's default).
SMOOTH_ALPHA = 0.5
MAX_OUTLIER_RATIO = 20.0


class SmoothedLinear(nn.Module):
    """``linear(x * inv_scale)``: the per-input-channel smoothing of :func:`quantize_int8` in front of a Linear
    whose weight columns were multiplied by ``1 / inv_scale``. ``in_features`` / ``out_features`` as the Linear's."""

    keep_full_precision = False

    def __init__(self, linear: nn.Module, inv_scale: torch.Tensor):
        super().__init__()
        self.linear = linear
        self.register_buffer("inv_scale", inv_scale)
        self.in_features, self.out_features = linear.in_features, linear.out_features

    def forward(self, x):
        return self.linear(x * self.inv_scale)


def _input_absmax(model: nn.Module, calibrate) -> dict:
    """``{module: max |x_j| over calibration tokens (in_features,)}`` of every ``nn.Linear`` that ``calibrate()``
    runs (forward pre-hooks; padded positions included: they are real inputs of the products too)."""
    stats, handles = {}, []

    def hook(mod, args):
        x = args[0].detach().float().reshape(-1, mod.in_features).abs().amax(0)
        stats[mod] = torch.maximum(stats[mod], x) if mod in stats else x
    for m in model.modules():
        if isinstance(m, nn.Linear):
            handles.append(m.register_forward_pre_hook(hook))
    try:
        with torch.inference_mode():
            calibrate()
    finally:
        for h in handles:
            h.remove()
    return stats


def smooth_linears(model: nn.Module, calibrate, alpha: float = 0.5, max_outlier_ratio: float | None = None):
    """In place: each ``nn.Linear`` of ``model`` that ``calibrate()`` runs gets its weight columns multiplied by
    ``s`` and is replaced at its path by ``SmoothedLinear(linear, 1 / s)`` (module docstring; the Linear's forward
    hooks move to the wrapper, so a hook still sees the unsmoothed input). With ``max_outlier_ratio`` R, a Linear
    whose smoothed input still has ``max_j m_j > R * median_j m_j`` (``m_j = max|x_j| / s_j``) is marked to stay
    in full precision (``keep_full_precision = True`` on the wrapper; :func:`quantize_int8` skips it). Returns
    (smoothed, kept in full precision)."""
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"smoothing alpha: expected a value in [0, 1], got {alpha}")
    stats = _input_absmax(model, calibrate)
    parents = {id(child): (parent, name) for parent in model.modules() for name, child in parent.named_children()}
    done = kept = 0
    for lin, xmax in stats.items():
        w = lin.weight.data
        s = (xmax.clamp_min(1e-5).pow(alpha) / w.abs().amax(0).float().clamp_min(1e-5).pow(1 - alpha))
        s = s.clamp(1e-4, 1e4)
        m = xmax / s
        s = s.to(w.dtype)
        w.mul_(s)
        wrapper = SmoothedLinear(lin, 1.0 / s)
        if max_outlier_ratio is not None and m.max() > max_outlier_ratio * m.median().clamp_min(1e-12):
            wrapper.keep_full_precision = True
            kept += 1
        for d in ("_forward_hooks", "_forward_pre_hooks", "_forward_hooks_with_kwargs",
                  "_forward_pre_hooks_with_kwargs", "_forward_hooks_always_called"):
            src = getattr(lin, d, None)
            if src:
                getattr(wrapper, d).update(src)
                src.clear()
        parent, name = parents[id(lin)]
        setattr(parent, name, wrapper)
        done += 1
    return done, kept


def quantize_int8(model: nn.Module, calibrate=None, alpha: float = 0.5,
                  max_outlier_ratio: float | None = None) -> nn.Module:
    """In place: every ``nn.Linear`` of ``model`` -> a dynamic int8 Linear (CPU, fp32 weights expected), smoothed
    first when ``calibrate`` (a callable running the model on calibration inputs) is given, and those whose
    smoothed input still has outliers beyond ``max_outlier_ratio`` kept in fp32 (:func:`smooth_linears`).
    Forward hooks on the Linears are carried over. Returns ``model``."""
    p = next(model.parameters(), None)
    if p is not None and (p.device.type != "cpu" or p.dtype != torch.float32):
        raise ValueError(f"--quantize int8 needs an fp32 model on the CPU, got {p.dtype} on {p.device}")
    if calibrate is not None:
        smooth_linears(model, calibrate, alpha, max_outlier_ratio)
    keep = {id(m.linear) for m in model.modules() if isinstance(m, SmoothedLinear) and m.keep_full_precision}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.ao.quantization's deprecation notice (moving to torchao)
        from torch.ao.quantization import per_channel_dynamic_qconfig, quantize_dynamic
        spec = {name: per_channel_dynamic_qconfig for name, m in model.named_modules()
                if isinstance(m, nn.Linear) and id(m) not in keep}
        return quantize_dynamic(model, spec, dtype=torch.qint8, inplace=True)
