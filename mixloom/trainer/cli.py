"""`mixloom train` and `mixloom generate`: the trainer without the server (and generation
through it)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from mixloom.clients.cli import sampling_options


def register(sub: Any) -> None:
    p = sub.add_parser("train", help="train every job of a YAML/JSON config, fused on one base")
    p.add_argument("config", help="YAML or JSON: base_model, output_dir, dtype, jobs: [...]")
    p.add_argument("--resume", action="store_true", help="resume each job from its last checkpoint")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=_train)

    g = sub.add_parser(
        "generate",
        help="generate text: through the API (--model), or here with a base and an adapter",
    )
    where = g.add_mutually_exclusive_group()
    where.add_argument(
        "--model", help="a model the server serves (a base's id, or ft:... of yours): via the API"
    )
    where.add_argument("--adapter", help="an adapter folder (LoRA or MixLoRA), run here")
    g.add_argument("--base-model", default="smollm2-135m", help="here: the base model")
    g.add_argument(
        "--prompt", required=True, help="a user message (a raw prompt without a chat template)"
    )
    sampling_options(g)
    g.add_argument("--max-new-tokens", dest="max_tokens", type=int, help="the same as --max-tokens")
    g.set_defaults(max_tokens=64, temperature=0.0)
    g.add_argument("--dtype", default="auto", help="here: float32, bfloat16, float16, auto")
    g.add_argument("--device", default="auto", help="here: cpu, cuda, cuda:N, auto")
    g.add_argument("--base-url", help="via the API: the server (default $MIXLOOM_BASE_URL)")
    g.add_argument("--api-key", help="via the API: your key (default $MIXLOOM_API_KEY)")
    g.set_defaults(func=_generate)


def _train(args: argparse.Namespace) -> int:
    from mixloom.trainer.run import train

    statuses = train(args.config, resume=args.resume, progress=not args.no_progress)
    for name, status in statuses.items():
        print(f"{name}: {status}")
    return 0 if all(s == "succeeded" for s in statuses.values()) else 1


def _generate(args: argparse.Namespace) -> int:
    """The answer streams as it comes, then its tokens, tokens/s and time to the first token
    (stderr). Here, the decoding engine the server uses runs it (a KV cache, one request)."""
    from mixloom.clients.cli import generation_stats, print_stream

    messages = [{"role": "user", "content": args.prompt}]
    params = {"max_tokens": args.max_tokens, "temperature": args.temperature, "top_p": args.top_p}
    if args.seed is not None:
        params["seed"] = args.seed
    if args.model:
        from mixloom.clients import Client

        with Client(args.base_url, args.api_key) as client:
            print_stream(client.chat(args.model, messages, stream=True, **params))
        return 0

    from mixloom.inference import EngineConfig, InferenceEngine, SamplingParams
    from mixloom.inference.chat import chat_prompt_ids
    from mixloom.model.adapter_model import AdapterModel
    from mixloom.model.base import load_base_model

    print(f"loading {args.base_model} ...", file=sys.stderr)
    base = load_base_model(args.base_model, dtype=args.dtype, device=args.device)
    tok = base.tokenizer
    adapter = Path(args.adapter) if args.adapter else None
    engine = InferenceEngine(
        AdapterModel(base.model),
        tok,
        lambda key: adapter if key == "adapter" else None,
        EngineConfig(max_running=1, max_n=1, kv_cache_tokens=4096),
    )
    prompt: str | list[int] = args.prompt
    if getattr(tok, "chat_template", None):
        prompt = chat_prompt_ids(tok, messages)
    handle = engine.submit("adapter" if adapter else "base", prompt, SamplingParams(**params))
    engine.start()
    first = last = None
    try:
        for delta in handle:
            sys.stdout.write(delta.text)
            sys.stdout.flush()
            first = first or delta.time
            last = delta.time
        sys.stdout.write("\n")
    finally:
        engine.stop()
    tokens = handle.result().usage.completion_tokens
    rate = (tokens - 1) / (last - first) if first and last and last > first and tokens > 1 else None
    print(
        generation_stats(tokens, first - handle.submitted if first else None, rate), file=sys.stderr
    )
    return 0
