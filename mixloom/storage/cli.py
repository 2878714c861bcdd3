"""`mixloom tenants ...`, `mixloom keys ...` and `mixloom db ...`: admin commands."""

from __future__ import annotations

import argparse
import json
from typing import Any


def register(sub: Any) -> None:
    tenants = sub.add_parser(
        "tenants",
        help="admin: create, change and list tenants (in the database of $MIXLOOM_DATA_DIR, "
        "default ./mixloom-data: run it where `mixloom serve` runs)",
    )
    tsub = tenants.add_subparsers(dest="tenants_command", metavar="ACTION", required=True)
    create = tsub.add_parser("create", help="create a tenant and print its first API key once")
    create.add_argument("name", help="the tenant's name (unique)")
    create.add_argument("--json", action="store_true", help='print {"tenant": ..., "api_key": ...}')
    _quota_flags(create)
    create.set_defaults(func=_tenants_create)
    update = tsub.add_parser("update", help="change a tenant's quotas (0 = deployment default)")
    update.add_argument("name", help="tenant name or id")
    _quota_flags(update)
    update.add_argument("--json", action="store_true", help="print the tenant as JSON")
    update.set_defaults(func=_tenants_update)
    lst = tsub.add_parser("list", help="list tenants")
    lst.add_argument("--json", action="store_true", help="print the tenants as JSON")
    lst.set_defaults(func=_tenants_list)

    keys = sub.add_parser("keys", help="create, list and revoke API keys")
    ksub = keys.add_subparsers(dest="keys_command", metavar="ACTION", required=True)
    kcreate = ksub.add_parser("create", help="new API key for a tenant (printed once)")
    kcreate.add_argument("tenant", help="tenant name or id")
    kcreate.add_argument("--json", action="store_true", help='print {"id": ..., "api_key": ...}')
    kcreate.set_defaults(func=_keys_create)
    klist = ksub.add_parser("list", help="a tenant's keys (ids and prefixes, never the keys)")
    klist.add_argument("tenant", help="tenant name or id")
    klist.add_argument("--json", action="store_true", help="print the keys as JSON")
    klist.set_defaults(func=_keys_list)
    krevoke = ksub.add_parser("revoke", help="revoke a key by id (key-...) or by the key itself")
    krevoke.add_argument("key", help="the key's id (key-...) or the key itself")
    krevoke.set_defaults(func=_keys_revoke)

    db = sub.add_parser("db", help="database migrations")
    dsub = db.add_subparsers(dest="db_command", metavar="ACTION", required=True)
    up = dsub.add_parser("upgrade", help="migrate the database to the newest schema")
    up.add_argument(
        "revision",
        nargs="?",
        default="head",
        help="the schema to reach (default: head, the newest)",
    )
    up.set_defaults(func=_db_upgrade)
    down = dsub.add_parser("downgrade", help="migrate the database down (base = empty)")
    down.add_argument("revision", help="the schema to go back to (base: an empty database)")
    down.set_defaults(func=_db_downgrade)


def _quota_flags(parser: argparse.ArgumentParser) -> None:
    """The tenant quota flags (unset: the deployment's default, MIXLOOM_MAX_*)."""
    for flag, text in (
        ("--max-queued-jobs", "jobs waiting at once"),
        ("--max-running-jobs", "jobs training at once"),
        ("--max-file-bytes", "the largest upload, in bytes"),
        ("--max-total-bytes", "bytes stored in all: files, checkpoints and adapters"),
    ):
        parser.add_argument(flag, type=int, help=f"{text} (0: the deployment's default)")


def _database() -> Any:
    from mixloom.config import get_settings
    from mixloom.storage import migrate
    from mixloom.storage.db import Database

    url = get_settings().resolved_database_url
    migrate.upgrade(url)
    return Database.connect(url)


def _tenant_json(t: Any) -> dict[str, Any]:
    quotas = {k: getattr(t, k) for k in _QUOTAS}
    return {"id": t.id, "name": t.name, "created_at": int(t.created_at.timestamp()), **quotas}


_QUOTAS = ("max_queued_jobs", "max_running_jobs", "max_file_bytes", "max_total_bytes")


def _tenants_update(args: argparse.Namespace) -> int:
    from mixloom.storage import tenants

    changes = {k: getattr(args, k) for k in _QUOTAS if getattr(args, k) is not None}
    db = _database()
    with db.transaction() as session:
        tenant = tenants.set_tenant_quotas(
            session=session, tenant=args.name, **{k: v or None for k, v in changes.items()}
        )
    db.dispose()
    print(json.dumps(_tenant_json(tenant)) if args.json else f"updated {tenant.name}")
    return 0


def _tenants_create(args: argparse.Namespace) -> int:
    from mixloom.storage import tenants

    db = _database()
    with db.transaction() as session:
        tenant = tenants.create_tenant(
            session=session,
            name=args.name,
            max_queued_jobs=args.max_queued_jobs,
            max_running_jobs=args.max_running_jobs,
            max_file_bytes=args.max_file_bytes,
            max_total_bytes=args.max_total_bytes,
        )
        _, api_key = tenants.create_api_key(session=session, tenant_id=tenant.id)
    db.dispose()
    if args.json:
        print(json.dumps({"tenant": _tenant_json(tenant), "api_key": api_key}))
    else:
        print(api_key)
    return 0


def _tenants_list(args: argparse.Namespace) -> int:
    from mixloom.storage import tenants

    db = _database()
    with db.transaction() as session:
        rows = tenants.list_tenants(session=session)
    db.dispose()
    if args.json:
        print(json.dumps([_tenant_json(t) for t in rows]))
    else:
        for t in rows:
            print(f"{t.id}\t{t.name}")
    return 0


def _keys_create(args: argparse.Namespace) -> int:
    from mixloom.storage import tenants

    db = _database()
    with db.transaction() as session:
        tenant = tenants.get_tenant(session=session, tenant=args.tenant)
        record, api_key = tenants.create_api_key(session=session, tenant_id=tenant.id)
    db.dispose()
    if args.json:
        print(json.dumps({"tenant": _tenant_json(tenant), "key_id": record.id, "api_key": api_key}))
    else:
        print(api_key)
    return 0


def _keys_list(args: argparse.Namespace) -> int:
    from mixloom.storage import tenants

    db = _database()
    with db.transaction() as session:
        tenant = tenants.get_tenant(session=session, tenant=args.tenant)
        keys = tenants.list_api_keys(session=session, tenant_id=tenant.id)
    db.dispose()
    rows = [
        {
            "id": k.id,
            "prefix": k.prefix,
            "created_at": int(k.created_at.timestamp()),
            "revoked": k.revoked_at is not None,
        }
        for k in keys
    ]
    if args.json:
        print(json.dumps(rows))
    else:
        for r in rows:
            print(f"{r['id']}\t{r['prefix']}...\t{'revoked' if r['revoked'] else 'active'}")
    return 0


def _keys_revoke(args: argparse.Namespace) -> int:
    from mixloom.storage import tenants

    db = _database()
    with db.transaction() as session:
        record = tenants.revoke_api_key(session=session, key=args.key)
    db.dispose()
    print(f"revoked {record.id}")
    return 0


def _db_upgrade(args: argparse.Namespace) -> int:
    from mixloom.config import get_settings
    from mixloom.storage import migrate

    migrate.upgrade(get_settings().resolved_database_url, args.revision)
    return 0


def _db_downgrade(args: argparse.Namespace) -> int:
    from mixloom.config import get_settings
    from mixloom.storage import migrate

    migrate.downgrade(get_settings().resolved_database_url, args.revision)
    return 0
