"""What a request asks for (`SamplingParams`), what an engine allows (`EngineConfig`), and the
check of one against the other (`check_request`), which names every problem at once."""

from __future__ import annotations

import math
from dataclasses import dataclass

from mixloom.errors import ConfigError, GenerationError


@dataclass(frozen=True)
class SamplingParams:
    """How to decode one request; the names and defaults are OpenAI's."""

    max_tokens: int = 16  # generated tokens at most, per sample
    temperature: float = 1.0  # 0: greedy (argmax)
    top_p: float = 1.0  # nucleus: sample among the most likely tokens holding this mass
    seed: int | None = None  # same seed and prompt, same samples (whatever shares the batch)
    stop: tuple[str, ...] = ()  # stop strings: the text ends before the first one
    stop_token_ids: tuple[int, ...] = ()  # besides the model's end-of-sequence tokens
    n: int = 1  # samples of the prompt
    # None: no logprobs; 0: the chosen token's log-probability; k: also the k most likely
    # tokens' (under the model's own distribution: before temperature and top_p)
    logprobs: int | None = None
    ignore_eos: bool = False  # go on past end-of-sequence tokens (benchmarks: equal lengths)


@dataclass(frozen=True)
class EngineConfig:
    """Limits and sizes of one engine."""

    max_batch_tokens: int = 512  # new tokens per forward: decode rows + prompt chunks
    max_running: int = 64  # sequences decoding at once (a request with n samples has n)
    kv_cache_tokens: int = 8192  # tokens the KV cache holds, all running sequences together
    kv_block_tokens: int = 16  # tokens per cache block (the unit a sequence reserves)
    adapter_cache_bytes: int = 1 << 30  # loaded adapters' weights kept (LRU beyond)
    max_context: int | None = None  # None: the base model's max_position_embeddings
    max_n: int = 16
    max_logprobs: int = 20  # OpenAI's limit on top logprobs

    @property
    def kv_blocks(self) -> int:
        return self.kv_cache_tokens // self.kv_block_tokens

    def blocks_for(self, tokens: int) -> int:
        return -(-tokens // self.kv_block_tokens)

    def __post_init__(self) -> None:
        problems = []
        for name in ("max_batch_tokens", "max_running", "kv_block_tokens", "max_n"):
            if getattr(self, name) < 1:
                problems.append(f"{name} must be at least 1")
        if self.max_running > self.max_batch_tokens:
            problems.append(
                f"max_running ({self.max_running}) must not exceed max_batch_tokens "
                f"({self.max_batch_tokens}): every running sequence decodes one token a step"
            )
        if self.max_n > self.max_running:
            problems.append(
                f"max_n ({self.max_n}) must not exceed max_running ({self.max_running})"
            )
        if self.kv_cache_tokens < self.kv_block_tokens:
            problems.append("kv_cache_tokens must hold at least one block (kv_block_tokens)")
        if problems:
            raise ConfigError("; ".join(problems))


def check_request(
    params: SamplingParams,
    prompt_tokens: int,
    *,
    context: int,
    config: EngineConfig,
    vocab_size: int,
) -> None:
    """Raise GenerationError naming every problem of the request, or return."""
    problems: list[tuple[str, str, str]] = []  # (param, code, message)

    def bad(param: str, message: str, code: str = "invalid_value") -> None:
        problems.append((param, code, message))

    if prompt_tokens == 0:
        bad("prompt", "the prompt is empty; send at least one token of text")
    elif prompt_tokens >= context:
        bad(
            "prompt",
            f"the prompt has {prompt_tokens} tokens, and this model's context holds {context} "
            "with at least one to generate; shorten the prompt",
            "context_length_exceeded",
        )
    if params.max_tokens < 1:
        bad("max_tokens", f"max_tokens must be at least 1, got {params.max_tokens}")
    elif 0 < prompt_tokens < context and prompt_tokens + params.max_tokens > context:
        bad(
            "max_tokens",
            f"prompt ({prompt_tokens} tokens) + max_tokens ({params.max_tokens}) exceeds this "
            f"model's context of {context} tokens; ask for at most "
            f"{context - prompt_tokens} tokens",
            "context_length_exceeded",
        )
    if not 1 <= params.n <= config.max_n:
        bad("n", f"n must be between 1 and {config.max_n}, got {params.n}")
    if not (math.isfinite(params.temperature) and 0 <= params.temperature <= 2):
        bad("temperature", f"temperature must be between 0 and 2, got {params.temperature}")
    if not (math.isfinite(params.top_p) and 0 < params.top_p <= 1):
        bad("top_p", f"top_p must be in (0, 1], got {params.top_p}")
    if params.logprobs is not None and not 0 <= params.logprobs <= config.max_logprobs:
        bad("logprobs", f"logprobs must be between 0 and {config.max_logprobs}")
    if any(not isinstance(s, str) or not s for s in params.stop):
        bad("stop", "stop strings must be non-empty strings")
    if any(not 0 <= t < vocab_size for t in params.stop_token_ids):
        bad("stop_token_ids", f"stop token ids must be in [0, {vocab_size})")
    # each sample reserves whole blocks for all it may write
    need = params.n * config.blocks_for(prompt_tokens + params.max_tokens)
    if not problems and need > config.kv_blocks:
        bad(
            "max_tokens",
            f"n ({params.n}) x (prompt {prompt_tokens} + max_tokens {params.max_tokens}) "
            f"tokens exceed this engine's KV cache of {config.kv_cache_tokens} tokens; ask for "
            "fewer tokens or samples",
            "context_length_exceeded",
        )
    if problems:
        message = "; ".join(m for _, _, m in problems)
        raise GenerationError(message, param=problems[0][0], code=problems[0][1])
