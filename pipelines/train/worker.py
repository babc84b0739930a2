"""The Ray Train worker: `Trainer`, one rank's training as named steps.

    setup       build the model on the meta device, parallelize it, materialize only the local
                shards; optimizer and schedule; resume from the latest checkpoint or start fresh
    train_step  one optimizer step on one micro-batch (forward, backward, gradient sync, clip,
                step, load balancing); under pp the pipeline schedule (gpipe, 1f1b, interleaved)
                runs forward and backward over the microbatches (`_forward_backward`)
    log         the metrics of the steps since the last log (collective; under pp the loss, loads,
                drops and aux losses cover every stage)
    evaluate    the validation loss (collective; under pp through the schedule's forward-only path)
    save        a distributed checkpoint of model, optimizer, schedule and data position, reported
                with the metrics
`fit` runs them: setup, then steps until `train.steps`, logging every `log_every`, evaluating every
`eval_every`, saving every `checkpoint_every` and at the end. A restart (a killed worker, a
resized cluster) resumes from the latest checkpoint with the same or a different number of
workers and neither repeats nor skips a sequence (which sequences the epoch consumed is saved).
Every `log_every` steps all ranks call `ray.train.report` (rank 0's metrics are the run's).
"""

from __future__ import annotations

import dataclasses
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import ray.train
import torch
import torch.distributed as dist

from cluster.profiles import torch_dtype, uses_gpu
from moe.checkpoint import load_checkpoint, save_checkpoint
from moe.experts import accumulate_expert_grads_in_place
from moe.flops import measure_matmul_peak, mfu
from moe.loss import IGNORE_INDEX, token_loss_sum
from moe.model import build_meta_model, materialize
from moe.parallel.apply import parallelize
from moe.parallel.mesh import ParallelDims
from pipelines.data.ingest import ConsumedSet, iter_batches
from pipelines.train.collectives import all_gather_cat, all_reduce_
from pipelines.train.config import TrainConfig, pipeline_config
from pipelines.train.evaluation import Evaluator, autocast
from pipelines.train.optim import build_optimizer, build_schedule


@dataclass
class TrainerState:
    """Everything besides tensors that a resume needs; identical on all ranks."""

    step: int = 0
    epoch: int = 0
    consumed: dict[str, Any] | None = None  # ConsumedSet.state_dict() of the current epoch
    tokens_seen: int = 0
    restarts: int = 0  # how many times this run resumed from a checkpoint (failures, elastic resizes)
    expert_load: list[list[float]] = field(default_factory=list)  # cumulative routed tokens, layer x expert


@dataclass
class StepStats:
    """What one `train_step` measured (the global batch's loss and tokens; aux losses over all stages)."""

    loss: float
    aux_loss: float
    z_loss: float
    grad_norm: float
    tokens: int
    loads: dict[str, torch.Tensor]  # per MoE layer: global routed assignments per expert this step


class MetricsWindow:
    """Sums of `StepStats` since the last log, and when the window started."""

    def __init__(self) -> None:
        self.steps, self.tokens = 0, 0
        self.sums = {"loss": 0.0, "aux_loss": 0.0, "z_loss": 0.0, "grad_norm": 0.0}
        self.start = time.perf_counter()

    def add(self, s: StepStats) -> None:
        self.steps += 1
        self.tokens += s.tokens
        for key in self.sums:
            self.sums[key] += getattr(s, key)

    def mean(self, key: str) -> float:
        return self.sums[key] / max(1, self.steps)

    def tokens_per_s(self) -> float:
        return self.tokens / max(time.perf_counter() - self.start, 1e-9)


class Trainer:
    """One rank's training run; every public method is collective (all ranks call it in step)."""

    def __init__(self, cfg: TrainConfig, n_train_sequences: int, n_val_sequences: int) -> None:
        self.cfg, self.n_train_sequences = cfg, n_train_sequences
        ctx = ray.train.get_context()
        self.rank, self.world = ctx.get_world_rank(), ctx.get_world_size()
        self.device = ray.train.torch.get_device() if uses_gpu(cfg.cluster) else torch.device("cpu")
        self.evaluator = Evaluator(cfg, self.device, n_val_sequences)

    # ---- setup ------------------------------------------------------------------------------------
    def setup(self) -> None:
        """Model (meta -> parallelize -> materialize local shards), optimizer, schedule, state, data."""
        cfg = self.cfg
        torch.set_num_threads(cfg.train.num_threads or max(1, int(cfg.cluster.cpus_per_worker)))
        torch.manual_seed(cfg.train.seed + self.rank)
        dims = ParallelDims.from_degrees(self.world, cfg.parallel.dp, cfg.parallel.ep, cfg.parallel.pp,
                                         cfg.model.moe.n_routed_experts)
        self.dims, self.data_rank = dims, dims.data_rank(self.rank)  # a pipeline's ranks share one data rank
        self.build_model(dims)
        self.opt = build_optimizer(self.model, cfg.optim)
        self.sched = build_schedule(self.opt, cfg.optim, cfg.train.steps)
        self.state = self._resume() or TrainerState()
        self.moe_names = self.plan.moe_layer_names  # the whole model's, whichever stages this rank holds
        self.load_matrix = torch.tensor(self.state.expert_load, dtype=torch.float64) if self.state.expert_load \
            else torch.zeros(len(self.moe_names), cfg.model.moe.n_routed_experts, dtype=torch.float64)
        peak = cfg.cluster.peak_tflops * 1e12 if cfg.cluster.peak_tflops else measure_matmul_peak()
        self.peak_total = float(all_reduce_(torch.tensor([peak], dtype=torch.float64))[0])
        self.shard = ray.train.get_dataset_shard("train")
        self._start_epoch(ConsumedSet.from_state_dict(self.state.consumed) if self.state.consumed
                          else ConsumedSet(self.n_train_sequences))
        self.model.train()

    def build_model(self, dims: ParallelDims) -> None:
        """`self.model` (this rank's shards, initialized) and `self.plan`: meta -> parallelize ->
        materialize. A seam: fine-tuning (pipelines/finetune) loads base weights and adds adapters here."""
        cfg = self.cfg
        self.model = build_meta_model(cfg.model)
        self.plan = parallelize(self.model, dims, device_type=self.device.type, pipeline=pipeline_config(cfg.parallel))
        materialize(self.model, self.device, seed=cfg.train.seed)
        accumulate_expert_grads_in_place(self.model)  # gradients stay allocated across steps (zero_grad below)

    def write_checkpoint(self, directory: Path, extra: dict[str, Any]) -> None:
        """Collective: this rank's part of a checkpoint (a seam: fine-tuning writes adapters only)."""
        save_checkpoint(self.model, self.opt, directory, extra, self.rank)

    def read_checkpoint(self, directory: Path) -> dict[str, Any]:
        """Collective: fill model and optimizer from `directory`; returns the saved `extra` (a seam)."""
        return load_checkpoint(self.model, self.opt, directory)

    def _resume(self) -> TrainerState | None:
        ckpt = ray.train.get_checkpoint()
        if ckpt is None:
            return None
        with ckpt.as_directory() as d:
            extra = self.read_checkpoint(Path(d))
        self.sched.load_state_dict(extra["scheduler"])
        state = TrainerState(**extra["trainer"])
        state.restarts += 1
        if self.rank == 0:
            print(f"[train] resumed at step {state.step} (epoch {state.epoch}, world size {self.world})",
                  flush=True)
        return state

    def _start_epoch(self, consumed: ConsumedSet) -> None:
        """This rank's batches of the epoch: not yet consumed, mixed through a seeded local shuffle buffer."""
        t = self.cfg.train
        self.consumed = consumed
        seed = t.seed + 1000 * self.state.epoch + self.rank
        per_rank = t.micro_batch_size // self.dims.pp  # a pipeline's ranks each read their share of its batch
        self.batches: Iterator[dict[str, torch.Tensor]] = iter(
            iter_batches(self.shard, per_rank, consumed, t.shuffle_buffer, seed))

    def next_batch(self) -> dict[str, torch.Tensor]:
        """The next micro-batch; when any rank runs out, every rank starts the next epoch together.
        Under pp the ranks of a pipeline gather their shares: all of them get the pipeline's batch
        ("seq_id" stays this rank's own share, which is what it marks consumed)."""
        while True:
            batch = next(self.batches, None)
            have = all_reduce_(torch.tensor([0 if batch is None else 1]), dist.ReduceOp.MIN)
            if int(have[0]) == 1:
                break
            self.state.epoch += 1
            self._start_epoch(ConsumedSet(self.n_train_sequences))
        group = self.plan.mesh.pp_group
        if group is not None:
            for key in ("tokens", "loss_mask"):
                parts = [torch.empty_like(batch[key]) for _ in range(self.dims.pp)]
                dist.all_gather(parts, batch[key], group=group)
                batch[key] = torch.cat(parts)
        return batch

    # ---- one step ---------------------------------------------------------------------------------
    def train_step(self, batch: dict[str, torch.Tensor]) -> StepStats:
        """Forward, backward, gradient sync, clipping, optimizer and schedule step, load balancing.

        The loss is the sum of the global batch's valid token losses divided by their count: each data
        rank scales its sum by n_data / count so that the data-parallel gradient average yields it."""
        tokens, mask = batch["tokens"].to(self.device), batch["loss_mask"].to(self.device)
        targets = torch.where(mask[:, 1:] > 0, tokens[:, 1:], IGNORE_INDEX)
        n_data = self.dims.data_ranks
        count = (targets != IGNORE_INDEX).sum().to(torch.float64)
        if self.plan.distributed:  # the stage's dp*ep ranks hold every data rank's batch once
            dist.all_reduce(count, group=self.plan.mesh.stage_group)
        count = count.clamp(min=1)
        ce_sum = self._forward_backward(tokens[:, :-1], targets, float(n_data / count))
        loss = all_reduce_(torch.zeros(1, dtype=torch.float64) if ce_sum is None
                           else (ce_sum.detach().double().cpu() / count.cpu()).reshape(1))
        self.plan.sync_gradients()
        grad_norm = self.plan.clip_grad_norm_(self.cfg.optim.grad_clip)
        self.opt.step()
        self.sched.step()
        self.opt.zero_grad(set_to_none=False)
        loads = self.plan.reduce_expert_loads()
        self.plan.update_expert_bias(loads)
        loads = self.plan.gather_over_pipeline(loads, torch.zeros(self.cfg.model.moe.n_routed_experts,
                                                                  device=self.device))
        if loads:
            self.load_matrix += torch.stack([loads[n].double().cpu() for n in self.moe_names])
        self.consumed.add(all_gather_cat(batch["seq_id"].to(self.device)).cpu())
        step_tokens = tokens[:, :-1].numel() * n_data  # data-parallel ranks only: a pipeline shares its batch
        self.state.step += 1
        self.state.tokens_seen += step_tokens
        aux = self.plan.aux_losses()
        return StepStats(loss=float(loss[0]), aux_loss=aux["aux_loss"], z_loss=aux["z_loss"],
                         grad_norm=float(grad_norm), tokens=step_tokens, loads=loads)

    def _forward_backward(self, inputs: torch.Tensor, targets: torch.Tensor, scale: float) -> torch.Tensor | None:
        """Backward of scale * (sum of this rank's token losses); returns that unscaled sum (None on a
        pipeline rank without the last stage). Under pp the schedule runs every microbatch."""
        with autocast(self.cfg, self.device):
            if self.plan.pipeline is not None:
                scaled = self.plan.pipeline.step(inputs, targets, loss_scale=scale, dtypes=self._pp_dtypes())
                return None if scaled is None else scaled / scale
            logits = self.model(inputs)
        ce_sum = token_loss_sum(logits, targets)
        (ce_sum * scale).backward()
        return ce_sum

    def _pp_dtypes(self) -> tuple[torch.dtype, torch.dtype]:
        """(activations, logits) between stages: the residual stream stays fp32, logits follow autocast."""
        dtype = torch_dtype(self.cfg.cluster)
        return torch.float32, dtype

    # ---- log, evaluate, save ----------------------------------------------------------------------
    def log(self, window: MetricsWindow, last: StepStats, eta_s: float) -> dict[str, Any]:
        """Metrics of the window (train loss averaged over ranks), throughput, MFU, expert load and drops."""
        cfg, state = self.cfg, self.state
        tokens_per_s = window.tokens_per_s()
        metrics: dict[str, Any] = {
            "step": state.step, "epoch": state.epoch,
            "train/loss": window.mean("loss"),  # already the global batch's (train_step)
            "train/aux_loss": window.mean("aux_loss"), "train/z_loss": window.mean("z_loss"),
            "train/grad_norm": window.mean("grad_norm"), "train/lr": self.sched.get_last_lr()[0],
            "perf/tokens_per_s": tokens_per_s,
            "perf/mfu": mfu(tokens_per_s, cfg.model, cfg.data.seq_len, self.peak_total),
            "perf/tokens_seen": state.tokens_seen, "world_size": self.world,
            "data/consumed_sequences": len(self.consumed), "train/restarts": state.restarts, "eta_s": eta_s,
        }
        dropped = self.plan.reduce_dropped_fractions()
        for name in self.moe_names:
            if last.loads:
                share = last.loads[name].double() / last.loads[name].sum().clamp(min=1)
                metrics[f"moe/layer{name}/max_load"] = float(share.max() * share.numel())
                metrics[f"moe/layer{name}/min_load"] = float(share.min() * share.numel())
            metrics[f"moe/layer{name}/dropped_frac"] = dropped[name]
        return metrics

    def evaluate(self) -> float:
        return self.evaluator(self.model, self.data_rank, self.dims.data_ranks, self.plan.pipeline)

    def save(self, metrics: dict[str, Any]) -> None:
        """Write this rank's part of a checkpoint and report it with `metrics`."""
        self.state.consumed = self.consumed.state_dict()
        self.state.expert_load = self.load_matrix.tolist()
        with tempfile.TemporaryDirectory(prefix="moe-ckpt-") as tmp:
            extra = {"trainer": dataclasses.asdict(self.state), "scheduler": self.sched.state_dict()}
            self.write_checkpoint(Path(tmp), extra)
            ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp))

    # ---- the loop ---------------------------------------------------------------------------------
    def fit(self) -> None:
        self.setup()
        t, state = self.cfg.train, self.state
        if state.step == 0:  # the starting point of the validation curve
            ray.train.report({"step": 0, "val/loss": self.evaluate(), "world_size": self.world})
        window, run_start, start_step = MetricsWindow(), time.perf_counter(), state.step
        while state.step < t.steps:
            stats = self.train_step(self.next_batch())
            window.add(stats)
            last = state.step == t.steps
            if not (state.step % t.log_every == 0 or last):
                continue
            eta = (t.steps - state.step) * (time.perf_counter() - run_start) / max(1, state.step - start_step)
            metrics = self.log(window, stats, eta)
            if state.step % t.eval_every == 0 or last:
                metrics["val/loss"] = self.evaluate()
            if last:
                metrics["expert_load"] = self.load_matrix.tolist()
                metrics["moe_layers"] = self.moe_names
            if state.step % t.checkpoint_every == 0 or last:
                self.save(metrics)
            else:
                ray.train.report(metrics)
            window = MetricsWindow()
        if self.rank == 0:
            print(f"[train] done: {state.step} steps, {state.tokens_seen:,} tokens", flush=True)


def train_loop_per_worker(config: dict[str, Any]) -> None:
    """Ray Train's entry on every worker."""
    Trainer(config["cfg"], config["n_train_sequences"], config["n_val_sequences"]).fit()
