"""The shared build helper of the C++ kernels: a first build says what it does (a cached load says nothing); a lock
left by an interrupted build must not hang the next process."""
import os
import re
import subprocess
import sys
import textwrap
import threading
import time
import warnings
from pathlib import Path

import pytest

from ltuning.kernels.cpu import build as ce

needs_proc = pytest.mark.skipif(not Path("/proc/self/cwd").exists(), reason="needs /proc to see running builds")


def make_lock(d: Path, age: float) -> Path:
    d.mkdir(parents=True, exist_ok=True)
    lock = d / "lock"
    lock.touch()
    t = time.time() - age
    os.utime(lock, (t, t))
    return lock


def test_no_lock_returns_at_once(tmp_path):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert ce.clear_stale_lock(tmp_path, grace=0, max_age=5) is False


@needs_proc
def test_stale_lock_is_removed_with_a_warning(tmp_path):
    lock = make_lock(tmp_path, age=120)
    t0 = time.perf_counter()
    with pytest.warns(RuntimeWarning, match="no build process is running"):
        assert ce.clear_stale_lock(tmp_path, grace=60, max_age=125, poll=0.1) is True  # not the age limit
    assert not lock.exists() and time.perf_counter() - t0 < 5


@needs_proc
def test_live_build_is_waited_for(tmp_path):
    """A process working in the folder (as ninja does) keeps a young lock; a stale one goes after max_age."""
    lock = make_lock(tmp_path, age=0.5)
    born = lock.stat().st_mtime
    with subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"], cwd=tmp_path) as builder:
        try:
            time.sleep(0.2)
            assert ce.build_running(tmp_path) in (True, None)
            with pytest.warns(RuntimeWarning, match="older than the time limit"):
                assert ce.clear_stale_lock(tmp_path, grace=0, max_age=1.5, poll=0.05) is True
            # it waited for the age limit, counted from the lock's mtime (not from a clock read before the call: on a
            # busy machine the steps before it take a good part of the limit)
            assert time.time() - born >= 1.5 and not lock.exists()
        finally:
            builder.kill()


@needs_proc
def test_released_lock_ends_the_wait(tmp_path):
    lock = make_lock(tmp_path, age=0)
    threading.Timer(0.5, lock.unlink).start()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert ce.clear_stale_lock(tmp_path, grace=30, max_age=5, poll=0.05) is False


@needs_proc
def test_interrupted_build_does_not_hang_the_next_process(tmp_path):
    """The regression: the lock of a killed build sat in the build folder and the next process waited forever."""
    src = ce.CSRC / "prefix_attention.cpp"
    _, build_dir, _ = ce.build_spec(src, "ltuning_prefix_attention")
    make_lock(build_dir, age=300)
    code = textwrap.dedent("""
        from ltuning.kernels.cpu import prefix_attention as cpa
        assert cpa.is_available()
    """)
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=900)
    assert res.returncode == 0, res.stderr[-2000:]
    assert "removing the stale build lock" in res.stderr
    assert not (build_dir / "lock").exists()


BUILT = "from ltuning.kernels.cpu import prefix_attention as cpa; assert cpa.is_available()"


@pytest.mark.slow  # one real compile of the prefix-attention kernel (~30 s)
def test_first_build_says_so_and_a_cached_load_is_silent(tmp_path):
    env = {**os.environ, "LTUNING_BUILD_DIR": str(tmp_path)}

    def run():
        res = subprocess.run([sys.executable, "-c", BUILT], env=env, capture_output=True, text=True, timeout=900)
        assert res.returncode == 0, res.stderr[-2000:]
        return [line for line in res.stderr.splitlines() if line.startswith("ltuning:")]

    first = run()
    assert len(first) == 2, first
    start = re.fullmatch(r"ltuning: building the C\+\+ CPU prefix-attention kernel \(first use, ~30 s; cached in "
                         r"(.+)\)", first[0])
    assert start, first
    folder = Path(start.group(1))
    assert folder.parent == tmp_path and list(folder.glob("*.so")), sorted(tmp_path.rglob("*"))
    assert re.fullmatch(r"ltuning: built the C\+\+ CPU prefix-attention kernel in \d+ s", first[1]), first
    assert run() == []  # the cached build loads without a word
