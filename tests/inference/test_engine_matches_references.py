"""A mixed batch decodes each model exactly as that model decodes alone in the ecosystem's
own code: the base in transformers' `generate`, a LoRA in PEFT's, a MixLoRA in the `mixlora`
package's model; requests arriving at different steps, one prompt prefilled in chunks while
the others decode."""

from __future__ import annotations

import os
from pathlib import Path

import torch
from infer_helpers import BASE, SPECS, greedy, make_engine, prompt
from torch import nn
from transformers import AutoModelForCausalLM

MAX_TOKENS = 12


def _in_mixlora(folder: Path) -> nn.Module:
    """The export loaded by the `mixlora` package (its adapter_model.bin written as a user
    would), in eval mode with its dropout off (it leaves expert dropout on in eval mode:
    mixloom.interop.mixlora_eval)."""
    from mixlora import MixLoraModelForCausalLM

    from mixloom.interop import mixlora_eval, write_mixlora_bin

    write_mixlora_bin(folder)
    ref, _ = MixLoraModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32)
    return mixlora_eval(ref)  # type: ignore[no-any-return]


def reference(
    base_dir: Path, folders: dict[str, Path], model_id: str, ids: list[int], eos: list[int]
) -> list[int]:
    """Greedy tokens of the model decoded alone by its own library's generate."""
    if model_id == BASE:
        model = AutoModelForCausalLM.from_pretrained(base_dir)
    elif SPECS[model_id].is_mixlora:
        model = _in_mixlora(folders[model_id])
    else:
        from peft import PeftModel

        base = AutoModelForCausalLM.from_pretrained(base_dir)
        model = PeftModel.from_pretrained(base, str(folders[model_id]))
    model.eval()
    with torch.no_grad():
        out = model.generate(
            input_ids=torch.tensor([ids]),
            max_new_tokens=MAX_TOKENS,
            do_sample=False,
            eos_token_id=eos,
            pad_token_id=0,
        )
    return out[0, len(ids) :].tolist()  # type: ignore[no-any-return]


def test_mixed_batch_equals_each_model_alone(base_dir: Path, adapter_dirs: dict[str, Path]) -> None:
    engine = make_engine(base_dir, adapter_dirs)  # 16 tokens a step
    long = prompt(0, 45)
    arrivals = {  # step -> (model id, prompt)
        0: [("lora-a", prompt(1, 7)), ("moe-c", prompt(2, 5)), (BASE, prompt(3, 4))],
        2: [("moe-d", prompt(4, 9)), ("lora-b", prompt(5, 6))],
        3: [(BASE, long)],
        5: [("moe-c", prompt(6, 3)), ("lora-b", prompt(7, 11))],
    }
    handles = []
    stats = []
    first_token_step: list[int] = []  # of the long prompt
    while len(stats) <= max(arrivals) or engine.has_work:
        for model_id, ids in arrivals.get(len(stats), []):
            step = len(stats)
            on_delta = (
                (lambda d, s=step: first_token_step.append(len(stats))) if ids is long else None
            )
            handle = engine.submit(model_id, ids, greedy(MAX_TOKENS), on_delta=on_delta)
            handles.append((model_id, ids, handle))
        stats.append(engine.step())
        assert len(stats) < 200
    # the long prompt was prefilled in chunks over several steps, and the others went on
    # decoding in each of them
    prefill_steps = stats[3 : first_token_step[0] + 1]
    assert len(prefill_steps) >= 3
    assert all(s.decode_tokens > 0 for s in prefill_steps)
    assert all(
        s.prefill_tokens > 0 and s.prefill_tokens + s.decode_tokens <= 16 for s in prefill_steps
    )

    eos = sorted(engine.eos_ids)
    for model_id, ids, handle in handles:
        got = handle.result(timeout=0).choices[0].token_ids
        assert len(got) == MAX_TOKENS or got[-1] in eos
        assert got == reference(base_dir, adapter_dirs, model_id, ids, eos), model_id
        if model_id != BASE:  # the adapter changes what the model says
            assert got != reference(base_dir, adapter_dirs, BASE, ids, eos), model_id
    assert not engine.has_work and engine.adapters.loaded.keys() == set(SPECS)


def test_the_triton_kernels_decode_as_the_torch_path(
    base_dir: Path, adapter_dirs: dict[str, Path]
) -> None:
    """The worker's kernels on a GPU (here in Triton's interpreter: TRITON_INTERPRET=1)."""
    if not torch.cuda.is_available():
        assert os.environ.get("TRITON_INTERPRET") == "1", "scripts/test.sh sets TRITON_INTERPRET=1"
    work = [("lora-b", prompt(8, 6)), ("moe-d", prompt(9, 9)), (BASE, prompt(10, 4))]
    outputs = {}
    for backend in ("torch", "triton"):
        engine = make_engine(base_dir, adapter_dirs, backend=backend)
        handles = [engine.submit(m, ids, greedy(4)) for m, ids in work]
        while engine.has_work:
            engine.step()
        outputs[backend] = [h.result().choices[0].token_ids for h in handles]
    assert outputs["triton"] == outputs["torch"]
