"""KV-cache decoding: cached logits equal full recomputation, batching and continuous admission do
not change greedy results, sampling honours seed / top-k / top-p, stop strings and logprobs, and
OpenAI's logit_bias / presence_penalty / frequency_penalty change the logits exactly as defined,
per sequence of a batch."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from moe.config import ModelConfig, MoEConfig
from moe.generate import BatchDecoder, SamplingParams, Sequence, adjust_logits, generate, sample_tokens
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
def test_logits_at_positions_equal_the_full_logits_there():
    model = tiny_model()
    tokens = torch.randint(0, 97, (3, 9))
    at_BK = torch.tensor([[8], [2], [5]])
    full = model(tokens)
    picked = model(tokens, logits_at_BK=at_BK)
    assert picked.shape == (3, 1, 97)
    torch.testing.assert_close(picked[:, 0], full[torch.arange(3), at_BK[:, 0]], atol=1e-6, rtol=1e-5)
    # a prefill that scores its prompt (every position) samples the same tokens as one that does not
    ps = prompts(4, seed=5)
    plain = generate(model, ps, SamplingParams(max_tokens=6, temperature=0.0))
    scored = generate(model, ps, SamplingParams(max_tokens=6, temperature=0.0, prompt_logprobs=0))
    assert [s.output_ids for s in plain] == [s.output_ids for s in scored]


@torch.no_grad()
def test_inference_expert_kernel_gives_the_per_expert_kernels_tokens():
    model = tiny_model()
    experts = [m.experts for m in model.moe_layers().values()]
    assert all(e.resolve_kernel(torch.zeros(1, e.d_model)) == "grouped_mm" for e in experts)  # CPU, no gradient
    ps = prompts(5, seed=7)
    params = SamplingParams(max_tokens=8, temperature=0.9, seed=3)
    grouped = generate(model, ps, params)
    for e in experts:
        e.kernel = "loop"
    loop = generate(model, ps, params)
    assert [s.output_ids for s in grouped] == [s.output_ids for s in loop]


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


def _seq(params: SamplingParams, output_ids: list[int] = (), seed: int = 0) -> Sequence:
    s = Sequence([1], SamplingParams(**{**params.__dict__, "seed": seed}))
    s.output_ids = list(output_ids)
    return s


def test_penalties_and_bias_change_each_rows_logits_exactly():
    V = 6
    logits = torch.randn(4, V, generator=torch.Generator().manual_seed(0))
    seqs = [
        _seq(SamplingParams(frequency_penalty=0.5, presence_penalty=0.25), [1, 1, 2]),
        _seq(SamplingParams(logit_bias=((0, 2.5), (4, -1.0))), [0, 0]),  # no penalty: counts do not matter
        _seq(SamplingParams(), [3, 3, 3]),  # no adjustments: the row is untouched
        _seq(SamplingParams(frequency_penalty=-1.0, presence_penalty=-2.0, logit_bias=((5, 0.5),)), [5, 2, 5, 9]),
    ]
    out = adjust_logits(logits, seqs)
    want = logits.clone()
    # OpenAI: mu[j] -= c[j] * frequency_penalty + (c[j] > 0) * presence_penalty, plus logit_bias[j]
    want[0, 1] -= 2 * 0.5 + 0.25
    want[0, 2] -= 1 * 0.5 + 0.25
    want[1, 0] += 2.5
    want[1, 4] -= 1.0
    want[3, 5] -= 2 * -1.0 + -2.0 - 0.5  # id 9 lies outside the logits and is ignored
    want[3, 2] -= 1 * -1.0 + -2.0
    torch.testing.assert_close(out, want, rtol=0, atol=1e-6)
    assert not torch.equal(out, logits)  # the caller's logits are left as they were


def test_bias_minus_100_never_samples_and_plus_100_always_does():
    V = 50
    logits = torch.randn(1, V, generator=torch.Generator().manual_seed(1)).repeat(3, 1)
    top = int(logits[0].argmax())
    ban = SamplingParams(temperature=2.0, logit_bias=((top, -100.0),))
    force = SamplingParams(temperature=2.0, top_p=0.9, top_k=10, logit_bias=((7, 100.0),))
    plain = SamplingParams(temperature=2.0)
    for seed in range(200):  # one batch mixing the three settings, a fresh draw each time
        batch = [_seq(ban, seed=seed), _seq(force, seed=seed), _seq(plain, seed=seed)]
        out = sample_tokens(logits, batch).tolist()
        assert out[0] != top and out[1] == 7
        assert out[2] == int(sample_tokens(logits[2:], [_seq(plain, seed=seed)])[0])  # others unaffected
    greedy_ban = _seq(SamplingParams(temperature=0.0, logit_bias=((top, -100.0),)))
    assert int(sample_tokens(logits[:1], [greedy_ban])[0]) == int(logits[0].topk(2).indices[1])
    everything = _seq(SamplingParams(temperature=0.0, logit_bias=tuple((t, -100.0) for t in range(V))))
    assert int(sample_tokens(logits[:1], [everything])[0]) == top  # banning every token bans none


@torch.no_grad()
def test_penalised_greedy_decoding_equals_a_direct_computation():
    model = tiny_model()
    prompt = prompts(1, seed=4)[0]
    params = SamplingParams(max_tokens=10, temperature=0.0, frequency_penalty=1.5, presence_penalty=0.5,
                            logit_bias=((3, 4.0), (11, -100.0)))
    out = generate(model, [prompt], params)[0].output_ids
    tokens: list[int] = []
    for _ in range(10):  # recompute every step from the full sequence, penalties applied by hand
        logits = model(torch.tensor([prompt + tokens]))[0, -1].clone()
        counts = torch.bincount(torch.tensor(tokens, dtype=torch.long), minlength=97).float()
        logits -= counts * 1.5 + (counts > 0).float() * 0.5
        logits[3] += 4.0
        logits[11] = float("-inf")
        tokens.append(int(logits.argmax()))
    assert out == tokens and 11 not in out
    plain = generate(model, [prompt], SamplingParams(max_tokens=10, temperature=0.0))[0].output_ids
    assert len(set(out)) > len(set(plain)) or out != plain  # the penalties changed what was chosen


def test_any_integer_seed_is_accepted():
    for seed in (-(2**63), -1, 0, 2**63 - 1, 2**64 + 5):
        Sequence([1], SamplingParams(seed=seed))
