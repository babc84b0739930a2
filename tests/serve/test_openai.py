"""The OpenAI layer without HTTP: response models reproduce the wire JSON (fields, order, nulls, and
the keys OpenAI leaves out), errors carry their status from replica to ingress, requests build
their own sampling parameters, and the per-endpoint serving classes (serve/openai/) answer, stream
and refuse requests in-process on a tiny model."""

from __future__ import annotations

import asyncio
import json
import pickle
import subprocess
import sys
from pathlib import Path

import pytest

from moe.generate import SamplingParams
from serve.openai.protocol import (
    APIError,
    ChatCompletionRequest,
    CompletionRequest,
    DetokenizeRequest,
    ErrorResponse,
    TokenizeRequest,
    parse_request,
)
from serve.openai.responses import (
    ChatCompletionResponse,
    ChatCompletionStreamResponse,
    CompletionResponse,
    CompletionStreamResponse,
    DetokenizeResponse,
    ModelList,
    TokenizeResponse,
)
from tests.conftest import REPO

USAGE = {"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5}
HEAD = {"id": "cmpl-1", "object": "text_completion", "created": 1700000000, "model": "tiny-moe"}
CHAT_HEAD = {**HEAD, "id": "chatcmpl-1", "object": "chat.completion"}
CHUNK_HEAD = {**CHAT_HEAD, "object": "chat.completion.chunk"}
LEGACY_LP = {"tokens": ["x", " =", " 1"], "token_logprobs": [None, -1.5, -0.25],
             "top_logprobs": [None, {" =": -1.5, " :": -2.0}, {" 1": -0.25}], "text_offset": [0, 1, 3]}
CHAT_LP = {"content": [{"token": "hi", "logprob": -0.5, "bytes": [104, 105],
                        "top_logprobs": [{"token": "hi", "logprob": -0.5, "bytes": [104, 105]},
                                         {"token": "é", "logprob": -1.0, "bytes": [195, 169]}]}]}

# The JSON the server sent before the typed responses (from serve/completions.py's dicts).
WIRE = [
    (CompletionResponse, {**HEAD, "choices": [
        {"index": 0, "text": "x = 1", "logprobs": LEGACY_LP, "finish_reason": "length"},
        {"index": 1, "text": "", "logprobs": None, "finish_reason": "stop"}], "usage": USAGE}),
    (CompletionStreamResponse, {**HEAD, "choices": [
        {"index": 0, "text": "x", "logprobs": None, "finish_reason": None}]}),
    (CompletionStreamResponse, {**HEAD, "choices": [
        {"index": 2, "text": "", "logprobs": {"tokens": [], "token_logprobs": [], "top_logprobs": [],
                                              "text_offset": []}, "finish_reason": "length"}]}),
    (CompletionStreamResponse, {**HEAD, "choices": [], "usage": USAGE}),
    (ChatCompletionResponse, {**CHAT_HEAD, "choices": [
        {"index": 0, "message": {"role": "assistant", "content": "hi"}, "logprobs": CHAT_LP,
         "finish_reason": "stop"},
        {"index": 1, "message": {"role": "assistant", "content": ""}, "logprobs": None,
         "finish_reason": "content_filter"}], "usage": USAGE}),
    (ChatCompletionStreamResponse, {**CHUNK_HEAD, "choices": [
        {"index": 0, "delta": {"role": "assistant", "content": ""}, "logprobs": None, "finish_reason": None}]}),
    (ChatCompletionStreamResponse, {**CHUNK_HEAD, "choices": [
        {"index": 0, "delta": {"content": "hi"}, "logprobs": CHAT_LP, "finish_reason": None}]}),
    (ChatCompletionStreamResponse, {**CHUNK_HEAD, "choices": [
        {"index": 0, "delta": {}, "logprobs": None, "finish_reason": "length"}]}),
    (ChatCompletionStreamResponse, {**CHUNK_HEAD, "choices": [], "usage": USAGE}),
    (TokenizeResponse, {"count": 2, "max_model_len": 128, "tokens": [5, 7], "token_strs": None}),
    (TokenizeResponse, {"count": 2, "max_model_len": 128, "tokens": [5, 7], "token_strs": ["a", "b"]}),
    (DetokenizeResponse, {"prompt": "ab"}),
    (ModelList, {"object": "list", "data": [{"id": "tiny-moe", "object": "model", "created": 1700000000,
                                             "owned_by": "elastic-moe", "root": "tiny-moe", "max_model_len": 128}]}),
    (ErrorResponse, {"error": {"message": "no", "type": "invalid_request_error", "param": None, "code": None}}),
]


@pytest.mark.parametrize("model, wire", WIRE, ids=[f"{m.__name__}-{i}" for i, (m, _) in enumerate(WIRE)])
def test_response_models_round_trip_the_wire_json(model, wire):
    extra = {"status": 400} if model is ErrorResponse else {}
    parsed = model.model_validate({**wire, **extra})
    assert json.dumps(parsed.model_dump()) == json.dumps(wire)  # same keys, order and nulls


def test_error_response_carries_its_status_but_not_in_the_body():
    err = APIError(404, "The model 'x' does not exist", param="model", code="model_not_found")
    response = pickle.loads(pickle.dumps(err.response()))  # as Ray carries it to the ingress
    assert response.status == 404
    assert response.model_dump() == err.body() == {"error": {
        "message": "The model 'x' does not exist", "type": "invalid_request_error", "param": "model",
        "code": "model_not_found"}}
    back = APIError.from_response(response)
    assert (back.status, back.message, back.type, back.param, back.code) == (
        404, err.message, "invalid_request_error", "model", "model_not_found")


def test_completion_request_builds_its_sampling_params():
    req = CompletionRequest.model_validate({
        "prompt": "x", "temperature": 0.7, "top_p": 0.9, "top_k": 5, "seed": 10, "stop": ["\n", ""],
        "stop_token_ids": [3], "ignore_eos": True, "logprobs": 2, "echo": True, "max_tokens": 8})
    assert req.max_new_tokens() == 8
    assert req.to_sampling_params(8, seed_offset=2) == SamplingParams(
        max_tokens=8, temperature=0.7, top_p=0.9, top_k=5, seed=12, stop=("\n",), stop_token_ids=(3,),
        ignore_eos=True, logprobs=2, prompt_logprobs=2)
    plain = CompletionRequest.model_validate({"prompt": "x", "logprobs": 1}).to_sampling_params(4)
    assert plain == SamplingParams(max_tokens=4, logprobs=1)  # no echo: the prompt is not scored


def test_chat_request_builds_its_sampling_params():
    messages = [{"role": "user", "content": "hi"}]
    req = ChatCompletionRequest.model_validate({
        "messages": messages, "stop": "END", "max_tokens": 9, "max_completion_tokens": 4,
        "logprobs": True, "top_logprobs": 3, "temperature": 0})
    assert req.max_new_tokens() == 4
    assert req.to_sampling_params(4, seed_offset=1, extra_stop=["<|user|>", ""]) == SamplingParams(
        max_tokens=4, temperature=0.0, stop=("END", "<|user|>"), logprobs=3)
    bare = ChatCompletionRequest.model_validate({"messages": messages, "logprobs": True, "seed": 5})
    assert bare.to_sampling_params(7).logprobs == 0 and bare.to_sampling_params(7, 3).seed == 8
    assert ChatCompletionRequest.model_validate({"messages": messages}).to_sampling_params(7).logprobs is None


@pytest.mark.parametrize("schema, body, param, fragment", [
    (CompletionRequest, {"prompt": [5, -1]}, "prompt", "prompt: token id -1 (position 1) is outside [0, 2147483647]"),
    (CompletionRequest, {"prompt": [5, 10**30]}, "prompt", "<31-digit number>"),
    (CompletionRequest, {"prompt": "\ud800"}, "prompt", "prompt: contains a lone UTF-16 surrogate (\\ud800)"),
    (ChatCompletionRequest, {"messages": [{"role": "user", "content": [{"type": "text", "text": "\udfff"}]}]},
     "messages", "messages.0.content.0.text: contains a lone"),
    (TokenizeRequest, {"prompt": "ok", "model": "\ud801"}, "model", "model: contains a lone"),
    (DetokenizeRequest, {"tokens": [1, -7]}, "tokens", "tokens: token id -7"),
    (CompletionRequest, {"prompt": "x", "seed": -(2**63) - 1}, "seed", "greater than or equal to"),
    (CompletionRequest, {"prompt": "x", "temperature": float("inf")}, "temperature", "finite"),
    (CompletionRequest, {"prompt": "x", "logit_bias": {"-1": 5}}, "logit_bias", "key '-1' is not a token id"),
    (CompletionRequest, {"prompt": "x", "logit_bias": {"1": float("nan")}}, "logit_bias", "finite"),
    (CompletionRequest, {"prompt": "x", "stop_token_ids": [2**31]}, "stop_token_ids", "stop_token_ids: token id"),
    (CompletionRequest, {"prompt": "x", "max_tokens": 2**31}, "max_tokens", "less than or equal to 2147483647"),
    (ChatCompletionRequest, {"messages": [{"role": "user", "content": "x"}] * 2049}, "messages", "at most 2048"),
])
def test_edge_validation_names_the_field_and_the_range(schema, body, param, fragment):
    with pytest.raises(APIError) as err:
        parse_request(schema, body)
    assert err.value.status == 400 and err.value.param == param and fragment in err.value.message, err.value.message


def test_penalties_and_logit_bias_reach_the_sampling_params():
    req = parse_request(CompletionRequest, {"prompt": "x", "presence_penalty": 0.5, "frequency_penalty": -1,
                                            "logit_bias": {"7": -100, " 3": 2.5, "07": 1}})
    sp = req.to_sampling_params(4)
    assert (sp.presence_penalty, sp.frequency_penalty) == (0.5, -1.0)
    assert sp.logit_bias == ((3, 2.5), (7, 1.0))  # "07" names token 7 too: the later entry wins
    chat = parse_request(ChatCompletionRequest, {"messages": [{"role": "user", "content": "x"}],
                                                 "logit_bias": {"5": 100}})
    assert chat.to_sampling_params(4).logit_bias == ((5, 100.0),)


def test_protocol_and_responses_import_without_torch():
    code = ("import sys, serve.openai.protocol, serve.openai.responses, serve.api; "
            "assert 'torch' not in sys.modules, 'torch imported'")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]


# ---- the serving classes in-process -----------------------------------------------------------
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

    tok = Tokenizer.from_file(str(train_tokenizer(Path(tmp_path_factory.mktemp("tok")) / "tokenizer.json")))
    model = build_model(tiny_config(), seed=5).eval()
    ecfg = EngineConfig(max_batch_size=4, max_n=3, default_max_tokens=5)
    ctx = ServingContext(
        models=OpenAIServingModels("tiny", model.cfg.max_seq_len), tokenizer=ServingTokenizer(tok, 400),
        engine=Engine(BatchDecoder(model, 4), ecfg, EngineMetrics("openai-test")), engine_cfg=ecfg,
        chat_template=ChatTemplateConfig(), safety=SafetyPolicy(SafetyConfig(input=SafetyRules(["nope"]))),
        eos_ids=())
    return (OpenAIServingCompletion(ctx), OpenAIServingChat(ctx), OpenAIServingTokenization(ctx), tok)


async def _chunks(serving, req):
    return [c async for c in serving.stream(req, serving.prepare(req))]


def test_completion_class_answers_and_streams_the_same_text(serving):
    completion, _, _, tok = serving
    body = {"prompt": ["def f(x):", "import os"], "n": 2, "max_tokens": 6, "temperature": 0, "ignore_eos": True,
            "echo": True, "logprobs": 1}
    full = asyncio.run(completion.create(CompletionRequest.model_validate(body)))
    assert isinstance(full, CompletionResponse) and full.id.startswith("cmpl-") and full.model == "tiny"
    assert [c.index for c in full.choices] == [0, 1, 2, 3] and full.usage.completion_tokens == 24
    assert full.choices[0].text.startswith("def f(x):") and full.choices[0].logprobs.token_logprobs[0] is None
    req = CompletionRequest.model_validate({**body, "stream": True, "stream_options": {"include_usage": True}})
    chunks = asyncio.run(_chunks(completion, req))
    assert all(isinstance(c, CompletionStreamResponse) for c in chunks)
    texts = {}
    for c in chunks[:-1]:
        texts[c.choices[0].index] = texts.get(c.choices[0].index, "") + c.choices[0].text
    assert texts == {c.index: c.text for c in full.choices}
    assert chunks[-1].choices == [] and chunks[-1].usage == full.usage


def test_chat_class_answers_and_streams_the_same_text(serving):
    _, chat, tokenization, _ = serving
    body = {"messages": [{"role": "user", "content": "hello"}], "max_tokens": 6, "temperature": 0}
    full = asyncio.run(chat.create(ChatCompletionRequest.model_validate(body)))
    assert isinstance(full, ChatCompletionResponse) and full.id.startswith("chatcmpl-")
    assert full.choices[0].message.role == "assistant" and full.choices[0].logprobs is None
    chunks = asyncio.run(_chunks(chat, ChatCompletionRequest.model_validate({**body, "stream": True})))
    assert chunks[0].model_dump()["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == full.choices[0].message.content
    assert "usage" not in chunks[-1].model_dump()
    from serve.openai.protocol import TokenizeRequest

    tk = asyncio.run(tokenization.create_tokenize(TokenizeRequest.model_validate({"messages": body["messages"]})))
    assert tk.count == full.usage.prompt_tokens


@pytest.mark.parametrize("body, status, fragment", [
    ({"prompt": "x", "model": "other"}, 404, "does not exist"),
    ({"prompt": "x", "n": 4}, 400, "n=4 is above"),
    ({"prompt": [1, 999]}, 400, "outside the vocabulary"),
    ({"prompt": "x", "stop_token_ids": [400]}, 400, "stop_token_ids"),  # -1: refused at the edge
    ({"prompt": "x", "max_tokens": 500}, 400, "maximum context length"),
    ({"prompt": "say nope"}, 400, "content policy"),
    ({"prompt": "x", "logit_bias": {"400": 1}}, 400, "logit_bias: key '400' is token id 400, outside"),
    ({"prompt": [[3], [4, 400]]}, 400, "prompt.1: token id 400 is outside the vocabulary"),
])
def test_completion_class_refuses_bad_requests(serving, body, status, fragment):
    completion = serving[0]
    with pytest.raises(APIError) as err:
        completion.prepare(CompletionRequest.model_validate(body))
    assert err.value.status == status and fragment in err.value.message


def test_a_failed_sequence_is_a_500_naming_the_request_id(serving, monkeypatch, caplog):
    completion = serving[0]

    def broken(ids):
        raise UnicodeError("cannot decode")

    monkeypatch.setattr(completion.tokenizer, "decode", broken)
    req = CompletionRequest.model_validate({"prompt": "x = 1", "max_tokens": 2, "temperature": 0})
    with caplog.at_level("ERROR", logger="ray.serve"), pytest.raises(APIError) as err:
        asyncio.run(completion.create(req))
    assert err.value.status == 500 and err.value.type == "server_error"
    request_id = err.value.message.split()[2]
    assert request_id.startswith("cmpl-") and "UnicodeError: cannot decode" in err.value.message
    assert any(request_id in r.getMessage() for r in caplog.records)  # the id leads to the server log
    monkeypatch.undo()
    assert asyncio.run(completion.create(req)).choices[0].finish_reason == "length"  # the engine goes on
