"""What a request gives back: a stream of `Delta`s as tokens come, then a `Completion`; both
through the `RequestHandle` that `InferenceEngine.submit` returns."""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass

FINISH_STOP = "stop"  # an end-of-sequence or stop token, or a stop string
FINISH_LENGTH = "length"  # max_tokens reached
FINISH_CANCELLED = "cancelled"  # RequestHandle.cancel


@dataclass(frozen=True)
class TokenLogprob:
    token: int
    logprob: float  # log-probability of the chosen token under the model
    top: list[tuple[int, float]]  # the most likely (token, logprob), when asked for


@dataclass(frozen=True)
class Delta:
    """One generated token of one sample (choice `index`)."""

    index: int
    token: int
    text: str  # newly final text: may be "" (a partial character, a possible stop string)
    logprob: TokenLogprob | None
    finish_reason: str | None  # set on the sample's last delta
    time: float  # time.perf_counter() when the engine emitted it


@dataclass(frozen=True)
class Choice:
    index: int
    text: str  # without a stop string or stop token
    token_ids: list[int]  # every generated token, a final stop token included
    finish_reason: str
    logprobs: list[TokenLogprob] | None


@dataclass(frozen=True)
class Usage:
    prompt_tokens: int  # once, whatever n
    completion_tokens: int  # generated tokens of all samples

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens


@dataclass(frozen=True)
class Completion:
    id: str
    model: str
    choices: list[Choice]
    usage: Usage


_END = object()


class RequestHandle:
    """A submitted request: iterate it for its deltas as they come (blocking), or wait for
    its `result()`. Thread-safe: the engine's thread fills it, any thread reads it."""

    def __init__(self, request_id: str, model: str, prompt_tokens: int) -> None:
        self.id = request_id
        self.model = model
        self.prompt_tokens = prompt_tokens
        self.submitted = time.perf_counter()
        self._queue: queue.SimpleQueue[object] = queue.SimpleQueue()
        self._done = threading.Event()
        self._completion: Completion | None = None
        self._error: BaseException | None = None
        self.cancelled = False

    def __iter__(self) -> Iterator[Delta]:
        """The deltas, in order, until the request ends; raises what failed it."""
        while True:
            item = self._queue.get()
            if item is _END:
                if self._error is not None:
                    raise self._error
                return
            assert isinstance(item, Delta)
            yield item

    def result(self, timeout: float | None = None) -> Completion:
        """The completion once the request ends (TimeoutError after `timeout` seconds);
        raises what failed it."""
        if not self._done.wait(timeout):
            raise TimeoutError(f"request {self.id} has not finished after {timeout} s")
        if self._error is not None:
            raise self._error
        assert self._completion is not None
        return self._completion

    @property
    def done(self) -> bool:
        return self._done.is_set()

    def cancel(self) -> None:
        """Stop generating (the client went away); the engine frees the request's rows at
        its next step and ends it with finish_reason "cancelled"."""
        self.cancelled = True

    # -- the engine's side ---------------------------------------------------------------

    def _put(self, delta: Delta) -> None:
        self._queue.put(delta)

    def _finish(self, completion: Completion | None, error: BaseException | None) -> None:
        self._completion, self._error = completion, error
        self._done.set()
        self._queue.put(_END)
