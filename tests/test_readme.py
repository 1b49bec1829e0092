"""Every ```python block of README.md runs as written (in a temporary directory: the blocks write files)."""
from __future__ import annotations

import os
import re

import pytest

README = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "README.md")
BLOCKS = re.findall(r"^```python\n(.*?)^```", open(README, encoding="utf-8").read(), re.S | re.M)


def test_readme_has_python_blocks():
    assert BLOCKS


@pytest.mark.parametrize("index", range(len(BLOCKS)))
def test_readme_python_block_runs(index, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    namespace = {"__name__": f"readme_block_{index}"}
    exec(compile(BLOCKS[index], f"README.md python block {index + 1}", "exec"), namespace)
    if "clf" in namespace and "scores" in namespace:  # the "## Python" block: what it says it makes, it makes
        assert tuple(namespace["scores"].shape) == (2, 2)
        assert sorted(os.listdir(tmp_path / "out")) == ["adapter.safetensors", "adapter_config.json"]
        assert namespace["clf"].predict(["a gripping film"])[0] in ("negative", "positive")
        assert capsys.readouterr().out.strip().endswith("]")
