"""Drop-in fused CPU kernels for a loaded Llama-family model (RMSNorm, SwiGLU MLP, rotary embedding).

``enable_fused_ops(model)`` patches the model's modules in place, Liger-Kernel style, without copying modelling
code (the kernels: :func:`ltuning.kernels.rms_norm`, :func:`~ltuning.kernels.swiglu`, :func:`~ltuning.kernels.rotary`,
C++ in ``ltuning/kernels/cpu/csrc/fused_llama_ops.cpp``):

* every RMSNorm module (``LlamaRMSNorm`` and its Mistral/Qwen2/Qwen3/SmolLM3 copies) gets an instance-level
  ``forward`` running the fused RMSNorm (the weight gradient is computed only when the weight requires one);
* every gated MLP whose activation is SiLU gets ``forward = down_proj(swiglu(gate_proj(x), up_proj(x)))``
  (the projections are still called as modules, so hooks and LoRA-style wrappers on them keep working);
* rotary embedding: transformers' attention calls the module-level ``apply_rotary_pos_emb`` of its modelling
  file, so (as Liger does) that name is replaced in the modelling module, but by a dispatcher that runs the fused
  kernel only inside the forward of an attention module of a patched model (forward pre-hook / always-called
  forward hook keep a per-thread depth counter); any other caller, or an unpatched model of the same class,
  gets the original function. The name is restored when the last patched model is disabled.

Each patched call falls back to the original code for inputs the kernels do not take (non-CPU tensors, dtypes
other than float32/bfloat16/float64, a weight of another dtype than the input, cos/sin that require grad). BERT
family models (LayerNorm, GELU) are left untouched. ``disable_fused_ops(model)`` undoes everything.
"""
from __future__ import annotations

import sys
import threading
from typing import Dict

import torch
from torch import nn

from ..kernels import fused_ops_available, rms_norm, rotary, swiglu

RMSNORM_CLASSES = ("LlamaRMSNorm", "MistralRMSNorm", "Qwen2RMSNorm", "Qwen3RMSNorm", "SmolLM3RMSNorm")
MLP_CLASSES = ("LlamaMLP", "MistralMLP", "Qwen2MLP", "Qwen3MLP", "SmolLM3MLP")
ATTENTION_CLASSES = ("LlamaAttention", "MistralAttention", "Qwen2Attention", "Qwen3Attention", "SmolLM3Attention")
SILU_ACTS = ("silu", "swish")
DEFAULT_OPS = ("rms_norm", "swiglu", "rotary")

_TLS = threading.local()
_ROPE_PATCHES: Dict[str, list] = {}  # modelling module name -> [original function, number of patched models]
_LOCK = threading.Lock()


# ------------------------------------------------------------------------------------------------------------
# Patched forwards (bound to instances)

def _rms_norm_forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
    w = self.weight
    # float64: transformers' RMSNorm rounds through float32 (its semantics, kept); the kernel would not
    if hidden_states.dtype != w.dtype or hidden_states.dtype == torch.float64 or hidden_states.device.type != "cpu":
        return type(self).forward(self, hidden_states)
    return rms_norm(hidden_states, w, self.variance_epsilon)


def _swiglu_mlp_forward(self, x: torch.Tensor) -> torch.Tensor:
    gate = self.gate_proj(x)
    return self.down_proj(swiglu(gate, self.up_proj(x)))


def _bind(module: nn.Module, name: str, fn) -> None:
    module.__dict__[name] = fn.__get__(module, type(module))


def _unbind(module: nn.Module, name: str) -> None:
    module.__dict__.pop(name, None)


# ------------------------------------------------------------------------------------------------------------
# Rotary embedding: module-level dispatcher, active only inside a patched attention module's forward

def _rope_depth() -> int:
    return getattr(_TLS, "depth", 0)


def _enter(module, args):
    _TLS.depth = _rope_depth() + 1


def _exit(module, args, output):
    _TLS.depth = max(_rope_depth() - 1, 0)


def _make_rope_dispatcher(original):
    def apply_rotary_pos_emb(q, k, cos, sin, *args, **kwargs):
        if _rope_depth() and not args and kwargs.get("unsqueeze_dim", 1) == 1 and set(kwargs) <= {"unsqueeze_dim"}:
            return rotary(q, k, cos, sin)
        return original(q, k, cos, sin, *args, **kwargs)

    apply_rotary_pos_emb._ltuning_original = original
    apply_rotary_pos_emb.__doc__ = original.__doc__
    return apply_rotary_pos_emb


ROPE_ARGS = ("q", "k", "cos", "sin", "unsqueeze_dim")


def _plain_function(f):
    """The Python function behind ``f``: ``f`` itself, or the function that a hub-kernel wrapper module calls.
    transformers >= 5.25 decorates ``apply_rotary_pos_emb`` with ``use_kernel_forward_from_hub``, which (with the
    ``kernels`` package installed) turns it into an ``nn.Module`` instance whose ``forward`` calls the original
    function from its closure; the signature check below needs that function."""
    if getattr(f, "__code__", None) is not None:
        return f
    forward = getattr(type(f), "forward", None)
    for cell in getattr(forward, "__closure__", None) or ():
        inner = cell.cell_contents
        if getattr(inner, "__code__", None) is not None and inner.__code__.co_varnames[:5] == ROPE_ARGS:
            return inner
    return None


def _rope_module_ok(modname: str) -> bool:
    mod = sys.modules.get(modname)
    f = getattr(mod, "apply_rotary_pos_emb", None)
    f = _plain_function(getattr(f, "_ltuning_original", f))
    return callable(f) and f.__code__.co_varnames[:5] == ROPE_ARGS


def _acquire_rope(modname: str) -> None:
    with _LOCK:
        mod = sys.modules[modname]
        entry = _ROPE_PATCHES.get(modname)
        if entry is None:
            original = mod.apply_rotary_pos_emb
            _ROPE_PATCHES[modname] = entry = [original, 0]
            mod.apply_rotary_pos_emb = _make_rope_dispatcher(original)
        entry[1] += 1


def _release_rope(modname: str) -> None:
    with _LOCK:
        entry = _ROPE_PATCHES.get(modname)
        if entry is None:
            return
        entry[1] -= 1
        if entry[1] <= 0:
            mod = sys.modules[modname]
            if getattr(mod.apply_rotary_pos_emb, "_ltuning_original", None) is entry[0]:
                mod.apply_rotary_pos_emb = entry[0]
            del _ROPE_PATCHES[modname]


# ------------------------------------------------------------------------------------------------------------
# Public API

def _is_llama_mlp(m: nn.Module) -> bool:
    if type(m).__name__ not in MLP_CLASSES or not all(hasattr(m, a) for a in ("gate_proj", "up_proj", "down_proj")):
        return False
    act = getattr(getattr(m, "config", None), "hidden_act", None)
    return act in SILU_ACTS and type(getattr(m, "act_fn", None)).__name__ in ("SiLU", "SiLUActivation")


def enable_fused_ops(model: nn.Module, ops=DEFAULT_OPS) -> dict:
    """Patch ``model`` in place with the fused CPU kernels named in ``ops`` (subset of ``DEFAULT_OPS``);
    idempotent. Returns the number of modules patched per op. Nothing is patched when the extension does not
    build (one warning) or the model is not Llama-family."""
    ops = tuple(ops)
    unknown = set(ops) - set(DEFAULT_OPS)
    if unknown:
        raise ValueError(f"unknown fused ops {sorted(unknown)}; choose from {DEFAULT_OPS}")
    counts = {op: 0 for op in ops}
    if not fused_ops_available():
        return counts
    state = model.__dict__.setdefault("_ltuning_fused", {"modules": [], "hooks": [], "rope": []})
    done = {id(m) for m, _ in state["modules"]}
    for m in model.modules():
        if id(m) in done:
            continue
        name = type(m).__name__
        if "rms_norm" in ops and name in RMSNORM_CLASSES and hasattr(m, "variance_epsilon"):
            _bind(m, "forward", _rms_norm_forward)
            state["modules"].append((m, "forward"))
            counts["rms_norm"] += 1
        elif "swiglu" in ops and _is_llama_mlp(m):
            _bind(m, "forward", _swiglu_mlp_forward)
            state["modules"].append((m, "forward"))
            counts["swiglu"] += 1
        elif "rotary" in ops and name in ATTENTION_CLASSES and _rope_module_ok(type(m).__module__):
            modname = type(m).__module__
            if modname not in state["rope"]:
                _acquire_rope(modname)
                state["rope"].append(modname)
            state["hooks"] += [m.register_forward_pre_hook(_enter), m.register_forward_hook(_exit, always_call=True)]
            state["modules"].append((m, None))
            counts["rotary"] += 1
    return counts


def disable_fused_ops(model: nn.Module) -> None:
    """Undo :func:`enable_fused_ops` on ``model`` (no-op when it was not enabled)."""
    state = model.__dict__.pop("_ltuning_fused", None)
    if state is None:
        return
    for m, attr in state["modules"]:
        if attr is not None:
            _unbind(m, attr)
    for h in state["hooks"]:
        h.remove()
    for modname in state["rope"]:
        _release_rope(modname)


def fused_ops_enabled(model: nn.Module) -> bool:
    return "_ltuning_fused" in model.__dict__
