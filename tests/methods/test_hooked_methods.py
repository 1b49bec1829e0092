"""Methods that hook the frozen layers (apt, fl, cgc-lora): gradient checkpointing; FL-Tuning against the FFN with concatenated weights."""
import pytest
import torch
import torch.nn.functional as F

from method_helpers import enc, patched, randomize
from testutil import checkpointing_grads, rel_err


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

