"""Worker settings, read from the environment (prefix MIXLOOM_WORKER_) or CLI flags."""

from __future__ import annotations

from pydantic_settings import BaseSettings, SettingsConfigDict


class WorkerSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="MIXLOOM_WORKER_", extra="ignore")

    worker_id: str | None = None  # default: host:pid:random
    lease_seconds: float = (
        30.0  # a dead worker's jobs are claimable this long after its last heartbeat
    )
    heartbeat_seconds: float | None = None  # default: lease_seconds / 3
    poll_seconds: float = 2.0  # look for new jobs this often (a bus wake-up comes sooner)
    step_token_budget: int = 16384  # padded tokens (rows x widest row) per fused step
    memory_budget_gb: float | None = None  # default: 90% of GPU memory, or base + 80% free RAM
    metrics_interval_seconds: float = 1.0  # a job's step metrics reach the database this often
    max_jobs: int = 32  # jobs admitted at once (they share steps by fair share)

    @property
    def heartbeat(self) -> float:
        return self.heartbeat_seconds or self.lease_seconds / 3
