"""Serving fixtures: a tiny MoE with a byte-level BPE tokenizer trained on stdlib sources, two
versions registered in a temporary MLflow, and one real Ray Serve deployment on a free port
holding two apps:

- "moe" at /        : served from the registry (latest version = 2), batching on (8 slots),
                      input content filter on, no API key.
- "strict" at /strict: served from the run id of version 1, batching off, tiny backpressure limits
                      (1 ongoing, 1 queued), an API key, an output content filter, a 64 KiB body limit,
                      and an API keys file with three more keys: RATE_KEY (6 requests per minute,
                      bursts of 2), CONCURRENT_KEY (1 request in flight), TOKENS_KEY (60 tokens a minute).
"""

from __future__ import annotations

import os
import socket
import sysconfig
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

STRICT_KEY_ENV = "MOE_TEST_STRICT_API_KEY"
STRICT_KEY = "sk-test-4f1c0e"
MAIN_KEY_ENV = "MOE_TEST_MAIN_API_KEY_UNSET"
RATE_KEY = "sk-test-rate-9a2b"
CONCURRENT_KEY = "sk-test-concurrent-77c1"
TOKENS_KEY = "sk-test-tokens-31d0"
STRICT_BODY_LIMIT = 65536


@dataclass
class TinyModels:
    tokenizer_path: Path
    dirs: dict[int, Path]  # registry version -> exported directory
    run_ids: dict[int, str]
    tracking_uri: str
    name: str = "tiny-moe"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def train_tokenizer(path: Path, vocab_size: int = 400) -> Path:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    stdlib = Path(sysconfig.get_paths()["stdlib"])
    files = [str(stdlib / f) for f in ("textwrap.py", "string.py", "fnmatch.py", "shlex.py")]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train(files, trainer)
    tok.save(str(path))
    return path


def tiny_config():
    from moe.config import ModelConfig, MoEConfig

    return ModelConfig(name="tiny-serve", vocab_size=400, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2,
                       max_seq_len=128, dense_hidden=128, n_dense_layers=1,
                       moe=MoEConfig(n_routed_experts=8, n_shared_experts=1, top_k=2, expert_hidden=32))


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory: pytest.TempPathFactory) -> TinyModels:
    import mlflow

    from moe.checkpoint import export_model
    from moe.model import build_model
    from pipelines.core.tracking import TrackingConfig, configure, register_model_dir

    root = tmp_path_factory.mktemp("serve_models")
    tok_path = train_tokenizer(root / "tokenizer.json")
    uri = configure(TrackingConfig(uri=f"sqlite:///{root / 'mlflow.db'}", experiment="serve-tests"))
    dirs, runs = {}, {}
    for seed in (1, 2):
        d = export_model(build_model(tiny_config(), seed=seed).eval(), root / f"model_{seed}", tok_path)
        with mlflow.start_run(run_name=f"tiny-{seed}") as run:
            version = register_model_dir(d, "tiny-moe", run.info.run_id)
        dirs[version], runs[version] = d, run.info.run_id
    assert sorted(dirs) == [1, 2]
    return TinyModels(tok_path, dirs, runs, uri)


@dataclass
class Server:
    base: str  # http://127.0.0.1:PORT
    strict: str  # base + "/strict"
    models: TinyModels
    filter_prompt: str  # a prompt whose greedy continuation (strict app) hits the output filter
    filter_text: str  # that continuation, unfiltered
    blocked: str  # the output filter's block pattern (literal text)


FILTER_PROMPTS = ["def run(self):", "import os", "class Base:", "return None", "x = 1", "for k in d:"]


def blocked_fragment(models: TinyModels) -> tuple[str, str, str]:
    """A prompt, its greedy continuation by version 1, and a 3-character piece of it to block (the
    text before the piece decodes cleanly, so it is the same at every step of the generation)."""
    from tokenizers import Tokenizer

    from moe.checkpoint import load_model
    from moe.generate import SamplingParams, generate

    model, tok = load_model(models.dirs[1]), Tokenizer.from_file(str(models.tokenizer_path))
    for prompt in FILTER_PROMPTS:
        seq = generate(model, [tok.encode(prompt).ids],
                       SamplingParams(max_tokens=40, temperature=0.0, ignore_eos=True))[0]
        text = tok.decode(seq.output_ids)
        for start in range(2, len(text) - 3):
            piece = text[start:start + 3]
            if piece.strip() and "\ufffd" not in text[:start + 3] and text.index(piece) == start:
                return prompt, text, piece
    raise AssertionError("no continuation with a cleanly decoded fragment")


@pytest.fixture(scope="package")
def server(ray_cluster, tiny_models: TinyModels, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    import re

    from ray import serve

    from serve.app import build_app
    from serve.config import load_config

    filter_prompt, filter_text, blocked = blocked_fragment(tiny_models)
    keys_file = tmp_path_factory.mktemp("keys") / "api_keys.txt"
    keys_file.write_text(f"# test keys\n{RATE_KEY} requests_per_minute=6 burst=2\n\n"
                         f"{CONCURRENT_KEY} max_concurrent=1  # one request in flight\n"
                         f"{TOKENS_KEY} tokens_per_minute=60\n")
    port = free_port()
    common = [f"tracking.uri={tiny_models.tracking_uri}", "deployment.num_cpus=0.5", "ingress.num_cpus=0.05",
              "deployment.health_check_period_s=2", "engine.log_interval_s=2", "model.num_threads=1"]
    main_cfg = load_config(common + [
        "model.registered_name=tiny-moe", "engine.max_batch_size=8", "engine.batch_wait_timeout_s=0.02",
        "engine.expert_load_interval_s=0.05",
        "deployment.autoscaling.min_replicas=1", "deployment.autoscaling.max_replicas=1",
        "deployment.max_ongoing_requests=64", "deployment.max_queued_requests=64",
        f"ingress.api_key_env={MAIN_KEY_ENV}",
        "safety.input.block_words=[forbiddenword]", "safety.input.regexes=['secret-[0-9]{4}']",
    ])
    strict_cfg = load_config(common + [
        f"model.run_id={tiny_models.run_ids[1]}", "model.served_name=tiny-strict", "app_name=strict",
        "engine.max_batch_size=1", "deployment.num_replicas=1",
        "deployment.max_ongoing_requests=1", "deployment.max_queued_requests=1",
        f"ingress.api_key_env={STRICT_KEY_ENV}",
        f"safety.output.regexes=['{re.escape(blocked)}']",
        f"ingress.api_keys_file={keys_file}", f"ingress.max_body_bytes={STRICT_BODY_LIMIT}",
    ])
    os.environ.pop(MAIN_KEY_ENV, None)
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    serve.run(build_app(main_cfg), name="moe", route_prefix="/", blocking=False)
    os.environ[STRICT_KEY_ENV] = STRICT_KEY
    try:
        serve.run(build_app(strict_cfg), name="strict", route_prefix="/strict", blocking=False)
    finally:
        os.environ.pop(STRICT_KEY_ENV, None)
    base = f"http://127.0.0.1:{port}"
    try:
        yield Server(base, base + "/strict", tiny_models, filter_prompt, filter_text, blocked)
    finally:
        serve.shutdown()
