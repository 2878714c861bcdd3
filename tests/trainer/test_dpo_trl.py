"""mixloom's DPO is TRL's: TRL 1.16.0's DPOTrainer (loss "sigmoid", a PEFT LoRA adapter whose
reference is the model with the adapter disabled) given the same preference rows builds the
same answer tokens, takes the same first-step loss and LoRA gradients, and ends several AdamW
steps with the same adapter.

Both sides start from one tiny base saved to disk (tests/tiny.py) and read one JSONL file:
mixloom through its own path (load_jsonl + encode_preferences, rendering "plain"), TRL as
non-conversational {"prompt", "chosen", "rejected"} strings that render the same text. fp32 on
the CPU; lora_dropout 0; every LoRA A and B tensor of both models set to the same random
values (B non-zero, so the policy is not the reference from the first step).

Label smoothing is not compared: TRL 1.16's "sigmoid" loss ignores it, mixloom's is
conservative DPO (test_dpo.py checks that formula).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
from datasets import Dataset
from peft import LoraConfig, set_peft_model_state_dict
from tiny import save_tiny_base
from transformers import AutoModelForCausalLM, AutoTokenizer
from trl import DPOConfig, DPOTrainer

from mixloom.data.formats import load_jsonl
from mixloom.data.tokenize import IGNORE_INDEX, EncodedPair, encode_preferences, sequence_rows
from mixloom.jobspec import ALL_MODULES, DpoObjective, LoraHyperparameters
from mixloom.model.adapter_model import AdapterModel
from mixloom.model.formats import export_tensors
from mixloom.model.specs import AdapterSpec
from mixloom.trainer.fused import FusedTrainer
from mixloom.trainer.job import TrainingJob


def _user(content: str) -> dict[str, str]:
    return {"role": "user", "content": content}


def _answer(content: str) -> list[dict[str, str]]:
    return [{"role": "assistant", "content": content}]


# A single turn, a system message with an earlier exchange, answers of unequal lengths.
ROWS = [
    {
        "input": {"messages": [_user("Name a colour.")]},
        "preferred_output": _answer("Blue."),
        "non_preferred_output": _answer("Seven."),
    },
    {
        "input": {
            "messages": [
                {"role": "system", "content": "Be brief."},
                _user("2+2?"),
                {"role": "assistant", "content": "4"},
                _user("And 3+3?"),
            ]
        },
        "preferred_output": _answer("6"),
        "non_preferred_output": _answer("It is probably 7, or so."),
    },
    {
        "input": {"messages": [_user("Translate 'chat' from French.")]},
        "preferred_output": _answer("cat"),
        "non_preferred_output": _answer("dog"),
    },
    {
        "input": {"messages": [_user("Why is the sky blue? One sentence.")]},
        "preferred_output": _answer("Air scatters blue light more than red."),
        "non_preferred_output": _answer("Because."),
    },
]
BETA = 0.5


def _plain_prompt(messages: list[dict[str, str]]) -> str:
    """The text rendering "plain" gives a preference row's input, ending where its answer
    starts: `User: ...` lines, an earlier answer as `Assistant: ...EOS` and a system message as
    its own paragraph."""
    text = ""
    for m in messages:
        if m["role"] == "user":
            text += f"User: {m['content']}\n"
        elif m["role"] == "assistant":
            text += f"Assistant: {m['content']}</s>\n"
        else:
            text += f"{m['content']}\n\n"
    return text + "Assistant: "


@dataclass(frozen=True)
class Data:
    """The saved base, its tokenizer, mixloom's pairs of the JSONL file and TRL's rows of it."""

    base: Path
    tokenizer: Any
    pairs: list[EncodedPair]
    trl_rows: list[dict[str, str]]
    out: Path


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Data:
    folder = tmp_path_factory.mktemp("dpo-trl")
    base = save_tiny_base(folder / "base")
    path = folder / "pairs.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in ROWS))
    tokenizer = AutoTokenizer.from_pretrained(base)
    pairs = encode_preferences(load_jsonl(path), tokenizer, max_seq_len=256, rendering="plain")
    trl_rows = [
        {
            "prompt": _plain_prompt(row["input"]["messages"]),
            "chosen": row["preferred_output"][0]["content"],
            "rejected": row["non_preferred_output"][0]["content"],
        }
        for row in (json.loads(line) for line in path.read_text().splitlines())
    ]
    return Data(base, tokenizer, list(pairs), trl_rows, folder)


def _hp(**kw: Any) -> LoraHyperparameters:
    base: dict[str, Any] = dict(
        r=4,
        lora_alpha=8,
        lora_dropout=0.0,
        target_modules=ALL_MODULES,
        learning_rate=5e-3,
        lr_scheduler="constant",
        warmup_ratio=0.0,
        weight_decay=0.0,
        rendering="plain",
    )
    base.update(kw)
    return LoraHyperparameters(**base)


def _mixloom(data: Data, hp: LoraHyperparameters) -> tuple[FusedTrainer, TrainingJob]:
    """A fused trainer on the saved base with one DPO job over the pairs, its LoRA weights
    random (B included)."""
    spec = AdapterSpec.from_hyperparameters("dpo", hp, seed=3)
    job = TrainingJob("dpo", spec, hp, data.pairs, seed=5, preference=DpoObjective(beta=BETA))
    base = AutoModelForCausalLM.from_pretrained(data.base, dtype=torch.float32)
    trainer = FusedTrainer(AdapterModel(base), pad_id=data.tokenizer.pad_token_id)
    trainer.add_job(job)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for _, p in trainer.model.named_adapter_parameters("dpo"):
            p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    return trainer, job


def _exported(trainer: FusedTrainer) -> dict[str, torch.Tensor]:
    """The job's LoRA weights under PEFT's file keys, copied: export_tensors' fp32 CPU tensors
    are the live weights themselves."""
    return {k: v.clone() for k, v in export_tensors(trainer.model, "dpo").items()}


def _file_key(key: str) -> str:
    """PEFT's file key for one of our parameters (layers.{L}.{block}.{proj}.lora_{A,B})."""
    return f"base_model.model.model.{key}.weight"


def _peft_name(key: str) -> str:
    """PEFT's parameter name for one of ours: its file key, in adapter "default"."""
    return _file_key(key).replace(".weight", ".default.weight")


def _trl(
    data: Data, rows: list[dict[str, str]], lora: dict[str, torch.Tensor], **kw: Any
) -> DPOTrainer:
    """TRL's DPOTrainer over `rows` in their order (no shuffle), a fresh LoRA adapter on the
    saved base given the weights `lora` (PEFT's file keys, as mixloom exports them)."""
    args = DPOConfig(
        output_dir=str(data.out / "trl"),
        beta=BETA,
        loss_type=["sigmoid"],
        bf16=False,  # DPOConfig's default is bf16
        activation_checkpointing=False,  # DPOConfig's default is on; a plain backward
        use_cpu=True,
        report_to=[],
        save_strategy="no",
        disable_tqdm=True,
        train_sampling_strategy="sequential",
        optim="adamw_torch_fused",  # a job's optimizer: torch's AdamW, fused
        lr_scheduler_type="constant",
        warmup_steps=0,
        weight_decay=0.0,
        gradient_accumulation_steps=1,
        num_train_epochs=1,
        dataloader_num_workers=0,
        **kw,
    )
    peft_config = LoraConfig(
        r=4, lora_alpha=8, lora_dropout=0.0, target_modules=list(ALL_MODULES), task_type="CAUSAL_LM"
    )
    base = AutoModelForCausalLM.from_pretrained(data.base, dtype=torch.float32)
    trainer = DPOTrainer(
        model=base,
        args=args,
        train_dataset=Dataset.from_list(rows),
        processing_class=data.tokenizer,
        peft_config=peft_config,
    )
    loaded = set_peft_model_state_dict(trainer.model, lora)
    assert not loaded.unexpected_keys
    assert not [k for k in loaded.missing_keys if "lora_" in k]
    return trainer


def _trainable(trainer: DPOTrainer) -> dict[str, torch.nn.Parameter]:
    return {n: p for n, p in trainer.model.named_parameters() if p.requires_grad}


def test_answer_tokens_and_masks_are_trls(data: Data) -> None:
    """Each row mixloom trains on is the prompt and answer TRL tokenises, its targets TRL's
    completion mask (the answer and its EOS), in the same batch layout (the preferred answers,
    then the others). One difference, which no loss sees: mixloom's plain rendering ends every
    assistant turn, the last too, with a newline after the EOS, a non-target token that the
    causal model reads only after every target."""
    trainer, _ = _mixloom(data, _hp(batch_size=len(ROWS)))
    trl = _trl(data, data.trl_rows, _exported(trainer))
    batch = trl.data_collator([trl.train_dataset[i] for i in range(len(ROWS))])
    tokenizer = data.tokenizer
    newline = tokenizer("\n", add_special_tokens=False)["input_ids"]
    rows = sequence_rows(data.pairs)
    assert len(rows) == batch["input_ids"].shape[0] == 2 * len(ROWS)
    for b, row in enumerate(rows):
        n = int(batch["attention_mask"][b].sum())
        ids = batch["input_ids"][b, :n].tolist()
        answer = batch["completion_mask"][b, :n].bool().tolist()
        assert ids[-1] == tokenizer.eos_token_id
        assert row.input_ids == ids + newline
        assert [y != IGNORE_INDEX for y in row.labels] == answer + [False]
        assert [y for y in row.labels if y != IGNORE_INDEX] == [
            t for t, a in zip(ids, answer, strict=True) if a
        ]


def test_first_step_loss_metrics_and_lora_gradients_are_trls(data: Data) -> None:
    """One step over all four pairs: mixloom's DPO loss, its reward metrics and the gradient of
    every LoRA A and B tensor equal TRL's `compute_loss` and its backward.

    Tolerances, fp32 rounding with room to spare: the answers' summed log-probabilities reach
    about -200, where fp32's spacing is 1.5e-5, and the two sides take the same log-softmax by
    different kernels (mixloom's chunked cross-entropy, TRL's fused LM head) summed in different
    orders, so a sum may differ by a step or two. Hence the loss and the reward metrics to 5e-5
    (measured at most 4.7e-6 and 8.3e-6; mixloom rounds its metrics to 6 decimals), each
    gradient element to atol 1e-5 + rtol 1e-4 (measured at most 8.1e-6 on gradients up to 0.85,
    a fifth of what the tolerance allows there)."""
    trainer, job = _mixloom(data, _hp(batch_size=len(ROWS), max_grad_norm=None))
    trl = _trl(data, data.trl_rows, _exported(trainer))

    grads: dict[str, torch.Tensor] = {}
    for key, p in trainer.model.named_adapter_parameters("dpo"):
        p.register_post_accumulate_grad_hook(
            lambda p, key=key: grads.__setitem__(key, p.grad.detach().clone())
        )
    (metrics,) = trainer.step().jobs
    assert metrics.stepped and metrics.step_loss is not None and metrics.preference is not None

    batch = trl.data_collator([trl.train_dataset[i] for i in range(len(ROWS))])
    trl.model.train()
    loss = trl.compute_loss(trl.model, batch)
    loss.backward()

    assert metrics.step_loss == pytest.approx(loss.item(), abs=5e-5, rel=0)
    logged = {k: v[-1] for k, v in trl._metrics["train"].items()}
    for ours, theirs in [
        ("rewards_chosen", "rewards/chosen"),
        ("rewards_rejected", "rewards/rejected"),
        ("reward_accuracy", "rewards/accuracies"),
        ("reward_margin", "rewards/margins"),
        ("logps_chosen", "logps/chosen"),
        ("logps_rejected", "logps/rejected"),
    ]:
        assert metrics.preference[ours] == pytest.approx(logged[theirs], abs=5e-5, rel=0), ours
    assert sorted(job.reference) == list(range(len(ROWS)))

    theirs = _trainable(trl)
    assert sorted(map(_peft_name, grads)) == sorted(theirs)  # every LoRA tensor, nothing else
    assert any(g.abs().max() > 0.1 for g in grads.values())
    for key, grad in grads.items():
        other = theirs[_peft_name(key)].grad
        assert other is not None
        torch.testing.assert_close(grad, other, atol=1e-5, rtol=1e-4, msg=key)


def test_four_adamw_steps_end_in_trls_adapter(data: Data) -> None:
    """Two epochs of the four pairs, two pairs an optimizer step (mixloom accumulates them as
    two micro-batches of one pair; TRL takes both at once), AdamW at lr 5e-3, constant, no
    warmup, no weight decay, the gradient clipped to norm 0.5 (every step clips: norms 1 to 15):
    the adapters match to atol 1e-5 + rtol 1e-4 (measured at most 3.5e-6, on weights that moved
    by up to 0.02; TRL not clipping instead misses by 1.8e-2): the gradients' fp32 rounding
    (above) carried through AdamW, whose update divides by the gradient's own size.

    The data order: mixloom shuffles each epoch with its job's seed. TRL gets the rows in the
    order mixloom trained them (its two epochs one after the other, each pair twice) as one
    epoch read in sequence, so each optimizer step of both sees the same two pairs. TRL makes
    the reference's log-probabilities anew each step; mixloom made them once, in the first
    epoch, and reused them in the second."""
    trainer, job = _mixloom(
        data, _hp(batch_size=2, micro_batch_size=1, n_epochs=2, max_grad_norm=0.5)
    )
    initial = _exported(trainer)
    order: list[int] = []
    norms: list[float] = []
    while trainer.active:
        if job.micro_done == 0:
            order += job.step_indices()
        for m in trainer.step().jobs:
            if m.grad_norm is not None:
                norms.append(m.grad_norm)
    assert job.step == 4 and len(order) == 2 * len(ROWS)
    assert sorted(order[: len(ROWS)]) == sorted(order[len(ROWS) :]) == list(range(len(ROWS)))
    assert min(norms) > 0.5  # every step clipped

    trl = _trl(
        data,
        [data.trl_rows[i] for i in order],
        initial,
        learning_rate=5e-3,
        max_grad_norm=0.5,
        per_device_train_batch_size=2,
    )
    trl.train()
    assert trl.state.global_step == 4

    theirs = _trainable(trl)
    ours = dict(trainer.model.named_adapter_parameters("dpo"))
    assert sorted(map(_peft_name, ours)) == sorted(theirs)
    for key, p in ours.items():
        assert not torch.equal(p.detach(), initial[_file_key(key)])
        torch.testing.assert_close(
            p.detach(), theirs[_peft_name(key)].detach(), atol=1e-5, rtol=1e-4, msg=key
        )
