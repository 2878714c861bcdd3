"""The workers registry on both backends: register, heartbeat, dead after its lease, what a
worker holds (from the jobs it leases), clean exit, pruning of long-dead rows."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from claims import claim
from test_storage_jobs import _job, _tenant

from mixloom.storage import workers
from mixloom.storage.db import Database
from mixloom.storage.ids import new_id


def _register(db: Database, worker_id: str, source: str, now: datetime, **given: object) -> None:
    fields: dict[str, object] = dict(
        host="host-a", pid=123, base="tiny-a", role="all", devices="cpu", lease_seconds=10.0
    )
    fields.update(given)
    with db.transaction() as s:
        workers.register(session=s, worker_id=worker_id, source=source, now=now, **fields)  # type: ignore[arg-type]


def _mine(db: Database, ids: set[str], now: datetime) -> dict[str, workers.WorkerRecord]:
    with db.transaction() as s:
        return {w.id: w for w in workers.list_workers(session=s, now=now) if w.id in ids}


def test_a_worker_is_alive_until_its_heartbeat_is_older_than_its_lease(db: Database) -> None:
    source, wid = new_id("base"), new_id("w")
    t0 = datetime.now(UTC)
    _register(db, wid, source, t0)
    (w,) = _mine(db, {wid}, t0 + timedelta(seconds=9)).values()
    assert (w.host, w.pid, w.base, w.source, w.role, w.devices) == (
        "host-a",
        123,
        "tiny-a",
        source,
        "all",
        "cpu",
    )
    assert w.alive and w.started_at == w.heartbeat_at == t0 and w.job_ids == ()
    assert not _mine(db, {wid}, t0 + timedelta(seconds=11))[wid].alive

    with db.transaction() as s:
        assert workers.heartbeat(
            session=s, worker_id=wid, lease_seconds=20.0, now=t0 + timedelta(seconds=15)
        )
    w = _mine(db, {wid}, t0 + timedelta(seconds=34))[wid]
    assert w.alive and w.lease_seconds == 20.0 and w.started_at == t0
    with db.transaction() as s:
        assert wid not in {
            x.id
            for x in workers.list_workers(
                session=s, include_dead=False, now=t0 + timedelta(seconds=36)
            )
        }


def test_what_a_worker_holds_is_the_jobs_it_leases(db: Database) -> None:
    tenant, source, wid = _tenant(db), new_id("base"), new_id("w")
    now = datetime.now(UTC)
    _register(db, wid, source, now)
    first, second, _ = (_job(db, tenant, source) for _ in range(3))
    with db.transaction() as s:
        a = claim(s, model=source, worker=wid)
    with db.transaction() as s:
        b = claim(s, model=source, worker=wid)
    assert a is not None and b is not None and {a.id, b.id} == {first.id, second.id}
    assert _mine(db, {wid}, now)[wid].job_ids == tuple(sorted([first.id, second.id]))


def test_live_holders_are_the_live_training_workers_of_a_base(db: Database) -> None:
    source, other = new_id("base"), new_id("base")
    now = datetime.now(UTC)
    ids = {k: new_id("w") for k in ("trains", "decodes", "dead", "elsewhere")}
    _register(db, ids["trains"], source, now, role="training")
    _register(db, ids["decodes"], source, now, role="inference")
    _register(db, ids["dead"], source, now - timedelta(seconds=60))
    _register(db, ids["elsewhere"], other, now)
    with db.transaction() as s:
        held = workers.live_holders(session=s, source=source, now=now)
        assert [w.id for w in held] == [ids["trains"]]
        decoding = workers.live_holders(session=s, source=source, roles=("inference",), now=now)
        assert [w.id for w in decoding] == [ids["decodes"]]
        assert workers.live_holders(session=s, source=new_id("base"), now=now) == []


def test_a_clean_exit_removes_the_row_and_long_dead_rows_are_pruned(db: Database) -> None:
    source, leaving, killed, fresh = new_id("base"), new_id("w"), new_id("w"), new_id("w")
    now = datetime.now(UTC)
    _register(db, leaving, source, now)
    long_ago = now - timedelta(seconds=workers.DEAD_KEPT_SECONDS + 60)
    _register(db, killed, source, long_ago)
    assert set(_mine(db, {leaving, killed}, now)) == {leaving, killed}
    with db.transaction() as s:
        workers.unregister(session=s, worker_id=leaving)
        workers.unregister(session=s, worker_id=leaving)  # again: nothing
    assert set(_mine(db, {leaving, killed}, now)) == {killed}
    _register(db, fresh, source, now)  # registering prunes
    assert set(_mine(db, {leaving, killed, fresh}, now)) == {fresh}
    with db.transaction() as s:  # a pruned worker's heartbeat says so: it registers again
        assert not workers.heartbeat(session=s, worker_id=killed, lease_seconds=10.0)


def test_registering_again_replaces_the_row(db: Database) -> None:
    source, wid = new_id("base"), new_id("w")
    t0 = datetime.now(UTC)
    _register(db, wid, source, t0)
    _register(db, wid, source, t0 + timedelta(seconds=5), pid=456, devices="cuda:0,cuda:1")
    w = _mine(db, {wid}, t0 + timedelta(seconds=5))[wid]
    assert (w.pid, w.devices, w.started_at) == (456, "cuda:0,cuda:1", t0 + timedelta(seconds=5))
