"""Routing inspection: per generated token, each MoE layer's chosen experts and combine weights, recorded
by the MoE layers during the very forward passes that chose the tokens (moe/moe.py, moe/generate.py)."""

from __future__ import annotations

import torch

from moe.generate import SamplingParams, generate
from tests.moe.test_generate import prompts, tiny_model


def test_routing_has_one_entry_per_token_layer_and_choice():
    model = tiny_model()
    cfg = model.cfg
    seqs = generate(model, prompts(3), SamplingParams(max_tokens=5, temperature=0.0, ignore_eos=True),
                    record_routing=True)
    for s in seqs:
        assert len(s.routing) == len(s.output_ids) == 5
        for r in s.routing:
            assert len(r.experts) == len(r.weights) == cfg.n_moe_layers
            for ids, ws in zip(r.experts, r.weights):
                assert len(set(ids)) == cfg.moe.top_k and all(0 <= e < cfg.moe.n_routed_experts for e in ids)
                assert abs(sum(ws) - cfg.moe.route_scale) < 1e-5  # norm_topk_prob
    assert all(m.routing_record is None for m in model.moe_layers().values())  # recording is off again
    plain = generate(model, prompts(3), SamplingParams(max_tokens=5, temperature=0.0, ignore_eos=True))
    assert [s.output_ids for s in plain] == [s.output_ids for s in seqs] and plain[0].routing == []


def test_reported_experts_are_the_ones_the_forward_dispatched_to():
    """The layers' own dispatch counters (filled by `dispatch_combine` from the assignments it ran) equal
    the counts of the reported experts: a one-token prompt makes every forward position a generated token."""
    model = tiny_model()
    layers = model.moe_layers()
    for m in layers.values():
        m.take_load()
    n = 7
    (seq,) = generate(model, [[5]], SamplingParams(max_tokens=n, temperature=0.8, seed=3, ignore_eos=True),
                      record_routing=True)
    assert len(seq.routing) == n
    for i, m in enumerate(layers.values()):
        reported = torch.tensor([e for r in seq.routing for e in r.experts[i]])
        assert torch.equal(torch.bincount(reported, minlength=m.cfg.n_routed_experts).float(), m.take_load())
