"""The HTTP API: ``app`` (the FastAPI app and its state), ``routes/`` (one router per resource),
``models`` (every request and response body), ``deps`` (shared dependencies), ``errors`` (domain
errors mapped to status codes once) and ``metrics`` (Prometheus)."""

from bandit_service.api.app import create_app

__all__ = ["create_app"]
