"""Negative control of the AddressSanitizer run: a kernel source built with ``LTUNING_SANITIZE=1`` gets a too-short
``prefix_idx`` (B = 3 sequences, one index) through its raw ``forward``. The source before the input checks
(commit 67d2203, ``csrc/prefix_attention.cpp``) reads past the index tensor and ASan stops the process with a
heap-buffer-overflow report; the checked source raises a ValueError naming ``prefix_idx``.

    git archive 67d2203 | tar -x -C /tmp/before
    LD_PRELOAD="$(gcc -print-file-name=libasan.so) $(gcc -print-file-name=libstdc++.so)" \\
      ASAN_OPTIONS=detect_leaks=0:log_path=/tmp/asan LTUNING_SANITIZE=1 \\
      python benchmarks/kernels/asan_negative_control.py --source /tmp/before/csrc/prefix_attention.cpp
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from ltuning.kernels.cpu.build import build, sanitize  # noqa: E402


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    here = Path(__file__).resolve().parents[2] / "ltuning" / "kernels" / "cpu" / "csrc" / "prefix_attention.cpp"
    ap.add_argument("--source", default=str(here))
    a = ap.parse_args()
    if not sanitize():
        sys.exit("set LTUNING_SANITIZE=1 (and preload libasan, see the docstring)")
    m = build(Path(a.source), "ltuning_asan_negative_control")
    print("built", m.__file__, flush=True)
    g = torch.Generator().manual_seed(0)
    q = torch.randn(3, 4, 5, 8, generator=g)
    k, v = torch.randn(3, 2, 6, 8, generator=g), torch.randn(3, 2, 6, 8, generator=g)
    bk, bv = torch.randn(2, 2, 3, 8, generator=g), torch.randn(2, 2, 3, 8, generator=g)
    idx = torch.tensor([1])  # 3 sequences, 1 index
    try:
        o, _ = m.forward(q, k, v, bk, bv, idx, None, None, None, False, 0.35, None)
    except ValueError as e:
        print("ValueError:", e)
        return
    print("returned a result (no sanitizer report?)", float(o.abs().max()))


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    main()
