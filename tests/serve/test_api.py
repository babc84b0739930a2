"""The OpenAI-compatible API over real HTTP against a real Ray Serve deployment (tests/serve/conftest.py):
every endpoint, all prompt forms, n, logprobs/echo, streaming, batching under concurrency,
backpressure, the API key, per-key limits, the content filter, OpenAI's logit_bias and penalties, and bad
input (each followed by a good request; issue 22's reproductions among them)."""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
import torch
import torch.nn.functional as F

from tests.serve.conftest import CONCURRENT_KEY, RATE_KEY, STRICT_BODY_LIMIT, STRICT_KEY, TOKENS_KEY

TIMEOUT = 120.0


@pytest.fixture(scope="module")
def client(server) -> httpx.Client:
    with httpx.Client(base_url=server.base, timeout=TIMEOUT) as c:
        yield c


@pytest.fixture(scope="module")
def local(server):
    """The registry's latest version (2) and the tokenizer, loaded here to check the server's numbers."""
    from tokenizers import Tokenizer

    from moe.checkpoint import load_model

    return load_model(server.models.dirs[2]), Tokenizer.from_file(str(server.models.tokenizer_path))


def good(client: httpx.Client, prefix: str = "", headers: dict | None = None) -> None:
    r = client.post(f"{prefix}/v1/completions", json={"prompt": "def f(x):", "max_tokens": 2}, headers=headers)
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["finish_reason"] in ("length", "stop", "content_filter")


def sse(response: httpx.Response) -> list[dict]:
    events, done = [], False
    for line in response.iter_lines():
        if not line:
            continue
        assert line.startswith("data: "), line
        payload = line[len("data: "):]
        if payload == "[DONE]":
            done = True
            continue
        events.append(json.loads(payload))
    assert done, "stream did not end with [DONE]"
    return events


def test_health_and_models(client, server):
    assert client.get("/health").json() == {"status": "ok"}
    r = client.get("/v1/models")
    assert r.status_code == 200
    data = r.json()["data"]
    assert [m["id"] for m in data] == ["tiny-moe"] and data[0]["max_model_len"] == 128
    from ray import serve

    status = serve.status()
    for app in ("moe", "strict"):
        assert status.applications[app].status == "RUNNING"
        for dep in status.applications[app].deployments.values():
            assert dep.status == "HEALTHY"


def test_completion_matches_local_greedy_decoding(client, local):
    from moe.generate import SamplingParams, generate

    model, tok = local
    prompt = "import os\nfrom collections import"
    r = client.post("/v1/completions", json={"model": "tiny-moe", "prompt": prompt, "max_tokens": 12,
                                              "temperature": 0, "ignore_eos": True})
    assert r.status_code == 200, r.text
    body = r.json()
    ids = tok.encode(prompt).ids
    ref = generate(model, [ids], SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True))[0]
    assert body["object"] == "text_completion" and body["model"] == "tiny-moe"
    assert body["choices"][0]["text"] == tok.decode(ref.output_ids)
    assert body["choices"][0]["finish_reason"] == "length"
    assert body["usage"] == {"prompt_tokens": len(ids), "completion_tokens": 12, "total_tokens": len(ids) + 12}


def test_prompt_forms_and_n(client, local):
    _, tok = local
    a, b = "class A:", "while True:"
    ids_a, ids_b = tok.encode(a).ids, tok.encode(b).ids
    base = {"max_tokens": 5, "temperature": 0, "ignore_eos": True}
    texts = {}
    for name, prompt in [("str", a), ("strs", [a, b]), ("ids", ids_a), ("idss", [ids_a, ids_b])]:
        r = client.post("/v1/completions", json={**base, "prompt": prompt, "n": 2})
        assert r.status_code == 200, r.text
        body = r.json()
        n_prompts = 2 if name in ("strs", "idss") else 1
        assert [c["index"] for c in body["choices"]] == list(range(2 * n_prompts))
        assert body["usage"]["prompt_tokens"] == len(ids_a) + (len(ids_b) if n_prompts == 2 else 0)
        assert body["usage"]["completion_tokens"] == 5 * 2 * n_prompts
        texts[name] = [c["text"] for c in body["choices"]]
    # greedy: every form of the same prompt continues the same way, and n copies agree
    assert texts["str"] == texts["ids"] == texts["strs"][:2] == texts["idss"][:2]
    assert texts["strs"][2:] == texts["idss"][2:]
    assert texts["str"][0] == texts["str"][1]


def test_seed_makes_sampling_reproducible(client):
    req = {"prompt": "for i in range(", "max_tokens": 10, "temperature": 1.0, "top_p": 0.9, "top_k": 50,
           "seed": 1234, "ignore_eos": True, "n": 2}
    one, two = (client.post("/v1/completions", json=req).json() for _ in range(2))
    assert [c["text"] for c in one["choices"]] == [c["text"] for c in two["choices"]]


def test_echo_and_logprobs_score_the_prompt(client, local):
    model, tok = local
    prompt = "return self._value"
    ids = tok.encode(prompt).ids
    r = client.post("/v1/completions", json={"prompt": prompt, "max_tokens": 0, "echo": True, "logprobs": 2})
    assert r.status_code == 200, r.text
    choice = r.json()["choices"][0]
    assert choice["text"] == prompt
    lp = choice["logprobs"]
    assert len(lp["tokens"]) == len(ids) and "".join(lp["tokens"]) == prompt
    assert lp["token_logprobs"][0] is None and lp["top_logprobs"][0] is None
    with torch.no_grad():
        ref = F.log_softmax(model(torch.tensor([ids]))[0], -1)
    for t in range(1, len(ids)):
        assert abs(lp["token_logprobs"][t] - float(ref[t - 1, ids[t]])) < 1e-3
        assert 1 <= len(lp["top_logprobs"][t]) <= 3
    assert lp["text_offset"] == [sum(len(s) for s in lp["tokens"][:i]) for i in range(len(ids))]
    # echo with generation: prompt entries then generated entries
    r = client.post("/v1/completions", json={"prompt": prompt, "max_tokens": 3, "echo": True, "logprobs": 1,
                                              "temperature": 0, "ignore_eos": True})
    choice = r.json()["choices"][0]
    assert choice["text"].startswith(prompt)
    assert len(choice["logprobs"]["tokens"]) == len(ids) + 3
    assert r.json()["usage"]["completion_tokens"] == 3


def test_chat_completion_and_template(client, local):
    _, tok = local
    messages = [{"role": "system", "content": "You write Python."},
                {"role": "user", "content": [{"type": "text", "text": "Write a loop."}]}]
    r = client.post("/v1/chat/completions", json={"model": "tiny-moe", "messages": messages, "max_tokens": 6,
                                                   "temperature": 0, "logprobs": True, "top_logprobs": 2})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["object"] == "chat.completion"
    choice = body["choices"][0]
    assert choice["message"]["role"] == "assistant" and isinstance(choice["message"]["content"], str)
    assert choice["finish_reason"] in ("length", "stop")
    rendered = "<|system|>\nYou write Python.\n<|user|>\nWrite a loop.\n<|assistant|>\n"
    assert body["usage"]["prompt_tokens"] == len(tok.encode(rendered).ids)
    content = choice["logprobs"]["content"]
    assert len(content) == body["usage"]["completion_tokens"]
    assert all(len(c["top_logprobs"]) == 2 and c["logprob"] <= 0 for c in content)
    tk = client.post("/tokenize", json={"messages": messages}).json()
    assert tk["count"] == body["usage"]["prompt_tokens"]


def test_streaming_completions_equal_non_streaming(client):
    req = {"prompt": "def main():\n", "max_tokens": 16, "temperature": 0, "ignore_eos": True}
    full = client.post("/v1/completions", json=req).json()
    with client.stream("POST", "/v1/completions",
                       json={**req, "stream": True, "stream_options": {"include_usage": True}}) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        events = sse(r)
    chunks = [e for e in events if e["choices"]]
    assert len(chunks) > 2  # tokens arrive in pieces
    assert "".join(c["choices"][0]["text"] for c in chunks) == full["choices"][0]["text"]
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"
    assert events[-1]["choices"] == [] and events[-1]["usage"] == full["usage"]


def test_streaming_chat_equals_non_streaming(client):
    req = {"messages": [{"role": "user", "content": "hello"}], "max_tokens": 10, "temperature": 0}
    full = client.post("/v1/chat/completions", json=req).json()
    with client.stream("POST", "/v1/chat/completions", json={**req, "stream": True}) as r:
        assert r.status_code == 200
        events = sse(r)
    assert events[0]["object"] == "chat.completion.chunk"
    assert events[0]["choices"][0]["delta"]["role"] == "assistant"
    text = "".join(e["choices"][0]["delta"].get("content", "") for e in events)
    assert text == full["choices"][0]["message"]["content"]
    assert events[-1]["choices"][0]["finish_reason"] == full["choices"][0]["finish_reason"]


def test_stop_sequences(client):
    req = {"prompt": "x = 1\n", "max_tokens": 20, "temperature": 0, "ignore_eos": True}
    text = client.post("/v1/completions", json=req).json()["choices"][0]["text"]
    stop = text[5:8]
    assert len(stop) == 3
    r = client.post("/v1/completions", json={**req, "stop": [stop]}).json()["choices"][0]
    assert r["finish_reason"] == "stop" and r["text"] == text[:text.index(stop)]


def test_tokenize_detokenize_roundtrip(client, local):
    _, tok = local
    text = "def greet(name):\n    return f'hi {name}'"
    r = client.post("/tokenize", json={"model": "tiny-moe", "prompt": text, "return_token_strs": True})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["tokens"] == tok.encode(text).ids and body["count"] == len(body["tokens"])
    assert body["max_model_len"] == 128 and "".join(body["token_strs"]) == text
    r = client.post("/detokenize", json={"tokens": body["tokens"]})
    assert r.json() == {"prompt": text}


def test_concurrent_requests_are_batched(client):
    before = client.get("/stats").json()["model"]
    prompts = [f"value_{i} = compute(" for i in range(8)]

    def one(p: str) -> str:
        r = client.post("/v1/completions", json={"prompt": p, "max_tokens": 24, "temperature": 0, "ignore_eos": True})
        assert r.status_code == 200, r.text
        return r.json()["choices"][0]["text"]

    with ThreadPoolExecutor(8) as pool:
        together = list(pool.map(one, prompts))
    after = client.get("/stats").json()["model"]
    new = {int(k): v - before["decode_batch_sizes"].get(k, 0) for k, v in after["decode_batch_sizes"].items()}
    assert max(k for k, v in new.items() if v > 0) > 1, new  # several sequences shared decode steps
    assert after["max_decode_batch_size"] <= 8
    alone = [one(p) for p in prompts[:3]]
    assert alone == together[:3]  # batching does not change greedy results


def test_backpressure_returns_503_and_recovers(server):
    headers = {"Authorization": f"Bearer {STRICT_KEY}"}
    req = {"prompt": "import sys", "max_tokens": 100, "temperature": 0, "ignore_eos": True}
    with httpx.Client(base_url=server.strict, timeout=TIMEOUT, headers=headers) as c:
        with ThreadPoolExecutor(12) as pool:
            results = list(pool.map(lambda _: c.post("/v1/completions", json=req), range(12)))
        codes = sorted(r.status_code for r in results)
        assert 200 in codes and 503 in codes, codes
        assert set(codes) <= {200, 503}
        rejected = next(r for r in results if r.status_code == 503)
        err = rejected.json()["error"]
        assert err["code"] == "overloaded" and "overloaded" in err["message"] and rejected.headers["retry-after"]
        good(c)


def test_api_key(server):
    with httpx.Client(base_url=server.strict, timeout=TIMEOUT) as c:
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": STRICT_KEY}):
            r = c.post("/v1/completions", json={"prompt": "a", "max_tokens": 1}, headers=headers)
            assert r.status_code == 401, r.text
            assert r.json()["error"]["code"] == "invalid_api_key"
            assert c.get("/v1/models", headers=headers).status_code == 401
        assert c.get("/health").status_code == 200  # health stays open for probes
        ok = {"Authorization": f"Bearer {STRICT_KEY}"}
        assert c.get("/v1/models", headers=ok).json()["data"][0]["id"] == "tiny-strict"
        good(c, headers=ok)


def test_no_api_key_needed_by_default(client):
    assert client.get("/v1/models").status_code == 200


def test_input_content_filter(client):
    for prompt in ("please say FORBIDDENWORD now", "the code is secret-1234"):
        r = client.post("/v1/completions", json={"prompt": prompt, "max_tokens": 2})
        assert r.status_code == 400, r.text
        assert r.json()["error"]["code"] == "content_policy_violation"
        good(client)
    r = client.post("/v1/chat/completions",
                    json={"messages": [{"role": "user", "content": "forbiddenword"}], "max_tokens": 2})
    assert r.status_code == 400 and r.json()["error"]["code"] == "content_policy_violation"
    assert client.post("/v1/completions", json={"prompt": "forbiddenwords are fine", "max_tokens": 1}).status_code == 200


def test_output_content_filter(server):
    text, blocked = server.filter_text, server.blocked
    assert blocked in text
    headers = {"Authorization": f"Bearer {STRICT_KEY}"}
    req = {"prompt": server.filter_prompt, "max_tokens": 40, "temperature": 0, "ignore_eos": True}
    with httpx.Client(base_url=server.strict, timeout=TIMEOUT, headers=headers) as c:
        choice = c.post("/v1/completions", json=req).json()["choices"][0]
        assert choice["finish_reason"] == "content_filter"
        assert choice["text"] == text[:text.index(blocked)]
        with c.stream("POST", "/v1/completions", json={**req, "stream": True}) as r:
            events = sse(r)
        assert events[-1]["choices"][0]["finish_reason"] == "content_filter"
        # held back by the longest match: not even the first characters of the blocked piece leak
        assert "".join(e["choices"][0]["text"] for e in events) == text[:text.index(blocked)]
        good(c)


BAD_INPUTS = [
    ("invalid JSON", "/v1/completions", b'{"prompt": "x", ', 400, "not valid JSON"),
    ("non-UTF-8 body", "/v1/completions", b'{"prompt": "\xff\xfe"}', 400, "UTF-8"),
    ("JSON not an object", "/v1/completions", b'["prompt"]', 400, "JSON object"),
    ("missing prompt", "/v1/completions", {"max_tokens": 3}, 400, "prompt: field required"),
    ("missing messages", "/v1/chat/completions", {"max_tokens": 3}, 400, "messages: field required"),
    ("prompt wrong type", "/v1/completions", {"prompt": 42}, 400, "prompt"),
    ("max_tokens wrong type", "/v1/completions", {"prompt": "x", "max_tokens": "many"}, 400, "max_tokens"),
    ("stream wrong type", "/v1/completions", {"prompt": "x", "stream": "yes"}, 400, "stream"),
    ("messages wrong type", "/v1/chat/completions", {"messages": "hello"}, 400, "messages"),
    ("bad role", "/v1/chat/completions", {"messages": [{"role": "robot", "content": "x"}]}, 400, "role"),
    ("negative max_tokens", "/v1/completions", {"prompt": "x", "max_tokens": -5}, 400, "max_tokens"),
    ("huge max_tokens", "/v1/completions", {"prompt": "x", "max_tokens": 10**9}, 400, "maximum context length"),
    ("huge max_tokens chat", "/v1/chat/completions",
     {"messages": [{"role": "user", "content": "x"}], "max_tokens": 5000}, 400, "maximum context length"),
    ("prompt longer than context", "/v1/completions", {"prompt": "word " * 400, "max_tokens": 1}, 400,
     "maximum context length"),
    ("token ids longer than context", "/v1/completions", {"prompt": [5] * 200, "max_tokens": 0, "echo": True},
     400, "maximum context length"),
    ("token id out of vocabulary", "/v1/completions", {"prompt": [1, 2, 99999]}, 400, "outside the vocabulary"),
    ("negative token id", "/detokenize", {"tokens": [-1]}, 400, "tokens: token id -1"),
    ("unknown model", "/v1/completions", {"model": "gpt-17", "prompt": "x"}, 404, "does not exist"),
    ("unknown model chat", "/v1/chat/completions", {"model": "gpt-17", "messages": [{"role": "user", "content": "x"}]},
     404, "does not exist"),
    ("unknown model stream", "/v1/completions", {"model": "gpt-17", "prompt": "x", "stream": True}, 404,
     "does not exist"),
    ("temperature too high", "/v1/completions", {"prompt": "x", "temperature": 7.5}, 400, "temperature"),
    ("temperature negative", "/v1/chat/completions",
     {"messages": [{"role": "user", "content": "x"}], "temperature": -1}, 400, "temperature"),
    ("top_p out of range", "/v1/completions", {"prompt": "x", "top_p": 0}, 400, "top_p"),
    ("n too large", "/v1/completions", {"prompt": "x", "n": 1000}, 400, "n="),
    ("n zero", "/v1/completions", {"prompt": "x", "n": 0}, 400, "n"),
    ("logprobs too many", "/v1/completions", {"prompt": "x", "logprobs": 50}, 400, "logprobs"),
    ("empty prompt list", "/v1/completions", {"prompt": []}, 400, "prompt"),
    ("empty messages", "/v1/chat/completions", {"messages": []}, 400, "messages"),
    ("tokenize neither", "/tokenize", {"model": "tiny-moe"}, 400, "exactly one"),
    ("unknown route", "/v1/embeddings", {"input": "x"}, 404, "Not Found"),
    # issue 22: each of these was a 500 before validation at the edge
    ("negative token id in prompt", "/v1/completions", {"prompt": [5, -1]}, 400, "prompt: token id -1"),
    ("token id far beyond the vocabulary", "/v1/completions", {"prompt": [5, 2**40]}, 400,
     "outside [0, 2147483647]"),
    ("token id beyond int64", "/v1/completions", {"prompt": [[5], [10**30]]}, 400, "prompt.1: token id"),
    ("huge detokenize id", "/detokenize", {"tokens": [2**63]}, 400, "tokens: token id"),
    ("lone surrogate prompt", "/v1/completions", b'{"prompt": "ab\\ud800"}', 400,
     "prompt: contains a lone UTF-16 surrogate"),
    ("lone surrogate chat", "/v1/chat/completions", b'{"messages": [{"role": "user", "content": "\\udc00"}]}',
     400, "messages.0.content: contains a lone UTF-16 surrogate"),
    ("lone surrogate tokenize", "/tokenize", b'{"prompt": "x\\ud83d"}', 400, "prompt: contains a lone"),
    ("lone surrogate in a key", "/v1/completions", b'{"prompt": "x", "logit_bias": {"\\ud800": 1}}', 400,
     "lone UTF-16 surrogate"),
    ("NaN temperature", "/v1/completions", b'{"prompt": "x", "temperature": NaN}', 400, "temperature: Input should be a finite"),
    ("Infinity penalty", "/v1/completions", b'{"prompt": "x", "presence_penalty": -Infinity}', 400,
     "presence_penalty"),
    ("integer with 5000 digits", "/v1/completions", b'{"prompt": "x", "seed": ' + b"9" * 5000 + b"}", 400,
     "not valid JSON"),
    ("seed beyond int64", "/v1/completions", {"prompt": "x", "seed": 2**64}, 400, "seed"),
    ("deep nesting", "/v1/completions", b'{"prompt": ' + b"[" * 50_000, 400, "nested too deeply"),
    ("nesting beyond the limit", "/v1/completions", {"prompt": "x", "user": json.loads("[" * 40 + "]" * 40)}, 400,
     "nested more than 32"),
    ("logit_bias key not a token id", "/v1/completions", {"prompt": "x", "logit_bias": {"abc": 1}}, 400,
     "logit_bias: key 'abc' is not a token id"),
    ("logit_bias beyond the vocabulary", "/v1/completions", {"prompt": "x", "logit_bias": {"5000": 1}}, 400,
     "logit_bias: key '5000' is token id 5000, outside the vocabulary [0, 400)"),
    ("logit_bias value too large", "/v1/chat/completions",
     {"messages": [{"role": "user", "content": "x"}], "logit_bias": {"5": 101}}, 400, "outside [-100, 100]"),
    ("penalty out of range", "/v1/completions", {"prompt": "x", "frequency_penalty": 2.5}, 400, "frequency_penalty"),
    ("too many stop strings", "/v1/completions", {"prompt": "x", "stop": ["a"] * 17}, 400, "stop"),
    ("too many prompts", "/v1/completions", {"prompt": ["x"] * 300}, 400, "300 prompts"),
    ("suffix", "/v1/completions", {"prompt": "x", "suffix": "y"}, 400, "suffix is not supported"),
    ("best_of below n", "/v1/completions", {"prompt": "x", "n": 2, "best_of": 1}, 400, "best_of=1 must be >= n=2"),
    ("best_of streamed", "/v1/completions", {"prompt": "x", "best_of": 2, "stream": True}, 400, "cannot stream"),
    ("best_of above the limit", "/v1/completions", {"prompt": "x", "best_of": 100}, 400, "best_of=100 is above"),
]


@pytest.mark.parametrize("case", BAD_INPUTS, ids=[c[0] for c in BAD_INPUTS])
def test_bad_input_gets_4xx_and_server_stays_healthy(client, case):
    _, path, body, status, fragment = case
    if isinstance(body, bytes):
        r = client.post(path, content=body, headers={"Content-Type": "application/json"})
    else:
        r = client.post(path, json=body)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert fragment in err["message"], err
    assert set(err) == {"message", "type", "param", "code"}
    good(client)


def test_client_disconnect_mid_stream_frees_the_slot(client):
    req = {"prompt": "while True:", "max_tokens": 100, "temperature": 0, "ignore_eos": True, "stream": True}
    with client.stream("POST", "/v1/completions", json=req) as r:
        for line in r.iter_lines():
            if line.startswith("data: {"):
                break  # leave after the first chunk
    good(client)
    stats = client.get("/stats").json()["model"]
    assert stats["waiting"] == 0


def test_streaming_several_prompts_n_echo_and_logprobs(client):
    req = {"prompt": ["a = 1", "b = 2"], "n": 2, "max_tokens": 4, "temperature": 0, "ignore_eos": True,
           "echo": True, "logprobs": 1}
    full = client.post("/v1/completions", json=req).json()
    with client.stream("POST", "/v1/completions", json={**req, "stream": True}) as r:
        events = sse(r)
    texts: dict[int, str] = {}
    tokens: dict[int, list[str]] = {}
    finish: dict[int, str] = {}
    for e in events:
        for c in e["choices"]:
            texts[c["index"]] = texts.get(c["index"], "") + c["text"]
            tokens.setdefault(c["index"], []).extend(c["logprobs"]["tokens"] if c["logprobs"] else [])
            if c["finish_reason"]:
                finish[c["index"]] = c["finish_reason"]
    assert sorted(texts) == [0, 1, 2, 3] and finish == {i: "length" for i in range(4)}
    for c in full["choices"]:
        assert texts[c["index"]] == c["text"] and c["text"].startswith(["a = 1", "b = 2"][c["index"] // 2])
        assert tokens[c["index"]] == c["logprobs"]["tokens"]


def test_wire_json_keys_and_nulls(client):
    """Every response shape sends exactly these keys, with null where nothing applies."""
    top = {"id", "object", "created", "model", "choices", "usage"}
    body = client.post("/v1/completions", json={"prompt": "x = 1", "max_tokens": 2}).json()
    assert set(body) == top and set(body["choices"][0]) == {"index", "text", "logprobs", "finish_reason"}
    assert body["choices"][0]["logprobs"] is None
    chat = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 3, "temperature": 0}
    body = client.post("/v1/chat/completions", json=chat).json()
    assert set(body) == top and set(body["choices"][0]) == {"index", "message", "logprobs", "finish_reason"}
    assert body["choices"][0]["logprobs"] is None and set(body["choices"][0]["message"]) == {"role", "content"}
    for path, req in (("/v1/completions", {"prompt": "x = 1", "max_tokens": 3}), ("/v1/chat/completions", chat)):
        with client.stream("POST", path, json={**req, "stream": True}) as r:
            events = sse(r)
        assert all(set(e) == top - {"usage"} and len(e["choices"]) == 1 for e in events)  # no usage key
        assert all(e["choices"][0]["logprobs"] is None for e in events)
        # null until the choice ends (the output filter may hold a short sampled text back until the
        # last event, so a completion stream can be that one event; a chat stream opens with the role)
        assert [e["choices"][0]["finish_reason"] for e in events[:-1]] == [None] * (len(events) - 1)
        assert events[-1]["choices"][0]["finish_reason"] in ("length", "stop")
    assert len(events) >= 2 and events[0]["choices"][0]["delta"].get("role") == "assistant"
    assert all(set(e["choices"][0]["delta"]) <= {"role", "content"} for e in events)
    tk = client.post("/tokenize", json={"prompt": "x"}).json()
    assert set(tk) == {"count", "max_model_len", "tokens", "token_strs"} and tk["token_strs"] is None
    card = client.get("/v1/models").json()["data"][0]
    assert set(card) == {"id", "object", "created", "owned_by", "root", "max_model_len"}


def test_logit_bias_and_penalties_over_http(client, local):
    _, tok = local
    req = {"prompt": "def f(x):", "max_tokens": 6, "temperature": 1.0, "seed": 3, "ignore_eos": True}
    forced = client.post("/v1/completions", json={**req, "logit_bias": {"42": 100}})
    assert forced.status_code == 200, forced.text
    assert forced.json()["choices"][0]["text"] == tok.decode([42] * 6)
    from moe.generate import SamplingParams, generate

    model, ids = local[0], tok.encode(req["prompt"]).ids
    with torch.no_grad():
        first = int(model(torch.tensor([ids]))[0, -1].argmax())
    ban = SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True, logit_bias=((first, -100.0),))
    want = generate(model, [ids], ban)[0].output_ids
    assert want[0] != first
    banned = client.post("/v1/completions", json={**req, "temperature": 0, "logit_bias": {str(first): -100}})
    assert banned.json()["choices"][0]["text"] == tok.decode(want)
    r = client.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}], "max_tokens": 4,
                                                   "presence_penalty": 1.5, "frequency_penalty": -0.5})
    assert r.status_code == 200, r.text


def test_per_key_limits_answer_429_with_retry_after(server):
    with httpx.Client(base_url=server.strict, timeout=TIMEOUT) as c:
        rate = {"Authorization": f"Bearer {RATE_KEY}"}
        assert [c.get("/v1/models", headers=rate).status_code for _ in range(3)] == [200, 200, 429]
        r = c.get("/v1/models", headers=rate)
        assert r.status_code == 429 and 1 <= int(r.headers["retry-after"]) <= 10, r.headers
        err = r.json()["error"]
        assert err["code"] == "rate_limit_exceeded" and err["type"] == "requests" and set(err) == {
            "message", "type", "param", "code"}
        assert "6 requests per minute" in err["message"] and "try again in" in err["message"]
        ok = {"Authorization": f"Bearer {STRICT_KEY}"}
        assert c.get("/v1/models", headers=ok).status_code == 200  # other keys are not held back
        conc = {"Authorization": f"Bearer {CONCURRENT_KEY}"}
        req = {"prompt": "import sys", "max_tokens": 40, "temperature": 0, "ignore_eos": True, "stream": True}
        with c.stream("POST", "/v1/completions", json=req, headers=conc) as s:
            assert s.status_code == 200
            lines = s.iter_lines()
            next(lines)  # the stream is running: it holds the key's one slot
            r = c.post("/v1/completions", json={"prompt": "x", "max_tokens": 1}, headers=conc)
            assert r.status_code == 429 and r.headers["retry-after"] == "1"
            assert "concurrent" in r.json()["error"]["message"]
            assert c.get("/health").status_code == 200  # probes are never limited
            for _ in lines:
                pass
        good(c, headers=conc)  # the ended stream gave its slot back


def test_token_budget_per_key(server):
    """60 tokens a minute: a stream (usage charged though not asked for) and a request spend it; the next is a 429."""
    headers = {"Authorization": f"Bearer {TOKENS_KEY}"}
    req = {"prompt": "import os", "max_tokens": 40, "temperature": 0, "ignore_eos": True}
    with httpx.Client(base_url=server.strict, timeout=TIMEOUT, headers=headers) as c:
        with c.stream("POST", "/v1/completions", json={**req, "stream": True}) as r:
            events = sse(r)
        assert all(e["choices"] for e in events)  # the usage chunk is not passed on unasked
        used = c.post("/v1/completions", json=req)
        assert used.status_code == 200, used.text
        assert used.json()["usage"]["total_tokens"] >= 41  # 2 x 41 of 60: each started within the budget
        r = c.post("/v1/completions", json=req)
        assert r.status_code == 429 and int(r.headers["retry-after"]) >= 1, r.text
        err = r.json()["error"]
        assert err["type"] == "tokens" and err["code"] == "rate_limit_exceeded" and "60 tokens per minute" in err[
            "message"]
        assert c.get("/health").status_code == 200
    with httpx.Client(base_url=server.strict, timeout=TIMEOUT) as other:
        good(other, headers={"Authorization": f"Bearer {STRICT_KEY}"})  # other keys keep their budget


def test_body_over_the_limit_is_413(server):
    headers = {"Authorization": f"Bearer {STRICT_KEY}", "Content-Type": "application/json"}
    body = json.dumps({"prompt": "x" * (STRICT_BODY_LIMIT + 10)}).encode()
    with httpx.Client(base_url=server.strict, timeout=TIMEOUT) as c:
        r = c.post("/v1/completions", content=body, headers=headers)
        assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large", r.text
        assert "ingress.max_body_bytes" in r.json()["error"]["message"]
        good(c, headers=headers)


def test_best_of_returns_the_n_most_likely_of_its_candidates(client):
    req = {"prompt": "for i in range(", "max_tokens": 5, "temperature": 1.0, "seed": 11, "ignore_eos": True}
    all_three = client.post("/v1/completions", json={**req, "n": 3, "logprobs": 0}).json()["choices"]
    ranked = sorted(all_three, key=lambda c: -sum(c["logprobs"]["token_logprobs"]))  # stable, like the server
    best = client.post("/v1/completions", json={**req, "n": 2, "best_of": 3})
    assert best.status_code == 200, best.text
    body = best.json()
    assert [c["text"] for c in body["choices"]] == [c["text"] for c in ranked[:2]]
    assert [c["index"] for c in body["choices"]] == [0, 1] and body["choices"][0]["logprobs"] is None
    assert body["usage"]["completion_tokens"] == 15  # every candidate's tokens count
