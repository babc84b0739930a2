"""The OpenAI API inside a model replica: turn a validated request into sequences for the engine
(tokenize, chat template, context and token checks, input content filter) and the engine's results
into OpenAI responses and stream chunks (choices, logprobs, echo, usage). Also vLLM's
tokenize/detokenize. Every error a client can cause is an `APIError` with a 4xx status.
"""

from __future__ import annotations

import logging
import secrets
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

from tokenizers import Tokenizer

from moe.generate import SamplingParams, Sequence, TokenLogprob
from serve.config import ChatTemplateConfig, EngineConfig
from serve.engine import Engine, EngineFailed, EngineOverloaded, SeqEvent
from serve.protocol import (
    APIError,
    ChatCompletionRequest,
    ChatMessage,
    CompletionRequest,
    DetokenizeRequest,
    TokenizeRequest,
)
from serve.safety import SafetyPolicy

logger = logging.getLogger("ray.serve")


@dataclass
class Prepared:
    kind: str  # "completion" | "chat"
    request_id: str
    created: int
    prompts: list[list[int]]  # one per prompt (choices repeat each prompt n times)
    prompt_texts: list[str]
    seqs: list[Sequence]
    n: int
    t0: float


def render_chat(messages: list[ChatMessage], tpl: ChatTemplateConfig, add_generation_prompt: bool = True) -> str:
    fmt = {"system": tpl.system, "developer": tpl.system, "user": tpl.user, "assistant": tpl.assistant}
    text = "".join(fmt[m.role].format(content=m.text()) for m in messages)
    return text + (tpl.generation_prompt if add_generation_prompt else "")


class OpenAIServing:
    def __init__(self, *, model_name: str, tokenizer: Tokenizer, max_len: int, vocab_size: int, engine: Engine,
                 engine_cfg: EngineConfig, chat: ChatTemplateConfig, safety: SafetyPolicy,
                 eos_ids: list[int]) -> None:
        self.model_name = model_name
        self.tok = tokenizer
        self.max_len = max_len
        self.vocab_size = min(vocab_size, tokenizer.get_vocab_size())
        self.engine = engine
        self.ecfg = engine_cfg
        self.chat = chat
        self.safety = safety
        self.eos_ids = eos_ids
        self._token_str: dict[int, str] = {}
        self.created = int(time.time())

    # ---- helpers ------------------------------------------------------------------------------
    def decode(self, ids: list[int]) -> str:
        return self.tok.decode(ids, skip_special_tokens=False)

    def token_str(self, token_id: int) -> str:
        s = self._token_str.get(token_id)
        if s is None:
            s = self._token_str[token_id] = self.decode([token_id])
        return s

    def encode(self, text: str) -> list[int]:
        return self.tok.encode(text, add_special_tokens=False).ids

    def check_model(self, name: str | None) -> None:
        if name is not None and name != self.model_name:
            raise APIError(404, f"The model {name!r} does not exist; this server serves {self.model_name!r} "
                                "(see GET /v1/models).", param="model", code="model_not_found")

    def check_ids(self, ids: list[int], param: str) -> None:
        bad = [t for t in ids if not 0 <= t < self.vocab_size]
        if bad:
            raise APIError(400, f"{param}: token id {bad[0]} is outside the vocabulary [0, {self.vocab_size}).",
                           param=param)

    def info(self) -> dict[str, Any]:
        return {"id": self.model_name, "object": "model", "created": self.created, "owned_by": "elastic-moe",
                "root": self.model_name, "max_model_len": self.max_len}

    # ---- tokenize / detokenize (vLLM) ---------------------------------------------------------
    def tokenize(self, req: TokenizeRequest) -> dict[str, Any]:
        self.check_model(req.model)
        if req.messages is not None:
            text = render_chat(req.messages, self.chat, req.add_generation_prompt)
        else:
            assert req.prompt is not None
            text = req.prompt
        ids = self.tok.encode(text, add_special_tokens=req.add_special_tokens).ids
        return {"count": len(ids), "max_model_len": self.max_len, "tokens": ids,
                "token_strs": [self.token_str(t) for t in ids] if req.return_token_strs else None}

    def detokenize(self, req: DetokenizeRequest) -> dict[str, Any]:
        self.check_model(req.model)
        self.check_ids(req.tokens, "tokens")
        return {"prompt": self.decode(req.tokens)}

    # ---- request -> sequences -----------------------------------------------------------------
    def _max_tokens(self, requested: int | None, default: int, prompt_len: int, param: str) -> int:
        room = self.max_len - prompt_len
        if prompt_len > self.max_len or (requested is not None and requested > room) or (requested is None and room <= 0):
            asked = requested if requested is not None else max(default, 1)
            raise APIError(
                400, f"This model's maximum context length is {self.max_len} tokens. However, you requested "
                     f"{prompt_len + asked} tokens ({prompt_len} in the {param}, {asked} for the completion). "
                     f"Please reduce the length of the {param} or max_tokens.",
                param=param if requested is None or prompt_len > self.max_len else "max_tokens",
                code="context_length_exceeded")
        return requested if requested is not None else min(default, room)

    def prepare(self, kind: str, req: CompletionRequest | ChatCompletionRequest) -> Prepared:
        self.check_model(req.model)
        if req.n > self.ecfg.max_n:
            raise APIError(400, f"n={req.n} is above this server's limit of {self.ecfg.max_n}.", param="n")
        stops = req.stop_list()
        if req.stop_token_ids:
            self.check_ids(req.stop_token_ids, "stop_token_ids")
        if isinstance(req, CompletionRequest):
            p = req.prompt
            if isinstance(p, str):
                texts, ids = [p], [self.encode(p)]
            elif isinstance(p[0], str):
                texts, ids = list(p), [self.encode(s) for s in p]  # type: ignore[arg-type]
            elif isinstance(p[0], int):
                ids = [list(p)]  # type: ignore[list-item]
                texts = [self.decode(ids[0])]
            else:
                ids = [list(x) for x in p]  # type: ignore[union-attr]
                texts = [self.decode(x) for x in ids]
            for x in ids:
                self.check_ids(x, "prompt")
            requested, default, param = req.max_tokens, self.ecfg.default_max_tokens, "prompt"
            logprobs, prompt_logprobs = req.logprobs, (req.logprobs if req.echo and req.logprobs is not None else None)
        else:
            texts = [render_chat(req.messages, self.chat, req.add_generation_prompt)]
            ids = [self.encode(texts[0])]
            stops = stops + [s for s in self.chat.stop if s]
            requested, default, param = req.max_new_tokens(), self.max_len, "messages"
            logprobs = (req.top_logprobs or 0) if req.logprobs else None
            prompt_logprobs = None
        if any(len(x) == 0 for x in ids):
            raise APIError(400, f"{param}: the prompt is empty after tokenization; send at least one token.",
                           param=param)
        check_texts = texts if isinstance(req, CompletionRequest) else [m.text() for m in req.messages]
        violation = self.safety.check_input(check_texts)
        if violation is not None:
            raise APIError(400, f"The request was rejected by the content policy ({violation.rule}).",
                           param=param, code="content_policy_violation")
        n_seqs = len(ids) * req.n
        if n_seqs > self.ecfg.max_waiting:
            raise APIError(400, f"{len(ids)} prompts x n={req.n} = {n_seqs} sequences is more than this server "
                                f"queues at once ({self.ecfg.max_waiting}); split the request.", param="n")
        request_id = ("cmpl-" if kind == "completion" else "chatcmpl-") + secrets.token_hex(12)
        seqs: list[Sequence] = []
        text_check: Callable[[str], int | None] | None = self.safety.output.first_blocked if self.safety.output else None
        for x in ids:
            max_tokens = self._max_tokens(requested, default, len(x), param)
            for j in range(req.n):
                params = SamplingParams(
                    max_tokens=max_tokens, temperature=req.temperature, top_p=req.top_p, top_k=req.top_k,
                    seed=None if req.seed is None else req.seed + j, stop=tuple(stops),
                    stop_token_ids=tuple(req.stop_token_ids or ()), ignore_eos=req.ignore_eos,
                    logprobs=logprobs, prompt_logprobs=prompt_logprobs)
                seqs.append(Sequence(x, params, eos_ids=self.eos_ids, detokenize=self.decode,
                                     text_check=text_check, seq_id=f"{request_id}-{len(seqs)}",
                                     stream_text=req.stream))
        return Prepared(kind, request_id, int(time.time()), ids, texts, seqs, req.n, time.perf_counter())

    # ---- running ------------------------------------------------------------------------------
    async def _events(self, prep: Prepared) -> AsyncIterator[SeqEvent]:
        try:
            async for event in self.engine.generate(prep.seqs):
                if event.error is not None:
                    raise EngineFailed(event.error)
                yield event
        except EngineOverloaded as err:
            raise APIError(503, str(err), type_="server_overloaded", code="overloaded") from err

    def usage(self, prep: Prepared) -> dict[str, int]:
        prompt = sum(len(x) for x in prep.prompts)
        completion = sum(len(s.output_ids) for s in prep.seqs)
        return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}

    def _log_done(self, prep: Prepared) -> None:
        dt = time.perf_counter() - prep.t0
        u = self.usage(prep)
        logger.info("%s done: %d choices, prompt_tokens=%d completion_tokens=%d latency=%.3fs tokens/s=%.1f "
                    "finish=%s", prep.request_id, len(prep.seqs), u["prompt_tokens"], u["completion_tokens"], dt,
                    u["completion_tokens"] / dt if dt > 0 else 0.0, sorted({s.finish_reason for s in prep.seqs}))

    async def run(self, prep: Prepared, echo: bool = False) -> dict[str, Any]:
        async for _ in self._events(prep):
            pass
        self._log_done(prep)
        choices = []
        for i, s in enumerate(prep.seqs):
            prompt_i = i // prep.n
            if prep.kind == "completion":
                prefix = prep.prompt_texts[prompt_i] if echo else ""
                lp = None
                if s.params.logprobs is not None:
                    pids = prep.prompts[prompt_i] if echo else []
                    plps = (s.prompt_logprobs or [None] * len(pids)) if echo else []
                    lp = self._completion_logprobs(plps, pids, s.logprobs, offset0=0)
                choices.append({"index": i, "text": prefix + s.text, "logprobs": lp,
                                "finish_reason": s.finish_reason})
            else:
                lp = {"content": self._chat_logprobs(s.logprobs)} if s.params.logprobs is not None else None
                choices.append({"index": i, "message": {"role": "assistant", "content": s.text},
                                "logprobs": lp, "finish_reason": s.finish_reason})
        obj = "text_completion" if prep.kind == "completion" else "chat.completion"
        return {"id": prep.request_id, "object": obj, "created": prep.created, "model": self.model_name,
                "choices": choices, "usage": self.usage(prep)}

    async def stream(self, prep: Prepared, echo: bool = False, include_usage: bool = False
                     ) -> AsyncIterator[dict[str, Any]]:
        obj = "text_completion" if prep.kind == "completion" else "chat.completion.chunk"
        base = {"id": prep.request_id, "object": obj, "created": prep.created, "model": self.model_name}
        started = [False] * len(prep.seqs)
        offsets = [0] * len(prep.seqs)
        if prep.kind == "chat":
            for i in range(len(prep.seqs)):
                started[i] = True
                yield {**base, "choices": [{"index": i, "delta": {"role": "assistant", "content": ""},
                                            "logprobs": None, "finish_reason": None}]}
        async for ev in self._events(prep):
            s = prep.seqs[ev.index]
            if prep.kind == "completion":
                text, prompt_lps, prompt_ids = ev.text, [], []
                if not started[ev.index]:
                    started[ev.index] = True
                    if echo:
                        text = prep.prompt_texts[ev.index // prep.n] + text
                        prompt_ids = prep.prompts[ev.index // prep.n]
                        prompt_lps = ev.prompt_logprobs or [None] * len(prompt_ids)
                lp = None
                if s.params.logprobs is not None:
                    lp = self._completion_logprobs(prompt_lps, prompt_ids, ev.logprobs, offsets[ev.index])
                    offsets[ev.index] = lp["text_offset"][-1] + len(lp["tokens"][-1]) if lp["tokens"] else \
                        offsets[ev.index]
                if not text and lp is None and ev.finish_reason is None:
                    continue
                yield {**base, "choices": [{"index": ev.index, "text": text, "logprobs": lp,
                                            "finish_reason": ev.finish_reason}]}
            else:
                if not ev.text and ev.finish_reason is None and s.params.logprobs is None:
                    continue
                lp = {"content": self._chat_logprobs(ev.logprobs)} if s.params.logprobs is not None else None
                delta = {"content": ev.text} if ev.text else {}
                yield {**base, "choices": [{"index": ev.index, "delta": delta, "logprobs": lp,
                                            "finish_reason": ev.finish_reason}]}
        self._log_done(prep)
        if include_usage:
            yield {**base, "choices": [], "usage": self.usage(prep)}

    # ---- logprob formats ----------------------------------------------------------------------
    def _top_dict(self, lp: TokenLogprob) -> dict[str, float]:
        top = {self.token_str(lp.token_id): lp.logprob}
        for t, v in lp.top:
            top.setdefault(self.token_str(t), v)
        return top

    def _completion_logprobs(self, prompt_lps: list[TokenLogprob | None], prompt_ids: list[int],
                             gen: list[TokenLogprob], offset0: int) -> dict[str, Any]:
        tokens, token_lps, tops, offsets = [], [], [], []
        offset = offset0
        for tid, lp in zip(prompt_ids, prompt_lps):
            s = self.token_str(tid)
            tokens.append(s)
            token_lps.append(None if lp is None else lp.logprob)
            tops.append(None if lp is None else self._top_dict(lp))
            offsets.append(offset)
            offset += len(s)
        for lp in gen:
            s = self.token_str(lp.token_id)
            tokens.append(s)
            token_lps.append(lp.logprob)
            tops.append(self._top_dict(lp))
            offsets.append(offset)
            offset += len(s)
        return {"tokens": tokens, "token_logprobs": token_lps, "top_logprobs": tops, "text_offset": offsets}

    def _chat_logprobs(self, gen: list[TokenLogprob]) -> list[dict[str, Any]]:
        out = []
        for lp in gen:
            s = self.token_str(lp.token_id)
            out.append({"token": s, "logprob": lp.logprob, "bytes": list(s.encode()),
                        "top_logprobs": [{"token": self.token_str(t), "logprob": v,
                                          "bytes": list(self.token_str(t).encode())} for t, v in lp.top]})
        return out
