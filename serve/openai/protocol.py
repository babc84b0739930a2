"""OpenAI (and vLLM tokenize/detokenize) request schemas, the sampling parameters each request
builds, and OpenAI's error shape (`APIError` raised, `ErrorResponse` carried and rendered).

Requests are validated here, in the ingress, before anything reaches a model replica: types,
required fields and ranges. Checks that need the tokenizer or the model (context length, token id
range, the model name) happen in the replica (serve/openai/base.py and the endpoint classes) and
raise the same `APIError`. Importing this module stays light (no torch): `to_sampling_params`
imports `moe.generate` when the replica calls it.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Annotated, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StrictBool,
    StrictInt,
    StrictStr,
    ValidationError,
    model_validator,
)

if TYPE_CHECKING:
    from moe.generate import SamplingParams

MAX_LOGPROBS = 20


class ErrorInfo(BaseModel):
    message: str
    type: str = "invalid_request_error"
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    """OpenAI's error body `{"error": {...}}`. `status` (the HTTP status) travels with it from the
    replica to the ingress but is not part of the body."""

    error: ErrorInfo
    status: int = Field(exclude=True)


class APIError(Exception):
    """An error with an HTTP status, rendered as OpenAI's `{"error": {...}}`."""

    def __init__(self, status: int, message: str, type_: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type_, param, code

    def response(self) -> ErrorResponse:
        info = ErrorInfo(message=self.message, type=self.type, param=self.param, code=self.code)
        return ErrorResponse(error=info, status=self.status)

    def body(self) -> dict:
        return self.response().model_dump()

    @classmethod
    def from_response(cls, r: ErrorResponse) -> APIError:
        e = r.error
        return cls(r.status, e.message, e.type or "invalid_request_error", e.param, e.code)


UNION_HINTS = {
    "prompt": "prompt must be a string, a list of strings, a list of token ids or a list of token-id lists, "
              "none of them empty",
    "stop": "stop must be a string or a list of strings",
    "content": "content must be a string or a list of {\"type\": \"text\", \"text\": ...} parts",
}


def validation_error(err: ValidationError) -> APIError:
    """The first pydantic error as a 400 that names the field, what was wrong and what was sent."""
    first = err.errors()[0]
    path = [str(p) for p in first["loc"] if isinstance(p, str | int)]
    field_names = [p for p in path if not p.isdigit()]
    top = field_names[0] if field_names else None
    loc = ".".join(path[:1] + [p for p in path[1:] if p.isdigit() or p in {"role", "content", "text", "type",
                                                                         "include_usage"}])
    if first["type"] == "missing":
        message = f"{loc}: field required"
    elif not path:  # a model-level check
        message = first["msg"].removeprefix("Value error, ")
    else:
        hint = next((UNION_HINTS[f] for f in reversed(field_names) if f in UNION_HINTS), None)
        message = f"{loc}: {hint or first['msg']} (got {repr(first.get('input'))[:80]})"
    return APIError(400, message, param=top)


class _Base(BaseModel):
    model_config = ConfigDict(extra="ignore")


class StreamOptions(_Base):
    include_usage: StrictBool = False


class SamplingRequest(_Base):
    """What completions and chat requests share: the model, sampling, n, streaming and stops."""

    model: StrictStr | None = None
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    top_k: StrictInt = Field(0, ge=-1)  # vLLM extension; 0 or -1: off
    n: StrictInt = Field(1, ge=1)
    stream: StrictBool = False
    stream_options: StreamOptions | None = None
    stop: StrictStr | list[StrictStr] | None = None
    stop_token_ids: list[StrictInt] | None = None  # vLLM extension
    seed: StrictInt | None = None
    ignore_eos: StrictBool = False  # vLLM extension
    presence_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    frequency_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    logit_bias: dict[str, float] | None = None
    user: StrictStr | None = None

    @model_validator(mode="after")
    def _unsupported(self):
        if self.presence_penalty or self.frequency_penalty:
            raise ValueError("presence_penalty and frequency_penalty are not supported; leave them at 0")
        if self.logit_bias:
            raise ValueError("logit_bias is not supported; leave it empty")
        return self

    def stop_list(self) -> list[str]:
        if self.stop is None:
            return []
        stops = [self.stop] if isinstance(self.stop, str) else list(self.stop)
        return [s for s in stops if s]

    def max_new_tokens(self) -> int | None:
        """The completion length asked for (None: the endpoint's default)."""
        raise NotImplementedError

    def include_usage(self) -> bool:
        """Whether a stream ends with a chunk that carries the usage (`stream_options.include_usage`)."""
        return bool(self.stream_options and self.stream_options.include_usage)

    def _sampling_params(self, max_tokens: int, seed_offset: int, stop: Sequence[str], logprobs: int | None,
                         prompt_logprobs: int | None) -> SamplingParams:
        from moe.generate import SamplingParams  # torch: only the replica builds sampling parameters

        return SamplingParams(
            max_tokens=max_tokens, temperature=self.temperature, top_p=self.top_p, top_k=self.top_k,
            seed=None if self.seed is None else self.seed + seed_offset, stop=tuple(stop),
            stop_token_ids=tuple(self.stop_token_ids or ()), ignore_eos=self.ignore_eos,
            logprobs=logprobs, prompt_logprobs=prompt_logprobs)


TokenIds = list[StrictInt]


class CompletionRequest(SamplingRequest):
    prompt: StrictStr | Annotated[list[StrictStr], Field(min_length=1)] | Annotated[TokenIds, Field(min_length=1)] \
        | Annotated[list[Annotated[TokenIds, Field(min_length=1)]], Field(min_length=1)]
    max_tokens: StrictInt | None = Field(None, ge=0)
    logprobs: StrictInt | None = Field(None, ge=0, le=MAX_LOGPROBS)
    echo: StrictBool = False
    best_of: StrictInt | None = None
    suffix: StrictStr | None = None

    @model_validator(mode="after")
    def _checks(self):
        if self.best_of is not None and self.best_of != self.n:
            raise ValueError("best_of other than n is not supported")
        if self.suffix:
            raise ValueError("suffix is not supported")
        return self

    def max_new_tokens(self) -> int | None:
        return self.max_tokens

    def to_sampling_params(self, max_tokens: int, seed_offset: int = 0) -> SamplingParams:
        """Sampling for choice `seed_offset` of a prompt (a seeded request gives choice j seed + j).
        With `echo` and `logprobs`, the prompt tokens are scored too."""
        prompt_logprobs = self.logprobs if self.echo and self.logprobs is not None else None
        return self._sampling_params(max_tokens, seed_offset, self.stop_list(), self.logprobs, prompt_logprobs)


class ContentPart(_Base):
    type: Literal["text"]
    text: StrictStr


class ChatMessage(_Base):
    role: Literal["system", "user", "assistant", "developer"]
    content: StrictStr | list[ContentPart]
    name: StrictStr | None = None

    def text(self) -> str:
        return self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)


class ChatCompletionRequest(SamplingRequest):
    messages: Annotated[list[ChatMessage], Field(min_length=1)]
    max_tokens: StrictInt | None = Field(None, ge=0)
    max_completion_tokens: StrictInt | None = Field(None, ge=0)
    logprobs: StrictBool = False
    top_logprobs: StrictInt | None = Field(None, ge=0, le=MAX_LOGPROBS)
    add_generation_prompt: StrictBool = True

    @model_validator(mode="after")
    def _checks(self):
        if self.top_logprobs and not self.logprobs:
            raise ValueError("top_logprobs needs logprobs=true")
        return self

    def max_new_tokens(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens

    def to_sampling_params(self, max_tokens: int, seed_offset: int = 0, extra_stop: Sequence[str] = ()
                           ) -> SamplingParams:
        """Sampling for choice `seed_offset`; `extra_stop` (the chat template's stops) joins `stop`.
        `logprobs=true` scores each generated token with `top_logprobs` alternatives (default 0)."""
        stop = self.stop_list() + [s for s in extra_stop if s]
        logprobs = (self.top_logprobs or 0) if self.logprobs else None
        return self._sampling_params(max_tokens, seed_offset, stop, logprobs, None)


class TokenizeRequest(_Base):
    """vLLM's POST /tokenize: either a prompt or chat messages."""

    model: StrictStr | None = None
    prompt: StrictStr | None = None
    messages: list[ChatMessage] | None = None
    add_generation_prompt: StrictBool = True
    add_special_tokens: StrictBool = True
    return_token_strs: StrictBool = False

    @model_validator(mode="after")
    def _one_of(self):
        if (self.prompt is None) == (self.messages is None):
            raise ValueError("give exactly one of prompt and messages")
        return self


class DetokenizeRequest(_Base):
    model: StrictStr | None = None
    tokens: list[StrictInt]
