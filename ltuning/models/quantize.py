"""Quantized frozen bases through bitsandbytes (QLoRA-style): NF4 or LLM.int8 weights, trainable parts in fp32.

``load_base(name, quantize="nf4" | "int8")`` loads the frozen backbone with its ``nn.Linear`` layers replaced by
bitsandbytes modules:

* ``nf4``: ``Linear4bit`` with 4-bit NormalFloat weights, double quantization of the block scales (blocks of 64
  weights, their fp32 absmax quantized again to 8 bits in blocks of 256) and bf16 compute:
  ``y = x_bf16 @ dequant(W_nf4)^T + b``, cast back to the input dtype (fp32 residual stream);
* ``int8``: ``Linear8bitLt`` (LLM.int8: row-wise absmax int8 weights, outlier input columns above the threshold 6
  kept in 16 bits), frozen (``has_fp16_weights=False``).

Embeddings, norms and everything that is not a Linear stay in the load dtype, so the residual stream, the
attention inputs q/k/v and therefore the prefix kernels see exactly the layout of a full-precision base
((B, H, L, D) in the load dtype); the fused RMSNorm/SwiGLU/rotary kernels only touch norm weights and activations
(the projections are called as modules). The method and head (the trainables) are ordinary fp32 modules.

Two loading paths, same modules: a hub id or local safetensors checkpoint goes through transformers'
``BitsAndBytesConfig`` (weights quantized while they are loaded); a GGUF checkpoint (transformers refuses
quantization with GGUF, e.g. ``smollm2-135m``) is loaded in the load dtype and its Linears are converted in place
by :func:`quantize_linears` (one layer at a time, so the peak is the model plus one full-precision layer).
bitsandbytes 0.50 runs both on the CPU (``pip install "ltuning[quant]"``).
"""
from __future__ import annotations

import logging
import sys

import torch
from torch import nn

QUANTIZE_CHOICES = ("nf4", "int8")
INT8_THRESHOLD = 6.0


def check_quantize(quantize) -> str | None:
    """Normalise ``quantize`` (None / "none" / "fp" -> None); ValueError naming the choices otherwise."""
    if quantize in (None, "", "none", "fp", "full"):
        return None
    if quantize not in QUANTIZE_CHOICES:
        raise ValueError(f"quantize must be one of {QUANTIZE_CHOICES} or none, got {quantize!r}")
    return quantize


def _bnb():
    try:
        import bitsandbytes as bnb  # noqa: F401
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ValueError("--quantize needs bitsandbytes: pip install 'ltuning[quant]' (bitsandbytes 0.50)") from e
    # bitsandbytes logs on every int8 call that fp32 inputs are cast to fp16 (expected: LLM.int8 runs in 16 bits)
    logging.getLogger("bitsandbytes.autograd._functions").addFilter(
        lambda r: not str(r.msg).startswith("MatMul8bitLt: inputs will be cast"))
    return bnb


def bnb_config(quantize: str):
    """transformers' ``BitsAndBytesConfig`` for ``quantize`` ("nf4": double quant, bf16 compute; "int8")."""
    from transformers import BitsAndBytesConfig
    _bnb()
    if quantize == "nf4":
        return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                  bnb_4bit_compute_dtype=torch.bfloat16)
    if quantize == "int8":
        return BitsAndBytesConfig(load_in_8bit=True, llm_int8_threshold=INT8_THRESHOLD)
    raise ValueError(f"quantize must be one of {QUANTIZE_CHOICES}, got {quantize!r}")


def quantized_linear(linear: nn.Linear, quantize: str, device="cpu") -> nn.Module:
    """A bitsandbytes module holding ``linear``'s weight quantized (frozen) and its bias in the bias's dtype."""
    bnb = _bnb()
    w = linear.weight.detach()
    bias = linear.bias is not None
    if quantize == "nf4":
        q = bnb.nn.Linear4bit(linear.in_features, linear.out_features, bias=bias, compute_dtype=torch.bfloat16,
                              compress_statistics=True, quant_type="nf4", device="meta")
        q.weight = bnb.nn.Params4bit(w.to("cpu", torch.float32), requires_grad=False, compress_statistics=True,
                                     quant_type="nf4", module=q).to(device)
    elif quantize == "int8":
        q = bnb.nn.Linear8bitLt(linear.in_features, linear.out_features, bias=bias, has_fp16_weights=False,
                                threshold=INT8_THRESHOLD, device="meta")
        q.weight = bnb.nn.Int8Params(w.to("cpu", torch.float16), requires_grad=False,
                                     has_fp16_weights=False).to(device)
    else:
        raise ValueError(f"quantize must be one of {QUANTIZE_CHOICES}, got {quantize!r}")
    if bias:
        q.bias = nn.Parameter(linear.bias.detach().to(device), requires_grad=False)
    return q


def quantize_linears(module: nn.Module, quantize: str, skip: tuple = ("lm_head",)) -> nn.Module:
    """Replace every ``nn.Linear`` under ``module`` (leaf names in ``skip`` excepted) by its bitsandbytes
    counterpart, in place, one at a time (each full-precision weight is freed as soon as it is converted)."""
    quantize = check_quantize(quantize)
    if quantize is None:
        return module
    for parent in list(module.modules()):
        for name, child in list(parent.named_children()):
            if type(child) is nn.Linear and name not in skip:
                dev = child.weight.device
                setattr(parent, name, quantized_linear(child, quantize, "cpu" if dev.type == "meta" else dev))
    return keep_trainable_layout(module)


def keep_trainable_layout(model: nn.Module) -> nn.Module:
    """Keep every ``Linear4bit`` of ``model`` in the layout its autograd function differentiates.

    bitsandbytes (0.50) repacks a 4-bit weight for its CPU inference kernel the first time the module runs in eval
    mode on an AVX512-BF16 CPU without grad; from then on every call, also in training, goes to ``gemv_4bit``,
    which has no autograd formula: gradients to the layer's input are silently dropped (torch warns "an autograd
    kernel was not registered"), which would cut every prefix/prompt gradient below the last layer. ltuning runs
    validation in eval mode between training steps, so the repacking is switched off (a packed weight is unpacked)
    and every call goes through bitsandbytes' ``MatMul4Bit`` (dequantize, bf16 matmul; backward: dequantize,
    ``grad_out @ W``), whose input gradient is tested against a float64 reference (``tests/models/test_quantize.py``)."""
    if "bitsandbytes" not in sys.modules:  # a base with bitsandbytes modules has imported it
        return model
    import bitsandbytes as bnb
    from bitsandbytes.nn.modules import _convert_weight_packed_for_cpu_inverse
    for m in model.modules():
        if isinstance(m, bnb.nn.Linear4bit):
            m.support_avx512bf16_for_cpu = False
            qs = getattr(m.weight, "quant_state", None)
            if qs is not None and getattr(qs, "packing_format_for_cpu", False):
                m.weight.data, m.weight.quant_state = _convert_weight_packed_for_cpu_inverse(m.weight.data, qs)
    return model


def quantization_of(model: nn.Module) -> str | None:
    """"nf4" / "fp4" / "int8" when ``model`` holds bitsandbytes Linears, else None (full precision)."""
    if "bitsandbytes" not in sys.modules:  # a base with bitsandbytes modules has imported it
        return None
    import bitsandbytes as bnb
    for m in model.modules():
        if isinstance(m, bnb.nn.Linear4bit):
            return getattr(m.weight, "quant_type", None) or "nf4"
        if isinstance(m, bnb.nn.Linear8bitLt):
            return "int8"
    return None


def frozen_weight_bytes(model: nn.Module) -> int:
    """Bytes of the base's parameters and buffers as stored (4-bit weights count 0.5 byte per weight, plus the
    quantization state: absmax, nested absmax, code book)."""
    total = sum(t.numel() * t.element_size() for t in list(model.parameters()) + list(model.buffers()))
    for m in model.modules():
        qs = getattr(getattr(m, "weight", None), "quant_state", None)
        if qs is not None:
            for t in (qs.absmax, qs.code, getattr(qs.state2, "absmax", None) if qs.nested else None,
                      getattr(qs.state2, "code", None) if qs.nested else None):
                if isinstance(t, torch.Tensor):
                    total += t.numel() * t.element_size()
        scb = getattr(getattr(m, "weight", None), "SCB", None)
        scb = scb if scb is not None else getattr(getattr(m, "state", None), "SCB", None)  # after a forward
        if isinstance(scb, torch.Tensor):
            total += scb.numel() * scb.element_size()
    return total
