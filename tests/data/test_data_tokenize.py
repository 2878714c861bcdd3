"""Tokenisation and loss masks: only the answer and its end-of-turn token carry loss."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from mixloom.data.formats import Example, Format, load_jsonl
from mixloom.data.tokenize import (
    IGNORE_INDEX,
    EncodedRow,
    collate,
    encode_dataset,
    encode_example,
    pad_id_of,
    rendering_of,
)
from mixloom.errors import DataError

EXAMPLES = Path(__file__).resolve().parents[2] / "examples" / "data"

CHAT = Example(
    (
        ("system", "Be brief."),
        ("user", "Hi"),
        ("assistant", "Hello there"),
        ("user", "Bye"),
        ("assistant", "See you"),
    ),
    Format.CHAT,
    "t.jsonl:1",
)
PC = Example((("user", "2+2="), ("assistant", " 4")), Format.PROMPT_COMPLETION, "t.jsonl:1")
ALPACA = Example((("user", "Sort\n\n3 1"), ("assistant", "1 3")), Format.ALPACA, "t.jsonl:1")
TEXT = Example((("text", "Once upon a time"),), Format.TEXT, "t.jsonl:1")


def target_spans(row: EncodedRow, tok: Any) -> list[str]:
    """Decoded runs of consecutive target tokens."""
    spans: list[list[int]] = []
    prev = False
    for tid, y in zip(row.input_ids, row.labels, strict=True):
        is_target = y != IGNORE_INDEX
        if is_target:
            assert y == tid
            if not prev:
                spans.append([])
            spans[-1].append(tid)
        prev = is_target
    return [tok.decode(s) for s in spans]


def encode(example: Example, tok: Any, **kw: Any) -> EncodedRow:
    kw.setdefault("max_seq_len", 4096)
    return encode_example(example, tok, **kw)


# --- chat template: tiny offline tokenizer -------------------------------------------


def test_chat_template_masks_everything_but_assistant_turns(chat_tok: Any) -> None:
    row = encode(CHAT, chat_tok)
    assert target_spans(row, chat_tok) == ["Hello there<|im_end|>", "See you<|im_end|>"]
    messages = [{"role": r, "content": c} for r, c in CHAT.messages]
    rendered = chat_tok.apply_chat_template(messages, tokenize=False)
    assert chat_tok.decode(row.input_ids) == rendered
    assert not row.truncated and row.source == "t.jsonl:1"


@pytest.mark.parametrize("example", [PC, ALPACA], ids=["prompt_completion", "alpaca"])
def test_single_turn_formats_render_as_a_chat(chat_tok: Any, example: Example) -> None:
    row = encode(example, chat_tok)
    user, answer = (c for _, c in example.messages)
    assert chat_tok.decode(row.input_ids) == (
        f"<|im_start|>user\n{user}<|im_end|>\n<|im_start|>assistant\n{answer}<|im_end|>\n"
    )
    assert target_spans(row, chat_tok) == [f"{answer}<|im_end|>"]


def test_template_without_prefix_property_falls_back_to_search(make_tiny_tokenizer: Any) -> None:
    # Writes the end-of-sequence token only after the last message, so rendering a prefix
    # of the chat does not give a prefix of the whole: the first answer is found by search,
    # the last by prefixes (its end-of-turn is the template's "\n</s>").
    template = (
        "{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}\n{% endfor %}"
        "{% if add_generation_prompt %}[assistant] {% else %}</s>{% endif %}"
    )
    tok = make_tiny_tokenizer(template)
    row = encode(CHAT, tok)
    assert target_spans(row, tok) == ["Hello there", "See you\n</s>"]


def test_template_error_is_a_data_error(make_tiny_tokenizer: Any) -> None:
    tok = make_tiny_tokenizer("{{ raise_exception('roles must alternate') }}")
    with pytest.raises(DataError, match=r"t.jsonl:1: the tokenizer's chat template failed"):
        encode(CHAT, tok)


@pytest.mark.parametrize("fixture", ["chat_tok", "plain_tok"])
def test_weight_zero_assistant_message_carries_no_loss(
    request: pytest.FixtureRequest, fixture: str
) -> None:
    tok = request.getfixturevalue(fixture)
    example = Example(CHAT.messages, Format.CHAT, CHAT.source, frozenset({2}))
    row = encode(example, tok)
    assert row.input_ids == encode(CHAT, tok).input_ids
    assert [s.startswith("See you") for s in target_spans(row, tok)] == [True]


# --- no chat template -----------------------------------------------------------------
# (the tiny tokenizer puts no BOS before a text itself, so plain rows start without one)


def test_plain_prompt_completion_is_concatenated_with_eos(plain_tok: Any) -> None:
    row = encode(PC, plain_tok)
    assert plain_tok.decode(row.input_ids) == "2+2= 4</s>"
    assert target_spans(row, plain_tok) == [" 4</s>"]


def test_plain_alpaca_uses_an_instruction_prompt(plain_tok: Any) -> None:
    row = encode(ALPACA, plain_tok)
    text = plain_tok.decode(row.input_ids)
    assert text == "### Instruction:\nSort\n\n3 1\n\n### Response:\n1 3</s>"
    assert target_spans(row, plain_tok) == ["1 3</s>"]


def test_plain_chat_uses_role_lines(plain_tok: Any) -> None:
    row = encode(CHAT, plain_tok)
    assert plain_tok.decode(row.input_ids) == (
        "Be brief.\n\nUser: Hi\nAssistant: Hello there</s>\nUser: Bye\nAssistant: See you</s>\n"
    )
    assert target_spans(row, plain_tok) == ["Hello there</s>", "See you</s>"]


def test_plain_rows_start_with_bos_where_the_tokenizer_puts_one(plain_tok: Any) -> None:
    from tokenizers import processors

    plain_tok._tokenizer.post_processor = processors.TemplateProcessing(
        single="<s> $A", special_tokens=[("<s>", plain_tok.bos_token_id)]
    )  # as LLaMA's tokenizer does
    assert plain_tok.decode(encode(PC, plain_tok).input_ids) == "<s>2+2= 4</s>"
    assert plain_tok.decode(encode(TEXT, plain_tok).input_ids) == "<s>Once upon a time</s>"


# --- rendering "plain" and text rows: no chat template even where there is one ----------


def test_plain_rendering_skips_the_chat_template(chat_tok: Any) -> None:
    row = encode(PC, chat_tok, rendering="plain")
    assert chat_tok.decode(row.input_ids) == "2+2= 4</s>"  # prompt + completion + EOS
    assert target_spans(row, chat_tok) == [" 4</s>"]
    assert rendering_of([PC], chat_tok, "plain") == "plain"
    assert rendering_of([PC], chat_tok) == "chat"  # the default for a templated tokenizer
    chat = encode(CHAT, chat_tok, rendering="plain")
    assert "<|im_start|>" not in chat_tok.decode(chat.input_ids)


@pytest.mark.parametrize("fixture", ["chat_tok", "plain_tok"])
def test_text_rows_train_on_every_token(request: pytest.FixtureRequest, fixture: str) -> None:
    tok = request.getfixturevalue(fixture)
    row = encode(TEXT, tok)
    assert tok.decode(row.input_ids) == "Once upon a time</s>"
    assert target_spans(row, tok) == ["Once upon a time</s>"]
    assert row.num_targets == len(row.input_ids) - 1  # all but the first (nothing predicts it)
    assert rendering_of([TEXT], tok) == "plain"
    assert encode_dataset([TEXT], tok, max_seq_len=64).rendering == "plain"


def test_unknown_rendering_is_refused(chat_tok: Any) -> None:
    with pytest.raises(ValueError, match="rendering must be one of"):
        encode_dataset([PC], chat_tok, max_seq_len=64, rendering="markdown")


# --- options ----------------------------------------------------------------------------


@pytest.mark.parametrize("fixture", ["chat_tok", "plain_tok"])
def test_train_on_inputs_trains_every_token(request: pytest.FixtureRequest, fixture: str) -> None:
    tok = request.getfixturevalue(fixture)
    row = encode(CHAT, tok, train_on_inputs=True)
    assert row.labels == row.input_ids
    assert row.input_ids == encode(CHAT, tok).input_ids


def test_truncation_keeps_the_start(chat_tok: Any) -> None:
    full = encode(CHAT, chat_tok)
    row = encode(CHAT, chat_tok, max_seq_len=len(full.input_ids) - 5)
    assert row.truncated
    assert row.input_ids == full.input_ids[:-5]
    assert row.labels == full.labels[:-5]


def test_rows_without_targets_after_truncation_are_dropped_and_counted(
    chat_tok: Any, caplog: pytest.LogCaptureFixture
) -> None:
    long_prompt = Example(
        (("user", "x" * 100), ("assistant", "ok")), Format.PROMPT_COMPLETION, "t.jsonl:2"
    )
    rows = encode_dataset([PC, long_prompt, ALPACA], chat_tok, max_seq_len=60)
    assert len(rows) == 2 and [r.source for r in rows] == ["t.jsonl:1", "t.jsonl:1"]
    assert (rows.n_examples, rows.n_truncated, rows.n_dropped) == (3, 1, 1)
    assert any("1 of 3 examples have no target token" in w for w in rows.warnings)
    assert "t.jsonl:2" in caplog.text


def test_all_rows_dropped_is_a_data_error(chat_tok: Any) -> None:
    with pytest.raises(DataError, match="no example has a target token within max_seq_len=8"):
        encode_dataset([PC], chat_tok, max_seq_len=8)


def test_collate_pads_right_and_masks_padding(chat_tok: Any) -> None:
    rows = [encode(PC, chat_tok), encode(CHAT, chat_tok)]
    pad = pad_id_of(chat_tok)
    input_ids, labels, mask = collate(rows, pad)
    n0, n1 = (len(r.input_ids) for r in rows)
    assert input_ids.shape == labels.shape == mask.shape == (2, n1)
    assert input_ids.dtype == labels.dtype == mask.dtype == torch.long
    assert input_ids[0, :n0].tolist() == rows[0].input_ids
    assert (input_ids[0, n0:] == pad).all() and (labels[0, n0:] == IGNORE_INDEX).all()
    assert mask[0].tolist() == [1] * n0 + [0] * (n1 - n0) and mask[1].all()
    assert labels[1].tolist() == rows[1].labels


# --- the real SmolLM2 tokenizer ----------------------------------------------------------


def test_smollm2_chat_matches_its_own_template(smollm2_tok: Any) -> None:
    row = encode(CHAT, smollm2_tok)
    messages = [{"role": r, "content": c} for r, c in CHAT.messages]
    expected = smollm2_tok.apply_chat_template(messages, tokenize=True)
    if not isinstance(expected, list):
        expected = expected["input_ids"]
    assert row.input_ids == list(expected)
    assert target_spans(row, smollm2_tok) == ["Hello there<|im_end|>", "See you<|im_end|>"]


def test_smollm2_default_system_prompt_carries_no_loss(smollm2_tok: Any) -> None:
    row = encode(PC, smollm2_tok)
    assert "You are a helpful AI assistant" in smollm2_tok.decode(row.input_ids)
    assert target_spans(row, smollm2_tok) == [" 4<|im_end|>"]


def test_smollm2_plain_rendering_is_prompt_completion_eos(smollm2_tok: Any) -> None:
    row = encode(PC, smollm2_tok, rendering="plain")
    assert smollm2_tok.decode(row.input_ids) == "2+2= 4<|im_end|>"  # no system prompt, no BOS
    assert target_spans(row, smollm2_tok) == [" 4<|im_end|>"]


def test_smollm2_encodes_the_alpaca_demo_set(smollm2_tok: Any) -> None:
    examples = load_jsonl(EXAMPLES / "alpaca_demo_200.jsonl")
    rows = encode_dataset(examples, smollm2_tok, max_seq_len=512)
    assert rows.n_dropped == 0 and len(rows) == 200
    for example, row in zip(examples[:20], rows, strict=False):
        answer = example.messages[-1][1]
        if not row.truncated:
            assert target_spans(row, smollm2_tok) == [f"{answer}<|im_end|>"]
