"""Jobs that route alike choose their experts in one batch (a fixed number of ops, whatever
the number of jobs); that trains exactly as choosing job by job does."""

from __future__ import annotations

import pytest
import torch
from tiny import tiny_llama
from trainer_helpers import make_job, mixlora_hp

from mixloom.model import routing as routing_mod
from mixloom.model.adapter_model import AdapterModel
from mixloom.trainer.fused import FusedTrainer


def _train(routing: str, together: bool, monkeypatch: pytest.MonkeyPatch) -> tuple[dict, int]:
    calls = []
    real = routing_mod.choose_together

    def counted(*args):  # type: ignore[no-untyped-def]
        calls.append(1)
        return real(*args)

    with monkeypatch.context() as m:
        m.setattr(routing_mod, "choose_together", counted)
        if not together:
            m.setattr(routing_mod, "routes_alike", lambda state, specs: False)
        trainer = FusedTrainer(AdapterModel(tiny_llama(), recompute=True), pad_id=0)
        hp = mixlora_hp(
            num_experts=3, routing=routing, top_k=2, top_p=0.6, batch_size=2, lora_dropout=0.1
        )
        for i in range(3):  # rows of random length: padded batches
            trainer.add_job(make_job(f"m{i}", hp, seed=10 + i, n_rows=4))
        for _ in range(2):
            trainer.step()
        weights = {f"m{i}": trainer.model.adapter_state_dict(f"m{i}") for i in range(3)}
    return weights, len(calls)


@pytest.mark.parametrize("routing", ["top_k", "top_p", "switch"])
def test_choosing_together_trains_like_choosing_job_by_job(
    routing: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    together, calls = _train(routing, True, monkeypatch)
    assert calls == 2 * 2  # every layer of both steps took the batched path
    alone, none = _train(routing, False, monkeypatch)
    assert none == 0
    # One batched router matmul may round differently from one matmul per job; Adam turns a near-zero gradient's last bits into up to ~2e-6 here (seen), 0.04% of one
    # step at lr 5e-3. A wrong expert or weight moves a parameter by a whole step.
    for name, weights in alone.items():
        for k, v in weights.items():
            diff = (together[name][k] - v).abs().max().item()
            torch.testing.assert_close(
                together[name][k], v, atol=1e-5, rtol=1e-5, msg=f"{name} {k}: {diff:.2e}"
            )


def test_load_balance_losses_and_router_loads_equal_job_by_jobs(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Logged together, a layer's router statistics are summed per job in one op; the losses
    # and loads must be what each job's own tokens give, padding excluded.
    def run(together: bool) -> tuple[dict, dict]:
        with monkeypatch.context() as m:
            if not together:
                m.setattr(routing_mod, "routes_alike", lambda state, specs: False)
            trainer = FusedTrainer(AdapterModel(tiny_llama()), pad_id=0)
            hp = mixlora_hp(num_experts=3, top_k=2, batch_size=2, router_aux_loss_coef=0.5)
            for i in range(3):
                trainer.add_job(make_job(f"m{i}", hp, seed=10 + i, n_rows=4))
            batches = [(job, *job.next_micro_batch()) for job in trainer.active]
            ids, _, mask, segments = trainer._collate(batches)
            assert not mask.all()  # rows of random length: padding is there
            with trainer.model.fused(segments, mask, training=False):
                trainer.model.model.model(input_ids=ids, attention_mask=mask)
                aux = trainer.model.aux_losses()
                loads = trainer.model.router_load()
            logged = trainer.model.state.router_logs
            assert logged is not None and all(
                len(log.names) == (3 if together else 1) for log in logged
            )
            return aux, loads

    (aux_t, load_t), (aux_j, load_j) = run(True), run(False)
    assert set(aux_t) == set(aux_j) == {"m0", "m1", "m2"}
    for name in aux_j:
        assert float(aux_j[name].detach()) > 0
        torch.testing.assert_close(aux_t[name], aux_j[name], rtol=1e-6, atol=1e-7)
        torch.testing.assert_close(load_t[name], load_j[name], rtol=1e-6, atol=1e-7)
        assert abs(float(load_j[name].sum()) - 1) < 1e-6
