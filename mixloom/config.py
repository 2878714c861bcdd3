"""Deployment settings, read from the environment (prefix MIXLOOM_)."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic_settings import BaseSettings, SettingsConfigDict


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="MIXLOOM_", extra="ignore")

    data_dir: Path = Path("./mixloom-data")  # SQLite file, uploads, checkpoints, adapters
    database_url: str | None = None  # default: sqlite file under data_dir
    redis_url: str | None = None  # unset: in-process progress bus
    base_model: str = "smollm2-135m"  # "smollm2-135m" = the embedded default, or a path / hub id
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    dtype: str = "auto"  # auto (fp32 on CPU, bf16 on GPU) | float32 | bfloat16 | float16
    kernel_backend: str = "auto"  # auto | torch | triton
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
    # adapter activations recomputed in the backward (less memory, a slower step); unset:
    # on a GPU, off on a CPU (AdapterModel)
    recompute: bool | None = None
    # limits
    max_upload_bytes: int = 64 * 1024 * 1024
    max_file_lines: int = 200_000
    max_tenant_bytes: int = 1024 * 1024 * 1024
    max_queued_jobs: int = 50
    max_running_jobs: int = 8
    max_request_bytes: int = 1024 * 1024
    max_seq_len: int = 4096
    # API
    sse_poll_seconds: float = 2.0  # an idle SSE stream re-reads the database this often
    sse_max_streams: int = 64  # concurrent SSE streams (each parks a thread while it waits)

    @property
    def files_dir(self) -> Path:
        return self.data_dir / "files"

    @property
    def resolved_database_url(self) -> str:
        if self.database_url:
            return self.database_url
        return f"sqlite:///{(self.data_dir / 'mixloom.db').resolve()}"


def get_settings() -> Settings:
    return Settings()
