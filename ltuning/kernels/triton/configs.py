"""Autotuning spaces of the shared-prefix attention kernels (sm80 / sm90; head_dim 32, 64, 128; fp16 / bf16).

Each kernel is tuned over ``(BLOCK_M, BLOCK_N, num_warps, num_stages)`` from a per-head-dim space; the space of
the smallest listed head dim >= ``D_PAD`` is used (the largest beyond 128). Configurations whose pipelined
shared-memory footprint exceeds the device limit are pruned before benchmarking. The autotune key is the
power-of-two length bucket, the padded head dim, the flags and the input dtypes. Under ``TRITON_INTERPRET=1`` one
small configuration (16 x 16 blocks) is used so the CPU tests stay fast and cross block boundaries on tiny shapes.

The forward and dQ kernels have two tilings (constexpr ``PACK_GQA``, part of the autotune key; see
:mod:`ltuning.kernels.triton.fwd`): one program per query head (``PACK_GQA = False``: long queries or no GQA) uses
``SPACES`` -- the spaces from before packing, unchanged; packed rows (``GROUP > 1`` and ``Lq <= 64``) use ``SPACES``
plus the small-M tiles of ``PACKED_EXTRA`` (BLOCK_M 32 / 16, 4 warps; one-pass label scoring: 12 positions x 3 heads
= 36 rows). Register check without a GPU (``benchmarks/kernels/triton_spills.py``: ptxas of triton 3.9.0, bf16,
GROUP = 3, every mask flag on -- causal, key padding, prefix scale, prefix lengths -- the largest code); spill
bytes (stores + loads) sm80 / sm90a, "before" = the kernels before packing (3a831fe~1)::

    kernel D    config           before    PACK_GQA=0  PACK_GQA=1
    fwd    32   (128, 64, 4, 4)  0/80      0/80        280/128
    fwd    32   (64, 64, 4, 4)   0/0       0/0         0/0
    fwd    32   (64, 32, 4, 4)   0/0       0/0         0/0
    fwd    32   (32, 64, 4, 4)   0/0       0/0         0/0        packed only
    fwd    32   (16, 128, 4, 3)  0/0       0/0         0/0        packed only
    fwd    64   (128, 128, 8, 3) 20/324    20/324      524/596
    fwd    64   (128, 64, 8, 3)  24/0      24/0        240/0
    fwd    64   (128, 64, 4, 3)  744/480   744/480     1764/1328
    fwd    64   (64, 64, 4, 4)   0/0       0/0         328/104
    fwd    64   (64, 32, 4, 4)   80/0      80/0        0/0
    fwd    64   (32, 64, 4, 4)   0/0       0/0         0/0        packed only
    fwd    64   (16, 64, 4, 4)   0/0       0/0         0/0        packed only
    fwd    128  (128, 128, 8, 2) 4644/1444 4644/1260   70992/3256 (sm80 packed: ptxas allotted 32 registers)
    fwd    128  (128, 64, 8, 3)  580/120   580/104     1620/1032
    fwd    128  (128, 32, 8, 4)  0/0       0/0         792/448
    fwd    128  (64, 64, 4, 3)   40/296    40/296      1024/1372
    fwd    128  (64, 32, 4, 4)   0/0       0/0         832/552
    dq     32   (128, 64, 4, 3)  92/208    92/208      376/464
    dq     32   (64, 64, 4, 4)   0/0       0/0         0/0
    dq     32   (64, 32, 4, 4)   0/0       0/0         0/0
    dq     32   (16, 64, 4, 4)   0/0       0/0         0/0        packed only
    dq     32   (16, 128, 4, 3)  24/0      24/0        0/60       dropped (was packed only)
    dq     64   (128, 64, 8, 3)  0/0       0/0         152/0
    dq     64   (128, 32, 4, 3)  352/188   352/188     944/972
    dq     64   (64, 64, 4, 3)   100/0     100/0       320/112
    dq     64   (64, 32, 4, 4)   0/0       0/0         0/0
    dq     64   (32, 64, 4, 4)   0/0       0/0         0/0        packed only
    dq     64   (16, 64, 4, 4)   0/0       0/0         0/0        packed only
    dq     64   (16, 128, 4, 3)  0/0       0/0         0/8        dropped (was packed only)
    dq     128  (128, 64, 8, 2)  1428/336  1428/336    1916/1416
    dq     128  (64, 64, 4, 3)   572/308   572/292     1236/1372
    dq     128  (64, 32, 4, 4)   628/64    628/64      812/604
    dq     128  (32, 64, 4, 3)   268/8     268/8       352/288

``PACK_GQA = 0`` has the spill status of the kernels before packing in every configuration (sm80 spill bytes and
registers identical; sm90a: the same spill-free set, three spilling configurations spill 16..184 bytes less, two
spill-free ones differ by a few registers), so no configuration spills in both modes where it did not before.
Packing raises the pressure (the per-row position / head vectors stay live through the key loops): newly spilling
packed are fwd D32 (128, 64, 4, 4) on sm80, fwd D64 (64, 64, 4, 4), fwd D128 (128, 32, 8, 4) and (64, 32, 4, 4),
dq D64 (128, 64, 8, 3) on sm80 and dq D64 (64, 64, 4, 3) on sm90a; all that spilled spill more, and only fwd D64
(64, 32, 4, 4) spills less packed (80 / 0 -> 0 / 0). That is why
long queries do not pack. The packed-only small-M tiles are kept only where spill-free packed on both archs (the
two dQ (16, 128, 4, 3) tiles, spill-free in 3a831fe, now spill 60 / 8 bytes on sm90a and were dropped); there is
none at D128 (every (32 or 16) x (64 or 128) candidate spilled 8..2416 bytes in 3a831fe), so packed D128 tunes
over spilling tiles, left to the autotuner's benchmark; reducing that pressure is open. GPU speed is unmeasured.
dK/dV (code unchanged) is spill-free at D128 only in (16, 32, 4, 3).
"""
from __future__ import annotations

import functools

import triton
from triton import knobs

# head dim -> (BLOCK_M, BLOCK_N, num_warps, num_stages). Forward and dQ keep a BLOCK_M query tile resident and
# stream K/V tiles ("kv"); dK/dV keep a BLOCK_N key tile resident and stream q/dO tiles ("q").
SPACES = {
    "fwd": {32: [(128, 64, 4, 4), (64, 64, 4, 4), (64, 32, 4, 4)],
            64: [(128, 128, 8, 3), (128, 64, 8, 3), (128, 64, 4, 3), (64, 64, 4, 4), (64, 32, 4, 4)],
            128: [(128, 128, 8, 2), (128, 64, 8, 3), (128, 32, 8, 4), (64, 64, 4, 3), (64, 32, 4, 4)]},
    "dq": {32: [(128, 64, 4, 3), (64, 64, 4, 4), (64, 32, 4, 4)],
           64: [(128, 64, 8, 3), (128, 32, 4, 3), (64, 64, 4, 3), (64, 32, 4, 4)],
           128: [(128, 64, 8, 2), (64, 64, 4, 3), (64, 32, 4, 4), (32, 64, 4, 3)]},
    "dkdv": {32: [(32, 128, 4, 3), (64, 64, 4, 4), (32, 64, 4, 4)],
             64: [(64, 128, 8, 2), (32, 128, 8, 3), (32, 64, 4, 4)],
             128: [(16, 128, 8, 2), (32, 128, 8, 2), (16, 64, 4, 3), (16, 32, 4, 3)]},
}
# added to the forward / dQ spaces when ``PACK_GQA`` (short packed rows): small-M tiles, spill-free packed on sm80
# and sm90a (none at D128: see above)
PACKED_EXTRA = {
    "fwd": {32: [(32, 64, 4, 4), (16, 128, 4, 3)], 64: [(32, 64, 4, 4), (16, 64, 4, 4)], 128: []},
    "dq": {32: [(16, 64, 4, 4)], 64: [(32, 64, 4, 4), (16, 64, 4, 4)], 128: []},
}
_STREAMED = {"fwd": "kv", "dq": "kv", "dkdv": "q"}
_INTERPRET = (16, 16, 1, 1)

LEN_KEY = ["LEN_BUCKET", "D_PAD", "HAS_PREFIX", "HAS_KPM", "HAS_SCALE", "CAUSAL", "IS_VARLEN", "HAS_PLEN",
           "PACK_GQA"]


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


def space(kernel: str, d_pad: int, pack: bool = False):
    """Configurations of ``kernel`` for padded head dim ``d_pad`` (with ``pack``: plus :data:`PACKED_EXTRA`)."""
    spaces = SPACES[kernel]
    d = min([d for d in spaces if d >= d_pad], default=max(spaces))
    return spaces[d] + (PACKED_EXTRA.get(kernel, {}).get(d, []) if pack else [])


def _configs(kernel: str):
    every = [c for s in SPACES[kernel].values() for c in s] + \
        [c for s in PACKED_EXTRA.get(kernel, {}).values() for c in s]
    tuples = [_INTERPRET] if interpreting() else sorted(set(every))
    return [triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=w, num_stages=s) for bm, bn, w, s in tuples]


def _pruner(kernel: str):
    """Keep the head dim's space, minus configs with ``stages * 2 * streamed * D * elt + resident * D * elt``
    bytes of shared memory above the device limit."""
    def prune(configs, named_args, **kwargs):
        args = {**named_args, **kwargs}
        d, elt = args["D_PAD"], 4 if args["DOT_PREC"] == "ieee" else 2
        wanted = space(kernel, d, bool(args.get("PACK_GQA", False)))
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
