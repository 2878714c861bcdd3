"""MixLoRA experts recomputed in the backward (the default) train exactly like experts whose
activations are kept, dropout masks included, and keep no per-pair activation."""

from __future__ import annotations

import os

import pytest
import torch
from tiny import tiny_llama
from trainer_helpers import make_job, mixlora_hp, three_kinds

from mixloom.model.adapter_model import AdapterModel
from mixloom.trainer.fused import FusedTrainer

NAMES = ("lo", "mx", "sw")


def _jobs():  # type: ignore[no-untyped-def]
    return three_kinds(lora_dropout=0.1)


def _trainer(backend: str, recompute: bool) -> FusedTrainer:
    model = AdapterModel(tiny_llama(), backend=backend, recompute=recompute)
    return FusedTrainer(model, pad_id=0)


@pytest.mark.parametrize(
    ("backend", "rng"),
    [("torch", "stream"), ("triton", "counter")],  # the CPU's defaults; the GPU's
)
def test_recomputed_experts_train_like_kept_ones(
    backend: str, rng: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    if "triton" in (backend, rng) and not torch.cuda.is_available():
        assert os.environ.get("TRITON_INTERPRET") == "1", "scripts/test.sh sets TRITON_INTERPRET=1"
    # counter: dropout masks from the counter-based kernel, redrawn in the backward from the
    # seeds the replay draws again
    monkeypatch.setenv("MIXLOOM_DROPOUT_RNG", "counter" if rng == "counter" else "stream")
    weights, streams = {}, {}
    for recompute in (True, False):
        trainer = _trainer(backend, recompute)
        for job in _jobs():
            trainer.add_job(job)
        for _ in range(3):  # masks of later steps come from where the first steps left them
            trainer.step()
        weights[recompute] = {n: trainer.model.adapter_state_dict(n) for n in NAMES}
        streams[recompute] = {n: trainer.model.generators[n].get_state() for n in NAMES}
    for name in NAMES:
        assert torch.equal(streams[True][name], streams[False][name]), name
        for k, v in weights[False][name].items():
            torch.testing.assert_close(
                weights[True][name][k], v, atol=1e-6, rtol=1e-5, msg=f"{name} {k}"
            )
    # and training moved them: the comparison is not between two untouched initialisations
    fresh = _trainer(backend, True)
    for job in _jobs():
        fresh.add_job(job)
    moved = fresh.model.adapter_state_dict("mx")
    assert any(not torch.equal(moved[k], v) for k, v in weights[True]["mx"].items())


def _saved_shapes(
    recompute: bool, monkeypatch: pytest.MonkeyPatch
) -> tuple[list[tuple[int, ...]], list[tuple[int, ...]], int]:
    """Shapes of what the forward of one step of one MixLoRA job (dropout on attention LoRA
    and experts) keeps for the backward, 2-d bool ones (dropout masks) apart, and the
    step's token rows (batch x length). What a recomputation saves in the backward is
    freed at once, so saves stop counting when the backward begins."""
    trainer = _trainer("torch", recompute)
    trainer.add_job(
        make_job("mx", mixlora_hp(num_experts=4, top_k=2, lora_dropout=0.1), seed=2, n_rows=4)
    )
    model_storages = {p.untyped_storage().data_ptr() for p in trainer.model.parameters()}
    shapes: list[tuple[int, ...]] = []
    masks: list[tuple[int, ...]] = []
    began = []
    backward = torch.Tensor.backward

    def marked_backward(t: torch.Tensor, *args: object, **kwargs: object) -> None:
        began.append(True)
        backward(t, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(torch.Tensor, "backward", marked_backward)

    def pack(t: torch.Tensor) -> torch.Tensor:
        if not began and t.untyped_storage().data_ptr() not in model_storages:
            (masks if t.dtype == torch.bool and t.dim() == 2 else shapes).append(tuple(t.shape))
        return t

    sizes = []

    def count_rows(module, args, out):  # type: ignore[no-untyped-def]
        sizes.append(args[0].shape[0] * args[0].shape[1])

    mlp = trainer.model.model.model.layers[0].mlp
    handle = mlp.register_forward_hook(count_rows)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        trainer.step()
    handle.remove()
    assert began, "the step ran no backward"
    return shapes, masks, sizes[0]


def test_recompute_keeps_no_per_pair_activation_and_no_mask(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    inter = tiny_llama().config.intermediate_size
    for recompute in (False, True):
        with monkeypatch.context() as m:
            shapes, masks, tokens = _saved_shapes(recompute, m)
        wide = [s for s in shapes if s and s[-1] == inter]  # FFN-width activations
        per_token = [s for s in wide if s[0] == tokens]  # (B*T, I): frozen gate and up
        per_pair = [s for s in wide if s not in per_token]  # (P, I), stacked (E, R, I), ...
        if recompute:
            # only the frozen gate and up outputs, one row a token, for every layer
            assert per_pair == [], per_pair
            assert 0 < len(per_token) <= 2 * tiny_llama().config.num_hidden_layers
            assert masks == [], masks  # redrawn in the backward
        else:  # the checks can fail: kept experts save per-pair (P, I) tensors, and masks
            assert per_pair, wide
            assert masks


def test_recompute_is_on_for_gpus_and_off_for_cpus_unless_asked() -> None:
    assert AdapterModel(tiny_llama()).state.recompute is False  # this model is on the CPU
    assert AdapterModel(tiny_llama(), recompute=True).state.recompute is True
    if torch.cuda.is_available():
        assert AdapterModel(tiny_llama().cuda()).state.recompute is True
