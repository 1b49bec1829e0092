"""Quantized frozen bases (bitsandbytes NF4 / LLM.int8 on the CPU): the quantized Linear against a float64
reference (forward and the input gradient every prefix/prompt gradient flows through), fingerprints, and
train + save + load + classify through the CLI on both real models, across precisions."""
from __future__ import annotations

import json
import warnings
import zlib

import pytest
import torch
from torch import nn

from testutil import max_rel

bnb = pytest.importorskip("bitsandbytes")

from ltuning.cli import main  # noqa: E402
from ltuning.data import load_split  # noqa: E402
from ltuning.models.quantize import (check_quantize, frozen_weight_bytes, keep_trainable_layout,  # noqa: E402
                                     quantization_of, quantize_linears, quantized_linear)


def _seed(request) -> int:
    s = zlib.crc32(request.node.nodeid.encode())
    print(f"seed {s} ({request.node.nodeid})")
    return s


def _dequantized(q) -> torch.Tensor:
    """The float64 weight a bitsandbytes module multiplies by (what its kernels dequantize to)."""
    if isinstance(q, bnb.nn.Linear4bit):
        return bnb.functional.dequantize_4bit(q.weight.data, q.weight.quant_state).double()
    scb = q.weight.SCB if q.weight.SCB is not None else q.state.SCB  # moved to the state by the first forward
    return q.weight.data.double() * scb.double()[:, None] / 127.0


@pytest.mark.parametrize("kind", ["nf4", "int8"])
@pytest.mark.parametrize("shape", [(3, 7, 64), (1, 5, 192)])
def test_quantized_linear_matches_float64_reference(kind, shape, request):
    g = torch.Generator().manual_seed(_seed(request))
    d_in, d_out = shape[-1], 96 + 32
    lin = nn.Linear(d_in, d_out)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(d_out, d_in, generator=g) * 0.05)
        lin.bias.copy_(torch.randn(d_out, generator=g) * 0.1)
    q = quantized_linear(lin, kind)
    q.train()  # as in training: LTuningModel.train() sets the base's train flag
    x = torch.randn(*shape, generator=g, requires_grad=True)
    y = q(x)
    assert y.dtype == torch.float32 and y.shape == (*shape[:-1], d_out)
    gout = torch.randn(y.shape, generator=g)
    y.backward(gout)
    w = _dequantized(q)
    # quantisation error of the weight itself is small (blockwise NF4 / row-wise int8)
    assert max_rel(w, lin.weight.detach()) < (0.15 if kind == "nf4" else 0.02)
    # the module computes x @ dequant(W)^T + b in 16 bits: compare with float64 on the dequantized weight
    x64 = x.detach().double()
    ref = x64 @ w.t() + lin.bias.detach().double()
    assert max_rel(y.detach(), ref) < 2e-2, f"forward {max_rel(y.detach(), ref)}"
    gref = gout.double() @ w
    assert max_rel(x.grad, gref) < 2e-2, f"input gradient {max_rel(x.grad, gref)}"


def test_nf4_input_gradient_survives_eval_mode_call(request):
    """bitsandbytes repacks a 4-bit weight for its CPU inference kernel (no autograd formula) after an eval-mode
    no-grad call; ltuning keeps the differentiable layout, so validation between steps cannot cut gradients."""
    g = torch.Generator().manual_seed(_seed(request))
    lin = nn.Linear(128, 64)
    wrapper = nn.Sequential(quantized_linear(lin, "nf4"))
    keep_trainable_layout(wrapper)
    wrapper.eval()
    with torch.no_grad():
        wrapper(torch.randn(4, 128, generator=g))  # the call that would repack the weight
    assert not getattr(wrapper[0].weight.quant_state, "packing_format_for_cpu", False)
    wrapper.train()
    x = torch.randn(4, 128, generator=g, requires_grad=True)
    gout = torch.randn(4, 64, generator=g)
    wrapper(x).backward(gout)
    gref = gout.double() @ _dequantized(wrapper[0])
    assert max_rel(x.grad, gref) < 2e-2


def test_check_quantize_and_module_conversion():
    assert check_quantize(None) is None and check_quantize("none") is None and check_quantize("nf4") == "nf4"
    with pytest.raises(ValueError, match="quantize must be one of"):
        check_quantize("int4")
    m = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Sequential(nn.Linear(64, 32)))
    full = frozen_weight_bytes(m)
    quantize_linears(m, "nf4")
    assert quantization_of(m) == "nf4" and isinstance(m[2][0], bnb.nn.Linear4bit)
    assert frozen_weight_bytes(m) < full / 3  # 4-bit weights + fp32 biases + block statistics


def _dev_slice(sst2_dir, tmp_path, n):
    data = tmp_path / "data"
    data.mkdir(exist_ok=True)
    dev = load_split(sst2_dir, "dev")[:n]
    (data / "dev.jsonl").write_text("".join(json.dumps(r) + "\n" for r in dev))
    return data, dev


@pytest.mark.parametrize("model,kind,method", [("minilm-l6", "int8", "lt-prefix"), ("minilm-l6", "nf4", "lora"),
                                               ("smollm2-135m", "nf4", "lt-prefix")])
def test_cli_quantized_train_save_load_classify(model, kind, method, sst2_dir, tmp_path, capsys, request):
    request.getfixturevalue("minilm" if model == "minilm-l6" else "smollm")  # skips without the model package
    out = tmp_path / "adapter"
    rc = main(["train", "--model", model, "--method", method, "--data", sst2_dir, "--out", str(out),
               "--quantize", kind, "--max-train-examples", "24", "--max-dev-examples", "8", "--max-steps", "2",
               "--batch-size", "4", "--max-length", "32", "--eval-every", "2", "--quiet"])
    assert rc == 0
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert cfg["classifier"]["quantize"] == kind and cfg["base_fingerprint"].endswith("-" + kind)
    state = __import__("safetensors.torch", fromlist=["load_file"]).load_file(str(out / "adapter.safetensors"))
    assert state and all(v.dtype == torch.float32 for v in state.values() if v.is_floating_point())  # fp32
    capsys.readouterr()
    data, dev = _dev_slice(sst2_dir, tmp_path, 6)
    assert main(["eval", "--adapter", str(out), "--data", str(data), "--batch-size", "8"]) == 0
    last = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert last["n"] == 6
    inp, outp = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    inp.write_text("".join(json.dumps({"text": r["text"], "id": i}) + "\n" for i, r in enumerate(dev[:3])))
    with warnings.catch_warnings(record=True) as w:  # the adapter of a quantized base on a full-precision one
        warnings.simplefilter("always")
        assert main(["classify", "--adapter", str(out), "--input", str(inp), "--output", str(outp),
                     "--quantize", "none"]) == 0
    assert any(f"trained on a {kind} base, loaded on a full-precision" in str(x.message) for x in w)
    rows = [json.loads(x) for x in outp.read_text().splitlines()]
    assert [r["id"] for r in rows] == [0, 1, 2] and all(r["prediction"] in ("negative", "positive") for r in rows)


def test_fingerprint_says_quantization(minilm):
    from ltuning.models import fingerprint, load_base
    base, _ = minilm
    q, _ = load_base("minilm-l6", quantize="int8")
    fp, fq = fingerprint(base), fingerprint(q)
    assert "-" not in fp and fq == fp + "-int8"
