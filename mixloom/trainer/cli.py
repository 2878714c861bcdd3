"""`mixloom train` and `mixloom generate`: the trainer without the server (and generation
through it)."""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path
from typing import Any

from mixloom.clients.cli import sampling_options


def register(sub: Any) -> None:
    p = sub.add_parser(
        "train",
        help="train every job of a YAML/JSON config, fused on one base (data parallel over "
        "GPUs or machines under torchrun: torchrun --nproc-per-node N -m mixloom train CONFIG)",
    )
    p.add_argument(
        "config",
        help="YAML or JSON: base_model, output_dir, dtype, jobs: [...]; paths in it are "
        "relative to the config file",
    )
    p.add_argument("--resume", action="store_true", help="resume each job from its last checkpoint")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=_train)

    pr = sub.add_parser(
        "prepare",
        help="get a base model ready before the first serve, worker or train (the embedded "
        "default is converted from GGUF once: about a minute)",
    )
    pr.add_argument(
        "base_model",
        nargs="?",
        default=None,
        help="smollm2-135m, a Hugging Face folder or hub id (default: $MIXLOOM_BASE_MODEL, "
        "else smollm2-135m)",
    )
    pr.set_defaults(func=_prepare)

    g = sub.add_parser(
        "generate",
        help="generate text: through the API (--model), or here with a base and an adapter",
    )
    where = g.add_mutually_exclusive_group()
    where.add_argument(
        "--model", help="a model the server serves (a base's id, or ft:... of yours): via the API"
    )
    where.add_argument(
        "--adapter",
        help="an adapter folder or downloaded .zip (LoRA or MixLoRA), run here on this machine",
    )
    g.add_argument(
        "--base-model",
        help="here: the base model (smollm2-135m, a Hugging Face folder or hub id); default: "
        "the one the adapter names (its folder where this machine has it, else its hub id), "
        "or smollm2-135m without an adapter",
    )
    g.add_argument(
        "--prompt",
        required=True,
        help="what to answer: a user message, rendered as the adapter was trained (the chat "
        "template, or plain text for an adapter trained with rendering: plain)",
    )
    sampling_options(g)
    g.add_argument("--max-new-tokens", dest="max_tokens", type=int, help="the same as --max-tokens")
    g.set_defaults(max_tokens=64, temperature=0.0)
    g.add_argument(
        "--dtype", default="auto", help="here: float32, bfloat16, float16 or auto (the default)"
    )
    g.add_argument("--device", default="auto", help="here: cpu, cuda, cuda:N or auto (the default)")
    g.add_argument("--base-url", help="via the API: the server (default $MIXLOOM_BASE_URL)")
    g.add_argument("--api-key", help="via the API: your key (default $MIXLOOM_API_KEY)")
    g.set_defaults(func=_generate)


def _prepare(args: argparse.Namespace) -> int:
    """Load the base once (converting the embedded default on first use), then say where it
    is and the name adapters trained on it will give it."""
    from mixloom.config import get_settings
    from mixloom.model.base import load_base_model

    settings = get_settings()
    base = load_base_model(
        args.base_model or settings.base_model,
        device="cpu",
        hub_id=settings.base_model_hub_id,
    )
    print(f"ready: {base.name_or_path} (adapters name it {base.hub_id})")
    return 0


def _train(args: argparse.Namespace) -> int:
    from mixloom.trainer.run import train

    statuses = train(args.config, resume=args.resume, progress=not args.no_progress)
    for name, status in statuses.items():
        print(f"{name}: {status}")
    return 0 if all(s == "succeeded" for s in statuses.values()) else 1


def _generate(args: argparse.Namespace) -> int:
    """The answer streams as it comes, then its tokens, tokens/s and time to the first token
    (stderr). Here, the decoding engine the server uses runs it (a KV cache, one request)."""
    from mixloom.clients.cli import print_stream

    messages = [{"role": "user", "content": args.prompt}]
    params = {"max_tokens": args.max_tokens, "temperature": args.temperature, "top_p": args.top_p}
    if args.seed is not None:
        params["seed"] = args.seed
    if args.model:
        from mixloom.clients import Client

        with Client(args.base_url, args.api_key) as client:
            print_stream(client.chat(args.model, messages, stream=True, **params))
        return 0

    from mixloom.model.formats import adapter_folder

    with tempfile.TemporaryDirectory(prefix="mixloom-adapter-") as tmp:
        adapter = adapter_folder(args.adapter, Path(tmp)) if args.adapter else None
        return _generate_here(args, messages, params, adapter)


def _generate_here(
    args: argparse.Namespace,
    messages: list[dict[str, str]],
    params: dict[str, Any],
    adapter: Path | None,
) -> int:
    from mixloom.clients.cli import generation_stats
    from mixloom.inference import EngineConfig, InferenceEngine, SamplingParams
    from mixloom.inference.chat import chat_prompt_ids
    from mixloom.model.adapter_model import AdapterModel
    from mixloom.model.base import DEFAULT_MODEL_ID, load_base_model
    from mixloom.model.formats import adapter_base, read_metadata

    base_model = args.base_model or (adapter_base(adapter) if adapter else DEFAULT_MODEL_ID)
    rendering = read_metadata(adapter).rendering if adapter else "chat"
    print(f"loading {base_model} ...", file=sys.stderr)
    base = load_base_model(base_model, dtype=args.dtype, device=args.device)
    tok = base.tokenizer
    engine = InferenceEngine(
        AdapterModel(base.model),
        tok,
        lambda key: adapter if key == "adapter" else None,
        EngineConfig(max_running=1, max_n=1, kv_cache_tokens=4096),
    )
    prompt: str | list[int] = args.prompt
    if rendering == "chat" and getattr(tok, "chat_template", None):
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
