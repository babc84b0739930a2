"""OpenAI (and vLLM tokenize/detokenize) request schemas, and the OpenAI error shape.

Requests are validated here, in the ingress, before anything reaches a model replica: types,
required fields and ranges. Checks that need the tokenizer or the model (context length, token id
range, the model name) happen in the replica (serve/completions.py) and raise the same `APIError`.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

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

MAX_LOGPROBS = 20


class APIError(Exception):
    """An error with an HTTP status, rendered as OpenAI's `{"error": {...}}`."""

    def __init__(self, status: int, message: str, type_: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type_, param, code

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def to_dict(self) -> dict[str, Any]:
        return {"status": self.status, **self.body()}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> APIError:
        e = d["error"]
        return cls(d["status"], e["message"], e.get("type") or "invalid_request_error", e.get("param"), e.get("code"))


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


class _Sampling(_Base):
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


TokenIds = list[StrictInt]


class CompletionRequest(_Sampling):
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


class ContentPart(_Base):
    type: Literal["text"]
    text: StrictStr


class ChatMessage(_Base):
    role: Literal["system", "user", "assistant", "developer"]
    content: StrictStr | list[ContentPart]
    name: StrictStr | None = None

    def text(self) -> str:
        return self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)


class ChatCompletionRequest(_Sampling):
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
