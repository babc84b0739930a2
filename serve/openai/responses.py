"""Typed OpenAI (and vLLM tokenize/detokenize) responses and stream chunks.

The model replica builds these and hands them to the ingress, which sends `model_dump()` as
JSON. Their fields, order and nulls are the wire format: `None` stays `null` (a choice's
`logprobs`, a chunk's `finish_reason`, `token_strs`), except where OpenAI omits the key: a stream
chunk's `usage` (present only on the last chunk when `stream_options.include_usage`) and a chat
delta's unset `role`/`content`, and a choice's `routing` (present only when the request set the
`return_routing` extension, so without it a response is exactly OpenAI's). `StreamStart` is the
replica's first stream item: the request was
accepted, so the ingress may answer 200 and open the event stream.
"""

from __future__ import annotations

import time
from typing import Any, ClassVar, Literal

from pydantic import BaseModel, Field, SerializerFunctionWrapHandler, model_serializer


class _OmitsNone(BaseModel):
    """A model whose `omit_when_none` keys appear only when set."""

    omit_when_none: ClassVar[tuple[str, ...]] = ()

    @model_serializer(mode="wrap")
    def _serialize(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        data = handler(self)
        for key in self.omit_when_none:
            if data.get(key) is None:
                data.pop(key, None)
        return data


class _DropsNoneUsage(_OmitsNone):
    """A stream chunk: `usage` appears only when set."""

    omit_when_none = ("usage",)


class TokenRoute(BaseModel):
    """One generated token and, per MoE layer (`ChoiceRouting.layers`), the experts chosen and their weights."""

    token: str
    token_id: int
    experts: list[list[int]]  # (moe layers, top_k)
    weights: list[list[float]]  # (moe layers, top_k) combine weights


class ChoiceRouting(BaseModel):
    """The `return_routing` extension: the MoE layer ids, then one entry per generated token."""

    layers: list[int]
    tokens: list[TokenRoute]


class _Routed(_OmitsNone):
    """A choice: `routing` appears only when the request asked for it."""

    omit_when_none = ("routing",)


class UsageInfo(BaseModel):
    prompt_tokens: int = 0
    completion_tokens: int = 0
    total_tokens: int = 0


# ---- /v1/completions ------------------------------------------------------------------------
class CompletionLogProbs(BaseModel):
    """Legacy completions logprobs: one entry per token (prompt tokens first with `echo`)."""

    tokens: list[str] = Field(default_factory=list)
    token_logprobs: list[float | None] = Field(default_factory=list)  # None: the first prompt token
    top_logprobs: list[dict[str, float] | None] = Field(default_factory=list)
    text_offset: list[int] = Field(default_factory=list)


class CompletionResponseChoice(_Routed):
    index: int
    text: str
    logprobs: CompletionLogProbs | None = None
    finish_reason: str | None = None
    routing: ChoiceRouting | None = None


class CompletionResponse(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionResponseChoice]
    usage: UsageInfo


class CompletionResponseStreamChoice(_Routed):
    index: int
    text: str
    logprobs: CompletionLogProbs | None = None
    finish_reason: str | None = None
    routing: ChoiceRouting | None = None


class CompletionStreamResponse(_DropsNoneUsage):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionResponseStreamChoice]
    usage: UsageInfo | None = None


# ---- /v1/chat/completions -------------------------------------------------------------------
class ChatCompletionLogProb(BaseModel):
    token: str
    logprob: float
    bytes: list[int]


class ChatCompletionLogProbsContent(ChatCompletionLogProb):
    top_logprobs: list[ChatCompletionLogProb] = Field(default_factory=list)


class ChatCompletionLogProbs(BaseModel):
    content: list[ChatCompletionLogProbsContent]


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class ChatCompletionResponseChoice(_Routed):
    index: int
    message: AssistantMessage
    logprobs: ChatCompletionLogProbs | None = None
    finish_reason: str | None = None
    routing: ChoiceRouting | None = None


class ChatCompletionResponse(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatCompletionResponseChoice]
    usage: UsageInfo


class DeltaMessage(BaseModel):
    """What a chat chunk adds to its choice; unset fields are left out (`{}` for a bare finish)."""

    role: Literal["assistant"] | None = None
    content: str | None = None

    @model_serializer(mode="wrap")
    def _serialize(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        return {k: v for k, v in handler(self).items() if v is not None}


class ChatCompletionResponseStreamChoice(_Routed):
    index: int
    delta: DeltaMessage
    logprobs: ChatCompletionLogProbs | None = None
    finish_reason: str | None = None
    routing: ChoiceRouting | None = None


class ChatCompletionStreamResponse(_DropsNoneUsage):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChatCompletionResponseStreamChoice]
    usage: UsageInfo | None = None


# ---- vLLM /tokenize, /detokenize ------------------------------------------------------------
class TokenizeResponse(BaseModel):
    count: int
    max_model_len: int
    tokens: list[int]
    token_strs: list[str] | None = None


class DetokenizeResponse(BaseModel):
    prompt: str


# ---- /v1/models -----------------------------------------------------------------------------
class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int = Field(default_factory=lambda: int(time.time()))
    owned_by: str = "elastic-moe"
    root: str
    max_model_len: int


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard] = Field(default_factory=list)


# ---- replica -> ingress ---------------------------------------------------------------------
class StreamStart(BaseModel):
    """First item of a replica's stream: the request passed every check and the engine has room for it."""
