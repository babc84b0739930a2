"""The transformers peer of `python -m pipelines.bench serve`: stock `generate` behind a minimal HTTP
loop with batching (transformers 5.23's own `transformers serve` needs extra serving packages that
the project does not pin).

`python -m pipelines.bench._hf_server --model-dir HF_DIR --port N [--max-batch 32] [--threads 1]`
loads the directory with `AutoModelForCausalLM` / `AutoTokenizer` and answers `POST /v1/completions`
({prompt, max_tokens, temperature, ignore_eos}) with {choices: [{text}], usage: {completion_tokens}}.
One batcher thread takes the first waiting request, waits `--wait-ms` for more (up to `--max-batch`),
left-pads them into one batch and runs one `generate` call for all (static batching: a batch ends
when its longest request does). `GET /health` answers once the model is loaded.
"""

from __future__ import annotations

import argparse
import json
import queue
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import torch


@dataclass
class Pending:
    prompt: str
    max_tokens: int
    temperature: float
    done: threading.Event = field(default_factory=threading.Event)
    text: str = ""
    tokens: int = 0


class Batcher:
    def __init__(self, model_dir: str, max_batch: int, wait_s: float) -> None:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.tok = AutoTokenizer.from_pretrained(model_dir)
        self.tok.padding_side = "left"
        if self.tok.pad_token is None:
            self.tok.pad_token = self.tok.eos_token
        self.model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
        self.max_batch, self.wait_s = max_batch, wait_s
        self.queue: queue.Queue[Pending] = queue.Queue()
        threading.Thread(target=self.loop, daemon=True).start()

    def loop(self) -> None:
        while True:
            batch = [self.queue.get()]
            deadline = time.monotonic() + self.wait_s
            while len(batch) < self.max_batch:
                try:
                    batch.append(self.queue.get(timeout=max(0.0, deadline - time.monotonic())))
                except queue.Empty:
                    break
            self.run(batch)

    @torch.no_grad()
    def run(self, batch: list[Pending]) -> None:
        enc = self.tok([p.prompt for p in batch], return_tensors="pt", padding=True)
        n = max(p.max_tokens for p in batch)
        temperature = batch[0].temperature
        sampling = {"do_sample": True, "temperature": temperature, "top_k": 0, "top_p": 1.0} if temperature > 0 \
            else {"do_sample": False}
        out = self.model.generate(**enc, max_new_tokens=n, min_new_tokens=n, pad_token_id=self.tok.pad_token_id,
                                  **sampling)
        new = out[:, enc["input_ids"].shape[1]:]
        for p, ids in zip(batch, new):
            ids = ids[:p.max_tokens]
            p.text, p.tokens = self.tok.decode(ids, skip_special_tokens=True), len(ids)
            p.done.set()


def handler(batcher: Batcher) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args: object) -> None:  # quiet
            pass

        def reply(self, status: int, body: dict) -> None:
            data = json.dumps(body).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def do_GET(self) -> None:  # noqa: N802
            self.reply(200, {"status": "ok"})

        def do_POST(self) -> None:  # noqa: N802
            req = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))))
            p = Pending(req["prompt"], int(req.get("max_tokens", 16)), float(req.get("temperature", 1.0)))
            batcher.queue.put(p)
            p.done.wait()
            self.reply(200, {"object": "text_completion", "choices": [{"index": 0, "text": p.text}],
                             "usage": {"completion_tokens": p.tokens}})

    return Handler


def main() -> None:
    a = argparse.ArgumentParser(prog="python -m pipelines.bench._hf_server")
    a.add_argument("--model-dir", required=True)
    a.add_argument("--port", type=int, required=True)
    a.add_argument("--max-batch", type=int, default=32)
    a.add_argument("--wait-ms", type=float, default=5.0)
    a.add_argument("--threads", type=int, default=1)
    args = a.parse_args()
    torch.set_num_threads(args.threads)
    batcher = Batcher(args.model_dir, args.max_batch, args.wait_ms / 1000)
    ThreadingHTTPServer.request_queue_size = 1024  # the default backlog of 5 resets connections under 32 clients
    ThreadingHTTPServer(("127.0.0.1", args.port), handler(batcher)).serve_forever()


if __name__ == "__main__":
    main()
