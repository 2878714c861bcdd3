"""Checkpoints: the adapter in its export format plus everything needed to resume exactly
(optimizer, LR schedule, RNG stream, data cursor), written atomically."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch

from mixloom.model.formats import save_adapter
from mixloom.trainer.fused import FusedTrainer

STATE_FILE = "trainer_state.pt"


def save_checkpoint(trainer: FusedTrainer, name: str, folder: str | Path, base_name: str) -> Path:
    """Write `folder` (adapter files + trainer_state.pt) via a temp folder and a rename, so a
    crash never leaves a half-written checkpoint where a reader would find it."""
    folder = Path(folder)
    tmp = folder.with_name(folder.name + f".partial{os.getpid()}")
    if tmp.exists():
        shutil.rmtree(tmp)
    save_adapter(trainer.model, name, tmp, base_name)
    state = trainer.job_state(name)
    torch.save(state, tmp / STATE_FILE)
    (tmp / "progress.json").write_text(json.dumps(state["counters"]))
    if folder.exists():
        shutil.rmtree(folder)
    tmp.replace(folder)
    return folder


def load_checkpoint(folder: str | Path) -> dict[str, Any]:
    path = Path(folder) / STATE_FILE
    return torch.load(path, map_location="cpu", weights_only=True)


def latest_checkpoint(root: str | Path) -> Path | None:
    """The complete checkpoint with the highest step under root (folders named step-N)."""
    best: tuple[int, Path] | None = None
    root = Path(root)
    if not root.exists():
        return None
    for p in root.iterdir():
        if p.name.startswith("step-") and (p / STATE_FILE).exists():
            try:
                n = int(p.name[5:])
            except ValueError:
                continue
            if best is None or n > best[0]:
                best = (n, p)
    return best[1] if best else None
