"""The decoding engine: continuous batching of many models' requests over one shared base.

Every `step()` runs ONE forward over a flat batch of new tokens: one decode token for each
running sample, then prompt chunks of admitted requests in arrival order, up to
`max_batch_tokens` (chunked prefill: a long prompt takes several steps and never stalls the
others' decoding). The tokens are ordered by adapter, so each adapter's rows form one
Segment of the fused forward (base rows: Segment(None, ...)), as in training.

A step, top-down: take new submissions; end cancelled requests; admit waiting requests in
arrival order while their samples fit (running limit, KV blocks for prompt + max_tokens,
the adapter loaded or loadable within the adapter budget); schedule the step's tokens; run
the forward (kvcache.paged_attention reads and writes the cache); draw each sample's next
token (sampling.py); release text, logprobs and finish reasons to the request handles.
"""

from __future__ import annotations

import itertools
import logging
import math
import secrets
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from mixloom.errors import GenerationError
from mixloom.inference.adapters import AdapterCache, Loader, NoRoom
from mixloom.inference.detokenize import TextStream
from mixloom.inference.kvcache import (
    ATTENTION,
    PLAN_KWARG,
    KVCache,
    QueryGroup,
    StepPlan,
    kv_shape,
)
from mixloom.inference.outputs import (
    FINISH_CANCELLED,
    FINISH_LENGTH,
    FINISH_STOP,
    Choice,
    Completion,
    Delta,
    RequestHandle,
    TokenLogprob,
    Usage,
)
from mixloom.inference.params import EngineConfig, SamplingParams, check_request
from mixloom.inference.sampling import Draw, draw
from mixloom.model.adapter_model import AdapterModel
from mixloom.model.batch import Segment, upload
from mixloom.model.dropout import mix64

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class StepStats:
    """What one step did."""

    prefill_tokens: int  # prompt tokens run
    decode_tokens: int  # samples that decoded a token
    running: int  # requests running after the step
    waiting: int  # requests waiting for admission after the step
    seconds: float


@dataclass(eq=False)
class _Sample:
    """One sample of a request: its tokens, cache blocks, randomness and text."""

    index: int
    tokens: list[int]  # prompt, then generated
    generator: torch.Generator
    text: TextStream
    blocks: list[int] = field(default_factory=list)
    cached: int = 0  # leading tokens whose keys and values are in the cache
    generated: list[int] = field(default_factory=list)
    logprobs: list[TokenLogprob] = field(default_factory=list)
    finish_reason: str | None = None


@dataclass(eq=False)
class _Request:
    handle: RequestHandle
    model_id: str
    prompt: list[int]
    params: SamplingParams
    stop_ids: frozenset[int]
    samples: list[_Sample]
    on_delta: Callable[[Delta], None] | None
    admitted: bool = False
    adapter: str | None = None  # its name in the AdapterModel once admitted; None: base

    @property
    def prefilled(self) -> bool:
        """The prompt is in the cache (of sample 0; the others copy it when it is)."""
        return self.samples[0].cached >= len(self.prompt)


@dataclass(frozen=True)
class _Work:
    """`take` tokens of one sample from position `start`; `logits`: its last one's are
    needed (the prompt's end, or a decode token)."""

    request: _Request
    sample: _Sample
    start: int
    take: int
    logits: bool


class InferenceEngine:
    """Decodes requests for the base and for adapters loaded on demand, all in one batch.

    `model` is shared with training when the caller trains too: call `step()` between
    training steps, from the thread that trains (see the package docstring)."""

    def __init__(
        self,
        model: AdapterModel,
        tokenizer: Any,
        loader: Loader,
        config: EngineConfig | None = None,
    ) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.config = config or EngineConfig()
        self.adapters = AdapterCache(model, loader, self.config.adapter_cache_bytes)
        hf = model.config
        limit = self.config.max_context or math.inf
        self.context = int(min(hf.max_position_embeddings, limit))
        self.vocab_size = int(model.lm_head.weight.shape[0])
        self.eos_ids = _eos_ids(model, tokenizer)
        self._incoming: list[_Request] = []
        self._wake = threading.Condition()  # guards _incoming; notified on submit
        self._waiting: deque[_Request] = deque()
        self._running: list[_Request] = []
        self._cache: KVCache | None = None
        self._stepping = threading.Lock()
        self._tokenizer_lock = threading.Lock()  # HF fast tokenizers are not thread-safe
        self._ids = itertools.count()
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()

    # -- requests ------------------------------------------------------------------------

    def submit(
        self,
        model: str,
        prompt: str | Sequence[int],
        params: SamplingParams | None = None,
        *,
        on_delta: Callable[[Delta], None] | None = None,
        request_id: str | None = None,
    ) -> RequestHandle:
        """Queue a request (any thread). `model`: the base's id or a fine-tuned model's, as
        the loader knows them. `prompt`: token ids as they are, or text (encoded with the
        tokenizer's special tokens, e.g. a BOS). `on_delta` is called on the engine's
        thread with each delta, besides the handle's stream. Raises GenerationError for
        a request that cannot be served as asked."""
        params = params or SamplingParams()
        if isinstance(prompt, str):
            with self._tokenizer_lock:
                tokens = list(self.tokenizer.encode(prompt))
        else:
            tokens = [int(t) for t in prompt]
            if any(not 0 <= t < self.vocab_size for t in tokens):
                raise GenerationError(
                    f"prompt token ids must be in [0, {self.vocab_size})", param="prompt"
                )
        check_request(
            params,
            len(tokens),
            context=self.context,
            config=self.config,
            vocab_size=self.vocab_size,
        )
        rid = request_id or f"cmpl-{next(self._ids)}"
        handle = RequestHandle(rid, model, len(tokens))
        seed = params.seed if params.seed is not None else secrets.randbits(63)
        samples = [
            _Sample(
                index=i,
                tokens=list(tokens),
                generator=torch.Generator().manual_seed(mix64(seed, i)),
                text=TextStream(self.tokenizer, tokens, params.stop),
            )
            for i in range(params.n)
        ]
        eos = frozenset() if params.ignore_eos else self.eos_ids
        stop_ids = eos | frozenset(params.stop_token_ids)
        request = _Request(handle, model, tokens, params, stop_ids, samples, on_delta)
        with self._wake:
            self._incoming.append(request)
            self._wake.notify()
        return handle

    @property
    def has_work(self) -> bool:
        """Requests are queued or running: `step()` has something to do."""
        return bool(self._incoming or self._waiting or self._running)

    # -- stepping ------------------------------------------------------------------------

    def step(self) -> StepStats:
        """One decoding step: admissions, one forward, one token for each running sample.
        Returns at once when there is nothing to do."""
        if not self._stepping.acquire(blocking=False):
            raise RuntimeError("InferenceEngine.step() is already running on another thread")
        try:
            t0 = time.perf_counter()
            self._take_incoming()
            self._end_cancelled()
            self._admit()
            work = self._schedule()
            prefill = sum(w.take for w in work if not w.request.prefilled)
            if work:
                try:
                    logits = self._forward(work)
                    self._advance(work, logits)
                except BaseException as exc:  # e.g. out of memory: these requests fail alone
                    for request in list(self._running):
                        self._end(request, error=exc)
                    raise
            return StepStats(
                prefill_tokens=prefill,
                decode_tokens=sum(w.take for w in work) - prefill,
                running=len(self._running),
                waiting=len(self._waiting) + len(self._incoming),
                seconds=time.perf_counter() - t0,
            )
        finally:
            self._stepping.release()

    def start(self) -> None:
        """Run steps on a thread of the engine's own while there is work (an inference-only
        process; a worker that also trains calls step() itself instead)."""
        if self._thread is not None:
            raise RuntimeError("the engine's thread is already running")
        self._stop.clear()
        self._thread = threading.Thread(target=self._loop, name="mixloom-inference", daemon=True)
        self._thread.start()

    def stop(self, timeout: float | None = None) -> None:
        """Stop the engine's thread (requests in flight stay; close() ends them)."""
        if self._thread is None:
            return
        self._stop.set()
        with self._wake:
            self._wake.notify()
        self._thread.join(timeout)
        self._thread = None

    def release_memory(self) -> None:
        """Free the KV cache and unload every adapter no request uses (call when idle; the
        next request allocates the cache again)."""
        with self._stepping:
            if not self._running:
                self._cache = None
            self.adapters.clear()

    def close(self) -> None:
        """Stop, cancel every request, and unload every inference adapter: the model is left
        as it was before the engine came."""
        self.stop()
        with self._stepping:
            self._take_incoming()
            for request in [*self._waiting, *self._running]:
                self._end(request, reason=FINISH_CANCELLED)
            self._waiting.clear()
            self._cache = None
            self.adapters.clear()

    def _loop(self) -> None:
        while not self._stop.is_set():
            if not self.has_work:
                with self._wake:
                    self._wake.wait_for(lambda: self._incoming or self._stop.is_set())
                continue
            try:
                self.step()
            except Exception:  # the step failed its requests; the engine goes on
                log.exception("inference step failed")

    # -- admission and scheduling --------------------------------------------------------

    def _take_incoming(self) -> None:
        with self._wake:
            self._waiting.extend(self._incoming)
            self._incoming.clear()

    def _end_cancelled(self) -> None:
        for request in [r for r in (*self._waiting, *self._running) if r.handle.cancelled]:
            if request in self._waiting:
                self._waiting.remove(request)
            self._end(request, reason=FINISH_CANCELLED)

    def _kv(self) -> KVCache:
        if self._cache is None:
            kv_heads, head_dim = kv_shape(self.model.config)
            self._cache = KVCache(
                layers=int(self.model.config.num_hidden_layers),
                kv_heads=kv_heads,
                head_dim=head_dim,
                blocks=self.config.kv_blocks,
                block_tokens=self.config.kv_block_tokens,
                dtype=self.model.lm_head.weight.dtype,
                device=self.model.device,
            )
        return self._cache

    def _admit(self) -> None:
        """Admit waiting requests in arrival order, while the head one fits (no overtaking:
        a large request is not starved by small ones)."""
        running = sum(len(r.samples) for r in self._running)
        while self._waiting:
            request = self._waiting[0]
            n = len(request.samples)
            per_sample = self.config.blocks_for(len(request.prompt) + request.params.max_tokens)
            cache = self._kv()
            if running + n > self.config.max_running or cache.free_blocks < n * per_sample:
                return
            try:
                request.adapter = self.adapters.acquire(request.model_id)
            except NoRoom:
                return
            except Exception as exc:  # an unknown model or a broken adapter: it fails alone
                self._waiting.popleft()
                self._end(request, error=exc)
                continue
            self._waiting.popleft()
            request.admitted = True
            for sample in request.samples:
                sample.blocks = cache.allocate(per_sample)
            self._running.append(request)
            running += n

    def _schedule(self) -> list[_Work]:
        """The step's tokens: a decode token for every running sample past its prompt, then
        prompt chunks in admission order within the token budget; ordered by adapter."""
        budget = self.config.max_batch_tokens
        work = []
        for request in self._running:
            if request.prefilled:
                for s in request.samples:
                    if s.finish_reason is None:
                        work.append(_Work(request, s, s.cached, 1, True))
        budget -= len(work)
        for request in self._running:
            if budget <= 0:
                break
            if not request.prefilled:
                s = request.samples[0]
                take = min(len(request.prompt) - s.cached, budget)
                work.append(_Work(request, s, s.cached, take, s.cached + take == len(s.tokens)))
                budget -= take
        # the adapters' packing order (model/packing.py): their weights are read as one view
        rank = {name: i for i, name in enumerate(self.model.specs)}
        work.sort(key=lambda w: -1 if w.request.adapter is None else rank[w.request.adapter])
        return work

    # -- the forward ---------------------------------------------------------------------

    def _forward(self, work: list[_Work]) -> Tensor:
        """(L, V) fp32 logits of the work items that need them, in work order."""
        cache = self._kv()
        ids: list[int] = []
        pos: list[int] = []
        slots: list[int] = []
        segments: list[Segment] = []
        decode: list[tuple[int, _Work]] = []  # (row, work) of single decode tokens
        chunks: list[tuple[int, _Work]] = []  # (first row, work) of prompt chunks
        logit_rows: list[int] = []
        for w in work:
            row = len(ids)
            ids += w.sample.tokens[w.start : w.start + w.take]
            pos += range(w.start, w.start + w.take)
            slots += [cache.slot(w.sample.blocks, p) for p in range(w.start, w.start + w.take)]
            if segments and segments[-1].name == w.request.adapter:
                segments[-1] = Segment(w.request.adapter, segments[-1].start, len(ids))
            else:
                segments.append(Segment(w.request.adapter, row, len(ids)))
            (decode if w.request.prefilled else chunks).append((row, w))
            if w.logits:
                logit_rows.append(len(ids) - 1)
        dev = self.model.device
        groups = []
        if decode:
            groups.append(
                self._group([r for r, _ in decode], [[w.start] for _, w in decode], decode)
            )
        for row, w in chunks:
            rows = list(range(row, row + w.take))
            groups.append(self._group(rows, [list(range(w.start, w.start + w.take))], [(row, w)]))
        plan = StepPlan(cache, upload(slots, dev), groups)
        input_ids = upload(ids, dev)[:, None]  # (N, 1): every new token a row of its own
        position_ids = upload(pos, dev)[:, None]
        with self._borrowed(segments):
            out = self.model.backbone(
                input_ids=input_ids,
                position_ids=position_ids,
                use_cache=False,
                **{PLAN_KWARG: plan},
            )
            hidden = out.last_hidden_state[:, 0]  # (N, H)
            wanted = upload(torch.tensor(logit_rows, dtype=torch.int64), dev)  # may be none
            hidden = hidden.index_select(0, wanted)  # (L, H)
            logits = self.model.lm_head(hidden).float()  # (L, V)
        cap = getattr(self.model.config, "final_logit_softcapping", None)
        if cap:
            logits = torch.tanh(logits / cap) * cap
        return logits

    def _group(
        self, rows: list[int], q_pos: list[list[int]], items: list[tuple[int, _Work]]
    ) -> QueryGroup:
        """A QueryGroup of `items`' samples: their queries' rows and positions, and their
        block tables cut (or padded with block 0) to the blocks the furthest query reads."""
        keys = max(p[-1] for p in q_pos) + 1
        nb = self._kv().blocks_for(keys)
        table = [(w.sample.blocks + [0] * nb)[:nb] for _, w in items]
        dev = self.model.device
        return QueryGroup(
            upload(rows, dev),
            upload(torch.tensor(q_pos), dev),
            upload(torch.tensor(table), dev),
            keys,
        )

    @contextmanager
    def _borrowed(self, segments: list[Segment]) -> Iterator[None]:
        """Run the shared model for inference and leave it as found: eval-mode segments,
        the paged attention, no autograd; FusedState (the trainer's last router logs
        included) and the attention implementation back as they were."""
        st = self.model.state
        if st.segments is not None:
            raise RuntimeError(
                "InferenceEngine.step() was called inside a fused forward; call it between "
                "training steps"
            )
        saved = dict(vars(st))
        config = self.model.config
        attention = config._attn_implementation
        config._attn_implementation = ATTENTION
        try:
            with (
                torch.no_grad(),
                self.model.fused(segments, None, training=False, collect_router=False),
            ):
                yield
        finally:
            config._attn_implementation = attention
            vars(st).update(saved)

    # -- tokens out ----------------------------------------------------------------------

    def _advance(self, work: list[_Work], logits: Tensor) -> None:
        """Mark the work's tokens cached, draw the next token of every sample whose logits
        came, and hand each its delta."""
        rows: list[int] = []
        draws: list[Draw] = []
        targets: list[tuple[_Request, _Sample]] = []
        for i, w in enumerate(w for w in work if w.logits):
            # a prompt's end: every sample of the request draws from these logits
            samples = w.request.samples if not w.request.prefilled else [w.sample]
            p = w.request.params
            for s in samples:
                u = 0.0
                if p.temperature > 0:  # one draw a token, from the sample's own stream
                    u = float(torch.rand((), generator=s.generator, dtype=torch.float64))
                rows.append(i)
                draws.append(Draw(p.temperature, p.top_p, u, p.logprobs))
                targets.append((w.request, s))
        for w in work:
            w.sample.cached = w.start + w.take
        if not draws:
            return
        if len(rows) != logits.shape[0]:
            logits = logits.index_select(0, upload(rows, logits.device))
        drawn = draw(logits, draws)
        cache = self._kv()
        with self._tokenizer_lock:
            for j, (request, s) in enumerate(targets):
                first = request.samples[0]
                if s.cached < first.cached:  # a sample that shares the prompt's prefill
                    cache.copy_prefix(first.blocks, s.blocks, len(request.prompt))
                    s.cached = len(request.prompt)
                lp = drawn.logprobs[j]
                logprob = (
                    None if lp is None else TokenLogprob(drawn.tokens[j], lp, drawn.top[j] or [])
                )
                self._append(request, s, drawn.tokens[j], logprob)

    def _append(
        self, request: _Request, s: _Sample, token: int, logprob: TokenLogprob | None
    ) -> None:
        s.tokens.append(token)
        s.generated.append(token)
        if logprob is not None:
            s.logprobs.append(logprob)
        text, reason = "", None
        if token in request.stop_ids:  # not text: it ends the text there
            text, reason = s.text.flush(), FINISH_STOP
        else:
            text, stopped = s.text.push(token)
            if stopped:
                reason = FINISH_STOP
            elif len(s.generated) >= request.params.max_tokens:
                text, reason = text + s.text.flush(), FINISH_LENGTH
        if reason is not None:
            s.finish_reason = reason
            self._kv().release(s.blocks)
            s.blocks = []
        self._emit(request, Delta(s.index, token, text, logprob, reason, time.perf_counter()))
        if all(x.finish_reason is not None for x in request.samples):
            self._end(request)

    def _emit(self, request: _Request, delta: Delta) -> None:
        request.handle._put(delta)
        if request.on_delta is None:
            return
        try:
            request.on_delta(delta)
        except Exception:  # the listener is gone: stop generating for it
            log.exception("on_delta of request %s failed; cancelling it", request.handle.id)
            request.handle.cancel()

    def _end(
        self, request: _Request, *, reason: str | None = None, error: BaseException | None = None
    ) -> None:
        """The request leaves: its blocks and adapter are released and its handle ends
        (with `error`, or its samples' results; unfinished samples get `reason`)."""
        for s in request.samples:
            if s.blocks:
                self._kv().release(s.blocks)
                s.blocks = []
            if s.finish_reason is None and reason is not None:
                s.finish_reason = reason
        if request in self._running:
            self._running.remove(request)
        if request.admitted:
            self.adapters.release(request.model_id)
            request.admitted = False
        if error is not None:
            request.handle._finish(None, error)
            return
        choices = [
            Choice(
                index=s.index,
                text=s.text.text,
                token_ids=list(s.generated),
                finish_reason=s.finish_reason or FINISH_CANCELLED,
                logprobs=list(s.logprobs) if request.params.logprobs is not None else None,
            )
            for s in request.samples
        ]
        usage = Usage(len(request.prompt), sum(len(s.generated) for s in request.samples))
        request.handle._finish(
            Completion(request.handle.id, request.model_id, choices, usage), None
        )


def _eos_ids(model: AdapterModel, tokenizer: Any) -> frozenset[int]:
    """The end-of-sequence ids of the tokenizer and of the model's generation config."""
    ids: set[int] = set()
    for value in (
        getattr(tokenizer, "eos_token_id", None),
        getattr(getattr(model.model, "generation_config", None), "eos_token_id", None),
    ):
        if isinstance(value, int):
            ids.add(value)
        elif isinstance(value, list | tuple):
            ids.update(int(v) for v in value)
    return frozenset(ids)
