"""A request's life through the engine: bad input refused at submit with one clear error,
stop strings and stop tokens, streamed deltas that add up to the text, usage, cancellation,
a failing request failing alone, and the engine's own thread."""

from __future__ import annotations

from pathlib import Path

import pytest
from infer_helpers import BASE, greedy, make_engine, prompt, run_all

from mixloom.errors import GenerationError, RequestError
from mixloom.inference import Delta, EngineConfig, SamplingParams


@pytest.mark.parametrize(
    ("ids", "params", "param", "code", "says"),
    [
        ([], greedy(4), "prompt", "invalid_value", "prompt is empty"),
        (prompt(1, 256), greedy(4), "prompt", "context_length_exceeded", "shorten the prompt"),
        (prompt(1, 200), greedy(57), "max_tokens", "context_length_exceeded", "at most 56"),
        (prompt(1, 5), greedy(0), "max_tokens", "invalid_value", "at least 1"),
        (prompt(1, 5), SamplingParams(n=5), "n", "invalid_value", "between 1 and 4"),
        (
            prompt(1, 5),
            SamplingParams(temperature=-1),
            "temperature",
            "invalid_value",
            "between 0 and 2",
        ),
        (prompt(1, 5), SamplingParams(top_p=0), "top_p", "invalid_value", r"in \(0, 1\]"),
        (
            prompt(1, 5),
            SamplingParams(logprobs=21),
            "logprobs",
            "invalid_value",
            "between 0 and 20",
        ),
        (prompt(1, 5), SamplingParams(stop=("",)), "stop", "invalid_value", "non-empty"),
        ([5, 99999], greedy(4), "prompt", None, "token ids must be in"),
        (
            prompt(1, 5),
            SamplingParams(max_tokens=200, n=4),
            "max_tokens",
            "context_length_exceeded",
            "KV cache",
        ),
    ],
)
def test_bad_requests_are_refused_at_submit(
    base_dir: Path, adapter_dirs: dict[str, Path], ids, params, param, code, says
) -> None:  # type: ignore[no-untyped-def]
    engine = make_engine(
        base_dir,
        adapter_dirs,
        EngineConfig(max_batch_tokens=16, max_running=8, max_n=4, kv_cache_tokens=512),
    )
    with pytest.raises(GenerationError, match=says) as info:
        engine.submit(BASE, ids, params)
    assert isinstance(info.value, RequestError)  # the API's 400 with param and code
    assert (info.value.param, info.value.code) == (param, code)
    assert not engine.has_work


def test_every_problem_is_named_at_once(base_dir: Path, adapter_dirs: dict[str, Path]) -> None:
    engine = make_engine(base_dir, adapter_dirs)
    with pytest.raises(GenerationError) as info:
        engine.submit(BASE, [], SamplingParams(max_tokens=0, n=9, top_p=2))
    message = str(info.value)
    assert all(w in message for w in ("prompt is empty", "max_tokens", "n must", "top_p"))
    assert info.value.param == "prompt"


def test_stop_strings_stop_tokens_and_streamed_text(
    base_dir: Path, adapter_dirs: dict[str, Path]
) -> None:
    engine = make_engine(base_dir, adapter_dirs)
    text_prompt = "Once upon a time"
    free = engine.submit("lora-b", text_prompt, greedy(20))
    run_all(engine)
    full = free.result().choices[0]
    assert full.finish_reason == "length"
    assert full.text == engine.tokenizer.decode(full.token_ids, skip_special_tokens=True)

    # a stop string of two byte tokens, not at the start
    stop = next(
        full.text[i : i + 2]
        for i in range(2, len(full.text) - 1)
        if full.text[i : i + 2].isascii() and full.text[i : i + 2].isprintable()
    )
    seen: list[Delta] = []
    stopped = engine.submit(
        "lora-b", text_prompt, greedy(20, stop=(stop, "never")), on_delta=seen.append
    )
    by_token = engine.submit("lora-b", text_prompt, greedy(20, stop_token_ids=(full.token_ids[2],)))
    run_all(engine)
    choice = stopped.result().choices[0]
    assert choice.finish_reason == "stop"
    assert choice.text == full.text[: full.text.index(stop)]
    streamed = list(stopped)  # the handle's stream: the same deltas as the callback's
    assert streamed == seen and "".join(d.text for d in streamed) == choice.text
    assert [d.finish_reason for d in streamed][-1] == "stop"
    assert all(d.finish_reason is None for d in streamed[:-1])
    assert all(stop not in d.text for d in streamed)

    tok = by_token.result().choices[0]
    assert tok.finish_reason == "stop" and tok.token_ids == full.token_ids[:3]
    assert tok.text == engine.tokenizer.decode(full.token_ids[:2], skip_special_tokens=True)
    usage = by_token.result().usage
    assert (usage.prompt_tokens, usage.completion_tokens) == (len(text_prompt) + 0, 3)


def test_usage_counts_every_sample(base_dir: Path, adapter_dirs: dict[str, Path]) -> None:
    engine = make_engine(base_dir, adapter_dirs)
    handle = engine.submit("lora-a", prompt(3, 9), SamplingParams(max_tokens=6, n=3, seed=0))
    run_all(engine)
    result = handle.result()
    assert [c.index for c in result.choices] == [0, 1, 2]
    assert result.usage.prompt_tokens == 9
    assert result.usage.completion_tokens == sum(len(c.token_ids) for c in result.choices)
    assert result.usage.total_tokens == 9 + result.usage.completion_tokens


def test_cancel_frees_the_rows_and_an_unknown_model_fails_alone(
    base_dir: Path, adapter_dirs: dict[str, Path]
) -> None:
    engine = make_engine(base_dir, adapter_dirs)
    long = engine.submit("lora-b", prompt(4, 10), greedy(100))
    unknown = engine.submit("ft:nobody", prompt(5, 10), greedy(3))
    fine = engine.submit(BASE, prompt(6, 10), greedy(3))
    for _ in range(5):
        engine.step()
    with pytest.raises(KeyError, match="ft:nobody"):  # what the loader raised
        unknown.result(timeout=0)
    with pytest.raises(KeyError):
        list(unknown)
    assert fine.result(timeout=0).choices[0].finish_reason == "length"
    long.cancel()
    engine.step()
    assert not engine.has_work
    assert long.result(timeout=0).choices[0].finish_reason == "cancelled"
    cache = engine._cache
    assert cache is not None and cache.free_blocks == cache.blocks  # every block back
    assert engine.adapters._entries["lora-b"].users == 0


def test_the_engines_own_thread_serves_requests(
    base_dir: Path, adapter_dirs: dict[str, Path]
) -> None:
    engine = make_engine(base_dir, adapter_dirs)
    engine.start()
    try:
        handles = [
            engine.submit(m, prompt(i, 8), greedy(5))
            for i, m in enumerate(("lora-a", "moe-d", BASE))
        ]
        deltas = list(handles[0])  # streams while the thread steps
        assert len(deltas) == len(handles[0].result(timeout=30).choices[0].token_ids)
        assert all(h.result(timeout=30).choices for h in handles)
    finally:
        engine.close()
    assert not engine.has_work
    assert not any(name.startswith("infer:") for name in engine.model.specs)  # left as found


def test_ignore_eos_goes_on_past_the_end(base_dir: Path, adapter_dirs: dict[str, Path]) -> None:
    engine = make_engine(base_dir, adapter_dirs)
    ended = engine.submit("moe-c", "Once upon a time", greedy(20))
    on = engine.submit("moe-c", "Once upon a time", greedy(20, ignore_eos=True))
    run_all(engine)
    short, full = ended.result().choices[0], on.result().choices[0]
    assert short.finish_reason == "stop" and short.token_ids[-1] in engine.eos_ids
    assert full.finish_reason == "length" and len(full.token_ids) == 20
    assert full.token_ids[: len(short.token_ids)] == short.token_ids
