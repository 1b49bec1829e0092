"""Adapters saved by the layout before the issue-19 redesign (commit dd86472) still load and score the same.

``tests/fixtures/layout_v1`` was written once by that commit's CLI (``ltuning train`` on a tiny random BERT,
then ``ltuning classify --dtype fp32``); ``expected.json`` holds the scores it printed. This test loads the same
adapter directories with today's code and classifies the same inputs."""
from __future__ import annotations

import json
import os

import pytest

from ltuning.cli import main

HERE = os.path.join(os.path.dirname(__file__), "fixtures", "layout_v1")
EXPECTED = json.load(open(os.path.join(HERE, "expected.json")))["scores"]


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_old_adapter_scores_unchanged(name, tmp_path, capsys):
    out = tmp_path / "out.jsonl"
    task = ["--task", "sent"] if name == "cgc-lora" else []
    rc = main(["classify", "--adapter", os.path.join(HERE, "adapters", name), "--model", os.path.join(HERE, "tiny_bert"),
               "--input", os.path.join(HERE, "inputs.jsonl"), "--output", str(out), "--dtype", "fp32", *task])
    assert rc == 0, capsys.readouterr().err
    got = [json.loads(line)["scores"] for line in out.read_text().splitlines()]
    assert len(got) == len(EXPECTED[name])
    for g, e in zip(got, EXPECTED[name]):
        assert list(g) == list(e), (g, e)  # same labels, same order
        for k in e:
            assert g[k] == pytest.approx(e[k], rel=1e-5, abs=1e-6), (name, k, g[k], e[k])
