"""The worker's side of inference: requests for its base, taken from the database, decoded on
the engine (mixloom/inference) over the model the worker trains, their answers written back.

`InferenceHost.serve(budget)` is called by the worker loop before each training step: it
takes the requests that arrived (at most every `inference_poll_seconds`), runs decoding
steps for up to `budget` seconds (the last training step's time, so inference and training
take turns and a request waits at most one training step for its first token), and after
each step stores one chunk per request that got text (storage/inference.py `append`, which
renews the worker's lease on it) and the answers of the requests that ended.

The engine runs on the worker's own thread, between training steps, under no_grad and in
eval mode, with its adapters packed apart from the training jobs' weights: training results
are what they are without inference (tests/inference, tests/scheduler/test_worker_inference.py).
"""

from __future__ import annotations

import logging
import math
import shutil
import threading
import time
import zipfile
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from mixloom.config import Settings
from mixloom.errors import GenerationError, ObjectNotFoundError, RequestError
from mixloom.inference import (
    FINISH_CANCELLED,
    Delta,
    EngineConfig,
    InferenceEngine,
    RequestHandle,
    SamplingParams,
)
from mixloom.inference.chat import chat_prompt_ids
from mixloom.inference.kvcache import KVCache
from mixloom.model.formats import read_metadata
from mixloom.storage import inference as requests
from mixloom.storage import objects
from mixloom.storage.archives import ADAPTER_FILES, CONFIG_FILE
from mixloom.storage.bus import ProgressBus
from mixloom.storage.db import Database
from mixloom.storage.inference import InferenceRecord, InferenceStatus

log = logging.getLogger("mixloom.worker.inference")

BASE_KEY = "base"  # the engine's name for "no adapter"
_RUNNING_LIMIT_SLACK = 2  # requests taken beyond what the engine runs: they wait in its queue


@dataclass
class _Served:
    """One request on the engine: a handle per prompt (a completion may have several)."""

    record: InferenceRecord
    handles: list[tuple[int, RequestHandle]]  # (index of its first choice, handle)
    pending: list[tuple[int, Delta]] = field(default_factory=list)  # (choice index, delta)
    offsets: dict[int, int] = field(default_factory=dict)  # choice -> text length so far
    prompt_chars: dict[int, int] = field(default_factory=dict)  # choice -> its prompt's length
    logprobs: dict[int, list[dict[str, Any]]] = field(default_factory=dict)  # as streamed


class InferenceHost:
    def __init__(
        self,
        settings: Settings,
        *,
        db: Database,
        bus: ProgressBus,
        worker_id: str,
        base_id: str,
        model: Any,  # model.adapter_model.AdapterModel, shared with training
        tokenizer: Any,
    ) -> None:
        self.settings = settings
        self.db = db
        self.bus = bus
        self.worker_id = worker_id
        self.base_id = base_id
        self.tokenizer = tokenizer
        self.config = EngineConfig(
            max_batch_tokens=settings.inference_max_batch_tokens,
            kv_cache_tokens=settings.inference_kv_cache_tokens,
            adapter_cache_bytes=int(settings.inference_adapter_cache_gb * (1 << 30)),
            max_n=max(settings.inference_max_n, 1),
            max_running=min(64, settings.inference_max_batch_tokens),
        )
        self.engine = InferenceEngine(model, tokenizer, self._adapter_folder, self.config)
        self.served: dict[str, _Served] = {}
        self._last_poll = -math.inf
        self._gone: set[str] = set()  # requests heartbeat() found cancelled or lost
        self._gone_lock = threading.Lock()
        self._adapters_dir = settings.cache_dir / "inference-adapters" / _safe(worker_id)

    @property
    def busy(self) -> bool:
        return bool(self.served)

    def reserved_bytes(self) -> int:
        """The most decoding holds at once: the KV cache and the adapter cache's budget (the
        worker admits training jobs into what is left)."""
        model = self.engine.model
        per_token = KVCache.bytes_per_token(model.config, model.lm_head.weight.dtype)
        return per_token * self.config.kv_cache_tokens + self.config.adapter_cache_bytes

    # -- the worker loop's turn ----------------------------------------------------------

    def serve(self, budget: float) -> bool:
        """Take new requests, then decode for up to `budget` seconds; True if it stepped."""
        now = time.monotonic()
        with self._gone_lock:
            gone, self._gone = self._gone, set()
        for rid in gone:
            self._cancel(rid)
        if now - self._last_poll >= self.settings.inference_poll_seconds:
            self._last_poll = now
            self._take()
        if not self.served:
            return False
        deadline = now + budget
        stepped = False
        while self.engine.has_work:
            self.engine.step()
            stepped = True
            self._write()
            if time.monotonic() >= deadline:
                break
        if not self.engine.has_work:
            self._write()
        return stepped

    def maintain(self) -> None:
        """Fail requests whose worker died; remove answers kept past inference_keep_seconds."""
        with self.db.transaction() as session:
            for rid in requests.expire(session=session):
                log.warning("%s: its worker stopped; failed", rid)
            requests.prune(
                session=session,
                older_than=datetime.now(UTC)
                - timedelta(seconds=self.settings.inference_keep_seconds),
            )

    def close(self) -> None:
        """Stop: the requests in flight fail with a message to send them again."""
        self.engine.close()
        for rid in list(self.served):
            self._end(
                rid,
                InferenceStatus.FAILED,
                _error(503, "the worker stopped; send it again", "worker_stopped"),
            )

    # -- requests in ---------------------------------------------------------------------

    def _take(self) -> None:
        room = self.config.max_running + _RUNNING_LIMIT_SLACK - len(self.served)
        with self.db.transaction() as session:
            taken = requests.claim(
                session=session,
                worker_id=self.worker_id,
                base=self.base_id,
                limit=room,
                lease_seconds=self.settings.worker_lease_seconds,
            )
        for record in taken:
            try:
                self.served[record.id] = self._submit(record)
            except RequestError as exc:
                self._fail(record.id, exc)

    def _submit(self, record: InferenceRecord) -> _Served:
        body = record.body
        params = SamplingParams(
            max_tokens=body["max_tokens"],
            temperature=body["temperature"],
            top_p=body["top_p"],
            seed=body["seed"],
            stop=tuple(body["stop"]),
            n=body["n"],
            logprobs=body["logprobs"],
        )
        key = _engine_key(record)
        if record.kind == "chat":
            self._check_chat_model(key)
            prompts: list[str | list[int]] = [chat_prompt_ids(self.tokenizer, body["messages"])]
        else:
            prompts = list(body["prompts"])
        served = _Served(record=record, handles=[])
        for p, prompt in enumerate(prompts):
            first = p * params.n

            def on_delta(delta: Delta, first: int = first) -> None:
                served.pending.append((first + delta.index, delta))

            try:
                handle = self.engine.submit(key, prompt, params, on_delta=on_delta)
            except BaseException:
                for _, h in served.handles:
                    h.cancel()
                raise
            served.handles.append((first, handle))
            for j in range(params.n):
                served.offsets[first + j] = 0
                served.prompt_chars[first + j] = len(prompt) if isinstance(prompt, str) else 0
        return served

    def _check_chat_model(self, key: str) -> None:
        """A model trained on plain text (rendering "plain": no chat template) is asked with a
        raw prompt: a chat rendered with the template is not what it learned to continue."""
        folder = self._adapter_folder(key)
        if folder is not None and read_metadata(folder).rendering == "plain":
            raise GenerationError(
                'this model was trained on plain text (rendering "plain"), not on chats; send '
                "its prompt to /v1/completions instead",
                param="model",
                code="invalid_value",
            )

    def _adapter_folder(self, key: str) -> Path | None:
        """The engine's loader: the adapter's folder, copied from where it is stored (its
        folder, in this machine's data dir or the object store; a zip stored before one
        copy, unpacked) into this worker's cache, so that a
        checkpoint rewritten or deleted meanwhile never changes what is loaded."""
        if key == BASE_KEY:
            return None
        job_id, _, step = key.partition("@")
        with self.db.read() as session:
            archive = requests.adapter_archive(
                session=session, job_id=job_id, step=int(step) if step else None
            )
        if archive is None:
            raise _weights_deleted()
        store, stored_at = objects.resolve(objects.open_store(self.settings), archive)
        if isinstance(store, objects.LocalStore) and not store.path(stored_at).exists():
            raise _weights_deleted()
        target = self._adapters_dir / _safe(key)
        if not (target / "adapter_config.json").exists():
            partial = target.with_name(target.name + ".partial")
            shutil.rmtree(partial, ignore_errors=True)
            if isinstance(store, objects.LocalStore) and store.path(stored_at).is_file():
                with zipfile.ZipFile(store.path(stored_at)) as z:
                    z.extractall(partial)
            else:  # a folder, in this machine's data dir or in S3
                partial.mkdir(parents=True)
                stored = set(store.list(stored_at + "/"))
                names = [n for n in ADAPTER_FILES if f"{stored_at}/{n}" in stored]
                if CONFIG_FILE not in names:
                    raise _weights_deleted()
                for name in names:
                    store.get_file(f"{stored_at}/{name}", partial / name)
            shutil.rmtree(target, ignore_errors=True)
            partial.rename(target)
        return target

    # -- answers out ---------------------------------------------------------------------

    def _write(self) -> None:
        """One chunk per request that got text this step, and the answers of those that
        ended, in one transaction; then a bus message per request to wake its reader."""
        chunks: dict[str, dict[str, Any]] = {}
        for rid, s in self.served.items():
            if s.pending:
                chunk = self._chunk(s)
                if chunk["choices"]:
                    chunks[rid] = chunk
        ended = [rid for rid, s in self.served.items() if all(h.done for _, h in s.handles)]
        if not chunks and not ended:
            return
        with self.db.transaction() as session:
            written = requests.append(
                session=session,
                worker_id=self.worker_id,
                chunks=chunks,
                lease_seconds=self.settings.worker_lease_seconds,
            )
        for rid in set(chunks) - set(written):  # cancelled by its caller, or taken from us
            self._cancel(rid)
        for rid, seq in written.items():
            self.bus.publish(rid, {"id": seq, "event": "chunk", "data": {}})
        for rid in ended:
            if rid in self.served:
                self._finish(rid)

    def _chunk(self, s: _Served) -> dict[str, Any]:
        by_choice: dict[int, dict[str, Any]] = {}
        for index, delta in s.pending:
            c = by_choice.setdefault(
                index, {"index": index, "text": "", "finish_reason": None, "logprobs": None}
            )
            c["text"] += delta.text
            if delta.finish_reason is not None:
                c["finish_reason"] = delta.finish_reason
            if delta.logprob is not None and delta.finish_reason != FINISH_CANCELLED:
                token = self._logprob(s, index, delta)
                c["logprobs"] = (c["logprobs"] or []) + [token]
                s.logprobs.setdefault(index, []).append(token)
        s.pending.clear()
        return {
            "choices": [
                c
                for c in sorted(by_choice.values(), key=lambda c: c["index"])
                if c["text"] or c["finish_reason"] or c["logprobs"]
            ]
        }

    def _logprob(self, s: _Served, index: int, delta: Delta) -> dict[str, Any]:
        lp = delta.logprob
        assert lp is not None
        token = self._decode(lp.token)
        offset = s.prompt_chars[index] + s.offsets[index]
        s.offsets[index] += len(token)
        return {
            "token": token,
            "logprob": lp.logprob,
            "top": [[self._decode(t), v] for t, v in lp.top],
            "offset": offset,
        }

    def _decode(self, token: int) -> str:
        return str(self.tokenizer.decode([token]))

    def _finish(self, rid: str) -> None:
        s = self.served[rid]
        choices: list[dict[str, Any]] = []
        prompt_tokens = completion_tokens = 0
        try:
            for first, handle in s.handles:
                completion = handle.result()
                prompt_tokens += completion.usage.prompt_tokens
                completion_tokens += completion.usage.completion_tokens
                for c in completion.choices:
                    index = first + c.index
                    logprobs = s.logprobs.get(index, []) if c.logprobs is not None else None
                    choices.append(
                        {
                            "index": index,
                            "text": c.text,
                            "finish_reason": c.finish_reason,
                            "logprobs": logprobs,
                        }
                    )
        except RequestError as exc:
            self._fail(rid, exc)
            return
        except Exception as exc:  # the engine's own failure: this request alone
            log.exception("%s: decoding failed", rid)
            self._end(
                rid,
                InferenceStatus.FAILED,
                _error(500, f"decoding failed: {exc}", "inference_error"),
            )
            return
        if any(c["finish_reason"] == FINISH_CANCELLED for c in choices):
            self._end(
                rid, InferenceStatus.CANCELLED, _error(499, "the caller went away", "cancelled")
            )
            return
        result = {
            "choices": sorted(choices, key=lambda c: c["index"]),
            "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens},
        }
        self._end(rid, InferenceStatus.SUCCEEDED, result)

    def _fail(self, rid: str, exc: RequestError) -> None:
        status = 404 if isinstance(exc, ObjectNotFoundError) else 400
        self._end(rid, InferenceStatus.FAILED, _error(status, exc.message, exc.code, exc.param))

    def _cancel(self, rid: str) -> None:
        """Its caller went away, or its lease is no longer ours: stop decoding it."""
        self._end(rid, InferenceStatus.CANCELLED, _error(499, "the caller went away", "cancelled"))

    def _end(self, rid: str, status: InferenceStatus, result: dict[str, Any]) -> None:
        s = self.served.pop(rid, None)
        if s is not None:
            for _, h in s.handles:
                if not h.done:
                    h.cancel()
        with self.db.transaction() as session:
            ended = requests.finish(
                session=session,
                request_id=rid,
                worker_id=self.worker_id,
                status=status,
                result=result,
            )
        if ended:
            self.bus.publish(rid, {"id": 0, "event": "end", "data": {}})

    def heartbeat(self) -> None:
        """Renew this worker's lease on its requests (from the worker's heartbeat thread, so
        that a long training step does not let them lapse); those cancelled by their caller
        or no longer ours are stopped at the next turn of the loop."""
        ids = list(self.served.copy())  # a copy is atomic; the loop thread changes it
        if not ids:
            return
        with self.db.transaction() as session:
            gone = requests.renew(
                session=session,
                worker_id=self.worker_id,
                request_ids=ids,
                lease_seconds=self.settings.worker_lease_seconds,
            )
        with self._gone_lock:
            self._gone |= gone


def _engine_key(record: InferenceRecord) -> str:
    if record.job_id is None:
        return BASE_KEY
    if record.checkpoint_step is None:
        return record.job_id
    return f"{record.job_id}@{record.checkpoint_step}"


def _weights_deleted() -> ObjectNotFoundError:
    return ObjectNotFoundError(
        "this fine-tuned model's weights were deleted", param="model", code="model_not_found"
    )


def _safe(name: str) -> str:
    return "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in name)


def _error(status: int, message: str, code: str | None, param: str | None = None) -> dict[str, Any]:
    return {"message": message, "code": code, "param": param, "status": status}
