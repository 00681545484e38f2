"""API keys: made once and shown once, stored only as a hash; a per-key rate limit and daily image quota;
revoked by name, never deleted (the audit trail keeps pointing at them)."""

from __future__ import annotations

import hashlib
import secrets
import threading
import time
from dataclasses import dataclass

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from medsyn.serving.database import ApiKey

KEY_PREFIX = "msk_"


def key_hash(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def create_api_key(session: Session, name: str, requests_per_minute: int = 60, images_per_day: int = 10_000,
                   admin: bool = False) -> str:
    """Store a new key for ``name`` and return it: the only time it is seen in clear."""
    if not name or len(name) > 64:
        raise ValueError(f"key name must be 1-64 characters, got {name!r}")
    if session.scalar(select(ApiKey).where(ApiKey.name == name)) is not None:
        raise ValueError(f"an API key named {name!r} exists already; pick another name")
    key = KEY_PREFIX + secrets.token_urlsafe(32)
    session.add(ApiKey(name=name, key_hash=key_hash(key), requests_per_minute=requests_per_minute,
                       images_per_day=images_per_day, revoked=False, admin=admin))
    session.commit()
    return key


def find_api_key(session: Session, key: str) -> ApiKey | None:
    """The active key record ``key`` belongs to (compared by hash: the clear key is never stored)."""
    found = session.scalar(select(ApiKey).where(ApiKey.key_hash == key_hash(key)))
    return None if found is None or found.revoked else found


def keys_configured(session: Session) -> bool:
    """Whether any key is active: decided once when a server starts (see ``medsyn.serving.app``)."""
    return bool(session.scalar(select(func.count()).select_from(ApiKey).where(ApiKey.revoked.is_(False))))


def revoke_api_key(session: Session, name: str) -> None:
    """Revoke the key called ``name``: a running server refuses it from its next request on."""
    found = session.scalar(select(ApiKey).where(ApiKey.name == name))
    if found is None:
        names = session.scalars(select(ApiKey.name).order_by(ApiKey.name)).all()
        raise ValueError(f"no API key named {name!r}; the keys are {names}")
    found.revoked = True
    session.commit()


def list_api_keys(session: Session) -> list[ApiKey]:
    """Every key, active or revoked, oldest first (hashes only: clear keys are never stored)."""
    return list(session.scalars(select(ApiKey).order_by(ApiKey.id)))


@dataclass
class _Bucket:
    tokens: float
    updated: float


class RateLimiter:
    """A token bucket per key: ``per_minute`` requests, refilled continuously, bursts up to ``per_minute``."""

    def __init__(self) -> None:
        self._buckets: dict[int, _Bucket] = {}
        self._lock = threading.Lock()

    def retry_after(self, key_id: int, per_minute: int) -> float:
        """0 when a request may go now (and it is counted), else the seconds until it may."""
        now = time.monotonic()
        with self._lock:
            bucket = self._buckets.setdefault(key_id, _Bucket(float(per_minute), now))
            bucket.tokens = min(per_minute, bucket.tokens + (now - bucket.updated) * per_minute / 60)
            bucket.updated = now
            if bucket.tokens >= 1:
                bucket.tokens -= 1
                return 0.0
            return (1 - bucket.tokens) * 60 / per_minute
