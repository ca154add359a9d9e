"""HTTP callbacks of rollouts: a POST per transition, with retries and timeouts, and the
confirm-before-promote gate."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import httpx

log = logging.getLogger("abflow.webhooks")


@dataclass(frozen=True)
class Delivery:
    delivered: bool
    attempts: int
    detail: str  # the last status or error


def post_json(url: str, payload: dict, timeout: float, retries: int, backoff_seconds: float = 0.5) -> Delivery:
    """POST ``payload``; a 2xx answer delivers it. Retries ``retries`` times on errors, timeouts and
    non-2xx answers, waiting ``backoff_seconds``, then twice that, and so on."""
    detail = ""
    for attempt in range(1, retries + 2):
        try:
            response = httpx.post(url, json=payload, timeout=timeout)
            if response.is_success:
                return Delivery(True, attempt, f"HTTP {response.status_code}")
            detail = f"HTTP {response.status_code}"
        except httpx.HTTPError as exc:
            detail = f"{type(exc).__name__}: {exc}"[:300]
        log.info("webhook %s attempt %d failed: %s", url, attempt, detail)
        if attempt <= retries:
            time.sleep(backoff_seconds * 2 ** (attempt - 1))
    return Delivery(False, retries + 1, detail)


def confirm(url: str, payload: dict, timeout: float) -> Delivery:
    """Ask the gate once: a 2xx answer confirms; anything else (or no answer) is a no for now."""
    return post_json(url, payload, timeout, retries=0)
