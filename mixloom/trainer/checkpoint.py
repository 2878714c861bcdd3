"""Checkpoints: the adapter in its export format plus everything needed to resume exactly
(optimizer, LR schedule, RNG stream, data cursor), written atomically and verified. The
adapter's weights are stored once, in its export file: the trainer state holds the rest, and
a resume reads the weights back from the export (`load_checkpoint` names the folder).

A checkpoint folder `step-N/` is written as `step-N.partial<pid>/`: each file fsynced, a
`manifest.json` (sha256 and size of every file) last, the whole re-read and the state loaded
back before the folder is renamed into place (the old one, if any, is moved aside first and
removed only after the rename). A reader checks the manifest again (`load_checkpoint`), so a
checkpoint truncated or damaged on disk afterwards is refused, and `load_latest` falls back
to the previous good one.

With an object store (storage/objects.py) the worker writes the folder here, then
`upload_checkpoint` puts its files into the store, the manifest last (a checkpoint without
its manifest is absent to readers); a resume on another machine first copies the newest
recorded checkpoints back (`fetch_checkpoints`) and verifies them as above.
"""

from __future__ import annotations

import errno
import hashlib
import io
import json
import logging
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from mixloom.errors import MixloomError
from mixloom.model.formats import WEIGHTS_FILE, save_adapter
from mixloom.trainer.fused import FusedTrainer

if TYPE_CHECKING:  # the worker passes one in; the trainer never opens a store itself
    from mixloom.storage.objects import ObjectStore

STATE_FILE = "trainer_state.pt"
MANIFEST = "manifest.json"
# Leftovers of a write that did not finish (a crashed or killed process): never read.
PARTIAL_MARKS = (".partial", ".old", ".tmp")
# errno of storage that is full or gone for now: the job waits (paused) instead of failing.
TRANSIENT_ERRNOS = (errno.ENOSPC, errno.EROFS, errno.EIO, errno.EDQUOT)
# The same conditions as libraries word them when they do not raise an OSError: safetensors
# ("I/O error: No space left on device (os error 28)") and torch.save, whose zip writer only
# says "unexpected pos 576 vs 534" when the file system refuses a write.
_TRANSIENT_TEXT = tuple(os.strerror(e) for e in TRANSIENT_ERRNOS) + ("unexpected pos",)

log = logging.getLogger("mixloom.checkpoint")


class CorruptCheckpointError(MixloomError):
    """A checkpoint on disk does not match its manifest or cannot be loaded."""


def storage_problem(exc: BaseException) -> str | None:
    """The reason when `exc` (or what caused it) is storage full, read-only or failing,
    which passes when space is freed or the disk comes back; None for any other error. The
    reason names no path (tenants read it)."""
    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, OSError) and seen.errno in TRANSIENT_ERRNOS:
            return os.strerror(seen.errno)
        text = str(seen)
        for reason in _TRANSIENT_TEXT:
            if reason in text:
                return reason if reason != "unexpected pos" else "a write to storage failed"
        seen = seen.__cause__ or seen.__context__
    return None


def _write_synced(path: Path, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def _fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _digest(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def save_checkpoint(
    trainer: FusedTrainer,
    name: str,
    folder: str | Path,
    base_name: str,
    *,
    base_path: str | None = None,
    rendering: str = "chat",
) -> Path:
    """Write `folder` (adapter files, trainer_state.pt, progress.json, manifest.json) via a
    temp folder and a rename, verified before the rename, so that a reader never finds a
    half-written or unreadable checkpoint where it looks. An error leaves no temp folder and
    the previous checkpoint (if any) in place. `base_name`, `base_path`, `rendering`:
    formats.save_adapter's."""
    folder = Path(folder)
    tmp = folder.with_name(folder.name + f".partial{os.getpid()}")
    old = folder.with_name(folder.name + f".old{os.getpid()}")
    try:
        if tmp.exists():
            shutil.rmtree(tmp)
        save_adapter(trainer.model, name, tmp, base_name, base_path=base_path, rendering=rendering)
        state = trainer.job_state(name)
        del state["adapter"]  # stored once: the export file beside it has the weights
        # serialised in memory, written here: a full disk is then an OSError (ENOSPC), not
        # torch's "unexpected pos"
        buffer = io.BytesIO()
        torch.save(state, buffer)
        _write_synced(tmp / STATE_FILE, buffer.getvalue())
        _write_synced(tmp / "progress.json", json.dumps(state["counters"]).encode())
        files = sorted(p for p in tmp.iterdir() if p.is_file())
        for p in files:
            _fsync_file(p)
        manifest = {p.name: {"sha256": _digest(p), "bytes": p.stat().st_size} for p in files}
        _write_synced(tmp / MANIFEST, json.dumps(manifest, indent=1).encode())
        _fsync_dir(tmp)
        load_checkpoint(tmp)  # what a resume will read: refuse it now rather than then
        if folder.exists():
            if old.exists():
                shutil.rmtree(old)
            folder.replace(old)
        tmp.replace(folder)
        _fsync_dir(folder.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        if old.exists() and not folder.exists():
            old.replace(folder)  # the rename into place failed: put the previous one back
        raise
    shutil.rmtree(old, ignore_errors=True)
    return folder


def verify_checkpoint(folder: str | Path) -> None:
    """Raise CorruptCheckpointError unless every file in the manifest has its size and
    sha256. A checkpoint written before manifests existed is checked by loading alone."""
    folder = Path(folder)
    path = folder / MANIFEST
    if not path.exists():
        if not (folder / STATE_FILE).exists():
            raise CorruptCheckpointError(f"{folder} has no {STATE_FILE}")
        return
    try:
        manifest = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise CorruptCheckpointError(f"{path} is unreadable: {exc}") from exc
    for fname, want in manifest.items():
        p = folder / fname
        if not p.is_file():
            raise CorruptCheckpointError(f"{fname} is missing")
        size = p.stat().st_size
        if size != want["bytes"]:
            raise CorruptCheckpointError(f"{fname} has {size} bytes, {want['bytes']} written")
        if _digest(p) != want["sha256"]:
            raise CorruptCheckpointError(f"{fname} does not match its sha256")


def load_checkpoint(folder: str | Path) -> dict[str, Any]:
    """The trainer state of a verified checkpoint (CorruptCheckpointError otherwise). Its
    adapter weights are the folder's export file (`adapter_dir`, read by
    FusedTrainer.add_job); a checkpoint written before that keeps them as `adapter`."""
    verify_checkpoint(folder)
    path = Path(folder) / STATE_FILE
    try:
        state: dict[str, Any] = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        if storage_problem(exc) and not isinstance(exc, RuntimeError):
            raise  # the disk failed, not the checkpoint
        raise CorruptCheckpointError(f"{STATE_FILE} cannot be loaded: {exc}") from exc
    if "adapter" not in state:
        if not (Path(folder) / WEIGHTS_FILE).is_file():
            raise CorruptCheckpointError(f"{WEIGHTS_FILE} is missing")
        state["adapter_dir"] = str(folder)
    return state


def checkpoint_step(path: Path) -> int | None:
    """N of a folder named step-N; None for anything else (a partial write, a file)."""
    if not path.name.startswith("step-"):
        return None
    try:
        return int(path.name[5:])
    except ValueError:
        return None


def checkpoints(root: str | Path) -> list[tuple[int, Path]]:
    """The checkpoint folders under root, newest (highest step) first."""
    root = Path(root)
    if not root.exists():
        return []
    found = []
    for p in root.iterdir():
        n = checkpoint_step(p)
        if n is not None and p.is_dir():
            found.append((n, p))
    return sorted(found, reverse=True)


def latest_checkpoint(root: str | Path) -> Path | None:
    """The checkpoint with the highest step under root (folders named step-N) that has a
    trainer state; not verified (load_checkpoint verifies)."""
    for _, p in checkpoints(root):
        if (p / STATE_FILE).exists():
            return p
    return None


@dataclass
class Resume:
    """Where a job resumes: the state of its newest good checkpoint (None: from scratch),
    and each newer one that was refused, with why."""

    state: dict[str, Any] | None = None
    folder: Path | None = None
    step: int = 0
    corrupt: list[tuple[int, str]] = field(default_factory=list)

    def describe(self) -> str | None:
        """One sentence on the refused checkpoints and the fallback (None if none)."""
        if not self.corrupt:
            return None
        bad = "; ".join(f"checkpoint at step {n} is corrupt ({why})" for n, why in self.corrupt)
        where = f"resuming from step {self.step}" if self.state else "starting from scratch"
        return f"{bad}; {where}"


def load_latest(root: str | Path, *, at_most: int | None = None) -> Resume:
    """The newest checkpoint under root that verifies and loads; a corrupt one is logged,
    removed (it would be refused again on every resume) and the one before it tried.
    `at_most`: the newest step its owner recorded (the worker's database); a checkpoint
    past it was written by a run that died before recording it (and its step's metrics),
    so it is removed and that step trained again."""
    out = Resume()
    for n, p in checkpoints(root):
        if at_most is not None and n > at_most:
            log.info("checkpoint %s was never recorded; training its steps again", p)
            shutil.rmtree(p, ignore_errors=True)
            continue
        try:
            state = load_checkpoint(p)
        except CorruptCheckpointError as exc:
            log.warning("checkpoint %s is corrupt (%s); trying the one before it", p, exc)
            out.corrupt.append((n, str(exc)))
            shutil.rmtree(p, ignore_errors=True)
            continue
        out.state, out.folder, out.step = state, p, n
        return out
    return out


def remove_partials(root: str | Path) -> list[Path]:
    """Remove what unfinished writes left under root (`step-N.partial<pid>`, `.old<pid>`,
    `*.tmp<pid>`): call it when a job starts, while its lease keeps other writers away."""
    root = Path(root)
    if not root.exists():
        return []
    removed = []
    for p in root.iterdir():
        if not any(mark in p.name for mark in PARTIAL_MARKS):
            continue
        if p.is_dir():
            shutil.rmtree(p, ignore_errors=True)
        else:
            p.unlink(missing_ok=True)
        removed.append(p)
    return removed


def upload_checkpoint(store: ObjectStore, folder: Path, key: str) -> str:
    """Put a written checkpoint folder into the object store under `key`, its manifest
    last (a reader treats a checkpoint without one as absent; a failure removes what it
    put, as far as the store allows); returns the location its row records. Nothing is
    copied when the store is the local directory the folder is in already."""
    store.put_folder(folder, key, last=MANIFEST)
    return store.location(key)


def fetch_checkpoints(
    store: ObjectStore, key: str, root: Path, *, at_most: int | None, newest: int = 2
) -> list[int]:
    """Copy into `root` (a worker's own folder for a job's checkpoints) the `newest`
    checkpoints the store holds whole (with a manifest) under `key`, up to step `at_most`
    (the newest recorded), that `root` lacks: what load_latest then resumes from on this
    machine (the one before the newest in case that one is refused). Returns their steps."""
    steps = sorted(
        (
            n
            for k in store.list(key + "/")
            if k.endswith("/" + MANIFEST)
            and (n := checkpoint_step(Path(k).parent)) is not None
            and (at_most is None or n <= at_most)
        ),
        reverse=True,
    )[:newest]
    fetched = []
    for n in steps:
        local = root / f"step-{n}"
        if (local / MANIFEST).is_file():
            continue
        store.get_folder(f"{key}/step-{n}", local)
        fetched.append(n)
    return fetched


def stored_bytes(*paths: Path) -> int:
    """Bytes on storage of files and folders (what a quota counts)."""
    total = 0
    for path in paths:
        if path.is_file():
            total += path.stat().st_size
        elif path.is_dir():
            total += sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
    return total
