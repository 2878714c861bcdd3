"""Direct preference optimisation: the loss of a DPO job's pairs, and what it reports.

A pair's answers are scored by their summed log-probabilities (the answer tokens alone: the
rows' targets) under the policy (the base with the job's adapter) and under the reference,
which for an adapter is the frozen base itself with no adapter. With the log-ratios
    chosen   = log p(preferred) - log p_ref(preferred)
    rejected = log p(other)     - log p_ref(other)
and z = beta * (chosen - rejected), a pair's loss is the sigmoid loss of DPO,
    -(1 - e) log sigmoid(z) - e log sigmoid(-z)
with e the label smoothing (conservative DPO; e = 0 is plain DPO). A job's loss is the mean
over the pairs of its optimizer step, as TRL's DPOTrainer takes it.

The reference log-probabilities depend on the pair alone, never on training: they are made
once per pair, the first time it is trained on (a forward of the base with no adapter and no
gradient, over the job's own micro-batch only, so that the numbers do not depend on which
other jobs share the step) and kept with the job (and its checkpoints) for later epochs.
Compared with scoring the reference inside every fused step, that forward runs once per pair
instead of once per pair and epoch, and the fused step carries no rows of it (nor their
activations) at all.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from mixloom.jobspec import DpoObjective

# The sums a job keeps over its optimizer step's micro-batches, in this order (TRL's names,
# as metrics.jsonl, the API and the dashboard show their means).
STATS = ("rewards_chosen", "rewards_rejected", "reward_accuracy", "logps_chosen", "logps_rejected")


def pair_losses(
    chosen: Tensor,
    rejected: Tensor,
    ref_chosen: Tensor,
    ref_rejected: Tensor,
    objective: DpoObjective,
) -> tuple[Tensor, Tensor]:
    """(the pairs' losses (m,), the sums of STATS over them (5,), detached).

    All (m,) fp32: the policy's and the reference's summed log-probabilities of each pair's
    preferred (`chosen`) and other (`rejected`) answer."""
    beta, smoothing = objective.beta, objective.label_smoothing
    chosen_rewards = beta * (chosen - ref_chosen)
    rejected_rewards = beta * (rejected - ref_rejected)
    z = chosen_rewards - rejected_rewards
    losses = -F.logsigmoid(z)
    if smoothing:
        losses = (1 - smoothing) * losses - smoothing * F.logsigmoid(-z)
    with torch.no_grad():
        stats = torch.stack(
            [
                chosen_rewards.sum(),
                rejected_rewards.sum(),
                (chosen_rewards > rejected_rewards).float().sum(),
                chosen.sum(),
                rejected.sum(),
            ]
        )
    return losses, stats.detach()


def step_metrics(sums: list[float], pairs: int) -> dict[str, float]:
    """The means over an optimizer step's pairs, and the reward margin."""
    means = {name: value / max(1, pairs) for name, value in zip(STATS, sums, strict=True)}
    means["reward_margin"] = means["rewards_chosen"] - means["rewards_rejected"]
    return {k: round(v, 6) for k, v in means.items()}
