"""KV-cache decoding for serving and evaluation: sampling, sequences and a batch decoder over the
slot cache of moe/kv_cache.py.

- `SamplingParams` / `Sequence`: temperature, top-p, top-k, seed (a generator per sequence, so a
  seeded result does not depend on what else is in the batch), max_tokens, stop token ids, stop
  strings (with a `detokenize` function), an optional text check (content filter), the chosen
  token's logprob with the top alternatives, and prompt logprobs (for scoring, `echo`).
- `sample_tokens`: OpenAI's logit adjustments first, per row of the batch (each sequence its own):
  `logits[j] += logit_bias[j] - count[j] * frequency_penalty - (count[j] > 0) * presence_penalty`,
  `count[j]` = how often token j occurs in the sequence's generated tokens; a bias of -100 bans the
  token outright (unless it bans every token), +100 makes it all but certain. Then greedy or
  temperature / top-k / top-p. Logprobs stay the model's own (before the adjustments).
- `BatchDecoder`: continuous batching on one device. `prefill(seqs)` admits new sequences into free
  slots with one forward pass (right-padded), `decode()` advances every active sequence by one
  token with one forward pass; finished sequences free their slot at once, so new ones can be
  admitted between decode steps. `generate()` is the one-call version.
- Routing inspection: a sequence made with `record_routing=True` gets, per generated token, each MoE
  layer's chosen experts and combine weights (`Sequence.routing`, `TokenRouting`), taken from the
  forward pass whose logits chose the token (the prompt's last position for the first token, the
  previous token's decode step after that), recorded by the MoE layers themselves (`record_routing`).
- Isolation: a step that raises (forward pass or sampling) is run again for each of its sequences
  alone (nothing was committed to the cache, no draw was taken), so only the sequences that fail
  alone fail (`Sequence.error`, slot freed) and the others continue exactly as they would have
  alone; an error while recording one sequence's token (its detokenizer or text check) fails that
  sequence only.
"""

from __future__ import annotations

import heapq
import secrets
from collections.abc import Callable
from collections.abc import Sequence as SequenceABC
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from moe.kv_cache import KVCache
from moe.model import MoETransformer
from moe.moe import record_routing

FINISH_STOP, FINISH_LENGTH, FINISH_FILTER = "stop", "length", "content_filter"


@dataclass
class SamplingParams:
    max_tokens: int = 16
    temperature: float = 1.0  # 0: greedy
    top_p: float = 1.0
    top_k: int = 0  # 0 (or -1): no top-k cut
    seed: int | None = None
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    logprobs: int | None = None  # None: none; k >= 0: the chosen token's logprob and the top k
    prompt_logprobs: int | None = None  # same for prompt tokens (the first has none)
    presence_penalty: float = 0.0  # OpenAI: subtracted once from every token already generated
    frequency_penalty: float = 0.0  # OpenAI: subtracted per occurrence in the generated tokens
    logit_bias: tuple[tuple[int, float], ...] = ()  # (token id, bias in [-100, 100]); -100 bans the token

    @property
    def adjusts_logits(self) -> bool:
        return bool(self.presence_penalty or self.frequency_penalty or self.logit_bias)

    def validate(self) -> SamplingParams:
        checks = [
            (self.max_tokens >= 0, f"max_tokens={self.max_tokens} must be >= 0"),
            (self.temperature >= 0, f"temperature={self.temperature} must be >= 0"),
            (0 < self.top_p <= 1, f"top_p={self.top_p} must be in (0, 1]"),
            (self.top_k >= -1, f"top_k={self.top_k} must be >= 0 (0 or -1 disables it)"),
            (self.logprobs is None or self.logprobs >= 0, f"logprobs={self.logprobs} must be >= 0"),
            (self.prompt_logprobs is None or self.prompt_logprobs >= 0,
             f"prompt_logprobs={self.prompt_logprobs} must be >= 0"),
            (-2 <= self.presence_penalty <= 2, f"presence_penalty={self.presence_penalty} must be in [-2, 2]"),
            (-2 <= self.frequency_penalty <= 2, f"frequency_penalty={self.frequency_penalty} must be in [-2, 2]"),
            (all(t >= 0 and -100 <= b <= 100 for t, b in self.logit_bias),
             "logit_bias: token ids must be >= 0 and biases in [-100, 100]"),
        ]
        for ok, msg in checks:
            if not ok:
                raise ValueError(msg)
        return self


@dataclass
class TokenLogprob:
    token_id: int
    logprob: float
    top: list[tuple[int, float]] = field(default_factory=list)  # (token id, logprob), best first


@dataclass
class TokenRouting:
    """Which experts each MoE layer chose for one generated token, and their combine weights."""

    experts: list[list[int]]  # (moe layers, top_k)
    weights: list[list[float]]  # (moe layers, top_k)


class Sequence:
    """One prompt being continued: its sampling state, outputs, logprobs, text and finish reason."""

    def __init__(self, prompt_ids: SequenceABC[int], params: SamplingParams, *, eos_ids: SequenceABC[int] = (),
                 detokenize: Callable[[list[int]], str] | None = None,
                 text_check: Callable[[str], int | None] | None = None, text_hold: int | None = 0,
                 seq_id: str | None = None, stream_text: bool = True, record_routing: bool = False) -> None:
        if not prompt_ids:
            raise ValueError("a prompt needs at least one token.")
        self.id = seq_id or secrets.token_hex(8)
        self.prompt_ids = list(prompt_ids)
        self.params = params
        self.stop_ids = set(params.stop_token_ids) | (set() if params.ignore_eos else set(eos_ids))
        self.detokenize = detokenize
        self.text_check = text_check
        self.text_hold = text_hold  # trailing characters `take_text` keeps back while running; None: all
        self.record_routing = record_routing
        self.routing: list[TokenRouting] = []  # one per output token, when record_routing
        # Decode the text after every token only when something reads it then (stop strings, the
        # text check, streaming); otherwise once, at the end.
        self.text_every_step = bool(stream_text or params.stop or text_check)
        seed = params.seed if params.seed is not None else secrets.randbits(63)
        self.generator = torch.Generator().manual_seed(seed % 2**64)  # any integer seed, as 64 bits
        self.output_ids: list[int] = []
        self.logprobs: list[TokenLogprob] = []
        self.prompt_logprobs: list[TokenLogprob | None] | None = None
        self.finish_reason: str | None = None
        self.error: str | None = None  # why generating this sequence failed (it is then done)
        self.text = ""
        self.emitted = 0  # characters of `text` already handed out by `take_text`
        self.slot: int | None = None
        if params.max_tokens == 0:
            self.finish_reason = FINISH_LENGTH

    @property
    def done(self) -> bool:
        return self.finish_reason is not None or self.error is not None

    def fail(self, err: BaseException) -> None:
        self.error = f"{type(err).__name__}: {err}"

    def append(self, token_id: int, logprob: TokenLogprob | None, max_len: int) -> None:
        """Record a sampled token and decide whether the sequence is finished."""
        if token_id in self.stop_ids:
            self.finish_reason = FINISH_STOP
            if self.detokenize is not None and not self.text_every_step:
                self.text = self.detokenize(self.output_ids)
            return
        self.output_ids.append(token_id)
        if logprob is not None:
            self.logprobs.append(logprob)
        if self.detokenize is not None and self.text_every_step:
            self._update_text()
        if not self.done and (len(self.output_ids) >= self.params.max_tokens
                              or len(self.prompt_ids) + len(self.output_ids) >= max_len):
            self.finish_reason = FINISH_LENGTH
        if self.done and self.detokenize is not None and not self.text_every_step:
            self.text = self.detokenize(self.output_ids)

    def _update_text(self) -> None:
        assert self.detokenize is not None
        prev = len(self.text)
        self.text = self.detokenize(self.output_ids)
        if self.params.stop:
            longest = max(len(s) for s in self.params.stop)
            start = max(0, min(prev, len(self.text)) - longest + 1)
            hits = [i for i in (self.text.find(s, start) for s in self.params.stop) if i >= 0]
            if hits:
                self.text = self.text[:min(hits)]
                self.finish_reason = FINISH_STOP
        if self.text_check is not None:
            blocked_at = self.text_check(self.text)
            if blocked_at is not None:
                self.text = self.text[:blocked_at]
                self.finish_reason = FINISH_FILTER

    def take_text(self) -> str:
        """Text not handed out yet; while running, hold back an incomplete UTF-8 character, any tail
        that could still become a stop string, and the last `text_hold` characters (the longest text
        the text check can block, so no part of a blocked phrase is handed out before it is seen)."""
        n_text = end = len(self.text)
        if not self.done:
            for s in self.params.stop:
                for n in range(min(len(s) - 1, n_text), 0, -1):
                    if self.text[n_text - n:] == s[:n]:
                        end = min(end, n_text - n)
                        break
            end = 0 if self.text_hold is None else max(0, min(end, n_text - self.text_hold))
            while end > self.emitted and self.text[end - 1] == "\ufffd":
                end -= 1
        if end <= self.emitted:
            return ""
        delta = self.text[self.emitted:end]
        self.emitted = end
        return delta


def _logprob_entries(logp_V: torch.Tensor, token_id: int, k: int) -> TokenLogprob:
    top: list[tuple[int, float]] = []
    if k > 0:
        vals, idx = logp_V.topk(min(k, logp_V.shape[-1]))
        top = list(zip(idx.tolist(), vals.tolist()))
    return TokenLogprob(token_id, float(logp_V[token_id]), top)


BAN = -100.0  # a logit_bias of -100 bans the token (OpenAI: "should result in a ban")


def adjust_logits(logits_BV: torch.Tensor, seqs: SequenceABC[Sequence]) -> torch.Tensor:
    """OpenAI's logit_bias, presence_penalty and frequency_penalty, each row with its own sequence's
    settings, over that sequence's generated tokens (float32 logits; returns adjusted ones).
    Ids outside the logits are ignored (the server checks them against the vocabulary first)."""
    rows = [i for i, s in enumerate(seqs) if s.params.adjusts_logits]
    if not rows:
        return logits_BV
    V = logits_BV.shape[-1]
    logits_BV = logits_BV.clone()  # the caller's logits stay the model's (logprobs read them)
    x_RV = logits_BV[rows]
    flat = [r * V + t for r, i in enumerate(rows) for t in seqs[i].output_ids if 0 <= t < V]
    counts_RV = torch.bincount(torch.tensor(flat, dtype=torch.long), minlength=len(rows) * V).view(len(rows), V)
    freq_R1 = torch.tensor([[seqs[i].params.frequency_penalty] for i in rows])
    pres_R1 = torch.tensor([[seqs[i].params.presence_penalty] for i in rows])
    x_RV -= counts_RV * freq_R1 + (counts_RV > 0) * pres_R1
    entries = [(r, t, b) for r, i in enumerate(rows) for t, b in seqs[i].params.logit_bias if 0 <= t < V]
    if entries:
        r_E, t_E, b_E = (torch.tensor(c) for c in zip(*entries))
        bias_RV = torch.zeros_like(x_RV).index_put_((r_E, t_E), b_E.float())
        banned_RV = torch.zeros_like(x_RV, dtype=torch.bool).index_put_((r_E, t_E), b_E <= BAN)
        banned_RV &= ~banned_RV.all(-1, keepdim=True)  # a row that bans every token bans none
        x_RV = (x_RV + bias_RV).masked_fill(banned_RV, float("-inf"))
    logits_BV[rows] = x_RV
    return logits_BV


def sample_tokens(logits_BV: torch.Tensor, seqs: SequenceABC[Sequence]) -> torch.Tensor:
    """One token per row: logit bias and penalties (`adjust_logits`), then greedy where temperature is
    0, else temperature, top-k, top-p, each row drawing from its own sequence's generator. Only rows
    with top_p < 1 pay for a full sort."""
    logits_BV = adjust_logits(logits_BV.float().cpu(), seqs)
    out_B = logits_BV.argmax(-1)
    rows = [i for i, s in enumerate(seqs) if s.params.temperature > 0]
    if not rows:
        return out_B
    V = logits_BV.shape[-1]
    rows_t = torch.tensor(rows)
    temps = torch.tensor([seqs[i].params.temperature for i in rows])
    top_ks = torch.tensor([seqs[i].params.top_k if 0 < seqs[i].params.top_k < V else V for i in rows])
    top_ps = torch.tensor([seqs[i].params.top_p for i in rows])
    x_RV = logits_BV[rows_t] / temps[:, None]
    cut = top_ks < V
    if bool(cut.any()):
        k_max = int(top_ks[cut].max())
        kth_R1 = x_RV.topk(k_max, -1).values.gather(-1, (top_ks.clamp(max=k_max) - 1)[:, None])
        kth_R1 = torch.where(cut[:, None], kth_R1, torch.full_like(kth_R1, float("-inf")))
        x_RV = x_RV.masked_fill(x_RV < kth_R1, float("-inf"))
    probs_RV = torch.softmax(x_RV, -1)
    nucleus = top_ps < 1
    if bool(nucleus.any()):
        sorted_PV, order_PV = probs_RV[nucleus].sort(-1, descending=True)
        sorted_PV = sorted_PV.masked_fill(sorted_PV.cumsum(-1) - sorted_PV > top_ps[nucleus][:, None], 0.0)
        probs_RV[nucleus] = torch.zeros_like(sorted_PV).scatter(-1, order_PV, sorted_PV)
    cum_RV = probs_RV.cumsum(-1)
    u_R = torch.stack([torch.rand((), generator=seqs[i].generator) for i in rows]) * cum_RV[:, -1]
    # right side: a draw of exactly 0 never lands on a leading token of probability 0 (a banned one)
    choice_R = torch.searchsorted(cum_RV, u_R[:, None].contiguous(), right=True).clamp(max=V - 1).squeeze(-1)
    out_B[rows_t] = choice_R
    return out_B


class BatchDecoder:
    """Continuous batching over a slot KV cache: admit with `prefill`, advance with `decode`."""

    def __init__(self, model: MoETransformer, n_slots: int) -> None:
        self.model = model
        self.cfg = model.cfg
        p = next(model.parameters())
        self.device = p.device
        self.cache = KVCache(model.cfg, n_slots, device=p.device, dtype=p.dtype)
        self._free = list(range(n_slots))
        self.active: dict[int, Sequence] = {}

    @property
    def n_free(self) -> int:
        return len(self._free)

    @property
    def max_len(self) -> int:
        return self.cache.max_len

    def _release(self, seq: Sequence) -> None:
        if seq.slot is not None:
            self.active.pop(seq.slot, None)
            self.cache.reset(seq.slot)
            heapq.heappush(self._free, seq.slot)
            seq.slot = None

    def abort(self, seq: Sequence) -> None:
        """Drop a sequence (client gone); its slot is free for the next admission."""
        self._release(seq)

    @torch.no_grad()
    def prefill(self, seqs: SequenceABC[Sequence]) -> list[Sequence]:
        """Run the prompts of `seqs` (at most `n_free`) in one forward pass; sample each first token."""
        if len(seqs) > self.n_free:
            raise ValueError(f"{len(seqs)} sequences but only {self.n_free} free slots.")
        for s in seqs:
            if len(s.prompt_ids) > self.max_len:
                s.fail(ValueError(f"prompt of {len(s.prompt_ids)} tokens exceeds the context of {self.max_len}."))
        admitted = [s for s in seqs if s.error is None]
        for s in admitted:
            s.slot = heapq.heappop(self._free)
            self.active[s.slot] = s
        if admitted:
            self._isolated(admitted, self._prefill_step)
        for s in seqs:
            if s.done:
                self._release(s)
        return list(seqs)

    @torch.no_grad()
    def decode(self) -> list[Sequence]:
        """Advance every active sequence by one token in one forward pass; returns those sequences."""
        if not self.active:
            return []
        seqs = [self.active[s] for s in sorted(self.active)]
        self._isolated(seqs, self._decode_step)
        for s in seqs:
            if s.done:
                self._release(s)
        return seqs

    def _isolated(self, seqs: list[Sequence], step: Callable[[list[Sequence]], None]) -> None:
        """Run `step` for the batch; if it raises, for each sequence alone, failing those that still raise."""
        try:
            step(seqs)
            return
        except Exception as err:
            if len(seqs) == 1:
                seqs[0].fail(err)
                return
        for s in seqs:
            try:
                step([s])
            except Exception as err:
                s.fail(err)

    def _prefill_step(self, seqs: list[Sequence]) -> None:
        slots = [s.slot for s in seqs]
        lens = [len(s.prompt_ids) for s in seqs]
        tokens_BT = torch.zeros(len(seqs), max(lens), dtype=torch.long)
        for b, s in enumerate(seqs):
            tokens_BT[b, :lens[b]] = torch.tensor(s.prompt_ids)
        self.cache.begin(slots, max(lens))
        # the head runs at each prompt's last position only (sampling reads nothing else), unless a
        # sequence scores its prompt (prompt logprobs read every position)
        every_position = any(s.params.prompt_logprobs is not None for s in seqs)
        last_B1 = torch.tensor(lens)[:, None] - 1
        logits_BTV, routing_B = self._forward(seqs, tokens_BT, [n - 1 for n in lens],
                                              None if every_position else last_B1)
        if every_position:
            last_BV = logits_BTV[torch.arange(len(seqs), device=logits_BTV.device), last_B1[:, 0].to(logits_BTV.device)]
        else:
            last_BV = logits_BTV[:, 0]
        prompt_lps = {}
        for b, s in enumerate(seqs):
            if s.params.prompt_logprobs is not None:
                logp_TV = F.log_softmax(logits_BTV[b, :lens[b] - 1].float(), -1).cpu()
                prompt_lps[b] = [None] + [_logprob_entries(logp_TV[t], s.prompt_ids[t + 1], s.params.prompt_logprobs)
                                          for t in range(lens[b] - 1)]
        live = [b for b, s in enumerate(seqs) if not s.done]
        sampled = self._sample([seqs[b] for b in live], last_BV[live]) if live else None
        self.cache.commit(slots, lens)  # nothing above changed any state: a failure can be retried
        for b, lps in prompt_lps.items():
            seqs[b].prompt_logprobs = lps
        if sampled is not None:
            self._append([seqs[b] for b in live], *sampled, [routing_B[b] for b in live])

    def _decode_step(self, seqs: list[Sequence]) -> None:
        slots = [s.slot for s in seqs]
        tokens_B1 = torch.tensor([[s.output_ids[-1]] for s in seqs])
        self.cache.begin(slots, 1)
        logits_B1V, routing_B = self._forward(seqs, tokens_B1, [0] * len(seqs))
        sampled = self._sample(seqs, logits_B1V[:, 0])
        self.cache.commit(slots, [1] * len(slots))
        self._append(seqs, *sampled, routing_B)

    def _forward(self, seqs: list[Sequence], tokens_BT: torch.Tensor, pos_B: list[int],
                 logits_at_BK: torch.Tensor | None = None) -> tuple[torch.Tensor, list[TokenRouting | None]]:
        """Logits (B, T, V) over the cache (or (B, K, V) at `logits_at_BK`), and for each sequence that
        records routing the experts and weights every MoE layer used at its position `pos_B[b]` (the one
        whose logits choose its token)."""
        tokens_BT = tokens_BT.to(self.device)
        if logits_at_BK is not None:
            logits_at_BK = logits_at_BK.to(self.device)
        if not any(s.record_routing for s in seqs):
            return self.model(tokens_BT, kv_cache=self.cache, logits_at_BK=logits_at_BK), [None] * len(seqs)
        with record_routing(self.model.moe_layers()) as records:
            logits_BTV = self.model(tokens_BT, kv_cache=self.cache, logits_at_BK=logits_at_BK)
        T = tokens_BT.shape[1]
        rows = torch.tensor([b * T + t for b, t in enumerate(pos_B)])
        layers = [(idx_TK.cpu()[rows].tolist(), w_TK.float().cpu()[rows].tolist())
                  for (idx_TK, w_TK), in records.values()]  # one forward: one record per layer
        routing_B = [TokenRouting([ids[b] for ids, _ in layers], [ws[b] for _, ws in layers])
                     if s.record_routing else None for b, s in enumerate(seqs)]
        return logits_BTV, routing_B

    def _sample(self, seqs: list[Sequence], logits_BV: torch.Tensor) -> tuple[list[int], torch.Tensor | None]:
        next_B = sample_tokens(logits_BV, seqs).tolist()
        logp_BV = None
        if any(s.params.logprobs is not None for s in seqs):
            logp_BV = F.log_softmax(logits_BV.float(), -1).cpu()
        return next_B, logp_BV

    def _append(self, seqs: list[Sequence], next_B: list[int], logp_BV: torch.Tensor | None,
                routing_B: list[TokenRouting | None]) -> None:
        for b, s in enumerate(seqs):
            try:
                lp = None
                if logp_BV is not None and s.params.logprobs is not None:
                    lp = _logprob_entries(logp_BV[b], next_B[b], s.params.logprobs)
                s.append(next_B[b], lp, self.max_len)
                if routing_B[b] is not None and len(s.routing) < len(s.output_ids):
                    s.routing.append(routing_B[b])
            except Exception as err:  # this sequence's detokenizer or text check: it alone fails
                s.fail(err)


def generate(model: MoETransformer, prompts: SequenceABC[SequenceABC[int]], params: SamplingParams | None = None,
             *, eos_ids: SequenceABC[int] = (), detokenize: Callable[[list[int]], str] | None = None,
             record_routing: bool = False) -> list[Sequence]:
    """Decode all prompts together (one batch, KV cache) until each finishes; returns the sequences."""
    params = (params or SamplingParams()).validate()
    seqs = [Sequence(p, params, eos_ids=eos_ids, detokenize=detokenize, record_routing=record_routing)
            for p in prompts]
    decoder = BatchDecoder(model, max(1, len(seqs)))
    decoder.prefill(seqs)
    while decoder.active:
        decoder.decode()
    return seqs
