"""Scoring: the base model and any number of adapters over the same questions, in ONE fused
eval-mode forward per batch.

A batch takes a run of requests (longest first, as lm-eval orders them, so the padding is
small and the biggest batch comes first) and lays them out once per adapter, each copy one
contiguous row block (`Segment`) routed through its adapter (None: the base alone). Dropout
is off and MixLoRA routing deterministic (`training=False`); padding tokens are never routed.
The positions a request reads go through the vocabulary projection in fp32 chunks, never
the whole (rows, T, V) logits. Scoring K adapters together equals scoring each alone
(tests/eval/test_fused_scoring.py).

The worker's interface is `evaluate`: the adapters must be loaded into the model already
(`mixloom.model.formats.load_adapter_into`, or a training session's own).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from mixloom.data.tokenize import pad_id_of
from mixloom.eval.protocols import (
    FEWSHOT_SEED,
    DocRequests,
    Request,
    argmax,
    build_requests,
    max_length,
)
from mixloom.eval.results import EvalResults, TaskResult, mean_stderr
from mixloom.eval.tasks import Task
from mixloom.model.adapter_model import AdapterModel
from mixloom.model.batch import Segment

# Tokens of one forward, every adapter's copy and padding included: ~5 s of SmolLM2-135M's
# forward on 2 CPU cores (800 tokens/s), so the progress bar moves; on a GPU, pass more.
DEFAULT_BATCH_TOKENS = 4096
_PROJECT_ROWS = 512  # positions projected to the vocabulary at once: 512 x 49,152 fp32 = 96 MiB

Progress = Callable[[int, int], None]  # (sequences scored so far, sequences in all)


def _batches(
    requests: Sequence[Request], order: list[int], copies: int, budget: int
) -> list[list[int]]:
    """Runs of `order` whose padded batch (len x widest x copies) fits `budget` tokens; a
    request longer than the budget goes alone."""
    out: list[list[int]] = []
    cur: list[int] = []
    width = 0
    for i in order:
        w = max(width, len(requests[i].ids))
        if cur and (len(cur) + 1) * w * copies > budget:
            out.append(cur)
            cur, w = [], len(requests[i].ids)
        cur.append(i)
        width = w
    if cur:
        out.append(cur)
    return out


@torch.no_grad()
def score_requests(
    model: AdapterModel,
    requests: Sequence[Request],
    adapters: Sequence[str | None],
    *,
    pad_id: int,
    batch_tokens: int = DEFAULT_BATCH_TOKENS,
    progress: Progress | None = None,
) -> dict[str | None, list[list[float]]]:
    """For each adapter (None: the base), each request's target log-probabilities."""
    unknown = [a for a in adapters if a is not None and a not in model.specs]
    if unknown or not adapters or len(set(adapters)) < len(adapters):
        raise ValueError(
            f"adapters {list(adapters)}: name each once, and load {unknown} into the model first"
        )
    copies = len(adapters)
    dev = model.device
    out: dict[str | None, list[list[float]]] = {a: [[] for _ in requests] for a in adapters}
    order = sorted(range(len(requests)), key=lambda i: -len(requests[i].ids))
    done, total = 0, len(requests) * copies
    for chunk in _batches(requests, order, copies, batch_tokens):
        rows = len(chunk)
        width = max(len(requests[i].ids) for i in chunk)
        ids = torch.full((rows, width), pad_id, dtype=torch.long)  # (B, T)
        mask = torch.zeros((rows, width), dtype=torch.long)  # (B, T)
        row_of: list[int] = []
        pos_of: list[int] = []
        target_of: list[int] = []
        for b, i in enumerate(chunk):
            req = requests[i]
            ids[b, : len(req.ids)] = torch.tensor(req.ids)
            mask[b, : len(req.ids)] = 1
            row_of += [b] * len(req.at)
            pos_of += req.at
            target_of += req.targets
        ids, mask = ids.repeat(copies, 1), mask.repeat(copies, 1)  # (K * B, T): a copy per adapter
        segments = [Segment(a, k * rows, (k + 1) * rows) for k, a in enumerate(adapters)]
        with model.fused(segments, mask, training=False, collect_router=False, host_mask=mask):
            hidden = model.backbone(
                input_ids=ids.to(dev), attention_mask=mask.to(dev)
            ).last_hidden_state  # (K * B, T, H)
        n = len(row_of)
        rows_k = torch.tensor(row_of)[None, :] + rows * torch.arange(copies)[:, None]  # (K, n)
        picked = hidden[rows_k.reshape(-1).to(dev), torch.tensor(pos_of * copies, device=dev)]
        targets = torch.tensor(target_of * copies, device=dev)  # (K * n,)
        logprobs = (
            torch.cat(
                [
                    model.lm_head(picked[s : s + _PROJECT_ROWS])
                    .float()
                    .log_softmax(-1)
                    .gather(1, targets[s : s + _PROJECT_ROWS, None])
                    .squeeze(1)
                    for s in range(0, len(targets), _PROJECT_ROWS)
                ]
            )
            .view(copies, n)
            .tolist()
        )  # one device read per batch
        for k, a in enumerate(adapters):
            at = 0
            for i in chunk:
                m = len(requests[i].at)
                out[a][i] = logprobs[k][at : at + m]
                at += m
        done += rows * copies
        if progress is not None:
            progress(done, total)
    return out


def _task_result(
    task: Task,
    docs: list[DocRequests],
    logprobs: list[list[float]],
    adapter: str | None,
    protocol: str,
    num_fewshot: int,
) -> TaskResult:
    acc, acc_norm = [], []
    at = 0
    for d in docs:
        scores = d.choice_scores(logprobs[at : at + len(d.requests)])
        at += len(d.requests)
        acc.append(float(argmax(scores) == d.doc.gold))
        if d.norms is not None:
            normed = [s / n for s, n in zip(scores, d.norms, strict=True)]
            acc_norm.append(float(argmax(normed) == d.doc.gold))
    n = len(acc)
    return TaskResult(
        task=task.name,
        adapter=adapter,
        split=task.split,
        protocol=protocol,
        num_fewshot=num_fewshot,
        n=n,
        acc=sum(acc) / n,
        acc_stderr=mean_stderr(acc),
        acc_norm=sum(acc_norm) / n if acc_norm else None,
        acc_norm_stderr=mean_stderr(acc_norm) if acc_norm else None,
    )


def evaluate(
    model: AdapterModel,
    tokenizer: object,
    adapters: Sequence[str | None],
    tasks: Sequence[Task],
    *,
    protocol: str = "loglik",
    num_fewshot: int = 0,
    limit: int | None = None,
    batch_tokens: int = DEFAULT_BATCH_TOKENS,
    progress: Progress | None = None,
    fewshot_seed: int = FEWSHOT_SEED,
    rendering: str = "chat",
) -> EvalResults:
    """Score the base (adapter None) and each named adapter, already loaded into `model`, on
    the first `limit` questions of each task; every adapter sees the same requests in the
    same fused batches.

    `rendering` ("chat" or "plain"): how the adapters' training rows became text (the
    job's rendering, recorded with its adapter: mixloom.model.formats.read_metadata); the
    paper and cloze protocols ask in that form. Adapters of different renderings are
    scored in separate calls.

    Returns one TaskResult per (adapter, task), in the order given. Raises EvaluationError
    for a protocol, num_fewshot or limit it cannot take, or rows it cannot tokenise.
    """
    length = max_length(model.config, tokenizer)
    per_task = [
        build_requests(
            t,
            tokenizer,
            protocol=protocol,
            length=length,
            num_fewshot=num_fewshot,
            limit=limit,
            seed=fewshot_seed,
            rendering=rendering,
        )
        for t in tasks
    ]
    requests = [r for docs in per_task for d in docs for r in d.requests]
    scored = score_requests(
        model,
        requests,
        list(adapters),
        pad_id=pad_id_of(tokenizer),
        batch_tokens=batch_tokens,
        progress=progress,
    )
    results = []
    for a in adapters:
        at = 0
        for task, docs in zip(tasks, per_task, strict=True):
            count = sum(len(d.requests) for d in docs)
            lps = scored[a][at : at + count]
            at += count
            results.append(_task_result(task, docs, lps, a, protocol, num_fewshot))
    return EvalResults(tuple(results))
