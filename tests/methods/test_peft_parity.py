"""ltuning's prefix tuning equals PEFT's as users run it, end to end (issue 18): PEFT's own PrefixEncoder weights
(a saved adapter, and a running encoder with its projection) loaded into ltuning's ``prefix`` method give the same
hidden states and pooled features on SmolLM2 (GQA: 9 query / 3 KV heads, RoPE, padded batch), in float64.

Convention: PEFT's inputs start at position P (the prefix sits in the KV cache); ltuning's ``prefix`` starts them
at 0 unless ``position_offset="prefix"``, which ``ltuning.peft_compat`` sets. Both sides here run PEFT's
convention; a test shows that ltuning's default convention gives a different result (so the check can fail)."""
import copy
import zlib

import pytest
import torch

import ltuning
from ltuning.models import disable
from testutil import rel_err

peft = pytest.importorskip("peft")
from ltuning.peft_compat import from_peft, load_peft_prefix, prefix_config_from_peft  # noqa: E402

TEXTS = ["a gripping, beautifully acted film", "dull", "the plot never comes together , and the jokes fall flat"]
P = 5


@pytest.fixture(scope="module")
def smollm64(smollm):
    model, tok = smollm
    disable(model)
    return copy.deepcopy(model).double(), tok


def _seed(request) -> int:
    return zlib.crc32(request.node.nodeid.encode())


def _peft_model(base, seed, projection):
    """A PEFT prefix-tuning model whose encoder weights are seeded N(0, 0.5^2) (so nothing is at its init)."""
    cfg = peft.PrefixTuningConfig(task_type="FEATURE_EXTRACTION", num_virtual_tokens=P, prefix_projection=projection,
                                  encoder_hidden_size=24)
    pm = peft.get_peft_model(base, cfg)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in pm.prompt_encoder.default.parameters():
            p.copy_(0.5 * torch.randn(p.shape, generator=g, dtype=torch.float64).to(p.dtype))
    return pm


def _ours(model, enc):
    """Last hidden states (B, L, d) and pooled features (B, d) of an ``LTuningModel``."""
    seen = {}
    model.pack_inputs = False  # read off the base's own (B, L, d) output; packed = padded: tests/models/test_packing.py
    hook = model.base.register_forward_hook(lambda m, i, o: seen.__setitem__("h", o.last_hidden_state))
    try:
        with torch.no_grad():
            pooled = model.encode(enc["input_ids"], enc["attention_mask"])
    finally:
        hook.remove()
    return seen["h"], pooled


def _run(request, projection, live, offset):
    """(seed, error of the hidden states of the real tokens, error of the pooled last-token features), ours vs
    PEFT, for a PEFT encoder with or without ``projection``, loaded from its saved adapter or ``live``."""
    base, tok = request.getfixturevalue("smollm64")
    seed = _seed(request)
    enc = tok(TEXTS, padding=True, return_tensors="pt")
    assert tok.padding_side == "right" and not bool(enc["attention_mask"].all())  # a padded batch
    pm = _peft_model(base, seed, projection)
    try:
        src = pm
        if live:  # PEFT keeps its encoder in fp32 beside a float64 model: compute its MLP in float64 on both sides
            pm.prompt_encoder.to(torch.float64)
        if not live:  # what a user loads: the saved adapter, and PEFT's own forward of it as the reference
            src = str(request.getfixturevalue("tmp_path") / "peft_adapter")
            pm.save_pretrained(src)
            base = pm.get_base_model()
            pm = peft.PeftModel.from_pretrained(base, src)
        with torch.no_grad():
            ref = pm(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"]).last_hidden_state
    finally:
        base = pm.get_base_model()
    over = {} if offset is None else {"position_offset": offset}
    model = from_peft(base, tok, src, ["negative", "positive"], live=live, **over)
    if live:  # ltuning builds the method's parameters in fp32: the same float64 MLP as PEFT's above
        model.method.to(torch.float64)
    try:
        assert model.config.prefix_projection == (live and projection)
        h, pooled = _ours(model, enc)
    finally:
        ltuning.unpatch(model)
    real = enc["attention_mask"].bool()
    last = enc["attention_mask"].sum(1) - 1
    ref_pooled = ref[torch.arange(len(TEXTS)), last]
    return seed, rel_err(h[real], ref[real]), rel_err(pooled, ref_pooled)


@pytest.mark.parametrize("projection,live", [(False, False), (True, False), (True, True)],
                         ids=["saved-plain", "saved-projection", "live-projection"])
def test_prefix_equals_peft_end_to_end(request, projection, live):
    """A saved PEFT adapter (trained with or without the projection; reloaded by PEFT as the reference) and a running
    PEFT encoder with its projection, loaded into ltuning, give PEFT's hidden states and pooled features to fp32
    rounding (the model's RMSNorm rounds to fp32 even in float64)."""
    seed, err_h, err_pooled = _run(request, projection, live, None)
    print(f"seed {seed}: hidden {err_h:.2e}, pooled {err_pooled:.2e}")
    assert err_h < 1e-6 and err_pooled < 1e-6, f"seed {seed}: hidden {err_h:.2e}, pooled {err_pooled:.2e}"


def test_ltuning_default_positions_differ_from_peft(request):
    """ltuning's own default (input positions from 0) is a different model from PEFT's (from P): the parity above
    holds only under PEFT's convention, which from_peft sets."""
    seed, err_h, err_pooled = _run(request, True, False, "zero")
    assert err_h > 1e-3, f"seed {seed}: position_offset='zero' unexpectedly equals PEFT ({err_h:.2e})"


def test_peft_compat_rejects_mismatches(smollm, tmp_path):
    """Wrong adapter type, a live projection loaded into a plain prefix, or a prefix length that differs from the
    model's config: a clear error before anything is written."""
    base, tok = smollm
    disable(base)
    with pytest.raises(ValueError, match="only PREFIX_TUNING"):
        prefix_config_from_peft({"peft_type": "LORA"}, ["a", "b"])
    with pytest.raises(FileNotFoundError, match="adapter_config.json"):
        prefix_config_from_peft(str(tmp_path), ["a", "b"])
    pm = _peft_model(base, 0, True)
    try:
        model = ltuning.patch(pm.get_base_model(), prefix_config_from_peft(pm, ["a", "b"], live=False), tok)
        try:
            before = model.method.embedding.weight.clone()
            with pytest.raises(ValueError, match="do not match"):
                load_peft_prefix(model, pm)  # live projection weights into the plain (saved-adapter) layout
            assert torch.equal(before, model.method.embedding.weight)  # nothing half-written
            pm.save_pretrained(str(tmp_path))
            short = ltuning.make_config("prefix", label_names=["a", "b"], num_virtual_tokens=P + 1,
                                        prefix_projection=False, position_offset="prefix")
            ltuning.unpatch(model)
            model = ltuning.patch(pm.get_base_model(), short, tok)
            with pytest.raises(ValueError, match="shape"):
                load_peft_prefix(model, str(tmp_path))
        finally:
            ltuning.unpatch(model)
    finally:
        disable(pm.get_base_model())
