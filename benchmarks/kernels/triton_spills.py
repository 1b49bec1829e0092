"""Registers and spills of every Triton autotune configuration, without a GPU (ptxas only).

Lowers each kernel with each configuration of its space (:func:`ltuning.kernels.triton.configs.space`, including
the packed-only tiles of ``PACKED_EXTRA``, lowered in both modes), for head dims 32 / 64 / 128, to sm80 and sm90a
cubins (bf16, GROUP = 3, every mask flag on: the largest code) and prints ptxas' register count and spill bytes
(stores + loads), one line per (kernel, head dim, config, arch, and for the forward and dQ kernels
``PACK_GQA`` = 0 / 1)::

    TRITON_INTERPRET=0 python benchmarks/kernels/triton_spills.py [--spaces fwd dq] [--dims 64] [--archs 90] \
        [--pack 0 1] [--json benchmarks/results/triton_spills.json]

``--json`` also writes the rows with the command, date, commit and triton version. Exit status 1 when a
configuration spills. Needs triton's NVIDIA backend (ptxas), not a GPU.
"""
from __future__ import annotations

import argparse
import contextlib
import datetime
import io
import json
import os
import subprocess
import re
import sys

os.environ["TRITON_INTERPRET"] = "0"

import triton  # noqa: E402
from triton import knobs  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from ltuning.kernels.triton import bwd, configs, fwd  # noqa: E402

KERNELS = {"fwd": [fwd.fwd_kernel], "dq": [bwd.dq_kernel], "dkdv": [bwd.dkdv_seq_kernel, bwd.dkdv_prefix_kernel]}
FLAGS = dict(GROUP=3, HAS_PREFIX=True, HAS_KPM=True, HAS_SCALE=True, CAUSAL=True, IS_VARLEN=False, HAS_DLSE=True,
             HAS_PLEN=True, HAS_PBIAS=False, DOT_PREC="tf32")  # the recorded table: no prefix_bias
POINTERS = dict(IDX="*i64", PLEN="*i32", PBIAS="*fp32", KPM="*u8", SCALE="*fp32", CU="*i32", LSE="*fp32",
                DELTA="*fp32", DLSE="*fp32", PERM="*i32", SEG="*i32", DBK="*fp32", DBV="*fp32", DSC="*fp32")
INTS = ("P", "SPLIT", "LEN_BUCKET")


def signature(fn, consts):
    """Triton signature of ``fn``: constexprs, the pointer types above (bf16 tensors otherwise), i32 / fp32 scalars."""
    def kind(a):
        if a in consts:
            return "constexpr"
        if a in POINTERS:
            return POINTERS[a]
        if a.isupper() and a not in INTS:
            return "*bf16"
        return "fp32" if a.endswith("scale") else "i32"
    return {a: kind(a) for a in fn.arg_names}


def ptxas_usage(kernel, d, config, cap, pack=True):
    """``(registers, spill bytes)`` of ``kernel`` at head dim ``d`` and ``config = (BM, BN, warps, stages)``
    (``pack``: the ``PACK_GQA`` constexpr, for the kernels that have it)."""
    fn = kernel.fn if isinstance(kernel, triton.runtime.Autotuner) else kernel
    bm, bn, warps, stages = config
    flags = {**FLAGS, "PACK_GQA": pack, "HEAD_DIM": d, "D_PAD": d, "BLOCK_M": bm, "BLOCK_N": bn}
    consts = {a: v for a, v in flags.items() if a in fn.arg_names}
    log = io.StringIO()
    with contextlib.redirect_stdout(log):
        triton.compile(ASTSource(fn, signature(fn, consts), consts), target=GPUTarget("cuda", cap, 32),
                       options=dict(num_warps=warps, num_stages=stages))
    text = log.getvalue()
    regs = int(re.findall(r"Used (\d+) registers", text)[-1])
    spills = sum(int(n) for n in re.findall(r"(\d+) bytes spill (?:stores|loads)", text))
    return regs, spills


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--spaces", nargs="+", default=list(KERNELS), choices=list(KERNELS))
    ap.add_argument("--dims", nargs="+", type=int, default=[32, 64, 128])
    ap.add_argument("--archs", nargs="+", type=int, default=[80, 90])
    ap.add_argument("--pack", nargs="+", type=int, default=[0, 1], choices=[0, 1],
                    help="PACK_GQA values of the forward and dQ kernels")
    ap.add_argument("--json", help="write the rows and the run's metadata to this file")
    args = ap.parse_args(argv)
    rows = []
    knobs.nvidia.dump_ptxas_log = True
    knobs.compilation.always_compile = True
    spilled = 0
    for space in args.spaces:
        for d in args.dims:
            for config in configs.space(space, d, pack=True):  # with the packed-only small-M tiles
                for kernel in KERNELS[space]:
                    fn = kernel.fn if isinstance(kernel, triton.runtime.Autotuner) else kernel
                    for pack in (args.pack if "PACK_GQA" in fn.arg_names else [None]):
                        for cap in args.archs:
                            regs, spills = ptxas_usage(kernel, d, config, cap, bool(pack))
                            spilled += spills > 0
                            rows.append(dict(space=space, kernel=fn.__name__, head_dim=d, config=list(config),
                                             pack_gqa=pack, arch=f"sm{cap}", registers=regs, spill_bytes=spills))
                            tag = "" if pack is None else f" pack={pack}"
                            print(f"{space:5s} {fn.__name__:20s} D={d:3d} {str(config):18s}{tag} sm{cap}: "
                                  f"{regs:3d} regs, {spills} spill bytes", flush=True)
    if args.json:
        _write(args.json, rows)
    return 1 if spilled else 0


def _write(path, rows):
    """The rows plus command, date, commit and triton version, atomically."""
    commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                            cwd=os.path.dirname(os.path.abspath(__file__))).stdout.strip()
    record = dict(command="TRITON_INTERPRET=0 python benchmarks/kernels/triton_spills.py " + " ".join(sys.argv[1:]),
                  date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"), commit=commit,
                  triton=triton.__version__, flags=FLAGS, dtype="bf16",
                  spill_bytes="ptxas spill stores + spill loads", rows=rows)
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(record, f, indent=1)
    os.replace(tmp, path)


if __name__ == "__main__":
    sys.exit(main())
