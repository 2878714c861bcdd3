"""The demo client (run by scripts/demo.sh against `mixloom serve`): upload a small real data
set, submit a LoRA and a MixLoRA job, watch them train together, download both adapters.

Everything goes through the HTTP API with mixloom's Python client.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import zipfile
from pathlib import Path

import httpx

from mixloom.clients import Client

REPO = Path(__file__).resolve().parents[1]
DATA = REPO / "examples" / "data" / "alpaca_demo_200.jsonl"


def wait_for_server(url: str, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            if httpx.get(f"{url}/healthz", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        if time.monotonic() > deadline:
            sys.exit(f"the server at {url} did not come up in {timeout:.0f} s")
        time.sleep(0.5)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--url", required=True)
    p.add_argument("--api-key", required=True)
    p.add_argument("--out", type=Path, required=True, help="adapters are downloaded here")
    p.add_argument("--steps", type=int, default=6, help="optimizer steps per job")
    p.add_argument("--timeout", type=float, default=3600)
    args = p.parse_args()

    wait_for_server(args.url)
    client = Client(args.url, api_key=args.api_key, timeout=60)
    model = client.list_models()[0].id
    rows = DATA.read_text().splitlines()
    val_path = args.out / "validation.jsonl"
    val_path.write_text("\n".join(rows[-16:]) + "\n")
    train = client.upload_file(DATA)
    val = client.upload_file(val_path)
    print(f"uploaded {train.filename}: {train.id}; validation {val.id}; base model {model}")

    common = {
        "r": 8,
        "lora_alpha": 16,
        "batch_size": 2,
        "max_seq_len": 128,
        "max_steps": args.steps,
        "learning_rate": 1e-3,
        "warmup_ratio": 0.0,
        "checkpoint_every": max(1, args.steps // 2),
    }
    submitted = {
        "lora": client.create_job(
            training_file=train.id,
            validation_file=val.id,
            model=model,
            method="lora",
            hyperparameters={**common, "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj"]},
            suffix="demo-lora",
            seed=1,
        ),
        "mixlora": client.create_job(
            training_file=train.id,
            validation_file=val.id,
            model=model,
            method="mixlora",
            hyperparameters={**common, "num_experts": 4, "top_k": 2},
            suffix="demo-mixlora",
            seed=2,
        ),
    }
    names = {job.id: name for name, job in submitted.items()}
    for name, job in submitted.items():
        print(f"submitted {name}: {job.id} ({job.status})")

    last_step = dict.fromkeys(names, 0)
    seen: set[str] = set()
    fused_steps = 0
    tps: list[float] = []
    deadline = time.monotonic() + args.timeout
    finished: dict[str, str] = {}
    while len(finished) < len(names):
        if time.monotonic() > deadline:
            print("timed out", file=sys.stderr)
            return 1
        for job_id, name in names.items():
            for m in client.list_metrics(job_id, after=last_step[job_id], limit=100).data:
                last_step[job_id] = m.step
                v = m.metrics
                shared = v.get("shared_with", 0)
                fused_steps += bool(shared)
                tps.append(float(v.get("step_tokens_per_second", 0.0)))
                load = v.get("router_load")
                print(
                    f"[{name}] step {m.step}/{v['total_steps']} loss {v['train_loss']:.3f} "
                    f"lr {v['learning_rate']:.2e} {v['tokens_per_second']:.0f} tok/s "
                    f"(fused step {v['step_tokens_per_second']:.0f} tok/s) "
                    f"shared with {shared or 'no'} other job(s)"
                    + (f" router load {load}" if load else "")
                    + (f" eta {v['eta_seconds']:.0f}s" if v.get("eta_seconds") else "")
                    + (f" valid_loss {v['valid_loss']:.3f}" if "valid_loss" in v else "")
                )
            for event in reversed(client.list_events(job_id, limit=20).data):
                if event.id not in seen:
                    seen.add(event.id)
                    print(f"[{name}] {event.message}")
            job = client.get_job(job_id)
            if job.status in ("succeeded", "failed", "cancelled") and job_id not in finished:
                finished[job_id] = job.status
                print(f"[{name}] {job.status}" + (f": {job.error}" if job.error else ""))
        time.sleep(1.0)

    if set(finished.values()) != {"succeeded"}:
        return 1
    adapters = args.out / "adapters"
    adapters.mkdir(parents=True, exist_ok=True)
    summary = {}
    for job_id, name in names.items():
        archive = client.download_adapter(job_id, adapters / f"{name}.zip")
        folder = adapters / name
        with zipfile.ZipFile(archive) as zf:
            zf.extractall(folder)
            files = sorted(zf.namelist())
        config = json.loads((folder / "adapter_config.json").read_text())
        summary[name] = {"job": job_id, "zip": str(archive), "peft_type": config["peft_type"]}
        print(f"downloaded {name}: {archive} -> {folder} {files} ({config['peft_type']})")
    mean = sum(tps) / len(tps) if tps else 0.0
    print(
        f"both jobs trained together in {fused_steps} metric steps that shared a fused step; "
        f"mean fused-step throughput {mean:.0f} tokens/s"
    )
    (args.out / "summary.json").write_text(json.dumps(summary, indent=2))
    print(
        f"try one: mixloom generate --adapter {adapters / 'mixlora'} "
        '--prompt "Give three tips for staying healthy."'
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
