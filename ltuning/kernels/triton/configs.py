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
= 36 rows).

Register check without a GPU: ``benchmarks/kernels/triton_spills.py`` lowers every forward / dQ configuration in
both tilings to sm80 and sm90a with ptxas (bf16, GROUP = 3, every mask flag on) and records registers and spill
bytes in ``benchmarks/results/triton_spills.json`` (summary: ``benchmarks/RESULTS_triton.md``). ``PACK_GQA = 0``
is the pre-packing code path and keeps its spill profile; packing raises the pressure (the per-row position / head
vectors stay live through the key loops), which is why long queries do not pack. The packed-only small-M tiles are
kept only where spill-free packed on both archs; there is none at D128, so packed D128 tunes over spilling tiles,
left to the autotuner's benchmark (reducing that pressure is open). GPU speed is unmeasured.
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
           "HAS_PBIAS", "PACK_GQA"]


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
