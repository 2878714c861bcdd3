"""The REST API (FastAPI). Imports storage, never torch, the trainer or the kernels."""
