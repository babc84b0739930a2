"""The OpenAI-compatible HTTP ingress (FastAPI under Ray Serve): GET /v1/models, POST /v1/completions,
POST /v1/chat/completions (JSON or server-sent events), vLLM's POST /tokenize and /detokenize,
GET /health and GET /stats.

It owns the HTTP side only: body decoding (UTF-8, JSON), schema validation
(serve/openai/protocol.py), the optional API key, mapping backpressure to 503, errors in OpenAI's
JSON shape, and request metrics. The model work happens in the `MoEModel` deployment behind
`self.model` (a handle): each route calls that endpoint's replica method and sends the typed
response it returns (serve/openai/responses.py) as JSON, or raises the `ErrorResponse` it returns.
"""


import hmac
import json
import logging
import os
import time
from collections.abc import AsyncIterator
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, ValidationError
from ray import serve
from ray.serve.exceptions import BackPressureError
from ray.serve.handle import DeploymentHandle
from starlette.exceptions import HTTPException as StarletteHTTPException

from serve.config import IngressConfig
from serve.openai.protocol import (
    APIError,
    ChatCompletionRequest,
    CompletionRequest,
    DetokenizeRequest,
    ErrorResponse,
    TokenizeRequest,
    validation_error,
)

logger = logging.getLogger("ray.serve")

app = FastAPI(title="elastic-moe OpenAI-compatible API")


def error_response(err: APIError, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse(err.body(), status_code=err.status, headers=headers)


@app.exception_handler(StarletteHTTPException)
async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
    type_ = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
    return error_response(APIError(exc.status_code, f"{request.method} {request.url.path}: {exc.detail}", type_))


@app.exception_handler(Exception)
async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
    logger.exception("unexpected error on %s", request.url.path)
    return error_response(APIError(500, f"internal error: {type(exc).__name__}: {exc}", "server_error"))


ALL_BUSY = "all model replicas are busy"
QUEUE_FULL = "all model replicas are busy and their queue is full"


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
        self.api_key = os.environ.get(cfg.api_key_env) or None
        self.metrics = RequestMetrics()
        logger.info("OpenAI ingress ready (API key %s)", f"required via ${cfg.api_key_env}" if self.api_key
                    else "off")

    # ---- plumbing -----------------------------------------------------------------------------
    def _auth(self, request: Request) -> None:
        if self.api_key is None:
            return
        header = request.headers.get("authorization", "")
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not token:
            raise APIError(401, "Missing API key: send the header 'Authorization: Bearer <key>'.",
                           code="invalid_api_key")
        if not hmac.compare_digest(token.strip().encode(), self.api_key.encode()):
            raise APIError(401, "Incorrect API key provided.", code="invalid_api_key")

    @staticmethod
    async def _parse(request: Request, schema: type[BaseModel]) -> Any:
        body = await request.body()
        try:
            text = body.decode("utf-8")
        except UnicodeDecodeError as err:
            raise APIError(400, f"The request body is not valid UTF-8 (byte {err.start}).") from err
        try:
            data = json.loads(text)
        except json.JSONDecodeError as err:
            raise APIError(400, f"The request body is not valid JSON: {err.msg} at line {err.lineno} column "
                                f"{err.colno}.") from err
        if not isinstance(data, dict):
            raise APIError(400, f"The request body must be a JSON object, got {type(data).__name__}.")
        try:
            return schema.model_validate(data)
        except ValidationError as err:
            raise validation_error(err) from err

    @staticmethod
    async def _call(method: DeploymentHandle, *args: Any, busy: str = QUEUE_FULL) -> Any:
        """One replica method's response; its `ErrorResponse` is raised, backpressure is a 503."""
        try:
            out = await method.remote(*args)
        except BackPressureError as err:
            raise overloaded(busy) from err
        if isinstance(out, ErrorResponse):
            raise APIError.from_response(out)
        return out

    async def _endpoint(self, name: str, request: Request, fn) -> Response:
        """Run one route: API key, errors -> OpenAI JSON, request metrics (streams record their own)."""
        t0 = time.perf_counter()
        try:
            if name != "health":
                self._auth(request)
            response = await fn()
        except APIError as err:
            if err.status >= 500:
                logger.warning("%s -> %d: %s", name, err.status, err.message)
            self.metrics.record(name, err.status, time.perf_counter() - t0)
            return error_response(err, {"Retry-After": "1"} if err.status == 503 else None)
        if not isinstance(response, StreamingResponse):
            self.metrics.record(name, response.status_code, time.perf_counter() - t0)
        return response

    async def _generate(self, name: str, request: Request, schema: type[BaseModel], unary: DeploymentHandle,
                        stream: DeploymentHandle) -> Response:
        """A completions or chat route: the `unary` replica method's response, or with `stream: true`
        the `stream` method's chunks as server-sent events."""
        req = await self._parse(request, schema)
        if not req.stream:
            return JSONResponse((await self._call(unary, req)).model_dump())
        t0 = time.perf_counter()
        gen = stream.options(stream=True).remote(req)
        try:
            first = await gen.__anext__()
        except BackPressureError as err:
            raise overloaded(QUEUE_FULL) from err
        except StopAsyncIteration as err:
            raise APIError(500, "the model replica ended the stream without a response", "server_error") from err
        if isinstance(first, ErrorResponse):
            raise APIError.from_response(first)

        async def sse() -> AsyncIterator[str]:
            status = 200
            try:
                async for chunk in gen:
                    yield f"data: {json.dumps(chunk.model_dump())}\n\n"
                    if isinstance(chunk, ErrorResponse):
                        status = chunk.status
                        break
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
