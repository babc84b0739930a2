"""LoRA (moe/lora.py): exact merge and unmerge, adapter gradients equal autograd through the merged
weights, per-example gradients equal a per-example loop, and the trainable fraction of the presets."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch
from torch.func import functional_call

from moe.config import ModelConfig
from moe.lora import (
    TARGETS,
    LoRAConfig,
    adapters_of,
    apply_lora,
    capture_per_example,
    lora_param_counts,
    merge_lora,
    remove_lora,
    unmerge_lora,
)
from moe.model import build_meta_model, build_model
from tests.moe.test_hf import tiny_preset


def lora_model(cfg: ModelConfig | None = None, lora: LoRAConfig | None = None, seed: int = 0):
    """The tiny model (dropless, no aux/z losses) with adapters whose B is random, so every adapter matters."""
    cfg = cfg or tiny_preset()
    cfg = dataclasses.replace(cfg, moe=dataclasses.replace(cfg.moe, aux_loss_coef=0.0, z_loss_coef=0.0,
                                                           expert_kernel="loop"))
    model = build_model(cfg, seed=seed)
    adapters = apply_lora(model, lora or LoRAConfig(rank=4, alpha=8.0), seed=seed)
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for a in adapters.values():
            for name, p in a.named_parameters():
                if name.startswith("B"):
                    p.copy_(0.05 * torch.randn(p.shape, generator=gen))
    return model, adapters


def tokens(cfg: ModelConfig, batch: int = 3, seq: int = 16, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, cfg.vocab_size, (batch, seq), generator=torch.Generator().manual_seed(seed))


def test_every_target_gets_an_adapter_and_only_adapters_train() -> None:
    model, adapters = lora_model()
    assert sorted(adapters) == sorted(
        [f"layers.{i}.attn.{w}" for i in (0, 1) for w in ("wq", "wk", "wv", "wo")]
        + [f"layers.0.ffn.{w}" for w in ("w1", "w3", "w2")] + [f"layers.1.ffn.shared.{w}" for w in ("w1", "w3", "w2")]
        + ["layers.1.ffn.experts"])
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(".lora." in n for n in trainable)
    model2, _ = lora_model(lora=LoRAConfig(rank=2, targets=["experts"], train_router=True))
    assert {n for n, p in model2.named_parameters() if p.requires_grad} == {
        "layers.1.ffn.router.gate.weight", *(f"layers.1.ffn.experts.lora.{p}" for p in ("A13", "B13", "A2", "B2"))}


def test_merge_and_unmerge_are_exact() -> None:
    model, _ = lora_model()
    x = tokens(model.cfg)
    base = {k: v.clone() for k, v in model.state_dict().items() if ".lora." not in k}
    with torch.no_grad():
        adapted = model(x)
        merge_lora(model)
        merged = model(x)
        assert any(not torch.equal(v, model.state_dict()[k]) for k, v in base.items())
        unmerge_lora(model)
        again = model(x)
    torch.testing.assert_close(merged, adapted, atol=1e-5, rtol=1e-5)
    assert torch.equal(again, adapted)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in base.items())
    remove_lora(model, merge=True)
    assert not adapters_of(model) and not any(".lora." in k for k in model.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(model(x), adapted, atol=1e-5, rtol=1e-5)


def merged_weights(model: torch.nn.Module, adapters: dict, leaves: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """W + scale * B A for every adapted weight, as autograd expressions of the adapter leaves."""
    out = {}
    for name, a in adapters.items():
        mod, s = model.get_submodule(name), a.scale
        if hasattr(a, "A13"):
            d13 = torch.bmm(leaves[f"{name}.lora.A13"], leaves[f"{name}.lora.B13"]) * s
            h = d13.shape[-1] // 2
            out[f"{name}.w1"], out[f"{name}.w3"] = mod.w1 + d13[..., :h], mod.w3 + d13[..., h:]
            out[f"{name}.w2"] = mod.w2 + torch.bmm(leaves[f"{name}.lora.A2"], leaves[f"{name}.lora.B2"]) * s
        else:
            out[f"{name}.weight"] = mod.weight + leaves[f"{name}.lora.B"] @ leaves[f"{name}.lora.A"] * s
    return out


@pytest.mark.parametrize("targets", [list(TARGETS), ["attn", "shared_ffn"]])  # the latter: routed experts frozen
def test_adapter_gradients_equal_autograd_through_the_merged_weights(targets: list[str]) -> None:
    model, adapters = lora_model(lora=LoRAConfig(rank=4, alpha=8.0, targets=targets))
    x = tokens(model.cfg)
    logits = model(x[:, :-1])
    torch.nn.functional.cross_entropy(logits.flatten(0, 1), x[:, 1:].flatten()).backward()
    ours = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    leaves = {n: p.detach().clone().requires_grad_(True) for n, p in model.named_parameters() if p.requires_grad}
    for a in adapters.values():
        a.merged = True  # the adapters step aside; the merged weights below carry them
    logits_ref = functional_call(model, merged_weights(model, adapters, leaves), (x[:, :-1],))
    torch.nn.functional.cross_entropy(logits_ref.flatten(0, 1), x[:, 1:].flatten()).backward()
    torch.testing.assert_close(logits_ref, logits, atol=1e-5, rtol=1e-5)
    for n, g in ours.items():
        torch.testing.assert_close(g, leaves[n].grad, atol=1e-6, rtol=1e-5, msg=n)


def test_per_example_gradients_equal_a_per_example_loop() -> None:
    """Each example's gradient (attention, dense, shared and expert adapters; an example's tokens
    route to different experts) equals the gradient of that example alone."""
    model, _ = lora_model()
    x = tokens(model.cfg, batch=4, seq=12, seed=3)
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}

    def loss_of(batch: torch.Tensor) -> torch.Tensor:  # per-example sums: no statistic crosses examples
        logits = model(batch[:, :-1])
        return torch.nn.functional.cross_entropy(logits.flatten(0, 1), batch[:, 1:].flatten(), reduction="sum")

    with capture_per_example(x.shape[0], x.shape[1] - 1):
        loss_of(x).backward()
    for i in range(x.shape[0]):
        grads = torch.autograd.grad(loss_of(x[i:i + 1]), list(params.values()))
        for (n, p), g in zip(params.items(), grads, strict=True):
            torch.testing.assert_close(p.grad_sample[i], g, atol=1e-6, rtol=1e-5, msg=f"{n} example {i}")
    total = {n: p.grad_sample.sum(0) for n, p in params.items()}
    for n, p in params.items():
        torch.testing.assert_close(total[n], p.grad, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize(("targets", "low", "high"), [
    (["attn", "dense_ffn", "shared_ffn"], 0.0003, 0.0005), (["attn", "dense_ffn", "shared_ffn", "experts"], 0.007, 0.008)])
def test_trainable_fraction_of_deepseek_moe_16b_on_meta(compose, targets: list[str], low: float, high: float) -> None:
    from pipelines.train.config import to_train_config

    cfg = to_train_config(compose("train", ["model=deepseek_moe_16b"])).model
    model = build_meta_model(cfg)
    trainable, total = lora_param_counts(model, LoRAConfig(rank=8, targets=targets))
    assert low < trainable / total < high, trainable / total
    # the count from shapes equals the adapters a (meta) model actually gets
    small = build_meta_model(dataclasses.replace(cfg, n_layers=3, vocab_size=1024))
    expected = lora_param_counts(small, LoRAConfig(rank=8, targets=targets))[0]
    apply_lora(small, LoRAConfig(rank=8, targets=targets))
    assert sum(p.numel() for p in small.parameters() if p.requires_grad) == expected


def test_bad_lora_settings_name_the_key() -> None:
    from moe.config import ConfigError

    for bad, key in ((LoRAConfig(rank=0), "lora.rank"), (LoRAConfig(targets=["mlp"]), "lora.targets"),
                     (LoRAConfig(dropout=1.0), "lora.dropout")):
        with pytest.raises(ConfigError, match=key):
            bad.validate()


@pytest.mark.parametrize("preset", ["tiny", "tiny-sigmoid"])
def test_peft_adapter_on_the_transformers_export_equals_our_merged_model(preset: str, tmp_path) -> None:
    """`PeftModel.from_pretrained(exported model, adapter dir)` gives our merged model's logits (1e-5)."""
    import transformers
    from peft import PeftModel

    from moe import hf as moe_hf
    from tests.moe.test_hf import PRESETS, trained_like

    base = trained_like(PRESETS[preset]())
    base_dir = moe_hf.export_hf(base, tmp_path / "hf")
    lora = LoRAConfig(rank=4, alpha=8.0)
    model, adapters = lora_model(base.cfg, lora)
    model.load_state_dict(base.state_dict(), strict=False)  # the base weights of the export, adapters random
    moe_hf.export_peft_adapter(model, adapters, lora.rank, lora.alpha, tmp_path / "adapter")
    x = tokens(model.cfg, batch=2, seq=24)
    merge_lora(model)
    with torch.no_grad():
        ours = model.eval()(x)
        hf = transformers.AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
        peft_model = PeftModel.from_pretrained(hf, tmp_path / "adapter").eval()
        theirs = peft_model(x).logits
        plain = transformers.AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)(x).logits
    assert (plain - ours).abs().max() > 1e-3  # the adapters change the logits
    torch.testing.assert_close(theirs, ours, atol=1e-5, rtol=1e-5)


def _ep2_finetune(rank: int, world: int, ckpt_dir: str) -> None:
    """Rank's side of `test_lora_under_ep2_equals_one_process`."""
    import torch.distributed as dist

    from moe.checkpoint import load_adapter_checkpoint, save_adapter_checkpoint
    from moe.lora import expert_adapter_offsets, shard_adapter_gradients
    from moe.model import materialize
    from moe.parallel.apply import parallelize
    from moe.parallel.mesh import ParallelDims
    from tests.moe.distributed import gather_full_state

    cfg = lora_model()[0].cfg
    lora = LoRAConfig(rank=4, alpha=8.0)
    x = tokens(cfg, batch=4, seq=13, seed=5)
    lo, hi = rank * 2, rank * 2 + 2

    def steps(model: torch.nn.Module, batch: torch.Tensor, sync=None) -> list[torch.Tensor]:
        params = [p for p in model.parameters() if p.requires_grad]
        for _ in range(3):
            logits = model(batch[:, :-1])
            loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), batch[:, 1:].flatten())
            loss.backward()
            if sync is not None:
                sync()
            with torch.no_grad():
                for p in params:
                    p -= 0.5 * p.grad
                    p.grad = None
        return params

    par = build_meta_model(cfg)
    plan = parallelize(par, ParallelDims.from_degrees(world, dp=1, ep=2, n_experts=cfg.moe.n_routed_experts), "cpu")
    materialize(par, "cpu", seed=0)
    apply_lora(par, lora, seed=0)
    shard_adapter_gradients(plan)
    steps(par, x[lo:hi], plan.sync_gradients)
    opt = torch.optim.SGD([p for p in par.parameters() if p.requires_grad], lr=0.1)
    save_adapter_checkpoint(par, opt, Path(ckpt_dir), {"step": 3}, rank)
    full = gather_full_state(par, plan.mesh.ep_group)
    for name in expert_adapter_offsets(par):  # expert adapters are sharded like the experts
        parts = [torch.empty_like(full[name]) for _ in range(world)]
        dist.all_gather(parts, full[name].contiguous(), group=plan.mesh.ep_group)
        full[name] = torch.cat(parts)
    serial = build_model(cfg, seed=0)
    apply_lora(serial, lora, seed=0)
    steps(serial, x)
    for name, value in serial.state_dict().items():
        torch.testing.assert_close(full[name], value, atol=1e-5, rtol=1e-5, msg=name)
    # the adapter-only checkpoint written under ep=2 loads into an unsharded model (global expert ids; each
    # rank reads the whole set: the load is collective)
    fresh = build_model(cfg, seed=0)
    apply_lora(fresh, lora, seed=1)
    load_adapter_checkpoint(fresh, torch.optim.SGD([p for p in fresh.parameters() if p.requires_grad], lr=0.1),
                            Path(ckpt_dir))
    for name, p in fresh.named_parameters():
        if p.requires_grad:
            torch.testing.assert_close(p, serial.get_parameter(name), atol=1e-5, rtol=1e-5, msg=name)


def test_lora_under_ep2_equals_one_process(tmp_path) -> None:
    """Adapters on a model whose experts are split over 2 gloo ranks (each with its own micro-batch)
    train to the one-process values on the global batch (1e-5), expert adapters included; their
    adapter-only checkpoint reshards to one process."""
    from tests.moe.distributed import spawn

    spawn(_ep2_finetune, 2, str(tmp_path))


def test_fused_adapter_kernels_with_dropout_masks_equal_autograd() -> None:
    """The fused adapter functions (`LoRAExperts`, `LoRALinear`; here with dropout masks on the
    low-rank inputs) give the output and the input, combine-weight and adapter gradients of plain
    autograd over the same formula; a model with dropout trains through them; unfrozen base weights
    are refused (the kernels compute no gradient for them)."""
    from moe.lora import LoRAExperts, LoRALinear

    model, adapters = lora_model()
    ad = adapters["layers.1.ffn.experts"]
    ex, s, h = ad.experts[0], ad.scale, ad.experts[0].hidden
    gen = torch.Generator().manual_seed(7)
    counts = [3, 0, 4, 2, 5, 1, 0, 5]
    n = sum(counts)
    x = torch.randn(10, ex.d_model, generator=gen).requires_grad_(True)
    token_N = torch.randint(0, 10, (n,), generator=gen)
    w_N = torch.rand(n, generator=gen).requires_grad_(True)
    masks = tuple(torch.empty(n, k).bernoulli_(0.7, generator=gen) / 0.7 for k in (ex.d_model, h))
    params = [x, w_N, ad.A13, ad.B13, ad.A2, ad.B2]
    out = LoRAExperts.apply(x, token_N, w_N, ad.A13, ad.B13, ad.A2, ad.B2, ex.w1, ex.w3, ex.w2, counts, s, masks, ad)
    g = torch.randn(out.shape, generator=gen)
    ours = torch.autograd.grad(out, params, g)
    ref, lo = torch.zeros_like(x), 0
    for e, c in enumerate(counts):
        rows = slice(lo, lo + c)
        x_n = x[token_N[rows]]
        z1 = (x_n * masks[0][rows]) @ ad.A13[e]
        hw = (torch.nn.functional.silu(x_n @ ex.w1[e] + s * z1 @ ad.B13[e, :, :h])
              * (x_n @ ex.w3[e] + s * z1 @ ad.B13[e, :, h:]) * w_N[rows, None])
        ref = ref.index_add(0, token_N[rows], hw @ ex.w2[e] + s * ((hw * masks[1][rows]) @ ad.A2[e]) @ ad.B2[e])
        lo += c
    torch.testing.assert_close(out, ref, atol=1e-6, rtol=1e-5)
    for p, mine, theirs in zip(("x", "w_N", "A13", "B13", "A2", "B2"), ours, torch.autograd.grad(ref, params, g),
                               strict=True):
        torch.testing.assert_close(mine, theirs, atol=1e-6, rtol=1e-5, msg=p)

    lin = adapters["layers.0.attn.wq"]
    base = model.get_submodule("layers.0.attn.wq")
    x = torch.randn(7, base.in_features, generator=gen).requires_grad_(True)
    mask = torch.empty(x.shape).bernoulli_(0.7, generator=gen) / 0.7
    out = LoRALinear.apply(x, base.weight, None, lin.A, lin.B, lin.scale, mask, None)
    ref = x @ base.weight.t() + lin.scale * ((x * mask) @ lin.A.t()) @ lin.B.t()
    torch.testing.assert_close(out, ref, atol=1e-6, rtol=1e-5)
    g = torch.randn(out.shape, generator=gen)
    for p, mine, theirs in zip(("x", "A", "B"), torch.autograd.grad(out, [x, lin.A, lin.B], g),
                               torch.autograd.grad(ref, [x, lin.A, lin.B], g), strict=True):
        torch.testing.assert_close(mine, theirs, atol=1e-6, rtol=1e-5, msg=p)

    dropped, _ = lora_model(lora=LoRAConfig(rank=4, alpha=8.0, dropout=0.3))
    x_tok = tokens(dropped.cfg)
    dropped.train()(x_tok).sum().backward()
    assert all(p.grad.abs().sum() > 0 for n, p in dropped.named_parameters() if n.endswith(("A13", "lora.A")))
    for frozen in ("layers.1.ffn.experts.w1", "layers.0.attn.wq.weight"):
        dropped.get_parameter(frozen).requires_grad_(True)
        with pytest.raises(ValueError, match="remove_lora"):
            dropped(x_tok)
        dropped.get_parameter(frozen).requires_grad_(False)
