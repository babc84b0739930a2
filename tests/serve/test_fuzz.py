"""Property-based fuzzing (Hypothesis) of the whole serving API, seeded and bounded.

The property: whatever a client sends (wrong types in every field, huge and negative integers,
NaN/Infinity, lone UTF-16 surrogates, deep nesting, empty and long arrays, unknown keys, truncated
bodies, garbage, wrong content types and methods), the answer is a status below 500 with a
well-formed OpenAI body (a response, `{"error": {message, type, param, code}}`, or an SSE stream of
JSON chunks ending in `[DONE]`), and the server stays healthy and answers good requests after it.

- `test_http_api_never_answers_5xx`: real HTTP against the session's Serve app (tests/serve/conftest.py).
- `test_validation_and_replica_checks_only_raise_4xx`: the same requests in-process through
  `parse_request` and the replica's checks (`prepare`, tokenize, detokenize), with more examples.
- `test_sample_tokens_with_any_settings`: any mix of sampling settings in one batch samples valid
  ids and never a banned token.

Examples are derandomized (the same on every run), bounded by `max_examples`, and not shrunk (a
failure prints the example as drawn), so CI time stays fixed.
"""

from __future__ import annotations

import asyncio
import json
import time

import httpx
import pytest
import torch
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from serve.openai.protocol import (
    APIError,
    ChatCompletionRequest,
    CompletionRequest,
    DetokenizeRequest,
    TokenizeRequest,
    parse_request,
)

FUZZ = dict(deadline=None, derandomize=True, database=None, phases=[Phase.explicit, Phase.generate],
            suppress_health_check=list(HealthCheck))
HTTP_EXAMPLES = 400
INPROCESS_EXAMPLES = 500

# ---- strategies -------------------------------------------------------------------------------
EDGE_INTS = st.sampled_from([0, 1, -1, 399, 400, 2**31 - 1, 2**31, 2**63 - 1, 2**63, -(2**63) - 1, 2**64, 10**30,
                             -(10**30)])
EDGE_FLOATS = st.sampled_from([0.0, -0.0, 0.5, 2.0, 2.0001, -2.0, 100.0, -100.5, 1e308, -1e308, 5e-324,
                               float("nan"), float("inf"), float("-inf")])
EDGE_STRS = st.sampled_from(["", " ", "\ud800", "a\udfff b", "\udc00\ud800", "\x00", "x" * 1500, "é😀", "<|endoftext|>",
                             "forbiddenword", "12", "-1", " 5", "07", "NaN", "tiny-moe", "user", "text"])
SCALARS = (st.none() | st.booleans() | st.integers(-(2**70), 2**70) | EDGE_INTS | st.floats() | EDGE_FLOATS
           | st.text(max_size=12) | EDGE_STRS)
WILD = st.recursive(SCALARS, lambda inner: st.lists(inner, max_size=4)
                    | st.dictionaries(st.text(max_size=6) | EDGE_STRS, inner, max_size=4), max_leaves=12)
TEXT = st.text(max_size=24) | EDGE_STRS
IDS = st.lists(st.integers(0, 399), max_size=8) | st.lists(st.integers(0, 420) | EDGE_INTS, max_size=8)

MESSAGES = st.lists(st.fixed_dictionaries(
    {"role": st.sampled_from(["user", "system", "assistant", "developer", "robot"]),
     "content": TEXT | st.lists(st.fixed_dictionaries({"type": st.sampled_from(["text", "image"]), "text": TEXT}),
                                max_size=2)}), min_size=0, max_size=3)
SAMPLING = {
    "model": st.sampled_from(["tiny-moe", "other-model"]), "temperature": st.sampled_from([0, 0.7, 1.0, 2.0]),
    "top_p": st.sampled_from([0.3, 1.0]), "top_k": st.sampled_from([0, 5, -1]), "n": st.integers(1, 3),
    "stream": st.booleans(), "stream_options": st.fixed_dictionaries({"include_usage": st.booleans()}),
    "stop": TEXT | st.lists(TEXT, max_size=3), "stop_token_ids": IDS, "seed": st.integers(-(2**63), 2**63 - 1),
    "ignore_eos": st.booleans(), "presence_penalty": st.floats(-2, 2), "frequency_penalty": st.floats(-2, 2),
    "logit_bias": st.dictionaries(st.integers(0, 420).map(str) | EDGE_STRS, st.floats(-100, 100) | EDGE_FLOATS,
                                  max_size=4),
    "user": TEXT,
}
ENDPOINTS = {
    "/v1/completions": {**SAMPLING, "prompt": TEXT | st.lists(TEXT, max_size=3) | IDS | st.lists(IDS, max_size=2),
                        "max_tokens": st.integers(0, 3), "logprobs": st.integers(0, 3), "echo": st.booleans(),
                        "best_of": st.integers(1, 3), "suffix": TEXT},
    "/v1/chat/completions": {**SAMPLING, "messages": MESSAGES, "max_tokens": st.integers(0, 3),
                             "max_completion_tokens": st.integers(0, 3), "logprobs": st.booleans(),
                             "top_logprobs": st.integers(0, 3), "add_generation_prompt": st.booleans()},
    "/tokenize": {"model": SAMPLING["model"], "prompt": TEXT, "messages": MESSAGES,
                  "add_generation_prompt": st.booleans(), "add_special_tokens": st.booleans(),
                  "return_token_strs": st.booleans()},
    "/detokenize": {"model": SAMPLING["model"], "tokens": IDS},
}
SCHEMAS = {"/v1/completions": CompletionRequest, "/v1/chat/completions": ChatCompletionRequest,
           "/tokenize": TokenizeRequest, "/detokenize": DetokenizeRequest}
ALWAYS = {"max_tokens", "prompt", "messages", "tokens"}  # required ones, and max_tokens keeps generations short


@st.composite
def bodies(draw, path: str):
    """A JSON object for `path`: each field absent or plausible, and none, one or many of them anything
    at all; maybe an unknown key."""
    fields = ENDPOINTS[path]
    wildness = draw(st.sampled_from(["none", "one", "many"]))
    the_one = draw(st.sampled_from(sorted(fields)))
    body = {}
    for name, plausible in fields.items():
        wild = (wildness == "one" and name == the_one) or (wildness == "many" and draw(st.integers(0, 3)) == 0)
        if wild:
            body[name] = draw(WILD)
        elif name in ALWAYS or draw(st.booleans()):
            body[name] = draw(plausible)
    if path == "/tokenize" and wildness != "many":  # one of prompt and messages
        body.pop(draw(st.sampled_from(["prompt", "messages"])), None)
    if draw(st.integers(0, 4)) == 0:
        body[draw(st.text(max_size=8))] = draw(WILD)
    return body


@st.composite
def http_requests(draw):
    """(method, path, body bytes, content type): mostly JSON objects, sometimes broken on the wire."""
    if draw(st.integers(0, 12)) == 0:
        return "GET", draw(st.sampled_from(["/v1/models", "/health", "/stats", "/v1/nothing"])), b"", None
    path = draw(st.sampled_from(sorted(ENDPOINTS)))
    data = json.dumps(draw(bodies(path))).encode()  # NaN/Infinity as JS literals, surrogates as \ud800
    wire = draw(st.sampled_from(["json"] * 8 + ["truncated", "garbage", "scalar", "deep", "get"]))
    if wire == "truncated":
        data = data[:draw(st.integers(0, max(0, len(data) - 1)))]
    elif wire == "garbage":
        data = draw(st.binary(max_size=40))
    elif wire == "scalar":
        data = json.dumps(draw(SCALARS | st.lists(SCALARS, max_size=3))).encode()
    elif wire == "deep":
        depth = draw(st.sampled_from([33, 200, 5000]))
        data = b'{"prompt": ' + b"[" * depth + b"1" + b"]" * depth + b"}"
    content_type = draw(st.sampled_from(["application/json"] * 4 + ["text/plain", None,
                                                                    "application/x-www-form-urlencoded"]))
    return ("GET" if wire == "get" else "POST"), path, data, content_type


# ---- the property -----------------------------------------------------------------------------
def check_error_body(body: object) -> None:
    assert isinstance(body, dict) and set(body) == {"error"}, body
    err = body["error"]
    assert set(err) == {"message", "type", "param", "code"}, err
    assert isinstance(err["message"], str) and err["message"] and isinstance(err["type"], str)


def check_stream(text: str) -> None:
    lines = [line for line in text.split("\n") if line]
    assert lines and lines[-1] == "data: [DONE]", text[-300:]
    for line in lines[:-1]:
        assert line.startswith("data: "), line
        chunk = json.loads(line[len("data: "):])
        assert "error" not in chunk, chunk  # a stream that started may not fail for bad input
        assert {"id", "object", "created", "model", "choices"} <= set(chunk), chunk


def check_response(r: httpx.Response, path: str) -> None:
    assert r.status_code < 500, (r.status_code, r.text[:500])
    if r.headers.get("content-type", "").startswith("text/event-stream"):
        assert r.status_code == 200
        check_stream(r.text)
        return
    body = r.json()
    if r.status_code >= 400:
        check_error_body(body)
    elif path in ("/v1/completions", "/v1/chat/completions"):
        assert body["choices"] and {"id", "object", "created", "model", "usage"} <= set(body), body
    elif path == "/tokenize":
        assert body["count"] == len(body["tokens"])
    elif path == "/detokenize":
        assert isinstance(body["prompt"], str)


@pytest.fixture(scope="module")
def client(server):
    with httpx.Client(base_url=server.base, timeout=120.0) as c:
        yield c


def test_http_api_never_answers_5xx(client):
    seen: dict[int, int] = {}
    t0 = time.perf_counter()

    @settings(max_examples=HTTP_EXAMPLES, **FUZZ)
    @given(http_requests())
    def fuzz(request):
        method, path, data, content_type = request
        headers = {"Content-Type": content_type} if content_type else {}
        with client.stream(method, path, content=data or None, headers=headers) as r:
            r.read()
        seen[r.status_code] = seen.get(r.status_code, 0) + 1
        check_response(r, path)

    fuzz()
    print(f"fuzzed {HTTP_EXAMPLES} requests in {time.perf_counter() - t0:.1f}s; statuses {sorted(seen.items())}")
    assert seen.get(200, 0) >= 10 and sum(v for k, v in seen.items() if 400 <= k < 500) >= 40, seen
    assert client.get("/health").json() == {"status": "ok"}  # the server is healthy and serves good requests
    r = client.post("/v1/completions", json={"prompt": "def f(x):", "max_tokens": 2})
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 2
    stats = client.get("/stats").json()
    assert stats["model"]["waiting"] == 0 and stats["model"]["active"] == 0


# ---- in-process: the validation layer and the replica's own checks ----------------------------
@pytest.fixture(scope="module")
def serving(ray_cluster, tmp_path_factory: pytest.TempPathFactory):
    from tokenizers import Tokenizer

    from moe.generate import BatchDecoder
    from moe.model import build_model
    from serve.config import ChatTemplateConfig, EngineConfig, SafetyConfig, SafetyRules
    from serve.engine import Engine
    from serve.metrics import EngineMetrics
    from serve.openai.base import ServingContext, ServingTokenizer
    from serve.openai.chat import OpenAIServingChat
    from serve.openai.completions import OpenAIServingCompletion
    from serve.openai.models import OpenAIServingModels
    from serve.openai.tokenization import OpenAIServingTokenization
    from serve.safety import SafetyPolicy
    from tests.serve.conftest import tiny_config, train_tokenizer

    tok = Tokenizer.from_file(str(train_tokenizer(tmp_path_factory.mktemp("fuzz_tok") / "tokenizer.json")))
    model = build_model(tiny_config(), seed=5).eval()
    ecfg = EngineConfig(max_batch_size=2, max_n=3, max_waiting=8)
    ctx = ServingContext(
        models=OpenAIServingModels("tiny-moe", model.cfg.max_seq_len), tokenizer=ServingTokenizer(tok, 400),
        engine=Engine(BatchDecoder(model, 2), ecfg, EngineMetrics("fuzz-test")), engine_cfg=ecfg,
        chat_template=ChatTemplateConfig(), safety=SafetyPolicy(SafetyConfig(input=SafetyRules(["forbiddenword"]))),
        eos_ids=())
    return {"/v1/completions": OpenAIServingCompletion(ctx), "/v1/chat/completions": OpenAIServingChat(ctx),
            "tokenization": OpenAIServingTokenization(ctx)}


def replica_answer(serving, path: str, req) -> None:
    """What the replica does with a valid request, short of running the engine."""
    if path == "/tokenize":
        asyncio.run(serving["tokenization"].create_tokenize(req))
    elif path == "/detokenize":
        asyncio.run(serving["tokenization"].create_detokenize(req))
    else:
        prep = serving[path].prepare(req)
        assert all(s.params.validate() for s in prep.seqs)


@st.composite
def decoded_bodies(draw):
    path = draw(st.sampled_from(sorted(ENDPOINTS)))
    body = draw(bodies(path)) if draw(st.integers(0, 9)) else draw(WILD)
    return path, body


def test_validation_and_replica_checks_only_raise_4xx(serving):
    outcomes = {"refused at the edge": 0, "refused by the replica": 0, "answered": 0}

    @settings(max_examples=INPROCESS_EXAMPLES, **FUZZ)
    @given(decoded_bodies())
    def fuzz(case):
        path, body = case
        where = "refused at the edge"
        try:
            req = parse_request(SCHEMAS[path], body)
            where = "refused by the replica"
            replica_answer(serving, path, req)
            where = "answered"
        except APIError as err:
            assert 400 <= err.status < 500 and err.message, (err.status, err.message)
            check_error_body(json.loads(json.dumps(err.body())))
        outcomes[where] += 1

    fuzz()
    print(outcomes)
    assert min(outcomes.values()) >= 15, outcomes  # every layer was exercised (derandomized: 389/21/90 today)


@settings(max_examples=200, **FUZZ)
@given(st.lists(st.fixed_dictionaries({
    "temperature": st.sampled_from([0.0, 0.5, 1.0, 2.0]), "top_p": st.sampled_from([0.1, 0.9, 1.0]),
    "top_k": st.sampled_from([-1, 0, 1, 3, 50]), "presence_penalty": st.floats(-2, 2),
    "frequency_penalty": st.floats(-2, 2), "seed": st.integers(-(2**63), 2**64),
    "logit_bias": st.lists(st.tuples(st.integers(0, 40), st.floats(-100, 100) | st.just(-100.0)), max_size=12),
    "output_ids": st.lists(st.integers(0, 40), max_size=10)}), min_size=1, max_size=5))
def test_sample_tokens_with_any_settings(rows):
    from moe.generate import SamplingParams, Sequence, sample_tokens

    V = 24
    seqs = []
    for row in rows:
        bias = tuple(dict(row["logit_bias"]).items())  # one bias per token, as a request's dict gives
        params = SamplingParams(**{k: v for k, v in row.items() if k != "output_ids"} | {"logit_bias": bias}).validate()
        seq = Sequence([1], params)
        seq.output_ids = row["output_ids"]
        seqs.append(seq)
    logits = torch.randn(len(rows), V, generator=torch.Generator().manual_seed(len(rows)))
    out = sample_tokens(logits, seqs).tolist()
    for token, seq in zip(out, seqs):
        assert 0 <= token < V
        banned = {t for t, b in seq.params.logit_bias if b <= -100 and t < V}
        if len(banned) < V:
            assert token not in banned
