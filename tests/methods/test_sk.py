"""SK-Tuning (sk-prefix, sk-prompt) against plain references; the text cache."""
import json

import pytest
import torch

import ltuning
from ltuning.model import LTuningModel
from method_helpers import enc, patched, randomize
from testutil import rel_err


def test_sk_prefix_starts_as_the_frozen_model_on_text_then_input(smollm):
    """Decoder: the text's own K/V as prefix, positions after the text == the frozen model on [text ; input]."""
    base, tok = smollm
    with patched(base, tok, "sk-prefix") as m:
        e = enc(tok)
        with torch.no_grad():
            ours = m.encode(e["input_ids"], e["attention_mask"])
            text = tok(m.config.task_text, return_tensors="pt")["input_ids"]
            T = text.shape[1]
            ids = torch.cat([text.expand(3, T), e["input_ids"]], 1)
            mask = torch.cat([torch.ones(3, T, dtype=torch.long), e["attention_mask"]], 1)
            h = base(input_ids=ids, attention_mask=mask).last_hidden_state
        ref = h[torch.arange(3), T + e["attention_mask"].sum(1) - 1]
        assert m.method.text_keys.shape == (30, 3, T, 64)
        assert rel_err(ours, ref) < 1e-4
        # the per-layer transforms: K' = K (I + dWk) + bk, likewise V (float64 reference)
        randomize(m)
        keys, values = m.method.prefix()
        for i in (0, 29):
            md = m.method
            k = md.text_keys[i].double() @ (torch.eye(64) + md.key_delta[i].double()) + md.key_bias[i].double()
            v = md.text_values[i].double() @ (torch.eye(64) + md.value_delta[i].double()) + md.value_bias[i].double()
            assert rel_err(keys[i][0], k) < 1e-6 and rel_err(values[i][0], v) < 1e-6


def test_sk_prefix_text_cache_saved_and_recomputed_only_when_text_changes(minilm, tmp_path):
    base, tok = minilm
    calls = []
    hook = base.register_forward_pre_hook(lambda mod, args, kw: calls.append(1), with_kwargs=True)
    try:
        with patched(base, tok, "sk-prefix") as m:
            assert len(calls) == 1 and m.config.task_text.startswith("Classify the sentiment")
            m.save_pretrained(tmp_path)
        assert json.loads((tmp_path / "adapter_config.json").read_text())["method_config"]["task_text"]
        m2 = LTuningModel.from_pretrained(base, str(tmp_path), tok)
        ltuning.unpatch(m2)
        assert len(calls) == 1  # restored, not recomputed
        m3 = LTuningModel.from_pretrained(base, str(tmp_path), tok, task_text="Is this review positive?")
        ltuning.unpatch(m3)
        assert len(calls) == 2 and m3.method.text_keys.shape[2] != m2.method.text_keys.shape[2]
    finally:
        hook.remove()


@pytest.mark.parametrize("projection", [False, True])
def test_sk_prompt_starts_as_the_text_as_hard_prompt(minilm, projection):
    base, tok = minilm
    with patched(base, tok, "sk-prompt", task_text="Is the review positive?", projection=projection) as m:
        assert hasattr(m.method, "projection_delta") == projection
        e = enc(tok)
        text = tok("Is the review positive?", add_special_tokens=False, return_tensors="pt")["input_ids"]
        T = text.shape[1]
        with torch.no_grad():
            ours = m.encode(e["input_ids"], e["attention_mask"])
            emb = base.get_input_embeddings()
            x = torch.cat([emb(text).expand(3, T, -1), emb(e["input_ids"])], 1)
            mask = torch.cat([torch.ones(3, T, dtype=torch.long), e["attention_mask"]], 1)
            h = base(inputs_embeds=x, attention_mask=mask).last_hidden_state[:, T:]
        w = e["attention_mask"][..., None].float()
        assert rel_err(ours, (h * w).sum(1) / w.sum(1)) < 1e-5

