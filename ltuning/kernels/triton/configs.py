"""Autotuning spaces of the shared-prefix attention kernels (sm80 / sm90; head_dim 32, 64, 128; fp16 / bf16).

Each kernel is tuned over ``(BLOCK_M, BLOCK_N, num_warps, num_stages)`` from a per-head-dim space; the space of
the smallest listed head dim >= ``D_PAD`` is used (the largest beyond 128). Configurations whose pipelined
shared-memory footprint exceeds the device limit are pruned before benchmarking. The autotune key is the
power-of-two length bucket, the padded head dim, the flags and the input dtypes. Under ``TRITON_INTERPRET=1`` one
small configuration (16 x 16 blocks) is used so the CPU tests stay fast and cross block boundaries on tiny shapes.

The forward and dQ kernels tile ``Lq * GROUP`` packed rows (see :mod:`ltuning.kernels.triton.fwd`); their spaces
end with small-M tiles (BLOCK_M 32 / 16, 4 warps) for short packed rows (one-pass label scoring: 12 positions x
3 heads = 36 rows). Register check without a GPU (``benchmarks/kernels/triton_spills.py``: ptxas of triton 3.9.0,
bf16, GROUP = 3, every mask flag on -- causal, key padding, prefix scale, prefix lengths -- the largest code):

* small-M candidates: kept only when spill-free on both sm80 and sm90a. Kept: fwd D32 (32, 64, 4, 4),
  (16, 128, 4, 3); fwd D64 (32, 64, 4, 4), (16, 64, 4, 4); dq D32 (16, 64, 4, 4), (16, 128, 4, 3); dq D64
  (32, 64, 4, 4), (16, 64, 4, 4), (16, 128, 4, 3). Dropped (spill bytes sm80 / sm90): fwd D32 (32, 128, 4, 3)
  88 / 16, (16, 64, 4, 4) 0 / 32; fwd D64 (32, 128, 4, 3) 136 / 368, (16, 128, 4, 3) 0 / 164; dq D32 (32, 64, 4, 4)
  0 / 160, (32, 128, 4, 3) 104 / 264; dq D64 (32, 128, 4, 3) 128 / 48; and every D128 candidate, fwd and dq
  (32 or 16) x (64 or 128): 8..2416 bytes, the least (16, 64, 4, 3) with 8 / 32 (fwd) and 48 / 0 (dq).
* the earlier configurations (kept unchanged): before packing, spill-free on both archs under these flags were
  fwd D32 (64, 64, 4, 4), (64, 32, 4, 4); fwd D64 (64, 64, 4, 4); fwd D128 (128, 32, 8, 4), (64, 32, 4, 4); dq D32
  (64, 64, 4, 4), (64, 32, 4, 4); dq D64 (128, 64, 8, 3), (64, 32, 4, 4); the rest spilled 20..4644 bytes. With
  packing the per-row position / head vectors raise the pressure (ptxas reports 255 registers for almost all):
  still spill-free are fwd D32 (64, 64, 4, 4), (64, 32, 4, 4); dq D32 (64, 64, 4, 4), (64, 32, 4, 4); dq D64
  (64, 32, 4, 4); newly spilling e.g. fwd D64 (64, 64, 4, 4) 328 / 104 bytes, fwd D128 (128, 32, 8, 4)
  792 / 448, (64, 32, 4, 4) 832 / 552, and fwd D128 (128, 128, 8, 2) on sm80 4644 -> 70992 (ptxas allotted 32
  registers). Also with GROUP = 1 (identity mapping) fwd D128 (128, 32, 8, 4) spills 256 bytes on sm80. They are
  kept (dropping them would leave the D64 forward and every D128 space empty) and left to the autotuner's
  benchmark; reducing this pressure is open. dK/dV (code unchanged) is spill-free at D128 only in
  (16, 32, 4, 3).
"""
from __future__ import annotations

import functools

import triton
from triton import knobs

# head dim -> (BLOCK_M, BLOCK_N, num_warps, num_stages). Forward and dQ keep a BLOCK_M query tile resident and
# stream K/V tiles ("kv"); dK/dV keep a BLOCK_N key tile resident and stream q/dO tiles ("q"). The forward and
# dQ spaces end with their spill-free small-M tiles for short packed rows (none at D128: see above).
SPACES = {
    "fwd": {32: [(128, 64, 4, 4), (64, 64, 4, 4), (64, 32, 4, 4), (32, 64, 4, 4), (16, 128, 4, 3)],
            64: [(128, 128, 8, 3), (128, 64, 8, 3), (128, 64, 4, 3), (64, 64, 4, 4), (64, 32, 4, 4),
                 (32, 64, 4, 4), (16, 64, 4, 4)],
            128: [(128, 128, 8, 2), (128, 64, 8, 3), (128, 32, 8, 4), (64, 64, 4, 3), (64, 32, 4, 4)]},
    "dq": {32: [(128, 64, 4, 3), (64, 64, 4, 4), (64, 32, 4, 4), (16, 64, 4, 4), (16, 128, 4, 3)],
           64: [(128, 64, 8, 3), (128, 32, 4, 3), (64, 64, 4, 3), (64, 32, 4, 4), (32, 64, 4, 4), (16, 64, 4, 4),
                (16, 128, 4, 3)],
           128: [(128, 64, 8, 2), (64, 64, 4, 3), (64, 32, 4, 4), (32, 64, 4, 3)]},
    "dkdv": {32: [(32, 128, 4, 3), (64, 64, 4, 4), (32, 64, 4, 4)],
             64: [(64, 128, 8, 2), (32, 128, 8, 3), (32, 64, 4, 4)],
             128: [(16, 128, 8, 2), (32, 128, 8, 2), (16, 64, 4, 3), (16, 32, 4, 3)]},
}
_STREAMED = {"fwd": "kv", "dq": "kv", "dkdv": "q"}
_INTERPRET = (16, 16, 1, 1)

LEN_KEY = ["LEN_BUCKET", "D_PAD", "HAS_PREFIX", "HAS_KPM", "HAS_SCALE", "CAUSAL", "IS_VARLEN", "HAS_PLEN"]


def interpreting() -> bool:
    """True when Triton runs kernels in its numpy interpreter (``TRITON_INTERPRET=1``)."""
    return bool(knobs.runtime.interpret)


def len_bucket(n: int) -> int:
    """Autotune key of a sequence length: the next power of two (so ragged batches reuse a tuning)."""
    return triton.next_power_of_2(max(int(n), 16))


@functools.lru_cache(maxsize=None)
def _smem_limit() -> int:
    drv = triton.runtime.driver.active
    return int(drv.utils.get_device_properties(drv.get_current_device())["max_shared_mem"])


def _space(kernel: str, d_pad: int):
    spaces = SPACES[kernel]
    return spaces[min([d for d in spaces if d >= d_pad], default=max(spaces))]


def _configs(kernel: str):
    tuples = [_INTERPRET] if interpreting() else sorted({c for s in SPACES[kernel].values() for c in s})
    return [triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=w, num_stages=s) for bm, bn, w, s in tuples]


def _pruner(kernel: str):
    """Keep the head dim's space, minus configs with ``stages * 2 * streamed * D * elt + resident * D * elt``
    bytes of shared memory above the device limit."""
    def prune(configs, named_args, **kwargs):
        args = {**named_args, **kwargs}
        d, elt = args["D_PAD"], 4 if args["DOT_PREC"] == "ieee" else 2
        wanted = _space(kernel, d)
        kept = []
        for c in configs:
            bm, bn = c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"]
            rows, resident = (bn, bm) if _STREAMED[kernel] == "kv" else (bm, bn)
            fits = c.num_stages * 2 * rows * d * elt + resident * d * elt <= _smem_limit()
            if (bm, bn, c.num_warps, c.num_stages) in wanted and fits:
                kept.append(c)
        return kept or [min(configs, key=lambda c: c.kwargs["BLOCK_M"] * c.kwargs["BLOCK_N"] * c.num_stages)]
    return prune


def autotune(kernel: str):
    """``triton.autotune`` decorator for ``kernel`` in ``SPACES``, keyed on the kernel's ``LEN_KEY`` arguments."""
    def wrap(fn):
        return triton.autotune(
            configs=_configs(kernel), key=[a for a in LEN_KEY if a in fn.arg_names],
            prune_configs_by=None if interpreting() else {"early_config_prune": _pruner(kernel)})(fn)
    return wrap
