"""A wheel install (not editable) carries the C++ kernel sources and builds them at first use.

Builds the wheel from a copy of the sources (``pip wheel --no-deps --no-build-isolation``: an isolated build env
could pull a CUDA torch), installs it with ``--no-deps`` into a fresh ``--system-site-packages`` venv (torch is
reused, never downloaded), and in that venv, from a directory outside the repository and with a fresh
``LTUNING_BUILD_DIR``, imports ltuning from the venv, builds the C++ kernel from the installed sources and runs one
``prefix_attention(..., backend="cpu")`` call against the float64 reference. Nothing is cached between runs; a
missing compiler fails the test (never a skip).
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
import zipfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]

CHECK = textwrap.dedent("""
    import json, os, sys, warnings
    warnings.simplefilter("error")  # a failed build warns and falls back: that must fail here
    import torch
    import ltuning
    from ltuning.kernels import prefix_attention, prefix_attention_reference
    from ltuning.kernels.cpu import prefix_attention as cpa
    built = cpa.is_available()
    g = torch.Generator().manual_seed(int(sys.argv[1]))
    q, k, v = torch.randn(2, 6, 7, 16, generator=g), torch.randn(2, 2, 9, 16, generator=g), torch.randn(2, 2, 9, 16, generator=g)
    bk, bv = torch.randn(3, 2, 4, 16, generator=g), torch.randn(3, 2, 4, 16, generator=g)
    idx = torch.tensor([2, 0])
    o = prefix_attention(q, k, v, bk, bv, idx, causal=True, backend="cpu")
    ro, _ = prefix_attention_reference(q.double(), k.double(), v.double(), bk.double(), bv.double(), idx, causal=True)
    err = ((o.double() - ro).norm() / ro.norm()).item()
    print(json.dumps(dict(file=ltuning.__file__, src=str(cpa._EXT.src), built=built, err=err,
                          module=getattr(cpa._EXT.module, "__file__", None))))
""")


def _run(cmd, **kw):
    r = subprocess.run(cmd, capture_output=True, text=True, **kw)
    assert r.returncode == 0, f"{' '.join(map(str, cmd))} failed ({r.returncode}):\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}"
    return r


def test_wheel_install_has_the_kernels(tmp_path):
    assert shutil.which(os.environ.get("CXX", "c++")), "no C++ compiler: the kernels cannot build (set CXX)"
    src = tmp_path / "src"  # build from a copy: an in-tree build would write build/ and *.egg-info into the repo
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(REPO / name, src / name)
    shutil.copytree(REPO / "ltuning", src / "ltuning", ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    dist = tmp_path / "dist"
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "LTUNING_BUILD_DIR", "LTUNING_SANITIZE")}
    _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--disable-pip-version-check",
          "-q", "-w", str(dist), str(src)], env=env, cwd=tmp_path)
    wheels = list(dist.glob("ltuning-*.whl"))
    assert len(wheels) == 1, wheels
    names = zipfile.ZipFile(wheels[0]).namelist()
    for cpp in ("prefix_attention.cpp", "fused_llama_ops.cpp"):
        assert f"ltuning/kernels/cpu/csrc/{cpp}" in names, f"{cpp} is not in the wheel: {names}"

    venv = tmp_path / "venv"
    _run([sys.executable, "-m", "venv", "--system-site-packages", "--without-pip", str(venv)], env=env)
    py = venv / "bin" / "python"
    # the outer pip (visible through the system site-packages) installs into the venv it runs in
    _run([str(py), "-m", "pip", "install", "--no-deps", "--no-index", "--disable-pip-version-check", "-q",
          str(wheels[0])], env=env, cwd=tmp_path)

    work = tmp_path / "elsewhere"  # outside the repository: nothing importable by accident
    work.mkdir()
    (work / "check.py").write_text(CHECK)
    build_dir = tmp_path / "kernel-build"
    r = _run([str(py), "check.py", "1234"], env={**env, "LTUNING_BUILD_DIR": str(build_dir)}, cwd=work,
             timeout=900)
    res = json.loads(r.stdout.strip().splitlines()[-1])
    site = Path(res["file"]).resolve()
    assert venv.resolve() in site.parents, f"ltuning was imported from {site}, not from the venv"
    assert venv.resolve() in Path(res["src"]).resolve().parents, res["src"]
    assert res["built"] is True
    assert build_dir.resolve() in Path(res["module"]).resolve().parents, res["module"]
    assert res["err"] < 1e-5, res
