"""How a method enters the frozen model (ltuning.methods.injection): prompts as a shared prefix on decoders, concatenated on encoders; what is trainable."""
import pytest
import torch

import ltuning
from method_helpers import LT_LABELS as LABELS, LT_TEXTS as TEXTS, enc_lt as enc
from testutil import rel_err


def test_only_method_and_head_are_trainable(minilm, capsys):
    model, tok = minilm
    m = ltuning.patch(model, ltuning.make_config("prefix", label_names=LABELS, num_virtual_tokens=4), tok)
    names = [n for n, p in m.named_parameters() if p.requires_grad]
    assert names and all(n.startswith(("method.", "head.")) for n in names)
    m.print_trainable_parameters()
    assert "trainable params:" in capsys.readouterr().out
    ltuning.unpatch(m)


@pytest.mark.parametrize("method", ["prompt", "lt-prompt", "sk-prompt"])
def test_decoder_prompt_as_shared_prefix_equals_concatenation(smollm, method):
    """On a decoder the soft prompts run once per forward as a shared prefix (``prompt_as_prefix``): the scores,
    the loss and every gradient equal those of the concatenation [p_e ; x] (label texts of unequal token counts,
    padded inputs)."""
    model, tok = smollm
    extra = {"task_text": "Classify the sentiment of the review."} if method == "sk-prompt" else {}
    cfg = ltuning.make_config(method, label_names=LABELS, label_texts=TEXTS, **extra)
    m = ltuning.patch(model, cfg, tok)
    assert m.prompt_as_prefix
    with torch.no_grad():
        for p in m.trainable_parameters():
            p.add_(torch.randn_like(p) * 0.05)
    e = enc(tok)
    y = torch.tensor([0, 1, 2, 1])
    res = []
    for flag in (True, False):
        m.prompt_as_prefix = flag
        m.zero_grad(set_to_none=True)
        loss, scores = m.loss(e["input_ids"], e["attention_mask"], y)
        loss.backward()
        res.append((loss.detach(), scores.detach(), {n: p.grad.clone() for n, p in m.named_parameters()
                                                      if p.requires_grad}))
    ltuning.unpatch(m)
    (l1, s1, g1), (l0, s0, g0) = res
    assert rel_err(s1, s0) < 1e-5 and rel_err(l1, l0) < 1e-5
    for n in g0:
        if g0[n].norm() > 1e-6 * (1 + l0.abs()):  # a listwise head bias has a zero gradient
            assert rel_err(g1[n], g0[n]) < 1e-4, n


def test_encoder_prompts_are_concatenated(minilm):
    """Bidirectional models let the prompt see the input: no shared-prefix shortcut."""
    model, tok = minilm
    m = ltuning.patch(model, ltuning.make_config("prompt", label_names=LABELS), tok)
    assert not m.prompt_as_prefix
    ltuning.unpatch(m)

