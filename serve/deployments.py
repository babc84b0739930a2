"""The model replica deployment: one resource profile (CPUs/GPUs) holding the MoE, its tokenizer,
the continuous-batching engine and the OpenAI serving logic. Autoscaling, backpressure limits and
health checks come from `ServeConfig.deployment` (applied in serve/app.py).

Everything heavy (torch, the model, the MLflow download) happens in `__init__`, on the replica;
importing this module only imports Ray Serve.
"""

from __future__ import annotations

import logging
import os
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from ray import serve

from serve.config import ServeConfig
from serve.protocol import APIError

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
    """The local model directory: as given, or downloaded from the MLflow run / registry."""
    m = cfg.model
    if m.path:
        return Path(m.path)
    from pipelines.core.tracking import download_model

    return download_model(cfg.tracking.uri, name=m.registered_name or cfg.tracking.registered_model,
                          version=m.version, alias=m.alias, run_id=m.run_id)


@serve.deployment(name="MoEModel")
class MoEModelServer:
    def __init__(self, cfg: ServeConfig) -> None:
        import torch
        from tokenizers import Tokenizer

        from moe.checkpoint import TOKENIZER_FILE, load_model
        from moe.generate import BatchDecoder
        from serve.completions import OpenAIServing
        from serve.engine import Engine
        from serve.metrics import EngineMetrics
        from serve.safety import SafetyPolicy

        self.cfg = cfg
        threads = cfg.model.num_threads or max(1, int(cfg.deployment.num_cpus))
        torch.set_num_threads(threads)
        model_dir = resolve_model_dir(cfg)
        tok_path = model_dir / TOKENIZER_FILE
        if not tok_path.is_file():
            raise FileNotFoundError(f"{tok_path} not found: the model directory needs the tokenizer "
                                    "(moe.checkpoint.export_model(..., tokenizer_path=...) writes it).")
        dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[cfg.model.dtype]
        model = load_model(model_dir, device=cfg.model.device, dtype=dtype)
        tokenizer = Tokenizer.from_file(str(tok_path))
        eos = cfg.engine.eos_token
        eos_ids = [i for i in [tokenizer.token_to_id(eos) if eos else None] if i is not None]
        self.name = served_model_name(cfg)
        self.metrics = EngineMetrics(self.name)
        self.engine = Engine(BatchDecoder(model, cfg.engine.max_batch_size), cfg.engine, self.metrics)
        self.api = OpenAIServing(model_name=self.name, tokenizer=tokenizer, max_len=model.cfg.max_seq_len,
                                 vocab_size=model.cfg.vocab_size, engine=self.engine, engine_cfg=cfg.engine,
                                 chat=cfg.chat, safety=SafetyPolicy(cfg.safety), eos_ids=eos_ids)
        logger.info("MoE replica ready: %s from %s (%s, %s, %d threads, max_batch_size=%d, context=%d)",
                    self.name, model_dir, cfg.model.device, cfg.model.dtype, threads, cfg.engine.max_batch_size,
                    model.cfg.max_seq_len)

    async def check_health(self) -> None:
        self.engine.check_health()

    async def info(self) -> dict[str, Any]:
        return self.api.info()

    async def stats(self) -> dict[str, Any]:
        return {"replica": serve.get_replica_context().replica_id.unique_id, "pid": os.getpid(),
                "max_batch_size": self.cfg.engine.max_batch_size, "waiting": len(self.engine.waiting),
                "active": len(self.engine.decoder.active), "steps": self.engine.steps, **self.metrics.snapshot()}

    async def call(self, method: str, req: Any) -> dict[str, Any]:
        """tokenize | detokenize | completion | chat, answered in one piece; errors as `APIError.to_dict()`."""
        try:
            if method == "tokenize":
                return self.api.tokenize(req)
            if method == "detokenize":
                return self.api.detokenize(req)
            prep = self.api.prepare(method, req)
            return await self.api.run(prep, echo=getattr(req, "echo", False))
        except APIError as err:
            return err.to_dict()
        except Exception as err:  # an engine failure answers 500 with the reason; the replica stays up
            logger.exception("%s failed", method)
            return APIError(500, f"generation failed: {err}", type_="server_error").to_dict()

    async def stream(self, method: str, req: Any) -> AsyncIterator[dict[str, Any]]:
        """completion | chat as chunks. The first item is {"ok": true} or an error, so the ingress can
        answer a bad request with its status before it starts the event stream."""
        try:
            prep = self.api.prepare(method, req)
        except APIError as err:
            yield err.to_dict()
            return
        if not self.engine.has_room(len(prep.seqs)):  # refuse before the 200 and the event stream start
            yield APIError(503, f"{len(self.engine.waiting)} sequences already wait for a batch slot; retry later.",
                           "server_overloaded", code="overloaded").to_dict()
            return
        yield {"ok": True}
        opts = req.stream_options
        try:
            async for chunk in self.api.stream(prep, echo=getattr(req, "echo", False),
                                               include_usage=bool(opts and opts.include_usage)):
                yield chunk
        except APIError as err:
            yield err.to_dict()
        except Exception as err:  # an engine failure mid-stream still ends the stream with an error event
            yield APIError(500, f"generation failed: {err}", type_="server_error").to_dict()
