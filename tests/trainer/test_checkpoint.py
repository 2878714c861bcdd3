"""Checkpoints are verified when written and when read: a manifest (size and sha256 of each
file) is written last and checked on load; a write that fails leaves the previous checkpoint
in place and no partial folder; a resume skips a damaged checkpoint for the one before it,
and still ends equal to an uninterrupted run."""

from __future__ import annotations

import errno
import json
from pathlib import Path

import pytest
import torch
from tiny import save_tiny_base, tiny_llama
from trainer_helpers import lora_hp, make_job, synthetic_rows, trainer_for

from mixloom.config import ModelSettings
from mixloom.model.base import load_base_model
from mixloom.trainer import checkpoint as ckpt_module
from mixloom.trainer.checkpoint import (
    MANIFEST,
    STATE_FILE,
    CorruptCheckpointError,
    load_checkpoint,
    save_checkpoint,
    storage_problem,
)
from mixloom.trainer.session import TrainingSession


def _trained(steps: int):  # type: ignore[no-untyped-def]
    trainer = trainer_for(tiny_llama())
    trainer.add_job(make_job("lo", lora_hp(batch_size=2), seed=1, n_rows=8))
    for _ in range(steps):
        trainer.step()
    return trainer


def test_checkpoint_has_a_manifest_and_a_damaged_file_is_refused(tmp_path: Path) -> None:
    trainer = _trained(2)
    folder = save_checkpoint(trainer, "lo", tmp_path / "step-2", "tiny")
    manifest = json.loads((folder / MANIFEST).read_text())
    assert STATE_FILE in manifest and "adapter_model.safetensors" in manifest
    assert [p.name for p in tmp_path.iterdir()] == ["step-2"]  # no partial folder left
    assert load_checkpoint(folder)["counters"]["step"] == 2

    state = folder / STATE_FILE
    data = state.read_bytes()
    state.write_bytes(data[: len(data) // 2])  # truncated, as by a full disk
    with pytest.raises(CorruptCheckpointError, match="bytes"):
        load_checkpoint(folder)
    state.write_bytes(data[:-1] + bytes([data[-1] ^ 1]))  # same size, one bit off
    with pytest.raises(CorruptCheckpointError, match="sha256"):
        load_checkpoint(folder)


def test_a_checkpoint_stores_the_weights_once_and_resumes_from_them(tmp_path: Path) -> None:
    """The trainer state keeps optimizer, schedule, RNG and cursor; the weights are only in
    the adapter file beside it, and a resume reads them from there exactly."""
    trainer = _trained(2)
    folder = save_checkpoint(trainer, "lo", tmp_path / "step-2", "tiny")
    saved = torch.load(folder / STATE_FILE, weights_only=True)
    assert "adapter" not in saved and "optimizer" in saved
    assert sorted(p.name for p in folder.iterdir()) == [
        "adapter_config.json",
        "adapter_model.safetensors",
        MANIFEST,
        "mixloom_adapter.json",
        "progress.json",
        STATE_FILE,
    ]
    again = trainer_for(tiny_llama())
    again.add_job(
        make_job("lo", lora_hp(batch_size=2), seed=1, n_rows=8), resume=load_checkpoint(folder)
    )
    want, got = trainer.model.adapter_state_dict("lo"), again.model.adapter_state_dict("lo")
    for k in want:
        assert torch.equal(want[k], got[k]), k
    trainer.step()
    again.step()
    for k, v in trainer.model.adapter_state_dict("lo").items():
        assert torch.equal(v, again.model.adapter_state_dict("lo")[k]), k


def test_a_failed_write_keeps_the_previous_checkpoint(tmp_path: Path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    trainer = _trained(2)
    folder = save_checkpoint(trainer, "lo", tmp_path / "step-2", "tiny")
    before = (folder / STATE_FILE).read_bytes()
    trainer.step()

    def full(*args, **kwargs):  # type: ignore[no-untyped-def]
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(ckpt_module, "_write_synced", full)
    with pytest.raises(OSError) as caught:
        save_checkpoint(trainer, "lo", folder, "tiny")
    assert storage_problem(caught.value) is not None
    assert [p.name for p in tmp_path.iterdir()] == ["step-2"]
    assert (folder / STATE_FILE).read_bytes() == before
    assert load_checkpoint(folder)["counters"]["step"] == 2


@pytest.mark.parametrize(
    ("exc", "transient"),
    [
        (OSError(errno.ENOSPC, "No space left on device"), True),
        (OSError(errno.EROFS, "Read-only file system"), True),
        (OSError(errno.EIO, "Input/output error"), True),
        (
            RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 576 vs 534"),
            True,
        ),
        (
            Exception("Error while serializing: I/O error: No space left on device (os error 28)"),
            True,
        ),
        (OSError(errno.ENOENT, "No such file or directory"), False),
        (ValueError("bad"), False),
    ],
)
def test_storage_problem_tells_transient_storage_errors(
    exc: BaseException, transient: bool
) -> None:
    assert (storage_problem(exc) is not None) == transient


def _session(base: Path) -> TrainingSession:
    settings = ModelSettings(base_model=str(base), device="cpu", kernel_backend="torch")
    return TrainingSession(load_base_model(str(base), dtype="float32", device="cpu"), settings)


def _add(session: TrainingSession, folder: Path):  # type: ignore[no-untyped-def]
    hp = lora_hp(batch_size=2, checkpoint_every=2, lr_scheduler="cosine", warmup_ratio=0.2)
    rows = synthetic_rows(12, seed=5, vocab=100)
    return session.add("lo", hp, seed=3, rows=rows, folder=folder)


def test_resume_skips_a_truncated_checkpoint_and_equals_uninterrupted(tmp_path: Path) -> None:
    base = save_tiny_base(tmp_path / "base")
    straight = _session(base)
    _add(straight, tmp_path / "straight")
    while straight.active:
        straight.step()

    first = _session(base)
    job = _add(first, tmp_path / "run")
    while job.step < 5:  # checkpoints at steps 2 and 4
        first.step()
    del first  # the crash
    checkpoints = tmp_path / "run" / "checkpoints"
    state = checkpoints / "step-4" / STATE_FILE
    state.write_bytes(state.read_bytes()[:100])
    (checkpoints / "step-6.partial99999").mkdir()  # a write a killed process left behind

    resumed = _session(base)
    job = _add(resumed, tmp_path / "run")
    found = resumed.resumes["lo"]
    assert job.step == 2 and found.step == 2
    assert [n for n, _ in found.corrupt] == [4]
    text = found.describe()
    assert text is not None and "checkpoint at step 4 is corrupt" in text
    assert "resuming from step 2" in text
    assert sorted(p.name for p in checkpoints.iterdir()) == ["step-2"]
    while resumed.active:
        resumed.step()
    a = straight.model.adapter_state_dict("lo")
    b = resumed.model.adapter_state_dict("lo")
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=1e-6, rtol=1e-5, msg=k)
