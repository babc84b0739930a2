"""The continuous-batching engine in-process (no HTTP): concurrent requests share decode steps and
give the same greedy results as decoding alone, prefill admission respects the token budget,
a caller that leaves frees its slot, and failing requests mixed into a batch (in prefill, in a later
decode step, in their own detokenizer) fail alone while the others produce what they would alone."""

from __future__ import annotations

import asyncio

import pytest
import torch

from moe.generate import SamplingParams, Sequence, generate
from moe.model import build_model
from serve.config import EngineConfig
from tests.serve.conftest import tiny_config


@pytest.fixture(scope="module")
def model():
    return build_model(tiny_config(), seed=3).eval()


def make_engine(model, **kw):
    from moe.generate import BatchDecoder
    from serve.engine import Engine
    from serve.metrics import EngineMetrics

    cfg = EngineConfig(**kw)
    return Engine(BatchDecoder(model, cfg.max_batch_size), cfg, EngineMetrics("engine-test"))


async def collect(engine, seqs):
    events = [ev async for ev in engine.generate(seqs)]
    return events


def test_concurrent_requests_share_steps_and_match_alone(ray_cluster, model):
    prompts = [[5 + i, 17, 30 + i, 2 * i + 1][: 2 + i % 3] for i in range(6)]
    params = SamplingParams(max_tokens=10, temperature=0.0, ignore_eos=True)
    engine = make_engine(model, max_batch_size=4, max_prefill_tokens=6, batch_wait_timeout_s=0.01)

    async def main():
        seqs = [[Sequence(p, params)] for p in prompts]
        await asyncio.gather(*(collect(engine, s) for s in seqs))
        return [s[0] for s in seqs]

    done = asyncio.run(main())
    for p, s in zip(prompts, done):
        assert s.output_ids == generate(model, [p], params)[0].output_ids
    snap = engine.metrics.snapshot()
    assert snap["max_decode_batch_size"] > 1 and snap["max_decode_batch_size"] <= 4
    # prompts are at most 4 tokens: a 6-token budget admits at most one... except the first, always admitted
    assert max(int(k) for k in snap["prefill_batch_sizes"]) <= 3
    assert engine.decoder.n_free == 4 and not engine.waiting


def test_leaving_caller_frees_its_slot(ray_cluster, model):
    engine = make_engine(model, max_batch_size=2)

    async def main():
        seq = Sequence([1, 2, 3], SamplingParams(max_tokens=100, temperature=0.0, ignore_eos=True))
        gen = engine.generate([seq])
        await gen.__anext__()
        await gen.aclose()  # the client went away
        other = Sequence([4, 5], SamplingParams(max_tokens=3, temperature=0.0))
        await collect(engine, [other])
        return seq, other

    seq, other = asyncio.run(main())
    assert not seq.done and len(seq.output_ids) < 100
    assert other.done and engine.decoder.n_free == 2


def test_failed_forward_ends_its_sequences_and_engine_continues(ray_cluster, model):
    engine = make_engine(model, max_batch_size=2)

    async def main():
        bad = Sequence([1, 10**6], SamplingParams(max_tokens=3))  # id outside the embedding: prefill raises
        events = await collect(engine, [bad])
        good = Sequence([4, 5], SamplingParams(max_tokens=3, temperature=0.0, ignore_eos=True))
        await collect(engine, [good])
        engine.check_health()
        return events, good

    events, good = asyncio.run(main())
    assert events[-1].error is not None and "IndexError" in events[-1].error
    assert good.output_ids and len(good.output_ids) == 3


def test_overload_is_refused(ray_cluster, model):
    from serve.engine import EngineOverloaded

    engine = make_engine(model, max_batch_size=1, max_waiting=2)

    async def main():
        seqs = [Sequence([1, 2], SamplingParams(max_tokens=1)) for _ in range(3)]
        with pytest.raises(EngineOverloaded, match="engine.max_waiting=2"):
            await collect(engine, seqs)

    asyncio.run(main())


class Poisoned(torch.nn.Module):
    """The model, except that a forward pass over a batch holding `poison` raises."""

    def __init__(self, inner, poison: int) -> None:
        super().__init__()
        self.inner, self.cfg, self.poison = inner, inner.cfg, poison

    def forward(self, tokens, kv_cache=None, logits_at_BK=None):
        if bool((tokens == self.poison).any()):
            raise RuntimeError(f"poisoned token {self.poison}")
        return self.inner(tokens, kv_cache=kv_cache, logits_at_BK=logits_at_BK)

    def moe_layers(self):  # the engine reads the layers' expert-load counters
        return self.inner.moe_layers()


def test_failing_requests_in_a_batch_leave_the_others_as_they_would_be_alone(ray_cluster, model):
    """Requests that fail in prefill, in a later decode step, and in their own detokenizer are mixed
    into one continuous batch with good ones (greedy and seeded): only they fail."""
    greedy = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)
    seeded = SamplingParams(max_tokens=8, temperature=1.0, seed=7, ignore_eos=True)
    good = [([5, 17, 30], greedy), ([9, 2], seeded), ([40, 41, 42, 43], greedy)]
    alone = [generate(model, [p], sp)[0].output_ids for p, sp in good]
    poison = next(t for t in range(399, 0, -1) if all(t not in p + out for (p, _), out in zip(good, alone)))
    engine = make_engine(Poisoned(model, poison), max_batch_size=6, batch_wait_timeout_s=0.05)

    def broken_detokenize(ids: list[int]) -> str:
        if len(ids) >= 3:
            raise UnicodeError("cannot decode")
        return "x" * len(ids)

    async def main():
        reqs = [[Sequence(p, sp)] for p, sp in good]
        reqs.append([Sequence([3, poison, 4], greedy)])  # fails in prefill
        reqs.append([Sequence([6, 7], SamplingParams(max_tokens=8, temperature=0.0, logit_bias=((poison, 100.0),)))])
        reqs.append([Sequence([8, 9], greedy, detokenize=broken_detokenize)])  # fails at its third token
        events = await asyncio.gather(*(collect(engine, r) for r in reqs))
        engine.check_health()  # the batching loop still runs
        return reqs, events

    reqs, events = asyncio.run(main())
    assert [r[0].output_ids for r in reqs[:3]] == alone
    assert all(ev[-1].error is None and ev[-1].finish_reason == "length" for ev in events[:3])
    errors = [ev[-1].error for ev in events[3:]]
    assert f"poisoned token {poison}" in errors[0] and f"poisoned token {poison}" in errors[1], errors
    assert reqs[4][0].output_ids == [poison]  # it generated the poison, and failed on the next step
    assert errors[2].startswith("UnicodeError") and len(reqs[5][0].output_ids) == 3
    assert engine.decoder.n_free == 6 and not engine.waiting
    snap = engine.metrics.snapshot()
    assert snap["max_decode_batch_size"] >= 4  # they really shared decode steps
