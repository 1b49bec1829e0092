"""README "Adding a method": one new module file in the methods package is all a method needs. The test writes a
toy method module into a temporary folder on the package's path, and without an edit anywhere else the method is
registered, its config field becomes a command-line flag, ``ltuning train`` trains it for a step and saves an
adapter that loads, and the benchmark script finds its learning rates."""
import importlib.util
import json
import os
import sys

import pytest
import torch
from safetensors.torch import load_file

import ltuning
import ltuning.methods
from ltuning.cli import main
from ltuning.methods import METHODS
from tiny_bert import make_tiny_bert, write_data

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

TOY = '''"""Toy shift: r learned vectors summed onto every input embedding, E'(x)_t = E(x)_t + sum_j v_j, v (r, d) = 0
at initialisation (a test of the method registry, not a method of any paper)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from .base import Method, MethodConfig, register_method


@dataclass
class ToyShiftConfig(MethodConfig):
    cli_help: ClassVar[dict] = {**MethodConfig.cli_help, "toy_rank": "toy-shift: number r of shift vectors"}
    toy_rank: int = 1


@register_method("toy-shift")
class ToyShift(Method):
    config_class = ToyShiftConfig
    kind = "none"
    default_lr = 5e-2
    lr_grid = (5e-2, 1e-1)

    def __init__(self, config, info, base, tokenizer, cache=None):
        super().__init__(config, info, base, tokenizer, cache)
        self.shift = nn.Parameter(torch.zeros(config.toy_rank, info.hidden_size))
        self.add_hook(base.get_input_embeddings().register_forward_hook(self._add))

    def _add(self, module, args, out):
        return out + self.shift.sum(0).to(out.dtype)
'''


@pytest.fixture
def toy_method(tmp_path, monkeypatch):
    folder = tmp_path / "more_methods"
    folder.mkdir()
    (folder / "toy_shift.py").write_text(TOY)
    monkeypatch.setattr(ltuning.methods, "__path__", [*ltuning.methods.__path__, str(folder)])
    try:
        assert "toy-shift" not in METHODS
        assert "toy_shift" in ltuning.methods.discover()
        yield METHODS["toy-shift"]
    finally:
        METHODS.pop("toy-shift", None)
        sys.modules.pop("ltuning.methods.toy_shift", None)


def test_a_method_module_is_all_it_takes(toy_method, tmp_path, capsys):
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    help_text = capsys.readouterr().out
    assert "toy-shift" in help_text and "--toy-rank" in help_text and "number r of shift vectors" in help_text

    model = make_tiny_bert(str(tmp_path / "model"))
    data = write_data(str(tmp_path / "data"), n_train=16, n_dev=8)
    out = tmp_path / "out"
    rc = main(["train", "--model", model, "--method", "toy-shift", "--toy-rank", "2", "--data", data,
               "--out", str(out), "--max-steps", "1", "--batch-size", "8", "--quiet"])
    assert rc == 0
    cfg = json.loads((out / "adapter_config.json").read_text())["method_config"]
    assert cfg["method"] == "toy-shift" and cfg["toy_rank"] == 2
    shift = load_file(str(out / "adapter.safetensors"))["method.shift"]
    assert shift.shape == (2, 32) and bool(shift.ne(0).any())  # trained (one step at its default_lr)

    m = ltuning.LTuningModel.from_pretrained(None, str(out))
    assert isinstance(m.method, toy_method) and torch.equal(m.method.shift.detach(), shift)
    ltuning.unpatch(m)

    spec = importlib.util.spec_from_file_location("accuracy_for_toy", os.path.join(ROOT, "benchmarks", "accuracy", "run.py"))
    acc = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(acc)
    assert acc.default_lr("toy-shift") == 5e-2 and acc.method_class("toy-shift").lr_grid == (5e-2, 1e-1)
