"""Routing variants, the load-balance loss against an independent Mixtral-formula
computation, and eval mode (no dropout, no jitter)."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from tiny import tiny_llama

from mixloom.model.adapter_model import AdapterModel
from mixloom.model.batch import Segment
from mixloom.model.routing import route
from mixloom.model.specs import AdapterSpec, LoraSpec


def test_top_k_keeps_k_largest_renormalised() -> None:
    probs = torch.tensor([[0.1, 0.5, 0.3, 0.1], [0.4, 0.05, 0.05, 0.5]])
    w, e, chosen = route(probs, AdapterSpec("a", kind="mixlora", num_experts=4, top_k=2))
    assert e.tolist() == [[1, 2], [3, 0]]
    torch.testing.assert_close(w, torch.tensor([[0.625, 0.375], [5 / 9, 4 / 9]]))
    assert chosen.tolist() == [[False, True, True, False], [True, False, False, True]]


def test_switch_takes_top_1_with_its_raw_probability() -> None:
    probs = torch.tensor([[0.1, 0.6, 0.3], [0.5, 0.2, 0.3]])
    w, e, _ = route(probs, AdapterSpec("a", kind="mixlora", num_experts=3, routing="switch"))
    assert e.tolist() == [[1], [0]]
    torch.testing.assert_close(w, torch.tensor([[0.6], [0.5]]))


def test_top_p_keeps_experts_until_mass_reaches_p() -> None:
    probs = torch.tensor(
        [[0.5, 0.3, 0.15, 0.05], [0.9, 0.04, 0.03, 0.03], [0.25, 0.25, 0.25, 0.25]]
    )
    spec = AdapterSpec("a", kind="mixlora", num_experts=4, routing="top_p", top_p=0.8)
    w, e, chosen = route(probs, spec)
    # row 0: 0.5 < 0.8, 0.5+0.3 = 0.8 reaches p -> experts {0, 1}
    # row 1: 0.9 alone reaches p -> {0}; row 2: needs 4 x 0.25 > 0.75 -> all four
    assert chosen.sum(1).tolist() == [2, 1, 4]
    assert chosen[0].tolist() == [True, True, False, False]
    torch.testing.assert_close(w.sum(1), torch.ones(3))
    torch.testing.assert_close(w[0, :2], torch.tensor([0.625, 0.375]))
    assert (w[0, 2:] == 0).all()


def _mixtral_aux(logits: list[torch.Tensor], k: int, num: int) -> torch.Tensor:
    """Independent: the Mixtral load-balancing formula over all layers' logits."""
    cat = torch.cat(logits)
    probs = F.softmax(cat, dim=-1)
    _, sel = torch.topk(probs, k, dim=-1)
    mask = F.one_hot(sel, num).float()  # (n, k, E)
    tokens_per_expert = mask.mean(0)  # (k, E)
    prob_per_expert = probs.mean(0)  # (E,)
    return num * (tokens_per_expert * prob_per_expert[None]).sum()


def test_aux_loss_equals_mixtral_formula_on_real_tokens_only() -> None:
    spec = AdapterSpec("m", kind="mixlora", num_experts=4, top_k=2, aux_loss_coef=0.01)
    model = AdapterModel(tiny_llama())
    model.add_adapter(spec)
    ids = torch.randint(0, 128, (2, 9), generator=torch.Generator().manual_seed(0))
    mask = torch.ones(2, 9, dtype=torch.long)
    mask[1, 6:] = 0  # padding must not count
    captured: list[torch.Tensor] = []
    for layer in model.model.model.layers:
        router = layer.mlp.moe["m"].router
        hook = layer.mlp.register_forward_pre_hook(
            lambda mod, args, r=router: captured.append(
                args[0].reshape(-1, args[0].shape[-1])[mask.reshape(-1).bool()].float()
                @ r.float().t()
            )
        )
        layer.mlp._hook = hook
    with torch.no_grad(), model.fused([Segment("m", 0, 2)], mask, training=True):
        model.model(input_ids=ids, attention_mask=mask)
        aux = model.aux_losses()["m"]
    expected = 0.01 * _mixtral_aux(captured, 2, 4)
    torch.testing.assert_close(aux, expected)


def test_eval_mode_has_no_dropout_and_training_does() -> None:
    spec = AdapterSpec(
        "d",
        kind="mixlora",
        lora=LoraSpec(r=4, dropout=0.5),
        expert=LoraSpec(r=4, dropout=0.5),
        num_experts=4,
        jitter_noise=0.1,
    )
    model = AdapterModel(tiny_llama())
    model.add_adapter(spec)
    with torch.no_grad():
        for _, p in model.named_adapter_parameters("d"):
            p.add_(0.1)
    ids = torch.randint(0, 128, (2, 8), generator=torch.Generator().manual_seed(2))

    def run(training: bool) -> torch.Tensor:
        with torch.no_grad(), model.fused([Segment("d", 0, 2)], None, training=training):
            return model.model(input_ids=ids).logits

    torch.testing.assert_close(run(False), run(False), atol=0, rtol=0)
    assert (run(True) - run(True)).abs().max() > 1e-4


def test_dropout_backward_uses_the_forward_mask() -> None:
    """dA and dB of a LoRA with dropout equal the hand-derived gradients with the same mask."""
    spec = AdapterSpec(
        "g", kind="lora", lora=LoraSpec(r=4, alpha=8, dropout=0.5), targets=("q_proj",)
    )
    model = AdapterModel(tiny_llama())
    model.add_adapter(spec)
    layer = model.model.model.layers[0].self_attn.q_proj
    w = layer.adapters["g"]
    with torch.no_grad():
        w.lora_B.normal_(0, 0.1, generator=torch.Generator().manual_seed(0))
    x = torch.randn(2, 5, 64, generator=torch.Generator().manual_seed(1))
    dy = torch.randn(2, 5, 64, generator=torch.Generator().manual_seed(2))
    model.generators["g"].manual_seed(11)
    with model.fused([Segment("g", 0, 2)], None, training=True):
        (layer(x) * dy).sum().backward()
    # the same mask, drawn by hand from the same stream: on CPU one 63-bit seed from the
    # stream, expanded by PCG64 into 64-bit words; 16 bits a decision, four a word, dropped
    # when below round(p * 2**16) - 2**15 as int16
    gen = torch.Generator().manual_seed(11)
    seed = int(torch.randint(0, 2**63 - 1, (1,), generator=gen))
    words = torch.from_numpy(np.random.PCG64(seed).random_raw(160).view(np.int64))
    keep = (words.view(torch.int16).view(10, 64) >= round(0.5 * 2**16) - 2**15).float()
    assert 0.4 < keep.mean() < 0.6
    xd = x.reshape(10, 64) * keep * 2.0  # (n, H)
    g = dy.reshape(10, 64)  # (n, N)
    s = spec.lora.scale
    A, B = w.lora_A.detach(), w.lora_B.detach()
    torch.testing.assert_close(w.lora_B.grad, s * g.t() @ (xd @ A.t()))
    torch.testing.assert_close(w.lora_A.grad, s * (g @ B).t() @ xd)
