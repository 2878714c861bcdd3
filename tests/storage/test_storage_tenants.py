"""Tenants and API keys: keys stored hashed, revocation, and the admin CLI."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest
from sqlalchemy import select

from mixloom.errors import StateConflictError, ValidationError
from mixloom.storage import cli as storage_cli
from mixloom.storage import models as m
from mixloom.storage import tenants
from mixloom.storage.db import Database
from mixloom.storage.ids import new_id


def test_keys_are_stored_hashed_and_revocable(db: Database) -> None:
    with db.transaction() as s:
        tenant = tenants.create_tenant(session=s, name=new_id("acme"))
        record, key = tenants.create_api_key(session=s, tenant_id=tenant.id)
    with db.transaction() as s:
        stored = s.scalars(select(m.ApiKey).where(m.ApiKey.id == record.id)).one()
        assert key not in (stored.key_hash, stored.prefix) and len(stored.key_hash) == 64
        assert tenants.authenticate(session=s, api_key=key) == tenant
        assert tenants.authenticate(session=s, api_key=key + "x") is None
        tenants.revoke_api_key(session=s, key=record.id)
        assert tenants.authenticate(session=s, api_key=key) is None


def test_tenant_names_are_unique_and_checked(db: Database) -> None:
    name = new_id("dup")
    with db.transaction() as s:
        tenants.create_tenant(session=s, name=name)
    with db.transaction() as s, pytest.raises(StateConflictError):
        tenants.create_tenant(session=s, name=name)
    with db.transaction() as s, pytest.raises(ValidationError):
        tenants.create_tenant(session=s, name="has space")


def _run(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="mixloom")
    storage_cli.register(parser.add_subparsers(dest="command"))
    args = parser.parse_args(argv)
    return int(args.func(args))


def test_cli_prints_the_key_once_alone_on_its_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("MIXLOOM_DATA_DIR", str(tmp_path))
    monkeypatch.delenv("MIXLOOM_DATABASE_URL", raising=False)
    assert _run(["tenants", "create", "acme"]) == 0
    key = capsys.readouterr().out
    assert key.count("\n") == 1 and key.startswith("mxl-")
    assert _run(["tenants", "create", "globex", "--json"]) == 0
    created = json.loads(capsys.readouterr().out)
    assert created["tenant"]["name"] == "globex" and created["api_key"].startswith("mxl-")
    assert _run(["tenants", "update", "acme", "--max-queued-jobs", "3", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["max_queued_jobs"] == 3
    assert _run(["tenants", "update", "acme", "--max-queued-jobs", "0", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["max_queued_jobs"] is None
    assert _run(["keys", "create", "acme", "--json"]) == 0
    second = json.loads(capsys.readouterr().out)
    assert _run(["keys", "revoke", second["key_id"]]) == 0
    assert _run(["keys", "list", "acme", "--json"]) == 0
    listed = json.loads(capsys.readouterr().out.splitlines()[-1])
    assert [k["revoked"] for k in listed] == [False, True]
    assert second["api_key"] not in json.dumps(listed)
    db = Database.connect(f"sqlite:///{tmp_path / 'mixloom.db'}")
    with db.transaction() as s:
        assert tenants.authenticate(session=s, api_key=key.strip()) is not None
        assert tenants.authenticate(session=s, api_key=second["api_key"]) is None
    db.dispose()


def test_quotas_can_change(db: Database) -> None:
    with db.transaction() as s:
        tenant = tenants.create_tenant(session=s, name=new_id("q"), max_queued_jobs=2)
        changed = tenants.set_tenant_quotas(session=s, tenant=tenant.name, max_file_bytes=10)
        assert (changed.max_queued_jobs, changed.max_file_bytes) == (2, 10)
        with pytest.raises(ValidationError):
            tenants.set_tenant_quotas(session=s, tenant=tenant.id, max_file_bytes=0)
        with pytest.raises(ValidationError):
            tenants.set_tenant_quotas(session=s, tenant=tenant.id, max_gpus=1)
