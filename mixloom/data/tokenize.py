"""Tokenisation and loss masks: Examples -> (input_ids, labels) rows -> padded batches.

Labels follow the Hugging Face convention: ``labels[t] == input_ids[t]`` where token t is
a target and -100 elsewhere; the model shifts them by one, so ``labels[0]`` never counts.

By default only the answer carries loss: an assistant message's content and the
template's end-of-turn token after it (so the model learns to stop), unless the message
has weight 0. System and user
text, and the template's role headers, do not. ``train_on_inputs=True`` trains on every
token.

How rows become text is the job's ``rendering``:

- ``chat`` (the default): with a chat template (instruction-tuned tokenizers) every format
  but text is rendered as a chat: prompt/completion and alpaca become one user and one
  assistant message.
- ``plain``, or a tokenizer without a chat template: prompt/completion is the plain
  concatenation ``prompt + completion + EOS`` (TRL's non-conversational rows); alpaca uses a
  short instruction prompt; chat uses ``User:``/``Assistant:`` lines.

Text rows (``{"text"}``) are always ``text + EOS``, every token a target.

A preference pair (DPO) is two such rows that share the prompt: the conversation ending in
the preferred answer, and the same ending in the other one, each with its last answer alone
as the target (``encode_preferences``). Neither may be cut by max_seq_len: a cut answer is no
longer the answer that was preferred, so such a pair is an error naming its line. The rendering a
dataset got (``EncodedDataset.rendering``, ``rendering_of``) is stored with the adapter, so
that inference and evaluation prompt it the same way.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, overload

import torch

from mixloom.data.formats import Example, Format
from mixloom.errors import DataError, Problem

IGNORE_INDEX = -100
RENDERINGS = ("chat", "plain")

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class EncodedRow:
    """One tokenised example. ``labels`` is ``input_ids`` with -100 where no loss is taken."""

    input_ids: list[int]
    labels: list[int]
    truncated: bool = False
    source: str = ""  # "file.jsonl:12"

    @property
    def num_targets(self) -> int:
        """Tokens that carry loss (position 0 never does: nothing predicts it)."""
        return sum(1 for y in self.labels[1:] if y != IGNORE_INDEX)


@dataclass(frozen=True)
class EncodedDataset(Sequence[EncodedRow]):
    """The rows of a dataset that have targets, with counts of what encoding dropped."""

    rows: list[EncodedRow]
    n_examples: int  # examples given, before dropping
    n_truncated: int  # rows cut to max_seq_len (kept or dropped)
    n_dropped: int  # rows with no target token left, not in ``rows``
    warnings: list[str] = field(default_factory=list)
    rendering: str = "chat"  # how the rows became text: "chat" or "plain" (rendering_of)

    @overload
    def __getitem__(self, i: int) -> EncodedRow: ...
    @overload
    def __getitem__(self, i: slice) -> list[EncodedRow]: ...
    def __getitem__(self, i: int | slice) -> EncodedRow | list[EncodedRow]:
        return self.rows[i]

    def __len__(self) -> int:
        return len(self.rows)

    def __iter__(self) -> Iterator[EncodedRow]:
        return iter(self.rows)


@dataclass(frozen=True)
class EncodedPair:
    """One preference pair: the prompt with its preferred answer, and with the other."""

    chosen: EncodedRow
    rejected: EncodedRow
    source: str = ""

    @property
    def num_targets(self) -> int:
        return self.chosen.num_targets + self.rejected.num_targets


@dataclass(frozen=True)
class EncodedPairs(Sequence[EncodedPair]):
    """A preference dataset's pairs, tokenised, and the rendering they got."""

    rows: list[EncodedPair]
    rendering: str = "chat"

    @overload
    def __getitem__(self, i: int) -> EncodedPair: ...
    @overload
    def __getitem__(self, i: slice) -> list[EncodedPair]: ...
    def __getitem__(self, i: int | slice) -> EncodedPair | list[EncodedPair]:
        return self.rows[i]

    def __len__(self) -> int:
        return len(self.rows)

    def __iter__(self) -> Iterator[EncodedPair]:
        return iter(self.rows)


def rendering_of(examples: Sequence[Example], tokenizer: Any, rendering: str = "chat") -> str:
    """How `examples` are rendered as the job asked (`rendering`): "chat" when they go
    through the tokenizer's chat template, else "plain" (raw text: a job that asked for it,
    a tokenizer without a template, or text rows)."""
    if rendering not in RENDERINGS:
        raise ValueError(f"rendering must be one of {RENDERINGS}, got {rendering!r}")
    chat = rendering == "chat" and bool(getattr(tokenizer, "chat_template", None))
    if chat and examples and all(e.format is Format.TEXT for e in examples):
        return "plain"
    return "chat" if chat else "plain"


def encode_example(
    example: Example,
    tokenizer: Any,
    *,
    max_seq_len: int,
    train_on_inputs: bool = False,
    rendering: str = "chat",
) -> EncodedRow:
    """Tokenise one example and build its labels; keep the first max_seq_len tokens."""
    if max_seq_len < 1:
        raise ValueError(f"max_seq_len must be >= 1, got {max_seq_len}")
    input_ids: list[int] = []
    labels: list[int] = []
    for ids, trainable in _token_segments(example, tokenizer, rendering):
        input_ids += ids
        labels += ids if trainable or train_on_inputs else [IGNORE_INDEX] * len(ids)
    truncated = len(input_ids) > max_seq_len
    return EncodedRow(input_ids[:max_seq_len], labels[:max_seq_len], truncated, example.source)


def encode_dataset(
    examples: Sequence[Example],
    tokenizer: Any,
    *,
    max_seq_len: int,
    train_on_inputs: bool = False,
    rendering: str = "chat",
) -> EncodedDataset:
    """Encode every example; drop (and count) rows with no target token left.

    Raises DataError when no row has a target token.
    """
    pairs = [e.source for e in examples if e.format is Format.PREFERENCE]
    if pairs:
        raise DataError(
            [
                Problem(where, 'a preference row: they are for method.type "dpo"')
                for where in pairs[:20]
            ]
        )
    rows: list[EncodedRow] = []
    dropped: list[EncodedRow] = []
    n_truncated = 0
    rendered = rendering_of(examples, tokenizer, rendering)
    for example in examples:
        row = encode_example(
            example,
            tokenizer,
            max_seq_len=max_seq_len,
            train_on_inputs=train_on_inputs,
            rendering=rendering,
        )
        n_truncated += row.truncated
        (rows if row.num_targets else dropped).append(row)
    warnings = []
    if n_truncated:
        warnings.append(
            f"{n_truncated} of {len(examples)} examples are longer than max_seq_len="
            f"{max_seq_len} tokens and were cut to it"
        )
    if dropped:
        warnings.append(
            f"{len(dropped)} of {len(examples)} examples have no target token within "
            f"max_seq_len={max_seq_len} and were dropped (first: {dropped[0].source or '?'}); "
            "raise max_seq_len or shorten their prompts"
        )
    for w in warnings:
        log.warning(w)
    if examples and not rows:
        raise DataError(
            f"no example has a target token within max_seq_len={max_seq_len}; "
            "raise max_seq_len or shorten the prompts"
        )
    return EncodedDataset(rows, len(examples), n_truncated, len(dropped), warnings, rendered)


def encode_preferences(
    examples: Sequence[Example],
    tokenizer: Any,
    *,
    max_seq_len: int,
    rendering: str = "chat",
    max_problems: int = 20,
) -> EncodedPairs:
    """Encode preference examples (``Format.PREFERENCE``: ``messages`` ending in the
    preferred answer, ``rejected`` the other) as pairs of rows, each answer rendered as a
    chat row's last assistant turn would be and the only target.

    Raises DataError naming every example that is not a preference row, or whose prompt and
    answer do not fit in max_seq_len tokens (up to `max_problems` of them)."""
    problems: list[Problem] = []
    pairs = []
    for example in examples:
        if example.format is not Format.PREFERENCE or example.rejected is None:
            problems.append(
                Problem(
                    example.source,
                    f"a {example.format.value} row, but a DPO job trains on preference rows "
                    '({"input", "preferred_output", "non_preferred_output"})',
                )
            )
            continue
        prompt = example.messages[:-1]
        rows = []
        for label, answer in (
            ("preferred_output", example.messages[-1][1]),
            ("non_preferred_output", example.rejected),
        ):
            as_chat = Example(
                (*prompt, ("assistant", answer)), Format.CHAT, example.source, example.untrained
            )
            row = encode_example(as_chat, tokenizer, max_seq_len=max_seq_len, rendering=rendering)
            if row.truncated:
                whole = len(
                    encode_example(
                        as_chat, tokenizer, max_seq_len=1 << 30, rendering=rendering
                    ).input_ids
                )
                problems.append(
                    Problem(
                        f"{example.source}: {label}",
                        f"the prompt and this answer are {whole} tokens, more than max_seq_len="
                        f"{max_seq_len}; a cut answer is not the one that was judged: raise "
                        "max_seq_len or drop the pair",
                    )
                )
            rows.append(row)
        if len(rows) == 2:
            pairs.append(EncodedPair(rows[0], rows[1], example.source))
        if len(problems) >= max_problems:
            break
    if problems:
        raise DataError(problems)
    if not pairs:
        raise DataError("the file holds no preference pair")
    return EncodedPairs(pairs, rendering_of(examples, tokenizer, rendering))


def sequence_rows(examples: Sequence[Any]) -> list[EncodedRow]:
    """The rows a batch of examples is: rows as they are; pairs as their preferred answers,
    then the others (pairs [0, m) are rows [0, m) and [m, 2m))."""
    if examples and isinstance(examples[0], EncodedPair):
        return [p.chosen for p in examples] + [p.rejected for p in examples]
    return list(examples)


def collate(
    rows: Sequence[EncodedRow], pad_id: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Right-pad rows into a batch.

    Returns (input_ids, labels, attention_mask), each a LongTensor (B, T) with T the
    longest row; padding has ``pad_id`` in input_ids, -100 in labels and 0 in the mask.
    """
    if not rows:
        raise ValueError("collate needs at least one row")
    width = max(len(r.input_ids) for r in rows)
    input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)  # (B, T)
    labels = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long)  # (B, T)
    attention_mask = torch.zeros((len(rows), width), dtype=torch.long)  # (B, T)
    for b, row in enumerate(rows):
        n = len(row.input_ids)
        input_ids[b, :n] = torch.tensor(row.input_ids, dtype=torch.long)
        labels[b, :n] = torch.tensor(row.labels, dtype=torch.long)
        attention_mask[b, :n] = 1
    return input_ids, labels, attention_mask


def pad_id_of(tokenizer: Any) -> int:
    """The id to pad with: the pad token, else EOS (padding is masked out anyway), else 0."""
    for tid in (tokenizer.pad_token_id, tokenizer.eos_token_id):
        if tid is not None:
            return int(tid)
    return 0


# --- segments: (token ids, carries loss) in order ---------------------------------------


def _token_segments(
    example: Example, tokenizer: Any, rendering: str = "chat"
) -> list[tuple[list[int], bool]]:
    if example.format is Format.TEXT:
        return _text_segments(example, tokenizer)
    if rendering == "chat" and getattr(tokenizer, "chat_template", None):
        texts = _chat_template_segments(example, tokenizer)
        return [(_encode(tokenizer, text), trainable) for text, trainable in texts if text]
    return _plain_segments(example, tokenizer)


def _encode(tokenizer: Any, text: str) -> list[int]:
    # Special tokens are in the rendered text already (the template writes them).
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def _render(tokenizer: Any, messages: list[dict[str, str]], *, generation_prompt: bool) -> str:
    text = tokenizer.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=generation_prompt
    )
    return str(text)


def _chat_template_segments(example: Example, tokenizer: Any) -> list[tuple[str, bool]]:
    """Split the rendered chat into (text, is target) pieces.

    An assistant turn's span is found by rendering prefixes of the conversation: the text
    of ``messages[:i]`` with the generation prompt ends where assistant i's content
    starts; the text of ``messages[:i + 1]`` ends after its end-of-turn marker. Trailing
    whitespace after the marker (the newline most templates add) is not a target. When a
    template does not render prefixes as prefixes of the whole, the content is looked up
    in the rendered text instead.
    """
    msgs = [{"role": role, "content": content} for role, content in example.messages]
    try:
        full = _render(tokenizer, msgs, generation_prompt=False)
    except Exception as e:
        raise DataError(
            f"the tokenizer's chat template failed on this conversation: {e}; "
            "check the roles and their order",
            where=example.source,
        ) from e
    pieces: list[tuple[str, bool]] = []
    cursor = 0
    for i, (role, content) in enumerate(example.messages):
        if role != "assistant" or i in example.untrained:
            continue
        span = _span_by_prefixes(tokenizer, msgs, i, full, cursor)
        if span is None:
            span = _span_by_search(tokenizer, content, full, cursor, example.source)
        start, end = span
        turn = full[start:end]
        at = turn.find(content)
        content_end = at + len(content) if at >= 0 else 0
        target_end = start + content_end + len(turn[content_end:].rstrip())
        pieces += [(full[cursor:start], False), (full[start:target_end], True)]
        cursor = target_end
    pieces.append((full[cursor:], False))
    return pieces


def _span_by_prefixes(
    tokenizer: Any, msgs: list[dict[str, str]], i: int, full: str, cursor: int
) -> tuple[int, int] | None:
    try:
        head = _render(tokenizer, msgs[:i], generation_prompt=True)
        turn = _render(tokenizer, msgs[: i + 1], generation_prompt=False)
    except Exception:
        return None  # e.g. a template that cannot render a conversation without a user turn
    if len(head) < cursor or not turn.startswith(head) or not full.startswith(turn):
        return None
    return len(head), len(turn)


def _span_by_search(
    tokenizer: Any, content: str, full: str, cursor: int, source: str
) -> tuple[int, int]:
    for needle in (content, content.strip()):
        start = full.find(needle, cursor)
        if start >= 0:
            end = start + len(needle)
            eos = tokenizer.eos_token
            if eos and full.startswith(eos, end):
                end += len(eos)
            return start, end
    raise DataError(
        "cannot find an assistant message in the chat template's output, so its loss "
        "mask is unknown; use a tokenizer whose template keeps message content verbatim",
        where=source,
    )


_ALPACA_PROMPT = "### Instruction:\n{instruction}\n\n### Response:\n"


def _bos_segment(tokenizer: Any) -> list[tuple[list[int], bool]]:
    """The BOS token when the tokenizer puts one before a text itself (LLaMA's does,
    SmolLM2's and Qwen2's do not: their BOS is a chat marker), as TRL and a raw prompt at
    inference get it."""
    bos = tokenizer.bos_token_id
    if bos is None or bos == tokenizer.eos_token_id:
        return []
    if list(tokenizer("", add_special_tokens=True)["input_ids"])[:1] != [bos]:
        return []
    return [([int(bos)], False)]


def _eos(tokenizer: Any) -> list[int]:
    return [] if tokenizer.eos_token_id is None else [int(tokenizer.eos_token_id)]


def _text_segments(example: Example, tokenizer: Any) -> list[tuple[list[int], bool]]:
    """``BOS? text EOS``, all of it a target (the EOS too: the model learns where a text
    ends)."""
    ((_, text),) = example.messages
    return [*_bos_segment(tokenizer), (_encode(tokenizer, text) + _eos(tokenizer), True)]


def _plain_segments(example: Example, tokenizer: Any) -> list[tuple[list[int], bool]]:
    eos = _eos(tokenizer)
    segments = _bos_segment(tokenizer)
    if example.format is Format.CHAT:
        for i, (role, content) in enumerate(example.messages):
            if role == "assistant":
                segments.append((_encode(tokenizer, "Assistant: "), False))
                segments.append((_encode(tokenizer, content) + eos, i not in example.untrained))
                segments.append((_encode(tokenizer, "\n"), False))
            elif role == "user":
                segments.append((_encode(tokenizer, f"User: {content}\n"), False))
            else:
                segments.append((_encode(tokenizer, f"{content}\n\n"), False))
        return segments
    (_, prompt), (_, completion) = example.messages
    if example.format is Format.ALPACA:
        prompt = _ALPACA_PROMPT.format(instruction=prompt)
    segments.append((_encode(tokenizer, prompt), False))
    segments.append((_encode(tokenizer, completion) + eos, True))
    return segments
