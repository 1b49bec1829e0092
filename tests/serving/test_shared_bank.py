"""Several prefix-family adapters in one batch (``ltuning.serving.shared_bank``): every row of a mixed batch scored
as its own adapter's ``Classifier`` scores it, the base run once per mixed batch, LoRA falling back to its own
batches, outputs in input order, through the engine, the streamed ``classify`` and the server's batcher."""
from __future__ import annotations

import json

import pytest
import torch

import ltuning
from ltuning.cli import main
from ltuning.serving.batcher import Batcher
from ltuning.serving.engine import Engine
from serving_helpers import TEXTS, write_jsonl
from testutil import max_rel

# name -> (method, labels, label texts, options): three different tasks (2, 3 and 4 labels), label texts of unequal
# token counts (masked bank entries of unequal lengths), a gated prefix (APT), one-pass scoring (with per-label
# weights in its head), and LoRA
ADAPTERS = {
    "prefix": ("prefix", ["negative", "positive"], None, {"num_virtual_tokens": 5}),
    "lt": ("lt-prefix", ["bad", "good", "so so"],
           {"bad": "it is bad", "good": "good", "so so": "it is neither good nor bad"}, {"scoring": "kpass"}),
    "sk": ("sk-prefix", ["negative", "positive"], None, {}),
    "apt": ("apt", ["a", "b", "c", "d"], None, {"num_virtual_tokens": 3}),
    "onepass": ("lt-prefix", ["negative", "positive"], None, {"scoring": "onepass", "label_weights": True}),
    "lora": ("lora", ["negative", "positive"], None, {}),
}
DECODER_ADAPTERS = ("prefix", "lt", "apt", "prompt")


def randomized(model_name, method, labels, label_texts, opts, out, base, tok, seed, texts) -> torch.Tensor:
    """An adapter with seeded random trainables (zero-initialised maps moved off the identity), saved to ``out``;
    returns its ``Classifier`` scores of ``texts`` (the method is removed from ``base`` after)."""
    torch.manual_seed(seed)
    clf = ltuning.Classifier(model_name, method, base=base, tokenizer=tok, label_texts=label_texts, **opts)
    clf.build(labels)
    with torch.no_grad():
        for p in clf.model.trainable_parameters():
            p.add_(torch.randn_like(p) * 0.05)
    clf.model.eval()
    clf.save_pretrained(str(out))
    ref = clf.predict_scores(list(texts))
    ltuning.unpatch(clf.model)
    return ref


SEED = 1234  # of the module's adapters (built once for the module's tests)


@pytest.fixture(scope="module")
def adapters(tmp_path_factory, minilm):
    base, tok = minilm
    tmp = tmp_path_factory.mktemp("shared")
    refs = {n: randomized("minilm-l6", *spec, tmp / n, base, tok, SEED + i, TEXTS)
            for i, (n, spec) in enumerate(ADAPTERS.items())}
    return tmp, refs


def mixed_stream(names, n_texts, rng_seed=0):
    g = torch.Generator().manual_seed(rng_seed)
    return [(names[int(i)], int(j)) for i, j in zip(torch.randint(len(names), (40,), generator=g),
                                                    torch.randint(n_texts, (40,), generator=g))]


# fp32: a mixed batch has other lengths and sizes than the adapter's own, so the products sum in another order
# (worst seen 4.3e-6 on these inputs, 1.3e-5 on bench_mixed's 1161 rows); a row reading another adapter's entry
# or head is off by O(1).
FP32_TOL = 5e-5


def check_rows(engine, refs, stream, texts=TEXTS):
    ads = [engine.adapters[n] for n, _ in stream]
    ids = [engine.tokenize([{"text": texts[j]}], engine.adapters[n])[0] for n, j in stream]
    out = engine.score_mixed(ads, ids)
    assert len(out) == len(stream)
    for (n, j), s in zip(stream, out):
        assert s.shape == refs[n][j].shape
        assert max_rel(s, refs[n][j]) < FP32_TOL, (n, j)
    return out


def test_mixed_batches_score_every_row_as_its_own_adapter(adapters):
    tmp, refs = adapters
    e = Engine({n: str(tmp / n) for n in ADAPTERS}, dtype="fp32", max_batch_tokens=512, max_batch_rows=24)
    assert sorted(e.shared.members) == ["apt", "lt", "onepass", "prefix", "sk"]  # LoRA falls back
    assert e.describe()["shared_bank"] == sorted(e.shared.members)
    stream = mixed_stream(list(ADAPTERS), len(TEXTS))
    check_rows(e, refs, stream)
    # the switch: one batch per adapter, the same scores
    off = Engine({n: str(tmp / n) for n in ADAPTERS}, dtype="fp32", shared_bank=False)
    assert off.shared is None and off.describe()["shared_bank"] == []
    check_rows(off, refs, stream)


def test_a_mixed_batch_runs_the_base_once(adapters):
    tmp, refs = adapters
    names = ["prefix", "lt", "sk", "apt"]
    e = Engine({n: str(tmp / n) for n in names}, dtype="fp32", max_batch_tokens=100_000, max_batch_rows=1000)
    calls = []
    h = e.base.register_forward_pre_hook(lambda *a: calls.append(1))
    try:
        check_rows(e, refs, [(n, j) for j in (0, 0, 2) for n in names])  # equal lengths: no split pays off
    finally:
        h.remove()
    assert len(calls) == 1
    # the bank is the adapters' banks side by side: an entry per label of lt, one per other adapter
    assert e.shared.keys[0].shape[0] == 1 + 3 + 1 + 1
    assert [e.shared.members[n].offset for n in names] == [0, 1, 4, 5]


def test_classify_cli_mixed_stream_in_input_order(adapters, tmp_path):
    tmp, refs = adapters
    stream = mixed_stream(list(ADAPTERS), len(TEXTS), 1)
    inp, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    write_jsonl(inp, [{"id": k, "text": TEXTS[j], "adapter": n} for k, (n, j) in enumerate(stream)])
    args = ["classify", *[a for n in ADAPTERS for a in ("--adapter", f"{n}={tmp / n}")], "--input", str(inp),
            "--output", str(out), "--dtype", "fp32", "--chunk-size", "16", "--quiet"]
    assert main(args) == 0
    rows = [json.loads(x) for x in out.read_text().splitlines()]
    assert [r["id"] for r in rows] == list(range(len(stream)))
    for r, (n, j) in zip(rows, stream):
        assert r["adapter"] == n and list(r["scores"]) == ADAPTERS[n][1]
        assert max_rel(torch.tensor(list(r["scores"].values())), refs[n][j]) < FP32_TOL, (n, j)


def test_bf16_mixed_batches_stay_close_to_per_adapter_batches(adapters):
    """bf16 (the bank cast once at load): each row within bf16 rounding of the per-adapter bf16 scores."""
    tmp, refs = adapters
    names = ["prefix", "lt", "apt", "onepass"]
    stream = mixed_stream(names, len(TEXTS), 3)
    got = {}
    for shared in (True, False):
        e = Engine({n: str(tmp / n) for n in names}, dtype="bf16", shared_bank=shared)
        assert (e.shared is not None) == shared
        ads = [e.adapters[n] for n, _ in stream]
        got[shared] = e.score_mixed(ads, [e.tokenize([{"text": TEXTS[j]}], e.adapters[n])[0] for n, j in stream])
    for (n, j), a, b in zip(stream, got[True], got[False]):
        assert max_rel(a, b) < 3e-2, (n, j)
        assert max_rel(a, refs[n][j]) < 0.2, (n, j)  # and near the fp32 scores


class _StubEngine:
    def __init__(self, sharing):
        self.sharing, self.calls = sharing, []

    def shares(self, a):
        return a in self.sharing

    def score_ids(self, adapter, ids):
        self.calls.append(("own", adapter))
        return torch.tensor([[float(x[0])] for x in ids])

    def score_mixed(self, adapters, ids):
        self.calls.append(("mixed", set(adapters)))
        return [torch.tensor([float(x[0])]) for x in ids]


class _A:
    def __init__(self, name):
        self.name, self.rows_per_input = name, 1


def test_batcher_groups_jobs_of_sharing_adapters():
    a, b, c = _A("a"), _A("b"), _A("c")
    eng = _StubEngine({a, b})
    got = {}
    bt = Batcher(eng, max_batch_tokens=10_000, max_wait_ms=200)
    try:
        for k, ad in enumerate([a, c, b, a]):
            bt.submit(ad, [[10 * k + i] for i in range(3)], lambda s, e, k=k: got.__setitem__(k, s))
    finally:
        bt.stop(10)
    assert sorted(got) == [0, 1, 2, 3]
    for k in range(4):
        assert got[k].flatten().tolist() == [10.0 * k + i for i in range(3)]
    assert eng.calls == [("mixed", {a, b}), ("own", c)]  # a, b, a in one call; c after


@pytest.mark.slow
def test_mixed_batches_on_a_decoder(smollm, tmp_path):
    """SmolLM2: the label texts' own K/V (lt-prefix "kv", per-entry input positions), a gated prefix whose gate
    reads the mean of each row's tokens, and a prompt prefilled once as a prefix: padded mixed batches (the gate
    hooks read the batch's (R, L) shape, so APT's presence keeps the bank's batches padded). Then adapters that
    all run packed (ltuning.models.packing): the bank's mixed batches and LoRA's own batches (its hooks act per
    token) run their real tokens in one row. Every row scores as its own adapter's (padded) ``Classifier``."""
    base, tok = smollm
    specs = {"prefix": ADAPTERS["prefix"], "lt": ADAPTERS["lt"], "apt": ADAPTERS["apt"],
             "prompt": ("prompt", ["negative", "positive"], None, {"num_virtual_tokens": 4}),
             "onepass": ADAPTERS["onepass"], "lora": ADAPTERS["lora"]}
    texts = TEXTS[:4]
    refs = {n: randomized("smollm2-135m", *spec, tmp_path / n, base, tok, 7 + i, texts)
            for i, (n, spec) in enumerate(specs.items())}
    padded = ["prefix", "lt", "apt", "prompt"]
    e = Engine({n: str(tmp_path / n) for n in padded}, dtype="fp32")
    assert sorted(e.shared.members) == sorted(padded) and not e.shared.pack
    check_rows(e, refs, mixed_stream(padded, len(texts), 2), texts)
    del e
    packed = ["prefix", "onepass", "lora"]  # every packable method, in float64: tests/models/test_packing.py
    e = Engine({n: str(tmp_path / n) for n in packed}, dtype="fp32")
    assert e.describe()["packed"] == sorted(packed) and e.shared.pack
    assert sorted(e.shared.members) == ["onepass", "prefix"]
    check_rows(e, refs, mixed_stream(packed, len(texts), 3), texts)

