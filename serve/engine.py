"""The continuous-batching loop of one model replica.

Requests put their sequences in a waiting queue; one asyncio task runs the `BatchDecoder`
(moe/generate.py): it admits waiting sequences into free KV-cache slots with one batched prefill,
then runs one batched decode step over every active sequence, and repeats, so new requests join
between decode steps and finished ones leave at once. When the batch is empty it waits up to
`batch_wait_timeout_s` for more arrivals before a prefill (dynamic batching). Forward passes run
in a worker thread so the replica's event loop keeps answering health checks and new requests.
After each step every touched sequence gets a `SeqEvent` (new tokens, logprobs, text delta,
finish reason, routing when asked, or the error of a sequence that failed) on its request's queue.
Every `expert_load_interval_s`, and when the batch drains, the MoE layers' dispatch counters go to
the per-layer max/min gauges (`EngineMetrics`) and the per-expert shares (`ExpertLoadMetrics`). A failing step
fails only the sequences that fail alone (BatchDecoder isolates them); the others of the batch go
on as they would have alone.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from moe.generate import BatchDecoder, Sequence, TokenLogprob, TokenRouting
from serve.config import EngineConfig
from serve.metrics import EngineMetrics, ExpertLoadMetrics

logger = logging.getLogger("ray.serve")


class EngineOverloaded(RuntimeError):
    """More sequences waiting than `engine.max_waiting`."""


class EngineFailed(RuntimeError):
    """A forward pass raised; the sequences in it are ended with this error."""


@dataclass
class SeqEvent:
    index: int  # position of the sequence in the request
    token_ids: list[int]
    logprobs: list[TokenLogprob]
    text: str
    finish_reason: str | None
    prompt_logprobs: list[TokenLogprob | None] | None = None
    error: str | None = None
    routing: list[TokenRouting] = field(default_factory=list)  # the new tokens' (Sequence.record_routing)


@dataclass
class _Request:
    seqs: list[Sequence]
    queue: asyncio.Queue = field(default_factory=asyncio.Queue)
    sent_tokens: list[int] = field(default_factory=list)
    sent_prompt: list[bool] = field(default_factory=list)
    queued_at: float = field(default_factory=time.monotonic)  # for time to first token (metrics)
    first_token_at: dict[int, float] = field(default_factory=dict)  # sequence index -> when its first token came


class Engine:
    def __init__(self, decoder: BatchDecoder, cfg: EngineConfig, metrics: EngineMetrics,
                 expert_load: ExpertLoadMetrics | None = None) -> None:
        self.decoder = decoder
        self.cfg = cfg
        self.metrics = metrics
        self.expert_load = expert_load
        self._last_load = time.monotonic()
        self.waiting: deque[Sequence] = deque()
        self._owner: dict[str, tuple[_Request, int]] = {}
        self._aborted: set[str] = set()
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="moe-engine")
        self._wake: asyncio.Event | None = None
        self._task: asyncio.Task | None = None
        self._last_log = time.monotonic()
        self.steps = 0

    # ---- request side -------------------------------------------------------------------------
    async def generate(self, seqs: list[Sequence]) -> AsyncIterator[SeqEvent]:
        """Queue `seqs` and yield their events until all are finished; aborts them if the caller leaves."""
        self._ensure_started()
        if not self.has_room(len(seqs)):
            raise EngineOverloaded(
                f"{len(self.waiting)} sequences already wait for a batch slot (engine.max_waiting="
                f"{self.cfg.max_waiting}); retry later.")
        req = _Request(seqs, sent_tokens=[0] * len(seqs), sent_prompt=[False] * len(seqs))
        for i, s in enumerate(seqs):
            self._owner[s.id] = (req, i)
            self.waiting.append(s)
        assert self._wake is not None
        self._wake.set()
        remaining = len(seqs)
        try:
            while remaining:
                event: SeqEvent = await req.queue.get()
                if event.finish_reason is not None or event.error is not None:
                    remaining -= 1
                yield event
        finally:
            for s in seqs:
                self._owner.pop(s.id, None)
                if not s.done:
                    self._aborted.add(s.id)
            if self._wake is not None:
                self._wake.set()

    def has_room(self, n: int) -> bool:
        return len(self.waiting) + n <= self.cfg.max_waiting

    def check_health(self) -> None:
        if self._task is not None and self._task.done():
            exc = self._task.exception() if not self._task.cancelled() else None
            raise RuntimeError(f"the batching loop has stopped: {exc!r}")

    # ---- loop side ----------------------------------------------------------------------------
    def _ensure_started(self) -> None:
        if self._task is None or self._task.done():
            self._wake = asyncio.Event()
            self._task = asyncio.get_running_loop().create_task(self._run())

    def _drop_aborted(self) -> None:
        if not self._aborted:
            return
        self.waiting = deque(s for s in self.waiting if s.id not in self._aborted)
        for seq in list(self.decoder.active.values()):
            if seq.id in self._aborted:
                self.decoder.abort(seq)
        self._aborted.clear()

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        assert self._wake is not None
        while True:
            self._drop_aborted()
            if not self.waiting and not self.decoder.active:
                self._wake.clear()
                await self._wake.wait()
                continue
            if (self.waiting and not self.decoder.active and self.cfg.batch_wait_timeout_s > 0
                    and len(self.waiting) < self.decoder.n_free):
                await asyncio.sleep(self.cfg.batch_wait_timeout_s)  # let a burst of requests arrive together
                self._drop_aborted()
            admit = self._take_admissions()
            if admit:
                await self._step(loop, "prefill", admit)
            if self.decoder.active:
                await self._step(loop, "decode", None)
            self._maybe_log()
            self._maybe_publish_load(force=not self.decoder.active)  # and whenever the batch drains

    def _take_admissions(self) -> list[Sequence]:
        """Waiting sequences for the next prefill: up to the free slots, and (padded) prompt tokens up
        to `engine.max_prefill_tokens`, so one prefill's activations and logits stay bounded."""
        admit: list[Sequence] = []
        longest = 0
        while self.waiting and len(admit) < self.decoder.n_free:
            n = len(self.waiting[0].prompt_ids)
            if admit and (len(admit) + 1) * max(longest, n) > self.cfg.max_prefill_tokens:
                break
            longest = max(longest, n)
            admit.append(self.waiting.popleft())
        return admit

    async def _step(self, loop: asyncio.AbstractEventLoop, phase: str, admit: list[Sequence] | None) -> None:
        try:
            if admit is not None:
                seqs = await loop.run_in_executor(self._executor, self.decoder.prefill, admit)
            else:
                seqs = await loop.run_in_executor(self._executor, self.decoder.decode)
        except Exception as err:  # a failed forward pass ends its sequences, not the replica
            logger.exception("engine %s step failed", phase)
            # a failed prefill touched only the admitted sequences' slots; a failed decode, all active ones
            failed = list(admit) if admit is not None else list(self.decoder.active.values())
            for s in failed:
                self.decoder.abort(s)
                self._emit(s, error=f"{type(err).__name__}: {err}")
            return
        self.steps += 1
        new_tokens = 0
        for s in seqs:
            owner = self._owner.get(s.id)
            if owner is not None:
                new_tokens += len(s.output_ids) - owner[0].sent_tokens[owner[1]]
            self._emit(s)
        self.metrics.observe_step(phase, len(seqs), new_tokens, len(self.waiting), len(self.decoder.active))

    def _emit(self, s: Sequence, error: str | None = None) -> None:
        error = error or s.error  # a sequence that failed alone (moe/generate.py isolates failures)
        if s.error is not None:
            logger.error("engine: sequence %s failed: %s", s.id, s.error)
        owner = self._owner.get(s.id)
        if owner is None:
            return
        req, i = owner
        start = req.sent_tokens[i]
        new_ids = s.output_ids[start:]
        req.sent_tokens[i] = len(s.output_ids)
        self._observe_latency(req, i, start, len(s.output_ids), s.finish_reason is not None)
        prompt_lp = None
        if not req.sent_prompt[i]:
            req.sent_prompt[i] = True
            prompt_lp = s.prompt_logprobs
        req.queue.put_nowait(SeqEvent(
            index=i, token_ids=new_ids, logprobs=s.logprobs[start:] if s.logprobs else [],
            text=s.take_text() if s.detokenize is not None else "", finish_reason=s.finish_reason,
            prompt_logprobs=prompt_lp, error=error, routing=s.routing[start:]))

    def _maybe_publish_load(self, force: bool = False) -> None:
        now = time.monotonic()
        if not force and now - self._last_load < self.cfg.expert_load_interval_s:
            return
        self._last_load = now  # the one reader of the layers' counters: both metrics get the same interval
        loads = {name: [int(n) for n in m.take_load().tolist()] for name, m in self.decoder.model.moe_layers().items()}
        self.metrics.observe_expert_load(loads)
        if self.expert_load is not None:
            self.expert_load.observe(loads)

    def _observe_latency(self, req: _Request, i: int, sent_before: int, n_out: int, finished: bool) -> None:
        now = time.monotonic()
        if sent_before == 0 and n_out > 0:
            req.first_token_at[i] = now
            self.metrics.observe_latency(first_token_s=now - req.queued_at)
        if finished and n_out > 1 and i in req.first_token_at:
            self.metrics.observe_latency(per_token_s=(now - req.first_token_at[i]) / (n_out - 1))

    def _maybe_log(self) -> None:
        now = time.monotonic()
        if now - self._last_log >= self.cfg.log_interval_s:
            self._last_log = now
            snap = self.metrics.snapshot()
            logger.info("engine: active=%d waiting=%d steps=%d mean_decode_batch=%.2f tokens/s=%.1f",
                        len(self.decoder.active), len(self.waiting), self.steps,
                        snap["mean_decode_batch_size"], snap["tokens_per_s"])
