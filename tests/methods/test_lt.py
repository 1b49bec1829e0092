"""L-Tuning (lt-prefix, lt-prompt): the label cache, K-way scoring, variants, saved options."""
import pytest
import torch

import ltuning
from ltuning.methods import label_cache
from ltuning.model import LTuningModel
from method_helpers import LT_LABELS as LABELS, LT_TEXTS as TEXTS, build, enc_lt as enc
from testutil import rel_err


@pytest.mark.parametrize("method", ["lt-prefix", "lt-prefix:kv", "lt-prompt"])
def test_label_texts_encoded_once_per_training_run(minilm, method):
    """A whole training run (build + fit + validation) runs the frozen model on the label texts exactly once."""
    model, tok = minilm
    from ltuning.data import default_label_text
    label_ids = tok([default_label_text(n) for n in LABELS], padding=True, return_tensors="pt")["input_ids"]
    calls = []
    hook = model.register_forward_pre_hook(lambda mod, args, kw: calls.append(kw.get("input_ids")), with_kwargs=True)
    try:
        before = label_cache.ENCODE_CALLS
        name, opts = build(method)
        clf = ltuning.Classifier("minilm-l6", name, base=model, tokenizer=tok, label_names=LABELS, **opts)
        recs = [{"text": t, "label": LABELS[i % 3]} for i, t in enumerate(["good", "bad", "meh", "fine", "ok"] * 12)]
        clf.fit(recs, progress=False, epochs=2, batch_size=8, lr=1e-3)
    finally:
        hook.remove()
    ltuning.unpatch(clf.model)
    assert label_cache.ENCODE_CALLS == before + 1
    label_calls = [x for x in calls if x is not None and torch.equal(x, label_ids)]
    assert len(label_calls) == 1
    assert len(calls) > 10  # the training and validation forwards did happen


def test_label_cache_is_one_forward_of_all_texts(minilm):
    model, tok = minilm
    calls = []
    hook = model.register_forward_pre_hook(lambda mod, args, kw: calls.append(kw["input_ids"].shape), with_kwargs=True)
    try:
        cfg = ltuning.make_config("lt-prefix", label_names=LABELS, label_texts=TEXTS)
        m = ltuning.patch(model, cfg, tok)
    finally:
        hook.remove()
    assert len(calls) == 1 and calls[0][0] == 3
    ltuning.unpatch(m)


@pytest.mark.parametrize("method", ["lt-prefix", "lt-prefix:kv", "lt-prompt"])
def test_kway_batch_equals_one_label_at_a_time(real_model, method):
    model, tok = real_model
    name, opts = build(method)
    cfg = ltuning.make_config(name, label_names=LABELS, label_texts=TEXTS, scoring="kpass", **opts)
    m = ltuning.patch(model, cfg, tok)
    with torch.no_grad():
        for p in m.method.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    e = enc(tok)
    with torch.no_grad():
        scores = m(e["input_ids"], e["attention_mask"])
        one = torch.stack([m.pair_scores(e["input_ids"], e["attention_mask"], torch.full((4,), k))
                           for k in range(3)], 1)
    ltuning.unpatch(m)
    assert scores.shape == (4, 3)
    assert rel_err(scores, one) < 1e-5
    assert torch.equal(scores.argmax(-1), one.argmax(-1))


def test_adapter_saved_before_an_option_existed_loads_with_its_old_behaviour(smollm, tmp_path):
    """An lt-prompt adapter from before ``scale_to_embeddings`` (its config has no such key) is restored unscaled,
    as it was trained, not with today's default; a config that names the option keeps its value."""
    import json
    model, tok = smollm
    m = ltuning.patch(model, ltuning.make_config("lt-prompt", label_names=LABELS, label_texts=TEXTS,
                                                 scale_to_embeddings=False), tok)
    with torch.no_grad():
        for p in m.trainable_parameters():
            p.add_(torch.randn_like(p) * 0.05)
        e = enc(tok)
        old = m(e["input_ids"], e["attention_mask"])
    m.save_pretrained(tmp_path)
    ltuning.unpatch(m)
    path = tmp_path / "adapter_config.json"
    meta = json.loads(path.read_text())
    del meta["method_config"]["scale_to_embeddings"]  # what a config written before the option looks like
    path.write_text(json.dumps(meta))
    m2 = LTuningModel.from_pretrained(model, str(tmp_path), tok)
    with torch.no_grad():
        legacy = m2(e["input_ids"], e["attention_mask"])
    ltuning.unpatch(m2)
    assert m2.config.scale_to_embeddings is False and rel_err(legacy, old) < 1e-4
    meta["method_config"]["scale_to_embeddings"] = True
    path.write_text(json.dumps(meta))
    m3 = LTuningModel.from_pretrained(model, str(tmp_path), tok)
    with torch.no_grad():
        scaled = m3(e["input_ids"], e["attention_mask"])
    ltuning.unpatch(m3)
    assert m3.config.scale_to_embeddings is True and rel_err(scaled, old) > 1e-2  # the option is not ignored
    assert ltuning.make_config("lt-prompt", label_names=LABELS).scale_to_embeddings is True  # new adapters
    from ltuning.methods import config_from_dict
    old_prefix = {"method": "lt-prefix", "label_names": LABELS}  # lt-prefix from before mask_label_padding
    assert config_from_dict(old_prefix, saved=True).mask_label_padding is False
    assert config_from_dict(old_prefix).mask_label_padding is True


@pytest.mark.parametrize("texts", [("The review is negative.", "The review is positive."),
                                   ("The review is negative.", "The review is not negative at all, it is positive.")])
def test_lt_prefix_kv_starts_as_the_frozen_model_on_label_text_then_input(smollm, texts):
    """variant="kv": at initialisation, scoring x against label k runs exactly what the frozen decoder computes
    on the concatenation [y_k ; x] (the label text's own K/V as prefix, input positions after it), also when
    the label texts have different token counts (the shorter one's padding is masked in the kernel and its
    input positions start right after it), for a padded batch whose rows use different labels."""
    model, tok = smollm
    m = ltuning.patch(model, ltuning.make_config("lt-prefix", label_names=LABELS[:2], label_texts=list(texts),
                                                 variant="kv", position_offset="prefix"), tok)
    try:
        lens = m.method.label_mask.sum(-1).tolist()
        assert (lens[0] == lens[1]) == (texts[0].count(" ") == texts[1].count(" "))
        xs = ["a gripping film", "dull"]
        x = tok(xs, padding=True, return_tensors="pt")
        with torch.no_grad():
            for entries in ([0, 0], [1, 1], [0, 1], [1, 0]):
                pooled = m.encode(x["input_ids"], x["attention_mask"], torch.tensor(entries))
                for r, k in enumerate(entries):
                    full = tok([texts[k]], return_tensors="pt")["input_ids"]
                    full = torch.cat([full, tok([xs[r]], return_tensors="pt")["input_ids"]], 1)
                    ref = model(input_ids=full, use_cache=False).last_hidden_state[0, -1]
                    assert rel_err(pooled[r], ref) < 1e-5, (entries, r)
            # and the prefix matters: the two labels give different representations
            a, b = (m.encode(x["input_ids"], x["attention_mask"], torch.tensor([k, k])) for k in range(2))
            assert rel_err(a, b) > 1e-3
            if lens[0] != lens[1]:  # without the mask the shorter label's padding K/V leak into attention
                m.config.mask_label_padding = False
                short = int(lens[1] < lens[0])
                leaky = m.encode(x["input_ids"], x["attention_mask"], torch.tensor([short, short]))
                m.config.mask_label_padding = True
                exact = m.encode(x["input_ids"], x["attention_mask"], torch.tensor([short, short]))
                assert rel_err(leaky, exact) > 1e-3
    finally:
        ltuning.unpatch(m)


@pytest.mark.parametrize("scaled", [True, False])
def test_lt_prompt_is_label_embeddings_plus_scaled_mlp(real_model, scaled):
    """lt-prompt's prompt for label k, against a plain reference: E(y_k) + s * MLP(h_k) with s the rms of the
    label texts' real-token embeddings (s = 1 with scale_to_embeddings=False); E(y_k) alone at initialisation."""
    model, tok = real_model
    m = ltuning.patch(model, ltuning.make_config("lt-prompt", label_names=LABELS, label_texts=TEXTS,
                                                 scale_to_embeddings=scaled), tok)
    try:
        meth = m.method
        with torch.no_grad():
            e0, mask = meth.prompts()
            assert torch.equal(e0, meth.label_embeds)  # zero-initialised last layer: the hard prompt y_k
            for p in meth.transform.parameters():
                p.add_(torch.randn_like(p) * 0.05)
            e, _ = meth.prompts()
            emb = model.get_input_embeddings().weight.double()
            ids = tok(TEXTS, padding=True, return_tensors="pt")
            real = [emb[ids["input_ids"][k][ids["attention_mask"][k].bool()]] for k in range(3)]
            s = torch.cat(real).pow(2).mean().sqrt() if scaled else 1.0
            h = meth.label_hidden.double()
            W1, b1, W2, b2 = (t.double() for t in (meth.transform[0].weight, meth.transform[0].bias,
                                                    meth.transform[2].weight, meth.transform[2].bias))
            ref = meth.label_embeds.double() + s * (torch.tanh(h @ W1.T + b1) @ W2.T + b2)
        assert torch.equal(mask, ids["attention_mask"].bool())
        assert rel_err(e[mask], ref[mask]) < 1e-5
        assert scaled == (float(s) < 0.5)  # both models' embeddings are far smaller than 1: the scale matters
    finally:
        ltuning.unpatch(m)


def test_lt_prefix_variant_default_by_family(real_model):
    """Options left None resolve by family when the method is built (and the adapter records them): decoders get
    the K-pass protocol on the label texts' own K/V with positions after them and the listwise objective; encoders
    one-pass scoring with the pooled bank and label weights (validation's choice), the pooling reading and the
    pairwise objective with kpass (validation's choice for kpass); an explicit pairwise objective is K-pass."""
    model, tok = real_model
    causal = None
    for opts, enc_want in (({}, ("onepass", "pooled", "zero", True, "listwise")),
                           ({"scoring": "kpass"}, ("kpass", "pooling", "zero", False, "pairwise")),
                           ({"objective": "pairwise"}, ("kpass", "pooling", "zero", False, "pairwise")),
                           ({"scoring": "kpass", "objective": "listwise"}, ("kpass", "pooling", "zero", False,
                                                                           "listwise")),
                           ({"scoring": "onepass", "variant": "pooling"}, ("onepass", "pooling", "zero", True,
                                                                          "listwise")),
                           ({"scoring": "shared-input"}, ("shared-input", "pooling", "zero", False, "listwise"))):
        m = ltuning.patch(model, ltuning.make_config("lt-prefix", label_names=LABELS[:2], **opts), tok)
        ltuning.unpatch(m)
        causal = m.info.causal
        c = m.config
        dec_want = (opts.get("scoring", "kpass"), opts.get("variant", "kv"),
                    "prefix" if opts.get("variant", "kv") == "kv" else "zero", False, opts.get("objective", "listwise"))
        got = (c.scoring, c.variant, c.position_offset, c.label_weights, c.objective)
        assert got == (dec_want if causal else enc_want), opts
    m = ltuning.patch(model, ltuning.make_config("lt-prompt", label_names=LABELS[:2]), tok)
    ltuning.unpatch(m)
    assert (m.config.scoring, m.config.label_weights, m.config.objective) == ("kpass", False, "listwise")


def test_adapter_saved_without_objective_loads_listwise():
    """An adapter config written before ``objective`` could be None lacks nothing (the field was always saved),
    but one written by hand without it must load as listwise, what every adapter before the family default
    trained with, not as today's family default."""
    from ltuning.methods.base import config_from_dict
    c = config_from_dict({"method": "lt-prefix", "label_names": ["a", "b"], "scoring": "kpass"}, saved=True)
    assert c.objective == "listwise"
    assert config_from_dict({"method": "lt-prefix", "label_names": ["a", "b"]}).objective is None


def test_changed_label_texts_recompute_cache(minilm, tmp_path):
    model, tok = minilm
    m = ltuning.patch(model, ltuning.make_config("lt-prefix", label_names=LABELS, label_texts=TEXTS), tok)
    m.save_pretrained(tmp_path)
    ltuning.unpatch(m)
    calls = label_cache.ENCODE_CALLS
    new = ["bad", "good", "so-so"]
    m2 = LTuningModel.from_pretrained(model, str(tmp_path), tok, label_texts=new)
    assert label_cache.ENCODE_CALLS == calls + 1
    ltuning.unpatch(m2)


def test_pairwise_objective_trains(minilm):
    model, tok = minilm
    m = ltuning.patch(model, ltuning.make_config("lt-prefix", label_names=LABELS, objective="pairwise"), tok)
    e = enc(tok)
    loss, scores = m.loss(e["input_ids"], e["attention_mask"], torch.tensor([0, 1, 2, 1]))
    loss.backward()
    assert scores is None and loss.item() > 0
    assert m.method.transform[0].weight.grad.abs().sum() > 0
    ltuning.unpatch(m)

