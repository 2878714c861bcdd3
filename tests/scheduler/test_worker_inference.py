"""Inference through HTTP: `/v1/completions` and `/v1/chat/completions` answered by a worker
that decodes between training steps. The answers equal the adapter decoded alone (mixloom's
own loader, no engine), a mixed batch of concurrent requests equals each request alone,
another tenant's model is a 404 like a missing one, bad input is a 4xx that says what, and a
job trained while requests are decoded beside it ends with the adapter it has alone."""

from __future__ import annotations

import io
import json
import threading
import zipfile
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest
import torch
from helpers import (
    adapter_tensors,
    arithmetic_rows,
    assert_same_tensors,
    stack,
    train_reference,
    wait_for,
    wait_status,
    workers_by_step,
    write_jsonl,
)

from mixloom.clients import Client

LORA = {
    "name": "lora",
    "seed": 21,
    "method": {
        "type": "lora",
        "lora": {
            "hyperparameters": {
                "r": 4,
                "lora_alpha": 8,
                "learning_rate": 1e-2,
                "batch_size": 4,
                "n_epochs": 2,
                "max_seq_len": 32,
                "warmup_ratio": 0.0,
                "checkpoint_every": 3,
            }
        },
    },
}
MOE = {
    "name": "moe",
    "seed": 22,
    "method": {
        "type": "mixlora",
        "mixlora": {
            "hyperparameters": {
                "r": 2,
                "lora_alpha": 4,
                "learning_rate": 1e-2,
                "batch_size": 4,
                "n_epochs": 2,
                "max_seq_len": 32,
                "warmup_ratio": 0.0,
                "num_experts": 3,
                "top_k": 2,
            }
        },
    },
}


def _http(client: Client) -> httpx.Client:
    return httpx.Client(
        base_url=client.base_url, headers={"Authorization": f"Bearer {client.api_key}"}, timeout=60
    )


def _complete(http: httpx.Client, model: str, prompt: str, **kw: Any) -> dict[str, Any]:
    r = http.post(
        "/v1/completions",
        json={"model": model, "prompt": prompt, "max_tokens": 8, "temperature": 0, **kw},
    )
    assert r.status_code == 200, r.text
    return r.json()  # type: ignore[no-any-return]


def _stream(http: httpx.Client, path: str, body: dict[str, Any]) -> Iterator[dict[str, Any]]:
    with http.stream("POST", path, json={**body, "stream": True}) as r:
        assert r.status_code == 200, r.read()
        assert r.headers["content-type"].startswith("text/event-stream")
        lines = [line for line in r.iter_lines() if line]
    assert lines[-1] == "data: [DONE]"
    for line in lines[:-1]:
        assert line.startswith("data: ")
        yield json.loads(line[len("data: ") :])


def _unzip(path: Path, into: Path) -> Path:
    with zipfile.ZipFile(path) as z:
        z.extractall(into)
    return into


def _greedy_alone(base: Path, adapter: Path | None, prompt: str, max_tokens: int) -> str:
    """The same greedy decoding without the engine: mixloom's loader (or plain transformers
    for the base) re-running the whole sequence each token, no KV cache, no batch."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import mixloom

    tok = AutoTokenizer.from_pretrained(base)
    ids = tok(prompt, return_tensors="pt").input_ids
    if adapter is None:
        model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32).eval()
    else:
        model = mixloom.load_adapter_model(str(base), adapter, dtype="float32", device="cpu")
    out: list[int] = []
    with torch.no_grad():
        for _ in range(max_tokens):
            nxt = int(model(input_ids=ids).logits[0, -1].argmax())
            if nxt == tok.eos_token_id:
                break
            out.append(nxt)
            ids = torch.cat([ids, torch.tensor([[nxt]])], dim=1)
    return str(tok.decode(out))


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    """A stack with one worker, and a tenant's LoRA and MixLoRA jobs trained on it."""
    from tiny import save_tiny_base

    tmp = tmp_path_factory.mktemp("serving")
    base = save_tiny_base(tmp / "tiny-base")
    data = write_jsonl(tmp / "train.jsonl", arithmetic_rows(12))
    with stack(tmp, base) as s:
        client = s.client("acme")
        f = client.upload_file(data)
        base_id = client.list_models()[0].id
        jobs = {
            spec["name"]: client.create_job(
                training_file=f.id, model=base_id, method=spec["method"], seed=spec["seed"]
            )
            for spec in (LORA, MOE)
        }
        s.start_worker()
        done = {n: wait_status(client, j.id, "succeeded") for n, j in jobs.items()}
        folders = {
            n: _unzip(client.download_adapter(j.id, tmp / f"{n}.zip"), tmp / n)
            for n, j in done.items()
        }
        ckpt = next(c for c in client.iter_checkpoints(done["lora"].id) if c.step_number == 3)
        yield {
            "stack": s,
            "client": client,
            "base": base,
            "base_id": base_id,
            "models": {n: j.fine_tuned_model for n, j in done.items()},
            "checkpoint": ckpt.fine_tuned_model_checkpoint,
            "folders": folders,
        }


def test_answers_equal_the_adapter_decoded_alone(trained: dict[str, Any]) -> None:
    http = _http(trained["client"])
    prompt = "3+4="
    cases = [(trained["base_id"], None)] + [
        (trained["models"][n], trained["folders"][n]) for n in ("lora", "moe")
    ]
    for model, folder in cases:
        answer = _complete(http, model, prompt, max_tokens=10)
        assert answer["object"] == "text_completion" and answer["model"] == model
        (choice,) = answer["choices"]
        assert choice["text"] == _greedy_alone(trained["base"], folder, prompt, 10), model
        assert choice["finish_reason"] in ("stop", "length")
        usage = answer["usage"]
        assert usage["prompt_tokens"] == len(prompt)  # the tiny tokenizer: a token a byte
        assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]


def test_concurrent_requests_for_different_models_equal_each_alone(
    trained: dict[str, Any],
) -> None:
    """Base, LoRA, MixLoRA and a checkpoint model, greedy and seeded-sampled, sent at once
    (one decoding batch on the worker) and one after another: the same answers."""
    http = _http(trained["client"])
    models = [trained["base_id"], *trained["models"].values(), trained["checkpoint"]]
    requests = [
        (m, p, kw)
        for m in models
        for p, kw in (("1+1=", {}), ("2+3=", {"temperature": 0.9, "seed": 7, "n": 2}))
    ]
    alone = [_complete(http, m, p, max_tokens=12, **kw)["choices"] for m, p, kw in requests]
    with ThreadPoolExecutor(len(requests)) as pool:
        together = list(
            pool.map(
                lambda r: _complete(http, r[0], r[1], max_tokens=12, **r[2])["choices"], requests
            )
        )
    assert together == alone


def test_chat_streams_the_same_answer_it_returns(trained: dict[str, Any]) -> None:
    http = _http(trained["client"])
    body = {
        "model": trained["models"]["moe"],
        "messages": [{"role": "system", "content": "add"}, {"role": "user", "content": "2+2"}],
        "max_completion_tokens": 9,
        "temperature": 0,
    }
    whole = http.post("/v1/chat/completions", json=body).json()
    assert whole["object"] == "chat.completion"
    message = whole["choices"][0]["message"]
    assert message["role"] == "assistant"
    chunks = list(
        _stream(http, "/v1/chat/completions", {**body, "stream_options": {"include_usage": True}})
    )
    assert {c["object"] for c in chunks} == {"chat.completion.chunk"}
    assert {c["id"] for c in chunks} == {chunks[0]["id"]}
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks[:-1] if c["choices"])
    assert text == message["content"]
    finishes = [c["choices"][0]["finish_reason"] for c in chunks[:-1] if c["choices"]]
    assert finishes[-1] == whole["choices"][0]["finish_reason"] and set(finishes[:-1]) <= {None}
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"] == whole["usage"]


def test_another_tenants_model_is_a_404_like_a_missing_one(trained: dict[str, Any]) -> None:
    s = trained["stack"]
    other = _http(s.client("globex"))
    mine = trained["models"]["lora"]
    missing = mine[:-4] + "0000"
    for model in (mine, trained["checkpoint"], mine.rsplit(":", 1)[-1]):
        theirs = other.post("/v1/completions", json={"model": model, "prompt": "1"})
        nothing = other.post("/v1/completions", json={"model": missing, "prompt": "1"})
        assert theirs.status_code == nothing.status_code == 404
        a, b = theirs.json()["error"], nothing.json()["error"]
        assert a["message"].replace(model, "X") == b["message"].replace(missing, "X")
        assert (a["code"], a["param"], a["type"]) == (b["code"], b["param"], b["type"])


@pytest.mark.parametrize(
    ("path", "body", "param", "says"),
    [
        ("/v1/chat/completions", {"messages": []}, "messages", "at least 1"),
        ("/v1/completions", {"prompt": "1", "max_tokens": 10**9}, "max_tokens", "limit"),
        ("/v1/completions", {"prompt": "1", "n": 100}, "n", "limit"),
        ("/v1/completions", {"prompt": "1", "temperature": 3}, "temperature", "2"),
        ("/v1/completions", {"prompt": "1", "tools": []}, "tools", "unknown key"),
        ("/v1/completions", {"prompt": "9" * 400}, "prompt", "context"),
        ("/v1/completions", {"prompt": ""}, "prompt", "empty"),
        ("/v1/chat/completions", {"messages": [{"role": "robot", "content": "x"}]}, None, "role"),
    ],
)
def test_bad_input_is_a_4xx_that_says_what(
    trained: dict[str, Any], path: str, body: dict[str, Any], param: str | None, says: str
) -> None:
    http = _http(trained["client"])
    r = http.post(path, json={"model": trained["base_id"], **body})
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert says in error["message"], error
    if param is not None:
        assert error["param"] is not None and param in error["param"], error
    # the server still answers
    assert _complete(http, trained["base_id"], "1+1=", max_tokens=2)["choices"]


def test_training_beside_inference_gives_the_adapter_it_gives_alone(
    tmp_path: Path, tiny_base: Path
) -> None:
    data = write_jsonl(tmp_path / "train.jsonl", arithmetic_rows(16))
    hyperparameters = {**LORA["method"]["lora"]["hyperparameters"], "n_epochs": 3}  # type: ignore[index]
    spec = {**LORA, "method": {"type": "lora", "lora": {"hyperparameters": hyperparameters}}}
    with stack(tmp_path, tiny_base) as s:
        client = s.client("acme")
        f = client.upload_file(data)
        base_id = client.list_models()[0].id
        s.start_worker()
        http = _http(client)
        stop = threading.Event()
        answered: list[int] = []

        def ask() -> None:
            while not stop.is_set():
                r = http.post(
                    "/v1/completions",
                    json={"model": base_id, "prompt": "5+5=", "max_tokens": 16, "seed": 3},
                )
                answered.append(r.status_code)

        askers = [threading.Thread(target=ask) for _ in range(3)]
        for t in askers:
            t.start()
        wait_for(lambda: answered)
        job = client.create_job(
            training_file=f.id, model=base_id, method=spec["method"], seed=spec["seed"]
        )
        before = len(answered)
        wait_status(client, job.id, "succeeded")
        during = len(answered) - before
        stop.set()
        for t in askers:
            t.join()
        archive = client.download_adapter(job.id, tmp_path / "beside.zip")
    assert during > 0 and set(answered) == {200}  # answered while the job trained
    reference = train_reference(tmp_path, tiny_base, data, [spec])
    assert_same_tensors(adapter_tensors(archive, tmp_path / "beside"), reference["lora"], atol=0)


def test_inference_and_training_workers_on_postgres_and_redis(
    tmp_path: Path, tiny_base: Path, pg_url: str, redis: str
) -> None:
    """A split deployment: a training-only worker trains the job, an inference-only worker
    answers for the model it produced (woken through Redis), each doing only its own part."""
    from mixloom.storage import inference

    data = write_jsonl(tmp_path / "train.jsonl", arithmetic_rows(12))
    with stack(tmp_path, tiny_base, database_url=pg_url, redis_url=redis) as s:
        client = s.client("acme-split")
        f = client.upload_file(data)
        base_id = client.list_models()[0].id
        s.start_worker(worker_id="trainer", worker_role="training")
        s.start_worker(worker_id="decoder", worker_role="inference")
        job = client.create_job(
            training_file=f.id, model=base_id, method=MOE["method"], seed=MOE["seed"]
        )
        done = wait_status(client, job.id, "succeeded")
        assert set(workers_by_step(s.db, job.id).values()) == {"trainer"}
        http = _http(client)
        body = {
            "model": done.fine_tuned_model,
            "messages": [{"role": "user", "content": "1+2"}],
            "max_tokens": 10,
            "temperature": 0,
        }
        whole = http.post("/v1/chat/completions", json=body).json()
        streamed = list(_stream(http, "/v1/chat/completions", body))
        text = "".join(c["choices"][0]["delta"].get("content", "") for c in streamed)
        assert text == whole["choices"][0]["message"]["content"]
        with s.db.transaction() as session:
            served = {
                inference.get(session=session, request_id=rid).worker_id
                for rid in (whole["id"], streamed[0]["id"])
            }
        assert served == {"decoder"}


def test_client_and_cli_chat_and_complete(
    trained: dict[str, Any], capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """`Client.chat` / `Client.complete` (whole and streamed), `mixloom chat` and `mixloom
    generate --model` give the API's answer."""
    from mixloom.cli import main

    client: Client = trained["client"]
    model = trained["models"]["lora"]
    messages = [{"role": "user", "content": "3+3"}]
    whole = client.chat(model, messages, max_tokens=8, temperature=0)
    stream = client.chat(model, messages, stream=True, max_tokens=8, temperature=0)
    deltas = list(stream)
    assert "".join(d.text for d in deltas) == whole.text
    assert deltas[-1].finish_reason == whole.choices[0].finish_reason
    assert stream.usage == whole.usage and stream.time_to_first_token is not None
    assert stream.id and stream.id != whole.raw["id"]

    done = client.complete(model, ["1+1=", "2+2="], max_tokens=4, temperature=0)
    assert [c.index for c in done.choices] == [0, 1]
    alone = client.complete(model, "2+2=", max_tokens=4, temperature=0)
    assert done.choices[1].text == alone.text

    common = ["--base-url", client.base_url, "--api-key", str(client.api_key)]
    assert (
        main(["chat", model, "-m", "3+3", "--temperature", "0", "--max-tokens", "8", *common]) == 0
    )
    out, err = capsys.readouterr()
    assert out == whole.text + "\n"
    assert f"{whole.usage['completion_tokens']} tokens" in err
    monkeypatch.setattr("sys.stdin", io.StringIO("3+3\n/exit\nnever sent\n"))
    assert main(["chat", model, "--temperature", "0", "--max-tokens", "8", *common]) == 0
    assert capsys.readouterr().out == whole.text + "\n"
    generate = ["generate", "--model", model, "--prompt", "3+3", "--max-new-tokens", "8"]
    assert main([*generate, *common]) == 0
    assert capsys.readouterr().out == whole.text + "\n"


def test_a_plain_text_model_is_asked_with_a_prompt_not_a_chat(
    tmp_path: Path, tiny_base: Path
) -> None:
    """A job trained with rendering "plain" (no chat template) makes a model that continues
    raw text: a chat request for it is a 400 that says to use /v1/completions, which works."""
    data = write_jsonl(tmp_path / "train.jsonl", arithmetic_rows(8))
    hyperparameters = {**LORA["method"]["lora"]["hyperparameters"], "rendering": "plain"}  # type: ignore[index]
    with stack(tmp_path, tiny_base) as s:
        client = s.client("plain")
        f = client.upload_file(data)
        job = client.create_job(
            training_file=f.id,
            method={"type": "lora", "lora": {"hyperparameters": hyperparameters}},
        )
        s.start_worker()
        model = wait_status(client, job.id, "succeeded").fine_tuned_model
        http = _http(client)
        chat = http.post(
            "/v1/chat/completions",
            json={"model": model, "messages": [{"role": "user", "content": "1+1"}]},
        )
        assert chat.status_code == 400, chat.text
        error = chat.json()["error"]
        assert error["param"] == "model" and "/v1/completions" in error["message"]
        assert _complete(http, model, "1+1=", max_tokens=3)["choices"]
