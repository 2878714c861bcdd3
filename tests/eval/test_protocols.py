"""Protocol details without a model: lm-eval's tokenisation rules, few-shot draws, ties, the
paper's answer position in the training row's own tokens, and settings a protocol refuses."""

from __future__ import annotations

import random
from types import SimpleNamespace

import pytest
from tiny import TURN_TEMPLATE, tiny_tokenizer

from mixloom.data.formats import Example, Format
from mixloom.data.tokenize import IGNORE_INDEX, encode_example
from mixloom.errors import EvaluationError
from mixloom.eval.protocols import (
    argmax,
    build_requests,
    continuation_request,
    encode_pair,
    fewshot_examples,
    max_length,
)
from mixloom.eval.tasks import Doc, Task


def _task(docs: list[Doc], *, same_split: bool = True) -> Task:
    pool = tuple(docs) if same_split else tuple(Doc(f"pool {i}", ("a", "b"), 0) for i in range(9))
    return Task("t", "test", tuple(docs), pool, same_split)


def test_encode_pair_moves_trailing_spaces_and_splits_the_whole() -> None:
    tok = tiny_tokenizer()
    ctx, cont = encode_pair(tok, "Question: hi  ", " there")
    assert tok.decode(ctx) == "Question: hi" and tok.decode(cont) == "   there"
    ctx, cont = encode_pair(tok, "", " bye")  # an empty context is the BOS token
    assert ctx == [tok.bos_token_id] and tok.decode(cont) == " bye"


def test_continuation_request_cuts_from_the_left() -> None:
    req = continuation_request(list(range(10)), [10, 11, 12], 8, "x")
    assert req.ids == (4, 5, 6, 7, 8, 9, 10, 11)  # 8 inputs; the last target never an input
    assert req.at == (5, 6, 7) and req.targets == (10, 11, 12)
    with pytest.raises(EvaluationError, match="continuation is 9 tokens"):
        continuation_request([1], list(range(9)), 8, "x")


def test_ties_go_to_the_first_choice() -> None:
    assert argmax([-1.0, -0.5, -0.5]) == 1


def test_max_length_as_lm_eval() -> None:
    tok = SimpleNamespace(model_max_length=10**30)
    assert max_length(SimpleNamespace(max_position_embeddings=8192), tok) == 8192
    assert max_length(SimpleNamespace(), SimpleNamespace(model_max_length=512)) == 512
    assert max_length(SimpleNamespace(), tok) == 2048


def test_fewshot_never_shows_a_question_its_own_answer() -> None:
    docs = [Doc(f"q{i}", ("a", "b"), 0) for i in range(4)]
    task = _task(docs)
    rnd = random.Random(1234)
    for doc in docs * 20:
        shots = fewshot_examples(rnd, task, doc, 3)
        assert len(shots) == 3 and doc not in shots
    other = _task(docs, same_split=False)
    assert all(d in other.fewshot_pool for d in fewshot_examples(rnd, other, docs[0], 2))
    with pytest.raises(EvaluationError, match="too few for num_fewshot=4"):
        fewshot_examples(rnd, task, docs[0], 4)


@pytest.mark.parametrize(
    ("template", "rendering"), [(TURN_TEMPLATE, "chat"), (TURN_TEMPLATE, "plain"), (None, "chat")]
)
def test_paper_reads_the_label_where_training_puts_it(template: str | None, rendering: str) -> None:
    tok = tiny_tokenizer(template)
    doc = Doc(
        "", ("x", "y", "z"), 1, None, "Pick one:\n(A) x\n(B) y\n(C) z\nAnswer:", ("A", "B", "C")
    )
    (dr,) = build_requests(_task([doc]), tok, protocol="paper", length=4096, rendering=rendering)
    (req,) = dr.requests
    example = Example((("user", doc.instruction), ("assistant", " B")), Format.PROMPT_COMPLETION)
    row = encode_example(example, tok, max_seq_len=4096, rendering=rendering)
    first = row.labels.index(next(y for y in row.labels if y != IGNORE_INDEX))
    # the byte-level tokenizer spells " B" as a space then "B": the labels differ after it
    assert list(req.ids) == row.input_ids[: first + 1]
    assert req.at == (len(req.ids) - 1,) * 3
    assert [tok.decode([t]) for t in req.targets] == ["A", "B", "C"]
    assert ("<|im_start|>" in tok.decode(list(req.ids))) == (
        template is not None and rendering == "chat"
    )


def test_settings_a_protocol_refuses() -> None:
    tok = tiny_tokenizer()
    task = _task([Doc("q", ("a", "b"), 0)])
    with pytest.raises(EvaluationError, match="unknown protocol") as e:
        build_requests(task, tok, protocol="mmlu", length=64)
    assert e.value.param == "protocol"
    with pytest.raises(EvaluationError, match="loglik protocol only") as e:
        build_requests(task, tok, protocol="paper", length=64, num_fewshot=1)
    assert e.value.param == "num_fewshot"
    with pytest.raises(EvaluationError, match="unknown rendering") as e:
        build_requests(task, tok, protocol="paper", length=64, rendering="markdown")
    assert e.value.param == "rendering"
    with pytest.raises(EvaluationError, match="limit=0"):
        build_requests(task, tok, protocol="loglik", length=64, limit=0)
    labels = Doc("q", ("a", "b"), 0, None, "Pick:", ("AB", "AC"))  # one token at a time: fine
    assert build_requests(_task([labels]), tok, protocol="paper", length=64)
    same = Doc("q", ("a", "b"), 0, None, "Pick:", ("A", "A"))
    with pytest.raises(EvaluationError, match="cannot be told apart"):
        build_requests(_task([same]), tok, protocol="paper", length=64)
