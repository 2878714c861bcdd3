"""Protocols: how a question becomes token sequences to score, and scores become a choice.

- ``loglik``: lm-evaluation-harness's ``multiple_choice`` output type, to the letter. Each
  choice is a request (context, " " + choice) -- for a fill-in task (WinoGrande), each choice
  is the context and " " + the rest of the sentence the continuation -- tokenised as lm-eval's
  HF model does (trailing spaces of the context move to the continuation; the whole text is
  encoded and the context's tokens cut off; an empty context is the BOS, or EOS, token; the
  tokenizer's own special tokens unless the text starts with that token; left truncation to
  the model's context). A choice's score is the sum of its continuation's token
  log-probabilities; ``acc`` takes the highest, ``acc_norm`` the highest per character of the
  choice (lm-eval's ``len(choice)``: for a fill-in task the choice is the filled context).
  Ties go to the first choice. ``num_fewshot`` examples come before the question, each
  "question answer\\n\\n", drawn as lm-eval draws them (``random.Random(1234)``, one draw per
  question in order; k + 1 drawn and the question itself removed when the pool is its split,
  as lm-eval does when a task's fewshot_split names the evaluated split -- left unset, lm-eval
  0.4.13 draws from the same rows without removing the question).
- ``paper``: the MixLoRA paper's instruction protocol (MoE-PEFT's commonsense tasks): the
  prompt lists the choices with labels (A)...; the model's next-token distribution at the
  answer position is compared over the labels' tokens, and the highest is the answer
  (``acc`` only). The answer position is where the labels' tokens first differ (right
  after the prompt when each label is one token, as in MoE-PEFT). The prompt is rendered
  exactly as mixloom renders the training row ``{"prompt": instruction, "completion": " " +
  label}`` (``mixloom data task --format paper``) under the adapter's ``rendering``:
  ``chat`` (mixloom's default) through the tokenizer's chat template when it has one,
  ``plain`` as prompt + completion; so an adapter is asked in the form it was trained on.
- ``cloze``: lm-eval's rule (``acc``, ``acc_norm``) on the rows of ``mixloom data task
  --format cloze`` (``{"prompt": context, "completion": " " + choice}``) rendered as mixloom
  trains on them; a choice's score is the log-probability of its completion's tokens (not
  the end-of-turn or EOS token after them). Rendered as plain text it is ``loglik``'s text,
  tokenised in two pieces (prompt, completion) as training does; through a chat template it
  scores adapters trained by mixloom on cloze rows in their own form.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from mixloom.errors import EvaluationError
from mixloom.eval.tasks import Doc, Task

PROTOCOLS = ("loglik", "paper", "cloze")
RENDERINGS = ("chat", "plain")  # mixloom.data.tokenize's: how a job's rows became text
FEWSHOT_SEED = 1234  # lm-eval's default fewshot_random_seed
DEFAULT_MAX_LENGTH = 2048  # lm-eval's when neither the config nor the tokenizer gives one
_UNSET_TOKENIZER_LENGTH = 10**20  # transformers' "no limit" model_max_length is ~1e30


@dataclass(frozen=True)
class Request:
    """One sequence and what to read from it: the log-probability of `targets[j]` as the token
    after position `at[j]` of `ids`."""

    ids: tuple[int, ...]
    at: tuple[int, ...]
    targets: tuple[int, ...]


@dataclass(frozen=True)
class DocRequests:
    """A question's requests and how their log-probabilities become one score per choice:
    with `per_choice`, request i is choice i and its score the sum; otherwise one request
    whose target j is choice j. `norms`: acc_norm's divisors, None where there is no
    acc_norm."""

    doc: Doc
    requests: tuple[Request, ...]
    per_choice: bool
    norms: tuple[float, ...] | None

    def choice_scores(self, logprobs: Sequence[Sequence[float]]) -> list[float]:
        """Per choice, from each request's target log-probabilities (in `requests`' order)."""
        if self.per_choice:
            return [float(sum(lp)) for lp in logprobs]
        return [float(x) for x in logprobs[0]]


def argmax(values: Sequence[float]) -> int:
    """The first index of the largest value (numpy's argmax, lm-eval's tie rule)."""
    return max(range(len(values)), key=values.__getitem__)


def max_length(model_config: Any, tokenizer: Any) -> int:
    """The context lm-eval gives a model: n_positions, max_position_embeddings or n_ctx of
    the config, else the tokenizer's model_max_length when set, else 2048."""
    for attr in ("n_positions", "max_position_embeddings", "n_ctx"):
        value = getattr(model_config, attr, None)
        if value:
            return int(value)
    limit = getattr(tokenizer, "model_max_length", None)
    if limit and limit < _UNSET_TOKENIZER_LENGTH:
        return int(limit)
    return DEFAULT_MAX_LENGTH


# -- few-shot examples --------------------------------------------------------------------


def fewshot_examples(rnd: random.Random, task: Task, doc: Doc, k: int) -> list[Doc]:
    """lm-eval's ContextSampler: k docs from the pool; when the pool is the evaluated split,
    k + 1 are drawn and the doc (and any copy of it) removed, redrawing from the pool without
    it if that left fewer than k."""
    if k == 0:
        return []
    pool = list(task.fewshot_pool)
    if len(pool) < k + task.fewshot_same_split:
        raise EvaluationError(
            f"{task.name} has {len(pool)} few-shot examples, too few for num_fewshot={k}",
            param="num_fewshot",
            code="invalid_value",
        )
    if not task.fewshot_same_split:
        return rnd.sample(pool, k)
    shots = [d for d in rnd.sample(pool, k + 1) if d != doc][:k]
    if len(shots) < k:
        shots = rnd.sample([d for d in pool if d != doc], k)
    return shots


def _example_text(doc: Doc) -> str:
    """A few-shot example: the question, a space, its answer."""
    if doc.target is None:
        return f"{doc.query} {doc.choices[doc.gold]}"
    return f"{doc.choices[doc.gold]} {doc.target}"


def lm_eval_pairs(doc: Doc, prefix: str = "") -> list[tuple[str, str]]:
    """lm-eval's (context, continuation) request of each choice."""
    if doc.target is None:
        return [(prefix + doc.query, f" {c}") for c in doc.choices]
    return [(prefix + c, f" {doc.target}") for c in doc.choices]


# -- tokenisation -------------------------------------------------------------------------


def _prefix_token_id(tokenizer: Any) -> int:
    bos = tokenizer.bos_token_id
    return int(bos if bos is not None else tokenizer.eos_token_id)


def _encode(tokenizer: Any, text: str, prefix_text: str) -> list[int]:
    # lm-eval's tok_encode: the tokenizer's special tokens, unless the text has the prefix
    # token already
    if prefix_text and text.startswith(prefix_text):
        return list(tokenizer.encode(text, add_special_tokens=False))
    return list(tokenizer.encode(text))


def encode_pair(tokenizer: Any, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """(context tokens, continuation tokens) as lm-eval's HF model makes them."""
    prefix_id = _prefix_token_id(tokenizer)
    if context == "":
        cont = list(tokenizer.encode(continuation, add_special_tokens=False))
        if cont and cont[0] == prefix_id:
            return cont[:1], cont[1:]
        return [prefix_id], cont
    spaces = len(context) - len(context.rstrip())
    if spaces:
        context, continuation = context[:-spaces], context[-spaces:] + continuation
    prefix_text = tokenizer.decode([prefix_id])
    whole = _encode(tokenizer, context + continuation, prefix_text)
    ctx = _encode(tokenizer, context, prefix_text)
    return ctx, whole[len(ctx) :]


def continuation_request(context: list[int], cont: list[int], length: int, where: str) -> Request:
    """Score `cont` after `context`, the sequence cut from the left to `length` inputs."""
    if not cont or len(cont) > length:
        raise EvaluationError(
            f"{where}: a choice's continuation is {len(cont)} tokens; it must be 1 to "
            f"{length} (the model's context)",
            code="invalid_task_file",
        )
    seq = (context + cont)[-(length + 1) :]
    ids = seq[:-1]
    first = len(ids) - len(cont)
    return Request(tuple(ids), tuple(range(first, len(ids))), tuple(cont))


def _training_row(
    tokenizer: Any, prompt: str, completion: str, where: str, rendering: str
) -> tuple[list[int], int]:
    """(token ids, index of the first target token) of the row {"prompt", "completion"} as
    mixloom's trainer encodes it (mixloom.data.tokenize)."""
    from mixloom.data.formats import Example, Format
    from mixloom.data.tokenize import IGNORE_INDEX, encode_example

    example = Example(
        (("user", prompt), ("assistant", completion)), Format.PROMPT_COMPLETION, where
    )
    row = encode_example(example, tokenizer, max_seq_len=1 << 30, rendering=rendering)
    first = next(i for i, y in enumerate(row.labels) if y != IGNORE_INDEX)
    return row.input_ids, first


# -- requests per protocol ------------------------------------------------------------------


def _loglik(
    task: Task, docs: Sequence[Doc], tok: Any, length: int, k: int, seed: int
) -> list[DocRequests]:
    rnd = random.Random(seed)
    out = []
    for doc in docs:
        prefix = "".join(f"{_example_text(s)}\n\n" for s in fewshot_examples(rnd, task, doc, k))
        requests = tuple(
            continuation_request(*encode_pair(tok, ctx, cont), length, doc.source)
            for ctx, cont in lm_eval_pairs(doc, prefix)
        )
        norms = tuple(float(len(c)) for c in doc.choices)
        out.append(DocRequests(doc, requests, True, norms))
    return out


def _paper(docs: Sequence[Doc], tok: Any, length: int, rendering: str) -> list[DocRequests]:
    out = []
    for doc in docs:
        rows = [
            _training_row(tok, doc.instruction, f" {label}", doc.source, rendering)
            for label in doc.labels
        ]
        # The answer position is where the labels' rows first differ: at once for a tokenizer
        # with a " A" token, after the space for a byte-level one.
        first = rows[0][1]
        seqs = [ids for ids, _ in rows]
        p = 0
        while all(len(s) > p for s in seqs) and len({s[p] for s in seqs}) == 1:
            p += 1
        answers = [s[p] if len(s) > p else None for s in seqs]
        if p < first or None in answers or len(set(answers)) < len(answers):
            raise EvaluationError(
                f"{doc.source}: the labels {list(doc.labels)} cannot be told apart at one "
                "answer position in this tokenizer (the prompt tokenises differently with "
                "each, or two share the token where they first differ)",
                code="invalid_task_file",
            )
        prompt = seqs[0][:p][-length:]
        at = (len(prompt) - 1,) * len(answers)
        targets = tuple(int(a) for a in answers if a is not None)
        out.append(DocRequests(doc, (Request(tuple(prompt), at, targets),), False, None))
    return out


def _cloze(docs: Sequence[Doc], tok: Any, length: int, rendering: str) -> list[DocRequests]:
    out = []
    for doc in docs:
        requests = []
        for ctx, cont in lm_eval_pairs(doc):
            ids, first = _training_row(tok, ctx, cont, doc.source, rendering)
            cont_ids = list(tok(cont, add_special_tokens=False)["input_ids"])
            if ids[first : first + len(cont_ids)] != cont_ids:
                raise EvaluationError(
                    f"{doc.source}: the completion {cont!r} tokenises differently inside the "
                    "training row than alone",
                    code="invalid_task_file",
                )
            requests.append(continuation_request(ids[:first], cont_ids, length, doc.source))
        norms = tuple(float(len(c)) for c in doc.choices)
        out.append(DocRequests(doc, tuple(requests), True, norms))
    return out


def build_requests(
    task: Task,
    tokenizer: Any,
    *,
    protocol: str,
    length: int,
    num_fewshot: int = 0,
    limit: int | None = None,
    seed: int = FEWSHOT_SEED,
    rendering: str = "chat",
) -> list[DocRequests]:
    """The first `limit` questions of `task` as requests under `protocol`; `rendering`: how
    the adapters' training rows became text (paper and cloze ask in that form)."""
    if protocol not in PROTOCOLS:
        raise EvaluationError(
            f"unknown protocol {protocol!r}; use one of {', '.join(PROTOCOLS)}",
            param="protocol",
            code="invalid_value",
        )
    if num_fewshot < 0 or (num_fewshot and protocol != "loglik"):
        raise EvaluationError(
            f"num_fewshot={num_fewshot}: few-shot examples are for the loglik protocol only "
            "(paper and cloze ask an adapter as it was trained), and never negative",
            param="num_fewshot",
            code="invalid_value",
        )
    if limit is not None and limit < 1:
        raise EvaluationError(
            f"limit={limit}: give a positive number of questions",
            param="limit",
            code="invalid_value",
        )
    if rendering not in RENDERINGS:
        raise EvaluationError(
            f"unknown rendering {rendering!r}; use one of {', '.join(RENDERINGS)}",
            param="rendering",
            code="invalid_value",
        )
    docs = task.docs[:limit]
    if protocol == "loglik":
        return _loglik(task, docs, tokenizer, length, num_fewshot, seed)
    if protocol == "paper":
        return _paper(docs, tokenizer, length, rendering)
    return _cloze(docs, tokenizer, length, rendering)
