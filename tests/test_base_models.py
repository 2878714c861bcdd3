"""MIXLOOM_BASE_MODELS: its syntax, every problem reported at once naming the variable, the
single base when it is unset, which base a worker holds, and a bad list refused at the
start of `mixloom api` and `mixloom worker`."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from mixloom.config import Settings
from mixloom.errors import ConfigError
from mixloom.model_ids import BaseModelSpec, parse_base_models, served_base_id
from mixloom.server.registry import served_models

REPO = Path(__file__).resolve().parents[1]


def test_names_sources_and_hub_ids() -> None:
    assert parse_base_models(
        " small=smollm2-135m , tiny=/models/tiny-llama|org/tiny-llama,hub=org/Some-Model.v2,"
    ) == (
        BaseModelSpec("small", "smollm2-135m"),
        BaseModelSpec("tiny", "/models/tiny-llama", "org/tiny-llama"),
        BaseModelSpec("hub", "org/Some-Model.v2"),
    )


@pytest.mark.parametrize(
    ("text", "says"),
    [
        ("", "lists no base model"),
        ("smollm2-135m", "entry 1 ('smollm2-135m'): expected NAME=SOURCE"),
        ("a=", "entry 1 ('a='): expected NAME=SOURCE"),
        ("has space=/m", "the name 'has space' is not 1-64 letters"),
        ("ft:x=/m", "the name 'ft:x' is not"),
        ("a=/m|", "expected one HUB_ID after '|'"),
        ("a=/m|org/x|org/y", "expected one HUB_ID after '|'"),
        ("a=/m,a=/n", "the name 'a' is listed twice"),
        ("a=/m,b=/m", "the source '/m' is listed twice"),
    ],
)
def test_a_bad_list_says_what_and_where(text: str, says: str) -> None:
    with pytest.raises(ConfigError) as caught:
        parse_base_models(text)
    assert "MIXLOOM_BASE_MODELS" in str(caught.value) and says in str(caught.value)


def test_every_problem_at_once() -> None:
    with pytest.raises(ConfigError) as caught:
        parse_base_models("ok=/m,bad,no name=/n,x=/y|")
    assert [p.where.split(" (")[0] for p in caught.value.problems] == [
        "MIXLOOM_BASE_MODELS entry 2",
        "MIXLOOM_BASE_MODELS entry 3",
        "MIXLOOM_BASE_MODELS entry 4",
    ]


def test_unset_is_the_one_base_of_mixloom_base_model(tmp_path: Path) -> None:
    assert Settings().bases == (BaseModelSpec("smollm2-135m", "smollm2-135m"),)
    folder = tmp_path / "My Model"
    one = Settings(base_model=str(folder), base_model_alias="mine", base_model_hub_id="org/m")
    assert one.bases == (BaseModelSpec("mine", str(folder), "org/m"),)
    assert Settings(base_model=str(folder)).bases[0].name == "My-Model"
    assert Settings(base_models="  ").bases == Settings().bases  # empty: unset
    assert [m.id for m in served_models(one)] == ["mine"]


def test_a_worker_holds_the_named_base_or_the_first(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text('{"max_position_embeddings": 512}')
    listed = f"small=smollm2-135m,tiny={tmp_path}|org/tiny"
    first = Settings(base_models=listed, base_model="ignored", base_model_alias="ignored")
    assert first.held_base().name == "small"
    held = Settings(base_models=listed, worker_base_model="tiny")
    worker = held.holding(held.held_base())
    assert (worker.base_model, worker.base_model_hub_id, served_base_id(worker)) == (
        str(tmp_path),
        "org/tiny",
        "tiny",
    )
    assert worker.bases == (BaseModelSpec("tiny", str(tmp_path), "org/tiny"),)
    served = served_models(held)
    assert [(m.id, m.source, m.max_position_embeddings) for m in served] == [
        ("small", "smollm2-135m", 8192),
        ("tiny", str(tmp_path), 512),
    ]
    with pytest.raises(ConfigError, match=r"--base-model.*'huge'.*small, tiny"):
        Settings(base_models=listed, worker_base_model="huge").held_base()


@pytest.mark.parametrize("command", ["api", "worker"])
def test_a_bad_list_stops_the_process_at_start(tmp_path: Path, command: str) -> None:
    env = {
        **os.environ,
        "MIXLOOM_DATA_DIR": str(tmp_path),
        "MIXLOOM_BASE_MODELS": "small=smollm2-135m,tiny",
    }
    done = subprocess.run(
        [sys.executable, "-m", "mixloom.cli", command, "--port", "1"]
        if command == "api"
        else [sys.executable, "-m", "mixloom.cli", command],
        env=env,
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 2, done.stderr
    assert f"mixloom {command}: error: MIXLOOM_BASE_MODELS entry 2 ('tiny')" in done.stderr
    assert "Traceback" not in done.stderr
