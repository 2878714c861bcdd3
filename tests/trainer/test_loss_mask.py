"""Prompt tokens carry no loss: the gradient never reaches positions whose next label is -100."""

from __future__ import annotations

import torch
from tiny import tiny_llama
from trainer_helpers import lora_hp, make_job, trainer_for

from mixloom.data.tokenize import IGNORE_INDEX


def test_prompt_positions_get_no_gradient() -> None:
    trainer = trainer_for(tiny_llama())
    job = make_job("m", lora_hp())
    trainer.add_job(job)
    rows = job.rows[:3]
    from mixloom.data.tokenize import collate

    _, labels, _ = collate(rows, 0)
    hidden = torch.randn(3, labels.shape[1], 64, requires_grad=True)
    trainer._token_loss_sum(hidden, labels).backward()
    grad_norm = hidden.grad.norm(dim=-1)  # (B, T)
    target_next = torch.zeros_like(labels, dtype=torch.bool)
    target_next[:, :-1] = labels[:, 1:] != IGNORE_INDEX
    assert (grad_norm[~target_next] == 0).all()
    assert (grad_norm[target_next] > 0).all()
