"""MoE-PEFT 2.0.2 side of bench_e2e.py: K MixLoRA jobs trained fused, one step = one batch.

Runs in bench/.venv-moe-peft (its own transformers 4.46); bench_e2e.py starts it with one JSON
argument and reads the line "RESULT {...}". Driven as PEERS.md describes, without its data
pipeline. Model folder saved by this venv's transformers (so rope_theta survives).
"""

from __future__ import annotations

import json
import os
import resource
import sys
import tempfile
import time

import torch

PROJECTIONS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def main() -> None:
    a = json.loads(sys.argv[1])
    cuda = torch.cuda.is_available()
    os.environ.setdefault("MOE_PEFT_EXECUTOR_TYPE", "CUDA" if cuda else "CPU")
    import moe_peft
    from moe_peft.common import LLMBatchConfig, LLMModelInput
    from transformers import LlamaConfig, LlamaForCausalLM

    dtype = getattr(torch, a["dtype"])
    jobs, tokens = a["jobs"], a["tokens"]
    with tempfile.TemporaryDirectory() as path:
        torch.manual_seed(0)
        cfg = LlamaConfig(**a["model"], tie_word_embeddings=False)
        with torch.device("cuda" if cuda else "cpu"):
            LlamaForCausalLM(cfg).to(dtype).save_pretrained(path)
        if cuda:
            torch.cuda.empty_cache()
        model = moe_peft.LLMModel.from_pretrained(
            path, device="cuda:0" if cuda else "cpu", load_dtype=dtype, compute_dtype=dtype,
            attn_impl="eager",
        )  # fmt: skip
    names = [f"t{i}" for i in range(jobs)]
    opts = []
    for n in names:
        cfg = moe_peft.adapters.lora_config_factory(
            {
                "name": n, "task_name": "casual", "r": 16, "lora_alpha": 32,
                "lora_dropout": 0.05, "target_modules": {m: True for m in PROJECTIONS},
                "peft_type": "MIXLORA", "routing_strategy": "mixlora", "num_experts": 8,
                "top_k": 2,
            }
        )  # fmt: skip
        model.init_adapter(cfg)
        params = list(model.get_adapter_weight_dict(n).values())
        opts.append(torch.optim.AdamW(params, lr=1e-4))
    per_job = tokens // jobs
    g = torch.Generator().manual_seed(1)
    rows = [torch.randint(3, a["model"]["vocab_size"], (per_job,), generator=g).tolist()
            for _ in range(jobs)]  # fmt: skip

    def step() -> None:
        # A fresh input each step: MoE-PEFT's forward clears the tokens of the one it gets.
        batch = LLMModelInput(
            batch_configs_=[
                LLMBatchConfig(adapter_name_=n, batch_start_idx_=i, batch_end_idx_=i + 1)
                for i, n in enumerate(names)
            ],
            batch_tokens_=[list(r) for r in rows],
            batch_labels_=[list(r) for r in rows],
            batch_masks_=[[True] * per_job for _ in rows],
        )
        outs = model(batch)
        loss = sum(o.loss + (o.aux_loss if o.aux_loss is not None else 0) for o in outs)
        loss.backward()
        for opt in opts:
            opt.step()
            opt.zero_grad(set_to_none=True)

    for _ in range(a["warmup"]):
        step()
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    sync()
    t0 = time.perf_counter()
    for _ in range(a["steps"]):
        step()
    sync()
    sec = (time.perf_counter() - t0) / a["steps"]
    peak = (
        torch.cuda.max_memory_allocated() / 2**20
        if cuda
        else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    )
    print("RESULT " + json.dumps(dict(seconds_per_step=sec, peak_mib=peak)), flush=True)


if __name__ == "__main__":
    main()
