"""Pipeline parallelism: the model split by layer into stages of balanced cost, run by a
`torch.distributed.pipelining` schedule (gpipe, 1f1b or interleaved_1f1b).

How a model is split (`split_stages`): the layers are cut into `pp * virtual_stages` contiguous,
non-empty stages that minimize the costliest stage. A unit's cost is its forward FLOPs per token
(`unit_costs`: attention with its score term at `max_seq_len`, the dense or active MoE feed-forward);
the embedding (a row lookup, counted as 2 * d_model) is added to the first stage, the final norm and
the head to the last, so the head's vocabulary-sized matmul pulls layers off the last stage.

Stage `s` lives on pipeline rank `s % pp` (loop placement: rank r holds stages r, r + pp, ...;
with one virtual stage per rank that is stage r). Each rank prunes the one-device model to the
layers of its stages (`prune_to_stages`, structural, also on the meta device), so parameter names
stay the one-device model's (`layers.3.attn.wq.weight`): optimizer state, gradient sync and
checkpoints address parameters by name whatever the stage layout. `StageModule` is a view that
runs one stage's layers of that pruned model; `PipelineStage` wraps it.

Static shapes: every `PipelineStage` is given its input and output shapes (`Pipeline._stages`:
(mb, T) token ids or (mb, T, D) activations in, (mb, T, D) or (mb, T, V) logits out), so torch
never runs its hidden shape-inference forward and backward, which would run the expert
all-to-alls, add to the MoE load counters and write into the in-place expert gradients.

The loss (`Pipeline.step`): the last stage computes, per microbatch, the sum of the token losses
under the mask (targets of masked positions are -100) times `loss_scale`; the caller passes
`loss_scale = n_data_ranks / valid tokens of the global batch`, so after the data-parallel gradient
average the gradient is that of (sum over the global batch's valid tokens) / count, not a mean of
microbatch means. Schedules run with `scale_grads=False`.

Timeouts: the pipeline's process groups are created with `PipelineConfig.timeout_s` (moe/parallel/mesh.py), and every
send/recv the schedule posts is recorded by `_TimedStage`; a failure or timeout inside a schedule
is raised as `PipelineCommError` naming this rank's stage and the peer stage and rank of the last
posted operation.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch import nn

from moe.config import ConfigError, ModelConfig
from moe.loss import token_loss_sum
from moe.model import MoETransformer

SCHEDULES = ("gpipe", "1f1b", "interleaved_1f1b")


@dataclass(frozen=True)
class PipelineConfig:
    """How pipeline stages are scheduled (the degree itself is `ParallelDims.pp`)."""

    schedule: str = "1f1b"
    microbatches: int = 2
    virtual_stages: int = 1  # stages per rank; > 1 only with interleaved_1f1b
    timeout_s: float = 600.0  # every pipeline send/recv and the pipeline process groups

    def n_stages(self, pp: int) -> int:
        return pp * self.virtual_stages

    def validate(self, pp: int, n_layers: int, prefix: str = "parallel") -> PipelineConfig:
        """ConfigError naming the key and the fix for a configuration the schedule cannot run."""
        if self.schedule not in SCHEDULES:
            raise ConfigError(f"{prefix}.pp_schedule={self.schedule!r}: use one of {', '.join(SCHEDULES)}.")
        if self.microbatches < 1:
            raise ConfigError(f"{prefix}.pp_microbatches={self.microbatches} must be >= 1.")
        if self.virtual_stages < 1:
            raise ConfigError(f"{prefix}.pp_virtual_stages={self.virtual_stages} must be >= 1.")
        if self.timeout_s <= 0:
            raise ConfigError(f"{prefix}.pp_timeout_s={self.timeout_s} must be positive.")
        if pp == 1:
            return self
        if self.virtual_stages > 1 and self.schedule != "interleaved_1f1b":
            raise ConfigError(
                f"{prefix}.pp_virtual_stages={self.virtual_stages} needs {prefix}.pp_schedule=interleaved_1f1b; "
                f"set {prefix}.pp_virtual_stages=1 for {self.schedule}.")
        if self.schedule == "interleaved_1f1b" and self.virtual_stages < 2:
            raise ConfigError(
                f"{prefix}.pp_schedule=interleaved_1f1b needs {prefix}.pp_virtual_stages >= 2 (stages per rank); "
                f"set {prefix}.pp_virtual_stages=2 or use {prefix}.pp_schedule=1f1b.")
        if self.schedule != "gpipe" and self.microbatches < pp:
            raise ConfigError(
                f"{prefix}.pp_schedule={self.schedule} with {prefix}.pp_microbatches={self.microbatches} < "
                f"{prefix}.pp={pp}: 1F1B schedules need at least one microbatch per stage; set "
                f"{prefix}.pp_microbatches>={pp} (or use {prefix}.pp_schedule=gpipe).")
        if self.schedule == "interleaved_1f1b" and self.microbatches % pp:
            raise ConfigError(
                f"{prefix}.pp_schedule=interleaved_1f1b needs {prefix}.pp_microbatches={self.microbatches} to be "
                f"a multiple of {prefix}.pp={pp}; set {prefix}.pp_microbatches={pp * math.ceil(self.microbatches / pp)}.")
        n_stages = self.n_stages(pp)
        if n_layers < n_stages:
            raise ConfigError(
                f"model.n_layers={n_layers} cannot be split into {n_stages} pipeline stages "
                f"({prefix}.pp={pp} x {prefix}.pp_virtual_stages={self.virtual_stages}): every stage needs a "
                f"layer; lower {prefix}.pp or {prefix}.pp_virtual_stages, or use a model with >= {n_stages} layers.")
        return self


# ---- the split ------------------------------------------------------------------------------------
@dataclass(frozen=True)
class StageSpec:
    """One pipeline stage: which layers it runs, and whether it embeds tokens or ends in the head."""

    index: int
    layer_ids: tuple[int, ...]
    n_stages: int

    @property
    def first(self) -> bool:
        return self.index == 0

    @property
    def last(self) -> bool:
        return self.index == self.n_stages - 1


def unit_costs(cfg: ModelConfig) -> tuple[float, list[float], float]:
    """Forward FLOPs per token of (embedding, each layer, final norm + head)."""
    d, m = cfg.d_model, cfg.moe
    attn = 2 * (d * cfg.n_heads * cfg.head_dim * 2 + d * cfg.n_kv_heads * cfg.head_dim * 2)
    attn += 4 * cfg.max_seq_len * d  # QK^T and AV at full context
    dense = 2 * 3 * d * cfg.dense_hidden
    moe = 2 * (3 * d * m.expert_hidden * (m.top_k + m.n_shared_experts) + d * m.n_routed_experts)
    layers = [attn + (moe if cfg.is_moe_layer(i) else dense) for i in range(cfg.n_layers)]
    return 2.0 * d, [float(c) for c in layers], float(2 * d * cfg.vocab_size + d)


def split_stages(cfg: ModelConfig, n_stages: int) -> list[StageSpec]:
    """Contiguous, non-empty layer ranges that minimize the costliest stage (embedding and head counted)."""
    emb, layers, head = unit_costs(cfg)
    n = len(layers)
    if n < n_stages:
        raise ConfigError(f"model.n_layers={n} cannot be split into {n_stages} pipeline stages; lower parallel.pp.")

    def cost(lo: int, hi: int) -> float:  # layers [lo, hi)
        return sum(layers[lo:hi]) + (emb if lo == 0 else 0.0) + (head if hi == n else 0.0)

    # best[s][i]: least max-stage cost of layers [0, i) in s stages; cut[s][i] the start of stage s-1
    inf = float("inf")
    best = [[inf] * (n + 1) for _ in range(n_stages + 1)]
    cut = [[0] * (n + 1) for _ in range(n_stages + 1)]
    best[0][0] = 0.0
    for s in range(1, n_stages + 1):
        for i in range(s, n + 1):
            for j in range(s - 1, i):
                c = max(best[s - 1][j], cost(j, i))
                if c < best[s][i]:
                    best[s][i], cut[s][i] = c, j
    bounds, i = [], n
    for s in range(n_stages, 0, -1):
        bounds.append((cut[s][i], i))
        i = cut[s][i]
    return [StageSpec(k, tuple(range(lo, hi)), n_stages) for k, (lo, hi) in enumerate(reversed(bounds))]


def rank_stages(cfg: ModelConfig, pp: int, pp_rank: int, virtual_stages: int = 1) -> list[StageSpec]:
    """The stages pipeline rank `pp_rank` holds (loop placement: stage s on rank s % pp)."""
    return [s for s in split_stages(cfg, pp * virtual_stages) if s.index % pp == pp_rank]


def prune_to_stages(model: MoETransformer, stages: list[StageSpec]) -> None:
    """Drop every layer, the embedding, the norm and the head that none of `stages` holds (in place;
    structural, so it runs on the meta device). Names of what is kept do not change."""
    keep = {str(i) for s in stages for i in s.layer_ids}
    for name in [n for n in model.layers if n not in keep]:
        del model.layers[name]
    if not any(s.first for s in stages):
        model.tok_emb = None
    if not any(s.last for s in stages):
        model.norm, model.head = None, None


class StageModule(nn.Module):
    """One stage of a pruned `MoETransformer`: (embedding) -> its layers -> (norm, head).

    Registers the stage's own modules as children (what `PipelineStage` sees); the model itself is
    held outside the module tree, for the rotary tables.
    """

    def __init__(self, model: MoETransformer, spec: StageSpec) -> None:
        super().__init__()
        self.spec = spec
        self._owner = [model]  # a list: not registered as a submodule
        self.tok_emb = model.tok_emb if spec.first else None
        self.layers = nn.ModuleList([model.layers[str(i)] for i in spec.layer_ids])
        self.norm = model.norm if spec.last else None
        self.head = model.head if spec.last else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(mb, T) token ids on the first stage, (mb, T, D) activations otherwise."""
        model = self._owner[0]
        h_BTD = self.tok_emb(x) if self.tok_emb is not None else x
        T = h_BTD.shape[1]
        cos, sin = model.rope_cos[:T], model.rope_sin[:T]
        for block in self.layers:
            h_BTD = block(h_BTD, cos, sin)
        if self.norm is not None:
            h_BTD = self.norm(h_BTD)
        return self.head(h_BTD) if self.head is not None else h_BTD


# ---- running it ---------------------------------------------------------------------------------
class PipelineCommError(RuntimeError):
    """A pipeline send/recv failed or timed out; the message names the stage and the peer."""


def _timed_stage_class():
    from torch.distributed.pipelining import PipelineStage

    class _TimedStage(PipelineStage):
        """A `PipelineStage` that records the last send/recv it posted (peer stage, what, microbatch)."""

        last_p2p: tuple[str, int, int] | None = None

        def _record(self, what: str, peer: int, mb: int, ops: list) -> list:
            if ops:
                self.last_p2p = (what, peer, mb)
            return ops

        def get_fwd_recv_ops(self, fwd_chunk_id: int) -> list:
            return self._record("recv activations from", self.stage_index - 1, fwd_chunk_id,
                                super().get_fwd_recv_ops(fwd_chunk_id))

        def get_bwd_recv_ops(self, bwd_chunk_id: int) -> list:
            return self._record("recv gradients from", self.stage_index + 1, bwd_chunk_id,
                                super().get_bwd_recv_ops(bwd_chunk_id))

        def get_fwd_send_ops(self, fwd_chunk_id: int) -> list:
            return self._record("send activations to", self.stage_index + 1, fwd_chunk_id,
                                super().get_fwd_send_ops(fwd_chunk_id))

        def get_bwd_send_ops(self, bwd_chunk_id: int) -> list:
            return self._record("send gradients to", self.stage_index - 1, bwd_chunk_id,
                                super().get_bwd_send_ops(bwd_chunk_id))

        def describe(self) -> str:
            if self.last_p2p is None:  # the schedule's start-up exchange (shape vote) with the neighbours
                peers = [p for p in (self.stage_index - 1, self.stage_index + 1) if 0 <= p < self.num_stages]
                names = " and ".join(f"stage {p} (global rank {self._resolve_peer_global_rank(p)})" for p in peers)
                return f"stage {self.stage_index} (global rank {dist.get_rank()}) in the start-up exchange with {names}"
            what, peer, mb = self.last_p2p
            return (f"stage {self.stage_index} (global rank {dist.get_rank()}) waiting to {what} stage {peer} "
                    f"(global rank {self._resolve_peer_global_rank(peer)}), microbatch {mb}")

    return _TimedStage


def _is_comm_failure(err: BaseException) -> bool:
    """A send/recv that failed or timed out (gloo, NCCL), as opposed to an error in a stage's compute."""
    text = str(err).lower()
    return isinstance(err, dist.DistError) or any(
        k in text for k in ("timed out", "timeout", "connection closed", "connection reset", "gloo", "nccl"))


@dataclass
class Pipeline:
    """This rank's stages of a pruned model and the schedule that runs them (built per batch shape)."""

    model: MoETransformer
    specs: list[StageSpec]
    config: PipelineConfig
    group: dist.ProcessGroup
    device: torch.device | str = "cpu"
    loss_scale: float = 1.0
    _schedules: dict[tuple, object] = field(default_factory=dict)

    @property
    def is_first(self) -> bool:
        return any(s.first for s in self.specs)

    @property
    def is_last(self) -> bool:
        return any(s.last for s in self.specs)

    def _loss(self, logits_BTV: torch.Tensor, targets_BT: torch.Tensor) -> torch.Tensor:
        return token_loss_sum(logits_BTV, targets_BT) * self.loss_scale

    def _stages(self, mb: int, seq: int, act_dtype: torch.dtype, logits_dtype: torch.dtype) -> list:
        """`PipelineStage`s with static shapes: torch runs no shape-inference forward/backward."""
        cfg, dev, stage_cls = self.model.cfg, torch.device(self.device), _timed_stage_class()
        stages = []
        for spec in self.specs:
            # examples carry only metadata (shape, dtype, requires_grad: activations and outputs do)
            x = torch.empty(mb, seq, dtype=torch.long, device="meta") if spec.first \
                else torch.empty(mb, seq, cfg.d_model, dtype=act_dtype, device="meta", requires_grad=True)
            out = torch.empty(mb, seq, cfg.vocab_size if spec.last else cfg.d_model,
                              dtype=logits_dtype if spec.last else act_dtype, device="meta", requires_grad=True)
            stages.append(stage_cls(StageModule(self.model, spec), spec.index, spec.n_stages, dev,
                                    input_args=(x,), output_args=(out,), group=self.group))
        return stages

    def schedule(self, batch: int, seq: int, act_dtype: torch.dtype = torch.float32,
                 logits_dtype: torch.dtype = torch.float32):
        """The schedule for (batch, seq) inputs (batch split into `config.microbatches`), built once per shape."""
        from torch.distributed.pipelining import Schedule1F1B, ScheduleGPipe, ScheduleInterleaved1F1B

        key = (batch, seq, act_dtype, logits_dtype)
        if key not in self._schedules:
            m = self.config.microbatches
            if batch % m:
                raise ConfigError(f"a batch of {batch} sequences cannot be split into parallel.pp_microbatches={m}; "
                                  "choose a train.micro_batch_size that is a multiple of it.")
            stages = self._stages(batch // m, seq, act_dtype, logits_dtype)
            kind = {"gpipe": ScheduleGPipe, "1f1b": Schedule1F1B}.get(self.config.schedule)
            if kind is None:
                sched = ScheduleInterleaved1F1B(stages, m, loss_fn=self._loss, scale_grads=False)
            else:
                sched = kind(stages[0], m, loss_fn=self._loss, scale_grads=False)
            self._schedules[key] = (sched, stages)
        return self._schedules[key]

    def _run(self, fn_name: str, tokens_BT: torch.Tensor, targets_BT: torch.Tensor, dtypes: tuple) -> list:
        sched, stages = self.schedule(*tokens_BT.shape, *dtypes)
        losses: list[torch.Tensor] = []
        args = (tokens_BT,) if self.is_first else ()
        try:
            getattr(sched, fn_name)(*args, target=targets_BT if self.is_last else None, losses=losses)
        except RuntimeError as err:
            if not _is_comm_failure(err):
                raise
            where = "; ".join(s.describe() for s in stages)
            raise PipelineCommError(
                f"pipeline {fn_name} failed on {where} (timeout {self.config.timeout_s:g} s, "
                f"parallel.pp_timeout_s): {err}") from err
        return losses

    def step(self, tokens_BT: torch.Tensor, targets_BT: torch.Tensor, loss_scale: float,
             dtypes: tuple = (torch.float32, torch.float32)) -> torch.Tensor | None:
        """Forward and backward of every microbatch; returns the summed (scaled) loss on the last stage."""
        self.loss_scale = loss_scale
        losses = self._run("step", tokens_BT, targets_BT, dtypes)
        return torch.stack([x.detach() for x in losses]).sum() if self.is_last else None

    @torch.no_grad()
    def eval(self, tokens_BT: torch.Tensor, targets_BT: torch.Tensor,
             dtypes: tuple = (torch.float32, torch.float32)) -> torch.Tensor | None:
        """Forward only; returns the sum of token losses over the batch on the last stage."""
        self.loss_scale = 1.0
        losses = self._run("eval", tokens_BT, targets_BT, dtypes)
        return torch.stack([x.detach() for x in losses]).sum() if self.is_last else None
