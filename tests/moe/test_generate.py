"""KV-cache decoding: cached logits equal full recomputation, batching and continuous admission do
not change greedy results, sampling honours seed / top-k / top-p, stop strings and logprobs."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from moe.config import ModelConfig, MoEConfig
from moe.generate import BatchDecoder, SamplingParams, Sequence, generate, sample_tokens
from moe.kv_cache import KVCache
from moe.model import build_model


def tiny_model(seed: int = 0):
    cfg = ModelConfig(name="t", vocab_size=97, d_model=64, n_layers=3, n_heads=4, n_kv_heads=2, max_seq_len=64,
                      dense_hidden=96, n_dense_layers=1,
                      moe=MoEConfig(n_routed_experts=8, n_shared_experts=1, top_k=2, expert_hidden=32))
    return build_model(cfg, seed=seed).eval()


def prompts(n: int, seed: int = 1) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 97, (int(torch.randint(3, 12, (1,), generator=g)),), generator=g).tolist()
            for _ in range(n)]


def test_forward_without_cache_is_unchanged():
    model = tiny_model()
    tokens = torch.randint(0, 97, (2, 10))
    with torch.no_grad():
        a, b = model(tokens), model(tokens, kv_cache=None)
    assert torch.equal(a, b)
    assert a.shape == (2, 10, 97)


@torch.no_grad()
def test_cached_decoding_equals_full_recomputation():
    model = tiny_model()
    seq = torch.randint(0, 97, (2, 20))
    full = model(seq)
    cache = KVCache(model.cfg, n_slots=2)
    cache.begin([0, 1], 8)  # prefill 8 tokens, then feed the rest one at a time, then a chunk of 4
    out = [model(seq[:, :8], kv_cache=cache)]
    cache.commit([0, 1], [8, 8])
    for t in range(8, 16):
        cache.begin([0, 1], 1)
        out.append(model(seq[:, t:t + 1], kv_cache=cache))
        cache.commit([0, 1], [1, 1])
    cache.begin([0, 1], 4)
    out.append(model(seq[:, 16:20], kv_cache=cache))
    torch.testing.assert_close(torch.cat(out, 1), full, atol=1e-5, rtol=1e-4)


@torch.no_grad()
def test_slots_at_different_lengths_and_out_of_order():
    model = tiny_model()
    a, b = torch.randint(0, 97, (1, 12)), torch.randint(0, 97, (1, 7))
    cache = KVCache(model.cfg, n_slots=4)
    cache.begin([3], 11)
    model(a[:, :11], kv_cache=cache)
    cache.commit([3], [11])
    cache.begin([1], 6)
    model(b[:, :6], kv_cache=cache)
    cache.commit([1], [6])
    cache.begin([3, 1], 1)  # rows at positions 11 and 6, slots not contiguous
    step = model(torch.cat([a[:, 11:], b[:, 6:]]), kv_cache=cache)[:, 0]
    torch.testing.assert_close(step[0], model(a)[0, -1], atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(step[1], model(b)[0, -1], atol=1e-5, rtol=1e-4)


@torch.no_grad()
def test_greedy_generate_matches_naive_loop_and_batching():
    model = tiny_model()
    ps = prompts(5)
    params = SamplingParams(max_tokens=10, temperature=0.0)
    batched = generate(model, ps, params)
    for p, s in zip(ps, batched):
        ids = list(p)
        for _ in range(10):
            ids.append(int(model(torch.tensor([ids]))[0, -1].argmax()))
        assert s.output_ids == ids[len(p):]
        assert s.finish_reason == "length"
        alone = generate(model, [p], params)[0]
        assert alone.output_ids == s.output_ids


@torch.no_grad()
def test_continuous_admission_between_decode_steps():
    model = tiny_model()
    ps = prompts(6, seed=3)
    params = SamplingParams(max_tokens=8, temperature=0.0)
    reference = [s.output_ids for s in generate(model, ps, params)]
    dec = BatchDecoder(model, n_slots=3)
    seqs = [Sequence(p, params) for p in ps]
    waiting = list(seqs)
    dec.prefill([waiting.pop(0)])
    steps = 0
    while waiting or dec.active:
        if waiting and dec.n_free:
            dec.prefill([waiting.pop(0) for _ in range(min(dec.n_free, len(waiting), 2))])
        dec.decode()
        steps += 1
        assert len(dec.active) <= 3
    assert [s.output_ids for s in seqs] == reference
    assert dec.n_free == 3


def test_seeded_sampling_is_reproducible_and_batch_independent():
    model = tiny_model()
    ps = prompts(3, seed=5)
    params = SamplingParams(max_tokens=12, temperature=1.3, top_p=0.9, top_k=20, seed=42)
    one = generate(model, ps, params)
    two = generate(model, ps[:1], params)
    assert one[0].output_ids == two[0].output_ids
    other = generate(model, ps[:1], SamplingParams(max_tokens=12, temperature=1.3, seed=7))
    assert other[0].output_ids != one[0].output_ids


def test_top_k_and_top_p_restrict_the_support():
    logits = torch.tensor([[4.0, 3.0, 2.0, 1.0, 0.0]] * 1)
    seen_k, seen_p = set(), set()
    for seed in range(200):
        s = Sequence([1], SamplingParams(temperature=1.0, top_k=2, seed=seed))
        seen_k.add(int(sample_tokens(logits, [s])[0]))
        # softmax of logits: 0.64, 0.24, 0.09, ... -> top_p 0.7 keeps the first two
        s = Sequence([1], SamplingParams(temperature=1.0, top_p=0.7, seed=seed))
        seen_p.add(int(sample_tokens(logits, [s])[0]))
    assert seen_k == {0, 1}
    assert seen_p == {0, 1}
    greedy = Sequence([1], SamplingParams(temperature=0.0))
    assert int(sample_tokens(logits, [greedy])[0]) == 0


@torch.no_grad()
def test_logprobs_and_prompt_logprobs():
    model = tiny_model()
    p = prompts(1, seed=9)[0]
    s = generate(model, [p], SamplingParams(max_tokens=4, temperature=0.0, logprobs=3, prompt_logprobs=2))[0]
    full = F.log_softmax(model(torch.tensor([p + s.output_ids]))[0], -1)
    assert s.prompt_logprobs is not None and s.prompt_logprobs[0] is None
    for t in range(1, len(p)):
        lp = s.prompt_logprobs[t]
        assert lp.token_id == p[t]
        assert abs(lp.logprob - float(full[t - 1, p[t]])) < 1e-4
        assert len(lp.top) == 2
    for i, lp in enumerate(s.logprobs):
        pos = len(p) - 1 + i
        assert lp.token_id == s.output_ids[i]
        assert abs(lp.logprob - float(full[pos, lp.token_id])) < 1e-4
        assert lp.top[0][0] == lp.token_id  # greedy: the chosen token is the best one
    score_only = generate(model, [p], SamplingParams(max_tokens=0, prompt_logprobs=0))[0]
    assert score_only.output_ids == [] and score_only.finish_reason == "length"
    assert [lp.logprob for lp in score_only.prompt_logprobs[1:]] == [lp.logprob for lp in s.prompt_logprobs[1:]]


@torch.no_grad()
def test_stop_strings_eos_and_context_limit():
    model = tiny_model()
    p = prompts(1, seed=11)[0]
    ref = generate(model, [p], SamplingParams(max_tokens=10, temperature=0.0))[0].output_ids

    def detok(ids: list[int]) -> str:
        return "".join(f"<{i}>" for i in ids)

    stop = f"<{ref[3]}>"
    first = ref.index(ref[3])
    s = generate(model, [p], SamplingParams(max_tokens=10, temperature=0.0, stop=(stop,)), detokenize=detok)[0]
    assert s.finish_reason == "stop"
    assert s.text == detok(ref[:first])
    eos = generate(model, [p], SamplingParams(max_tokens=10, temperature=0.0), eos_ids=[ref[2]])[0]
    assert eos.finish_reason == "stop" and eos.output_ids == ref[:ref.index(ref[2])]
    ignored = generate(model, [p], SamplingParams(max_tokens=10, temperature=0.0, ignore_eos=True),
                       eos_ids=[ref[2]])[0]
    assert ignored.output_ids == ref
    long_prompt = (p * 10)[:60]
    capped = generate(model, [long_prompt], SamplingParams(max_tokens=50, temperature=0.0))[0]
    assert capped.finish_reason == "length" and len(long_prompt) + len(capped.output_ids) == 64


def test_streamed_text_holds_back_partial_stop_strings():
    s = Sequence([1], SamplingParams(max_tokens=10, stop=("END",)), detokenize=lambda ids: "".join(
        {1: "ab", 2: "E", 3: "N", 4: "D", 5: "x"}[i] for i in ids))
    out = []
    for tok in (1, 2, 3, 4):
        s.append(tok, None, 100)
        out.append(s.take_text())
    assert out == ["ab", "", "", ""] and s.finish_reason == "stop" and s.text == "ab"


def test_content_check_ends_with_content_filter():
    s = Sequence([1], SamplingParams(max_tokens=10), detokenize=lambda ids: "".join("ab"[i] for i in ids),
                 text_check=lambda text: text.find("bb") if "bb" in text else None)
    for tok in (0, 1, 1):
        s.append(tok, None, 100)
    assert s.finish_reason == "content_filter" and s.text == "a"
