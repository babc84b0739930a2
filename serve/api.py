"""The OpenAI-compatible HTTP ingress (FastAPI under Ray Serve): GET /v1/models, POST /v1/completions,
POST /v1/chat/completions (JSON or server-sent events), vLLM's POST /tokenize and /detokenize,
GET /health and GET /stats.

It owns the HTTP side only: body size (413 beyond `ingress.max_body_bytes`), decoding (UTF-8,
JSON; any decoding failure is a 400), schema validation (serve/openai/protocol.py `parse_request`),
API keys (`$ingress.api_key_env` and/or `ingress.api_keys_file`), per-key limits (serve/limits.py:
429 with Retry-After), mapping backpressure to 503, errors in OpenAI's JSON shape, and request
metrics. Nothing a client sends makes a 5xx: those mean the server failed. The model work happens in the `MoEModel` deployment behind
`self.model` (a handle): each route calls that endpoint's replica method and sends the typed
response it returns (serve/openai/responses.py) as JSON, or raises the `ErrorResponse` it returns.
"""


import hmac
import json
import logging
import os
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel
from ray import serve
from ray.exceptions import ActorUnavailableError, RayActorError
from ray.serve.exceptions import BackPressureError
from ray.serve.handle import DeploymentHandle
from starlette.exceptions import HTTPException as StarletteHTTPException

from serve.config import IngressConfig
from serve.limits import KeyLimiter, KeyLimits, load_api_keys
from serve.openai.protocol import (
    APIError,
    ChatCompletionRequest,
    CompletionRequest,
    DetokenizeRequest,
    ErrorResponse,
    StreamOptions,
    TokenizeRequest,
    parse_request,
)

logger = logging.getLogger("ray.serve")


def _nothing() -> None:
    pass

app = FastAPI(title="elastic-moe OpenAI-compatible API")


def error_response(err: APIError, headers: dict[str, str] | None = None) -> Response:
    """OpenAI's error body; JSON with ASCII escapes, so any message (even one quoting odd input) encodes."""
    return Response(json.dumps(err.body()), status_code=err.status, media_type="application/json",
                    headers={**(err.headers or {}), **(headers or {})})


async def _released_after(body: AsyncIterator[Any], release: Callable[[], None]) -> AsyncIterator[Any]:
    try:
        async for part in body:
            yield part
    finally:
        release()


@app.exception_handler(StarletteHTTPException)
async def _http_error(request: Request, exc: StarletteHTTPException) -> Response:
    type_ = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
    return error_response(APIError(exc.status_code, f"{request.method} {request.url.path}: {exc.detail}", type_))


@app.exception_handler(Exception)
async def _unexpected(request: Request, exc: Exception) -> Response:
    logger.exception("unexpected error on %s", request.url.path)
    return error_response(APIError(500, f"internal error: {type(exc).__name__}: {exc}", "server_error"))


def body_too_large(size: int, limit: int) -> APIError:
    return APIError(413, f"The request body has {size} bytes, more than this server accepts ({limit}, "
                         "ingress.max_body_bytes); send fewer or shorter prompts.", code="request_too_large")


def decode_json(body: bytes) -> Any:
    """A request body as JSON; anything that is not UTF-8 JSON is a 400 saying where it broke."""
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError as err:
        raise APIError(400, f"The request body is not valid UTF-8 (byte {err.start}).") from err
    try:
        return json.loads(text)
    except json.JSONDecodeError as err:
        raise APIError(400, f"The request body is not valid JSON: {err.msg} at line {err.lineno} column "
                            f"{err.colno}.") from err
    except RecursionError as err:
        raise APIError(400, "The request body is not valid JSON here: it is nested too deeply.") from err
    except ValueError as err:  # e.g. an integer with more digits than Python converts
        raise APIError(400, f"The request body is not valid JSON here: {err}.") from err


ALL_BUSY = "all model replicas are busy"
QUEUE_FULL = "all model replicas are busy and their queue is full"


REPLICA_GONE = (RayActorError, ActorUnavailableError)  # the model replica died or cannot be reached


def replica_gone(err: BaseException) -> APIError:
    return APIError(503, f"The model replica handling this request stopped ({type(err).__name__}); retry.",
                    "server_overloaded", code="replica_unavailable")


def overloaded(what: str) -> APIError:
    return APIError(503, f"The server is overloaded ({what}); retry after a short wait.",
                    "server_overloaded", code="overloaded")


@serve.deployment(name="OpenAIIngress")
@serve.ingress(app)
class OpenAIIngress:
    def __init__(self, model: DeploymentHandle, cfg: IngressConfig) -> None:
        from serve.metrics import RequestMetrics

        self.model = model
        self.cfg = cfg
        self.default_limits = cfg.limits.key_limits()
        self.keys: dict[str, KeyLimits] = load_api_keys(cfg.api_keys_file, self.default_limits) \
            if cfg.api_keys_file else {}
        env_key = os.environ.get(cfg.api_key_env)
        if env_key:
            self.keys.setdefault(env_key.strip(), self.default_limits)
        self.limiter = KeyLimiter()
        self.metrics = RequestMetrics()
        logger.info("OpenAI ingress ready (API keys: %s)", f"{len(self.keys)} accepted" if self.keys else "off")

    # ---- plumbing -----------------------------------------------------------------------------
    def _auth(self, request: Request) -> tuple[str, KeyLimits]:
        """Who is asking (the API key, or the client's address when the server takes no key) and their limits."""
        if not self.keys:
            return f"client:{request.client.host if request.client else '?'}", self.default_limits
        header = request.headers.get("authorization", "")
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not token:
            raise APIError(401, "Missing API key: send the header 'Authorization: Bearer <key>'.",
                           code="invalid_api_key")
        token = token.strip()
        for key, limits in self.keys.items():
            if hmac.compare_digest(token.encode(), key.encode()):
                return f"key:{key}", limits
        raise APIError(401, "Incorrect API key provided.", code="invalid_api_key")

    async def _parse(self, request: Request, schema: type[BaseModel]) -> Any:
        limit = self.cfg.max_body_bytes
        declared = request.headers.get("content-length", "")
        if declared.isdigit() and int(declared) > limit:
            raise body_too_large(int(declared), limit)
        body = bytearray()
        async for part in request.stream():  # a body without Content-Length stops at the limit too
            body += part
            if len(body) > limit:
                raise body_too_large(len(body), limit)
        return parse_request(schema, decode_json(bytes(body)))

    @staticmethod
    async def _call(method: DeploymentHandle, *args: Any, busy: str = QUEUE_FULL) -> Any:
        """One replica method's response; its `ErrorResponse` is raised, backpressure is a 503. A request
        whose replica died is sent once more (to a live replica: nothing of it was kept), then is a 503."""
        for attempt in (1, 2):
            try:
                out = await method.remote(*args)
                break
            except BackPressureError as err:
                raise overloaded(busy) from err
            except REPLICA_GONE as err:
                if attempt == 2:
                    raise replica_gone(err) from err
                logger.warning("model replica gone (%s); sending the request again", type(err).__name__)
        if isinstance(out, ErrorResponse):
            raise APIError.from_response(out)
        return out

    @staticmethod
    async def _open_stream(stream: DeploymentHandle, req: Any) -> tuple[Any, Any]:
        """The replica's stream and its first item; retried once if the replica died before it began."""
        for attempt in (1, 2):
            gen = stream.options(stream=True).remote(req)
            try:
                return gen, await gen.__anext__()
            except BackPressureError as err:
                raise overloaded(QUEUE_FULL) from err
            except StopAsyncIteration as err:
                raise APIError(500, "the model replica ended the stream without a response", "server_error") from err
            except REPLICA_GONE as err:
                if attempt == 2:
                    raise replica_gone(err) from err
                logger.warning("model replica gone (%s) before the stream began; opening it again",
                               type(err).__name__)
        raise AssertionError("unreachable")

    async def _endpoint(self, name: str, request: Request, fn) -> Response:
        """Run one route: API key, per-key limits (held until a stream ends), errors -> OpenAI JSON,
        request metrics (streams record their own)."""
        t0 = time.perf_counter()
        release: Callable[[], None] = _nothing
        try:
            if name != "health":
                request.state.caller = self._auth(request)  # (who, limits): _generate charges the tokens
                release = self.limiter.acquire(*request.state.caller)
            response = await fn()
        except APIError as err:
            release()
            if err.status >= 500:
                logger.warning("%s -> %d: %s", name, err.status, err.message)
            self.metrics.record(name, err.status, time.perf_counter() - t0)
            return error_response(err, {"Retry-After": "1"} if err.status == 503 else None)
        except BaseException:
            release()
            raise
        if isinstance(response, StreamingResponse):
            response.body_iterator = _released_after(response.body_iterator, release)
        else:
            release()
            self.metrics.record(name, response.status_code, time.perf_counter() - t0)
        return response

    async def _generate(self, name: str, request: Request, schema: type[BaseModel], unary: DeploymentHandle,
                        stream: DeploymentHandle) -> Response:
        """A completions or chat route: the `unary` replica method's response, or with `stream: true`
        the `stream` method's chunks as server-sent events. The usage is charged to the caller's token
        budget (a stream always ends with its usage chunk from the replica; it is passed on if asked for)."""
        req = await self._parse(request, schema)

        def charge(usage: Any) -> None:
            if usage is not None:
                self.limiter.charge(*request.state.caller, usage.total_tokens)

        if not req.stream:
            out = await self._call(unary, req)
            charge(out.usage)
            return JSONResponse(out.model_dump())
        wants_usage = req.include_usage()
        req.stream_options = StreamOptions(include_usage=True)
        t0 = time.perf_counter()
        gen, first = await self._open_stream(stream, req)
        if isinstance(first, ErrorResponse):
            raise APIError.from_response(first)

        async def sse() -> AsyncIterator[str]:
            status = 200
            try:
                try:
                    async for chunk in gen:
                        if getattr(chunk, "usage", None) is not None and not chunk.choices:
                            charge(chunk.usage)
                            if not wants_usage:
                                continue
                        yield f"data: {json.dumps(chunk.model_dump())}\n\n"
                        if isinstance(chunk, ErrorResponse):
                            status = chunk.status
                            break
                except REPLICA_GONE as err:  # the replica died mid-stream: the stream ends with a 503 event
                    status = 503
                    yield f"data: {json.dumps(replica_gone(err).response().model_dump())}\n\n"
                yield "data: [DONE]\n\n"
            finally:
                gen.cancel()
                self.metrics.record(name, status, time.perf_counter() - t0)

        return StreamingResponse(sse(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    # ---- routes -------------------------------------------------------------------------------
    @app.get("/health")
    async def health(self, request: Request) -> Response:
        async def fn() -> Response:
            await self._call(self.model.models, busy=ALL_BUSY)
            return JSONResponse({"status": "ok"})
        return await self._endpoint("health", request, fn)

    @app.get("/v1/models")
    async def models(self, request: Request) -> Response:
        async def fn() -> Response:
            return JSONResponse((await self._call(self.model.models, busy=ALL_BUSY)).model_dump())
        return await self._endpoint("models", request, fn)

    @app.post("/v1/completions")
    async def completions(self, request: Request) -> Response:
        return await self._endpoint("completions", request, lambda: self._generate(
            "completions", request, CompletionRequest, self.model.completions, self.model.completions_stream))

    @app.post("/v1/chat/completions")
    async def chat_completions(self, request: Request) -> Response:
        return await self._endpoint("chat", request, lambda: self._generate(
            "chat", request, ChatCompletionRequest, self.model.chat, self.model.chat_stream))

    @app.post("/tokenize")
    async def tokenize(self, request: Request) -> Response:
        async def fn() -> Response:
            req = await self._parse(request, TokenizeRequest)
            return JSONResponse((await self._call(self.model.tokenize, req)).model_dump())
        return await self._endpoint("tokenize", request, fn)

    @app.post("/detokenize")
    async def detokenize(self, request: Request) -> Response:
        async def fn() -> Response:
            req = await self._parse(request, DetokenizeRequest)
            return JSONResponse((await self._call(self.model.detokenize, req)).model_dump())
        return await self._endpoint("detokenize", request, fn)

    @app.get("/stats")
    async def stats(self, request: Request) -> Response:
        async def fn() -> Response:
            model = await self.model.stats.remote()
            return JSONResponse({"model": model, "ingress": dict(self.metrics.counts)})
        return await self._endpoint("stats", request, fn)
