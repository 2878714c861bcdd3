"""Adapters load on first use and stay loaded up to the byte budget: the least recently used
one that no running request holds goes first, a reload answers as before, and a request
whose adapter does not fit beside those in use waits for room instead of evicting them."""

from __future__ import annotations

from pathlib import Path

import pytest
from infer_helpers import BASE, greedy, make_engine, prompt, run_all

from mixloom.errors import ModelLoadError
from mixloom.inference import EngineConfig
from mixloom.inference.adapters import PREFIX, adapter_bytes
from mixloom.model.formats import read_spec


def _sizes(engine, adapter_dirs):  # type: ignore[no-untyped-def]
    return {m: adapter_bytes(engine.model, read_spec(f)[0]) for m, f in adapter_dirs.items()}


def test_the_size_estimate_is_the_loaded_weights(
    base_dir: Path, adapter_dirs: dict[str, Path]
) -> None:
    engine = make_engine(base_dir, adapter_dirs)
    for model_id in adapter_dirs:
        name = engine.adapters.acquire(model_id)
        assert name is not None and name.startswith(PREFIX)
        weights = engine.model.adapter_parameters(name)
        assert (
            sum(p.numel() * p.element_size() for p in weights)
            == _sizes(engine, adapter_dirs)[model_id]
        )
        assert not any(p.requires_grad for p in weights)
        engine.adapters.release(model_id)


def test_lru_eviction_under_a_small_budget_and_reload(
    base_dir: Path, adapter_dirs: dict[str, Path]
) -> None:
    probe = make_engine(base_dir, adapter_dirs)
    sizes = _sizes(probe, adapter_dirs)
    budget = sizes["lora-a"] + sizes["moe-c"] + sizes["lora-b"] - 1  # not all three
    engine = make_engine(
        base_dir,
        adapter_dirs,
        EngineConfig(max_batch_tokens=16, max_running=8, max_n=4, adapter_cache_bytes=budget),
    )
    ids = prompt(41, 6)

    def ask(model_id: str) -> list[int]:
        handle = engine.submit(model_id, ids, greedy(8))
        run_all(engine)
        return handle.result().choices[0].token_ids

    first = {m: ask(m) for m in ("lora-a", "moe-c")}
    assert list(engine.adapters.loaded) == ["lora-a", "moe-c"]
    ask("lora-a")  # now moe-c is the least recently used
    ask("lora-b")
    assert list(engine.adapters.loaded) == ["lora-a", "lora-b"]
    assert engine.adapters.used_bytes <= budget
    assert ask("moe-c") == first["moe-c"]  # reloaded: the same answer
    assert list(engine.adapters.loaded) == ["lora-b", "moe-c"]
    assert ask("lora-a") == first["lora-a"]
    # the model holds exactly the cached adapters, nothing left behind by evictions
    assert set(engine.model.specs) == set(engine.adapters.loaded.values())
    assert ask(BASE) == ask(BASE)  # the base takes no room
    assert engine.adapters.used_bytes <= budget


def test_a_request_waits_for_room_instead_of_evicting_an_adapter_in_use(
    base_dir: Path, adapter_dirs: dict[str, Path]
) -> None:
    probe = make_engine(base_dir, adapter_dirs)
    sizes = _sizes(probe, adapter_dirs)
    budget = sizes["lora-b"] + sizes["moe-c"]  # a and b fit; c beside b only
    assert sizes["lora-a"] <= sizes["moe-c"]
    engine = make_engine(
        base_dir,
        adapter_dirs,
        EngineConfig(max_batch_tokens=16, max_running=8, max_n=4, adapter_cache_bytes=budget),
    )
    a = engine.submit("lora-a", prompt(51, 5), greedy(6))
    b = engine.submit("lora-b", prompt(52, 5), greedy(12))
    engine.step()
    c = engine.submit("moe-c", prompt(53, 5), greedy(4))  # does not fit beside a and b
    steps = 0
    while not a.done:
        engine.step()
        steps += 1
        assert "moe-c" not in engine.adapters.loaded  # both in use: it waits
    run_all(engine)  # a finished: its adapter makes room for c while b runs on
    assert [h.result().choices[0].finish_reason for h in (a, b, c)] == ["length"] * 3
    assert "lora-a" not in engine.adapters.loaded and "lora-b" in engine.adapters.loaded

    small = make_engine(
        base_dir,
        adapter_dirs,
        EngineConfig(max_batch_tokens=16, max_running=8, max_n=4, adapter_cache_bytes=1000),
    )
    too_big = small.submit("moe-c", prompt(54, 5), greedy(4))
    run_all(small)
    with pytest.raises(ModelLoadError, match="adapter_cache_bytes"):
        too_big.result()
