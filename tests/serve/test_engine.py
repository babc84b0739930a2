"""The continuous-batching engine in-process (no HTTP): concurrent requests share decode steps and
give the same greedy results as decoding alone, prefill admission respects the token budget,
a caller that leaves frees its slot, and a failing forward pass ends only its own sequences."""

from __future__ import annotations

import asyncio

import pytest

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
