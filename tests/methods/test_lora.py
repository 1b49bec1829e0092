"""LoRA / CGC-LoRA: mixed-task batches, merge and PEFT export."""
import json

import pytest
import torch

import ltuning
from method_helpers import LABELS, enc, patched, randomize
from testutil import rel_err


def test_cgc_lora_mixed_task_batch_equals_reference(minilm):
    """h = W0 x + (alpha/r) sum_j w^t_j B_j A_j x, w^t = softmax(G e_t) over [common ; task t's own] experts,
    a different task per row of one batch (float64 reference)."""
    base, tok = minilm
    with patched(base, tok, "cgc-lora", tasks=["a", "b", "c"], num_common_experts=2, num_task_experts=2) as m:
        randomize(m, 0.3)
        md = m.method
        j = 3
        lin = md._targets[j]
        task_ids = torch.tensor([0, 2, 1, 2])
        x = torch.randn(4, 6, lin.in_features)
        md.begin_forward(torch.zeros(4, 6, dtype=torch.long), torch.ones(4, 6, dtype=torch.bool), task_ids=task_ids)
        with torch.no_grad():
            ours = lin(x)
        A, Bm = md.experts[j].A.double(), md.experts[j].B.double()
        G, e = md.gates[j], md.task_embedding.weight.double()
        for b, t in enumerate(task_ids.tolist()):
            w = torch.softmax(G.weight.double() @ e[t] + G.bias.double(), -1)
            experts = [0, 1, 2 + 2 * t, 3 + 2 * t]
            ref = x[b].double() @ lin.weight.double().T + lin.bias.double()
            for wj, k in zip(w, experts):
                ref = ref + md.scaling * wj * (x[b].double() @ A[k].T @ Bm[k].T)
            assert rel_err(ours[b], ref) < 1e-6


def tiny_llama():
    """A small random Llama (2 layers, GQA 4/2 heads): the Llama-family module names, at no loading cost."""
    from transformers import LlamaConfig, LlamaModel
    torch.manual_seed(0)
    cfg = LlamaConfig(num_hidden_layers=2, hidden_size=64, intermediate_size=128, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=100)
    return LlamaModel(cfg).eval(), None


@pytest.mark.parametrize("family", ["minilm", "tiny-llama"])
def test_cgc_lora_merge_and_peft_export_match(request, family, tmp_path):
    """merge(task) (1 frozen base + a dense delta-W per task) == the unmerged experts; the exported PEFT LoRA
    adapter gives the same hidden states through peft.PeftModel."""
    peft = pytest.importorskip("peft")
    base, tok = request.getfixturevalue("minilm") if family == "minilm" else tiny_llama()
    if tok is None:
        ids, mask = torch.randint(0, 100, (3, 7)), torch.tensor([[1] * 7, [1] * 4 + [0] * 3, [1] * 2 + [0] * 5])
    else:
        e = enc(tok)
        ids, mask = e["input_ids"], e["attention_mask"]
    real = mask.bool()
    m = ltuning.patch(base, ltuning.make_config("cgc-lora", label_names=LABELS, tasks=["a", "b", "c"]), tok)
    try:
        randomize(m, 0.2)
        md = m.method
        w0 = [t.weight.clone() for t in md._targets]
        with torch.no_grad():
            tid = torch.full((3,), 2)
            unmerged = m(ids, mask, task_ids=tid)
            md.merge(2)
            merged = m(ids, mask, task_ids=tid)
            md.unmerge()
            assert rel_err(merged, unmerged) < 1e-4
            assert all(torch.equal(a, t.weight) for a, t in zip(w0, md._targets))
            md.export(str(tmp_path), task=1)
            md.begin_forward(ids, mask, task_ids=torch.full((3,), 1))
            ours = base(input_ids=ids, attention_mask=mask).last_hidden_state
    finally:
        ltuning.unpatch(m)
    cfg = json.loads((tmp_path / "adapter_config.json").read_text())
    assert cfg["r"] == 3 * 4  # (E_s + E_t) * r
    pm = peft.PeftModel.from_pretrained(base, str(tmp_path))
    try:
        with torch.no_grad():
            ref = pm(input_ids=ids, attention_mask=mask).last_hidden_state
    finally:
        pm.unload()
    with torch.no_grad():
        plain = base(input_ids=ids, attention_mask=mask).last_hidden_state
    assert rel_err(ours[real], ref[real]) < 1e-4
    assert rel_err(plain[real], ref[real]) > 1e-3  # the adapter does change the model

