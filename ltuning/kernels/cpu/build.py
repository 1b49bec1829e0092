"""Build-once, load-lazily helper shared by the C++ CPU kernels (:mod:`.prefix_attention`, :mod:`.fused_ops`).

Each kernel module holds one :class:`CppExtension` for its source in ``ltuning/kernels/cpu/csrc/`` (package data:
a wheel install carries the sources and builds them at first use like a checkout). The first call of
:meth:`CppExtension.is_available` compiles the source with ``torch.utils.cpp_extension.load`` into
``$LTUNING_BUILD_DIR`` or ``~/.cache/ltuning/<prefix>_<hash>/`` (the hash covers the source, its path, the flags and
the torch version, so an edit rebuilds and two checkouts never rebuild each other's folder) and loads it; on any
failure it warns once and returns False, and the kernel module falls back to its plain-PyTorch reference.
A compile (not a cached load) says so on stderr: one line before it starts, naming the folder, one when it ends.

Stale build locks: ``cpp_extension`` guards a build with a ``lock`` file in the build folder and waits, without a
time limit, while it exists. A build killed part-way (Ctrl-C during a first run) leaves the file behind and every
later process would hang. :func:`clear_stale_lock` removes such a lock, with a warning, when no build is running:
on Linux, when no process works in the build folder (``ninja`` and the compiler run there) and the lock is older
than ``grace`` seconds; elsewhere, when the lock is older than ``max_age`` seconds
(``$LTUNING_BUILD_LOCK_TIMEOUT``, default 600).

AddressSanitizer: ``LTUNING_SANITIZE=1`` builds with ``-fsanitize=address -fno-omit-frame-pointer -O1 -g`` into
separate ``<prefix>_asan_<hash>`` folders. The Python process must preload the runtime, e.g.
``LD_PRELOAD=$(gcc -print-file-name=libasan.so) ASAN_OPTIONS=detect_leaks=0 LTUNING_SANITIZE=1 python -m pytest ...``.
"""
from __future__ import annotations

import hashlib
import os
import shutil
import sys
import time
import warnings
from pathlib import Path
from typing import Optional

import torch
from torch import Tensor

CSRC = Path(__file__).resolve().parent / "csrc"
ASAN_FLAGS = ["-fsanitize=address", "-fno-omit-frame-pointer", "-g"]
_ISA_FLAGS = {
    "AVX512": ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mfma", "-mf16c"],
    "AVX2": ["-mavx2", "-mfma", "-mf16c"],
}


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """The accumulation dtype of the kernels: float64 for float64 inputs, else float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def none_if_empty(t: Tensor) -> Optional[Tensor]:
    """The kernels return an empty 1-D tensor for "no gradient"; map it back to None."""
    return None if t.numel() == 0 and t.dim() == 1 else t


def build_running(build_dir: Path) -> Optional[bool]:
    """Whether some process works in ``build_dir`` (ninja and the compiler run there); None when that cannot be
    told (no /proc, or another user's processes are hidden)."""
    proc = Path("/proc")
    if not (proc / "self" / "cwd").exists():
        return None
    target, unknown, me = os.path.realpath(build_dir), False, str(os.getpid())
    for entry in proc.iterdir():
        if not entry.name.isdigit() or entry.name == me:
            continue
        try:
            if os.readlink(entry / "cwd") == target:
                return True
        except PermissionError:  # another user's process might build in a shared folder; our own unreadable
            try:                 # ones (a sandbox's init) do not run ninja
                unknown = unknown or entry.stat().st_uid != os.getuid()
            except OSError:
                continue
        except OSError:  # process gone
            continue
    return None if unknown else False


def clear_stale_lock(build_dir: Path, grace: float = 60.0, max_age: Optional[float] = None,
                     poll: float = 1.0) -> bool:
    """Wait while another process builds in ``build_dir``; remove its ``lock`` if no build is running.

    Returns True when a stale lock was removed. A live build (a process working in the folder, or a lock younger
    than ``grace`` seconds) is waited for, up to ``max_age`` seconds of lock age, after which the lock is removed
    as well."""
    lock = build_dir / "lock"
    if max_age is None:
        max_age = float(os.environ.get("LTUNING_BUILD_LOCK_TIMEOUT", 600))
    told = False
    while True:
        try:
            age = time.time() - lock.stat().st_mtime
        except FileNotFoundError:
            return False
        running = build_running(build_dir)
        if age > max_age or (age > grace and running is False):
            why = "older than the time limit" if age > max_age else "no build process is running"
            warnings.warn(f"removing the stale build lock {lock} ({age:.0f} s old, {why}); "
                          "an earlier build was probably interrupted", RuntimeWarning, stacklevel=3)
            lock.unlink(missing_ok=True)
            return True
        if not told:
            print(f"ltuning: waiting for another process building in {build_dir} (lock {age:.0f} s old)",
                  file=sys.stderr)
            told = True
        time.sleep(poll)


def sanitize() -> bool:
    """``LTUNING_SANITIZE=1``: build the kernels with AddressSanitizer (into separate folders)."""
    return os.environ.get("LTUNING_SANITIZE", "0") not in ("", "0")


def build_spec(src: Path, prefix: str) -> tuple[str, Path, list[str]]:
    """The extension's module name, build folder and compiler flags for this CPU and torch."""
    cap = torch.backends.cpu.get_cpu_capability()
    asan = sanitize()
    cflags = ["-O1" if asan else "-O3", "-fopenmp", f"-DCPU_CAPABILITY={cap}"]
    if cap in _ISA_FLAGS:
        cflags += [f"-DCPU_CAPABILITY_{cap}"] + _ISA_FLAGS[cap]
    if asan:
        cflags += ASAN_FLAGS
        prefix = f"{prefix}_asan"
    # the source's path too: torch writes it into the folder's build.ninja, so two checkouts (or a checkout and a
    # wheel install) sharing one folder would make ninja rebuild on every switch between them
    key = " ".join(cflags + [torch.__version__, str(src.resolve())]).encode()
    tag = hashlib.sha1(src.read_bytes() + key).hexdigest()[:12]
    name = f"{prefix}_{tag}"
    root = Path(os.environ.get("LTUNING_BUILD_DIR") or Path.home() / ".cache" / "ltuning")
    return name, root / name, cflags


def built_library(name: str, build_dir: Path) -> Path:
    """The shared library ``torch.utils.cpp_extension.load`` writes (and loads) for ``name`` in ``build_dir``."""
    return build_dir / (name + (".pyd" if sys.platform == "win32" else ".so"))


def build(src: Path, prefix: str, what: str = "kernels"):
    """Compile (or reuse the cached build of) ``src`` and load it as a Python module.

    A compile prints one line on stderr before it starts and one when it is done; loading a cached build prints
    nothing."""
    from torch.utils.cpp_extension import load

    if not src.is_file():
        raise RuntimeError(f"kernel source {src} not found")
    if shutil.which(os.environ.get("CXX", "c++")) is None:
        raise RuntimeError("no C++ compiler found (set CXX or install g++)")
    name, build_dir, cflags = build_spec(src, prefix)
    build_dir.mkdir(parents=True, exist_ok=True)
    clear_stale_lock(build_dir)
    compiling = not built_library(name, build_dir).is_file()
    if compiling:
        print(f"ltuning: building the C++ CPU {what} (first use, ~30 s; cached in {build_dir})", file=sys.stderr,
              flush=True)
    t0 = time.perf_counter()
    ldflags = ["-fopenmp"] + (["-fsanitize=address"] if sanitize() else [])
    module = load(name=name, sources=[str(src)], extra_cflags=cflags, extra_ldflags=ldflags,
                  build_directory=str(build_dir), verbose=False)
    if compiling:
        print(f"ltuning: built the C++ CPU {what} in {time.perf_counter() - t0:.0f} s", file=sys.stderr, flush=True)
    return module


class CppExtension:
    """One ``ltuning/kernels/cpu/csrc/`` source, built and loaded at first use. ``what`` names it in the build
    messages and the fallback warning."""

    def __init__(self, source: str, prefix: str, what: str, fallback: str = "the reference implementation"):
        self.src, self.prefix, self.what, self.fallback = CSRC / source, prefix, what, fallback
        self.ok: Optional[bool] = None
        self.module = None

    def is_available(self) -> bool:
        """Build (once per process, cached on disk) and load; False with one warning on failure."""
        if self.ok is None:
            try:
                self.module = build(self.src, self.prefix, self.what)
                self.ok = True
            except Exception as e:  # compiler missing, build or load failure
                self.ok = False
                warnings.warn(f"ltuning C++ {self.what} unavailable ({type(e).__name__}: {e}); "
                              f"falling back to {self.fallback}", RuntimeWarning, stacklevel=3)
        return self.ok

    def get(self):
        """The loaded module; raises if the build failed."""
        if not self.is_available():
            raise RuntimeError(f"the ltuning C++ {self.what} failed to build")
        return self.module
