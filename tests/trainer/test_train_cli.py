"""`mixloom train CONFIG` end to end on a tiny model, and its error messages."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import yaml
from tiny import save_tiny_base

from mixloom.cli import main

EXAMPLES = Path(__file__).resolve().parents[2] / "examples" / "data"


def _config(tmp_path: Path, jobs: list[dict], **top: object) -> Path:
    cfg = {"base_model": str(tmp_path / "base"), "output_dir": "out", "jobs": jobs, **top}
    path = tmp_path / "train.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def test_train_two_jobs_writes_adapters_and_metrics(tmp_path: Path) -> None:
    save_tiny_base(tmp_path / "base")
    shutil.copy(EXAMPLES / "chat.jsonl", tmp_path / "chat.jsonl")
    shutil.copy(EXAMPLES / "alpaca.jsonl", tmp_path / "alpaca.jsonl")
    hp = {"batch_size": 2, "n_epochs": 2, "learning_rate": 1e-3, "checkpoint_every": 1}
    jobs = [
        {
            "name": "lo",
            "training_file": "chat.jsonl",
            "method": {"type": "lora", "lora": {"hyperparameters": {**hp, "r": 4}}},
        },
        {
            "name": "mx",
            "training_file": "alpaca.jsonl",
            "validation_file": "chat.jsonl",
            "method": {"type": "mixlora", "mixlora": {"hyperparameters": {**hp, "num_experts": 3}}},
        },
    ]
    # recompute: the CPU default keeps activations; this run takes the GPU default's path
    assert main(["train", str(_config(tmp_path, jobs, recompute=True)), "--no-progress"]) == 0
    for name in ("lo", "mx"):
        folder = tmp_path / "out" / name
        assert (folder / "adapter_model.safetensors").exists()
        assert (folder / "adapter_config.json").exists()
        assert not (folder / "adapter_model.bin").exists()  # one copy of the weights
        lines = [json.loads(x) for x in (folder / "metrics.jsonl").read_text().splitlines()]
        lines = [x for x in lines if x["step"] > 0]
        assert [x["step"] for x in lines] == [1, 2, 3, 4]
        assert all(x["metrics"]["train_loss"] > 0 for x in lines)
        assert lines[0]["metrics"]["shared_with"] == 1  # the other job, in the same steps
        assert (folder / "checkpoints" / "step-4").is_dir()
    mx_lines = (tmp_path / "out" / "mx" / "metrics.jsonl").read_text().splitlines()
    first, last = json.loads(mx_lines[0]), json.loads(mx_lines[-1])
    assert first["step"] == 0 and set(first["metrics"]) == {"valid_loss"}  # the starting point
    assert last["metrics"]["valid_loss"] > 0 and len(last["metrics"]["router_load"]) == 3


def test_config_errors_name_every_problem_and_where(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "ok.jsonl").write_text('{"prompt": "a", "completion": "b"}\n')
    jobs = [
        {
            "name": "a",
            "training_file": "ok.jsonl",
            "method": {"type": "lora", "lora": {"hyperparameters": {"rank": 8}}},
        },
        {"name": "a", "training_file": "missing.jsonl"},
        {
            "name": "c",
            "training_file": "ok.jsonl",
            "method": {"type": "mixlora", "mixlora": {"hyperparameters": {"top_k": "two"}}},
        },
    ]
    path = _config(tmp_path, jobs, epochs=3, recompute="sometimes")
    assert main(["train", str(path)]) == 2
    err = capsys.readouterr().err
    assert "epochs: unknown key" in err
    assert "recompute" in err and "boolean" in err
    assert main(["train", str(_config(tmp_path, jobs))]) == 2
    err = capsys.readouterr().err
    assert "jobs[0].method.lora.hyperparameters.rank: unknown key" in err
    assert "jobs[2].method.mixlora.hyperparameters.top_k" in err and "integer" in err
    assert "job name 'a' is used twice" in err
    assert "jobs[1].training_file: file 'missing.jsonl' does not exist" in err


def test_bad_data_names_file_line_and_field(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    save_tiny_base(tmp_path / "base")
    (tmp_path / "bad.jsonl").write_text(
        '{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}\n'
        '{"messages": [{"role": "robot", "content": "hi"}]}\n'
        "not json\n"
    )
    path = _config(tmp_path, [{"name": "b", "training_file": "bad.jsonl"}])
    assert main(["train", str(path)]) == 2
    err = capsys.readouterr().err
    assert "bad.jsonl:2: messages[0].role" in err
    assert "bad.jsonl:3" in err


def test_generate_with_a_trained_adapter(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from mixloom.model.adapter_model import AdapterModel
    from mixloom.model.base import load_base_model
    from mixloom.model.formats import load_adapter_model, save_adapter
    from mixloom.model.specs import AdapterSpec

    save_tiny_base(tmp_path / "base")
    base = load_base_model(str(tmp_path / "base"))
    model = AdapterModel(base.model)
    model.add_adapter(AdapterSpec("g", kind="mixlora", num_experts=2))
    save_adapter(model, "g", tmp_path / "g", str(tmp_path / "base"))
    args = ["generate", "--base-model", str(tmp_path / "base"), "--adapter", str(tmp_path / "g")]
    assert main([*args, "--prompt", "hi", "--max-new-tokens", "5"]) == 0
    text = capsys.readouterr().out
    # greedy decoding is what the loaded model's argmax says, token by token
    reloaded = load_adapter_model(str(tmp_path / "base"), tmp_path / "g")
    tok = base.tokenizer
    prompt = tok.apply_chat_template(
        [{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True
    )
    import torch

    ids = torch.tensor([tok.encode(prompt, add_special_tokens=False)])
    out = reloaded.generate(ids, max_new_tokens=5, eos_token_id=tok.eos_token_id)
    assert text.strip() == tok.decode(out[0, ids.shape[1] :], skip_special_tokens=True).strip()


def test_a_moved_config_text_rows_plain_rendering_and_generate_from_a_zip(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A config's paths are relative to the config file (it moves with its files); {"text"}
    rows and `rendering: plain` train without the chat template and the adapter records it;
    the bar counts each job's own steps; `mixloom generate --adapter x.zip` finds the base the
    adapter names and prompts it as the job trained."""
    import zipfile

    import torch

    from mixloom.model.formats import load_adapter_model, read_metadata

    project = tmp_path / "project"
    save_tiny_base(project / "base")
    (project / "data").mkdir()
    (project / "data" / "text.jsonl").write_text(
        "".join(json.dumps({"text": f"{a} plus {a} is {2 * a}."}) + "\n" for a in range(6))
    )
    (project / "data" / "pc.jsonl").write_text(
        "".join(
            json.dumps({"prompt": f"{a}+{a}=", "completion": str(2 * a)}) + "\n" for a in range(6)
        )
    )
    hp = {"batch_size": 2, "max_steps": 3, "learning_rate": 3e-3, "warmup_ratio": 0.0}
    config = {
        "base_model": "base",  # a folder beside the config
        "base_model_hub_id": "acme/tiny-chat",
        "output_dir": "out",
        "jobs": [
            {"name": "text", "training_file": "data/text.jsonl", "method": {"type": "lora", "lora": {"hyperparameters": hp}}},
            {"name": "plain", "training_file": "data/pc.jsonl", "method": {"type": "lora", "lora": {"hyperparameters": {**hp, "rendering": "plain"}}}},
            {"name": "chat", "training_file": "data/pc.jsonl", "method": {"type": "lora", "lora": {"hyperparameters": hp}}},
        ],
    }  # fmt: skip
    (project / "train.yaml").write_text(yaml.safe_dump(config))
    moved = tmp_path / "moved"
    shutil.copytree(project, moved)
    shutil.rmtree(project)  # nothing may still point there
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")

    assert main(["train", str(moved / "train.yaml")]) == 0
    err = capsys.readouterr().err
    assert "3 jobs" in err and "3/3" in err and "9/9" not in err  # steps per job, not summed
    out = moved / "out"
    for name, rendering in (("text", "plain"), ("plain", "plain"), ("chat", "chat")):
        meta = read_metadata(out / name)
        assert meta.rendering == rendering, name
        assert meta.base_model_name_or_path == "acme/tiny-chat"
        assert meta.base_model_path == str((moved / "base").resolve())
        config_json = json.loads((out / name / "adapter_config.json").read_text())
        assert config_json["base_model_name_or_path"] == "acme/tiny-chat"

    archive = tmp_path / "plain.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        for p in (out / "plain").iterdir():
            if p.is_file() and p.name != "metrics.jsonl":
                zf.write(p, arcname=p.name)
    args = ["generate", "--adapter", str(archive), "--prompt", "3+3=", "--max-new-tokens", "4"]
    assert main(args) == 0  # no --base-model: the adapter's own
    text = capsys.readouterr().out
    model = load_adapter_model(str(moved / "base"), out / "plain")
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(moved / "base")
    ids = torch.tensor([tok("3+3=")["input_ids"]])  # the raw prompt, no chat template
    greedy = model.generate(ids, max_new_tokens=4, eos_token_id=tok.eos_token_id)
    assert text.strip() == tok.decode(greedy[0, ids.shape[1] :], skip_special_tokens=True).strip()
