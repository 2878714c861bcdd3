"""Jobs, files, tenants and their events in Postgres or SQLite, and the progress bus.

No torch here: the API process imports this. Functions are keyword-only, take a
`session` from `Database.transaction()`, and return frozen records.
"""

from mixloom.storage.bus import InProcessBus, ProgressBus, RedisBus, make_bus
from mixloom.storage.db import Database
from mixloom.storage.records import (
    CheckpointRecord,
    EventRecord,
    FileRecord,
    JobRecord,
    JobStatus,
    MetricRecord,
    RequestedAction,
    TenantRecord,
)

__all__ = [
    "CheckpointRecord",
    "Database",
    "EventRecord",
    "FileRecord",
    "InProcessBus",
    "JobRecord",
    "JobStatus",
    "MetricRecord",
    "ProgressBus",
    "RedisBus",
    "RequestedAction",
    "TenantRecord",
    "make_bus",
]
