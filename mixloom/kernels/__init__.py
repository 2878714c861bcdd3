"""Grouped (multi-job, multi-expert) LoRA matmuls. The only package that imports triton.

Backends: "torch" (reference, any device), "triton" (CUDA, or CPU with TRITON_INTERPRET=1),
"auto" (triton on CUDA when importable, else torch). Env MIXLOOM_KERNEL_BACKEND overrides "auto".
"""

from __future__ import annotations

import os

import torch
from torch import Tensor

from mixloom.kernels import reference

BACKENDS = ("auto", "torch", "triton")


def resolve_backend(name: str, device: torch.device) -> str:
    """Turn "auto" into a concrete backend for tensors on `device`."""
    if name == "auto":
        name = os.environ.get("MIXLOOM_KERNEL_BACKEND", "auto")
    if name not in BACKENDS:
        raise ValueError(f"kernel_backend must be one of {BACKENDS}, got {name!r}")
    if name == "auto":
        return "triton" if device.type == "cuda" and _triton_available() else "torch"
    return name


def _triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def lora_segments(
    x: Tensor,
    A: Tensor,
    B: Tensor,
    scale: Tensor,
    offsets: Tensor,
    rows: Tensor | None = None,
    *,
    backend: str = "torch",
) -> Tensor:
    """Grouped LoRA: y[p] = scale[g] * (x[rows[p]] @ A[g].T) @ B[g].T. See reference.py."""
    if backend == "triton":
        from mixloom.kernels import segmented

        return segmented.lora_segments(x, A, B, scale, offsets, rows)
    return reference.lora_segments(x, A, B, scale, offsets, rows)
