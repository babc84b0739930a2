"""The Ray Train worker: build the model, apply parallelism, stream batches, step, report.

`train_loop_per_worker(config)` runs on every worker. It restores model, optimizer, schedule
and the data position (which sequences the current epoch has consumed) from the latest
distributed checkpoint, so a restart, with the same or a different number of workers, neither
repeats nor skips a sequence. Every `log_every` steps all ranks call `ray.train.report` (rank 0's
metrics are the run's); every `checkpoint_every` steps and at the end each rank writes its part
of a torch.distributed.checkpoint into the reported checkpoint.
"""

from __future__ import annotations

import dataclasses
import math
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import ray.train
import torch
import torch.distributed as dist
import torch.nn.functional as F

from cluster.profiles import torch_dtype, uses_gpu
from moe.experts import accumulate_expert_grads_in_place
from moe.flops import measure_matmul_peak, mfu
from moe.model import MoETransformer, build_model
from moe.parallel.apply import ParallelPlan, parallelize
from moe.parallel.mesh import ParallelDims
from pipelines.checkpointing import load_checkpoint, save_checkpoint
from pipelines.data.ingest import ConsumedSet, iter_batches
from pipelines.train.config import OptimConfig, TrainConfig


@dataclass
class TrainerState:
    """Everything besides tensors that a resume needs; identical on all ranks."""

    step: int = 0
    epoch: int = 0
    consumed: dict[str, Any] | None = None  # ConsumedSet.state_dict() of the current epoch
    tokens_seen: int = 0
    restarts: int = 0  # how many times this run resumed from a checkpoint (failures, elastic resizes)
    expert_load: list[list[float]] = field(default_factory=list)  # cumulative routed tokens, layer x expert


def lr_lambda(optim: OptimConfig, total_steps: int):
    """Linear warmup to 1, then cosine decay to `min_lr_ratio` at `total_steps`."""

    def factor(step: int) -> float:
        if optim.warmup_steps and step < optim.warmup_steps:
            return (step + 1) / optim.warmup_steps
        progress = min(1.0, (step - optim.warmup_steps) / max(1, total_steps - optim.warmup_steps))
        return optim.min_lr_ratio + (1 - optim.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return factor


def build_optimizer(model: torch.nn.Module, optim: OptimConfig) -> torch.optim.Optimizer:
    """AdamW; weight decay on matrices only (not norms, biases or the router bias buffer)."""
    decay = [p for p in model.parameters() if p.requires_grad and p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.ndim < 2]
    groups = [{"params": decay, "weight_decay": optim.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=optim.lr, betas=(optim.beta1, optim.beta2), eps=optim.eps)


def masked_lm_loss(logits_BTV: torch.Tensor, tokens_BT1: torch.Tensor, mask_BT1: torch.Tensor) -> torch.Tensor:
    """Next-token cross entropy over positions whose target is marked in the loss mask."""
    targets_BT = tokens_BT1[:, 1:]
    mask_BT = mask_BT1[:, 1:].to(logits_BTV.dtype)
    ce_BT = F.cross_entropy(logits_BTV.float().flatten(0, 1), targets_BT.flatten(), reduction="none")
    return (ce_BT.view_as(mask_BT) * mask_BT).sum() / mask_BT.sum().clamp(min=1)


def _all_reduce_(t: torch.Tensor, op: dist.ReduceOp = dist.ReduceOp.SUM) -> torch.Tensor:
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(t, op=op)
    return t


def _all_gather_ids(ids: torch.Tensor) -> torch.Tensor:
    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return ids
    out = [torch.empty_like(ids) for _ in range(dist.get_world_size())]
    dist.all_gather(out, ids)
    return torch.cat(out)


class Evaluator:
    """Mean validation loss over a fixed sample of the validation split, read once and kept, so every
    point of the validation curve measures the same sequences. The sample takes evenly spaced
    seq_ids across the whole split (not its first rows, which may all come from one document),
    dealt out to the ranks by seq_id."""

    def __init__(self, cfg: TrainConfig, device: torch.device, n_val_sequences: int) -> None:
        self.cfg, self.device, self.n_val_sequences = cfg, device, n_val_sequences
        self._batches: list[dict[str, torch.Tensor]] | None = None

    def _load(self, rank: int, world: int) -> list[dict[str, torch.Tensor]]:
        b = self.cfg.train.micro_batch_size
        # whole batches on every rank: under expert parallelism each forward is a collective
        n_sample = min(self.n_val_sequences, self.cfg.train.eval_batches * world * b) // (world * b) * (world * b)
        chosen = torch.linspace(0, self.n_val_sequences - 1, n_sample).round().long().unique()
        keep = torch.zeros(self.n_val_sequences, dtype=torch.bool)
        keep[chosen[rank::world]] = True  # by seq_id, so the ranks' shares never depend on read order
        skip = ConsumedSet(self.n_val_sequences)  # everything outside this rank's share counts as "consumed"
        skip.add(torch.nonzero(~keep).flatten())
        return list(iter_batches(ray.train.get_dataset_shard("val"), b, skip))

    @torch.no_grad()
    def __call__(self, model: MoETransformer, rank: int, world: int) -> float:
        if self._batches is None:
            self._batches = self._load(rank, world)
        model.eval()
        loss_sum = torch.zeros(2, dtype=torch.float64)
        for batch in self._batches:
            tokens, mask = batch["tokens"].to(self.device), batch["loss_mask"].to(self.device)
            with _autocast(self.cfg, self.device):
                logits = model(tokens[:, :-1])
            n = float(mask[:, 1:].sum())
            loss_sum += torch.tensor([float(masked_lm_loss(logits, tokens, mask)) * n, n], dtype=torch.float64)
        model.train()
        _all_reduce_(loss_sum)
        return float(loss_sum[0] / loss_sum[1]) if loss_sum[1] > 0 else float("nan")


def train_batches(cfg: TrainConfig, shard: Any, consumed: ConsumedSet, epoch: int, rank: int):
    """This rank's batches of the epoch: not yet consumed, mixed through a seeded local shuffle buffer."""
    seed = cfg.train.seed + 1000 * epoch + rank
    return iter_batches(shard, cfg.train.micro_batch_size, consumed, cfg.train.shuffle_buffer, seed)


def _autocast(cfg: TrainConfig, device: torch.device):
    dtype = torch_dtype(cfg.cluster)
    enabled = dtype != torch.float32
    return torch.autocast(device_type=device.type, dtype=dtype, enabled=enabled)


def train_loop_per_worker(config: dict[str, Any]) -> None:
    cfg: TrainConfig = config["cfg"]
    n_train_sequences: int = config["n_train_sequences"]
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device() if uses_gpu(cfg.cluster) else torch.device("cpu")
    threads = cfg.train.num_threads or max(1, int(cfg.cluster.cpus_per_worker))
    torch.set_num_threads(threads)
    torch.manual_seed(cfg.train.seed + rank)

    dims = ParallelDims.from_degrees(world, cfg.parallel.dp, cfg.parallel.ep, cfg.parallel.pp,
                                     cfg.model.moe.n_routed_experts)
    model = build_model(cfg.model, device=device, seed=cfg.train.seed)
    plan: ParallelPlan = parallelize(model, dims, device_type=device.type)
    accumulate_expert_grads_in_place(model)  # gradients stay allocated across steps (zero_grad below)
    opt = build_optimizer(model, cfg.optim)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(cfg.optim, cfg.train.steps))

    state = TrainerState()
    ckpt = ray.train.get_checkpoint()
    if ckpt is not None:
        with ckpt.as_directory() as d:
            extra = load_checkpoint(model, opt, Path(d))
        sched.load_state_dict(extra["scheduler"])
        state = TrainerState(**extra["trainer"])
        state.restarts += 1
        if rank == 0:
            print(f"[train] resumed at step {state.step} (epoch {state.epoch}, world size {world})", flush=True)
    consumed = ConsumedSet.from_state_dict(state.consumed) if state.consumed else ConsumedSet(n_train_sequences)
    moe_names = list(model.moe_layers())
    load_matrix = torch.tensor(state.expert_load) if state.expert_load else torch.zeros(
        len(moe_names), cfg.model.moe.n_routed_experts, dtype=torch.float64)

    peak = cfg.cluster.peak_tflops * 1e12 if cfg.cluster.peak_tflops else measure_matmul_peak()
    peak_total = float(_all_reduce_(torch.tensor([peak], dtype=torch.float64))[0])
    evaluator = Evaluator(cfg, device, config["n_val_sequences"])
    shard = ray.train.get_dataset_shard("train")
    batches = iter(train_batches(cfg, shard, consumed, state.epoch, rank))
    seq_len = cfg.data.seq_len
    window = {"loss": 0.0, "aux": 0.0, "z": 0.0, "grad_norm": 0.0, "steps": 0, "tokens": 0}
    window_start = time.perf_counter()
    run_start, start_step = time.perf_counter(), state.step
    model.train()
    if state.step == 0:  # the starting point of the validation curve
        ray.train.report({"step": 0, "val/loss": evaluator(model, rank, world), "world_size": world})

    while state.step < cfg.train.steps:
        batch = next(batches, None)
        have = _all_reduce_(torch.tensor([0 if batch is None else 1]), dist.ReduceOp.MIN)
        if int(have[0]) == 0:  # some rank ran out: every rank starts the next epoch together
            state.epoch += 1
            consumed = ConsumedSet(n_train_sequences)
            batches = iter(train_batches(cfg, shard, consumed, state.epoch, rank))
            continue
        tokens, mask = batch["tokens"].to(device), batch["loss_mask"].to(device)
        with _autocast(cfg, device):
            logits = model(tokens[:, :-1])
        loss = masked_lm_loss(logits, tokens, mask)
        loss.backward()
        plan.sync_gradients()
        grad_norm = plan.clip_grad_norm_(cfg.optim.grad_clip)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=False)
        loads = plan.reduce_expert_loads()
        plan.update_expert_bias(loads)
        if loads:
            load_matrix += torch.stack([loads[n].double().cpu() for n in moe_names])
        consumed.add(_all_gather_ids(batch["seq_id"].to(device)).cpu())
        state.step += 1
        step_tokens = tokens[:, :-1].numel() * world
        state.tokens_seen += step_tokens
        aux = model.aux_losses()
        window["loss"] += float(loss.detach())
        window["aux"] += aux["aux_loss"]
        window["z"] += aux["z_loss"]
        window["grad_norm"] += float(grad_norm)
        window["steps"] += 1
        window["tokens"] += step_tokens

        last = state.step == cfg.train.steps
        if state.step % cfg.train.log_every == 0 or last:
            elapsed = time.perf_counter() - window_start
            n = window["steps"]
            tokens_per_s = window["tokens"] / max(elapsed, 1e-9)
            metrics: dict[str, Any] = {
                "step": state.step, "epoch": state.epoch,
                "train/loss": float(_all_reduce_(torch.tensor([window["loss"] / n])) / world),
                "train/aux_loss": window["aux"] / n, "train/z_loss": window["z"] / n,
                "train/grad_norm": window["grad_norm"] / n, "train/lr": sched.get_last_lr()[0],
                "perf/tokens_per_s": tokens_per_s,
                "perf/mfu": mfu(tokens_per_s, cfg.model, seq_len, peak_total),
                "perf/tokens_seen": state.tokens_seen, "world_size": world,
                "data/consumed_sequences": len(consumed), "train/restarts": state.restarts,
                "eta_s": (cfg.train.steps - state.step) * (time.perf_counter() - run_start)
                / max(1, state.step - start_step),
            }
            dropped = plan.reduce_dropped_fractions()
            for name in moe_names:
                share = loads[name].double() / loads[name].sum().clamp(min=1) if loads else None
                if share is not None:
                    metrics[f"moe/layer{name}/max_load"] = float(share.max() * share.numel())
                    metrics[f"moe/layer{name}/min_load"] = float(share.min() * share.numel())
                metrics[f"moe/layer{name}/dropped_frac"] = dropped[name]
            if state.step % cfg.train.eval_every == 0 or last:
                metrics["val/loss"] = evaluator(model, rank, world)
            state.consumed = consumed.state_dict()
            state.expert_load = load_matrix.tolist()
            if last:
                metrics["expert_load"] = state.expert_load
                metrics["moe_layers"] = moe_names
            if state.step % cfg.train.checkpoint_every == 0 or last:
                with tempfile.TemporaryDirectory(prefix="moe-ckpt-") as tmp:
                    extra = {"trainer": dataclasses.asdict(state), "scheduler": sched.state_dict()}
                    save_checkpoint(model, opt, Path(tmp), extra, rank)
                    ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp))
            else:
                ray.train.report(metrics)
            window = dict.fromkeys(window, 0)
            window_start = time.perf_counter()
    if rank == 0:
        print(f"[train] done: {state.step} steps, {state.tokens_seen:,} tokens", flush=True)

