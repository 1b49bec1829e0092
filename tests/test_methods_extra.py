"""SK-Tuning, APT, FL-Tuning, LoRA and CGC-LoRA against plain references; save/load; CLI; multi-task."""
import contextlib
import copy
import json
import os
import random

import pytest
import torch
import torch.nn.functional as F

import ltuning
from ltuning.cli import main
from ltuning.methods.apt import plot_gates
from ltuning.model import LTuningModel
from ltuning.models import PrefixInputs
from testutil import checkpointing_grads, rel_err

LABELS = ["negative", "positive"]
NEW = ["sk-prefix", "sk-prompt", "apt", "fl", "lora", "cgc-lora"]


def enc(tok, texts=("great fun", "awful , just awful and long", "it exists")):
    return tok(list(texts), padding=True, return_tensors="pt")


@contextlib.contextmanager
def patched(base, tok, method, **options):
    """patch -> yield -> always unpatch (the session models are shared by every test)."""
    m = ltuning.patch(base, ltuning.make_config(method, label_names=options.pop("labels", LABELS), **options), tok)
    try:
        yield m
    finally:
        ltuning.unpatch(m)


def randomize(m, std=0.05):
    with torch.no_grad():
        for p in m.trainable_parameters():
            p.add_(torch.randn_like(p) * std)


# ---------------------------------------------------------------- SK-Tuning
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


# ---------------------------------------------------------------- APT
@pytest.mark.parametrize("which", ["minilm", "smollm"])
def test_apt_equals_explicitly_scaled_prefix_and_gate_formula(request, which, tmp_path):
    """APT's (B, P) kernel scales == a per-row materialised prefix lambda_i alpha_i P_i (reference attention);
    alpha_i == sigmoid(W_i h_{i-1} + b_i) recomputed in float64 from that run's hidden states (first token for
    the encoder, RMS-normalised mean of real tokens for the decoder)."""
    base, tok = request.getfixturevalue(which)
    with patched(base, tok, "apt", num_virtual_tokens=4, backend="reference") as m:
        md = m.method
        with torch.no_grad():
            md.gate_weight.normal_(0, 0.05)
            md.gate_bias.normal_(0, 1.0)
            md.lambdas.uniform_(0.5, 1.5)
        e = enc(tok)
        ids, mask = e["input_ids"], e["attention_mask"]
        with torch.no_grad():
            ours = m.encode(ids, mask)
            gates = md.last_gates()
            keys, values = md.prefix()
            n = len(keys)
            B = ids.shape[0]
            ek = [md.lambdas[i] * gates[i][:, None, :, None] * keys[i] for i in range(n)]  # (B, Hkv, P, D)
            ev = [md.lambdas[i] * gates[i][:, None, :, None] * values[i] for i in range(n)]
            out = base(input_ids=ids, attention_mask=mask, output_hidden_states=True,
                       ltuning_prefix=PrefixInputs(ek, ev, torch.arange(B), None, "reference"))
        assert len(gates) == n and gates[0].shape == (B, 4)
        assert rel_err(ours, m._pool(out.last_hidden_state, mask.bool(), mask.bool(), 0)) < 1e-5
        for i in range(n):
            h = out.hidden_states[i].double()
            if m.info.causal:
                w = mask[..., None].double()
                h = (h * w).sum(1) / w.sum(1)
                h = h / h.pow(2).mean(-1, keepdim=True).add(1e-6).sqrt()
            else:
                h = h[:, 0]
            alpha = torch.sigmoid(h @ md.gate_weight[i].double().T + md.gate_bias[i].double())
            assert rel_err(gates[i], alpha) < 1e-5, i
        png = tmp_path / "gates.png"
        plot_gates(torch.stack([md.lambdas[i] * g.mean(0) for i, g in enumerate(gates)]), str(png))
        assert png.read_bytes()[:4] == b"\x89PNG"


@pytest.mark.parametrize("method", ["apt", "fl", "cgc-lora"])
def test_gradient_checkpointing_same_gradients(minilm, method):
    base, tok = minilm
    opts = {"tasks": ["a", "b"]} if method == "cgc-lora" else {}
    with patched(base, tok, method, **opts) as m:
        randomize(m)
        e = enc(tok)
        kw = {"task_ids": torch.tensor([0, 1, 1])} if method == "cgc-lora" else {}
        grads = checkpointing_grads(base, m, lambda: m.loss(e["input_ids"], e["attention_mask"],
                                                            torch.tensor([1, 0, 0]), **kw)[0])
    assert grads[0].abs().sum() > 0 and rel_err(grads[1], grads[0]) < 1e-5


# ---------------------------------------------------------------- FL-Tuning
def test_fl_equals_ffn_with_concatenated_weights(minilm, smollm):
    """The hooked FFNs == reference FFNs whose weights are the frozen ones concatenated with the m extra units."""
    base, tok = minilm
    with patched(base, tok, "fl", num_units=8) as m:
        randomize(m, 0.1)
        md, layer = m.method, base.encoder.layer[1]
        x = torch.randn(2, 5, 384)
        with torch.no_grad():
            ours = layer.output(layer.intermediate(x), x)
        xd = x.double()
        w1 = torch.cat([layer.intermediate.dense.weight.double(), md.w_in[1].double().T])
        b1 = torch.cat([layer.intermediate.dense.bias.double(), md.b_in[1].double()])
        w2 = torch.cat([layer.output.dense.weight.double(), md.w_out[1].double().T], 1)
        h = F.gelu(xd @ w1.T + b1) @ w2.T + layer.output.dense.bias.double()
        ln = layer.output.LayerNorm
        ref = F.layer_norm(h + xd, (384,), ln.weight.double(), ln.bias.double(), ln.eps)
        assert rel_err(ours, ref) < 1e-5
    base, tok = smollm
    with patched(base, tok, "fl", num_units=8) as m:
        randomize(m, 0.1)
        md, mlp = m.method, base.layers[2].mlp
        x = torch.randn(2, 5, 576)
        with torch.no_grad():
            ours = mlp(x)
        xd = x.double()
        wg = torch.cat([mlp.gate_proj.weight.double(), md.w_in[2].double().T])
        wu = torch.cat([mlp.up_proj.weight.double(), md.w_up[2].double().T])
        wd = torch.cat([mlp.down_proj.weight.double(), md.w_out[2].double().T], 1)
        ref = (F.silu(xd @ wg.T) * (xd @ wu.T)) @ wd.T
        assert rel_err(ours, ref) < 1e-5


# ---------------------------------------------------------------- LoRA / CGC-LoRA
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


# ---------------------------------------------------------------- all methods
@pytest.mark.parametrize("method", NEW)
def test_save_load_round_trip_same_logits(real_model, method, tmp_path):
    base, tok = real_model
    opts = {"tasks": ["a", "b"]} if method == "cgc-lora" else {}
    kw = {"task_ids": torch.tensor([0, 1, 1])} if method == "cgc-lora" else {}
    e = enc(tok)
    with patched(base, tok, method, **opts) as m:
        randomize(m)
        with torch.no_grad():
            before = m(e["input_ids"], e["attention_mask"], **kw)
        m.save_pretrained(tmp_path)
        saved = m.adapter_state_dict()
    m2 = LTuningModel.from_pretrained(base, str(tmp_path), tok)
    try:
        restored = m2.adapter_state_dict()
        with torch.no_grad():
            after = m2(e["input_ids"], e["attention_mask"], **kw)
    finally:
        ltuning.unpatch(m2)
    assert saved.keys() == restored.keys() and all(torch.equal(saved[k], restored[k]) for k in saved)
    assert rel_err(after, before) < 1e-4


@pytest.fixture
def fresh_minilm(minilm, monkeypatch):
    """The CLI loads its own base: hand it a copy of the session MiniLM (no 2nd load, no hooks left behind)."""
    base, tok = minilm

    def load(name, dtype="fp32", quantize=None):
        assert quantize is None, "this fixture hands out the full-precision session MiniLM only"
        return copy.deepcopy(base), tok
    monkeypatch.setattr("ltuning.classifier.load_base", load)
    monkeypatch.setattr("ltuning.tasks.load_base", load)


@pytest.mark.parametrize("method,flags", [
    ("sk-prefix", ["--task-text", "Is this movie review positive or negative?"]),
    ("sk-prompt", ["--projection"]),
    ("lt-prompt", ["--no-scale-to-embeddings"]),
    ("lt-prefix", ["--no-mask-label-padding", "--variant", "kv"]),
    ("apt", ["--num-virtual-tokens", "4"]),
    ("fl", ["--num-units", "8"]),
    ("lora", ["--r", "4", "--lora-alpha", "8", "--stratify-validation"]),
    ("cgc-lora", ["--target-modules", "query,key,value"]),
])
def test_cli_train_every_method(fresh_minilm, sst2_dir, tmp_path, method, flags):
    out = tmp_path / method
    rc = main(["train", "--model", "minilm-l6", "--method", method, "--data", sst2_dir, "--out", str(out),
               "--max-train-examples", "24", "--max-dev-examples", "8", "--max-steps", "1", "--batch-size", "8",
               "--max-length", "32", "--quiet"] + flags)
    assert rc == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["method"] == method and metrics["dev_examples"] == 8 and metrics["trainable_parameters"] > 0
    assert metrics["accuracy"] * 8 == round(metrics["accuracy"] * 8)  # a share of the 8 dev examples
    cfg = json.loads((out / "adapter_config.json").read_text())["method_config"]
    if method == "cgc-lora":
        assert cfg["target_modules"] == ["query", "key", "value"]
    switches = {"sk-prompt": ("projection", True), "lt-prompt": ("scale_to_embeddings", False),
                "lt-prefix": ("mask_label_padding", False)}
    if method in switches:  # --name / --no-name reach the config
        name, value = switches[method]
        assert cfg[name] is value


def test_cli_linear_probe_trains_its_head_at_lr(fresh_minilm, sst2_dir, tmp_path):
    """linear-probe has no parameters but its head: --lr is the head's learning rate (not silently ignored)."""
    from safetensors.torch import load_file
    heads = []
    for lr in ("1e-5", "1e-1"):
        out = tmp_path / lr
        assert main(["train", "--model", "minilm-l6", "--method", "linear-probe", "--data", sst2_dir, "--out", str(out),
                     "--max-train-examples", "24", "--max-dev-examples", "8", "--max-steps", "2", "--batch-size", "8",
                     "--max-length", "32", "--quiet", "--lr", lr, "--patience", "100"]) == 0
        heads.append(load_file(str(out / "adapter.safetensors")))
    assert heads[0].keys() == heads[1].keys()
    assert any(not torch.equal(heads[0][k], heads[1][k]) for k in heads[0])


def test_cli_switch_of_another_method_is_a_clear_error(tmp_path, capsys):
    rc = main(["train", "--model", "minilm-l6", "--method", "prefix", "--data", str(tmp_path), "--out",
               str(tmp_path / "o"), "--no-scale-to-embeddings"])
    assert rc == 2 and "--scale-to-embeddings does not apply to --method prefix" in capsys.readouterr().err


def test_cli_multitask_cgc_lora(fresh_minilm, sst2_dir, tmp_path, capsys):
    """--data DIR1,DIR2: one model, a head per task (SST-2 and CoLA label sets), mixed-task batches."""
    cola = sst2_dir.replace("sst2", "cola")
    out = tmp_path / "mt"
    rc = main(["train", "--model", "minilm-l6", "--method", "cgc-lora", "--data", f"{sst2_dir},{cola}",
               "--out", str(out), "--max-train-examples", "40", "--max-dev-examples", "12", "--max-steps", "3",
               "--batch-size", "16", "--max-length", "32", "--stratify-validation", "--quiet"])
    assert rc == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["tasks"] == ["sst2", "cola"] and set(metrics["per_task"]) == {"sst2", "cola"}
    assert all(metrics["per_task"][t]["n"] == 12 for t in ("sst2", "cola"))
    cfg = json.loads((out / "adapter_config.json").read_text())["method_config"]
    assert cfg["tasks"] == ["sst2", "cola"] and "cola:acceptable" in cfg["label_names"]

    # the saved model evaluates per task (on training's dev sample: its metrics again) and classifies records
    from ltuning.data import load_split
    dirs = []
    for d in (sst2_dir, cola):
        task = os.path.basename(d)
        os.makedirs(tmp_path / "dev" / task)
        dev = random.Random(0).sample(load_split(d, "dev"), 12)  # the CLI's --max-dev-examples sample
        (tmp_path / "dev" / task / "dev.jsonl").write_text("\n".join(json.dumps(r) for r in dev))
        dirs.append(str(tmp_path / "dev" / task))
    capsys.readouterr()
    rc = main(["eval", "--adapter", str(out), "--data", ",".join(dirs), "--batch-size", "8"])
    assert rc == 0
    ev = json.loads(capsys.readouterr().out.splitlines()[-1])
    for t in ("sst2", "cola"):
        assert ev["per_task"][t]["accuracy"] == metrics["per_task"][t]["accuracy"]
        assert ev["per_task"][t]["n"] == 12
    assert abs(ev["accuracy"] - metrics["accuracy"]) < 1e-12
    ev = tmp_path / "classified.jsonl"
    rc = main(["eval", "--adapter", str(out), "--data", cola, "--split", "train", "--task", "sst2"])
    assert rc == 2  # CoLA's labels are not SST-2's: a one-line error, not a crash
    recs = [{"text": "a gripping film", "task": "sst2"}, {"text": "Him went home."}]
    (tmp_path / "in.jsonl").write_text("\n".join(json.dumps(r) for r in recs))
    rc = main(["classify", "--adapter", str(out), "--input", str(tmp_path / "in.jsonl"), "--output", str(ev),
               "--task", "cola"])
    assert rc == 0
    got = [json.loads(x) for x in ev.read_text().splitlines()]
    assert set(got[0]["scores"]) == {"negative", "positive"} and got[0]["prediction"] in got[0]["scores"]
    assert set(got[1]["scores"]) == {"acceptable", "unacceptable"} and got[1]["prediction"] in got[1]["scores"]
