"""Routing inspection over HTTP: `"return_routing": true` on completions and chat (absent: exactly the
OpenAI response), the experts reported equal the ones a local forward chose, streamed routing adds up to
the whole, the per-layer expert load in the replica's metrics, and `python -m serve.explain`'s heatmap."""

from __future__ import annotations

import json

import httpx
import numpy as np
import pytest

from tests.serve.test_api import TIMEOUT, sse


@pytest.fixture(scope="module")
def client(server) -> httpx.Client:
    with httpx.Client(base_url=server.base, timeout=TIMEOUT) as c:
        yield c


REQ = {"prompt": "def run(self):", "max_tokens": 6, "temperature": 0, "ignore_eos": True}


def test_completion_routing_is_the_local_forward_routing(client, server):
    from tokenizers import Tokenizer

    from moe.checkpoint import load_model
    from moe.generate import SamplingParams, generate

    body = client.post("/v1/completions", json={**REQ, "return_routing": True}).json()
    routing = body["choices"][0]["routing"]
    model, tok = load_model(server.models.dirs[2]), Tokenizer.from_file(str(server.models.tokenizer_path))
    (seq,) = generate(model, [tok.encode(REQ["prompt"]).ids], SamplingParams(max_tokens=6, temperature=0.0,
                                                                                ignore_eos=True), record_routing=True)
    k, n_moe = model.cfg.moe.top_k, model.cfg.n_moe_layers
    assert routing["layers"] == [int(i) for i in model.moe_layers()]
    assert [t["token_id"] for t in routing["tokens"]] == seq.output_ids
    assert len(routing["tokens"]) == body["usage"]["completion_tokens"] == 6
    for got, want in zip(routing["tokens"], seq.routing):
        assert np.array(got["experts"]).shape == np.array(got["weights"]).shape == (n_moe, k)
        assert [sorted(x) for x in got["experts"]] == [sorted(x) for x in want.experts]
        np.testing.assert_allclose(got["weights"], want.weights, rtol=1e-5, atol=1e-6)
    plain = client.post("/v1/completions", json=REQ).json()
    assert "routing" not in plain["choices"][0] and plain["choices"][0]["text"] == body["choices"][0]["text"]


def test_chat_stream_routing_adds_up_to_the_whole(client, tmp_path):
    from serve.explain import load_routing, main, routing_matrix

    req = {"messages": [{"role": "user", "content": "import os"}], "max_tokens": 5, "temperature": 0,
           "ignore_eos": True, "return_routing": True}
    whole = client.post("/v1/chat/completions", json=req).json()
    with client.stream("POST", "/v1/chat/completions", json={**req, "stream": True}) as r:
        events = sse(r)
    streamed = [t for e in events for c in e["choices"] if c.get("routing") for t in c["routing"]["tokens"]]
    assert streamed == whole["choices"][0]["routing"]["tokens"] and len(streamed) == 5
    with client.stream("POST", "/v1/chat/completions", json={**req, "return_routing": False, "stream": True}) as r:
        assert all("routing" not in c for e in sse(r) for c in e["choices"])
    # explain: the heatmap's cells are the reported weights; a stream's chunks read the same as the response
    stream_file = tmp_path / "stream.jsonl"
    stream_file.write_text("\n".join("data: " + json.dumps(e) for e in events) + "\ndata: [DONE]\n")
    (tmp_path / "resp.json").write_text(json.dumps(whole, indent=2))
    assert load_routing(stream_file.read_text()) == whole["choices"][0]["routing"]
    m = routing_matrix(whole["choices"][0]["routing"], n_experts=8)
    tok0 = whole["choices"][0]["routing"]["tokens"][0]
    assert m.shape == (1, 5, 8) and np.isclose(m[0, 0, tok0["experts"][0]], tok0["weights"][0]).all()
    assert main([str(tmp_path / "resp.json"), "--out", str(tmp_path / "h.png")]) == 0
    assert (tmp_path / "h.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(SystemExit):  # a response made without return_routing: a clear usage error
        (tmp_path / "plain.json").write_text(json.dumps(client.post("/v1/completions", json=REQ).json()))
        main([str(tmp_path / "plain.json")])


def test_expert_load_per_layer_in_the_replica_metrics(client):
    before = client.get("/stats").json()["model"]
    prompt_len = len(client.post("/tokenize", json={"prompt": REQ["prompt"]}).json()["tokens"])
    assert client.post("/v1/completions", json=REQ).status_code == 200
    after = client.get("/stats").json()["model"]
    assigned = {layer: sum(v) - sum(before.get("expert_assignments", {}).get(layer, [0]))
                for layer, v in after["expert_assignments"].items()}
    assert assigned == {"1": (prompt_len + REQ["max_tokens"] - 1) * 2}  # every forward position, top_k=2
    shares = after["expert_load_ratio"]["1"]
    assert len(shares) == 8 and abs(sum(shares) - 1.0) < 1e-9
