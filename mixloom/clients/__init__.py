"""Python client and CLI for the mixloom REST API (HTTP only; no server code imported)."""

from mixloom.clients.client import Client
from mixloom.clients.errors import (
    APIConnectionError,
    APIError,
    AuthenticationError,
    BadRequestError,
    ConflictError,
    GoneError,
    NotFoundError,
    PayloadTooLargeError,
    RateLimitError,
    ServerError,
    ServerProblem,
)
from mixloom.clients.types import (
    Checkpoint,
    Event,
    File,
    Job,
    JobError,
    Metric,
    Model,
    Page,
    StreamMessage,
)

__all__ = [
    "APIConnectionError",
    "APIError",
    "AuthenticationError",
    "BadRequestError",
    "Checkpoint",
    "Client",
    "ConflictError",
    "Event",
    "File",
    "GoneError",
    "Job",
    "JobError",
    "Metric",
    "Model",
    "NotFoundError",
    "Page",
    "PayloadTooLargeError",
    "RateLimitError",
    "ServerError",
    "ServerProblem",
    "StreamMessage",
]
