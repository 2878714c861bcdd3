"""Prometheus metrics: every metric's name in one place, the worker's counters and its
exporter, the API's request timer, and the fleet's state read from the database at scrape
time.

Where each is served (README, "Operating: metrics and the operator view"):

- `mixloom worker` on its own port (`worker_metrics_port`, `start_worker_exporter`): fused
  steps, trained tokens, step time, claim latency, lease expiries, jobs held, GPU memory
  (CUDA) and the process's own `process_resident_memory_bytes` (CPU). One process: the
  default registry.
- The API's `GET /metrics` (server/routes/admin.py): request latency by route template, and
  the queue (queued jobs per base, the oldest one's wait) and the jobs by state, read from
  the database by `FleetCollector` (cached STATE_CACHE_SECONDS, so that several Prometheus
  servers cost one query). With `api_workers` > 1 the processes share
  PROMETHEUS_MULTIPROC_DIR (set by `mixloom api`): any process's answer sums every
  process's request counts; the database's state is the same whichever answers.

No metric has a tenant label, and no label value is a tenant's name or id, a job id or a
concrete path: a route is its template (`/v1/fine_tuning/jobs/{job_id}`), a base its public
id. Tests scrape after tenants' requests and look for their names and ids.

Code that reports the same quantities (bench/fleet.py's claim latency) imports the names and
buckets from here (CLAIM_SECONDS, CLAIM_BUCKETS) rather than copying them.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from functools import cache
from typing import Any

from prometheus_client import REGISTRY, CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.multiprocess import MultiProcessCollector
from prometheus_client.registry import Collector

log = logging.getLogger("mixloom.metrics")

# -- names (Prometheus adds _total, _bucket, _sum, _count) -------------------------------
STEPS = "mixloom_worker_steps"  # counter: fused training steps
TRAINED_TOKENS = "mixloom_worker_trained_tokens"  # counter: real (unpadded) tokens trained
STEP_SECONDS = "mixloom_worker_step_seconds"  # histogram: one fused step (forward to update)
CLAIM_SECONDS = "mixloom_worker_claim_seconds"  # histogram: one claim transaction; {outcome}
LEASE_EXPIRIES = "mixloom_worker_lease_expiries"  # counter: leases found expired; {outcome}
JOBS_HELD = "mixloom_worker_jobs_held"  # gauge: jobs this worker holds a lease on
WORKER_INFO = "mixloom_worker_info"  # gauge 1: {worker_id, base, role, device}
GPU_MEMORY = "mixloom_worker_gpu_memory_bytes"  # gauge: torch's allocated bytes; {device}
GPU_MEMORY_RESERVED = "mixloom_worker_gpu_memory_reserved_bytes"  # the caching allocator's
GPU_MEMORY_PEAK = "mixloom_worker_gpu_memory_peak_bytes"  # allocated, peak since start
HTTP_SECONDS = "mixloom_http_request_duration_seconds"  # histogram; {method, route, status}
QUEUED_JOBS = "mixloom_queue_jobs"  # gauge: queued jobs; {base}
QUEUE_OLDEST_SECONDS = "mixloom_queue_oldest_wait_seconds"  # gauge: the oldest's wait; {base}
JOBS_BY_STATE = "mixloom_jobs"  # gauge: jobs in each live state; {state}
LIVE_WORKERS = "mixloom_workers_alive"  # gauge: registered live workers; {base, role}

# 1 ms .. 10 s: a claim is a few queries, slower only when the database is contended
CLAIM_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 10.0)
# 10 ms (a tiny model on a GPU) .. 2 min (a large fused group on a CPU)
STEP_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 120.0)
HTTP_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 10.0)
STATE_CACHE_SECONDS = 2.0
UNMATCHED_ROUTE = "<unmatched>"  # a path no route serves: never its text (it may hold ids)
# a label's values are bounded: any other method a client sends is "other"
HTTP_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})


@dataclass(frozen=True)
class WorkerMetrics:
    steps: Counter
    trained_tokens: Counter
    step_seconds: Histogram
    claim_seconds: Histogram
    lease_expiries: Counter
    jobs_held: Gauge
    info: Gauge

    def stepped(self, *, tokens: int, seconds: float) -> None:
        self.steps.inc()
        self.trained_tokens.inc(tokens)
        self.step_seconds.observe(seconds)

    def claimed(self, seconds: float, *, claimed: bool) -> None:
        self.claim_seconds.labels(outcome="claimed" if claimed else "none").observe(seconds)


@cache
def worker_metrics() -> WorkerMetrics:
    """The process's worker metrics (one set per process, in the default registry; several
    Worker objects in one process, as in tests, add to the same)."""
    return WorkerMetrics(
        steps=Counter(STEPS, "Fused training steps taken"),
        trained_tokens=Counter(TRAINED_TOKENS, "Real (unpadded) tokens trained, all jobs"),
        step_seconds=Histogram(
            STEP_SECONDS, "Time of one fused training step", buckets=STEP_BUCKETS
        ),
        claim_seconds=Histogram(
            CLAIM_SECONDS,
            "Time of one claim transaction (outcome: claimed a job, or none to take)",
            ["outcome"],
            buckets=CLAIM_BUCKETS,
        ),
        lease_expiries=Counter(
            LEASE_EXPIRIES,
            "Leases of dead workers' jobs this worker found expired (outcome: requeued, or "
            "failed as poisoned)",
            ["outcome"],
        ),
        jobs_held=Gauge(JOBS_HELD, "Jobs this worker holds a lease on"),
        info=Gauge(WORKER_INFO, "This worker (always 1)", ["worker_id", "base", "role", "device"]),
    )


class GpuMemoryCollector(Collector):
    """torch's CUDA memory per visible device, read at scrape time (nothing on a CPU-only
    machine: process_resident_memory_bytes is the memory there)."""

    def collect(self) -> Iterator[Metric]:
        import torch

        if not torch.cuda.is_available() or not torch.cuda.is_initialized():
            return
        families = [
            (GPU_MEMORY, "CUDA memory allocated by tensors", torch.cuda.memory_allocated),
            (GPU_MEMORY_RESERVED, "CUDA memory held by the allocator", torch.cuda.memory_reserved),
            (GPU_MEMORY_PEAK, "Peak CUDA memory allocated", torch.cuda.max_memory_allocated),
        ]
        for name, text, read in families:
            family = GaugeMetricFamily(name, text, labels=["device"])
            for index in range(torch.cuda.device_count()):
                family.add_metric([f"cuda:{index}"], float(read(index)))
            yield family


def start_worker_exporter(host: str, port: int) -> bool:
    """Serve the default registry (and GPU memory) at http://host:port/metrics in a daemon
    thread. A port in use is logged, not raised: metrics never stop a worker."""
    worker_metrics()
    _gpu_memory_registered()
    from prometheus_client import start_http_server

    try:
        start_http_server(port, addr=host)
    except OSError as exc:
        log.error("worker metrics not served: cannot listen on %s:%d (%s)", host, port, exc)
        return False
    log.info("worker metrics at http://%s:%d/metrics", host, port)
    return True


@cache
def _gpu_memory_registered() -> None:
    REGISTRY.register(GpuMemoryCollector())


# -- the API -------------------------------------------------------------------------


def multiprocess_dir() -> str | None:
    """Where the API's processes share their counters (prometheus_client reads it when it
    makes the first metric, so it is set before the processes start: server/cli.py)."""
    return os.environ.get("PROMETHEUS_MULTIPROC_DIR") or None


@cache
def http_seconds() -> Histogram:
    return Histogram(
        HTTP_SECONDS,
        "API request time, by method, route template and status code",
        ["method", "route", "status"],
        buckets=HTTP_BUCKETS,
    )


_ROUTE_KEY = "mixloom.metrics.route"


class RequestTimer:
    """ASGI middleware (the outermost): times each HTTP request and labels it with the
    template of the route that served it. `RouteRecorder`, the innermost, sees the route the
    router matched and hands it back through a holder that copies of the scope share."""

    def __init__(self, app: Any) -> None:
        self.app = app
        self.histogram = http_seconds()

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        holder: dict[str, str] = {}
        scope[_ROUTE_KEY] = holder
        status = 500  # an exception that escapes everything is the server's 500

        async def send_status(message: dict[str, Any]) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = int(message["status"])
            await send(message)

        started = time.perf_counter()
        try:
            await self.app(scope, receive, send_status)
        finally:
            method = scope["method"]
            self.histogram.labels(
                method=method if method in HTTP_METHODS else "other",
                route=holder.get("route", UNMATCHED_ROUTE),
                status=str(status),
            ).observe(time.perf_counter() - started)


class RouteRecorder:
    """ASGI middleware (the innermost): after the router ran, the matched route's template
    (a mount's: its prefix + "/{path}") into RequestTimer's holder."""

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        try:
            await self.app(scope, receive, send)
        finally:
            holder = scope.get(_ROUTE_KEY)
            path = getattr(scope.get("route"), "path", None)
            if path is None and scope.get("endpoint") is not None and scope.get("root_path"):
                path = scope["root_path"] + "/{path}"  # a mount (/static): its prefix
            if holder is not None and isinstance(path, str):
                holder["route"] = path or "/"


@dataclass(frozen=True)
class FleetState:
    """What the database says at one scrape (no tenant in it)."""

    queued: dict[str, tuple[int, float]]  # base -> (queued jobs, the oldest one's wait in s)
    by_state: dict[str, int]  # live state -> jobs
    workers: dict[tuple[str, str], int] = field(default_factory=dict)  # (base, role) -> alive


class FleetCollector(Collector):
    """The queue and the jobs by state, read by `read()` at scrape time and kept `ttl`
    seconds. A failed read is logged and the families left out (the scrape
    still answers; Prometheus sees the gap)."""

    def __init__(self, read: Callable[[], FleetState], ttl: float = STATE_CACHE_SECONDS) -> None:
        self.read = read
        self.ttl = ttl
        self._lock = threading.Lock()
        self._at = -float("inf")
        self._state: FleetState | None = None

    def state(self) -> FleetState | None:
        with self._lock:
            if time.monotonic() - self._at >= self.ttl:
                try:
                    self._state = self.read()
                except Exception:
                    log.warning("metrics: cannot read the queue from the database", exc_info=True)
                    self._state = None
                self._at = time.monotonic()
            return self._state

    def collect(self) -> Iterator[Metric]:
        state = self.state()
        if state is None:
            return
        queued = GaugeMetricFamily(QUEUED_JOBS, "Queued jobs, by base model", labels=["base"])
        oldest = GaugeMetricFamily(
            QUEUE_OLDEST_SECONDS, "How long the oldest queued job has waited", labels=["base"]
        )
        for base, (count, wait) in sorted(state.queued.items()):
            queued.add_metric([base], count)
            oldest.add_metric([base], wait)
        by_state = GaugeMetricFamily(
            JOBS_BY_STATE,
            "Jobs in each live state (terminal ones are not counted)",
            labels=["state"],
        )
        for name, count in sorted(state.by_state.items()):
            by_state.add_metric([name], count)
        alive = GaugeMetricFamily(
            LIVE_WORKERS, "Live registered workers, by base and role", labels=["base", "role"]
        )
        for (base, role), count in sorted(state.workers.items()):
            alive.add_metric([base, role], count)
        yield from (queued, oldest, by_state, alive)


class _Default(Collector):
    """The process's default registry inside another registry."""

    def collect(self) -> Iterable[Metric]:
        return REGISTRY.collect()


def scrape_registry(*extra: Collector) -> CollectorRegistry:
    """What one scrape of the API reads: every API process's counters (multiprocess mode)
    or this process's default registry, and `extra` (the database's state)."""
    registry = CollectorRegistry(auto_describe=False)
    if multiprocess_dir():
        MultiProcessCollector(registry)
    else:
        registry.register(_Default())
    for collector in extra:
        registry.register(collector)
    return registry
