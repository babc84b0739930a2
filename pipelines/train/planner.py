"""The planner: per-device memory and step time of a training layout (dp x tp x pp x ep), from the
model, the batch and the cluster profile alone, before a GPU is rented; and `parallel=auto`.

Memory per device (the rank of the largest pipeline stage), in bytes:
- parameters, gradients, AdamW states: the stage's parameters (attention and the dense/shared
  feed-forward divided by tp, routed experts by ep, embedding on the first stage, head and final
  norm on the last), fp32 master copies: 4 + 4 + 8 bytes per element (bf16 profiles compute
  under autocast);
- activations: what autograd keeps per token for the backward, for the tokens in flight
  (pp = 1: the whole micro-batch; 1F1B keeps min(microbatches, pp) microbatches, GPipe all of
  them), times the activation element size (4 for float32, 2 for bfloat16). Per token and layer,
  in elements (d model width, kv key/value width, H heads, F dense width, E experts, k top-k,
  He expert width, S shared experts; counted from the tensors this model's autograd graph
  saves, see `ACTIVATION_TERMS`):
      attention + norms   5 d + (4 d + 2 kv + H) / tp
      dense feed-forward  4 F / tp
      MoE feed-forward    2 E + k (routed per assignment) + 4 S He / tp   (+ min(k, ep) d under ep)
      routed per assignment: 2 He + 8 with the per-expert kernel (CPU), d + 5 He + 8 grouped (GPU)
  `moe` recomputation drops the MoE terms (one layer's come back during its backward), `full`
  keeps only each block's input (d) plus one block's activations while it is recomputed. The
  first stage adds the embedding output (d + 1), the last the final norm, the log-softmax and
  the targets (2 d + V + 4);
- communication buffers: the flat gradient all-reduce buffer of data parallelism (the larger of
  the expert and non-expert gradients, after the backward), the expert all-to-all's send and
  receive rows and tensor parallelism's all-reduce output (during it);
- backward transients: the logits' gradient (V per token of a microbatch, last stage) and the
  largest weight's fresh gradient before it is added into `.grad`.
The peak is parameters + gradients + optimizer + max(activations + in-flight buffers + backward
transients, gradient buffer), checked against `USABLE_FRACTION` of the profile's `gpu_memory_gb`.

Step time: the rank's FLOPs (`moe.flops.flops_per_token` for its share, plus what recomputation runs
again; pp divides them, tp only the parts it splits: the router, the routed experts and the head run in
full on every tp rank, `tp_replicated_flops_per_token`) at the profile's peak FLOP/s times
`cluster.expected_mfu`, which on the GPU profiles stands for everything but communication, the AdamW
step and the bubble; or, on a host measured for it (`HostRates`: the CPU bench measures them with
every rank busy at once), at the FLOP/s the rank's matrix products sustain at the workload's shapes
(`moe.flops.matmul_pass`, timed) plus the seconds per token of the step's other operations
(elementwise, normalization, routing, indexing, the loss; pp divides them, tp does not); plus the
AdamW step, `moe.flops.ADAMW_TRAFFIC_BYTES` (28) per parameter at `cluster.memory_gbps` (the device
memory's bandwidth on GPUs; on CPU the bench measures what an AdamW step reaches); plus communication in an
alpha-beta model: every collective costs a latency (`collective_base_us` + steps x the hop latency,
`intra_node_hop_us` inside a node or `inter_node_hop_us` across; all-reduce 2 (n-1) steps, all-to-all
n - 1, a send 1: NCCL's and RCCL's own ring/LL cost model on the GPU profiles, a measured 2-process gloo
all-reduce on CPU) plus its bytes at the profile's bandwidth (a group within `gpus_per_node` consecutive
ranks uses `intra_node_gbps`, else `inter_node_gbps`). Collectives counted per step and microbatch, as
the code issues them: tensor parallelism 7 all-reduces per layer whose feed-forward it splits, 4
otherwise (forward: `wo`, `w2`; backward: the input gradients of `wq`, `wk`, `wv`, `w1`, `w3`), each of a
microbatch's hidden states; expert parallelism 8 all-to-alls per MoE layer (forward: counts, tokens,
weights, positions, results; backward: results, tokens, weights) moving 4 x the routed rows; data
parallelism one gradient all-reduce (two with ep and dp > 1: the sharded experts reduce over dp only),
with the local traffic of the gradient sync around it (`GRAD_FLATTEN_TRAFFIC_BYTES` per parameter it
flattens, averages and copies back; `GRAD_SCALE_TRAFFIC_BYTES` per expert parameter it only divides, ep
without dp) at `cluster.memory_gbps`, and the router statistics' all-reduce per MoE layer in the forward
and the backward; pipeline sends;
and the pipeline bubble (pp - 1) / (microbatches x virtual stages) of the compute. Nothing is assumed
to overlap (this is how the training loop runs today). tokens/s = global tokens per step / step time.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

from cluster.config import ClusterConfig
from moe.config import ConfigError, ModelConfig
from moe.flops import ADAMW_TRAFFIC_BYTES, flops_per_token, param_counts
from moe.parallel.pipeline import StageSpec, rank_stages

GIB = 1024 ** 3
MASTER_BYTES, GRAD_BYTES, ADAMW_BYTES = 4, 4, 8  # fp32 parameters, gradients, exp_avg + exp_avg_sq
USABLE_FRACTION = 0.9  # of a device's memory: the rest is the runtime's (CUDA/HIP context, allocator slack)
ACT_BYTES = {"float32": 4, "bfloat16": 2}
# moe/parallel/apply.py's gradient sync, per fp32 gradient element: flatten (read + write), divide in
# place (read + write), copy back (read + write); or, for expert gradients with no dp group, divide only
GRAD_FLATTEN_TRAFFIC_BYTES, GRAD_SCALE_TRAFFIC_BYTES = 24, 8
RECOMPUTE = ("none", "moe", "full")


@dataclass(frozen=True)
class Layout:
    dp: int
    tp: int = 1
    pp: int = 1
    ep: int = 1
    microbatches: int = 2
    virtual_stages: int = 1
    schedule: str = "1f1b"

    @property
    def world(self) -> int:
        return self.dp * self.tp * self.pp * self.ep

    def describe(self) -> str:
        return f"dp={self.dp} tp={self.tp} pp={self.pp} ep={self.ep}"


@dataclass(frozen=True)
class Workload:
    model: ModelConfig
    seq_len: int
    micro_batch_size: int  # sequences per data-parallel rank (a whole pipeline under pp) per step
    recompute: str = "none"  # train.activation_checkpointing


@dataclass(frozen=True)
class Memory:
    params: int
    grads: int
    optimizer: int
    activations: int
    comm_buffers: int  # the larger of the in-flight buffers and the gradient all-reduce buffer
    backward_transient: int  # the logits' gradient and the largest fresh weight gradient
    peak: int
    routed_expert_fraction: float  # of this rank's parameters

    def terms(self) -> dict[str, int]:
        return {"parameters": self.params, "gradients": self.grads, "optimizer states": self.optimizer,
                "activations": self.activations, "communication buffers": self.comm_buffers,
                "backward transients": self.backward_transient}


@dataclass(frozen=True)
class HostRates:
    """What a step's time on a host needs beyond its profile, measured on that host with every rank busy
    (`python -m pipelines.bench planner` does it on CPU): the FLOP/s one rank's matrix products sustain at
    the workload's shapes, and the seconds per token of the step's other operations (elementwise,
    normalization, routing, indexing, the loss), which a GPU profile's `expected_mfu` covers."""

    matmul_flops: float
    other_s_per_token: float = 0.0


@dataclass(frozen=True)
class StepTime:
    compute_s: float
    tp_s: float
    all_to_all_s: float
    dp_s: float
    pp_send_s: float
    bubble_s: float
    optimizer_s: float = 0.0
    other_ops_s: float = 0.0  # non-matrix operations, where HostRates measured them (else in expected_mfu)

    @property
    def total_s(self) -> float:
        return (self.compute_s + self.tp_s + self.all_to_all_s + self.dp_s + self.pp_send_s + self.bubble_s
                + self.optimizer_s + self.other_ops_s)


@dataclass(frozen=True)
class Estimate:
    layout: Layout
    memory: Memory
    time: StepTime | None  # None when the profile has no peak FLOP/s (CPU: measured at run start)
    capacity: int  # usable bytes per device; 0: not limited
    tokens_per_step: int

    @property
    def fits(self) -> bool:
        return self.capacity == 0 or self.memory.peak <= self.capacity

    @property
    def tokens_per_s(self) -> float:
        return self.tokens_per_step / self.time.total_s if self.time else 0.0

    def largest_term(self) -> tuple[str, int]:
        return max(self.memory.terms().items(), key=lambda kv: kv[1])


# ---- memory ---------------------------------------------------------------------------------------
_STAGES: dict[tuple[str, int, int], list[list[StageSpec]]] = {}  # memo: (repr(model config), pp, v) -> per pp rank


def stages_by_rank(cfg: ModelConfig, pp: int, virtual_stages: int = 1) -> list[list[StageSpec]]:
    """The stages each pipeline rank holds (moe/parallel/pipeline.py's split), memoized for parallel=auto."""
    key = (repr(cfg), pp, virtual_stages)
    if key not in _STAGES:
        _STAGES[key] = [rank_stages(cfg, pp, r, virtual_stages) for r in range(pp)]
    return _STAGES[key]


def _layer_params(cfg: ModelConfig, layer: int, tp: int, ep: int) -> tuple[int, int]:
    """(parameters, of which routed experts) of one layer on one rank."""
    d, m = cfg.d_model, cfg.moe
    attn = (2 * d * cfg.n_heads * cfg.head_dim + 2 * d * cfg.n_kv_heads * cfg.head_dim) // tp + 2 * d
    if not cfg.is_moe_layer(layer):
        return attn + 3 * d * cfg.dense_hidden // tp, 0
    routed = 3 * d * m.expert_hidden * (m.n_routed_experts // ep)
    return attn + d * m.n_routed_experts + 3 * d * m.n_shared_experts * m.expert_hidden // tp + routed, routed


def stage_params(cfg: ModelConfig, stages: list[StageSpec], tp: int, ep: int) -> tuple[int, int]:
    """(parameters, of which routed experts) a pipeline rank holding `stages` keeps."""
    total = routed = 0
    for s in stages:
        for i in s.layer_ids:
            p, r = _layer_params(cfg, i, tp, ep)
            total, routed = total + p, routed + r
        total += cfg.vocab_size * cfg.d_model if s.first else 0
        total += cfg.vocab_size * cfg.d_model + cfg.d_model if s.last else 0
    return total, routed


def layer_activations(cfg: ModelConfig, layer: int, tp: int, ep: int, device: str) -> tuple[int, int]:
    """Elements per token autograd keeps for one layer: (whole layer, of which the MoE feed-forward)."""
    d, m = cfg.d_model, cfg.moe
    kv = cfg.n_kv_heads * cfg.head_dim
    common = 5 * d + (4 * d + 2 * kv + cfg.n_heads) // tp
    if not cfg.is_moe_layer(layer):
        return common + 4 * cfg.dense_hidden // tp + 2, 0
    per_assignment = 2 * m.expert_hidden + 8 if device == "cpu" else d + 5 * m.expert_hidden + 8
    moe = 2 * m.n_routed_experts + m.top_k * per_assignment + 4 * m.n_shared_experts * m.expert_hidden // tp + 4
    if ep > 1:
        moe += min(m.top_k, ep) * d
    return common + moe, moe


def _stage_activation_elements(cfg: ModelConfig, stages: list[StageSpec], layout: Layout, recompute: str,
                               device: str) -> int:
    """Elements per token in flight on a rank holding `stages` (recomputation applied)."""
    kept, transient = 0, 0
    for s in stages:
        for i in s.layer_ids:
            whole, moe = layer_activations(cfg, i, layout.tp, layout.ep, device)
            if recompute == "full":
                kept, transient = kept + cfg.d_model, max(transient, whole)
            elif recompute == "moe":
                kept, transient = kept + whole - moe, max(transient, moe)
            else:
                kept += whole
        kept += cfg.d_model + 1 if s.first else 0
        kept += 2 * cfg.d_model + cfg.vocab_size + 4 if s.last else 0
    return kept + transient


def _largest_weight(cfg: ModelConfig, stages: list[StageSpec], layout: Layout) -> int:
    """Elements of the largest weight a rank holding `stages` has: its gradient is computed fresh in the
    backward before autograd adds it into `.grad` (routed experts accumulate in place: not counted)."""
    d, m = cfg.d_model, cfg.moe
    sizes = [cfg.vocab_size * d if s.first or s.last else 0 for s in stages]
    for s in stages:
        for i in s.layer_ids:
            sizes.append(d * cfg.n_heads * cfg.head_dim // layout.tp)
            sizes.append(d * (m.n_routed_experts if cfg.is_moe_layer(i) else 0))
            sizes.append(d * (m.n_shared_experts * m.expert_hidden if cfg.is_moe_layer(i) else cfg.dense_hidden)
                         // layout.tp)
    return max(sizes)


def tokens_in_flight(layout: Layout, workload: Workload) -> int:
    """Tokens whose activations a rank holds at once (the pipeline's first stage for pp > 1)."""
    b, s = workload.micro_batch_size, workload.seq_len
    if layout.pp == 1:
        return b * s
    per_micro = b // layout.microbatches * s
    held = layout.microbatches if layout.schedule == "gpipe" else min(layout.microbatches, layout.pp)
    return held * per_micro


def memory(workload: Workload, layout: Layout, cluster: ClusterConfig) -> Memory:
    """Per-device bytes of the rank that holds the most (see the module docstring)."""
    cfg, act = workload.model, ACT_BYTES[cluster.dtype]
    best: Memory | None = None
    for stages in stages_by_rank(cfg, layout.pp, layout.virtual_stages):
        n, routed = stage_params(cfg, stages, layout.tp, layout.ep)
        elements = _stage_activation_elements(cfg, stages, layout, workload.recompute, cluster.device)
        activations = elements * tokens_in_flight(layout, workload) * act
        mb_tokens = workload.micro_batch_size // (1 if layout.pp == 1 else layout.microbatches) * workload.seq_len
        in_flight = 0
        if layout.ep > 1 and any(cfg.is_moe_layer(i) for s in stages for i in s.layer_ids):
            in_flight += 2 * mb_tokens * min(cfg.moe.top_k, layout.ep) * cfg.d_model * act
        if layout.tp > 1:
            in_flight += mb_tokens * cfg.d_model * act
        grad_buffer = max(n - routed, routed) * GRAD_BYTES if layout.world > 1 else 0
        static = n * (MASTER_BYTES + GRAD_BYTES + ADAMW_BYTES)
        transient = (mb_tokens * cfg.vocab_size * act if any(s.last for s in stages) else 0) \
            + _largest_weight(cfg, stages, layout) * GRAD_BYTES
        mem = Memory(params=n * MASTER_BYTES, grads=n * GRAD_BYTES, optimizer=n * ADAMW_BYTES,
                     activations=activations, comm_buffers=max(in_flight, grad_buffer), backward_transient=transient,
                     peak=static + max(activations + in_flight + transient, grad_buffer),
                     routed_expert_fraction=routed / n if n else 0.0)
        if best is None or mem.peak > best.peak:
            best = mem
    return best


# ---- step time ------------------------------------------------------------------------------------
def _bandwidth(cluster: ClusterConfig, span: int) -> float:
    """Bytes/s of a group spanning `span` consecutive ranks."""
    gbps = cluster.intra_node_gbps if _intra(cluster, span) else cluster.inter_node_gbps
    return gbps * 1e9 if gbps > 0 else math.inf


def _intra(cluster: ClusterConfig, span: int) -> bool:
    return cluster.gpus_per_node == 0 or span <= cluster.gpus_per_node


COLLECTIVE_STEPS = {"all_reduce": lambda n: 2 * (n - 1), "all_to_all": lambda n: n - 1, "send": lambda n: 1}


def latency(cluster: ClusterConfig, kind: str, n: int, span: int) -> float:
    """Seconds one collective of `kind` over `n` ranks (spanning `span` consecutive ranks) costs before its
    bytes move: `collective_base_us` + steps x the hop latency (inside a node or across nodes)."""
    if n <= 1:
        return 0.0
    hop = cluster.intra_node_hop_us if _intra(cluster, span) else cluster.inter_node_hop_us
    return (cluster.collective_base_us + COLLECTIVE_STEPS[kind](n) * hop) * 1e-6


def recompute_flops_per_token(cfg: ModelConfig, seq_len: int, recompute: str) -> float:
    """Forward FLOPs per token that recomputation runs a second time."""
    if recompute == "none":
        return 0.0
    m, d = cfg.moe, cfg.d_model
    moe_fwd = 2 * (d * m.n_routed_experts + 3 * d * m.expert_hidden * (m.top_k + m.n_shared_experts))
    if recompute == "moe":
        return cfg.n_moe_layers * moe_fwd
    counts = param_counts(cfg)
    head = 0 if cfg.tie_embeddings else cfg.vocab_size * d
    return 2.0 * (counts.active - counts.embedding - head) + 4.0 * cfg.n_layers * d * seq_len


def tp_replicated_flops_per_token(cfg: ModelConfig, recompute: str) -> float:
    """Training FLOPs per token that tensor parallelism does not split (every tp rank runs them in full):
    the router, the routed experts and the head (moe/parallel/tensor.py), and their recomputation."""
    m, d = cfg.moe, cfg.d_model
    routed = d * m.n_routed_experts + 3 * d * m.expert_hidden * m.top_k  # per MoE layer and token
    head = cfg.vocab_size * d
    again = cfg.n_moe_layers * 2 * routed if recompute != "none" else 0
    return 6.0 * (cfg.n_moe_layers * routed + head) + again


def tp_all_reduces_per_layer(cfg: ModelConfig, layer: int) -> int:
    """All-reduces one tp rank issues per layer and microbatch: one forward per row-wise module (`wo`, `w2`),
    one backward per column-wise module (`wq`, `wk`, `wv`, `w1`, `w3`: the input gradient is a partial sum)."""
    split_ffn = not cfg.is_moe_layer(layer) or cfg.moe.n_shared_experts > 0
    return 4 + (3 if split_ffn else 0)


def step_time(workload: Workload, layout: Layout, cluster: ClusterConfig, peak_flops: float, mem: Memory,
              host: HostRates | None = None) -> StepTime:
    """`host`: rates measured on the host (CPU); None: the profile's peak x `expected_mfu`."""
    cfg, act = workload.model, ACT_BYTES[cluster.dtype]
    tokens = workload.micro_batch_size * workload.seq_len  # per data-parallel rank (pipeline)
    per_token = flops_per_token(cfg, workload.seq_len) + recompute_flops_per_token(cfg, workload.seq_len,
                                                                                 workload.recompute)
    replicated = tp_replicated_flops_per_token(cfg, workload.recompute) if layout.tp > 1 else 0.0
    rate = host.matmul_flops if host else peak_flops * cluster.expected_mfu
    compute = tokens * ((per_token - replicated) / layout.tp + replicated) / layout.pp / rate
    other = tokens * host.other_s_per_token / layout.pp if host else 0.0
    micro = layout.microbatches if layout.pp > 1 else 1  # collectives per layer are issued per microbatch
    stages = stages_by_rank(cfg, layout.pp, layout.virtual_stages)
    layer_ids = max(([i for s in st for i in s.layer_ids] for st in stages), key=len)  # the largest stage
    moe_layers = sum(cfg.is_moe_layer(i) for i in layer_ids)
    tp = 0.0
    if layout.tp > 1:
        per_bytes = 2 * (layout.tp - 1) / layout.tp * tokens * cfg.d_model * act / _bandwidth(cluster, layout.tp)
        calls = sum(tp_all_reduces_per_layer(cfg, i) for i in layer_ids)
        tp = calls * (per_bytes + micro * latency(cluster, "all_reduce", layout.tp, layout.tp))
    a2a = 0.0
    if layout.ep > 1:
        rows = tokens * min(cfg.moe.top_k, layout.ep) * (layout.ep - 1) / layout.ep
        span = layout.tp * layout.ep
        a2a = moe_layers * (4 * rows * cfg.d_model * act / _bandwidth(cluster, span)
                            + 8 * micro * latency(cluster, "all_to_all", layout.ep, span))
    n_data = layout.dp * layout.ep
    dp = 0.0
    if n_data > 1:
        if cluster.memory_gbps > 0:  # the sync's own passes over the gradients (the all-reduce's aside)
            flattened = mem.grads * (1 - mem.routed_expert_fraction if layout.dp == 1 else 1)
            scaled = mem.grads * mem.routed_expert_fraction if layout.dp == 1 else 0
            dp += (flattened * GRAD_FLATTEN_TRAFFIC_BYTES + scaled * GRAD_SCALE_TRAFFIC_BYTES) / GRAD_BYTES \
                / (cluster.memory_gbps * 1e9)
        span = layout.tp * layout.ep * layout.dp
        grad_bytes = mem.grads * (1 - mem.routed_expert_fraction)  # experts reduce over dp only
        dp += 2 * (n_data - 1) / n_data * grad_bytes / _bandwidth(cluster, span) \
            + latency(cluster, "all_reduce", n_data, span)
        dp += 2 * moe_layers * micro * latency(cluster, "all_reduce", n_data, span)  # router statistics
        if layout.dp > 1:
            dp += 2 * (layout.dp - 1) / layout.dp * mem.grads * mem.routed_expert_fraction / _bandwidth(cluster, span)
            if layout.ep > 1:  # the sharded experts' own all-reduce (with ep = 1 they share the one above)
                dp += latency(cluster, "all_reduce", layout.dp, span)
    pp_send = bubble = 0.0
    if layout.pp > 1:
        pp_send = 2 * tokens * cfg.d_model * act / _bandwidth(cluster, layout.world) \
            + 2 * micro * layout.virtual_stages * latency(cluster, "send", 2, layout.world)
        bubble = compute * (layout.pp - 1) / (layout.microbatches * layout.virtual_stages)
    optimizer = mem.params // MASTER_BYTES * ADAMW_TRAFFIC_BYTES / (cluster.memory_gbps * 1e9) \
        if cluster.memory_gbps > 0 else 0.0
    return StepTime(compute, tp, a2a, dp, pp_send, bubble, optimizer, other)


def estimate(workload: Workload, layout: Layout, cluster: ClusterConfig, peak_flops: float | None = None,
             host: HostRates | None = None) -> Estimate:
    """Memory and step time of `layout`; `peak_flops` defaults to the profile's (0 on CPU: no time), and
    `host` (rates measured on a CPU host) replaces peak x expected_mfu when given."""
    peak = peak_flops if peak_flops is not None else cluster.peak_tflops * 1e12
    capacity = int(cluster.gpu_memory_gb * GIB * USABLE_FRACTION)
    tokens = workload.micro_batch_size * workload.seq_len * layout.dp * layout.ep
    mem = memory(workload, layout, cluster)
    timed = peak > 0 or host is not None
    return Estimate(layout, mem, step_time(workload, layout, cluster, peak, mem, host) if timed else None,
                    capacity, tokens)


def fix_for(est: Estimate, workload: Workload) -> str:
    """The knob that shrinks the largest memory term."""
    term, _ = est.largest_term()
    if term in ("parameters", "gradients", "optimizer states"):
        if est.memory.routed_expert_fraction >= 0.5:
            return (f"raise parallel.ep (routed experts are {est.memory.routed_expert_fraction:.0%} of a rank's "
                    "parameters) or parallel.pp (fewer layers per rank), or use parallel=auto")
        return "raise parallel.pp (fewer layers per rank) or parallel.tp (split attention and feed-forward), " \
               "or use parallel=auto"
    if term == "activations" and workload.recompute != "full":
        nxt = "moe" if workload.recompute == "none" else "full"
        return f"set train.activation_checkpointing={nxt} (or full), or lower train.micro_batch_size"
    return "lower train.micro_batch_size, or raise parallel.pp or parallel.tp"


def check_fits(est: Estimate, workload: Workload, cluster: ClusterConfig) -> None:
    """ConfigError naming the largest term and the knob that fixes it when the layout does not fit."""
    if est.fits:
        return
    term, size = est.largest_term()
    raise ConfigError(
        f"layout {est.layout.describe()} needs {est.memory.peak / GIB:.1f} GiB per device but "
        f"{cluster.name}'s {cluster.gpu_memory_gb:g} GB leaves {est.capacity / GIB:.1f} GiB usable; the largest term "
        f"is {term} ({size / GIB:.1f} GiB): {fix_for(est, workload)}.")


def describe(est: Estimate) -> list[str]:
    """The dry run's planner lines."""
    m = est.memory
    cap = f" of {est.capacity / GIB:.1f} GiB usable ({'fits' if est.fits else 'DOES NOT FIT'})" if est.capacity else ""
    lines = [f"memory/device  {m.params / GIB:.2f} GiB params + {m.grads / GIB:.2f} grads + "
             f"{m.optimizer / GIB:.2f} AdamW + {m.activations / GIB:.2f} activations + "
             f"{m.comm_buffers / GIB:.2f} comm buffers + {m.backward_transient / GIB:.2f} backward transients "
             f"-> peak {m.peak / GIB:.2f} GiB{cap}"]
    if est.time is None:
        lines.append("step time      needs cluster.peak_tflops (on CPU the matmul peak is measured at run start)")
        return lines
    t = est.time
    lines.append(f"step time      {t.total_s:.3f} s = compute {t.compute_s:.3f} + tp {t.tp_s:.3f} + all-to-all "
                 f"{t.all_to_all_s:.3f} + dp {t.dp_s:.3f} + pp send {t.pp_send_s:.3f} + bubble {t.bubble_s:.3f} + "
                 f"AdamW {t.optimizer_s:.3f}"
                 + (f" + other ops {t.other_ops_s:.3f}" if t.other_ops_s else "")
                 + f" -> {est.tokens_per_s:,.0f} tokens/s")
    return lines


# ---- parallel=auto --------------------------------------------------------------------------------
def _divisors(n: int) -> list[int]:
    return [i for i in range(1, n + 1) if n % i == 0]


def candidate_layouts(workload: Workload, cluster: ClusterConfig, world: int, base: Layout) -> list[Layout]:
    """Every dp x tp x pp x ep of `world` the model and batch allow: tp within a node and dividing the
    heads and feed-forward widths, ep dividing the experts, pp dividing the batch and the layers."""
    cfg, b = workload.model, workload.micro_batch_size
    node = cluster.gpus_per_node or world
    widths = [cfg.n_heads, cfg.n_kv_heads] + ([cfg.dense_hidden] if cfg.n_dense_layers else []) + (
        [cfg.moe.n_shared_experts * cfg.moe.expert_hidden] if cfg.n_moe_layers and cfg.moe.n_shared_experts else [])
    out = []
    for tp in _divisors(world):
        if tp > node or node % tp or any(w % tp for w in widths):
            continue
        for pp in _divisors(world // tp):
            if pp > cfg.n_layers or b % (pp * tp):  # every rank of a pipeline's tp groups reads a share
                continue
            micro = base.microbatches if pp == 1 else max(base.microbatches, pp)
            if pp > 1 and b % micro:
                continue
            for ep in _divisors(world // (tp * pp)):
                if cfg.n_moe_layers and cfg.moe.n_routed_experts % ep or (not cfg.n_moe_layers and ep > 1):
                    continue
                out.append(dataclasses.replace(base, dp=world // (tp * pp * ep), tp=tp, pp=pp, ep=ep,
                                               microbatches=micro, virtual_stages=1,
                                               schedule=base.schedule if base.virtual_stages == 1 else "1f1b"))
    return out


def _rank_key(est: Estimate) -> tuple:
    speed = -est.tokens_per_s if est.time else 0.0
    return (speed, est.memory.peak, est.layout.pp, est.layout.tp)


def choose_layout(workload: Workload, cluster: ClusterConfig, world: int, base: Layout | None = None
                  ) -> tuple[Layout, list[str]]:
    """`parallel=auto`: the fitting layout with the highest predicted tokens/s (the least memory when the
    profile has no peak), and the lines that say why. ConfigError when none fits."""
    ests = [estimate(workload, lay, cluster) for lay in candidate_layouts(workload, cluster, world, base or Layout(1))]
    fitting = sorted((e for e in ests if e.fits), key=_rank_key)
    if not fitting:
        smallest = min(ests, key=lambda e: e.memory.peak)
        term, size = smallest.largest_term()
        fix = ("add workers (cluster.num_workers)" if term in ("parameters", "gradients", "optimizer states")
               else fix_for(smallest, workload) + ", or add workers (cluster.num_workers)")
        raise ConfigError(
            f"parallel=auto: no layout of {world} devices fits {workload.model.name} on {cluster.name} "
            f"({smallest.capacity / GIB:.1f} GiB usable); the smallest, {smallest.layout.describe()}, needs "
            f"{smallest.memory.peak / GIB:.1f} GiB, largest term {term} ({size / GIB:.1f} GiB): {fix}.")
    best = fitting[0]
    why = [f"auto           {best.layout.describe()}: {len(fitting)} of {len(ests)} layouts of {world} devices fit"]
    if best.time:
        why.append(f"               fastest predicted ({best.tokens_per_s:,.0f} tokens/s, peak "
                   f"{best.memory.peak / GIB:.1f} GiB)")
    for e in fitting[1:3]:
        speed = f"{e.tokens_per_s:,.0f} tokens/s, " if e.time else ""
        why.append(f"               next: {e.layout.describe()} ({speed}peak {e.memory.peak / GIB:.1f} GiB)")
    too_big = [e for e in ests if not e.fits]
    if too_big:
        e = min(too_big, key=lambda x: x.memory.peak)
        why.append(f"               {len(too_big)} do not fit, e.g. {e.layout.describe()} needs "
                   f"{e.memory.peak / GIB:.1f} GiB ({e.largest_term()[0]} largest)")
    return best.layout, why
