"""Sampling: a seeded request's samples depend on its seed and prompt only, not on what
shares its batch; temperature, top_p, n and logprobs do what they say."""

from __future__ import annotations

from pathlib import Path

import torch
from infer_helpers import BASE, greedy, make_engine, prompt, run_all
from transformers import AutoModelForCausalLM

from mixloom.inference import InferenceEngine, SamplingParams

SAMPLED = SamplingParams(max_tokens=10, temperature=0.9, top_p=0.8, seed=1234, n=3)


def _samples(engine: InferenceEngine, model_id: str, ids: list[int], params: SamplingParams):  # type: ignore[no-untyped-def]
    handle = engine.submit(model_id, ids, params)
    run_all(engine)
    return [c.token_ids for c in handle.result().choices]


def test_seeded_samples_alone_equal_samples_in_a_mixed_batch(
    base_dir: Path, adapter_dirs: dict[str, Path]
) -> None:
    ids = prompt(11, 6)
    alone = {
        m: _samples(make_engine(base_dir, adapter_dirs), m, ids, SAMPLED)
        for m in ("moe-c", "lora-a")
    }

    engine = make_engine(base_dir, adapter_dirs)
    others = [
        engine.submit("lora-b", prompt(12, 30), SamplingParams(max_tokens=8, temperature=1.0)),
        engine.submit(BASE, prompt(13, 5), greedy(6)),
        engine.submit("moe-d", prompt(14, 4), SamplingParams(max_tokens=9, seed=5, n=2)),
    ]
    engine.step()
    engine.step()  # ours join a running batch, the MixLoRA one later than the LoRA one
    lora = engine.submit("lora-a", ids, SAMPLED)
    engine.step()
    moe = engine.submit("moe-c", ids, SAMPLED)
    others.append(engine.submit("moe-c", prompt(15, 7), SamplingParams(max_tokens=5, seed=9)))
    run_all(engine)
    assert [c.token_ids for c in lora.result().choices] == alone["lora-a"]
    assert [c.token_ids for c in moe.result().choices] == alone["moe-c"]
    assert all(h.result().choices for h in others)
    # the n samples are distinct streams, and another seed draws otherwise
    assert len({tuple(t) for t in alone["moe-c"]}) == 3
    other_seed = SamplingParams(max_tokens=10, temperature=0.9, top_p=0.8, seed=99, n=3)
    assert _samples(make_engine(base_dir, adapter_dirs), "moe-c", ids, other_seed) != alone["moe-c"]


def test_top_p_keeps_only_the_nucleus_and_low_temperature_is_greedy(
    base_dir: Path, adapter_dirs: dict[str, Path]
) -> None:
    engine = make_engine(base_dir, adapter_dirs)
    ids = prompt(21, 5)
    greedy_out = _samples(engine, BASE, ids, greedy(8))[0]
    # top_p so small that only the most likely token is left: sampling is greedy
    tiny_p = SamplingParams(max_tokens=8, temperature=1.0, top_p=1e-6, seed=3, n=2)
    assert _samples(engine, BASE, ids, tiny_p) == [greedy_out, greedy_out]
    cold = SamplingParams(max_tokens=8, temperature=1e-4, seed=3)
    assert _samples(engine, BASE, ids, cold) == [greedy_out]


def test_logprobs_are_the_models(base_dir: Path, adapter_dirs: dict[str, Path]) -> None:
    engine = make_engine(base_dir, adapter_dirs)
    ids = prompt(31, 6)
    handle = engine.submit(
        BASE, ids, SamplingParams(max_tokens=5, temperature=0.7, seed=1, logprobs=3)
    )
    run_all(engine)
    choice = handle.result().choices[0]
    assert choice.logprobs is not None and len(choice.logprobs) == len(choice.token_ids)
    model = AutoModelForCausalLM.from_pretrained(base_dir)
    seq = torch.tensor([ids + choice.token_ids])
    with torch.no_grad():
        logp = model(input_ids=seq).logits[0, len(ids) - 1 : -1].log_softmax(-1)  # (5, V)
    for t, (lp, token) in enumerate(zip(choice.logprobs, choice.token_ids, strict=True)):
        assert lp.token == token
        torch.testing.assert_close(lp.logprob, float(logp[t, token]), atol=1e-4, rtol=0)
        top_v, top_i = logp[t].topk(3)
        assert [tok for tok, _ in lp.top] == top_i.tolist()
        torch.testing.assert_close([v for _, v in lp.top], top_v.tolist(), atol=1e-4, rtol=0)
    # without logprobs asked, none are computed or returned
    plain = engine.submit(BASE, ids, greedy(3))
    run_all(engine)
    assert plain.result().choices[0].logprobs is None
