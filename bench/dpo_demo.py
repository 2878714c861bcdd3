"""DPO end to end over HTTP on SmolLM2-135M with the demo preference data: a LoRA and a
MixLoRA DPO job trained fused by `mixloom serve`, each scored on held-out pairs (reward
accuracy: the share of pairs whose preferred answer gains more likelihood against the base
than the other one), their adapters downloaded and loaded in PEFT (LoRA) and the `mixlora`
package (MixLoRA) with the logits mixloom gives.

  python bench/dpo_demo.py                          # examples/data/dpo_demo*.jsonl, 2-core CPU
  python bench/dpo_demo.py --max-tokens 1024 --epochs 2

The demo's answers run to 4,577 tokens; a pair cut by max_seq_len is refused (a cut answer
is not the one that was judged), so the pairs longer than --max-tokens are left out here and
the table says how many remain. The held-out pairs (dpo_demo_valid.jsonl, the demo's last
30) are never trained on. Starts the server on loopback and stops it.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import tempfile
import time
from pathlib import Path

from load_api import REPO, stack

from mixloom.clients import Client

DATA = REPO / "examples" / "data"


def fitting(src: Path, dst: Path, max_tokens: int, most: int | None = None) -> tuple[int, int]:
    """The first `most` pairs of `src` whose prompt and longer answer fit in max_tokens,
    written to `dst`: (kept, given)."""
    from mixloom.data.formats import load_jsonl
    from mixloom.data.tokenize import encode_preferences
    from mixloom.model.base import load_base_model

    tok = load_base_model("smollm2-135m", device="cpu").tokenizer
    lines = [line for line in src.read_text().splitlines() if line.strip()]
    pairs = encode_preferences(load_jsonl(src), tok, max_seq_len=1 << 30)
    kept = [
        line
        for line, p in zip(lines, pairs, strict=True)
        if max(len(p.chosen.input_ids), len(p.rejected.input_ids)) <= max_tokens
    ]
    kept = kept[:most]
    dst.write_text("".join(line + "\n" for line in kept))
    return len(kept), len(lines)


def logits_agree(adapter: Path, kind: str, base_path: str) -> float:
    """The largest difference between mixloom's logits and PEFT's (LoRA) or the `mixlora`
    package's (MixLoRA) for the downloaded adapter, on one prompt."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from mixloom import load_adapter_model
    from mixloom.interop import mixlora_eval, write_mixlora_bin

    tok = AutoTokenizer.from_pretrained(base_path)
    ids = tok("What is the capital of France? Answer briefly.", return_tensors="pt").input_ids
    ours = load_adapter_model(base_path, adapter, dtype="float32", device="cpu")
    if kind == "lora":
        from peft import PeftModel

        base = AutoModelForCausalLM.from_pretrained(base_path, dtype=torch.float32)
        theirs = PeftModel.from_pretrained(base, str(adapter)).eval()
    else:
        from mixlora import MixLoraModelForCausalLM

        # the archive names the base by its hub id; this machine has it as a folder
        config = adapter / "adapter_config.json"
        cfg = json.loads(config.read_text())
        cfg["base_model_name_or_path"] = base_path
        config.write_text(json.dumps(cfg))
        write_mixlora_bin(adapter)
        theirs, _ = MixLoraModelForCausalLM.from_pretrained(str(adapter), torch_dtype=torch.float32)
        theirs = mixlora_eval(theirs)
    with torch.no_grad():
        return float((ours(input_ids=ids).logits - theirs(input_ids=ids).logits).abs().max())


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument(
        "--max-tokens", type=int, default=768, help="longest pair kept (and max_seq_len)"
    )
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--train-pairs", type=int, help="the first N training pairs that fit")
    p.add_argument("--batch-size", type=int, default=8, help="pairs per optimizer step")
    p.add_argument("--micro-batch-size", type=int, default=2)
    p.add_argument("--lr", type=float, default=5e-4)
    p.add_argument("--beta", type=float, default=0.1)
    p.add_argument("--train-threads", type=int, default=2)
    p.add_argument("--log-level", default="warning")
    args = p.parse_args()
    args.mode, args.tiny, args.model, args.env = "serve", False, "smollm2-135m", []
    args.pythonpath, args.api_workers, args.train = None, 1, True
    started = time.time()
    with tempfile.TemporaryDirectory(prefix="mixloom-dpo-demo-") as tmp_name:
        tmp = Path(tmp_name)
        train, valid = tmp / "train.jsonl", tmp / "valid.jsonl"
        n_train = fitting(DATA / "dpo_demo.jsonl", train, args.max_tokens, args.train_pairs)
        n_valid = fitting(DATA / "dpo_demo_valid.jsonl", valid, args.max_tokens)
        print(f"pairs within {args.max_tokens} tokens: train {n_train}, held out {n_valid}")
        with stack(args, tmp) as (url, db_url):
            from mixloom.storage import tenants
            from mixloom.storage.db import Database

            db = Database.connect(db_url)
            with db.transaction() as session:
                t = tenants.create_tenant(session=session, name=f"dpo-{random.randrange(10**9)}")
                key = tenants.create_api_key(session=session, tenant_id=t.id)[1]
            db.dispose()
            client = Client(url, api_key=key, timeout=600)
            training, validation = client.upload_file(train).id, client.upload_file(valid).id
            training_hp = {
                "beta": args.beta,
                "n_epochs": args.epochs,
                "batch_size": args.batch_size,
                "micro_batch_size": args.micro_batch_size,
                "learning_rate": args.lr,
                "max_seq_len": args.max_tokens,
            }
            adapters = {
                "lora": {"type": "lora", "hyperparameters": {"r": 16, "lora_alpha": 32}},
                "mixlora": {
                    "type": "mixlora",
                    "hyperparameters": {"r": 8, "lora_alpha": 16, "num_experts": 4, "top_k": 2},
                },
            }
            jobs = {
                kind: client.create_job(
                    training_file=training,
                    validation_file=validation,
                    method={"type": "dpo", "dpo": {"hyperparameters": training_hp, "adapter": a}},
                    seed=0,
                    suffix=f"dpo-{kind}",
                ).id
                for kind, a in adapters.items()
            }
            done = {}
            while len(done) < len(jobs):
                for kind, job_id in jobs.items():
                    job = client.get_job(job_id)
                    if job.status in ("succeeded", "failed", "cancelled"):
                        done[kind] = job
                rows = {k: list(client.iter_metrics(j)) for k, j in jobs.items()}
                line = "  ".join(
                    f"{k} step {r[-1].step}/{r[-1].metrics.get('total_steps')} "
                    f"loss {r[-1].metrics.get('train_loss'):.3f} "
                    f"acc {r[-1].metrics.get('reward_accuracy'):.2f}"
                    for k, r in rows.items()
                    if r
                )
                print(f"{time.time() - started:6.0f} s  {line}", flush=True)
                time.sleep(20)
            results = {}
            for kind, job in done.items():
                if job.status != "succeeded":
                    print(f"{kind}: {job.status} {job.raw.get('error')}")
                    return 1
                last = list(client.iter_metrics(job.id))[-1].metrics
                folder = client.download_adapter(job.id, tmp / f"{kind}/", extract=True)
                results[kind] = (job, last, folder)
            # downloads name the base by its hub id only; here it is the embedded copy's folder
            from mixloom.model.base import load_base_model

            base_path = load_base_model("smollm2-135m", device="cpu").name_or_path
        print(
            f"\nSmolLM2-135M, DPO beta {args.beta}, {args.epochs} epoch(s) of {n_train[0]} pairs "
            f"(batch {args.batch_size}, lr {args.lr:g}, max_seq_len {args.max_tokens}), "
            f"held-out pairs {n_valid[0]}, {time.time() - started:.0f} s in all\n"
        )
        print(
            "| adapter | steps | final DPO loss | held-out loss | held-out reward accuracy "
            "| logits vs peer (max abs diff) |"
        )
        print("|---|---:|---:|---:|---:|---:|")
        for kind, (_job, last, folder) in results.items():
            diff = logits_agree(folder, kind, base_path)
            peer = "PEFT" if kind == "lora" else "mixlora"
            print(
                f"| {kind} | {last['total_steps']} | {last['train_loss']:.4f} | "
                f"{last.get('valid_loss', float('nan')):.4f} | "
                f"{last.get('valid_reward_accuracy', float('nan')):.3f} | {peer} {diff:.2e} |"
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
