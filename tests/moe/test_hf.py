"""transformers export/import with the real stock classes (transformers pinned in pyproject.toml).

The `tiny` preset (softmax router -> Ernie4_5_MoeForCausalLM) and the same model with the other
router (sigmoid, route scale, top-1, no shared experts -> Glm4MoeForCausalLM) are exported, loaded
with `AutoModelForCausalLM.from_pretrained` and compared on real tokens (stdlib source through a
tokenizer trained by the project's own trainer); the export -> import round trip is bitwise, a
model born in transformers imports with the same logits, and `AutoTokenizer` encodes as ours does.
"""

from __future__ import annotations

import dataclasses
import sysconfig
from pathlib import Path

import pytest
import torch
import transformers
from omegaconf import OmegaConf

from moe import hf as moe_hf
from moe.config import ModelConfig, MoEConfig
from moe.generate import SamplingParams, generate
from moe.model import build_model
from tests.conftest import REPO

STDLIB = Path(sysconfig.get_paths()["stdlib"])
CORPUS = ["textwrap.py", "string.py", "fnmatch.py", "shlex.py", "glob.py", "bisect.py"]


def tiny_preset() -> ModelConfig:
    d = OmegaConf.to_container(OmegaConf.load(REPO / "conf/model/tiny.yaml"))
    return ModelConfig(**{**d, "moe": MoEConfig(**d.pop("moe"))})


def sigmoid_preset() -> ModelConfig:
    """The tiny preset with the other router and the traps: top-1 (no renormalization), a route
    scale, no shared experts."""
    cfg = tiny_preset()
    moe = dataclasses.replace(cfg.moe, score_func="sigmoid", top_k=1, route_scale=2.5, n_shared_experts=0)
    return dataclasses.replace(cfg, name="tiny-sigmoid", rope_theta=50000.0, norm_eps=1e-5, moe=moe)


PRESETS = {"tiny": tiny_preset, "tiny-sigmoid": sigmoid_preset}


@pytest.fixture(scope="module")
def tokenizer_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from pipelines.data.config import TokenizerConfig
    from pipelines.data.tokenizer import train_tokenizer

    out = tmp_path_factory.mktemp("hf_tok") / "tokenizer.json"
    texts = [(STDLIB / f).read_text() for f in CORPUS]
    train_tokenizer(texts, 512, TokenizerConfig(), out)
    return out


def trained_like(cfg: ModelConfig, seed: int = 0) -> torch.nn.Module:
    """A model whose expert biases are nonzero, as aux-loss-free balancing leaves them."""
    model = build_model(cfg, seed=seed).eval()
    gen = torch.Generator().manual_seed(seed)
    for layer in model.moe_layers().values():
        layer.router.expert_bias.copy_(0.05 * torch.randn(cfg.moe.n_routed_experts, generator=gen))
    return model


def real_batch(tokenizer_path: Path, batch: int = 4, seq: int = 96) -> torch.Tensor:
    from tokenizers import Tokenizer

    ids = Tokenizer.from_file(str(tokenizer_path)).encode((STDLIB / "shlex.py").read_text()).ids
    return torch.tensor(ids[:batch * seq]).view(batch, seq)


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_export_loads_in_transformers_with_equal_logits(preset: str, tokenizer_path: Path, tmp_path: Path) -> None:
    model = trained_like(PRESETS[preset]())
    out = moe_hf.export_hf(model, tmp_path / "hf", tokenizer_path)
    hf = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    expected = moe_hf.GLM if model.cfg.moe.score_func == "sigmoid" else moe_hf.ERNIE
    assert type(hf).__name__ == expected and hf.config.architectures == [expected]
    tokens = real_batch(tokenizer_path)
    with torch.no_grad():
        ours, theirs = model(tokens), hf(tokens).logits
    assert torch.allclose(ours, theirs, atol=1e-5, rtol=0), float((ours - theirs).abs().max())

    # greedy generation until eos: our KV cache against transformers `generate`, same tokens
    eos = hf.generation_config.eos_token_id
    prompts = tokens[:, :16]
    seqs = generate(model, prompts.tolist(), SamplingParams(max_tokens=12, temperature=0.0), eos_ids=[eos])
    theirs_ids = [row[:row.index(eos)] if eos in row else row
                  for row in hf.generate(prompts, max_new_tokens=12, do_sample=False)[:, 16:].tolist()]
    assert [s.output_ids for s in seqs] == theirs_ids


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_export_then_import_is_bitwise(preset: str, tmp_path: Path) -> None:
    model = trained_like(PRESETS[preset](), seed=3)
    back = moe_hf.load_hf(moe_hf.export_hf(model, tmp_path / "hf"))
    assert back.cfg == model.cfg
    ours, theirs = model.state_dict(), back.state_dict()
    assert ours.keys() == theirs.keys()
    for k, v in ours.items():
        assert torch.equal(v, theirs[k]), k


def test_unused_expert_bias_exports_as_zero(tmp_path: Path) -> None:
    """With bias_update_rate 0 our router ignores the bias buffer; the stock class always adds it."""
    cfg = sigmoid_preset()
    cfg = dataclasses.replace(cfg, moe=dataclasses.replace(cfg.moe, bias_update_rate=0.0, top_k=2))
    model = trained_like(cfg)
    hf = moe_hf.to_hf_model(model)
    tokens = torch.randint(0, cfg.vocab_size, (2, 32))
    with torch.no_grad():
        assert torch.allclose(model(tokens), hf(tokens).logits, atol=1e-5, rtol=0)
    assert all(not layer.mlp.gate.e_score_correction_bias.any() for layer in hf.model.layers[1:])


@pytest.mark.parametrize("arch", [moe_hf.GLM, moe_hf.ERNIE])
def test_a_model_born_in_transformers_imports_with_equal_logits(arch: str, tmp_path: Path) -> None:
    """A checkpoint the platform did not write (no elastic_moe config key, random stock init,
    Ernie with its default tied embeddings and norm_min) loads into ours with the same logits."""
    common = dict(vocab_size=300, hidden_size=64, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=64, moe_intermediate_size=24)
    if arch == moe_hf.GLM:
        config = transformers.Glm4MoeConfig(**common, n_routed_experts=6, num_experts_per_tok=2, n_shared_experts=2,
                                            routed_scaling_factor=1.7, num_nextn_predict_layers=0,
                                            partial_rotary_factor=1.0)
    else:
        config = transformers.Ernie4_5_MoeConfig(**common, moe_num_experts=6, moe_k=3, moe_num_shared_experts=1)
    torch.manual_seed(0)
    hf = getattr(transformers, arch)(config).eval()
    with torch.no_grad():
        for layer in hf.model.layers[1:]:
            bias = layer.mlp.gate.e_score_correction_bias if arch == moe_hf.GLM \
                else layer.mlp.gate.moe_statics.e_score_correction_bias
            bias.copy_(0.05 * torch.randn_like(bias))
    hf.save_pretrained(tmp_path / "born")
    ours = moe_hf.load_hf(tmp_path / "born")
    tokens = torch.randint(0, 300, (2, 48))
    with torch.no_grad():
        assert torch.allclose(ours(tokens), hf(tokens).logits, atol=1e-5, rtol=0)
    assert ours.cfg.moe.score_func == ("sigmoid" if arch == moe_hf.GLM else "softmax")


def test_tokenizer_round_trip_on_the_corpus(tokenizer_path: Path, tmp_path: Path) -> None:
    from tokenizers import Tokenizer

    moe_hf.export_hf(build_model(tiny_preset(), seed=0), tmp_path / "hf", tokenizer_path)
    auto = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")
    ours = Tokenizer.from_file(str(tokenizer_path))
    assert auto.eos_token == "<|endoftext|>" and auto.eos_token_id == ours.token_to_id("<|endoftext|>")
    assert auto.pad_token == "<|pad|>" and auto.pad_token_id == ours.token_to_id("<|pad|>")
    for name in [*CORPUS, "json/decoder.py", "heapq.py"]:
        text = (STDLIB / name).read_text() + "<|endoftext|>\u00e9\u4e16 \t\n"
        ids = ours.encode(text).ids
        assert auto(text)["input_ids"] == ids, name
        assert auto.decode(ids) == ours.decode(ids, skip_special_tokens=False), name


def test_what_no_stock_class_represents_is_refused(tmp_path: Path) -> None:
    cfg = tiny_preset()
    capacity = dataclasses.replace(cfg, moe=dataclasses.replace(cfg.moe, capacity_factor=1.25))
    with pytest.raises(moe_hf.UnsupportedModelError, match="capacity_factor=1.25"):
        moe_hf.export_hf(build_model(capacity), tmp_path / "a")
    scaled = dataclasses.replace(cfg, moe=dataclasses.replace(cfg.moe, route_scale=2.0))
    with pytest.raises(moe_hf.UnsupportedModelError, match="route_scale=2.0 with a softmax router"):
        moe_hf.hf_architecture(scaled)
    assert not (tmp_path / "a").exists()

    glm = dict(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
               n_routed_experts=4, architectures=[moe_hf.GLM])
    with pytest.raises(moe_hf.UnsupportedModelError, match="partial_rotary_factor=0.5"):  # Glm's default
        moe_hf.model_config_from_hf(transformers.Glm4MoeConfig(**glm))
    qk_norm = transformers.Glm4MoeConfig(**glm, use_qk_norm=True, partial_rotary_factor=1.0)
    with pytest.raises(moe_hf.UnsupportedModelError, match="use_qk_norm"):
        moe_hf.model_config_from_hf(qk_norm)
    other = transformers.Qwen3MoeConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                        num_key_value_heads=2, num_experts=4, architectures=["Qwen3MoeForCausalLM"])
    with pytest.raises(moe_hf.UnsupportedModelError, match="'Qwen3MoeForCausalLM' cannot be imported"):
        moe_hf.model_config_from_hf(other)
    with pytest.raises(FileNotFoundError, match="not a transformers model directory"):
        moe_hf.load_hf(tmp_path / "missing")


def test_the_hf_benchmark_checks_logits_and_generation_in_its_run() -> None:
    """`python -m pipelines.bench hf` at toy size: both sides run on the same exported weights, the
    logits agree and greedy generation matches (the speed goals are measured, not asserted)."""
    from pipelines.bench.hf import run

    result = run(["--preset", "tiny", "--batch", "2", "--seq", "32", "--prompts", "4", "--prompt-len", "8",
                  "--new-tokens", "4", "--rounds", "1", "--gen-rounds", "1", "--score-func", "sigmoid"])
    out = result.to_json()
    assert set(out["goals"]) == {"train_tokens_per_s_vs_transformers", "generate_tokens_per_s_vs_transformers",
                                 "logits_max_abs_diff"}
    assert out["goals"]["logits_max_abs_diff"]["met"]
    assert {(r["what"].split(" ")[0], r["side"]) for r in out["rows"]} == {
        ("train", "ours"), ("train", "transformers"), ("generate", "ours"), ("generate", "transformers"),
        ("generate", "ours, expert_kernel=grouped_mm")}
    assert any("Glm4MoeForCausalLM" in n for n in result.notes)
    assert any("100% of the 4 prompts produce the same tokens" in n for n in result.notes)
