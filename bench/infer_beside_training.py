"""A request's first token while a training job runs on the same worker: time to the first
token (TTFT) and the answer's tokens/s, with the worker idle and then while it trains, beside
the training job's step time and its step rate with and without the requests.

The target (issue 15): a request waits at most one training step for its first token (the
worker decodes between training steps, inference first). Starts `mixloom serve` (or `mixloom
api` + `mixloom worker` on Postgres and Redis with --mode api) on loopback and stops it.

  python bench/infer_beside_training.py                      # SmolLM2-135M, `mixloom serve`
  python bench/infer_beside_training.py --mode api           # Postgres + Redis, two processes

The peer is the same server with the worker idle (the first table row): what training
beside it adds to a request's first token.
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

from load_api import DATA, StepClock, pct, stack

from mixloom.clients import Client

PROMPTS = [
    "Name three colours.",
    "What is 12 times 7?",
    "Give one tip for sleeping well.",
    "Write a short greeting.",
]


def ask(client: Client, model: str, max_tokens: int) -> tuple[float, float | None, int]:
    """(TTFT s, tokens/s, completion tokens) of one streamed chat request."""
    stream = client.chat(
        model,
        [{"role": "user", "content": random.choice(PROMPTS)}],
        stream=True,
        max_tokens=max_tokens,
        temperature=0.7,
    )
    for _ in stream:
        pass
    if stream.time_to_first_token is None:
        sys.exit("an answer came back without text; use a real model (not --tiny's random one)")
    tokens = (stream.usage or {}).get("completion_tokens", 0)
    return stream.time_to_first_token, stream.tokens_per_second, tokens


def phase(
    client: Client, model: str, args: argparse.Namespace
) -> list[tuple[float, float | None, int]]:
    out = []
    for _ in range(args.requests):
        time.sleep(random.uniform(0, args.max_gap))  # land anywhere within a training step
        out.append(ask(client, model, args.max_tokens))
    return out


def step_seconds(client: Client, job_id: str, since_step: int) -> list[float]:
    return [
        m.metrics["step_seconds"]
        for m in client.iter_metrics(job_id)
        if m.step > since_step and "step_seconds" in m.metrics
    ]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--mode", choices=["serve", "api"], default="serve")
    p.add_argument("--tiny", action="store_true", help="the tiny test model instead of SmolLM2")
    p.add_argument("--requests", type=int, default=12, help="requests per phase")
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--max-gap", type=float, default=1.0, help="seconds between requests, at most")
    p.add_argument("--train-batch", type=int, default=4)
    p.add_argument("--train-seq-len", type=int, default=128)
    p.add_argument("--train-threads", type=int, default=2)
    p.add_argument("--quiet-seconds", type=float, default=15, help="training alone, for its rate")
    p.add_argument("--redis-url", default="redis://127.0.0.1:6379/0")
    p.add_argument("--log-level", default="warning")
    args = p.parse_args()
    # what load_api.stack reads
    args.model, args.env, args.pythonpath, args.api_workers, args.train = (
        "smollm2-135m",
        [],
        None,
        1,
        True,
    )
    random.seed(0)
    with (
        tempfile.TemporaryDirectory(prefix="mixloom-infer-train-") as tmp,
        stack(args, Path(tmp)) as (url, db_url),
    ):
        from mixloom.storage import tenants
        from mixloom.storage.db import Database

        db = Database.connect(db_url)
        with db.transaction() as session:
            t = tenants.create_tenant(session=session, name=f"bench-{random.randrange(10**9)}")
            key = tenants.create_api_key(session=session, tenant_id=t.id)[1]
        db.dispose()
        client = Client(url, api_key=key, timeout=600)
        model = client.list_models()[0].id
        ask(client, model, 4)  # the first forward allocates the KV cache: not measured
        idle = phase(client, model, args)

        f = client.upload_file(DATA)
        hp = {"r": 8, "n_epochs": 100, "batch_size": args.train_batch}
        hp["max_seq_len"] = args.train_seq_len
        job = client.create_job(
            training_file=f.id,
            model=model,
            method={"type": "lora", "lora": {"hyperparameters": hp}},
        )
        clock = StepClock(db_url, job.id)
        clock.wait_running(600)
        time.sleep(2)
        start = clock.last()
        time.sleep(args.quiet_seconds)
        quiet_rate = clock.rate_over(start)
        first_step = clock.last()
        assert first_step is not None
        busy = phase(client, model, args)
        busy_rate = clock.rate_over(first_step)
        steps = step_seconds(client, job.id, first_step[0])
        client.cancel_job(job.id)

    def row(name: str, runs: list[tuple[float, float | None, int]], steps: list[float]) -> str:
        ttft = [r[0] * 1000 for r in runs]
        rates = [r[1] for r in runs if r[1] is not None]
        step = (
            f"{statistics.median(steps) * 1000:,.0f} / {max(steps) * 1000:,.0f}" if steps else "-"
        )
        return (
            f"| {name} | {len(runs)} | {pct(ttft, 0.5):,.0f} | {pct(ttft, 0.95):,.0f} | "
            f"{max(ttft):,.0f} | {statistics.median(rates) if rates else 0:.1f} | {step} |"
        )

    print(
        f"\nmode {args.mode}, {'tiny' if args.tiny else 'SmolLM2-135M'}, {args.requests} "
        f"requests a phase, max_tokens {args.max_tokens}, training batch {args.train_batch} x "
        f"{args.train_seq_len} tokens"
    )
    print(
        "| worker | requests | TTFT p50 ms | p95 ms | max ms | answer tokens/s p50 | training step p50 / max ms |"
    )
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: |")
    print(row("idle", idle, []))
    print(row("training", busy, steps))
    worst = max(r[0] for r in busy)
    print(
        f"\ntraining: {quiet_rate:.2f} steps/s alone, {busy_rate:.2f} steps/s with the requests "
        f"({busy_rate / quiet_rate:.2f}x)"
    )
    if steps:
        print(
            f"worst first token while training: {worst * 1000:,.0f} ms = "
            f"{worst / max(steps):.2f} x the longest training step ({max(steps) * 1000:,.0f} ms)"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
