"""What the OpenAI endpoints of a model replica share (vLLM's `OpenAIServing`).

- `ServingContext`: the replica's parts every endpoint reads (model info, tokenizer, engine, engine
  limits, chat template, content filter, EOS ids), built once by serve/deployments.py.
- `ServingTokenizer`: encode/decode as serving uses them, cached token strings, the token-id check.
- `OpenAIServing`: the base of every endpoint: model check, chat template rendering.
- `OpenAIServingGeneration`: the base of the generating endpoints (completions.py, chat.py): request
  checks (n, stop ids, empty prompt, input content filter, queue size, context length), sequences
  with the sampling parameters the request builds, running the engine, usage and the request log.
  An endpoint supplies its prompts, its response and its stream chunks.
Every error a client can cause is an `APIError` with a 4xx status.
"""

from __future__ import annotations

import logging
import secrets
import time
from abc import ABC, abstractmethod
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar, Generic, TypeVar

from tokenizers import Tokenizer

from moe.generate import Sequence, TokenRouting
from serve.config import ChatTemplateConfig, EngineConfig
from serve.engine import Engine, EngineOverloaded, SeqEvent
from serve.openai.models import OpenAIServingModels
from serve.openai.protocol import APIError, ChatMessage, SamplingRequest
from serve.openai.responses import ChoiceRouting, TokenRoute, UsageInfo
from serve.safety import SafetyPolicy

if TYPE_CHECKING:
    from moe.generate import SamplingParams

logger = logging.getLogger("ray.serve")

RequestT = TypeVar("RequestT", bound=SamplingRequest)
ResponseT = TypeVar("ResponseT")
ChunkT = TypeVar("ChunkT")


class ServingTokenizer:
    """The replica's tokenizer; ids outside `vocab_size` (the smaller of model and tokenizer) are refused."""

    def __init__(self, tokenizer: Tokenizer, model_vocab_size: int) -> None:
        self.tok = tokenizer
        self.vocab_size = min(model_vocab_size, tokenizer.get_vocab_size())
        self._token_str: dict[int, str] = {}

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        return self.tok.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids: list[int]) -> str:
        return self.tok.decode(ids, skip_special_tokens=False)

    def token_str(self, token_id: int) -> str:
        s = self._token_str.get(token_id)
        if s is None:
            s = self._token_str[token_id] = self.decode([token_id])
        return s

    def check_ids(self, ids: list[int], param: str) -> None:
        bad = [t for t in ids if not 0 <= t < self.vocab_size]
        if bad:
            raise APIError(400, f"{param}: token id {bad[0]} is outside the vocabulary [0, {self.vocab_size}).",
                           param=param.split(".")[0])


@dataclass(frozen=True)
class ServingContext:
    models: OpenAIServingModels
    tokenizer: ServingTokenizer
    engine: Engine
    engine_cfg: EngineConfig
    chat_template: ChatTemplateConfig
    safety: SafetyPolicy
    eos_ids: tuple[int, ...]
    moe_layers: tuple[int, ...] = ()  # the model's MoE layer ids (routing inspection names them)


def render_chat(messages: list[ChatMessage], tpl: ChatTemplateConfig, add_generation_prompt: bool = True) -> str:
    fmt = {"system": tpl.system, "developer": tpl.system, "user": tpl.user, "assistant": tpl.assistant}
    text = "".join(fmt[m.role].format(content=m.text()) for m in messages)
    return text + (tpl.generation_prompt if add_generation_prompt else "")


class OpenAIServing:
    def __init__(self, ctx: ServingContext) -> None:
        self.ctx = ctx
        self.models = ctx.models
        self.tokenizer = ctx.tokenizer

    @property
    def model_name(self) -> str:
        return self.models.name

    def check_model(self, name: str | None) -> None:
        self.models.check_model(name)

    def render_chat(self, messages: list[ChatMessage], add_generation_prompt: bool = True) -> str:
        return render_chat(messages, self.ctx.chat_template, add_generation_prompt)


@dataclass
class Prompts:
    """A request's prompts: token ids, their text, and the text the input content filter reads."""

    ids: list[list[int]]
    texts: list[str]
    filter_texts: list[str]


@dataclass
class Prepared:
    request_id: str
    created: int
    prompts: list[list[int]]  # one per prompt (sequences repeat each prompt n times)
    prompt_texts: list[str]
    seqs: list[Sequence]
    n: int  # sequences per prompt (n, or completions' best_of)
    t0: float


class OpenAIServingGeneration(OpenAIServing, ABC, Generic[RequestT, ResponseT, ChunkT]):
    """A generating endpoint: `prepare(req)` checks the request and makes its sequences; `create(req)`
    runs them to one response; `stream(req, prep)` yields the chunks of a prepared request."""

    request_id_prefix: ClassVar[str]
    prompt_param: ClassVar[str]  # the request field that holds the prompt (named in errors)

    # ---- what an endpoint supplies ------------------------------------------------------------
    @abstractmethod
    def render_prompts(self, req: RequestT) -> Prompts: ...

    @abstractmethod
    def default_max_tokens(self) -> int: ...

    @abstractmethod
    def sampling_params(self, req: RequestT, max_tokens: int, choice: int) -> SamplingParams: ...

    @abstractmethod
    def response(self, req: RequestT, prep: Prepared) -> ResponseT: ...

    @abstractmethod
    def stream(self, req: RequestT, prep: Prepared) -> AsyncIterator[ChunkT]: ...

    # ---- request -> sequences -----------------------------------------------------------------
    def prepare(self, req: RequestT) -> Prepared:
        self.check_model(req.model)
        max_n = self.ctx.engine_cfg.max_n
        if req.candidates() > max_n:
            param = "n" if req.candidates() == req.n else "best_of"
            raise APIError(400, f"{param}={req.candidates()} is above this server's limit of {max_n}.", param=param)
        if req.stop_token_ids:
            self.tokenizer.check_ids(req.stop_token_ids, "stop_token_ids")
        for key in req.logit_bias or {}:
            token_id = int(key.strip())  # the request checked the key's form
            if token_id >= self.tokenizer.vocab_size:
                raise APIError(400, f"logit_bias: key {key!r} is token id {token_id}, outside the vocabulary "
                                    f"[0, {self.tokenizer.vocab_size}); use token ids from POST /tokenize.",
                               param="logit_bias")
        prompts = self.render_prompts(req)
        self._check_prompts(prompts, req.candidates())
        request_id = self.request_id_prefix + secrets.token_hex(12)
        seqs = self._sequences(req, prompts.ids, request_id)
        return Prepared(request_id, int(time.time()), prompts.ids, prompts.texts, seqs, req.candidates(),
                        time.perf_counter())

    def _check_prompts(self, prompts: Prompts, n: int) -> None:
        param = self.prompt_param
        if any(len(x) == 0 for x in prompts.ids):
            raise APIError(400, f"{param}: the prompt is empty after tokenization; send at least one token.",
                           param=param)
        violation = self.ctx.safety.check_input(prompts.filter_texts)
        if violation is not None:
            raise APIError(400, f"The request was rejected by the content policy ({violation.rule}).",
                           param=param, code="content_policy_violation")
        n_seqs, max_waiting = len(prompts.ids) * n, self.ctx.engine_cfg.max_waiting
        if n_seqs > max_waiting:
            raise APIError(400, f"{len(prompts.ids)} prompts x n={n} = {n_seqs} sequences is more than this server "
                                f"queues at once ({max_waiting}); split the request.", param="n")

    def _max_tokens(self, requested: int | None, prompt_len: int) -> int:
        max_len, param = self.models.max_model_len, self.prompt_param
        default = self.default_max_tokens()
        room = max_len - prompt_len
        if prompt_len > max_len or (requested is not None and requested > room) or (requested is None and room <= 0):
            asked = requested if requested is not None else max(default, 1)
            raise APIError(
                400, f"This model's maximum context length is {max_len} tokens. However, you requested "
                     f"{prompt_len + asked} tokens ({prompt_len} in the {param}, {asked} for the completion). "
                     f"Please reduce the length of the {param} or max_tokens.",
                param=param if requested is None or prompt_len > max_len else "max_tokens",
                code="context_length_exceeded")
        return requested if requested is not None else min(default, room)

    def _sequences(self, req: RequestT, prompt_ids: list[list[int]], request_id: str) -> list[Sequence]:
        output = self.ctx.safety.output
        text_check: Callable[[str], int | None] | None = output.first_blocked if output else None
        seqs: list[Sequence] = []
        for ids in prompt_ids:
            max_tokens = self._max_tokens(req.max_new_tokens(), len(ids))
            for j in range(req.candidates()):
                seqs.append(Sequence(ids, self.sampling_params(req, max_tokens, j), eos_ids=self.ctx.eos_ids,
                                     detokenize=self.tokenizer.decode, text_check=text_check,
                                     text_hold=output.max_match_chars,
                                     seq_id=f"{request_id}-{len(seqs)}", stream_text=req.stream,
                                     record_routing=req.return_routing))
        return seqs

    # ---- running ------------------------------------------------------------------------------
    async def create(self, req: RequestT) -> ResponseT:
        """The whole response of a request that does not stream."""
        prep = self.prepare(req)
        async for _ in self.events(prep):
            pass
        self.log_done(prep)
        return self.response(req, prep)

    async def events(self, prep: Prepared) -> AsyncIterator[SeqEvent]:
        """The engine's events for the request's sequences; a full queue is a 503, a failed sequence a 500
        naming the request id (also in the replica log, with the sequence's error)."""
        try:
            async for event in self.ctx.engine.generate(prep.seqs):
                if event.error is not None:
                    logger.error("%s failed: %s", prep.request_id, event.error)
                    raise APIError(500, f"Generating request {prep.request_id} failed ({event.error}); the "
                                        "server log has this id.", type_="server_error")
                yield event
        except EngineOverloaded as err:
            raise APIError(503, str(err), type_="server_overloaded", code="overloaded") from err

    def routing(self, token_ids: list[int], routing: list[TokenRouting]) -> ChoiceRouting:
        """The `return_routing` extension of a choice (or of a stream chunk's new tokens)."""
        return ChoiceRouting(layers=list(self.ctx.moe_layers), tokens=[
            TokenRoute(token=self.tokenizer.token_str(t), token_id=t, experts=r.experts, weights=r.weights)
            for t, r in zip(token_ids, routing)])

    def usage(self, prep: Prepared) -> UsageInfo:
        prompt = sum(len(x) for x in prep.prompts)
        completion = sum(len(s.output_ids) for s in prep.seqs)
        return UsageInfo(prompt_tokens=prompt, completion_tokens=completion, total_tokens=prompt + completion)

    def log_done(self, prep: Prepared) -> None:
        dt = time.perf_counter() - prep.t0
        u = self.usage(prep)
        logger.info("%s done: %d choices, prompt_tokens=%d completion_tokens=%d latency=%.3fs tokens/s=%.1f "
                    "finish=%s", prep.request_id, len(prep.seqs), u.prompt_tokens, u.completion_tokens, dt,
                    u.completion_tokens / dt if dt > 0 else 0.0, sorted({s.finish_reason for s in prep.seqs}))
