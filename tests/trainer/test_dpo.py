"""DPO jobs in the fused trainer: the loss is DPO's sigmoid loss over the answers' summed
log-probabilities against the base's (the reference: no adapter); fused with supervised
jobs each trains as it would alone; a checkpoint (with the reference numbers made so far)
resumes to the uninterrupted result; a DPO job whose loss goes NaN fails alone."""

from __future__ import annotations

import math
import random

import pytest
import torch
import torch.nn.functional as F
from tiny import tiny_llama
from trainer_helpers import lora_hp, make_job, mixlora_hp, trainer_for

from mixloom.data.tokenize import IGNORE_INDEX, EncodedPair, EncodedRow
from mixloom.jobspec import DpoObjective, LoraHyperparameters
from mixloom.model.batch import Segment
from mixloom.model.specs import AdapterSpec
from mixloom.trainer.checkpoint import load_checkpoint, save_checkpoint
from mixloom.trainer.fused import FusedTrainer
from mixloom.trainer.job import TrainingJob, TrainingState


def synthetic_pairs(n: int, seed: int, vocab: int = 128) -> list[EncodedPair]:
    """Pairs whose two rows share a random prompt and differ in a random answer."""
    rng = random.Random(seed)
    pairs = []
    for _ in range(n):
        prompt = [rng.randrange(1, vocab) for _ in range(rng.randint(2, 8))]
        rows = []
        for _ in range(2):
            answer = [rng.randrange(1, vocab) for _ in range(rng.randint(2, 9))]
            ids = prompt + answer
            rows.append(EncodedRow(ids, [IGNORE_INDEX] * len(prompt) + answer))
        pairs.append(EncodedPair(rows[0], rows[1]))
    return pairs


def dpo_job(
    name: str,
    hp: LoraHyperparameters,
    *,
    seed: int,
    n_pairs: int = 6,
    beta: float = 0.1,
    label_smoothing: float = 0.0,
) -> TrainingJob:
    adapter = AdapterSpec.from_hyperparameters(name, hp, seed=seed)
    return TrainingJob(
        name,
        adapter,
        hp,
        synthetic_pairs(n_pairs, seed=seed * 17 + 3),
        seed=seed,
        validation_rows=synthetic_pairs(3, seed=seed * 17 + 4),
        preference=DpoObjective(beta=beta, label_smoothing=label_smoothing),
    )


def _jobs() -> list[TrainingJob]:
    """A supervised LoRA job, a DPO LoRA job (accumulating 2 micro-batches, 2 epochs: the
    second reads the reference numbers kept from the first) and a DPO MixLoRA job."""
    return [
        make_job("sft", lora_hp(batch_size=2, n_epochs=2), seed=1, n_rows=6),
        dpo_job(
            "dpo-lora",
            lora_hp(batch_size=4, micro_batch_size=2, n_epochs=2, lora_dropout=0.1),
            seed=2,
            beta=0.5,
        ),
        dpo_job(
            "dpo-mix",
            mixlora_hp(batch_size=3, n_epochs=2, num_experts=3),
            seed=3,
            beta=0.2,
            label_smoothing=0.1,
        ),
    ]


def _run(trainer: FusedTrainer) -> None:
    while trainer.active:
        trainer.step()


def _weights(trainer: FusedTrainer, name: str) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in trainer.model.adapter_state_dict(name).items()}


def _assert_same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], atol: float) -> None:
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=atol, rtol=1e-4, msg=k)


def _answer_logp(trainer: FusedTrainer, row: EncodedRow, adapter: str | None) -> float:
    """A row's summed log-probability of its targets, the model asked plainly (one row, no
    padding, log_softmax over full logits)."""
    model = trainer.model
    ids = torch.tensor([row.input_ids])
    with torch.no_grad(), model.fused([Segment(adapter, 0, 1)], None, training=False):
        hidden = model.backbone(input_ids=ids).last_hidden_state
    logits = model.lm_head(hidden)[0, :-1].float()
    labels = torch.tensor(row.labels[1:])
    keep = labels != IGNORE_INDEX
    logp = F.log_softmax(logits, dim=-1)[keep].gather(1, labels[keep, None])
    return float(logp.sum())


def test_the_loss_is_dpo_against_the_base_and_metrics_are_trls() -> None:
    torch.manual_seed(0)
    trainer = trainer_for(tiny_llama())
    hp = lora_hp(batch_size=3, lora_dropout=0.0, learning_rate=1e-3)
    job = dpo_job("d", hp, seed=5, n_pairs=3, beta=0.3, label_smoothing=0.2)
    trainer.add_job(job)
    with torch.no_grad():  # a trained-looking adapter: the policy differs from the base
        for p in trainer.model.adapter_parameters("d"):
            p.add_(torch.randn_like(p) * 0.2)
    expected_losses, rewards = [], []
    for pair in job.rows:
        chosen = _answer_logp(trainer, pair.chosen, "d") - _answer_logp(trainer, pair.chosen, None)
        rejected = _answer_logp(trainer, pair.rejected, "d") - _answer_logp(
            trainer, pair.rejected, None
        )
        z = 0.3 * (chosen - rejected)
        log_sig = -math.log1p(math.exp(-z))
        log_sig_neg = -math.log1p(math.exp(z))
        expected_losses.append(-(0.8 * log_sig) - 0.2 * log_sig_neg)
        rewards.append((0.3 * chosen, 0.3 * rejected))
    report = trainer.step()
    (m,) = report.jobs
    assert m.stepped and m.state == TrainingState.SUCCEEDED  # its one step
    assert m.step_loss == pytest.approx(sum(expected_losses) / 3, rel=1e-4, abs=1e-6)
    assert m.preference is not None
    assert m.preference["rewards_chosen"] == pytest.approx(
        sum(c for c, _ in rewards) / 3, rel=1e-4, abs=1e-6
    )
    assert m.preference["rewards_rejected"] == pytest.approx(
        sum(r for _, r in rewards) / 3, rel=1e-4, abs=1e-6
    )
    assert m.preference["reward_accuracy"] == pytest.approx(sum(c > r for c, r in rewards) / 3)
    margin = m.preference["rewards_chosen"] - m.preference["rewards_rejected"]
    assert m.preference["reward_margin"] == pytest.approx(margin, abs=3e-6)  # rounded parts
    # the reference numbers were made once, for the three pairs of the step
    assert sorted(job.reference) == [0, 1, 2]
    assert job.reference[0][0] == pytest.approx(_answer_logp(trainer, job.rows[0].chosen, None))


def test_fused_supervised_and_dpo_jobs_train_as_each_alone() -> None:
    fused = trainer_for(tiny_llama())
    for job in _jobs():
        fused.add_job(job)
    _run(fused)
    for job in _jobs():
        alone = trainer_for(tiny_llama())
        alone.add_job(job)
        _run(alone)
        assert fused.jobs[job.name].state == alone.jobs[job.name].state == TrainingState.SUCCEEDED
        assert fused.jobs[job.name].step == job.total_steps
        _assert_same(_weights(fused, job.name), _weights(alone, job.name), atol=2e-5)
    # the second epoch made no reference numbers anew: one per pair
    assert len(fused.jobs["dpo-lora"].reference) == len(fused.jobs["dpo-lora"].rows)
    loss = fused.validation_loss("dpo-mix")
    assert loss is not None and math.isfinite(loss)
    accuracy = fused.jobs["dpo-mix"].valid_reward_accuracy
    assert accuracy is not None and 0.0 <= accuracy <= 1.0


def test_a_dpo_job_resumed_from_its_checkpoint_ends_as_if_uninterrupted(tmp_path) -> None:  # type: ignore[no-untyped-def]
    straight = trainer_for(tiny_llama())
    for job in _jobs()[1:]:
        straight.add_job(job)
    _run(straight)

    first = trainer_for(tiny_llama())
    jobs = _jobs()[1:]
    for job in jobs:
        first.add_job(job)
    saved = {}
    while len(saved) < len(jobs):  # each stops at its 2nd step (dpo-lora: its 2nd epoch)
        first.step()
        for job in jobs:
            if job.step == 2 and job.micro_done == 0 and job.name not in saved:
                saved[job.name] = save_checkpoint(first, job.name, tmp_path / job.name, "tiny")
    del first
    resumed = trainer_for(tiny_llama())
    for job in _jobs()[1:]:
        state = load_checkpoint(saved[job.name])
        resumed.add_job(job, resume=state)
        assert job.step == 2 and job.reference  # the reference numbers came back with it
    _run(resumed)
    for job in _jobs()[1:]:
        _assert_same(_weights(straight, job.name), _weights(resumed, job.name), atol=1e-6)


def test_a_dpo_job_whose_loss_goes_nan_fails_alone() -> None:
    jobs = _jobs()
    fused = trainer_for(tiny_llama())
    for job in jobs:
        fused.add_job(job)
    with torch.no_grad():
        next(iter(fused.model.adapter_parameters("dpo-lora"))).fill_(float("nan"))
    _run(fused)
    assert fused.jobs["dpo-lora"].state == TrainingState.FAILED
    assert "loss became nan" in (fused.jobs["dpo-lora"].error or "")
    for name in ("sft", "dpo-mix"):
        alone = trainer_for(tiny_llama())
        alone.add_job(next(j for j in _jobs() if j.name == name))
        _run(alone)
        assert fused.jobs[name].state == TrainingState.SUCCEEDED
        _assert_same(_weights(fused, name), _weights(alone, name), atol=2e-5)


def test_a_supervised_job_refuses_pairs_and_a_dpo_job_rows() -> None:
    hp = lora_hp()
    adapter = AdapterSpec.from_hyperparameters("x", hp, seed=1)
    with pytest.raises(Exception, match="EncodedPairs"):
        TrainingJob("x", adapter, hp, synthetic_pairs(2, 1))
    with pytest.raises(Exception, match="EncodedRows"):
        TrainingJob(
            "x",
            adapter,
            hp,
            make_job("y", hp).rows,
            preference=DpoObjective(),
        )


def test_preference_rows_for_a_supervised_job_are_an_error_naming_the_line() -> None:
    from tiny import tiny_tokenizer

    from mixloom.data.formats import Example, Format
    from mixloom.data.tokenize import encode_dataset
    from mixloom.errors import DataError

    pair = Example(
        (("user", "2+2?"), ("assistant", "4")), Format.PREFERENCE, "pairs.jsonl:3", rejected="5"
    )
    with pytest.raises(
        DataError, match=r'pairs.jsonl:3: a preference row: they are for method.type "dpo"'
    ):
        encode_dataset([pair], tiny_tokenizer(), max_seq_len=32, rendering="plain")
