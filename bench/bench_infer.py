"""Multi-adapter decoding throughput and latency, side by side: mixloom's engine vs PEFT.

Workload: K adapters x M concurrent requests (request i uses adapter i % K), every prompt
`prompt` random tokens, every request `max_tokens` greedy tokens (end-of-sequence ignored, so
every system does the same work), all submitted at once on a random-init LLaMA-shaped model.

Systems, one after another in this process, each on its own copy of the same base:
- mixloom-lora:    mixloom's engine (mixloom/inference), K LoRA adapters, one mixed batch:
                   continuous batching, chunked prefill of `--batch-tokens` a step, paged KV.
- peft-mixed:      PEFT 0.21 `generate(..., adapter_names=[...])`: the same LoRA requests in
                   one padded batch, each row through its own adapter (PEFT's mixed batch).
- peft-sequential: PEFT, one adapter after another (`set_adapter`, then a batch of that
                   adapter's requests): what serving without mixed batches does.
- mixloom-mixlora: mixloom's engine, K MixLoRA adapters (experts top-2), one mixed batch.
                   No peer batches several MixLoRA adapters (`mixlora` loads one per model).

On a CPU, glibc keeps freed memory for reuse (trainer/host.py), for every system alike.
Each system runs `--rounds` timed rounds after its warm-up; the table shows the round of
median tokens/s and lists every round's (this machine's neighbours make single runs noisy).
Adapters are loaded before the clock starts (mixloom: a warm-up request per adapter; PEFT:
load_adapter). Measured: generated tokens/s over the wall time from submission to the last
token; time to first token (TTFT) of each request from the common submission time; the gaps
between a request's consecutive tokens (inter-token latency, ITL), p50 and p95 over all.
PEFT's times come from a generate streamer (one timestamp a step for the whole batch).

Configs: `cpu` is PEERS.md's CPU proxy shape (hidden 576, 4 layers, vocab 49152, fp32),
`tiny` checks the script in seconds, `gpu` is the LLaMA-2-7B shape in bf16.

Usage: python bench/bench_infer.py [--config cpu|gpu|tiny] [--adapters 1 8 32] [--requests M]
           [--prompt N] [--max-tokens N] [--batch-tokens N] [--rounds N]
           [--systems mixloom-lora peft-mixed peft-sequential mixloom-mixlora] [--json PATH]
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

# PEFT touches torch.distributed.tensor without importing it (PEERS.md)
import torch.distributed.tensor  # noqa: E402, F401

from mixloom import kernels  # noqa: E402
from mixloom.inference import EngineConfig, InferenceEngine, SamplingParams  # noqa: E402
from mixloom.model.adapter_model import AdapterModel  # noqa: E402
from mixloom.model.formats import save_adapter  # noqa: E402
from mixloom.model.specs import AdapterSpec, LoraSpec  # noqa: E402
from mixloom.trainer.host import tune_cpu_allocator  # noqa: E402

PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
SYSTEMS = ("mixloom-lora", "peft-mixed", "peft-sequential", "mixloom-mixlora")

CONFIGS: dict[str, dict[str, Any]] = {
    "gpu": dict(
        model=dict(
            hidden_size=4096,
            intermediate_size=11008,
            num_hidden_layers=32,
            num_attention_heads=32,
            num_key_value_heads=32,
            vocab_size=32000,
            max_position_embeddings=4096,
        ),
        dtype="bfloat16",
        rank=16,
        experts=8,
        prompt=256,
        max_tokens=128,
        requests=32,
        batch_tokens=2048,
    ),
    "cpu": dict(
        model=dict(
            hidden_size=576,
            intermediate_size=1536,
            num_hidden_layers=4,
            num_attention_heads=9,
            num_key_value_heads=3,
            vocab_size=49152,
            max_position_embeddings=2048,
        ),
        dtype="float32",
        rank=8,
        experts=8,
        prompt=64,
        max_tokens=32,
        requests=8,
        batch_tokens=512,
    ),
    "tiny": dict(
        model=dict(
            hidden_size=64,
            intermediate_size=96,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            vocab_size=256,
            max_position_embeddings=256,
        ),
        dtype="float32",
        rank=4,
        experts=4,
        prompt=16,
        max_tokens=8,
        requests=4,
        batch_tokens=64,
    ),
}


@dataclass
class Row:
    system: str
    adapters: int
    requests: int
    tokens: int  # generated
    seconds: float
    cpu_seconds: float  # the process's CPU time over the same span (all its threads)
    ttft: list[float]  # per request
    itl: list[float]  # every gap between two tokens of a request

    @property
    def tokens_per_second(self) -> float:
        return self.tokens / self.seconds

    @property
    def busy(self) -> float:
        """CPU time over wall time x torch's threads: well under 1 on an idle CPU means the
        process waited, on a shared machine for its neighbours (or on a GPU for the device)."""
        return self.cpu_seconds / (self.seconds * torch.get_num_threads())

    def summary(self) -> dict[str, Any]:
        return {
            "system": self.system,
            "adapters": self.adapters,
            "requests": self.requests,
            "tokens": self.tokens,
            "seconds": round(self.seconds, 3),
            "busy": round(self.busy, 2),
            "tokens_per_second": round(self.tokens_per_second, 1),
            "ttft_p50_ms": round(1e3 * _pct(self.ttft, 50), 1),
            "ttft_p95_ms": round(1e3 * _pct(self.ttft, 95), 1),
            "itl_p50_ms": round(1e3 * _pct(self.itl, 50), 1),
            "itl_p95_ms": round(1e3 * _pct(self.itl, 95), 1),
        }


def _pct(values: list[float], q: int) -> float:
    if len(values) < 2:
        return values[0] if values else float("nan")
    return statistics.quantiles(values, n=100, method="inclusive")[q - 1]


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def make_base(cfg: dict[str, Any], device: torch.device) -> Any:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    with torch.device(device):
        model = LlamaForCausalLM(LlamaConfig(**cfg["model"], tie_word_embeddings=False))
    model = model.to(getattr(torch, cfg["dtype"])).eval().requires_grad_(False)
    model.generation_config.eos_token_id = None  # every system generates max_tokens
    return model


def lora_spec(name: str, cfg: dict[str, Any]) -> AdapterSpec:
    r = cfg["rank"]
    return AdapterSpec(name, kind="lora", targets=PROJECTIONS, lora=LoraSpec(r=r, alpha=2 * r))


def mixlora_spec(name: str, cfg: dict[str, Any]) -> AdapterSpec:
    lora = LoraSpec(r=cfg["rank"], alpha=2 * cfg["rank"])
    return AdapterSpec(
        name, kind="mixlora", targets=PROJECTIONS, lora=lora, expert=lora,
        num_experts=cfg["experts"], top_k=2,
    )  # fmt: skip


def export(base: Any, specs: list[AdapterSpec], out: Path) -> list[Path]:
    """Each adapter with trained-like (nonzero) weights, in mixloom's export format."""
    model = AdapterModel(copy.deepcopy(base).cpu().float())
    folders = []
    g = torch.Generator().manual_seed(1)
    for spec in specs:
        model.add_adapter(spec)
        with torch.no_grad():
            for p in model.adapter_parameters(spec.name):
                p.add_(torch.randn(p.shape, generator=g) * 0.02)
        folders.append(save_adapter(model, spec.name, out / spec.name, "bench-base"))
        model.remove_adapter(spec.name)
    return folders


def prompts(cfg: dict[str, Any], m: int, vocab: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(2)
    return torch.randint(3, vocab, (m, cfg["prompt"]), generator=g).tolist()


# -- mixloom ---------------------------------------------------------------------------


def run_mixloom(
    name: str, base: Any, folders: list[Path], cfg: dict[str, Any], m: int, device: torch.device
) -> list[Row]:
    model = AdapterModel(copy.deepcopy(base), backend=kernels.resolve_backend("auto", device))
    ids = {f"a{k}": f for k, f in enumerate(folders)}
    need = m * (cfg["prompt"] + cfg["max_tokens"] + 16)
    engine = InferenceEngine(
        model,
        _NoText(),
        ids.__getitem__,
        EngineConfig(
            max_batch_tokens=cfg["batch_tokens"],
            max_running=min(m, cfg["batch_tokens"]),
            max_n=1,
            kv_cache_tokens=need,
            adapter_cache_bytes=1 << 40,
        ),
    )
    params = SamplingParams(max_tokens=cfg["max_tokens"], temperature=0.0, ignore_eos=True)
    short = SamplingParams(max_tokens=2, temperature=0.0, ignore_eos=True)
    for model_id in ids:  # warm-up: every adapter loaded, the kernels compiled
        engine.submit(model_id, prompts(cfg, 1, model.config.vocab_size)[0], short)
    while engine.has_work:
        engine.step()
    work = prompts(cfg, m, model.config.vocab_size)
    rows = []
    for _ in range(cfg["rounds"]):
        _sync(device)
        t0, c0 = time.perf_counter(), time.process_time()
        handles = [engine.submit(f"a{i % len(ids)}", p, params) for i, p in enumerate(work)]
        while engine.has_work:
            engine.step()
        _sync(device)
        seconds, cpu = time.perf_counter() - t0, time.process_time() - c0
        ttft, itl, tokens = [], [], 0
        for h in handles:
            times = [d.time for d in h]
            tokens += len(times)
            ttft.append(times[0] - t0)
            itl += [b - a for a, b in zip(times, times[1:], strict=False)]
        rows.append(Row(name, len(folders), m, tokens, seconds, cpu, ttft, itl))
    engine.close()
    return rows


class _NoText:
    """The engine's tokenizer when nobody reads text: decoding is not what is measured."""

    eos_token_id = None

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return ""


# -- PEFT ------------------------------------------------------------------------------


class _Clock:
    """A generate streamer that notes when each step's tokens come (its first call is the
    prompt)."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.times: list[float] = []
        self.calls = 0

    def put(self, value: torch.Tensor) -> None:
        self.calls += 1
        if self.calls > 1:
            _sync(self.device)
            self.times.append(time.perf_counter())

    def end(self) -> None:
        pass


def _peft_model(base: Any, folders: list[Path]) -> Any:
    from peft import PeftModel

    model = PeftModel.from_pretrained(copy.deepcopy(base), str(folders[0]), adapter_name="a0")
    for k, folder in enumerate(folders[1:], start=1):
        model.load_adapter(str(folder), adapter_name=f"a{k}")
    model.eval()
    return model


def _generate(
    model: Any, rows: list[list[int]], cfg: dict[str, Any], device: torch.device, **kw: Any
) -> _Clock:
    clock = _Clock(device)
    ids = torch.tensor(rows, device=device)
    with torch.no_grad():
        model.generate(
            input_ids=ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=cfg["max_tokens"],
            min_new_tokens=cfg["max_tokens"],
            do_sample=False,
            pad_token_id=0,
            streamer=clock,
            **kw,
        )
    return clock


def run_peft_mixed(
    base: Any, folders: list[Path], cfg: dict[str, Any], m: int, device: torch.device
) -> list[Row]:
    model = _peft_model(base, folders)
    k = len(folders)
    names = [f"a{i % k}" for i in range(m)]
    work = prompts(cfg, m, model.config.vocab_size)
    _generate(model, work[:1], {**cfg, "max_tokens": 2}, device, adapter_names=names[:1])
    rows = []
    for _ in range(cfg["rounds"]):
        t0, c0 = time.perf_counter(), time.process_time()
        clock = _generate(model, work, cfg, device, adapter_names=names)
        seconds, cpu = time.perf_counter() - t0, time.process_time() - c0
        gaps = [b - a for a, b in zip(clock.times, clock.times[1:], strict=False)]
        ttft = [clock.times[0] - t0] * m
        rows.append(Row("peft-mixed", k, m, m * len(clock.times), seconds, cpu, ttft, gaps * m))
    return rows


def run_peft_sequential(
    base: Any, folders: list[Path], cfg: dict[str, Any], m: int, device: torch.device
) -> list[Row]:
    model = _peft_model(base, folders)
    k = len(folders)
    work = prompts(cfg, m, model.config.vocab_size)
    model.set_adapter("a0")
    _generate(model, work[:1], {**cfg, "max_tokens": 2}, device)
    rows = []
    for _ in range(cfg["rounds"]):
        ttft: list[float] = []
        itl: list[float] = []
        tokens = 0
        t0, c0 = time.perf_counter(), time.process_time()
        for a in range(k):
            batch = [p for i, p in enumerate(work) if i % k == a]
            if not batch:
                continue
            model.set_adapter(f"a{a}")
            clock = _generate(model, batch, cfg, device)
            tokens += len(batch) * len(clock.times)
            ttft += [clock.times[0] - t0] * len(batch)
            itl += [b - x for x, b in zip(clock.times, clock.times[1:], strict=False)] * len(batch)
        seconds, cpu = time.perf_counter() - t0, time.process_time() - c0
        rows.append(Row("peft-sequential", k, m, tokens, seconds, cpu, ttft, itl))
    return rows


# -- main ------------------------------------------------------------------------------


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--config", choices=list(CONFIGS), default="cpu")
    ap.add_argument("--adapters", type=int, nargs="+", default=[1, 8, 32])
    ap.add_argument("--requests", type=int, help="M concurrent requests (config's default)")
    ap.add_argument("--prompt", type=int, help="prompt tokens of every request")
    ap.add_argument("--max-tokens", type=int, help="generated tokens of every request")
    ap.add_argument("--batch-tokens", type=int, help="mixloom's max_batch_tokens (prefill chunk)")
    ap.add_argument(
        "--rounds",
        type=int,
        default=1,
        help="timed rounds of each system (the table shows the median one)",
    )
    ap.add_argument("--systems", nargs="+", choices=SYSTEMS, default=list(SYSTEMS))
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    cfg = dict(CONFIGS[args.config])
    for key in ("requests", "prompt", "max_tokens", "batch_tokens", "rounds"):
        if getattr(args, key) is not None:
            cfg[key] = getattr(args, key)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cpu":  # every system alike: freed memory reused, not page-faulted again
        tune_cpu_allocator()
    m = cfg["requests"]
    base = make_base(cfg, device)
    rows: list[list[Row]] = []  # each system's rounds
    with tempfile.TemporaryDirectory() as tmp:
        for k in args.adapters:
            loras = export(
                base, [lora_spec(f"lora{i}", cfg) for i in range(k)], Path(tmp) / f"lora{k}"
            )
            for system in args.systems:
                if system == "mixloom-lora":
                    runs = run_mixloom(system, base, loras, cfg, m, device)
                elif system == "peft-mixed":
                    runs = run_peft_mixed(base, loras, cfg, m, device)
                elif system == "peft-sequential":
                    runs = run_peft_sequential(base, loras, cfg, m, device)
                else:
                    moes = export(
                        base,
                        [mixlora_spec(f"moe{i}", cfg) for i in range(k)],
                        Path(tmp) / f"moe{k}",
                    )
                    runs = run_mixloom(system, base, moes, cfg, m, device)
                rows.append(runs)
                for row in runs:
                    print(json.dumps(row.summary()), flush=True)
    _table(rows, cfg, args.config, device)
    if args.json:
        args.json.write_text(
            json.dumps(
                {"config": {**cfg, "name": args.config}, "rows": [r.summary() for r in rows]},
                indent=2,
            )
        )


def _median(runs: list[Row]) -> Row:
    """The round of median tokens/s (the lower middle one of an even number)."""
    return sorted(runs, key=lambda r: r.tokens_per_second)[(len(runs) - 1) // 2]


def _table(rows: list[list[Row]], cfg: dict[str, Any], name: str, device: torch.device) -> None:
    print(
        f"\nconfig {name} on {device}: {cfg['requests']} requests x ({cfg['prompt']} prompt + "
        f"{cfg['max_tokens']} generated) tokens, rank {cfg['rank']}, {cfg['dtype']}, "
        f"median of {cfg['rounds']} round(s)\n"
    )
    print(
        "| system | K | M | tok/s | TTFT p50 ms | TTFT p95 ms | ITL p50 ms | ITL p95 ms "
        "| tok/s (busy) of each round |"
    )
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |")
    by = {}
    for runs in rows:
        r = _median(runs)
        s = r.summary()
        by[r.system, r.adapters] = r.tokens_per_second
        each = ", ".join(f"{x.tokens_per_second:.0f} ({x.busy:.2f})" for x in runs)
        print(
            f"| {r.system} | {r.adapters} | {r.requests} | {s['tokens_per_second']} | "
            f"{s['ttft_p50_ms']} | {s['ttft_p95_ms']} | {s['itl_p50_ms']} | {s['itl_p95_ms']} "
            f"| {each} |"
        )
    for k in sorted({k for _, k in by}):
        if ("mixloom-lora", k) in by and ("peft-mixed", k) in by:
            ratio = by["mixloom-lora", k] / by["peft-mixed", k]
            print(f"K={k}: mixloom LoRA mixed / PEFT mixed = {ratio:.2f}x (target >= 1)")
        if ("mixloom-lora", k) in by and ("mixloom-mixlora", k) in by:
            ratio = by["mixloom-mixlora", k] / by["mixloom-lora", k]
            print(f"K={k}: mixloom MixLoRA / mixloom LoRA = {ratio:.2f}x (target >= 0.7)")


if __name__ == "__main__":
    main()
