"""transformers export/import: our `MoETransformer` <-> stock transformers classes, equal logits.

Which class (read in the transformers sources of the version pinned in pyproject.toml, 5.23.0):

- sigmoid router -> `Glm4MoeForCausalLM`. Its `Glm4MoeTopkRouter` computes the gate in fp32,
  takes sigmoid scores, selects the top-k of `scores + e_score_correction_bias` (our expert bias)
  and combines with the unbiased scores, renormalized when `norm_topk_prob` (denominator + 1e-20),
  times `routed_scaling_factor` (our `route_scale`). Group-limited routing is off with
  `n_group = topk_group = 1`. Its shared experts are one SwiGLU of `n_shared_experts *
  moe_intermediate_size` (zero shared experts: a zero-width SwiGLU that adds exact zeros), its
  first `first_k_dense_replace` layers are dense. Traps: it rotates half-split pairs (i, i + d/2)
  while we rotate interleaved pairs (2i, 2i + 1), so the q/k rows of every head are permuted; its
  `partial_rotary_factor` defaults to 0.5 (we write 1.0) and `rms_norm_eps` to 1e-5 (we write ours);
  with top_k = 1 we do not renormalize, so `norm_topk_prob` is written false there.
- softmax router -> `Ernie4_5_MoeForCausalLM`. Its `Ernie4_5_MoeTopKRouter` computes the gate in
  fp32, softmax, selects the top-k of `probs + moe_statics.e_score_correction_bias`, gathers the
  unbiased probabilities and always divides them by `clamp(sum, min=moe_norm_min)`. With
  `moe_norm_min` 1e-12 that is our renormalization (the top-k of a softmax sum to at least k/E);
  with `moe_norm_min` 1.0 it divides by exactly 1.0 (a sum of probabilities is at most 1), which
  is our un-normalized case (`norm_topk_prob` false, or top_k = 1). It rotates interleaved pairs
  like ours (no permutation). Traps: `tie_word_embeddings` defaults to true and `rope_theta` to
  500000 (we write ours); it has no routed scaling factor, so `route_scale != 1` is refused.
  (DeepseekV3 would also represent a softmax router only without the bias; Qwen2/3-MoE have no
  expert bias; Ernie 4.5 has the bias, which our aux-loss-free balancing uses with either router.)

Not represented by any stock class, hence refused (`UnsupportedModelError` names the feature):
capacity mode (`moe.capacity_factor > 0` drops tokens), `route_scale != 1` with softmax, fewer than
2 routed experts with sigmoid (Glm's group scores take the top 2 of a group).

The export also holds our own `ModelConfig` under the config key `elastic_moe` (stock loaders ignore
it), so an import of our own export restores the training-only fields (loss coefficients, bias
update rate, kernel) and the round trip is bitwise. An expert bias that our router does not use
(`bias_update_rate = 0`) is exported as zeros. The tokenizer is exported as a fast tokenizer
(`tokenizer.json` + `tokenizer_config.json` with its eos/pad tokens), which `AutoTokenizer`
loads to the same `tokenizers` object. transformers is imported inside the functions.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import torch

from moe.config import ModelConfig, MoEConfig
from moe.model import MoETransformer, build_model

GLM = "Glm4MoeForCausalLM"
ERNIE = "Ernie4_5_MoeForCausalLM"
CONFIG_KEY = "elastic_moe"  # our ModelConfig inside the exported transformers config
INSTALL_HINT = 'transformers is not installed: pip install -e ".[hf]" (pins the verified version).'


class UnsupportedModelError(ValueError):
    """A model no stock transformers class represents exactly (export) or that ours cannot (import)."""


def _transformers() -> Any:
    try:
        import transformers
    except ImportError as err:  # pragma: no cover - the hf extra is part of dev
        raise ImportError(INSTALL_HINT) from err
    return transformers


# ---- which class ------------------------------------------------------------------------------
def hf_architecture(cfg: ModelConfig) -> str:
    """The stock class that represents `cfg` exactly; `UnsupportedModelError` names what none can."""
    m = cfg.moe
    problems = []
    if m.capacity_factor > 0:
        problems.append(f"moe.capacity_factor={m.capacity_factor} (capacity mode drops tokens; no stock "
                        "class does) - export a dropless model (capacity_factor=0)")
    if m.score_func == "softmax" and m.route_scale != 1.0:
        problems.append(f"moe.route_scale={m.route_scale} with a softmax router (Ernie4_5_Moe has no routed "
                        "scaling factor) - use route_scale=1.0 or a sigmoid router")
    if m.score_func == "sigmoid" and m.n_routed_experts < 2:
        problems.append(f"moe.n_routed_experts={m.n_routed_experts} with a sigmoid router (Glm4Moe's group "
                        "scores need at least 2 experts)")
    if problems:
        raise UnsupportedModelError(f"model {cfg.name!r} has no exact stock transformers class: "
                                    + "; ".join(problems) + ".")
    return GLM if m.score_func == "sigmoid" else ERNIE


def _common_kwargs(cfg: ModelConfig) -> dict[str, Any]:
    return {
        "vocab_size": cfg.vocab_size, "hidden_size": cfg.d_model, "intermediate_size": cfg.dense_hidden,
        "num_hidden_layers": cfg.n_layers, "num_attention_heads": cfg.n_heads,
        "num_key_value_heads": cfg.n_kv_heads, "max_position_embeddings": cfg.max_seq_len,
        "rms_norm_eps": cfg.norm_eps, "tie_word_embeddings": False, "hidden_act": "silu",
        "initializer_range": cfg.init_std, "moe_intermediate_size": cfg.moe.expert_hidden,
    }


def hf_config_kwargs(cfg: ModelConfig) -> dict[str, Any]:
    """The transformers config values that make the stock class compute what `cfg` computes."""
    m, arch = cfg.moe, hf_architecture(cfg)
    kw = _common_kwargs(cfg)
    if arch == GLM:
        kw.update(
            rope_parameters={"rope_type": "default", "rope_theta": cfg.rope_theta, "partial_rotary_factor": 1.0},
            num_experts_per_tok=m.top_k, n_routed_experts=m.n_routed_experts, n_shared_experts=m.n_shared_experts,
            routed_scaling_factor=m.route_scale, n_group=1, topk_group=1, first_k_dense_replace=cfg.n_dense_layers,
            norm_topk_prob=m.norm_topk_prob and m.top_k > 1, use_qk_norm=False, attention_bias=False,
            num_nextn_predict_layers=0,
        )
    else:
        kw.update(
            rope_parameters={"rope_type": "default", "rope_theta": cfg.rope_theta},
            moe_k=m.top_k, moe_num_experts=m.n_routed_experts, moe_num_shared_experts=m.n_shared_experts,
            moe_layer_start_index=cfg.n_dense_layers, moe_layer_end_index=cfg.n_layers - 1, moe_layer_interval=1,
            moe_norm_min=1e-12 if (m.norm_topk_prob and m.top_k > 1) else 1.0, use_bias=False,
            router_aux_loss_coef=m.aux_loss_coef,
        )
    return kw


def hf_config(cfg: ModelConfig, eos_id: int | None = None) -> Any:
    """The transformers config object (pad_token_id None: no embedding row is frozen, as in ours)."""
    tf = _transformers()
    cls = tf.Glm4MoeConfig if hf_architecture(cfg) == GLM else tf.Ernie4_5_MoeConfig
    return cls(**hf_config_kwargs(cfg), pad_token_id=None, bos_token_id=None, eos_token_id=eos_id,
               architectures=[hf_architecture(cfg)], **{CONFIG_KEY: dataclasses.asdict(cfg)})


# ---- weights ----------------------------------------------------------------------------------
def _half_split_perm(head_dim: int) -> torch.Tensor:
    """Row order that turns interleaved rotary pairs (2i, 2i+1) into half-split pairs (i, i + d/2)."""
    return torch.cat([torch.arange(0, head_dim, 2), torch.arange(1, head_dim, 2)])


def permute_heads(w: torch.Tensor, head_dim: int, inverse: bool = False) -> torch.Tensor:
    perm = _half_split_perm(head_dim)
    if inverse:
        perm = torch.argsort(perm)
    return w.reshape(-1, head_dim, w.shape[-1])[:, perm].reshape(w.shape)


# our projection names -> the stock classes' (attention; dense, shared and expert feed-forward)
ATTN_NAMES = (("wq", "q_proj"), ("wk", "k_proj"), ("wv", "v_proj"), ("wo", "o_proj"))
FFN_NAMES = (("w1", "gate_proj"), ("w3", "up_proj"), ("w2", "down_proj"))


def _bias_key(arch: str) -> str:
    return "mlp.gate.e_score_correction_bias" if arch == GLM else "mlp.gate.moe_statics.e_score_correction_bias"


def _layer_to_hf(cfg: ModelConfig, arch: str, ours: dict[str, torch.Tensor], i: int) -> dict[str, torch.Tensor]:
    p, out = f"layers.{i}.", {}
    out["input_layernorm.weight"] = ours[p + "attn_norm.weight"]
    out["post_attention_layernorm.weight"] = ours[p + "ffn_norm.weight"]
    for a, b in ATTN_NAMES:
        w = ours[f"{p}attn.{a}.weight"]
        out[f"self_attn.{b}.weight"] = permute_heads(w, cfg.head_dim) if arch == GLM and a in ("wq", "wk") else w
    f = p + "ffn."
    if not cfg.is_moe_layer(i):
        for a, b in FFN_NAMES:
            out[f"mlp.{b}.weight"] = ours[f"{f}{a}.weight"]
        return out
    m = cfg.moe
    out["mlp.gate.weight"] = ours[f + "router.gate.weight"]
    bias = ours[f + "router.expert_bias"] if m.bias_update_rate > 0 else torch.zeros(m.n_routed_experts)
    out[_bias_key(arch)] = bias.float().reshape(-1 if arch == GLM else (1, -1))
    w1, w3, w2 = (ours[f"{f}experts.{n}"] for n in ("w1", "w3", "w2"))
    out["mlp.experts.gate_up_proj"] = torch.cat([w1.transpose(1, 2), w3.transpose(1, 2)], dim=1)
    out["mlp.experts.down_proj"] = w2.transpose(1, 2)
    if m.n_shared_experts or arch == GLM:  # Glm always holds the module (zero-width without shared experts)
        for a, b in FFN_NAMES:
            key = f"{f}shared.{a}.weight"
            shape = (cfg.d_model, 0) if a == "w2" else (0, cfg.d_model)
            out[f"mlp.shared_experts.{b}.weight"] = ours[key] if m.n_shared_experts else torch.zeros(shape)
    return out


def to_hf_state_dict(model: MoETransformer) -> dict[str, torch.Tensor]:
    """Our weights under the stock class's parameter names and layouts (fp32, contiguous)."""
    cfg = model.cfg
    arch = hf_architecture(cfg)
    ours = {k: v.detach().to("cpu", torch.float32) for k, v in model.state_dict().items()}
    out = {"model.embed_tokens.weight": ours["tok_emb.weight"], "model.norm.weight": ours["norm.weight"],
           "lm_head.weight": ours["head.weight"]}
    for i in range(cfg.n_layers):
        out.update({f"model.layers.{i}.{k}": v for k, v in _layer_to_hf(cfg, arch, ours, i).items()})
    return {k: v.contiguous() for k, v in out.items()}


def _layer_from_hf(cfg: ModelConfig, arch: str, hf: dict[str, torch.Tensor], i: int) -> dict[str, torch.Tensor]:
    q, out = f"model.layers.{i}.", {}
    out["attn_norm.weight"] = hf[q + "input_layernorm.weight"]
    out["ffn_norm.weight"] = hf[q + "post_attention_layernorm.weight"]
    for a, b in ATTN_NAMES:
        w = hf[f"{q}self_attn.{b}.weight"]
        out[f"attn.{a}.weight"] = permute_heads(w, cfg.head_dim, True) if arch == GLM and a in ("wq", "wk") else w
    if not cfg.is_moe_layer(i):
        for a, b in FFN_NAMES:
            out[f"ffn.{a}.weight"] = hf[f"{q}mlp.{b}.weight"]
        return out
    out["ffn.router.gate.weight"] = hf[q + "mlp.gate.weight"]
    out["ffn.router.expert_bias"] = hf[q + _bias_key(arch)].reshape(-1)
    gate_up = hf[q + "mlp.experts.gate_up_proj"]  # (E, 2H, D): gate rows, then up rows
    h = cfg.moe.expert_hidden
    out["ffn.experts.w1"] = gate_up[:, :h].transpose(1, 2)
    out["ffn.experts.w3"] = gate_up[:, h:].transpose(1, 2)
    out["ffn.experts.w2"] = hf[q + "mlp.experts.down_proj"].transpose(1, 2)
    if cfg.moe.n_shared_experts:
        for a, b in FFN_NAMES:
            out[f"ffn.shared.{a}.weight"] = hf[f"{q}mlp.shared_experts.{b}.weight"]
    return out


def from_hf_state_dict(hf: dict[str, torch.Tensor], cfg: ModelConfig, arch: str) -> dict[str, torch.Tensor]:
    """The stock class's weights in our names and layouts (an exact rearrangement, no arithmetic)."""
    hf = {k: v.detach().to("cpu", torch.float32) for k, v in hf.items()}
    head = hf.get("lm_head.weight", hf["model.embed_tokens.weight"])  # tied: the head is the embedding
    out = {"tok_emb.weight": hf["model.embed_tokens.weight"], "norm.weight": hf["model.norm.weight"],
           "head.weight": head}
    for i in range(cfg.n_layers):
        out.update({f"layers.{i}.{k}": v for k, v in _layer_from_hf(cfg, arch, hf, i).items()})
    return {k: v.contiguous() for k, v in out.items()}


# ---- models -----------------------------------------------------------------------------------
def to_hf_model(model: MoETransformer, eos_id: int | None = None) -> Any:
    """The stock transformers model (fp32, eval mode) holding exactly our weights."""
    tf = _transformers()
    config = hf_config(model.cfg, eos_id)
    cls = getattr(tf, hf_architecture(model.cfg))
    hf = cls(config).to(torch.float32)
    hf.load_state_dict(to_hf_state_dict(model), strict=True)
    return hf.eval()


def _check(cond: bool, arch: str, feature: str) -> None:
    if not cond:
        raise UnsupportedModelError(f"this {arch} checkpoint uses {feature}, which the elastic-moe model "
                                    "does not compute; it cannot be imported exactly.")


def _check_glm(c: Any, top_k: int) -> None:
    rope = c.rope_parameters or {}
    _check(rope.get("partial_rotary_factor", 1.0) == 1.0, GLM,
           f"partial_rotary_factor={rope.get('partial_rotary_factor')} (ours rotates the whole head)")
    _check(c.n_group == c.topk_group, GLM, f"group-limited routing (n_group={c.n_group}, topk_group={c.topk_group})")
    _check(not c.use_qk_norm, GLM, "q/k RMSNorm (use_qk_norm=true)")
    _check(not c.attention_bias, GLM, "attention biases (attention_bias=true)")
    _check(not (c.norm_topk_prob and top_k == 1), GLM, "renormalized top-1 weights (norm_topk_prob with top_k=1)")


def _check_ernie(c: Any) -> None:
    _check(not c.use_bias, ERNIE, "linear biases (use_bias=true)")
    _check(c.moe_layer_interval == 1 and c.moe_layer_end_index == c.num_hidden_layers - 1, ERNIE,
           f"MoE layers at interval {c.moe_layer_interval} ending at {c.moe_layer_end_index} (ours: contiguous "
           "MoE layers to the last)")
    exact_norm = c.moe_norm_min >= 1.0 or (c.moe_k > 1 and c.moe_norm_min <= c.moe_k / c.moe_num_experts)
    _check(exact_norm, ERNIE, f"moe_norm_min={c.moe_norm_min} with top_k={c.moe_k} (a clamp ours does not apply)")


def model_config_from_hf(c: Any) -> tuple[ModelConfig, str]:
    """Our ModelConfig for a transformers config of a supported class, and that class's name."""
    arch = (c.architectures or [""])[0]
    if arch not in (GLM, ERNIE):
        raise UnsupportedModelError(f"transformers architecture {arch or c.model_type!r} cannot be imported: "
                                    f"elastic-moe reads {GLM} (sigmoid router) and {ERNIE} (softmax router).")
    rope = c.rope_parameters or {}
    _check(rope.get("rope_type", "default") == "default", arch, f"rope_type={rope.get('rope_type')!r}")
    _check(c.hidden_act == "silu", arch, f"hidden_act={c.hidden_act!r}")
    _check(getattr(c, "head_dim", None) in (None, c.hidden_size // c.num_attention_heads), arch,
           f"head_dim={getattr(c, 'head_dim', None)} != hidden_size / num_attention_heads")
    if arch == GLM:
        _check_glm(c, c.num_experts_per_tok)
        moe = MoEConfig(n_routed_experts=c.n_routed_experts, n_shared_experts=c.n_shared_experts,
                        top_k=c.num_experts_per_tok, score_func="sigmoid", norm_topk_prob=c.norm_topk_prob,
                        route_scale=c.routed_scaling_factor, expert_hidden=c.moe_intermediate_size)
        n_dense = c.first_k_dense_replace
    else:
        _check_ernie(c)
        moe = MoEConfig(n_routed_experts=c.moe_num_experts, n_shared_experts=c.moe_num_shared_experts,
                        top_k=c.moe_k, score_func="softmax", norm_topk_prob=c.moe_norm_min < 1.0,
                        expert_hidden=c.moe_intermediate_size)
        n_dense = c.moe_layer_start_index
    cfg = ModelConfig(name=getattr(c, "_name_or_path", "") or arch, vocab_size=c.vocab_size, d_model=c.hidden_size,
                      n_layers=c.num_hidden_layers, n_heads=c.num_attention_heads, n_kv_heads=c.num_key_value_heads,
                      max_seq_len=c.max_position_embeddings, dense_hidden=c.intermediate_size,
                      n_dense_layers=min(n_dense, c.num_hidden_layers), rope_theta=float(rope["rope_theta"]),
                      norm_eps=c.rms_norm_eps, init_std=c.initializer_range, moe=moe)
    return _restore_own_config(cfg, c), arch


def _restore_own_config(derived: ModelConfig, c: Any) -> ModelConfig:
    """Our exported ModelConfig when the transformers config still says what it said at export."""
    stored = getattr(c, CONFIG_KEY, None)
    if not isinstance(stored, dict):
        return derived
    own = ModelConfig(**{**stored, "moe": MoEConfig(**stored["moe"])})
    try:
        expected = hf_config_kwargs(own)
    except UnsupportedModelError:
        return derived
    if all(getattr(c, k, None) == v for k, v in expected.items() if k != "rope_parameters") and \
            all(c.rope_parameters.get(k) == v for k, v in expected["rope_parameters"].items()):
        return own
    return derived


def from_hf_model(hf: Any) -> MoETransformer:
    """Our model (fp32, eval mode) with exactly the weights of a stock transformers model."""
    cfg, arch = model_config_from_hf(hf.config)
    cfg.validate()
    model = build_model(cfg, device="cpu", dtype=torch.float32, seed=None)
    model.load_state_dict(from_hf_state_dict(hf.state_dict(), cfg, arch), strict=True)
    return model.eval()


# ---- directories ------------------------------------------------------------------------------
def export_tokenizer(tokenizer_path: str | Path, out_dir: str | Path, eos_token: str | None = "<|endoftext|>",
                     pad_token: str | None = "<|pad|>") -> Any:
    """Write our `tokenizers` file as a transformers fast tokenizer (special tokens the vocabulary has)."""
    tf = _transformers()
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(tokenizer_path))
    specials = {k: v for k, v in (("eos_token", eos_token), ("pad_token", pad_token))
                if v is not None and tok.token_to_id(v) is not None}
    fast = tf.PreTrainedTokenizerFast(tokenizer_object=tok, clean_up_tokenization_spaces=False, **specials)
    fast.save_pretrained(str(out_dir))
    return fast


def export_hf(model: MoETransformer, out_dir: str | Path, tokenizer_path: str | Path | None = None, *,
              eos_token: str | None = "<|endoftext|>", pad_token: str | None = "<|pad|>") -> Path:
    """A directory `AutoModelForCausalLM` / `AutoTokenizer` load without `trust_remote_code`."""
    out = Path(out_dir)
    hf_architecture(model.cfg)  # refuse before writing anything
    out.mkdir(parents=True, exist_ok=True)
    eos_id = pad_id = None
    if tokenizer_path is not None:
        fast = export_tokenizer(tokenizer_path, out, eos_token, pad_token)
        eos_id, pad_id = fast.eos_token_id, fast.pad_token_id
    hf = to_hf_model(model, eos_id)
    hf.generation_config.eos_token_id = eos_id
    hf.generation_config.pad_token_id = pad_id if pad_id is not None else eos_id
    hf.generation_config.bos_token_id = None
    hf.save_pretrained(str(out))
    return out


def load_hf(path: str | Path) -> MoETransformer:
    """Import a transformers directory (Glm4Moe or Ernie4_5_Moe) into our model, same logits."""
    d = Path(path)
    if not (d / "config.json").is_file():
        raise FileNotFoundError(f"{d / 'config.json'} not found: {d} is not a transformers model directory "
                                "(python -m pipelines.export writes one).")
    tf = _transformers()
    config = tf.AutoConfig.from_pretrained(str(d))
    model_config_from_hf(config)  # a clear refusal before the weights are read
    hf = tf.AutoModelForCausalLM.from_pretrained(str(d), dtype=torch.float32)
    return from_hf_model(hf)


# ---- LoRA adapters in peft's format -------------------------------------------------------------
PEFT_CONFIG_FILE, PEFT_WEIGHTS_FILE = "adapter_config.json", "adapter_model.safetensors"


def _hf_linear_name(cfg: ModelConfig, name: str) -> tuple[str, bool]:
    """Our adapted nn.Linear (`layers.3.attn.wq`) -> (its transformers name, whether it is an
    attention projection, which peft targets as a module; feed-forward weights are targeted as
    parameters: peft >= 0.21 folds feed-forward *module* targets of MoE models into the fused experts)."""
    _, layer, kind, *rest = name.split(".")
    prefix = f"model.layers.{layer}."
    if kind == "attn":
        return prefix + "self_attn." + dict(ATTN_NAMES)[rest[0]], True
    shared = rest[0] == "shared"
    hf_proj = dict(FFN_NAMES)[rest[-1]]
    return prefix + ("mlp.shared_experts." if shared else "mlp.") + hf_proj, False


def peft_adapter(model: MoETransformer, adapters: dict[str, Any], rank: int, alpha: float
                 ) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """(adapter_config.json, adapter_model.safetensors tensors) of LoRA `adapters` (moe/lora.py, on a
    whole one-device model) for `PeftModel.from_pretrained(<our transformers export>, dir)`.

    Linear adapters keep nn.Linear's layout (Glm's q/k rows permuted like the weights). The experts'
    shared gate/up A is the LoRA of the fused `gate_up_proj` (peft: A (E*r, D) expert-major, B
    (2H, r*E) expert-minor), their down projection that of `down_proj`; peft nests the two wrappers
    with `gate_up_proj` inside (`experts.base_layer.`). peft refuses dropout on parameter targets, so
    the exported config says 0 (dropout only acts in training)."""
    cfg, arch = model.cfg, hf_architecture(model.cfg)
    modules, params, out = set(), [], {}
    pre = "base_model.model."
    for name, a in adapters.items():
        if hasattr(a, "A13"):
            hf = f"model.layers.{name.split('.')[1]}.mlp.experts"
            e, r = a.A13.shape[0], a.A13.shape[2]
            out[f"{pre}{hf}.base_layer.lora_A.weight"] = a.A13.transpose(1, 2).reshape(e * r, -1)
            out[f"{pre}{hf}.base_layer.lora_B.weight"] = a.B13.permute(2, 1, 0).reshape(-1, r * e)
            out[f"{pre}{hf}.lora_A.weight"] = a.A2.transpose(1, 2).reshape(e * r, -1)
            out[f"{pre}{hf}.lora_B.weight"] = a.B2.permute(2, 1, 0).reshape(-1, r * e)
            params += [f"{hf}.gate_up_proj", f"{hf}.down_proj"]
            continue
        hf, is_attn = _hf_linear_name(cfg, name)
        b = a.B
        if arch == GLM and name.rsplit(".", 1)[-1] in ("wq", "wk"):
            b = permute_heads(b, cfg.head_dim)
        out[f"{pre}{hf}.lora_A.weight"], out[f"{pre}{hf}.lora_B.weight"] = a.A, b
        if is_attn:
            modules.add(hf.rsplit(".", 1)[-1])
        else:
            params.append(f"{hf}.weight")
    config = {"peft_type": "LORA", "task_type": None, "r": rank, "lora_alpha": alpha, "lora_dropout": 0.0,
              "target_modules": sorted(modules), "target_parameters": sorted(params), "bias": "none",
              "fan_in_fan_out": False, "use_rslora": False, "use_dora": False, "inference_mode": True,
              "init_lora_weights": True, "base_model_name_or_path": None, "modules_to_save": None}
    return config, {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in out.items()}


def export_peft_adapter(model: MoETransformer, adapters: dict[str, Any], rank: int, alpha: float,
                        out_dir: str | Path) -> Path:
    """Write `peft_adapter` as adapter_config.json + adapter_model.safetensors into `out_dir`."""
    import json

    from safetensors.torch import save_file

    config, tensors = peft_adapter(model, adapters, rank, alpha)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / PEFT_CONFIG_FILE).write_text(json.dumps(config, indent=2))
    save_file(tensors, str(out / PEFT_WEIGHTS_FILE), metadata={"format": "pt"})
    return out
