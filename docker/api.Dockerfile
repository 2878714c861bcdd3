# The REST API and dashboard: no torch, starts in about a second.
# Build from the repository root:  docker build -f docker/api.Dockerfile -t mixloom-api .
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    MIXLOOM_DATA_DIR=/data

# The API's own dependencies only (pyproject's list also names the trainer's torch stack,
# which this process never imports; tests/docker checks that).
RUN pip install \
      "pydantic>=2.6" "pydantic-settings>=2.2" "sqlalchemy>=2.0" "alembic>=1.13" \
      "psycopg[binary]>=3.1" "redis>=5" "fastapi>=0.110" "uvicorn>=0.27" \
      python-multipart "httpx>=0.27" pyyaml tqdm "prometheus-client>=0.17" "boto3>=1.28"

WORKDIR /app
COPY pyproject.toml alembic.ini README* ./
COPY migrations ./migrations
COPY mixloom ./mixloom
# Editable: migrations/ stays beside the package, where `mixloom db upgrade` finds it.
RUN pip install --no-deps -e . \
 && useradd --create-home --uid 10001 mixloom \
 && mkdir -p /data && chown mixloom /data
COPY docker/healthcheck.py /usr/local/bin/mixloom-healthcheck

USER mixloom
VOLUME ["/data"]
EXPOSE 8000
HEALTHCHECK --interval=10s --timeout=5s --start-period=20s --retries=3 \
  CMD ["python", "/usr/local/bin/mixloom-healthcheck", "api"]
# Upgrades the database schema at start (an advisory lock serialises replicas).
CMD ["mixloom", "api", "--host", "0.0.0.0", "--port", "8000"]
