"""The model replica deployment: one resource profile (CPUs/GPUs) holding the MoE, its tokenizer,
the continuous-batching engine and one OpenAI serving class per endpoint (serve/openai/).
Autoscaling, backpressure limits and health checks come from `ServeConfig.deployment` (applied in
serve/app.py).

The ingress calls one replica method per endpoint: `completions`, `completions_stream`, `chat`,
`chat_stream`, `tokenize`, `detokenize`, `models` (and `stats`). Each answers a typed response, or
an `ErrorResponse` that carries its HTTP status: a client's mistake stays a 4xx, an engine failure
is a 500 with the reason. A stream's first item is `StreamStart` or that error, so the ingress can
answer a bad request with its status before it opens the event stream.

Everything heavy (torch, the model, the MLflow download) happens in `__init__`, on the replica;
importing this module only imports Ray Serve and the pydantic schemas.
"""

from __future__ import annotations

import logging
import os
from collections.abc import AsyncIterator, Awaitable
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from ray import serve

from serve.config import ServeConfig
from serve.openai.protocol import (
    APIError,
    ChatCompletionRequest,
    CompletionRequest,
    DetokenizeRequest,
    ErrorResponse,
    TokenizeRequest,
)
from serve.openai.responses import (
    ChatCompletionResponse,
    ChatCompletionStreamResponse,
    CompletionResponse,
    CompletionStreamResponse,
    DetokenizeResponse,
    ModelList,
    StreamStart,
    TokenizeResponse,
)

if TYPE_CHECKING:
    from tokenizers import Tokenizer

    from moe.model import MoETransformer
    from serve.openai.base import OpenAIServingGeneration

T = TypeVar("T")

logger = logging.getLogger("ray.serve")


def served_model_name(cfg: ServeConfig) -> str:
    m = cfg.model
    if m.served_name:
        return m.served_name
    if m.path:
        return Path(m.path).resolve().name
    if m.run_id:
        return f"run-{m.run_id}"
    return m.registered_name or cfg.tracking.registered_model


def resolve_model_dir(cfg: ServeConfig) -> Path:
    """The local model directory: as given, or downloaded from the MLflow run / registry
    (`ModelNotFound` names what was asked, what exists and the fix)."""
    from pipelines.core.model_source import resolve_model

    return resolve_model(cfg.model, cfg.tracking).path


def _load(cfg: ServeConfig) -> tuple[MoETransformer, Tokenizer, Path]:
    """The model (on the configured device and dtype), its tokenizer and the directory they came from."""
    from tokenizers import Tokenizer

    from cluster.profiles import DTYPES
    from moe.checkpoint import TOKENIZER_FILE, load_model

    model_dir = resolve_model_dir(cfg)
    tok_path = model_dir / TOKENIZER_FILE
    if not tok_path.is_file():
        raise FileNotFoundError(f"{tok_path} not found: the model directory needs the tokenizer "
                                "(moe.checkpoint.export_model(..., tokenizer_path=...) writes it).")
    model = load_model(model_dir, device=cfg.model.device, dtype=DTYPES[cfg.model.dtype],
                       quantization=cfg.model.quant_config())
    return model, Tokenizer.from_file(str(tok_path)), model_dir


@serve.deployment(name="MoEModel")
class MoEModelServer:
    def __init__(self, cfg: ServeConfig) -> None:
        import torch

        from moe.generate import BatchDecoder
        from serve.engine import Engine
        from serve.metrics import EngineMetrics, ExpertLoadMetrics
        from serve.openai.base import ServingContext, ServingTokenizer
        from serve.openai.chat import OpenAIServingChat
        from serve.openai.completions import OpenAIServingCompletion
        from serve.openai.models import OpenAIServingModels
        from serve.openai.tokenization import OpenAIServingTokenization
        from serve.safety import SafetyPolicy

        self.cfg = cfg
        threads = cfg.model.num_threads or max(1, int(cfg.deployment.num_cpus))
        torch.set_num_threads(threads)
        model, tokenizer, model_dir = _load(cfg)
        eos = cfg.engine.eos_token
        eos_ids = tuple(i for i in [tokenizer.token_to_id(eos) if eos else None] if i is not None)
        self.name = served_model_name(cfg)
        self.metrics = EngineMetrics(self.name)
        self.expert_load = ExpertLoadMetrics(self.name)
        self.engine = Engine(BatchDecoder(model, cfg.engine.max_batch_size), cfg.engine, self.metrics,
                             self.expert_load)
        ctx = ServingContext(
            models=OpenAIServingModels(self.name, model.cfg.max_seq_len),
            tokenizer=ServingTokenizer(tokenizer, model.cfg.vocab_size), engine=self.engine,
            engine_cfg=cfg.engine, chat_template=cfg.chat, safety=SafetyPolicy(cfg.safety), eos_ids=eos_ids,
            moe_layers=tuple(int(name) for name in model.moe_layers()))
        self.serving_models = ctx.models
        self.serving_completion = OpenAIServingCompletion(ctx)
        self.serving_chat = OpenAIServingChat(ctx)
        self.serving_tokenization = OpenAIServingTokenization(ctx)
        quant = getattr(model, "quantization", None)
        logger.info("MoE replica ready: %s from %s (%s, %s, weights %s, %d threads, max_batch_size=%d, context=%d)",
                    self.name, model_dir, cfg.model.device, cfg.model.dtype, quant.method if quant else "full",
                    threads, cfg.engine.max_batch_size, model.cfg.max_seq_len)

    async def check_health(self) -> None:
        self.engine.check_health()

    async def stats(self) -> dict[str, Any]:
        return {"replica": serve.get_replica_context().replica_id.unique_id, "pid": os.getpid(),
                "max_batch_size": self.cfg.engine.max_batch_size, "waiting": len(self.engine.waiting),
                "active": len(self.engine.decoder.active), "steps": self.engine.steps, **self.metrics.snapshot(),
                **self.expert_load.snapshot()}

    # ---- one method per endpoint --------------------------------------------------------------
    async def models(self) -> ModelList:
        return self.serving_models.show_available_models()

    async def completions(self, req: CompletionRequest) -> CompletionResponse | ErrorResponse:
        return await _answer("completions", self.serving_completion.create(req))

    async def completions_stream(self, req: CompletionRequest
                                 ) -> AsyncIterator[StreamStart | CompletionStreamResponse | ErrorResponse]:
        async for item in self._stream(self.serving_completion, req):
            yield item

    async def chat(self, req: ChatCompletionRequest) -> ChatCompletionResponse | ErrorResponse:
        return await _answer("chat", self.serving_chat.create(req))

    async def chat_stream(self, req: ChatCompletionRequest
                          ) -> AsyncIterator[StreamStart | ChatCompletionStreamResponse | ErrorResponse]:
        async for item in self._stream(self.serving_chat, req):
            yield item

    async def tokenize(self, req: TokenizeRequest) -> TokenizeResponse | ErrorResponse:
        return await _answer("tokenize", self.serving_tokenization.create_tokenize(req))

    async def detokenize(self, req: DetokenizeRequest) -> DetokenizeResponse | ErrorResponse:
        return await _answer("detokenize", self.serving_tokenization.create_detokenize(req))

    # ---- plumbing -----------------------------------------------------------------------------
    async def _stream(self, serving: OpenAIServingGeneration, req: Any) -> AsyncIterator[Any]:
        """`StreamStart` (or the error that refuses the request), then the endpoint's chunks; an
        error mid-stream ends the stream with that error."""
        try:
            prep = serving.prepare(req)
        except APIError as err:
            yield err.response()
            return
        if not self.engine.has_room(len(prep.seqs)):  # refuse before the 200 and the event stream start
            yield APIError(503, f"{len(self.engine.waiting)} sequences already wait for a batch slot; retry later.",
                           "server_overloaded", code="overloaded").response()
            return
        yield StreamStart()
        try:
            async for chunk in serving.stream(req, prep):
                yield chunk
        except APIError as err:
            yield err.response()
        except Exception as err:  # an engine failure mid-stream still ends the stream with an error event
            yield APIError(500, f"generation failed: {err}", type_="server_error").response()


async def _answer(endpoint: str, work: Awaitable[T]) -> T | ErrorResponse:
    """The endpoint's response, or its error as an `ErrorResponse` (the replica stays up)."""
    try:
        return await work
    except APIError as err:
        return err.response()
    except Exception as err:  # an engine failure answers 500 with the reason
        logger.exception("%s failed", endpoint)
        return APIError(500, f"generation failed: {err}", type_="server_error").response()
