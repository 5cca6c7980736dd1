"""Per-tenant API keys: a key lists the adapters (customers) it may use. Only sha256 hashes of
keys are stored, so the file can be read without exposing a key."""

from __future__ import annotations

import hashlib
import json
import secrets
from pathlib import Path

from pydantic import BaseModel


class Tenant(BaseModel):
    tenant: str
    adapters: list[str]  # customer ids; "*" = all
    base: bool = True  # may call the bare base model


def key_hash(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def load_keys(path: str | Path) -> dict[str, Tenant]:
    raw = json.loads(Path(path).read_text())
    return {h: Tenant.model_validate(t) for h, t in raw.items()}


def add_key(path: str | Path, tenant: str, adapters: list[str], base: bool = True) -> str:
    """Create a key for a tenant; returns the key (shown once), stores only its hash."""
    path = Path(path)
    keys = json.loads(path.read_text()) if path.is_file() else {}
    key = "lf-" + secrets.token_urlsafe(24)
    keys[key_hash(key)] = Tenant(tenant=tenant, adapters=adapters, base=base).model_dump()
    path.write_text(json.dumps(keys, indent=2))
    return key


def allows(tenant: Tenant, customer: str | None) -> bool:
    if customer is None:
        return tenant.base
    return "*" in tenant.adapters or customer in tenant.adapters
