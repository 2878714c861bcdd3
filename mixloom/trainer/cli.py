"""`mixloom train` and `mixloom generate`: the trainer without the server."""

from __future__ import annotations

import argparse
import sys
from typing import Any


def register(sub: Any) -> None:
    p = sub.add_parser("train", help="train every job of a YAML/JSON config, fused on one base")
    p.add_argument("config", help="YAML or JSON: base_model, output_dir, dtype, jobs: [...]")
    p.add_argument("--resume", action="store_true", help="resume each job from its last checkpoint")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=_train)

    g = sub.add_parser("generate", help="generate text with a base model and a trained adapter")
    g.add_argument("--base-model", default="smollm2-135m")
    g.add_argument("--adapter", required=True, help="adapter folder (LoRA or MixLoRA)")
    g.add_argument("--prompt", required=True)
    g.add_argument("--max-new-tokens", type=int, default=64)
    g.add_argument("--temperature", type=float, default=0.0)
    g.add_argument("--dtype", default="auto")
    g.add_argument("--device", default="auto")
    g.set_defaults(func=_generate)


def _train(args: argparse.Namespace) -> int:
    from mixloom.trainer.run import train

    statuses = train(args.config, resume=args.resume, progress=not args.no_progress)
    for name, status in statuses.items():
        print(f"{name}: {status}")
    return 0 if all(s == "succeeded" for s in statuses.values()) else 1


def _generate(args: argparse.Namespace) -> int:
    import torch

    from mixloom.model.base import load_base_model
    from mixloom.model.formats import load_adapter_model

    base = load_base_model(args.base_model, dtype=args.dtype, device=args.device)
    model = load_adapter_model(base, args.adapter)
    tok = base.tokenizer
    if getattr(tok, "chat_template", None):
        text = tok.apply_chat_template(
            [{"role": "user", "content": args.prompt}], tokenize=False, add_generation_prompt=True
        )
    else:
        text = args.prompt
    ids = torch.tensor([tok.encode(text, add_special_tokens=False)], device=base.device)
    out = model.generate(
        ids,
        max_new_tokens=args.max_new_tokens,
        temperature=args.temperature,
        eos_token_id=tok.eos_token_id,
    )
    sys.stdout.write(tok.decode(out[0, ids.shape[1] :], skip_special_tokens=True) + "\n")
    return 0
