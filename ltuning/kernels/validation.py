"""Input validation shared by every shared-prefix attention entry point (reference, SDPA, C++, Triton).

:func:`check_inputs` checks everything a kernel relies on before any kernel touches memory, and raises one
:class:`KernelInputError` (a ``ValueError``) whose message names the argument and what was expected:

* ranks and sizes: dense q (B, Hq, Lq, D), k/v (B, Hkv, Lk, D); packed q (T, Hq, D), k/v (T, Hkv, D);
  Hq, Hkv, D >= 1 and Hq % Hkv == 0 (B, L, T = 0 are a valid empty batch);
  bank_k/bank_v (N, Hkv, P, D); prefix_idx (B,); key_padding_mask (B, Lk); prefix_scale (B, P);
  prefix_lengths (N,); prefix_bias (N, P); cu_seqlens (B + 1,);
* dtypes: q, k, v one floating dtype (of the backend's ``dtypes``); bank_k, bank_v one floating dtype (it may
  differ from q's: the entry points cast it); prefix_scale and prefix_bias floating; prefix_idx, prefix_lengths,
  cu_seqlens int32 or int64; key_padding_mask bool or integer (a float mask is refused: it is usually additive, 0 / -inf,
  and casting it to bool would invert it);
* devices: every tensor on q's device (and on ``device_type`` when the backend needs one);
* values (``values=True``): 0 <= prefix_idx < N, 0 <= prefix_lengths <= P, prefix_bias finite, cu_seqlens starts
  at 0, never decreases and ends at T, ``max_seqlen`` >= the longest sequence. The index statistics are reduced on
  q's device into one small tensor and read with ONE host transfer (one sync on a GPU; prefix_bias's finiteness is
  a second); on the CPU small index tensors are read directly.

The C++ ops repeat every check in C++ (``TORCH_CHECK_VALUE``, also a ``ValueError``), so a direct call of
``torch.ops.ltuning.*`` is just as safe; the CPU entry point therefore leaves the O(B) value scans to C++
(``values=False``) when the extension runs.
"""
from __future__ import annotations

import math
import operator
from typing import NamedTuple, Optional, Sequence

import torch
from torch import Tensor

INDEX_DTYPES = (torch.int32, torch.int64)


class KernelInputError(ValueError):
    """A malformed argument of a kernel entry point; the message names the argument and the expected value."""


class Dims(NamedTuple):
    B: int
    Hq: int
    Lq: int  # dense: query length; varlen: T (packed rows)
    D: int
    Hkv: int
    Lk: int  # dense: key length; varlen: T
    P: int
    N: int


def _fail(where: str, msg: str):
    raise KernelInputError(f"{where}: {msg}")


def _shape(t) -> tuple:
    return tuple(t.shape)


def _tensor(where, name, t, optional=True):
    if t is None:
        if not optional:
            _fail(where, f"{name} is required (a tensor); got None")
        return
    if not isinstance(t, Tensor):
        _fail(where, f"{name} must be a torch.Tensor; got {type(t).__name__}")


def _index_dtype(where, name, t):
    if t.dtype not in INDEX_DTYPES:
        _fail(where, f"{name} must be an int32 or int64 tensor; got {t.dtype}")


def check_inputs(q, k, v, bank_k=None, bank_v=None, prefix_idx=None, *, key_padding_mask=None, prefix_scale=None,
                 prefix_lengths=None, prefix_bias=None, softmax_scale=None, cu_seqlens=None, max_seqlen=None,
                 varlen=False,
                 dtypes: Optional[Sequence[torch.dtype]] = None, device_type: Optional[str] = None,
                 values: bool = True, where: str = "prefix_attention") -> Dims:
    """Validate the arguments of a shared-prefix attention call (see the module docstring); returns the sizes.

    ``varlen``: packed form (``cu_seqlens`` required, no ``key_padding_mask``). ``dtypes``: the float dtypes the
    backend takes for q/k/v (None: any floating dtype). ``device_type``: the device type the backend runs on
    (None: any). ``values=False`` skips the value scans (the caller's C++ op does them). ``where`` prefixes the
    message (the entry point's name).
    """
    if not (isinstance(q, Tensor) and isinstance(k, Tensor) and isinstance(v, Tensor)):
        for name, t in (("q", q), ("k", k), ("v", v)):
            _tensor(where, name, t, optional=False)
    for name, t in (("bank_k", bank_k), ("bank_v", bank_v), ("prefix_idx", prefix_idx),
                    ("key_padding_mask", key_padding_mask), ("prefix_scale", prefix_scale),
                    ("prefix_lengths", prefix_lengths), ("prefix_bias", prefix_bias), ("cu_seqlens", cu_seqlens)):
        if t is not None and not isinstance(t, Tensor):
            _tensor(where, name, t)
    # ranks and sizes of q, k, v
    rank = 3 if varlen else 4
    form = "(T, {}, D)" if varlen else "(B, {}, L, D)"
    for name, t, h in (("q", q, "Hq"), ("k", k, "Hkv"), ("v", v, "Hkv")):
        if t.dim() != rank:
            _fail(where, f"{name} must be {rank}-D {form.format(h)}; got shape {_shape(t)}")
    if varlen:
        T, Hq, D = q.shape
        Hkv = k.shape[1]
        if k.shape[0] != T or k.shape[2] != D:
            _fail(where, f"k must be (T={T}, Hkv, D={D}) like q; got shape {_shape(k)}")
        if cu_seqlens is None:
            _fail(where, "cu_seqlens is required (a (B+1,) int32/int64 tensor) for the packed form")
        if key_padding_mask is not None:
            _fail(where, "key_padding_mask is not taken by the packed form (cu_seqlens delimits the sequences)")
        if cu_seqlens.dim() != 1 or cu_seqlens.numel() < 1:
            _fail(where, f"cu_seqlens must be a 1-D (B+1,) tensor with at least one element; got shape "
                         f"{_shape(cu_seqlens)}")
        _index_dtype(where, "cu_seqlens", cu_seqlens)
        B, Lq, Lk = cu_seqlens.numel() - 1, T, T
    else:
        B, Hq, Lq, D = q.shape
        Hkv, Lk = k.shape[1], k.shape[2]
        if k.shape[0] != B or k.shape[3] != D:
            _fail(where, f"k must be (B={B}, Hkv, Lk, D={D}); got shape {_shape(k)}")
        if cu_seqlens is not None:
            _fail(where, "cu_seqlens is only taken by the packed (varlen) form")
    if v.shape != k.shape:
        _fail(where, f"v must have k's shape {_shape(k)}; got {_shape(v)}")
    if Hq < 1 or Hkv < 1 or D < 1:
        _fail(where, f"head counts and head dim must be >= 1; got Hq={Hq} (q), Hkv={Hkv} (k), D={D}")
    if Hq % Hkv:
        _fail(where, f"q's head count Hq={Hq} must be a multiple of k's head count Hkv={Hkv}")
    # dtypes
    if not q.is_floating_point() or (dtypes is not None and q.dtype not in dtypes):
        want = "a floating dtype" if dtypes is None else "one of " + ", ".join(str(d) for d in dtypes)
        _fail(where, f"q must be {want}; got {q.dtype}")
    for name, t in (("k", k), ("v", v)):
        if t.dtype != q.dtype:
            _fail(where, f"{name} must have q's dtype {q.dtype}; got {t.dtype}")
    # bank
    P = N = 0
    if (bank_k is None) != (bank_v is None):
        _fail(where, "bank_k and bank_v must be given together; got only "
                     + ("bank_k" if bank_v is None else "bank_v"))
    if bank_k is not None:
        if bank_k.dim() != 4 or bank_k.shape[1] != Hkv or bank_k.shape[3] != D:
            _fail(where, f"bank_k must be (N, Hkv={Hkv}, P, D={D}); got shape {_shape(bank_k)}")
        if bank_v.shape != bank_k.shape:
            _fail(where, f"bank_v must have bank_k's shape {_shape(bank_k)}; got {_shape(bank_v)}")
        if not bank_k.is_floating_point():
            _fail(where, f"bank_k must be floating point; got {bank_k.dtype}")
        if bank_v.dtype != bank_k.dtype:
            _fail(where, f"bank_v must have bank_k's dtype {bank_k.dtype}; got {bank_v.dtype}")
        N, P = bank_k.shape[0], bank_k.shape[2]
        if prefix_idx is None:
            _fail(where, f"prefix_idx is required with a bank (a (B={B},) int32/int64 tensor)")
        if prefix_idx.dim() != 1 or prefix_idx.shape[0] != B:
            _fail(where, f"prefix_idx must be (B={B},); got shape {_shape(prefix_idx)}")
        _index_dtype(where, "prefix_idx", prefix_idx)
    if key_padding_mask is not None:
        if key_padding_mask.shape != (B, Lk):
            _fail(where, f"key_padding_mask must be (B={B}, Lk={Lk}); got shape {_shape(key_padding_mask)}")
        if key_padding_mask.is_floating_point() or key_padding_mask.is_complex():
            _fail(where, f"key_padding_mask must be bool (True = real key) or integer 0/1; got {key_padding_mask.dtype}")
    if prefix_scale is not None:
        if prefix_scale.shape != (B, P):
            _fail(where, f"prefix_scale must be (B={B}, P={P}); got shape {_shape(prefix_scale)}")
        if not prefix_scale.is_floating_point():
            _fail(where, f"prefix_scale must be floating point; got {prefix_scale.dtype}")
    if prefix_lengths is not None:
        if prefix_lengths.dim() != 1 or prefix_lengths.shape[0] != N or prefix_lengths.dtype not in INDEX_DTYPES:
            _fail(where, f"prefix_lengths must be an (N={N},) integer tensor (int32 or int64); got shape "
                         f"{_shape(prefix_lengths)}, {prefix_lengths.dtype}")
    if prefix_bias is not None:
        if prefix_bias.shape != (N, P):
            _fail(where, f"prefix_bias must be (N={N}, P={P}) (one additive logit per bank token); got shape "
                         f"{_shape(prefix_bias)}")
        if not prefix_bias.is_floating_point():
            _fail(where, f"prefix_bias must be floating point; got {prefix_bias.dtype}")
    if softmax_scale is not None:
        if isinstance(softmax_scale, Tensor) or not isinstance(softmax_scale, (int, float)) \
                or isinstance(softmax_scale, bool) or not math.isfinite(softmax_scale):
            _fail(where, f"softmax_scale must be a finite Python number or None; got {softmax_scale!r}")
    if max_seqlen is not None:
        try:
            ok = not isinstance(max_seqlen, (bool, Tensor)) and operator.index(max_seqlen) >= 0
        except TypeError:
            ok = False
        if not ok:
            _fail(where, f"max_seqlen must be a non-negative int or None; got {max_seqlen!r}")
        max_seqlen = operator.index(max_seqlen)
    # devices (the CPU case, the hot one, compares a flag instead of building device objects)
    dev = q.device
    if device_type is not None and dev.type != device_type:
        _fail(where, f"q must be on a {device_type} device for this backend; got {dev}")
    on_cpu = dev.type == "cpu"
    for name, t in (("k", k), ("v", v), ("bank_k", bank_k), ("bank_v", bank_v), ("prefix_idx", prefix_idx),
                    ("key_padding_mask", key_padding_mask), ("prefix_scale", prefix_scale),
                    ("prefix_lengths", prefix_lengths), ("prefix_bias", prefix_bias), ("cu_seqlens", cu_seqlens)):
        if t is not None and (not t.is_cpu if on_cpu else t.device != dev):
            _fail(where, f"{name} must be on q's device {dev}; got {t.device}")
    if values and prefix_bias is not None and prefix_bias.numel() and not bool(torch.isfinite(prefix_bias).all()):
        _fail(where, "prefix_bias values must be finite (a masked bank token is one past prefix_lengths)")
    if values:
        check_values(prefix_idx if bank_k is not None else None, N, prefix_lengths, P,
                     cu_seqlens if varlen else None, Lq, max_seqlen, where)
    return Dims(B, Hq, Lq, D, Hkv, Lk, P, N)


def _small_cpu(t: Optional[Tensor]) -> bool:
    return t is None or (t.device.type == "cpu" and t.numel() <= 256)


def check_values(prefix_idx: Optional[Tensor], N: int, prefix_lengths: Optional[Tensor], P: int,
                 cu_seqlens: Optional[Tensor], T: int, max_seqlen: Optional[int] = None,
                 where: str = "prefix_attention") -> Optional[int]:
    """Range checks of the index tensors; returns the longest packed sequence (None without ``cu_seqlens``).

    One host transfer in all: small CPU tensors are read with ``tolist``; otherwise min/max (and the first, last
    and smallest step of ``cu_seqlens``) are stacked on the tensors' device and read at once."""
    ts = [t for t in (prefix_idx, prefix_lengths, cu_seqlens) if t is not None and t.numel()]
    if not ts:
        if cu_seqlens is not None:  # numel() >= 1 was checked: unreachable, kept for direct callers
            _fail(where, "cu_seqlens must have at least one element")
        return None
    if all(_small_cpu(t) for t in ts):
        stats = {}
        for name, t in (("idx", prefix_idx), ("plen", prefix_lengths)):
            if t is not None and t.numel():
                xs = t.tolist()
                stats[name] = (min(xs), max(xs))
        if cu_seqlens is not None:
            cu = cu_seqlens.tolist()
            steps = [b - a for a, b in zip(cu[:-1], cu[1:])]
            stats["cu"] = (cu[0], cu[-1], min(steps, default=0), max(steps, default=0))
    else:
        parts, keys = [], []
        for name, t in (("idx", prefix_idx), ("plen", prefix_lengths)):
            if t is not None and t.numel():
                mn, mx = torch.aminmax(t)
                parts += [mn.long(), mx.long()]
                keys.append(name)
        if cu_seqlens is not None:
            c = cu_seqlens.long()
            d = c[1:] - c[:-1] if c.numel() > 1 else c.new_zeros(1)
            dmn, dmx = torch.aminmax(d)
            parts += [c[0], c[-1], dmn, dmx]
            keys.append("cu")
        flat = torch.stack(parts).tolist()  # the one host transfer
        stats, i = {}, 0
        for name in keys:
            n = 4 if name == "cu" else 2
            stats[name] = tuple(flat[i:i + n])
            i += n
    if "idx" in stats:
        lo, hi = stats["idx"]
        if lo < 0 or hi >= N:
            _fail(where, f"prefix_idx values must be in [0, N={N}) (bank entries); got min {lo}, max {hi}")
    if "plen" in stats:
        lo, hi = stats["plen"]
        if lo < 0 or hi > P:
            _fail(where, f"prefix_lengths values must be in [0, P={P}] (bank tokens); got min {lo}, max {hi}")
    if "cu" not in stats:
        return None
    first, last, dmin, dmax = stats["cu"]
    if first != 0 or last != T or dmin < 0:
        _fail(where, f"cu_seqlens must start at 0, never decrease and end at T={T}; got first {first}, last "
                     f"{last}, smallest step {dmin}")
    if max_seqlen is not None and max_seqlen < dmax:
        _fail(where, f"max_seqlen={max_seqlen} is smaller than the longest sequence in cu_seqlens ({dmax})")
    return dmax
