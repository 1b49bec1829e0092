"""APT against an explicitly scaled prefix and the gate formula."""
import pytest
import torch

from ltuning.methods.apt import plot_gates
from ltuning.methods.injection import pool
from ltuning.models import PrefixInputs
from method_helpers import enc, patched
from testutil import rel_err


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
        assert rel_err(ours, pool(out.last_hidden_state, mask.bool(), mask.bool(), 0, m.pooling)) < 1e-5
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

