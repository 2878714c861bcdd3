"""The fused vocabulary projection + cross-entropy equals the plain one: losses and gradients."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from mixloom.trainer import loss as fused_loss
from mixloom.trainer.loss import linear_cross_entropy


def _data(n: int = 37, hidden: int = 24, vocab: int = 101, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(n, hidden, generator=g)
    W = torch.randn(vocab, hidden, generator=g) * 0.3
    y = torch.randint(0, vocab, (n,), generator=g)
    row_w = torch.rand(n, generator=g)
    return h, W, y, row_w


def _plain(h, W, y, row_w, softcap=None):
    h = h.clone().requires_grad_(True)
    logits = (h @ W.t()).float()
    if softcap is not None:
        logits = softcap * torch.tanh(logits / softcap)
    losses = F.cross_entropy(logits, y, reduction="none")
    (losses * row_w).sum().backward()
    return losses.detach(), h.grad


def _fused(h, W, y, row_w, softcap=None):
    h = h.clone().requires_grad_(True)
    losses = linear_cross_entropy(h, W, y, softcap)
    (losses * row_w).sum().backward()
    return losses.detach(), h.grad


@pytest.mark.parametrize("softcap", [None, 2.0], ids=["plain", "softcap"])
@pytest.mark.parametrize("chunk_bytes", [None, 5 * 101 * 4], ids=["one_chunk", "chunks_of_5"])
def test_matches_cross_entropy(monkeypatch, softcap, chunk_bytes):
    if chunk_bytes is not None:  # 5 rows a chunk (37 rows: 7 full chunks and a short one)
        monkeypatch.setattr(fused_loss, "_CHUNK_BYTES", chunk_bytes)
        monkeypatch.setattr(fused_loss, "_MIN_ROWS", 1)
        assert fused_loss.chunk_rows(101) == 5
    h, W, y, row_w = _data()
    want_loss, want_grad = _plain(h, W, y, row_w, softcap)
    got_loss, got_grad = _fused(h, W, y, row_w, softcap)
    torch.testing.assert_close(got_loss, want_loss, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got_grad, want_grad, rtol=1e-5, atol=1e-6)


def test_unused_rows_send_exact_zero_even_when_nan():
    """A failed job's rows (NaN hidden states, loss left out of the objective) must not send
    NaN back into the shared base's backward."""
    h, W, y, _ = _data()
    h[3] = float("nan")
    h = h.requires_grad_(True)
    losses = linear_cross_entropy(h, W, y)
    assert torch.isnan(losses[3]) and torch.isfinite(losses[4:]).all()
    keep = torch.ones(len(y))
    keep[:5] = 0.0  # rows 0-4 belong to the failed job
    (losses[5:] * keep[5:]).sum().backward()
    assert (h.grad[:5] == 0).all()
    assert torch.isfinite(h.grad).all() and (h.grad[5:].abs().sum(1) > 0).all()


def test_no_grad_path_and_empty_and_frozen_weight():
    h, W, y, _ = _data()
    with torch.no_grad():
        got = linear_cross_entropy(h, W, y)
    torch.testing.assert_close(got, F.cross_entropy(h @ W.t(), y, reduction="none"))
    empty = linear_cross_entropy(h[:0].requires_grad_(True), W, y[:0])
    assert empty.shape == (0,)
    with pytest.raises(ValueError, match="frozen"):
        linear_cross_entropy(h, W.requires_grad_(True), y)
