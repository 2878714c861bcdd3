"""A job's evaluation through HTTP: the worker scores the trained adapter and the base model on
the tasks the job named (a built-in task and the tenant's own choice file), results equal to
scoring the downloaded adapter apart; a failing evaluation never fails its job; bad tasks are
400s that name them."""

from __future__ import annotations

import json
import zipfile
from pathlib import Path
from typing import Any

import httpx
import pytest
from helpers import arithmetic_rows, stack, wait_status, write_jsonl

LORA = {
    "type": "lora",
    "lora": {"hyperparameters": {"r": 4, "batch_size": 4, "n_epochs": 1, "max_seq_len": 32}},
}
CHOICES = [
    {"query": f"{a}+{b}=", "choices": [str(a + b), str(a + b + 1), str(a * b + 7)], "gold": 0}
    for a in range(3)
    for b in range(2)
]


def _upload(http: httpx.Client, name: str, rows: list[dict[str, Any]], purpose: str) -> Any:
    body = "".join(json.dumps(r) + "\n" for r in rows).encode()
    return http.post("/v1/files", files={"file": (name, body)}, data={"purpose": purpose})


def _apart(
    base: Path,
    archive: Path,
    into: Path,
    tasks: list[str],
    limit: int,
    **options: Any,
) -> Any:
    """The same evaluation outside the worker: the downloaded adapter loaded fresh."""
    from mixloom.eval.scorer import evaluate
    from mixloom.eval.tasks import load_task
    from mixloom.model.adapter_model import AdapterModel
    from mixloom.model.base import load_base_model
    from mixloom.model.formats import load_adapter_into

    with zipfile.ZipFile(archive) as z:
        z.extractall(into)
    loaded = load_base_model(str(base), dtype="float32", device="cpu")
    model = AdapterModel(loaded.model)
    load_adapter_into(model, into, "apart")
    return evaluate(
        model,
        loaded.tokenizer,
        [None, "apart"],
        [load_task(t) for t in tasks],
        limit=limit,
        **options,
    )


def test_a_job_is_evaluated_against_its_base(
    tmp_path: Path,
    tiny_base: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from mixloom.cli import main
    from mixloom.scheduler import evaluation as worker_evaluation

    renderings: list[tuple[str, str]] = []  # (protocol, rendering) of each scoring pass
    real_evaluate = worker_evaluation.evaluate

    def recorded(*args: Any, **kwargs: Any) -> Any:
        renderings.append((kwargs["protocol"], kwargs["rendering"]))
        return real_evaluate(*args, **kwargs)

    monkeypatch.setattr(worker_evaluation, "evaluate", recorded)

    data = write_jsonl(tmp_path / "train.jsonl", arithmetic_rows(12))
    with stack(tmp_path, tiny_base) as s:
        client = s.client("evaluated")
        http = httpx.Client(
            base_url=s.url, headers={"Authorization": f"Bearer {client.api_key}"}, timeout=60
        )
        f = client.upload_file(data)
        mine = _upload(http, "sums.jsonl", CHOICES, "evals")
        assert mine.status_code == 200, mine.text
        evals_id = mine.json()["id"]
        base_id = client.list_models()[0].id
        body = {"model": base_id, "training_file": f.id, "method": LORA, "seed": 3}
        evaluation = {"tasks": [evals_id, "arc_easy"], "limit": 4}
        job = http.post("/v1/fine_tuning/jobs", json={**body, "evaluation": evaluation}).json()
        assert job["evaluation"]["status"] == "pending"
        pending = http.get(f"/v1/fine_tuning/jobs/{job['id']}/evaluation").json()
        assert (pending["status"], pending["results"]) == ("pending", [])
        # a protocol setting it cannot take fails the evaluation, not the job
        bad = {**evaluation, "protocol": "paper", "num_fewshot": 2}
        other = http.post("/v1/fine_tuning/jobs", json={**body, "evaluation": bad}).json()
        # a job trained on plain text is asked in plain text under the cloze protocol
        plain_method = {"type": "lora", "lora": {"hyperparameters": {
            **LORA["lora"]["hyperparameters"], "rendering": "plain"}}}  # fmt: skip
        cloze = {"tasks": [evals_id], "limit": 4, "protocol": "cloze"}
        plain = http.post(
            "/v1/fine_tuning/jobs",
            json={**body, "method": plain_method, "evaluation": cloze},
        ).json()
        s.start_worker()
        done = wait_status(client, job["id"], "succeeded")
        result = http.get(f"/v1/fine_tuning/jobs/{job['id']}/evaluation").json()
        assert result["status"] == "succeeded", result
        assert [(r["model"], r["task"]) for r in result["results"]] == [
            ("base", evals_id),
            (done.fine_tuned_model, evals_id),
            ("base", "arc_easy"),
            (done.fine_tuned_model, "arc_easy"),
        ]
        assert all(r["n"] == 4 for r in result["results"])
        events = [e.message for e in client.iter_events(job["id"])]
        assert any(e.startswith(f"Evaluation: {evals_id} acc") for e in events), events
        common = ["--base-url", s.url, "--api-key", str(client.api_key)]
        assert main(["jobs", "evaluation", job["id"], *common]) == 0
        table = capsys.readouterr().out.splitlines()
        assert table[0].split() == [
            "TASK",
            "N",
            "BASE",
            "ACC",
            "ADAPTER",
            "ACC",
            "DIFF",
            "(POINTS)",
        ]
        assert [line.split()[0] for line in table[1:]] == [evals_id, "arc_easy"]
        archive = client.download_adapter(job["id"], tmp_path / "adapter.zip")
        # the same model scored from the CLI: downloaded through the API, the base it names
        out = tmp_path / "cli.json"
        model = done.fine_tuned_model
        assert model is not None
        args = ["--tasks", "arc_easy", "--limit", "4", "--no-progress", "--json", str(out)]
        assert main(["eval", "--model", model, *args, *common]) == 0
        scored = json.loads(out.read_text())["data"]
        cli = {(r["adapter"] or "base", r["task"]): r for r in scored}
        # a checkpoint it never wrote: the server's 404, named
        assert main(["eval", "--model", f"{model}:ckpt-step-9", *args, *common]) == 2
        assert f"no model '{model}:ckpt-step-9'" in capsys.readouterr().err
        plain_done = wait_status(client, plain["id"], "succeeded")
        plain_result = http.get(f"/v1/fine_tuning/jobs/{plain['id']}/evaluation").json()
        assert plain_result["status"] == "succeeded", plain_result
        plain_archive = client.download_adapter(plain["id"], tmp_path / "plain.zip")
        assert ("cloze", "plain") in renderings and ("loglik", "chat") in renderings
        failed = wait_status(client, other["id"], "succeeded")
        assert failed.raw["evaluation"]["status"] == "failed"
        assert "num_fewshot" in failed.raw["evaluation"]["error"]["message"]
        sources = [
            str(Path(s.settings.files_dir) / done.raw["organization_id"] / f"{evals_id}.jsonl")
        ]
    apart = _apart(tiny_base, archive, tmp_path / "apart", [*sources, "arc_easy"], 4)
    worker = {(r["model"], r["task"]): r for r in result["results"]}
    for task, source in ((evals_id, sources[0]), ("arc_easy", "arc_easy")):
        for model, name in (("base", None), (done.fine_tuned_model, "apart")):
            expected = apart.get(name, source if source != "arc_easy" else "arc_easy")
            got = worker[(model, task)]
            assert got["acc"] == pytest.approx(expected.acc)
            assert got["acc_norm"] == pytest.approx(expected.acc_norm)
    for model in ("base", done.fine_tuned_model):
        got, mine = cli[(model, "arc_easy")], worker[(model, "arc_easy")]
        assert (got["n"], got["acc"], got["acc_norm"]) == pytest.approx(
            (mine["n"], mine["acc"], mine["acc_norm"])
        )
    rows = {(r["model"], r["task"]): r for r in plain_result["results"]}
    plain_apart = _apart(
        tiny_base,
        plain_archive,
        tmp_path / "plain",
        sources,
        4,
        protocol="cloze",
        rendering="plain",
    )
    for model, name in (("base", None), (plain_done.fine_tuned_model, "apart")):
        expected = plain_apart.get(name, sources[0])
        assert rows[(model, evals_id)]["acc"] == pytest.approx(expected.acc)


@pytest.mark.parametrize(
    ("evaluation", "param", "says"),
    [
        ({"tasks": ["no_such_task"]}, "evaluation.tasks[0]", "unknown task"),
        ({"tasks": []}, "evaluation.tasks", "at least 1"),
        ({"tasks": ["arc_easy"], "limit": 0}, "evaluation.limit", "greater than"),
        ({"tasks": ["arc_easy"], "protocol": "vibes"}, "evaluation.protocol", "loglik"),
    ],
)
def test_bad_evaluations_are_400s_naming_the_field(
    tmp_path: Path, tiny_base: Path, evaluation: dict[str, Any], param: str, says: str
) -> None:
    data = write_jsonl(tmp_path / "train.jsonl", arithmetic_rows(12))
    with stack(tmp_path, tiny_base) as s:
        client = s.client("bad-evals")
        http = httpx.Client(
            base_url=s.url, headers={"Authorization": f"Bearer {client.api_key}"}, timeout=60
        )
        f = client.upload_file(data)
        body = {"model": client.list_models()[0].id, "training_file": f.id, "method": LORA}
        r = http.post("/v1/fine_tuning/jobs", json={**body, "evaluation": evaluation})
        assert r.status_code == 400, r.text
        error = r.json()["error"]
        assert error["param"] == param and says in error["message"], error
        # a training file is no task, and a choice file with a bad gold is refused on upload
        r = http.post("/v1/fine_tuning/jobs", json={**body, "evaluation": {"tasks": [f.id]}})
        assert r.status_code == 400 and "purpose" in r.json()["error"]["message"]
        bad = _upload(http, "bad.jsonl", [CHOICES[0], {**CHOICES[1], "gold": 7}], "evals")
        assert bad.status_code == 400 and "bad.jsonl:2" in bad.json()["error"]["message"]
