"""``benchmarks/serving/bench_classify.py``'s ceiling probe (the model's own per-token Linears, in the row's numeric
path) and ``report_serving.py``'s tables: on a tiny random BERT (2 layers, width 32, FFN 64; loads in
milliseconds), no real model."""
from __future__ import annotations

import importlib.util
import os
import statistics
import sys

import pytest
import torch
from tiny_bert import make_tiny_bert

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Per layer of the tiny BERT: q, k, v, attention output (32 x 32 each) + FFN in (32 x 64) + FFN out (64 x 32);
# the pooler (32 x 32) sees one row per input, not per token, so it is out.
TINY_P_LIN = 2 * (4 * 32 * 32 + 32 * 64 + 64 * 32)  # 16384
TINY_MODULES = 2 * 6


def _load(name):
    path = os.path.join(ROOT, "benchmarks", f"{name}.py")
    spec = importlib.util.spec_from_file_location(name.replace("/", "_"), path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def bench():
    saved = list(sys.path)
    try:
        yield _load("serving/bench_classify")
    finally:
        sys.path[:] = saved


@pytest.fixture(scope="module")
def report():
    return _load("serving/report_serving")


@pytest.fixture(scope="module")
def tiny_adapter(tmp_path_factory, bench):
    tmp = tmp_path_factory.mktemp("probe")
    model = make_tiny_bert(str(tmp / "bert"))
    return bench.make_adapter(model, "prefix", ["negative", "positive"], str(tmp / "prefix"))


TEXTS = ["good film", "the movie was awful", "a great film", "bad", "the film was fine and nice",
         "terrible movie", "poor", "nice film the movie was great"]


@pytest.mark.parametrize("variant", ["fp32", "int8", "bf16"])
def test_probe_counts_the_per_token_linears_of_the_engine(bench, tiny_adapter, variant):
    """P_lin and the module count of the tiny BERT, hand-computed: 12 per-token Linears, 16384 in x out; the
    pooler, run once per input, is out; int8's dynamic Linears are found the same way."""
    from ltuning.serving import cpu
    from ltuning.serving.engine import Engine
    if variant == "bf16" and not cpu.native_bf16():
        pytest.skip("bf16 is emulated on this CPU")
    e = Engine({"a": tiny_adapter}, dtype="bf16" if variant == "bf16" else "fp32",
               quantize="int8" if variant == "int8" else None, threads=1)
    a = e.adapters["a"]
    ids = e.tokenize([{"text": t} for t in TEXTS], a)
    e.score_ids(a, ids[:2])
    pr = bench.probe_engine(e, a, ids)
    assert pr["modules"] == TINY_MODULES and pr["p_lin"] == TINY_P_LIN
    names = [n for n, _, _ in pr["mods"]]
    assert not any("pooler" in n for n in names) and all(c == 1 for _, _, c in pr["mods"])
    kinds = {type(m).__module__ for _, m, _ in pr["mods"]}
    assert kinds == ({"torch.ao.nn.quantized.dynamic.modules.linear"} if variant == "int8"
                     else {"torch.nn.modules.linear"}), kinds
    # m = the median planned padded tokens per forward, from the engine's own planner
    planned = bench.planned_tokens(e, a, ids)
    assert sum(planned) >= sum(len(x) for x in ids) and pr["m"] == int(statistics.median(planned))
    if variant == "bf16":
        assert {m.weight.dtype for _, m, _ in pr["mods"]} == {torch.bfloat16}
    rates = bench.probe_samples(pr["mods"], pr["m"], e.dtype, samples=5, min_seconds=0.001)
    assert len(rates) == 5 and all(r > 0 for r in rates)


def test_a_module_called_twice_per_forward_counts_twice(bench):
    """calls per forward: a Linear run twice in each forward counts 2 * in * out; one run on fewer rows than the
    tokens (a pooler) is dropped."""
    class Base(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = torch.nn.Embedding(10, 4)
            self.twice = torch.nn.Linear(4, 4)
            self.once = torch.nn.Linear(4, 6)
            self.pool = torch.nn.Linear(6, 3)

        def get_input_embeddings(self):
            return self.emb

        def forward(self, input_ids):
            h = self.once(self.twice(self.twice(self.emb(input_ids))))
            return self.pool(h[:, 0])

    class Wrap(torch.nn.Module):
        def __init__(self, base):
            super().__init__()
            self.base = base

        def forward(self, input_ids, attention_mask):
            return self.base(input_ids)

    base = Base()
    model = Wrap(base)
    ids = torch.zeros(3, 5, dtype=torch.long)

    def run():
        model(input_ids=ids, attention_mask=ids)
        model(input_ids=ids[:2], attention_mask=ids[:2])
    mods = bench.per_token_linears(model, base, run)
    assert [(n, c) for n, _, c in mods] == [("twice", 2), ("once", 1)]
    assert bench.linear_params(mods) == 2 * 4 * 4 + 4 * 6


def test_one_pass_ceiling_formula(bench):
    """rate / (2 * P_lin * real tokens per example): 100 GFLOP/s, 16384 per-token weights, 10 tokens -> 305176 ex/s
    (2 * 16384 * 10 = 327680 flops per example)."""
    assert bench.one_pass_ceiling(100.0, TINY_P_LIN, 10.0) == pytest.approx(1e11 / 327680, rel=1e-12)
    assert bench.one_pass_ceiling(50.0, 1000, 20.0) == pytest.approx(50e9 / 40000, rel=1e-12)


def test_accuracy_adapters_parse_dir_and_dataset(bench, tmp_path):
    d = tmp_path / "ad@x"
    d.mkdir()
    assert bench.parse_accuracy_adapters(["A", "B@banking77", str(d)], "sst2") == [
        ("A", "sst2"), ("B", "banking77"), (str(d), "sst2")]
    with pytest.raises(ValueError, match="--accuracy-adapter 'C@nope'"):
        bench.parse_accuracy_adapters(["C@nope"])


def _row(system, dtype, eps, **kw):
    return {"model": "m", "dataset": "sst2", "system": system, "dtype": dtype, "examples": 8,
            "examples_per_s": eps, "peak_rss_mb": 100.0, **kw}


def test_report_compares_with_the_pipeline_only_in_the_same_dtype(report):
    probe = {"probe_gflops_before": 90.0, "probe_gflops_after": 110.0, "probe_gflops": 100.0, "probe_m": 512,
             "probe_modules": 12, "p_lin": 1000, "one_pass_ceiling_ex_s": 50.0, "utilisation": 0.8,
             "tokens_per_s": 400.0}
    rows = [_row("hf-pipeline-lora-merged", "fp32", 10.0), _row("hf-pipeline-lora-merged", "bf16", 20.0),
            _row("ltuning prefix", "fp32", 40.0, **probe), _row("ltuning prefix", "bf16", 30.0, **probe),
            _row("ltuning prefix", "int8", 50.0, **probe),
            _row("ltuning lora", "fp32", 9.0, matrix_gflops=70.0, one_pass_ceiling_ex_s=5.0, utilisation=1.8)]
    lines = report.classify_table({"rows": rows})
    cells = {(r[2], r[3]): r for r in ([c.strip() for c in ln.strip().strip("|").split("|")] for ln in lines[2:])}
    assert cells[("ltuning prefix", "fp32")][13] == "4.00"  # 40 / 10 (the fp32 pipeline)
    assert cells[("ltuning prefix", "bf16")][13] == "1.50"  # 30 / 20 (the bf16 pipeline), not 30 / 10
    assert cells[("ltuning prefix", "int8")][13] == ""      # no int8 pipeline: no ratio
    assert cells[("ltuning prefix", "fp32")][8:13] == ["90.0 / 110.0", "512", "12", "50.0", "80 %"]
    # a version-1 row: its single-GEMM rate marked, its ceiling and utilisation not shown
    assert cells[("ltuning lora", "fp32")][8:13] == ["GEMM 70.0", "", "", "", ""]
    assert len({ln.count("|") for ln in lines}) == 1


def test_report_accuracy_table_one_row_per_adapter(report):
    rows = [{"adapter": "/x/ad-a", "dataset": "sst2", "method": "lt-prefix", "scoring": "onepass", "dtype": d,
             "examples": 872, "accuracy": acc} for d, acc in (("fp32", 0.9), ("int8", 0.885), ("bf16", 0.9125))]
    rows += [{"adapter": "/x/ad-b", "dataset": "banking77", "method": "lora", "scoring": None, "dtype": d,
              "examples": 3080, "accuracy": acc} for d, acc in (("fp32", 0.8), ("int8", 0.81))]
    rows += [{"adapter": "/old/v1", "dtype": "fp32", "examples": 256, "accuracy": 0.5}]  # a version-1 row
    lines = report.accuracy_table(rows)
    assert lines[2] == "| `ad-a` | sst2 | lt-prefix | onepass | 872 | 90.0 % | 88.5 % | 91.2 % | -1.5 | +1.2 |"
    assert lines[3] == "| `ad-b` | banking77 | lora |  | 3080 | 80.0 % | 81.0 % |  | +1.0 |  |"
    assert lines[4] == "| `v1` | sst2 |  |  | 256 | 50.0 % |  |  |  |  |"
    assert len(lines) == 5


def test_adapter_scoring_reads_the_built_config(bench, tmp_path):
    """The kpass subset (``--kpass-n``) follows the scoring an adapter was BUILT with: a bare ``lt-prefix`` saved as
    onepass (the encoder default) is not a kpass row; label-free methods have no scoring."""
    import json
    cases = {"onepass": {"method": "lt-prefix", "scoring": "onepass"},
             "kpass": {"method": "lt-prompt", "scoring": "kpass"},
             "legacy": {"method": "lt-prefix"},  # saved before scorings existed: kpass
             "lora": {"method": "lora"}}
    got = {}
    for name, mc in cases.items():
        (tmp_path / name).mkdir()
        (tmp_path / name / "adapter_config.json").write_text(json.dumps({"method_config": mc}))
        got[name] = bench.adapter_scoring(str(tmp_path / name))
    assert got == {"onepass": "onepass", "kpass": "kpass", "legacy": "kpass", "lora": None}
