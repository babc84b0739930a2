"""OpenAI (and vLLM tokenize/detokenize) request schemas, the sampling parameters each request
builds, and OpenAI's error shape (`APIError` raised, `ErrorResponse` carried and rendered).

Requests are validated here, in the ingress, before anything reaches a model replica
(`parse_request`): the JSON tree first (nesting depth, strings that are valid Unicode: a lone
UTF-16 surrogate such as "\ud800" is refused with a 400 naming the field, never replaced), then
every field's type and range: token ids in [0, MAX_TOKEN_ID] (what the tokenizer's u32 and the
engine's int64 hold), `seed` within int64, floats finite, and bounded sizes (prompts, token ids,
stop strings, messages, logit_bias entries). Checks that need the tokenizer or the model (context
length, the vocabulary, the model name) happen in the replica (serve/openai/base.py and the
endpoint classes) and raise the same `APIError`. Importing this module stays light (no torch): `to_sampling_params`
imports `moe.generate` when the replica calls it.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import TYPE_CHECKING, Annotated, Literal, TypeVar

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StrictBool,
    StrictInt,
    StrictStr,
    ValidationError,
    field_validator,
    model_validator,
)

if TYPE_CHECKING:
    from moe.generate import SamplingParams

MAX_LOGPROBS = 20
MAX_TOKEN_ID = 2**31 - 1  # token ids beyond this cannot be any vocabulary's (and would overflow the tokenizer)
SEED_MIN, SEED_MAX = -(2**63), 2**63 - 1  # a torch generator's seed is 64 bits
MAX_PROMPTS = 256  # prompts in one completions request (each makes n sequences)
MAX_TOKEN_LIST = 65_536  # token ids in one prompt, stop_token_ids or /detokenize request
MAX_STOPS, MAX_STOP_CHARS = 16, 1_000  # stop strings and the length of each
MAX_MESSAGES = 2_048  # chat messages
MAX_LOGIT_BIAS = 1_024  # logit_bias entries (OpenAI allows 300)
MAX_BIAS = 100.0  # logit_bias values lie in [-MAX_BIAS, MAX_BIAS]
MAX_JSON_DEPTH = 32  # nesting of JSON arrays and objects in a body


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
                 param: str | None = None, code: str | None = None, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type_, param, code
        self.headers = headers  # HTTP headers the ingress sends with it (Retry-After)

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
    first = err.errors(include_url=False)[0]
    path = [str(p) for p in first["loc"] if isinstance(p, str | int)]
    field_names = [p for p in path if not p.isdigit()]
    top = field_names[0] if field_names else None
    loc = ".".join(path[:1] + [p for p in path[1:] if p.isdigit() or p in {"role", "content", "text", "type",
                                                                         "include_usage"}])
    if first["type"] == "missing":
        message = f"{loc}: field required"
    elif not path or first["type"] == "value_error":  # a model or field check with its own message
        message = first["msg"].removeprefix("Value error, ")
    else:
        hint = next((UNION_HINTS[f] for f in reversed(field_names) if f in UNION_HINTS), None)
        message = f"{loc}: {hint or first['msg']} (got {repr(first.get('input'))[:80]})"
    return APIError(400, message, param=top)


ModelT = TypeVar("ModelT", bound=BaseModel)


def _printable(key: object) -> str:
    """A JSON key as it can appear in an error message (lone surrogates escaped, at most 40 characters)."""
    return str(key).encode("utf-8", "backslashreplace").decode("utf-8")[:40]


_SURROGATE = re.compile("[\ud800-\udfff]")
_CONTAINERS_OR_STR = (str, list, dict)


def _first_bad_string(data: object) -> tuple[str, str] | None:
    """(path, problem) of the first string or key in a JSON tree that is not valid Unicode, or of
    nesting deeper than MAX_JSON_DEPTH; None if there is none. Iterative, so any depth is safe; only
    strings and containers are visited (a list of 200,000 ids costs one pass, no path strings), and
    non-ASCII strings are searched with one regex, so a bad request costs the ingress little."""
    stack: list[tuple[object, str, int]] = [(data, "", 0)]
    while stack:
        node, path, depth = stack.pop()
        if isinstance(node, str):
            found = None if node.isascii() else _SURROGATE.search(node)
            if found is not None:
                return path or "body", (f"contains a lone UTF-16 surrogate (\\u{ord(found.group()):04x}) at "
                                        f"character {found.start()}; send valid Unicode (a surrogate pair, or "
                                        "the character itself)")
        elif isinstance(node, list | dict):
            if depth >= MAX_JSON_DEPTH:
                return path or "body", f"is nested more than {MAX_JSON_DEPTH} levels deep"
            items = list(node.items()) if isinstance(node, dict) else \
                [(i, v) for i, v in enumerate(node) if isinstance(v, _CONTAINERS_OR_STR)]
            for k, v in reversed(items):
                key_bad = isinstance(k, str) and not k.isascii()
                if not (key_bad or isinstance(v, _CONTAINERS_OR_STR)):
                    continue
                sub = f"{path}.{_printable(k)}" if path else _printable(k)
                if key_bad:
                    stack.append((k, f"{sub} (key)", depth + 1))
                stack.append((v, sub, depth + 1))
    return None


def parse_request(schema: type[ModelT], data: object) -> ModelT:
    """A decoded JSON body as a validated request, or a 400 naming the field and the fix."""
    if not isinstance(data, dict):
        raise APIError(400, f"The request body must be a JSON object, got {type(data).__name__}.")
    bad = _first_bad_string(data)
    if bad is not None:
        path, problem = bad
        raise APIError(400, f"{path}: {problem}.", param=path.split(".")[0].split(" ")[0])
    try:
        return schema.model_validate(data)
    except ValidationError as err:
        raise validation_error(err) from err


def check_token_ids(ids: Sequence[int], field: str) -> None:
    """Token ids any vocabulary could hold (the replica checks its own vocabulary size)."""
    if len(ids) > MAX_TOKEN_LIST:
        raise ValueError(f"{field}: {len(ids)} token ids is more than the {MAX_TOKEN_LIST} accepted in one list")
    for i, t in enumerate(ids):
        if not 0 <= t <= MAX_TOKEN_ID:
            shown = t if abs(t) < 10**20 else f"{'-' if t < 0 else ''}<{len(str(abs(t)))}-digit number>"
            raise ValueError(f"{field}: token id {shown} (position {i}) is outside [0, {MAX_TOKEN_ID}]; token ids are "
                             "non-negative integers below the model's vocabulary size")


def parse_logit_bias(bias: dict[str, float]) -> dict[int, float]:
    """OpenAI's logit_bias: token ids as decimal strings -> a bias in [-100, 100]."""
    if len(bias) > MAX_LOGIT_BIAS:
        raise ValueError(f"logit_bias: {len(bias)} entries is more than the {MAX_LOGIT_BIAS} accepted")
    out: dict[int, float] = {}
    for key, value in bias.items():
        k = key.strip()
        if not (k.isascii() and k.isdigit() and len(k) <= 10 and int(k) <= MAX_TOKEN_ID):
            raise ValueError(f"logit_bias: key {key[:40]!r} is not a token id; keys are token ids written as "
                             f"decimal strings in [0, {MAX_TOKEN_ID}], e.g. {{\"50256\": -100}}")
        if not -MAX_BIAS <= value <= MAX_BIAS:
            raise ValueError(f"logit_bias[{key!r}]: bias {value} is outside [-100, 100]")
        out[int(k)] = float(value)  # "5" and " 5" name the same token: the later one wins
    return out


class _Base(BaseModel):
    model_config = ConfigDict(extra="ignore", allow_inf_nan=False)



class StreamOptions(_Base):
    include_usage: StrictBool = False


class SamplingRequest(_Base):
    """What completions and chat requests share: the model, sampling, n, streaming and stops."""

    model: StrictStr | None = None
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    top_k: StrictInt = Field(0, ge=-1, le=MAX_TOKEN_ID)  # vLLM extension; 0 or -1: off
    n: StrictInt = Field(1, ge=1, le=MAX_TOKEN_ID)
    stream: StrictBool = False
    stream_options: StreamOptions | None = None
    stop: StrictStr | Annotated[list[StrictStr], Field(max_length=MAX_STOPS)] | None = None
    stop_token_ids: Annotated[list[StrictInt], Field(max_length=MAX_TOKEN_LIST)] | None = None  # vLLM extension
    seed: StrictInt | None = Field(None, ge=SEED_MIN, le=SEED_MAX)
    ignore_eos: StrictBool = False  # vLLM extension
    return_routing: StrictBool = False  # extension: per generated token, each MoE layer's experts and weights
    presence_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    frequency_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    logit_bias: dict[str, float] | None = None
    user: StrictStr | None = None

    @field_validator("stop")
    @classmethod
    def _stop_lengths(cls, v):
        for s in [v] if isinstance(v, str) else (v or []):
            if len(s) > MAX_STOP_CHARS:
                raise ValueError(f"stop: a stop string of {len(s)} characters is longer than the "
                                 f"{MAX_STOP_CHARS} accepted")
        return v

    @field_validator("stop_token_ids")
    @classmethod
    def _stop_ids(cls, v):
        if v is not None:
            check_token_ids(v, "stop_token_ids")
        return v

    @field_validator("logit_bias")
    @classmethod
    def _logit_bias(cls, v):
        if v is not None:
            parse_logit_bias(v)
        return v

    def logit_bias_ids(self) -> dict[int, float]:
        """logit_bias with integer token ids (validated; the replica checks them against its vocabulary)."""
        return parse_logit_bias(self.logit_bias) if self.logit_bias else {}

    def stop_list(self) -> list[str]:
        if self.stop is None:
            return []
        stops = [self.stop] if isinstance(self.stop, str) else list(self.stop)
        return [s for s in stops if s]

    def max_new_tokens(self) -> int | None:
        """The completion length asked for (None: the endpoint's default)."""
        raise NotImplementedError

    def candidates(self) -> int:
        """Sequences generated per prompt (completions' best_of; else n)."""
        return self.n

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
            logprobs=logprobs, prompt_logprobs=prompt_logprobs, presence_penalty=self.presence_penalty,
            frequency_penalty=self.frequency_penalty, logit_bias=tuple(sorted(self.logit_bias_ids().items())))


TokenIds = list[StrictInt]


class CompletionRequest(SamplingRequest):
    prompt: StrictStr | Annotated[list[StrictStr], Field(min_length=1)] | Annotated[TokenIds, Field(min_length=1)] \
        | Annotated[list[Annotated[TokenIds, Field(min_length=1)]], Field(min_length=1)]
    max_tokens: StrictInt | None = Field(None, ge=0, le=MAX_TOKEN_ID)
    logprobs: StrictInt | None = Field(None, ge=0, le=MAX_LOGPROBS)
    echo: StrictBool = False
    best_of: StrictInt | None = Field(None, ge=1, le=MAX_TOKEN_ID)
    suffix: StrictStr | None = None

    @field_validator("prompt")
    @classmethod
    def _prompt_bounds(cls, p):
        if isinstance(p, list) and len(p) > MAX_PROMPTS and not isinstance(p[0], int):
            raise ValueError(f"prompt: {len(p)} prompts is more than the {MAX_PROMPTS} accepted in one request")
        if isinstance(p, list) and isinstance(p[0], int):
            check_token_ids(p, "prompt")
        elif isinstance(p, list) and isinstance(p[0], list):
            for i, ids in enumerate(p):
                check_token_ids(ids, f"prompt.{i}")
        return p

    @model_validator(mode="after")
    def _checks(self):
        if self.best_of is not None and self.best_of < self.n:
            raise ValueError(f"best_of={self.best_of} must be >= n={self.n} (best_of candidates, the n best returned)")
        if self.stream and self.candidates() > self.n:
            raise ValueError(f"best_of={self.best_of} > n={self.n} cannot stream (the best are known only at the "
                             "end); set stream to false or best_of to n")
        if self.suffix:
            raise ValueError("suffix is not supported (no insertion mode); leave it out")
        return self

    def max_new_tokens(self) -> int | None:
        return self.max_tokens

    def candidates(self) -> int:
        return self.best_of or self.n

    def to_sampling_params(self, max_tokens: int, seed_offset: int = 0) -> SamplingParams:
        """Sampling for choice `seed_offset` of a prompt (a seeded request gives choice j seed + j).
        With `echo` and `logprobs`, the prompt tokens are scored too; with best_of > n every
        generated token's logprob is kept (to rank the candidates)."""
        prompt_logprobs = self.logprobs if self.echo and self.logprobs is not None else None
        logprobs = 0 if self.logprobs is None and self.candidates() > self.n else self.logprobs
        return self._sampling_params(max_tokens, seed_offset, self.stop_list(), logprobs, prompt_logprobs)


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
    messages: Annotated[list[ChatMessage], Field(min_length=1, max_length=MAX_MESSAGES)]
    max_tokens: StrictInt | None = Field(None, ge=0, le=MAX_TOKEN_ID)
    max_completion_tokens: StrictInt | None = Field(None, ge=0, le=MAX_TOKEN_ID)
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
    messages: Annotated[list[ChatMessage], Field(max_length=MAX_MESSAGES)] | None = None
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

    @field_validator("tokens")
    @classmethod
    def _ids(cls, v):
        check_token_ids(v, "tokens")
        return v
