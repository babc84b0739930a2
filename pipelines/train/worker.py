"""The Ray Train worker: `Trainer`, one rank's training as named steps.

    setup       the layout of this world size (pipelines/train/layout.py); build the model on the
                meta device, parallelize it, materialize only the local shards; optimizer and
                schedule; resume from the latest good checkpoint (falling back past damaged ones)
                or start fresh; the CPU matmul peak for MFU (measured once per run and host,
                `cached_matmul_peak`). Each phase is marked in `StartTimeline` (pipelines/train/timeline.py)
    train_step  one optimizer step on the step's global batch: this data rank's slice, in
                `accumulation` micro-batches (forward, backward), then gradient sync, clip, step,
                load balancing; under pp the pipeline schedule (gpipe, 1f1b, interleaved) runs
                forward and backward over each micro-batch's microbatches (`_forward_backward`)
    log         the metrics of the steps since the last log (collective; under pp the loss, loads,
                drops and aux losses cover every stage)
    evaluate    the validation loss (collective; under pp through the schedule's forward-only path)
    save        an atomic, checksummed checkpoint (moe.checkpoint.CheckpointStore) of model,
                optimizer, schedule, every rank's RNG state and the sample ledger
`fit` runs them: setup, then steps until `train.steps`, logging every `log_every` (the first step
after a resume also reports when it completed and what happened), evaluating every `eval_every`, saving every `checkpoint_every` and at the end.
The data position is the step: step s trains the s-th global batch of the order that seed and epoch
define (pipelines/data/ingest.py), at every world size. A restart (a killed worker, a lost or
returned node, `train.resume`) resumes from the latest good checkpoint with its world size's layout;
at the same size the result is bitwise that of an uninterrupted run. All ranks call
`ray.train.report` (rank 0's metrics are the run's; `checkpoint/step` marks a committed checkpoint,
`restart/*` the first report after a resume).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import socket
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import ray.train
import torch
import torch.distributed as dist

from cluster.profiles import torch_dtype, uses_gpu
from moe.checkpoint import CheckpointStore, load_checkpoint, save_checkpoint
from moe.experts import accumulate_expert_grads_in_place
from moe.flops import measure_matmul_peak, mfu
from moe.loss import IGNORE_INDEX, token_loss_sum
from moe.model import build_meta_model, materialize
from moe.parallel.apply import parallelize
from moe.parallel.mesh import ParallelDims
from pipelines.data.ingest import GlobalOrder, SampleLedger, SplitReader, index_split, rank_slice
from pipelines.train.collectives import all_gather_cat, all_reduce_, broadcast_object
from pipelines.train.config import TrainConfig, layout_at, pipeline_config
from pipelines.train.evaluation import Evaluator, autocast
from pipelines.train.optim import build_optimizer, build_schedule
from pipelines.train.progress import METRICS_FILE, scalar_metrics
from pipelines.train.timeline import StartTimeline

IMPORTED_AT = time.time()  # the end of the `import` phase of this process's start (pipelines/train/timeline.py)
LEDGER_FILE = "ledger.npy"
PEAK_DIR = "matmul_peak"  # in the run directory: the measured CPU matmul peak per host and thread count
log = logging.getLogger(__name__)


@dataclass
class TrainerState:
    """Everything besides tensors that a resume needs; identical on all ranks."""

    step: int = 0  # also the data position: the next step trains GlobalOrder.step_ids(step)
    tokens_seen: int = 0
    restarts: int = 0  # how many times this run resumed from a checkpoint (failures, elastic resizes)
    world_size: int = 0  # the world size that wrote the checkpoint
    expert_load: list[list[float]] = field(default_factory=list)  # cumulative routed tokens, layer x expert
    rng: list[torch.Tensor] = field(default_factory=list)  # every rank's torch RNG state, by rank
    moe_layers: list[str] = field(default_factory=list)  # the rows of expert_load


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


def cached_matmul_peak(run_dir: Path) -> float:
    """This process's CPU matmul peak (`moe.flops.measure_matmul_peak`), measured once per run, host and
    thread count and kept in `run_dir/matmul_peak/`: a restart reads it instead of measuring again (about
    a second), and MFU stays comparable across restarts."""
    path = run_dir / PEAK_DIR / f"{socket.gethostname()}-{torch.get_num_threads()}threads.json"
    try:
        cached = float(json.loads(path.read_text())["flops"])
        if math.isfinite(cached) and cached > 0:
            return cached
    except (OSError, ValueError, KeyError, TypeError):
        pass  # not measured yet on this host (or an unreadable file): measure
    peak = measure_matmul_peak()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps({"flops": peak}))
    os.replace(tmp, path)  # the ranks of one host may race; each writes a whole file
    return peak


class Trainer:
    """One rank's training run; every public method is collective (all ranks call it in step).

    `dataset_dir` holds the preprocessed splits, `checkpoint_dir` the run's `CheckpointStore`."""

    def __init__(self, cfg: TrainConfig, dataset_dir: Path, checkpoint_dir: Path, n_val_sequences: int) -> None:
        self.timeline = StartTimeline(IMPORTED_AT)
        self.timeline.mark("handoff")
        self.cfg, self.dataset_dir = cfg, Path(dataset_dir)
        self.store = CheckpointStore(Path(checkpoint_dir), keep=cfg.train.keep_checkpoints)
        ctx = ray.train.get_context()
        self.rank, self.world = ctx.get_world_rank(), ctx.get_world_size()
        self.layout = layout_at(cfg, self.world)
        self.device = ray.train.torch.get_device() if uses_gpu(cfg.cluster) else torch.device("cpu")
        self.evaluator = Evaluator(cfg, self.device, n_val_sequences, dataset_dir)
        self.restart_info: dict[str, Any] | None = None  # reported with the first step after a resume
        self.history: list[dict[str, Any]] = []  # the reported metric rows of this trajectory (checkpointed)

    # ---- setup ------------------------------------------------------------------------------------
    def setup(self) -> None:
        """Model (meta -> parallelize -> materialize local shards), optimizer, schedule, state, data."""
        cfg = self.cfg
        torch.set_num_threads(cfg.train.num_threads or max(1, int(cfg.cluster.cpus_per_worker)))
        torch.manual_seed(cfg.train.seed + self.rank)
        dims = self.layout.dims
        self.dims, self.data_rank = dims, dims.data_rank(self.rank)  # a pipeline's ranks share one data rank
        self.build_model(dims)
        self.timeline.mark("model")
        self.opt = build_optimizer(self.model, cfg.optim)
        self.sched = build_schedule(self.opt, cfg.optim, cfg.train.steps)
        groups = index_split(self.dataset_dir, "train")
        self.order = GlobalOrder(groups, cfg.train.seed, self.layout.global_batch, cfg.train.shuffle_window)
        self.reader = SplitReader(groups, cache_groups=2 * cfg.train.shuffle_window)
        self.ledger = SampleLedger()
        self.timeline.mark("optimizer_data")
        self.state = self._resume() or TrainerState()
        self.moe_names = self.plan.moe_layer_names  # the whole model's, whichever stages this rank holds
        self.load_matrix = torch.tensor(self.state.expert_load, dtype=torch.float64) if self.state.expert_load \
            else torch.zeros(len(self.moe_names), cfg.model.moe.n_routed_experts, dtype=torch.float64)
        peak = cfg.cluster.peak_tflops * 1e12 if cfg.cluster.peak_tflops else cached_matmul_peak(self.store.root.parent)
        self.peak_total = float(all_reduce_(torch.tensor([peak], dtype=torch.float64))[0])
        self.timeline.mark("matmul_peak")
        if len(self.state.rng) == self.world:  # same size: every rank continues its own random stream
            torch.set_rng_state(self.state.rng[self.rank].to(torch.uint8).contiguous().clone())
        self.model.train()

    def build_model(self, dims: ParallelDims) -> None:
        """`self.model` (this rank's shards, initialized) and `self.plan`: meta -> parallelize ->
        materialize. A seam: fine-tuning (pipelines/finetune) loads base weights and adds adapters here."""
        cfg = self.cfg
        self.model = build_meta_model(cfg.model)
        self.plan = parallelize(self.model, dims, device_type=self.device.type, pipeline=pipeline_config(cfg.parallel),
                                activation_checkpointing=cfg.train.activation_checkpointing)
        materialize(self.model, self.device, seed=cfg.train.seed)
        accumulate_expert_grads_in_place(self.model)  # gradients stay allocated across steps (zero_grad below)

    def write_checkpoint(self, directory: Path, extra: dict[str, Any]) -> None:
        """Collective: this rank's part of a checkpoint (a seam: fine-tuning writes adapters only)."""
        save_checkpoint(self.model, self.opt, directory, extra, self.rank)

    def read_checkpoint(self, directory: Path) -> dict[str, Any]:
        """Collective: fill model and optimizer from `directory`; returns the saved `extra` (a seam)."""
        return load_checkpoint(self.model, self.opt, directory)

    def _resume(self) -> TrainerState | None:
        """Load the newest checkpoint whose manifest verifies (rank 0 decides; damaged ones are skipped
        with a warning that is also reported); None on a fresh start."""
        if self.rank == 0:
            self.store.clean_staging()
        path, skipped = broadcast_object(self.store.latest_valid() if self.rank == 0 else None)
        self.timeline.mark("checkpoint_verify")
        for problem in skipped:
            log.warning("damaged checkpoint skipped: %s", problem)
            if self.rank == 0:
                print(f"[train] WARNING: damaged checkpoint skipped, falling back: {problem}", flush=True)
        if path is None:
            if skipped:
                self.restart_info = {"restart/resumed_from": 0, "restart/world_size_before": 0,
                                     "restart/skipped_checkpoints": skipped}
            return None
        extra = self.read_checkpoint(path)
        self.sched.load_state_dict(extra["scheduler"])
        state = TrainerState(**extra["trainer"])
        self.ledger = SampleLedger.load(path / LEDGER_FILE)
        self.history = json.loads((path / METRICS_FILE).read_text())
        self.timeline.mark("checkpoint_load")
        self.restart_info = {"restart/resumed_from": state.step, "restart/world_size_before": state.world_size,
                             "restart/skipped_checkpoints": skipped}
        state.restarts += 1
        if self.rank == 0:
            print(f"[train] resumed at step {state.step} from {path.name} (world size {state.world_size} -> "
                  f"{self.world}, dp={self.dims.dp} ep={self.dims.ep} pp={self.dims.pp}, "
                  f"{self.layout.accumulation} micro-batches per step)", flush=True)
        return state

    def next_batches(self) -> list[dict[str, torch.Tensor]]:
        """This data rank's slice of the step's global batch, as `accumulation` micro-batches of
        `train.micro_batch_size` (the ranks of a pipeline read the same ones)."""
        ids = rank_slice(self.order.step_ids(self.state.step), self.data_rank, self.dims.data_ranks)
        m = self.layout.micro_batch_size
        return [self.reader.read(ids[i:i + m]) for i in range(0, len(ids), m)]

    def _record_ledger(self, batches: list[dict[str, torch.Tensor]]) -> None:
        """Gather what every data rank trained this step into the ledger (pp ranks > 0 repeat theirs)."""
        mine = torch.cat([b["seq_id"] for b in batches]).to(self.device)
        gathered = all_gather_cat(mine).cpu()[:self.dims.data_ranks * len(mine)]
        self.ledger.record(self.state.step, gathered.numpy())

    # ---- one step ---------------------------------------------------------------------------------
    def train_step(self, batches: list[dict[str, torch.Tensor]]) -> StepStats:
        """Forward and backward of every micro-batch, gradient sync, clipping, optimizer and schedule
        step, load balancing.

        The loss is the sum of the global batch's valid token losses divided by their count: each data
        rank scales its sums by n_data / count so that the data-parallel gradient average yields it,
        whatever the number of micro-batches a rank accumulates."""
        inputs, targets = [], []
        for batch in batches:
            tokens, mask = batch["tokens"].to(self.device), batch["loss_mask"].to(self.device)
            inputs.append(tokens[:, :-1])
            targets.append(torch.where(mask[:, 1:] > 0, tokens[:, 1:], IGNORE_INDEX))
        n_data = self.dims.data_ranks
        count = sum((t != IGNORE_INDEX).sum() for t in targets).to(torch.float64)
        if self.plan.distributed:  # the stage's dp*ep ranks hold every data rank's batch once
            dist.all_reduce(count, group=self.plan.mesh.stage_group)
        count = count.clamp(min=1)
        ce_sum = None
        for x, y in zip(inputs, targets, strict=True):
            ce = self._forward_backward(x, y, float(n_data / count))
            if ce is not None:
                ce_sum = ce.detach().double() if ce_sum is None else ce_sum + ce.detach().double()
        loss = all_reduce_(torch.zeros(1, dtype=torch.float64) if ce_sum is None
                           else (ce_sum.cpu() / count.cpu() / self.dims.tp).reshape(1))
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
        self._record_ledger(batches)
        step_tokens = sum(x.numel() for x in inputs) * n_data  # data-parallel ranks only: a pipeline shares
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
            "step": state.step, "epoch": self.order.epoch_of(max(state.step - 1, 0)),
            "train/loss": window.mean("loss"),  # already the global batch's (train_step)
            "train/aux_loss": window.mean("aux_loss"), "train/z_loss": window.mean("z_loss"),
            "train/grad_norm": window.mean("grad_norm"), "train/lr": self.sched.get_last_lr()[0],
            "perf/tokens_per_s": tokens_per_s,
            "perf/mfu": mfu(tokens_per_s, cfg.model, cfg.data.seq_len, self.peak_total),
            "perf/tokens_seen": state.tokens_seen, "world_size": self.world,
            "data/consumed_sequences": self.ledger.sequences, "train/restarts": state.restarts, "eta_s": eta_s,
            "train/accumulation": self.layout.accumulation,
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

    def save(self) -> None:
        """Collective: an atomic checkpoint of this step (moe.checkpoint.CheckpointStore): every rank
        writes its part into the staging directory, rank 0 adds the trainer state (every rank's RNG
        state included) and the ledger, then commits (manifest with checksums, rename, keep the last K)."""
        self.state.expert_load, self.state.moe_layers = self.load_matrix.tolist(), list(self.moe_names)
        self.state.world_size = self.world
        rng = all_gather_cat(torch.get_rng_state().unsqueeze(0).to(self.device)).cpu()
        self.state.rng = [t.clone() for t in rng.unbind(0)]  # own storage each: saved and restored alone
        tmp = self.store.prepare(self.state.step) if self.rank == 0 else self.store.staging(self.state.step)
        if dist.is_initialized():
            dist.barrier()
        extra = {"trainer": dataclasses.asdict(self.state), "scheduler": self.sched.state_dict()}
        self.write_checkpoint(tmp, extra)
        if dist.is_initialized():
            dist.barrier()
        if self.rank == 0:
            self.ledger.save(tmp / LEDGER_FILE)
            (tmp / METRICS_FILE).write_text(json.dumps(self.history))
            self.store.commit(self.state.step)

    def _report(self, metrics: dict[str, Any], save: bool = False) -> None:
        """Keep the row in this trajectory's history, checkpoint if asked (the row included), report."""
        self.history.append({"step": metrics["step"], **scalar_metrics(metrics)})
        if save:
            self.save()
            metrics["checkpoint/step"] = self.state.step
        ray.train.report(metrics)

    def _restart_metrics(self) -> dict[str, Any]:
        """Once, after a resume: what happened (`restart/*`) and this start's timeline (rank 0's marks)."""
        if not self.restart_info:
            return {}
        info, self.restart_info = self.restart_info, None
        return {**info, "restart/timeline": dict(self.timeline.marks)}

    # ---- the loop ---------------------------------------------------------------------------------
    def fit(self) -> None:
        self.setup()
        t, state = self.cfg.train, self.state
        if state.step == 0:  # the starting point of the validation curve
            self._report({"step": 0, "val/loss": self.evaluate(), "world_size": self.world, **self._restart_metrics()})
        window, run_start, start_step = MetricsWindow(), time.perf_counter(), state.step
        while state.step < t.steps:
            stats = self.train_step(self.next_batches())
            self.timeline.mark("first_step")
            window.add(stats)
            last = state.step == t.steps
            if not (state.step % t.log_every == 0 or last):
                if self.restart_info:  # the first step after a resume: when it completed, and what happened
                    self._report({"step": state.step, "world_size": self.world, "train/restarts": state.restarts,
                                  **self._restart_metrics()})
                continue
            eta = (t.steps - state.step) * (time.perf_counter() - run_start) / max(1, state.step - start_step)
            metrics = {**self.log(window, stats, eta), **self._restart_metrics()}
            if state.step % t.eval_every == 0 or last:
                metrics["val/loss"] = self.evaluate()
            if last:
                metrics["expert_load"] = self.load_matrix.tolist()
                metrics["moe_layers"] = self.moe_names
            self._report(metrics, save=state.step % t.checkpoint_every == 0 or last)
            window = MetricsWindow()
        if self.rank == 0:
            print(f"[train] done: {state.step} steps, {state.tokens_seen:,} tokens", flush=True)


def train_loop_per_worker(config: dict[str, Any]) -> None:
    """Ray Train's entry on every worker."""
    Trainer(config["cfg"], Path(config["dataset_dir"]), Path(config["checkpoint_dir"]),
            config["n_val_sequences"]).fit()
