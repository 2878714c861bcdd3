"""End-to-end training throughput, side by side: mixloom fused vs PEFT vs MoE-PEFT.

Systems, each in its own subprocess (clean peak-memory numbers, and MoE-PEFT in its own venv):
- mixloom:  K MixLoRA jobs (8 experts, top-2, r=16, all 7 projections) in one fused step
            (mixloom.trainer.FusedTrainer), kernel backend auto (triton on CUDA).
- peft:     K plain-LoRA jobs (r=16, all 7 projections), one after another: PEFT cannot
            train several adapters in one batch (PEERS.md). K=1 is the single-tenant anchor.
            Adapter activations are recomputed in the backward on a GPU, kept on a CPU
            (AdapterModel's default); mixloom-recompute and mixloom-kept force either way:
            the speed/memory trade, measured.
- moe-peft: K MixLoRA jobs fused by MoE-PEFT 2.0.2 (bench/peer_moe_peft.py, run in
            bench/.venv-moe-peft made by bench/setup_peers.sh).
DPO (their own table):
- mixloom-dpo:        K LoRA DPO jobs (r=16, all 7 projections) in one fused step; the
                      reference log-probs (the base, no adapter) made once per pair, the first
                      time it comes up (epoch 1), and kept.
- trl-dpo:            TRL's DPOTrainer with a PEFT LoRA of the same rank and targets, run for
                      each of the K jobs one after another; the reference (the adapter
                      disabled) recomputed in every step, TRL's default.
- trl-dpo-precompute: the same with precompute_ref_log_probs=True: one reference pass over a
                      job's pairs before its training, counted in epoch 1.

Workload: a random-init LLaMA-shaped model; every step holds `tokens` tokens split evenly into
K jobs of one sequence each (4 jobs x 1024 tokens at the GPU config); loss on every token; one
AdamW step per job per step. tokens/s counts every token of the step; memory is the peak
allocated on the GPU, or the peak RSS of the process on CPU.

DPO workload: each job's pairs are a prompt and two different answers of random tokens, each
row (prompt + answer) as long as the supervised row (tokens / K), half prompt, half answer
(ending in EOS); `--pairs` pairs a job an optimizer step (a step of K jobs is 2 x pairs x K
rows), `--steps` optimizer steps an epoch, `--epochs` epochs (default 2: mixloom's reference
forward is in epoch 1 only, so epoch 1 and the later epochs are reported apart). Warm-up:
`--warmup` steps of throwaway jobs of the same shapes before the timed ones. Timed: every
optimizer step (and TRL's reference precompute); not timed: model building, the trainers'
setup (adapters, tokenising, TRL's DPOTrainer construction; its own column). Dropout off in
both (TRL's DPO default); TRL's gradient checkpointing off (its default is on; mixloom does
not recompute the base); TRL in bf16 autocast on a GPU, fp32 on a CPU. GPU peak memory is
counted from after the model is built (its bf16 cast briefly holds an fp32 copy too).

Configs: `gpu` is DESIGN.md section 7's (LLaMA-2-7B shape, bf16, 4096 tokens/step); `cpu` is
PEERS.md's CPU proxy (hidden 576, 4 layers, vocab 49152, 1024 tokens/step, fp32).

`--profile DIR`: after the timed steps, one more step of mixloom or PEFT under torch's profiler;
DIR gets its busiest ops as a table (profile_<system>_<K>.md), and the result a "device busy"
share: the union of the step's kernel intervals over the unprofiled step time. Well under 100%
on a GPU means the device waited for the host (launch overhead, Python, reads).

Usage: python bench/bench_e2e.py [--config cpu|gpu] [--jobs 1 4 16]
           [--systems mixloom mixloom-recompute mixloom-kept peft moe-peft
                      mixloom-dpo trl-dpo trl-dpo-precompute] [--steps 3] [--warmup 1]
           [--epochs 2] [--pairs 1] [--json PATH] [--profile DIR]
"""

from __future__ import annotations

import argparse
import functools
import itertools
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
MOE_PEFT_PY = BENCH / ".venv-moe-peft" / "bin" / "python"
PROJECTIONS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]

CONFIGS = {
    "gpu": dict(
        model=dict(
            hidden_size=4096,
            intermediate_size=11008,
            num_hidden_layers=32,
            num_attention_heads=32,
            num_key_value_heads=32,
            vocab_size=32000,
            max_position_embeddings=4096,
            rope_theta=10000.0,
        ),
        dtype="bfloat16",
        tokens=4096,
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
            rope_theta=100000.0,
        ),
        dtype="float32",
        tokens=1024,
    ),
}
RANK, ALPHA, DROPOUT, EXPERTS, TOP_K = 16, 32, 0.05, 8, 2


# ---- workers (run in a subprocess) -----------------------------------------------------------


def _device():
    import torch

    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _random_model(spec: dict):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    dtype = getattr(torch, spec["dtype"])
    cfg = LlamaConfig(**spec["model"], tie_word_embeddings=False)
    torch.manual_seed(0)
    with torch.device(_device()):  # initialise in place: a 7B init on the host takes minutes
        model = LlamaForCausalLM(cfg).to(dtype)
    model.requires_grad_(False)
    return model


def _rows(spec: dict, jobs: int) -> list[list[int]]:
    import torch

    per_job = spec["tokens"] // jobs
    g = torch.Generator().manual_seed(1)
    vocab = spec["model"]["vocab_size"]
    return [torch.randint(3, vocab, (per_job,), generator=g).tolist() for _ in range(jobs)]


def _timed_steps(step, steps: int, warmup: int) -> float:
    """Seconds per step (mean over `steps` after `warmup`)."""
    import torch

    for _ in range(warmup):
        step()
    sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)
    sync()
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    sync()
    return (time.perf_counter() - t0) / steps


def _profiled(step, steps_seconds: float, out: str | None, label: str) -> dict:  # type: ignore[no-untyped-def]
    """One more step under torch's profiler (see --profile): its busiest ops into
    out/profile_<label>.md; -> the step's kernel count and device-busy share."""
    if out is None:
        return {}
    import torch
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    cuda = torch.cuda.is_available()
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    sync()
    with profile(activities=activities) as prof:
        step()
        sync()
    spans = sorted(
        (e.time_range.start, e.time_range.end)
        for e in prof.events()
        if e.device_type == DeviceType.CUDA
    )
    busy, end = 0, None
    for lo, hi in spans:  # union of the kernels' intervals, in microseconds
        if end is None or lo > end:
            busy += hi - lo
            end = hi
        elif hi > end:
            busy += hi - end
            end = hi
    sort = "self_device_time_total" if cuda else "self_cpu_time_total"
    table = prof.key_averages().table(sort_by=sort, row_limit=30)
    path = Path(out) / f"profile_{label}.md"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(
        f"{label}: {len(spans)} kernels, device busy {busy / 1e3:.1f} ms of a "
        f"{steps_seconds * 1e3:.1f} ms step (unprofiled)\n\n{table}\n"
    )
    if not cuda:
        return {}
    return dict(kernels=len(spans), device_busy=busy / 1e6 / steps_seconds)


def _peak_mib() -> float:
    import torch

    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def peft_step(spec: dict, jobs: int):  # type: ignore[no-untyped-def]
    """PEFT's side: K plain-LoRA adapters on one model, one AdamW each; the step trains them
    one after another, each on its own sequence."""
    import torch
    import torch.distributed.tensor  # noqa: F401  (peft touches it without importing it)
    from peft import LoraConfig, get_peft_model

    model = _random_model(spec)
    cfg = LoraConfig(
        r=RANK, lora_alpha=ALPHA, lora_dropout=DROPOUT, target_modules=PROJECTIONS,
        task_type="CAUSAL_LM",
    )  # fmt: skip
    names = [f"t{i}" for i in range(jobs)]
    pm = get_peft_model(model, cfg, adapter_name=names[0])
    for n in names[1:]:
        pm.add_adapter(n, cfg)
    opts = {}
    for n in names:
        # PEFT keeps adapter weights in fp32 over a bf16 base (autocast_adapter_dtype)
        params = [p for name, p in pm.named_parameters() if f".{n}." in name]
        opts[n] = torch.optim.AdamW(params, lr=1e-4)
    dev = _device()
    batches = [torch.tensor([r], device=dev) for r in _rows(spec, jobs)]

    def step():
        for n, ids in zip(names, batches, strict=True):
            pm.base_model.set_adapter(n)
            pm(input_ids=ids, labels=ids).loss.backward()
            opts[n].step()
            opts[n].zero_grad(set_to_none=True)

    return step


def worker_peft(spec: dict, jobs: int, steps: int, warmup: int, profile: str | None = None) -> dict:
    step = peft_step(spec, jobs)
    sec = _timed_steps(step, steps, warmup)
    peak = _peak_mib()
    return dict(
        seconds_per_step=sec, peak_mib=peak, **_profiled(step, sec, profile, f"peft_{jobs}")
    )


def worker_mixloom(
    spec: dict,
    jobs: int,
    steps: int,
    warmup: int,
    profile: str | None = None,
    recompute: bool | None = None,
) -> dict:
    from mixloom.data.tokenize import EncodedRow
    from mixloom.jobspec import MixLoraHyperparameters
    from mixloom.kernels import resolve_backend
    from mixloom.model.adapter_model import AdapterModel
    from mixloom.model.specs import AdapterSpec
    from mixloom.trainer.fused import FusedTrainer
    from mixloom.trainer.host import tune_cpu_allocator
    from mixloom.trainer.job import TrainingJob

    model = _random_model(spec)
    backend = resolve_backend("auto", _device())  # MIXLOOM_KERNEL_BACKEND overrides
    am = AdapterModel(model, backend=backend, recompute=recompute)
    if am.device.type == "cpu":  # as `mixloom train` on a CPU does
        tune_cpu_allocator()
    trainer = FusedTrainer(am, pad_id=0)
    for i, ids in enumerate(_rows(spec, jobs)):
        hp = MixLoraHyperparameters(
            r=RANK, lora_alpha=ALPHA, lora_dropout=DROPOUT, num_experts=EXPERTS, top_k=TOP_K,
            batch_size=1, n_epochs=1000, max_seq_len=len(ids), train_on_inputs=True,
            learning_rate=1e-4,
        )  # fmt: skip
        name = f"t{i}"
        adapter = AdapterSpec.from_hyperparameters(name, hp, seed=i)
        trainer.add_job(TrainingJob(name=name, adapter=adapter, hp=hp, rows=[EncodedRow(ids, ids)]))
    sec = _timed_steps(trainer.step, steps, warmup)
    peak = _peak_mib()
    mode = {None: "", True: "_recompute", False: "_kept"}[recompute]
    extra = _profiled(trainer.step, sec, profile, f"mixloom{mode}_{jobs}")
    return dict(seconds_per_step=sec, peak_mib=peak, backend=backend, **extra)


# ---- DPO workers (run in a subprocess) -------------------------------------------------------

PAD, EOS, FIRST_TOKEN = 0, 2, 3  # random tokens are drawn from [FIRST_TOKEN, vocab)
Pair = tuple[list[int], list[int], list[int]]  # prompt, preferred answer, other answer


def _dpo_pairs(spec: dict, jobs: int, pairs: int, seed: int) -> list[list[Pair]]:
    """Per job, `pairs` pairs of random tokens: prompt + answer is as long as the supervised
    row (tokens / jobs), half and half; the answers end in EOS."""
    import torch

    row = spec["tokens"] // jobs
    prompt, answer = row // 2, row - row // 2
    g = torch.Generator().manual_seed(seed)
    vocab = spec["model"]["vocab_size"]
    out = []
    for _ in range(jobs):
        job = []
        for _ in range(pairs):
            ids = torch.randint(FIRST_TOKEN, vocab, (prompt + 2 * (answer - 1),), generator=g)
            p, a, b = ids.split([prompt, answer - 1, answer - 1])
            job.append((p.tolist(), a.tolist() + [EOS], b.tolist() + [EOS]))
        out.append(job)
    return out


def _sync() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()


def _reset_peak() -> None:
    """GPU peak from here on: building a bf16 model holds an fp32 copy for a moment."""
    import torch

    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()


def _cpu_seconds() -> float:
    """CPU time of this process so far (all its threads)."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _dpo_result(
    timelines: list[list[float]],
    precompute: float,
    setup: float,
    busy: float,
    spec: dict,
    jobs: int,
    steps: int,
    pairs: int,
) -> dict:
    """Epoch 1 (its steps and any reference precompute) and the later epochs, apart.
    `timelines`: seconds of each optimizer step, in order, one list per trainer (mixloom's
    one list of fused steps; TRL's one list per job). `busy`: CPU seconds over wall seconds x
    threads while training; well under 1 on a CPU means neighbours took cores."""
    first = sum(sum(t[:steps]) for t in timelines) + precompute
    later = sum(sum(t[steps:]) for t in timelines)
    epochs = len(timelines[0]) // steps
    epoch_pairs = jobs * steps * pairs
    pair_tokens = 2 * (spec["tokens"] // jobs)
    res = dict(
        epochs=epochs,
        epoch1_seconds=first,
        later_seconds=later,
        precompute_seconds=precompute,
        setup_seconds=setup,
        cpu_busy=busy,
        epoch1_pairs_per_s=epoch_pairs / first,
        epoch1_tokens_per_s=epoch_pairs * pair_tokens / first,
        peak_mib=_peak_mib(),
    )
    if epochs > 1:
        res["later_pairs_per_s"] = epoch_pairs * (epochs - 1) / later
        res["later_tokens_per_s"] = res["later_pairs_per_s"] * pair_tokens
    return res


def worker_mixloom_dpo(
    spec: dict, jobs: int, steps: int, warmup: int, epochs: int, pairs: int
) -> dict:
    """K LoRA DPO jobs fused in one FusedTrainer; every fused step timed."""
    import torch

    from mixloom.data.tokenize import IGNORE_INDEX, EncodedPair, EncodedRow
    from mixloom.jobspec import DpoObjective, LoraHyperparameters
    from mixloom.kernels import resolve_backend
    from mixloom.model.adapter_model import AdapterModel
    from mixloom.model.specs import AdapterSpec
    from mixloom.trainer.fused import FusedTrainer
    from mixloom.trainer.host import tune_cpu_allocator
    from mixloom.trainer.job import TrainingJob

    model = _random_model(spec)
    _reset_peak()
    backend = resolve_backend("auto", _device())
    am = AdapterModel(model, backend=backend)
    if am.device.type == "cpu":
        tune_cpu_allocator()
    trainer = FusedTrainer(am, pad_id=PAD)

    def add(prefix: str, data: list[list[Pair]], n_epochs: int) -> list[str]:
        for i, job_pairs in enumerate(data):
            hp = LoraHyperparameters(
                r=RANK, lora_alpha=ALPHA, lora_dropout=0.0, target_modules=tuple(PROJECTIONS),
                batch_size=pairs, n_epochs=n_epochs, warmup_ratio=0.0, learning_rate=1e-4,
                max_seq_len=spec["tokens"] // jobs,
            )  # fmt: skip
            rows = [
                EncodedPair(
                    EncodedRow(p + a, [IGNORE_INDEX] * len(p) + a),
                    EncodedRow(p + b, [IGNORE_INDEX] * len(p) + b),
                )
                for p, a, b in job_pairs
            ]
            adapter = AdapterSpec.from_hyperparameters(f"{prefix}{i}", hp, seed=i)
            job = TrainingJob(f"{prefix}{i}", adapter, hp, rows, seed=i, preference=DpoObjective())
            trainer.add_job(job)
        return [f"{prefix}{i}" for i in range(len(data))]

    if warmup:  # throwaway jobs of the same shapes, their reference forwards included
        warm = add("w", _dpo_pairs(spec, jobs, warmup * pairs, seed=2), 1)
        for _ in range(warmup):
            trainer.step()
        for name in warm:
            trainer.remove_job(name)

    t0 = time.perf_counter()
    add("t", _dpo_pairs(spec, jobs, steps * pairs, seed=1), epochs)
    setup = time.perf_counter() - t0
    seconds = []
    cpu0 = _cpu_seconds()
    for _ in range(epochs * steps):
        t = time.perf_counter()
        trainer.step()
        _sync()
        seconds.append(time.perf_counter() - t)
    busy = (_cpu_seconds() - cpu0) / sum(seconds) / torch.get_num_threads()
    unfinished = [j.name for j in trainer.jobs.values() if not j.done or j.error]
    if unfinished:
        raise RuntimeError(f"DPO jobs {unfinished} not done after {epochs * steps} steps")
    res = _dpo_result([seconds], 0.0, setup, busy, spec, jobs, steps, pairs)
    return dict(**res, backend=backend)


def _word_tokenizer(vocab_size: int):  # type: ignore[no-untyped-def]
    """A tokenizer for TRL that reads "t5 t17 ..." as ids 5, 17, ... (and "</s>" as EOS), so
    TRL tokenises the text of exactly the token ids mixloom gets."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": PAD, "<unk>": 1, "</s>": EOS}
    vocab.update({f"t{i}": i for i in range(FIRST_TOKEN, vocab_size)})
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", unk_token="<unk>", eos_token="</s>"
    )


def worker_trl_dpo(
    spec: dict,
    jobs: int,
    steps: int,
    warmup: int,
    epochs: int,
    pairs: int,
    precompute: bool = False,
) -> dict:
    """K jobs one after another, each TRL's DPOTrainer over a fresh PEFT LoRA on the one base
    (unloaded after its job); each optimizer step timed by a callback."""
    import tempfile

    os.environ.update(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TQDM_DISABLE="1")
    tmp = tempfile.TemporaryDirectory(prefix="bench_e2e_trl_")
    os.environ["HF_DATASETS_CACHE"] = tmp.name
    import datasets
    import torch
    import torch.distributed.tensor  # noqa: F401  (peft touches it without importing it)
    from peft import LoraConfig
    from transformers import TrainerCallback
    from transformers.utils import logging as hf_logging
    from trl import DPOConfig, DPOTrainer

    datasets.disable_progress_bars()
    hf_logging.set_verbosity_error()
    model = _random_model(spec)
    _reset_peak()
    tokenizer = _word_tokenizer(spec["model"]["vocab_size"])
    lora = LoraConfig(
        r=RANK, lora_alpha=ALPHA, lora_dropout=0.0, target_modules=PROJECTIONS,
        task_type="CAUSAL_LM",
    )  # fmt: skip

    class Clock(TrainerCallback):
        """Time of each optimizer step: from the previous step's end (or the loop's start),
        so that it holds the batch's loading too."""

        def on_train_begin(self, args, state, control, **kwargs):  # type: ignore[no-untyped-def]
            _sync()
            self.marks = [time.perf_counter()]

        def on_step_end(self, args, state, control, **kwargs):  # type: ignore[no-untyped-def]
            _sync()
            self.marks.append(time.perf_counter())

    class TimedDPOTrainer(DPOTrainer):
        """DPOTrainer whose reference precompute (it runs in __init__) is timed."""

        precompute_seconds = 0.0

        def _precompute_ref_logps(self, dataset, name, batch_size):  # type: ignore[no-untyped-def]
            t = time.perf_counter()
            out = super()._precompute_ref_logps(dataset, name, batch_size)
            _sync()
            self.precompute_seconds += time.perf_counter() - t
            return out

    def text(ids: list[int]) -> str:
        return " ".join(f"t{i}" for i in ids)

    def train(job_pairs: list[Pair], n_epochs: int, seed: int) -> tuple[list[float], float, float]:
        """One job: (its steps' seconds, its precompute seconds, its setup seconds)."""
        nonlocal model
        data = datasets.Dataset.from_dict(
            dict(  # TRL appends the EOS itself (non-conversational rows)
                prompt=[text(p) for p, _, _ in job_pairs],
                chosen=[" " + text(a[:-1]) for _, a, _ in job_pairs],
                rejected=[" " + text(b[:-1]) for _, _, b in job_pairs],
            )
        )
        args = DPOConfig(
            output_dir=tmp.name, report_to=[], save_strategy="no", logging_strategy="no",
            disable_tqdm=True, log_level="error", seed=seed,
            per_device_train_batch_size=pairs, num_train_epochs=n_epochs, learning_rate=1e-4,
            max_length=None, gradient_checkpointing=False, bf16=spec["dtype"] == "bfloat16",
            precompute_ref_log_probs=precompute, dataloader_pin_memory=torch.cuda.is_available(),
        )  # fmt: skip
        clock = Clock()
        t0 = time.perf_counter()
        trainer = TimedDPOTrainer(
            model=model, args=args, train_dataset=data, processing_class=tokenizer,
            peft_config=lora, callbacks=[clock],
        )  # fmt: skip
        setup = time.perf_counter() - t0 - trainer.precompute_seconds
        row = trainer.train_dataset[0]
        p, a, _ = job_pairs[0]
        if (row["prompt_ids"], row["chosen_ids"]) != (p, a):
            raise RuntimeError("TRL tokenised the pairs into other ids than mixloom trains on")
        cpu0, t0 = _cpu_seconds(), time.perf_counter()
        trainer.train()
        busy[0] += _cpu_seconds() - cpu0
        busy[1] += time.perf_counter() - t0
        model = trainer.model.unload()  # the base again, for the next job's adapter
        seconds = [end - start for start, end in itertools.pairwise(clock.marks)]
        return seconds, trainer.precompute_seconds, setup

    busy = [0.0, 0.0]  # CPU and wall seconds of the jobs' train() calls
    if warmup:  # a throwaway job of the same shapes
        train(_dpo_pairs(spec, jobs, warmup * pairs, seed=2)[0], 1, seed=0)

    busy[:] = [0.0, 0.0]
    timelines, precomputed, setup = [], 0.0, 0.0
    for i, job_pairs in enumerate(_dpo_pairs(spec, jobs, steps * pairs, seed=1)):
        seconds, pre, built = train(job_pairs, epochs, seed=i)
        if len(seconds) != epochs * steps:
            raise RuntimeError(f"TRL ran {len(seconds)} optimizer steps, not {epochs * steps}")
        timelines.append(seconds)
        precomputed += pre
        setup += built
    tmp.cleanup()
    threads = torch.get_num_threads()
    return _dpo_result(
        timelines, precomputed, setup, busy[0] / busy[1] / threads, spec, jobs, steps, pairs
    )


# ---- driver ----------------------------------------------------------------------------------

DPO_WORKERS = {
    "mixloom-dpo": worker_mixloom_dpo,
    "trl-dpo": worker_trl_dpo,
    "trl-dpo-precompute": functools.partial(worker_trl_dpo, precompute=True),
}
REFERENCE = {  # how each DPO system gets the reference log-probs (the DPO table says it)
    "mixloom-dpo": "once per pair, in epoch 1; kept",
    "trl-dpo": "recomputed every step (TRL's default)",
    "trl-dpo-precompute": "precomputed before each job (precompute_ref_log_probs=True; timed in epoch 1)",
}


def run_one(
    system: str,
    config: str,
    jobs: int,
    steps: int,
    warmup: int,
    profile: str | None = None,
    epochs: int = 2,
    pairs: int = 1,
) -> dict:
    spec = CONFIGS[config]
    args = dict(system=system, config=config, jobs=jobs, steps=steps, warmup=warmup)
    if system == "moe-peft":
        if not MOE_PEFT_PY.exists():
            return dict(error="no bench/.venv-moe-peft: run bench/setup_peers.sh")
        cmd = [str(MOE_PEFT_PY), str(BENCH / "peer_moe_peft.py"), json.dumps({**args, **spec})]
    else:
        worker = {**args, "profile": profile, "epochs": epochs, "pairs": pairs}
        cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", json.dumps(worker)]
    path = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p)
    env = {**os.environ, "PYTHONPATH": path}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT)
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT "):
            res = json.loads(line[len("RESULT ") :])
            if "seconds_per_step" in res:
                res["tokens_per_s"] = spec["tokens"] / res["seconds_per_step"]
            return res
    tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
    return dict(error=" | ".join(tail) or f"exit {proc.returncode}")


def _sft_table(rows: list[dict], mem: str) -> None:
    busy = any("device_busy" in r for r in rows)
    extra = " kernels | device busy |" if busy else ""
    print(f"\n| system | jobs | tokens/s | s/step | {mem} |{extra}")
    print("| --- | ---: | ---: | ---: | ---: |" + (" ---: | ---: |" if busy else ""))
    for r in rows:
        if "error" in r:
            print(f"| {r['system']} | {r['jobs']} | failed: {r['error'][:120]} | | |")
            continue
        line = (
            f"| {r['system']} | {r['jobs']} | {r['tokens_per_s']:,.0f} | "
            f"{r['seconds_per_step']:.3f} | {r['peak_mib']:,.0f} |"
        )
        if busy:
            k, b = r.get("kernels"), r.get("device_busy")
            line += f" {k:,} | {b:.0%} |" if k is not None else " | |"
        print(line)


def _dpo_table(rows: list[dict], mem: str, steps: int, pairs: int, cpu: bool) -> None:
    """Throughput in epoch 1 (mixloom makes its reference log-probs there) and in the later
    epochs, and each TRL row against mixloom's at the same K; on a CPU, how busy the
    process kept its threads while it trained (cpu_busy)."""
    print(
        f"\nDPO, {pairs} pair(s) a job an optimizer step, {steps} steps an epoch; "
        "setup is not in the rates."
    )
    print(
        "\n| system | jobs | reference log-probs | pairs/s epoch 1 | pairs/s later epochs "
        f"| tokens/s epoch 1 | tokens/s later epochs | {mem} | setup s |"
        + (" CPU busy |" if cpu else "")
    )
    print("| --- | ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: |" + (" ---: |" * cpu))
    for r in rows:
        ref = REFERENCE[r["system"]]
        if "error" in r:
            empty = " |" * (5 + cpu)
            print(f"| {r['system']} | {r['jobs']} | {ref} | failed: {r['error'][:120]} |{empty}")
            continue
        later = r.get("later_pairs_per_s")
        print(
            f"| {r['system']} | {r['jobs']} | {ref} | {r['epoch1_pairs_per_s']:.2f} | "
            + (f"{later:.2f}" if later else "-")
            + f" | {r['epoch1_tokens_per_s']:,.0f} | "
            + (f"{r['later_tokens_per_s']:,.0f}" if later else "-")
            + f" | {r['peak_mib']:,.0f} | {r['setup_seconds']:.1f} |"
            + (f" {r['cpu_busy']:.2f} |" if cpu else "")
        )
    ours = {r["jobs"]: r for r in rows if r["system"] == "mixloom-dpo" and "error" not in r}
    for r in rows:
        m = ours.get(r["jobs"])
        if r["system"] == "mixloom-dpo" or "error" in r or m is None:
            continue
        line = f"mixloom-dpo / {r['system']} at K={r['jobs']}, pairs/s: epoch 1 "
        line += f"{m['epoch1_pairs_per_s'] / r['epoch1_pairs_per_s']:.2f}x"
        if "later_pairs_per_s" in r and "later_pairs_per_s" in m:
            line += f", later epochs {m['later_pairs_per_s'] / r['later_pairs_per_s']:.2f}x"
        print(line + f"; peak memory {m['peak_mib'] / r['peak_mib']:.2f}x")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", choices=sorted(CONFIGS), default=None)
    ap.add_argument("--jobs", type=int, nargs="+", default=[1, 4, 16])
    ap.add_argument("--systems", nargs="+", default=["mixloom", "peft", "moe-peft"])
    ap.add_argument("--steps", type=int, default=3, help="DPO: optimizer steps an epoch")
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--epochs", type=int, default=2, help="DPO rows: epochs over the pairs")
    ap.add_argument("--pairs", type=int, default=1, help="DPO rows: pairs a job an optimizer step")
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--profile", default=None, help="folder for one profiled step's tables")
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()

    if args.worker:
        w = json.loads(args.worker)
        if w["system"] in DPO_WORKERS:
            res = DPO_WORKERS[w["system"]](
                CONFIGS[w["config"]], w["jobs"], w["steps"], w["warmup"], w["epochs"], w["pairs"]
            )
            print("RESULT " + json.dumps(res), flush=True)
            return
        fn = {
            "peft": worker_peft,
            "mixloom": worker_mixloom,  # recompute as AdapterModel chooses: on GPU, off on CPU
            # adapter activations recomputed in the backward, or kept for it, whatever the device
            "mixloom-recompute": functools.partial(worker_mixloom, recompute=True),
            "mixloom-kept": functools.partial(worker_mixloom, recompute=False),
        }[w["system"]]
        res = fn(CONFIGS[w["config"]], w["jobs"], w["steps"], w["warmup"], w.get("profile"))
        print("RESULT " + json.dumps(res), flush=True)
        return

    import torch

    config = args.config or ("gpu" if torch.cuda.is_available() else "cpu")
    where = torch.cuda.get_device_name() if torch.cuda.is_available() else "CPU"
    mem = "peak GPU MiB" if torch.cuda.is_available() else "peak RSS MiB"
    print(f"config {config} on {where}: {json.dumps(CONFIGS[config])}", flush=True)
    rows = []
    for system in args.systems:
        for jobs in args.jobs:
            res = run_one(
                system, config, jobs, args.steps, args.warmup, args.profile, args.epochs, args.pairs
            )
            rows.append(dict(system=system, jobs=jobs, **res))
            print(f"  {system} K={jobs}: {res}", file=sys.stderr, flush=True)
    sft = [r for r in rows if r["system"] not in DPO_WORKERS]
    dpo = [r for r in rows if r["system"] in DPO_WORKERS]
    if sft:
        _sft_table(sft, mem)
    if dpo:
        _dpo_table(dpo, mem, args.steps, args.pairs, cpu=not torch.cuda.is_available())
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(dict(config=config, rows=rows)))


if __name__ == "__main__":
    main()
