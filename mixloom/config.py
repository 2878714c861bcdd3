"""Every setting read from the environment (prefix MIXLOOM_), in one `Settings`.

Read when a command starts (`get_settings()`), never at import. The HTTP client
(mixloom.clients) is the exception: it runs on users' machines, imports nothing of the
server, and reads its own MIXLOOM_BASE_URL and MIXLOOM_API_KEY when a Client is made.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated, Literal

from pydantic import BaseModel, Field, SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict

from mixloom.errors import ConfigError
from mixloom.model_ids import BaseModelSpec, base_model_id, parse_base_models


class ModelSettings(BaseModel):
    """How the base model is loaded and its adapters run. A worker takes them from the
    environment (Settings); `mixloom train` from its config's top level (TrainConfig)."""

    base_model: str = "smollm2-135m"  # "smollm2-135m" = the embedded default, or a path / hub id
    # the base's public Hugging Face id, written into adapters (adapter_config.json's
    # base_model_name_or_path) so that PEFT finds the base on another machine; unset: the
    # embedded default's (HuggingFaceTB/SmolLM2-135M-Instruct), or base_model itself when it
    # is a hub id. Set it when base_model is a local folder (else adapters name the folder).
    base_model_hub_id: str | None = None
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"  # auto: fp32 CPU, bf16 GPU
    kernel_backend: Literal["auto", "torch", "triton"] = "auto"
    # adapter activations recomputed in the backward (less memory, a slower step); unset:
    # on a GPU, off on a CPU (AdapterModel)
    recompute: bool | None = None


def _default_cache_dir() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "mixloom"


class Settings(ModelSettings, BaseSettings):
    model_config = SettingsConfigDict(env_prefix="MIXLOOM_", extra="ignore")

    data_dir: Path = Path("./mixloom-data")  # SQLite file, uploads, checkpoints, adapters
    database_url: str | None = None  # default: sqlite file under data_dir
    redis_url: str | None = None  # unset: in-process progress bus
    # the embedded base model converted to a plain HF folder (default: $XDG_CACHE_HOME/mixloom)
    cache_dir: Path = Field(default_factory=_default_cache_dir)
    # object storage (mixloom/storage/objects.py): uploads, checkpoints and adapters.
    # Unset: under data_dir (one machine, or a shared volume); s3://bucket/prefix: any
    # S3-compatible store, and API and workers share nothing else but database and bus.
    storage_url: Annotated[str | None, Field(pattern=r"^s3://[a-z0-9][a-z0-9.-]{1,62}(/.*)?$")] = (
        None
    )
    s3_endpoint_url: str | None = None  # unset: AWS; MinIO, R2, ...: their URL
    s3_region: str | None = None  # unset: boto3's (AWS_REGION / AWS_DEFAULT_REGION)
    # unset: boto3's chain (AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY, profile, IAM role)
    s3_access_key_id: str | None = None
    s3_secret_access_key: SecretStr | None = None
    # downloads (file content, adapter and checkpoint zips) from S3: "stream" through the
    # API, or "redirect" (307) to a presigned URL the client fetches from the store itself
    storage_downloads: Literal["stream", "redirect"] = "stream"
    storage_presign_seconds: int = 900  # how long a presigned download URL works
    # a checkpoint whose upload failed (the store unreachable) is retried after this many
    # seconds, doubling to storage_retry_max_seconds; the job trains on meanwhile
    storage_retry_seconds: float = 2.0
    storage_retry_max_seconds: float = 60.0
    # the base model's public id (GET /v1/models, a job's `model`, its fine-tuned model's
    # id); unset: the embedded default's id, or MIXLOOM_BASE_MODEL's folder name
    # (mixloom/model_ids.py). Model ids never show a server path.
    base_model_alias: Annotated[str | None, Field(pattern=r"^[A-Za-z0-9._-]{1,64}$")] = None
    # several base models in one deployment: "NAME=SOURCE[|HUB_ID]", comma-separated (each
    # as MIXLOOM_BASE_MODEL_ALIAS, MIXLOOM_BASE_MODEL and MIXLOOM_BASE_MODEL_HUB_ID; syntax:
    # model_ids.parse_base_models). Set, it replaces those three; unset: their one base.
    base_models: str | None = None
    # the adapter a job trains when its method names none: OpenAI's `supervised` method
    # without mixloom's `adapter` section, or OpenAI's older top-level `hyperparameters`
    default_adapter: Literal["lora", "mixlora"] = "lora"
    # glibc malloc keeps freed memory (trainer/host.py; process-wide); unset: in `mixloom
    # train` on a CPU, never in `mixloom worker` / `serve`
    cpu_malloc_tuning: bool | None = None
    # dropout masks: auto (the Philox kernel on CUDA with triton, else each job's generator)
    # | counter (the kernel; on CPU under TRITON_INTERPRET=1) | stream (each job's generator)
    dropout_rng: Literal["auto", "counter", "stream"] = "auto"
    # Triton tile sizes (mixloom/kernels/common.py), for bench/gpu.sh's sweep; unset: small
    # under triton's interpreter, tuned for a GPU. Read once, at the first launch.
    kernel_block_m: int | None = None  # pairs per tile (the tile table's unit)
    kernel_block_k: int | None = None  # shrink's step over the input features
    kernel_block_n: int | None = None  # expand's output columns (stored)
    kernel_block_n_add: int | None = None  # expand's output columns (scatter-added)
    kernel_block_p: int | None = None  # weight gradients' step over a group's pairs
    kernel_block_f: int | None = None  # weight gradients' tile over the features
    kernel_warps: int | None = None
    kernel_stages: int | None = None
    kernel_glu_warps: int | None = None
    kernel_glu_block_n_fwd: int | None = None
    kernel_glu_block_n_bwd: int | None = None
    # worker (`mixloom worker` / `serve`; their flags override these)
    worker_id: str | None = None  # default: host:pid:random
    worker_base_model: str | None = None  # the base a worker holds, by name; default: the first
    # a dead worker's jobs are claimable this long after its last heartbeat
    worker_lease_seconds: float = 30.0
    worker_heartbeat_seconds: float | None = None  # default: worker_lease_seconds / 3
    worker_poll_seconds: float = 2.0  # look for new jobs this often (a bus wake-up comes sooner)
    worker_step_token_budget: int = 16384  # padded tokens (rows x widest row) per fused step
    # what training may hold; default: 90% of GPU memory, or base + 80% RAM, less what decoding
    # may hold (inference_kv_cache_tokens' cache and inference_adapter_cache_gb)
    worker_memory_budget_gb: float | None = None
    worker_metrics_interval_seconds: float = 1.0  # a job's step metrics reach the DB this often
    worker_max_jobs: int = 32  # jobs admitted at once (they share steps by fair share)
    # a job whose lease expired this often without checkpointing past its resume point (it
    # keeps killing its worker) is failed as poisoned
    worker_max_crashes: int = 3
    # Prometheus metrics of `mixloom worker` (mixloom/observability.py) at
    # http://HOST:PORT/metrics, unauthenticated; 0: off (`mixloom serve`: the API's port + 1)
    worker_metrics_port: int = 0
    worker_metrics_host: str = "127.0.0.1"  # 0.0.0.0 in a container, for Prometheus to reach
    # checkpoints kept per job: the last K (a job may ask for fewer) plus the best by
    # validation loss; older ones are deleted
    keep_checkpoints: int = 3
    # API load (bench/load_api.py). Request rate per tenant, a token bucket in each API
    # process: bursts of rate_limit_burst, refilled at rate_limit_per_second; over it: 429 with
    # Retry-After. 0 turns the limit off.
    rate_limit_per_second: float = 200.0
    rate_limit_burst: int = 400
    # an API key that authenticated is trusted this long without asking the database again:
    # a revoked key is refused at most this many seconds later (0: ask on every request)
    auth_cache_seconds: float = 2.0
    api_workers: int = 1  # `mixloom api` processes (each with its own caches and buckets)
    # threads per API process running the (sync) route handlers, and database connections
    # kept open (anyio's default is 40: on 2 cores they mostly wait for the GIL)
    api_threads: int = 16
    # `mixloom serve`: the API process's nice value above the worker's, so that API load
    # does not starve training (0: the same priority)
    serve_api_nice: int = 10
    # limits
    max_upload_bytes: int = 64 * 1024 * 1024
    # uploads in progress at once per API process (each spools to disk in 1 MiB chunks);
    # one more is answered 429 with Retry-After
    max_concurrent_uploads: int = 4
    max_concurrent_uploads_per_tenant: int = 2  # of those, one tenant's at once
    max_file_lines: int = 200_000
    max_tenant_bytes: int = 1024 * 1024 * 1024
    max_queued_jobs: int = 50
    max_running_jobs: int = 8
    max_request_bytes: int = 1024 * 1024
    max_seq_len: int = 4096  # a job's max_seq_len (and the served model's context)
    # job limits: the API refuses a job over one, naming the setting (jobspec.OPERATOR_BOUNDS;
    # keep_checkpoints and max_seq_len bound jobs too). Disk is bounded by max_tenant_bytes
    # and keep_checkpoints, not by how often a job checkpoints.
    max_job_steps: int = 100_000  # optimizer steps (max_steps, checkpoint_every, n_epochs')
    max_lora_r: int = 256  # r, and the experts' r
    max_experts: int = 16  # num_experts
    max_batch_size: int = 1024  # batch_size (sequences per optimizer step)
    max_epochs: int = 100  # n_epochs
    # API
    sse_poll_seconds: float = 2.0  # an idle SSE stream re-reads the database this often
    sse_max_streams: int = 64  # concurrent SSE streams (each parks a thread while it waits)
    # concurrent SSE streams of one tenant, so that no tenant takes every slot; over it: 429
    sse_max_streams_per_tenant: int = 8
    sse_auth_check_seconds: float = 2.0  # an open stream ends this soon after its key is revoked
    dashboard_session_hours: float = 7 * 24  # a dashboard sign-in lasts this long
    # the operator's key: /v1/admin/* and the dashboard's operator view (/operator), and the
    # API's /metrics when set (open without it). Unset: no operator routes (404).
    admin_key: SecretStr | None = None
    # inference (`/v1/chat/completions`, `/v1/completions`): the API stores a request, a
    # worker holding its base decodes it between training steps (worker_role "all") or
    # alone ("inference"); "training" workers decode nothing
    worker_role: Literal["all", "training", "inference"] = "all"
    inference_max_tokens: int = 4096  # max_tokens a request may ask for
    inference_default_max_tokens: int = 512  # a chat request that names no max_tokens
    inference_max_n: int = 8  # samples a request (n, times the prompts of a completion)
    inference_max_requests_per_tenant: int = 16  # in flight at once; over it: 429
    inference_queue_seconds: float = 30.0  # a request no worker takes this soon: 503
    # a waiting request re-reads its chunks this often (a bus message, with Redis, sooner)
    inference_poll_seconds: float = 0.1
    inference_keep_seconds: float = 600.0  # finished requests (prompts, answers) are removed
    inference_kv_cache_tokens: int = 16384  # a worker's KV cache, all running sequences
    inference_max_batch_tokens: int = 512  # new tokens a decoding step: decode rows + prefill
    inference_adapter_cache_gb: float = 1.0  # adapters a worker keeps loaded (LRU beyond)
    # tests/: the services integration tests use (each test session makes its own database)
    test_postgres_url: str = "postgresql://postgres@127.0.0.1:5432/test"
    test_redis_url: str = "redis://127.0.0.1:6379/0"

    @property
    def files_dir(self) -> Path:
        return self.data_dir / "files"

    @property
    def bases(self) -> tuple[BaseModelSpec, ...]:
        """The deployment's base models: MIXLOOM_BASE_MODELS, or else the one base
        MIXLOOM_BASE_MODEL names. Raises ConfigError naming the variable when it is bad."""
        if self.base_models and self.base_models.strip():
            return parse_base_models(self.base_models)
        name = base_model_id(self.base_model, self.base_model_alias)
        return (BaseModelSpec(name, self.base_model, self.base_model_hub_id),)

    def held_base(self) -> BaseModelSpec:
        """The base a worker holds: MIXLOOM_WORKER_BASE_MODEL (--base-model) by name, else
        the first of `bases`."""
        bases = self.bases
        if self.worker_base_model is None:
            return bases[0]
        found = next((b for b in bases if b.name == self.worker_base_model), None)
        if found is None:
            raise ConfigError(
                f"no base model named {self.worker_base_model!r}; the deployment's are: "
                + ", ".join(b.name for b in bases),
                where="MIXLOOM_WORKER_BASE_MODEL (--base-model)",
            )
        return found

    def holding(self, base: BaseModelSpec) -> Settings:
        """These settings for a process that holds `base` alone (a worker): MIXLOOM_BASE_MODEL,
        its alias and hub id are that base's."""
        return self.model_copy(
            update={
                "base_model": base.source,
                "base_model_alias": base.name,
                "base_model_hub_id": base.hub_id,
                "base_models": None,
                "worker_base_model": None,
            }
        )

    @property
    def worker_heartbeat(self) -> float:
        return self.worker_heartbeat_seconds or self.worker_lease_seconds / 3

    @property
    def resolved_database_url(self) -> str:
        if self.database_url:
            return self.database_url
        return f"sqlite:///{(self.data_dir / 'mixloom.db').resolve()}"


def get_settings() -> Settings:
    return Settings()
