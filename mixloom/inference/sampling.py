"""The next token of every sampled row of a step, in a fixed number of ops whatever the rows.

A row's randomness is one uniform number a token, drawn on the host from its own generator
(seeded from the request's seed), so what a sample becomes depends on its seed and its
logits only, never on the other rows; the draw picks the token where it falls in the
cumulative distribution (inverse-CDF sampling) after temperature and top-p.

Shapes: logits (R, V) fp32, one row per sample to draw.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from mixloom.model.batch import upload


@dataclass(frozen=True)
class Draw:
    """One row to sample: its settings and, unless greedy, its uniform number."""

    temperature: float  # 0: argmax
    top_p: float
    uniform: float  # in [0, 1), drawn from the sample's generator (unused when greedy)
    logprobs: int | None  # as SamplingParams.logprobs


@dataclass(frozen=True)
class Drawn:
    """What the rows drew, on the host."""

    tokens: list[int]
    logprobs: list[float | None]  # the chosen token's, where asked
    top: list[list[tuple[int, float]] | None]  # the k most likely (token, logprob), where asked


def draw(logits: Tensor, rows: list[Draw]) -> Drawn:
    """Next token of each row of logits (R, V); one read of the device."""
    device = logits.device
    tokens = logits.argmax(-1)  # (R,) greedy rows keep this
    sampled = [i for i, r in enumerate(rows) if r.temperature > 0]
    if sampled:
        idx = upload(sampled, device)
        temp = upload([rows[i].temperature for i in sampled], device)[:, None]
        top_p = upload([rows[i].top_p for i in sampled], device)[:, None]
        u = upload([rows[i].uniform for i in sampled], device)[:, None]
        probs = (logits.index_select(0, idx) / temp).softmax(-1)  # (S, V)
        sorted_p, order = probs.sort(-1, descending=True)
        # nucleus: keep a token while the mass before it is below top_p (the first always)
        keep = (sorted_p.cumsum(-1) - sorted_p) < top_p
        cdf = (sorted_p * keep).cumsum(-1)  # (S, V)
        at = torch.searchsorted(cdf, u * cdf[:, -1:], right=True)
        at = at.clamp(max=cdf.shape[1] - 1)  # u * total may round to the total itself
        tokens = tokens.index_copy(0, idx, order.gather(-1, at)[:, 0])
    out: list[Tensor] = [tokens.to(torch.float64)]
    want = [r.logprobs for r in rows if r.logprobs is not None]
    k = max(want, default=0)
    if want:
        logp = logits.log_softmax(-1)
        out.append(logp.gather(-1, tokens[:, None])[:, 0].double())
        if k:
            top_v, top_i = logp.topk(k, -1)
            out += [top_v.double().T.reshape(-1), top_i.double().T.reshape(-1)]
    values = torch.cat(out).tolist()  # one read: tokens, chosen logprobs, top k
    n = len(rows)
    chosen = [int(t) for t in values[:n]]
    logprobs: list[float | None] = [None] * n
    top: list[list[tuple[int, float]] | None] = [None] * n
    for i, r in enumerate(rows):
        if r.logprobs is None:
            continue
        logprobs[i] = values[n + i]
        base = 2 * n
        top[i] = [
            (int(values[base + k * n + j * n + i]), values[base + j * n + i])
            for j in range(r.logprobs)
        ]
    return Drawn(chosen, logprobs, top)
