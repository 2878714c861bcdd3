"""The progress bus, in process and on Redis: same behaviour through one interface."""

from __future__ import annotations

import threading

import pytest

from mixloom.storage.bus import InProcessBus, ProgressBus, RedisBus
from mixloom.storage.ids import new_id


@pytest.fixture(params=["inprocess", "redis"])
def bus(request: pytest.FixtureRequest) -> ProgressBus:
    if request.param == "inprocess":
        return InProcessBus()
    return RedisBus(request.getfixturevalue("redis"))


def _msg(seq: int) -> dict[str, object]:
    return {"id": seq, "event": "metrics", "data": {"step": seq}}


def test_subscriber_sees_buffer_after_id_then_live(bus: ProgressBus) -> None:
    job = new_id("ftjob")
    for seq in (1, 2, 3):
        bus.publish(job, _msg(seq))
    sub = bus.subscribe(job, after=1)
    assert [m["id"] for m in sub.get(0.1)] == [2, 3]
    assert sub.get(0.05) == []
    threading.Timer(0.1, bus.publish, args=(job, _msg(4))).start()
    assert [m["id"] for m in sub.get(5.0)] == [4]
    other = bus.subscribe(new_id("ftjob"))
    assert other.get(0.05) == []
    sub.close()
    bus.close()


def test_wake_reaches_a_waiting_worker(bus: ProgressBus) -> None:
    assert bus.wait_for_wake(0.05) is False
    bus.wait_for_wake(0.01)  # subscribes (Redis) before the wake is sent
    threading.Timer(0.1, bus.wake).start()
    assert bus.wait_for_wake(5.0) is True
    bus.close()
