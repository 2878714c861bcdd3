"""The scheduling policy and the memory estimate, without a model or a database."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from types import SimpleNamespace

from mixloom.jobspec import LoraHyperparameters, MixLoraHyperparameters
from mixloom.scheduler import memory
from mixloom.scheduler.policy import Candidate, Waiting, compose_step, fair_claim_order

T0 = datetime(2026, 1, 1, tzinfo=UTC)


def _waiting(tenant: str, i: int) -> Waiting:
    return Waiting(f"{tenant}{i}", tenant, T0 + timedelta(seconds=i))


def test_many_queued_jobs_of_one_tenant_do_not_push_back_another() -> None:
    queued = [_waiting("a", i) for i in range(5)] + [_waiting("b", 10)]
    assert [w.id for w in fair_claim_order(queued, {})][:3] == ["a0", "b10", "a1"]
    # a already runs two jobs somewhere: b's one job goes first
    assert fair_claim_order(queued, {"a": 2})[0].id == "b10"


def _cand(name: str, tenant: str, last: int, rows: int = 2, width: int = 20) -> Candidate:
    return Candidate(name, tenant, rows, width, last, int(name[-1]))


def test_steps_take_turns_across_tenants_within_the_token_budget() -> None:
    jobs = {"a1": "a", "a2": "a", "a3": "a", "b1": "b"}
    last = dict.fromkeys(jobs, -1)
    served: dict[str, int] = dict.fromkeys(jobs, 0)
    for step in range(12):
        cands = [_cand(n, t, last[n]) for n, t in jobs.items()]
        chosen = compose_step(cands, token_budget=80, memory_free=10**12, activation=lambda c, w: 0)
        assert len(chosen) == 2 and "b1" in chosen  # two fit; b is in every step
        for n in chosen:
            last[n] = step
            served[n] += 1
    assert served["b1"] == 12
    assert all(served[n] == 4 for n in ("a1", "a2", "a3"))  # a's jobs share a's half


def test_step_respects_memory_and_always_runs_one_job() -> None:
    cands = [_cand("a1", "a", -1, rows=4, width=50), _cand("b1", "b", -1)]
    chosen = compose_step(
        cands, token_budget=100, memory_free=1000, activation=lambda c, w: c.rows * w * 10
    )
    assert chosen == ["a1"]  # over the token budget alone, it still runs; b waits a turn
    chosen = compose_step(
        cands, token_budget=10**6, memory_free=2500, activation=lambda c, w: c.rows * w * 10
    )
    assert chosen == ["a1"]  # b would need (4+2) x 50 x 10 bytes in total: over the budget


SMOLLM2 = SimpleNamespace(
    num_hidden_layers=30,
    hidden_size=576,
    intermediate_size=1536,
    num_attention_heads=9,
    num_key_value_heads=3,
    vocab_size=49152,
)


def test_memory_estimate_and_admission_messages() -> None:
    shape = memory.ModelShape.from_config(SMOLLM2, dtype_bytes=4, base_bytes=540 * 2**20)
    lora = LoraHyperparameters(r=8, target_modules=("q_proj", "v_proj"))
    # q: 576x576, v: 576x192 per layer -> 8 * (1152 + 768) * 30 trainable parameters
    assert memory.adapter_parameters(shape, lora) == 8 * (1152 + 768) * 30
    moe = MixLoraHyperparameters(r=8, num_experts=8, top_k=2)
    assert memory.adapter_parameters(shape, moe) > 8 * memory.adapter_parameters(shape, lora)
    short = memory.step_bytes_upper_bound(shape, lora.model_copy(update={"max_seq_len": 128}))
    assert memory.step_bytes_upper_bound(shape, lora) > 3 * short

    gib = memory.GIB
    ok = memory.admit(shape, lora, budget=16 * gib, admitted_state=0)
    assert ok.ok
    full = memory.admit(shape, lora, budget=16 * gib, admitted_state=15 * gib)
    assert not full.ok and not full.never and "waiting for memory" in full.reason
    big = MixLoraHyperparameters(max_seq_len=8192, batch_size=64)
    never = memory.admit(shape, big, budget=8 * gib, admitted_state=0)
    assert never.never and "lower micro_batch_size" in never.reason


def test_memory_estimate_counts_recomputed_experts_once() -> None:
    kept = memory.ModelShape.from_config(SMOLLM2, dtype_bytes=4, base_bytes=540 * 2**20)
    again = memory.ModelShape.from_config(
        SMOLLM2, dtype_bytes=4, base_bytes=540 * 2**20, recompute=True
    )
    moe = MixLoraHyperparameters(r=8, num_experts=8, top_k=2, max_seq_len=512)
    lora = LoraHyperparameters(r=8, max_seq_len=512)
    # a LoRA job has no experts: the same either way
    assert memory.step_bytes_upper_bound(again, lora) == memory.step_bytes_upper_bound(kept, lora)
    # a top-2 MixLoRA job: 2 experts x gate/up/product x fp32 per token, in 1 layer, not 30
    tokens = moe.micro_batch_rows * 512
    experts = tokens * 2 * 3 * 1536 * 4
    saved = memory.step_bytes_upper_bound(kept, moe) - memory.step_bytes_upper_bound(again, moe)
    assert abs(saved - memory.SAFETY * 29 * experts) <= 1
