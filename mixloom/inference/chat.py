"""A chat rendered the way the base model was tuned to read it: its chat template."""

from __future__ import annotations

from typing import Any

from mixloom.errors import GenerationError


def chat_prompt_ids(tokenizer: Any, messages: list[dict[str, str]]) -> list[int]:
    """The token ids of `messages` ([{"role", "content"}]) with the tokenizer's chat template,
    ready for the assistant's answer. GenerationError (400) when the base has no template."""
    if not getattr(tokenizer, "chat_template", None):
        raise GenerationError(
            "this base model has no chat template; send a raw prompt (/v1/completions) instead",
            param="messages",
            code="invalid_value",
        )
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    if not isinstance(ids, list):  # transformers 5: a BatchEncoding
        ids = ids["input_ids"]
    return [int(i) for i in ids]
