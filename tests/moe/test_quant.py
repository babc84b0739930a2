"""int8 and fp8 weights (moe/quant.py): the dequantizing path equals the full-precision model holding the
dequantized weights bit for bit, the int8 kernel and the fp8 scaled matmul agree with that reference,
quantization error stays within the format's bound, what stays in full precision, the quantized export
round trip, and the vLLM fp8 layout read back to the same weights."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from moe.checkpoint import export_model, load_model
from moe.config import ModelConfig, MoEConfig
from moe.model import build_model
from moe.quant import (
    FP8,
    QuantConfig,
    QuantExperts,
    QuantLinear,
    dequantize_model,
    dequantize_tensor,
    export_vllm_fp8,
    quantize_model,
    quantize_tensor,
    weight_bytes,
)


def model_for(score_func: str = "softmax"):
    cfg = ModelConfig(name="q", vocab_size=97, d_model=64, n_layers=3, n_heads=4, n_kv_heads=2, max_seq_len=64,
                      dense_hidden=96, n_dense_layers=1,
                      moe=MoEConfig(n_routed_experts=8, n_shared_experts=1, top_k=2, expert_hidden=48,
                                    score_func=score_func))
    return build_model(cfg, seed=0).eval()


TOKENS = torch.randint(0, 97, (3, 24), generator=torch.Generator().manual_seed(0))
CONFIGS = [QuantConfig("int8"), QuantConfig("fp8"), QuantConfig("fp8", fp8_block=32)]


@pytest.mark.parametrize("qc", CONFIGS, ids=["int8", "fp8", "fp8-block"])
@torch.no_grad()
def test_dequantized_path_equals_the_dequantized_full_precision_model_exactly(qc):
    full = model_for()
    q = quantize_model(copy.deepcopy(full), QuantConfig(qc.method, qc.fp8_block, kernel="dequant"))
    d = dequantize_model(copy.deepcopy(q))
    assert not any(isinstance(m, (QuantLinear, QuantExperts)) for m in d.modules())
    assert torch.equal(q(TOKENS), d(TOKENS))
    ref, got = full(TOKENS), q(TOKENS)
    assert (got.argmax(-1) == ref.argmax(-1)).float().mean() > 0.95  # and close to full precision


@torch.no_grad()
def test_int8_kernel_and_fp8_scaled_matmul_agree_with_the_dequantized_reference():
    full = model_for()
    for method, kernel in (("int8", "int8_mm"), ("fp8", "scaled_mm")):
        ref = quantize_model(copy.deepcopy(full), QuantConfig(method, kernel="dequant"))(TOKENS)
        q = quantize_model(copy.deepcopy(full), QuantConfig(method, kernel=kernel))
        assert {m.kernel for m in q.modules() if isinstance(m, (QuantLinear, QuantExperts))} == {kernel}
        got = q(TOKENS)
        err = ((got - ref).norm() / ref.norm()).item()
        # int8: weight-only, the same products up to summation order; fp8: activations quantized too
        assert err < (1e-5 if method == "int8" else 0.05), (method, err)
        assert (got.argmax(-1) == ref.argmax(-1)).float().mean() > 0.9


def test_quantization_error_is_within_the_formats_bound_and_values_are_clamped():
    w = torch.randn(3, 40, 72) * torch.logspace(-3, 1, 72)  # (experts, out, in), wide range per channel
    q, s = quantize_tensor(w, "int8")
    assert q.dtype == torch.int8 and s.shape == (3, 40) and q.abs().max() <= 127
    assert ((dequantize_tensor(q, s) - w).abs() <= s[..., None] / 2 + 1e-7).all()
    for block, scale_shape in ((0, (3,)), (32, (3, 2, 3))):
        q, s = quantize_tensor(w, "fp8", block)
        assert q.dtype == FP8 and s.shape == scale_shape
        deq = dequantize_tensor(q, s, block)
        s_full = s[..., None, None] if not block else s.repeat_interleave(32, -2).repeat_interleave(32, -1)[:, :40, :72]
        assert ((deq - w).abs() <= w.abs() / 16 + s_full * 2 ** -9 + 1e-12).all()  # e4m3: 3 mantissa bits
        assert deq.abs().max() <= w.abs().max() * (1 + 1e-6)  # clamped to +-448 * scale, no overflow to nan
        assert not torch.isnan(q.float()).any()


def test_what_stays_in_full_precision_and_the_export_round_trip(tmp_path):
    full = model_for()
    q = quantize_model(copy.deepcopy(full), QuantConfig("int8"))
    kept = {n for n, p in q.named_parameters()}
    assert kept == {"tok_emb.weight", "norm.weight", "head.weight"} | {
        f"layers.{i}.{n}.weight" for i in range(3) for n in ("attn_norm", "ffn_norm")} | {
        f"layers.{i}.ffn.router.gate.weight" for i in (1, 2)}
    assert sum(isinstance(m, QuantLinear) for m in q.modules()) == 3 * 4 + 3 + 2 * 3
    assert weight_bytes(q) < 0.5 * weight_bytes(full)
    export_model(q, tmp_path / "int8")
    assert json.loads((tmp_path / "int8" / "config.json").read_text())["quantization"] == {
        "method": "int8", "fp8_block": 0}
    back = load_model(tmp_path / "int8")
    assert back.quantization == q.quantization and weight_bytes(back) == weight_bytes(q)
    with torch.no_grad():
        assert torch.equal(back(TOKENS), q(TOKENS))
    bf16 = load_model(tmp_path / "int8", dtype=torch.bfloat16)  # activations bf16, weights stay int8 + fp32 scales
    assert bf16.layers["1"].ffn.experts.qw1.dtype == torch.int8 and bf16.layers["1"].ffn.experts.s1.dtype == torch.float32
    # auto: the CPU int8 kernel for 16-bit activations, dequantizing for fp32 ones
    assert bf16.layers["1"].ffn.experts.kernel == "int8_mm" and back.layers["1"].ffn.experts.kernel == "dequant"
    export_model(full, tmp_path / "full")
    at_load = load_model(tmp_path / "full", quantization=QuantConfig("int8"))  # model.quantization at load time
    with torch.no_grad():
        assert torch.equal(at_load(TOKENS), q(TOKENS))
    with pytest.raises(ValueError, match="holds int8 weights"):
        load_model(tmp_path / "int8", quantization=QuantConfig("fp8"))


@pytest.mark.parametrize("score_func,block", [("softmax", 32), ("sigmoid", 0)], ids=["ernie-block", "glm-tensor"])
def test_vllm_fp8_layout_reads_back_to_the_same_weights(tmp_path, score_func, block):
    from moe.hf import from_hf_state_dict, hf_architecture

    q = quantize_model(model_for(score_func), QuantConfig("fp8", fp8_block=block))
    export_vllm_fp8(q, tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["quantization_config"]["quant_method"] == "fp8"
    assert config["quantization_config"].get("weight_block_size") == ([block, block] if block else None)
    sd = load_file(str(tmp_path / "model.safetensors"))
    scale = "weight_scale_inv" if block else "weight_scale"
    gate = sd["model.layers.1.mlp.experts.7.gate_proj.weight"]
    assert gate.dtype == FP8 and gate.shape == (48, 64)  # (out, in) per expert
    assert sd[f"model.layers.1.mlp.experts.7.gate_proj.{scale}"].shape == ((2, 2) if block else ())
    assert sd["model.layers.0.self_attn.q_proj.weight"].dtype == FP8
    assert sd["model.embed_tokens.weight"].dtype == torch.float32 and sd["model.layers.1.mlp.gate.weight"].dtype == torch.float32
    # read back as a loader would: dequantize every fp8 weight, fuse experts, map to our names
    hf = {k: v for k, v in sd.items() if not k.endswith(scale) and v.dtype != FP8}
    for k, v in sd.items():
        if v.dtype == FP8:
            hf[k] = dequantize_tensor(v, sd[k + "_scale_inv" if block else k + "_scale"], block)
    cfg = q.cfg
    for i in (1, 2):
        p = f"model.layers.{i}.mlp.experts."
        per = {n: torch.stack([hf.pop(f"{p}{e}.{n}.weight") for e in range(8)]) for n in ("gate_proj", "up_proj",
                                                                                            "down_proj")}
        hf[p + "gate_up_proj"] = torch.cat([per["gate_proj"], per["up_proj"]], 1)
        hf[p + "down_proj"] = per["down_proj"]
    ours = from_hf_state_dict(hf, cfg, hf_architecture(cfg))
    want = dequantize_model(copy.deepcopy(q)).state_dict()
    assert all(torch.equal(ours[k], want[k]) for k in ours) and set(ours) <= set(want)


def test_a_bad_quantization_setting_names_the_key():
    with pytest.raises(ValueError, match="model.quantization='int4'"):
        QuantConfig("int4").validate()
    with pytest.raises(ValueError, match="does not run int8"):
        QuantConfig("int8", kernel="scaled_mm").validate()
    assert isinstance(nn.Linear(2, 2), nn.Module)
