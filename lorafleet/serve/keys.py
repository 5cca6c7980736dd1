"""Per-tenant API keys: a key lists the adapters (customers) it may use and carries its tenant's
limits. Only sha256 hashes of keys are stored, so the file can be read without exposing a key;
it is still written readable by its owner only (0600), and atomically, so an endpoint that
re-reads it never sees half a file.

File format (JSON): {"<sha256 of key>": {"tenant": ..., "adapters": [...], "base": true,
"max_concurrent": null, "tokens_per_minute": null, "weight": 1.0}, ...}. One tenant may hold
several keys (rotation); its limits are the same on each (`add_key` keeps them in step).
"""

from __future__ import annotations

import hashlib
import json
import os
import secrets
import tempfile
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from lorafleet.errors import LorafleetError
from lorafleet.limits import Flag, Real, Whole, check_name

LIMIT_FIELDS = ("max_concurrent", "tokens_per_minute", "weight")


class KeysFileError(LorafleetError):
    """A keys file that cannot be read or does not validate."""


class Tenant(BaseModel):
    # forbid: a misspelt limit in a hand-edited file must not silently mean "no limit"
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    tenant: str = Field(
        min_length=1, max_length=128, description="who the key belongs to; limits are counted per tenant"
    )
    adapters: list[str] = Field(description="customer ids this key may call; '*' = all")
    base: Flag = Field(True, description="may call the bare base model")
    max_concurrent: Whole | None = Field(
        None, ge=1, le=100_000, description="requests in flight at once for this tenant; past it: 429"
    )
    tokens_per_minute: Whole | None = Field(
        None,
        ge=1,
        le=10**12,
        description=(
            "tokens per sliding minute, prompt and answer: reserved as the prompt and max_tokens, "
            "corrected to the tokens used; past it: 429"
        ),
    )
    weight: Real = Field(
        1.0, gt=0, le=1000, description="share of a replica's batch slots against other tenants in a queue"
    )

    def limits(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in LIMIT_FIELDS}


def key_hash(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def read_raw(path: str | Path) -> dict[str, dict]:
    """The file as stored; {} when it does not exist yet."""
    path = Path(path)
    if path.is_dir():
        raise KeysFileError(f"keys file {path} is a folder; name a file, e.g. {path / 'keys.json'}")
    if not path.is_file():
        return {}
    try:
        raw = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise KeysFileError(f"keys file {path}: cannot read it as JSON ({exc})") from None
    if not isinstance(raw, dict) or not all(isinstance(t, dict) for t in raw.values()):
        raise KeysFileError(f"keys file {path}: expected an object of key hash -> tenant object")
    return raw


def load_keys(path: str | Path) -> dict[str, Tenant]:
    """key hash -> Tenant; raises KeysFileError naming the bad entry."""
    raw = read_raw(path)  # a folder or malformed file is named first
    if not Path(path).is_file():
        raise KeysFileError(f"keys file {path} does not exist: create it with `lorafleet keys create`")
    return _tenants(path, raw)


def _tenants(path: str | Path, raw: dict[str, dict]) -> dict[str, Tenant]:
    """The file's entries validated, or a KeysFileError naming the first bad one."""
    keys = {}
    for h, t in raw.items():
        try:
            keys[h] = Tenant.model_validate(t)
        except ValidationError as exc:
            problems = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors())
            raise KeysFileError(f"keys file {path}: entry {h[:12]}...: {problems}") from None
    return keys


def write_keys(path: str | Path, raw: dict[str, dict]) -> None:
    """Atomic and private: a temp file in the same folder (mkstemp creates it 0600), fsynced, then
    renamed over the old file, so a reader sees the old or the new file whole, and a file that
    had wider permissions is replaced by a 0600 one."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as fh:
            json.dump(raw, fh, indent=2)
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp, 0o600)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


def _fsync_dir(folder: Path) -> None:
    """The rename itself survives a crash only once the folder is synced."""
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def add_key(
    path: str | Path,
    tenant: str,
    adapters: list[str],
    base: bool = True,
    max_concurrent: int | None = None,
    tokens_per_minute: int | None = None,
    weight: float | None = None,
) -> str:
    """Create a key for a tenant; returns the key (shown once), stores only its hash. Limits
    given become the tenant's limits on all of its keys; limits not given (None) keep the ones
    its keys have (a new key rotated in does not lift them), else none and weight 1."""
    path = Path(path)
    raw = read_raw(path)
    current = _tenants(path, raw)  # a file that does not validate is refused, not added to
    if not path.parent.is_dir():
        raise KeysFileError(f"keys file {path}: the folder {path.parent} does not exist")
    _check_names(tenant, adapters, base)
    held = next((t.limits() for t in current.values() if t.tenant == tenant), {"weight": 1.0})
    given = {"max_concurrent": max_concurrent, "tokens_per_minute": tokens_per_minute, "weight": weight}
    limits = {k: v if v is not None else held.get(k) for k, v in given.items()}
    try:
        entry = Tenant(tenant=tenant, adapters=adapters, base=base, **limits)
    except ValidationError as exc:
        first = exc.errors()[0]
        message = first["msg"].removeprefix("Value error, ")
        raise KeysFileError(f"key for {tenant!r}: {first['loc'][0]}: {message}") from None
    for other in raw.values():
        if other.get("tenant") == tenant:
            other.update(entry.limits())
    key = "lf-" + secrets.token_urlsafe(24)
    raw[key_hash(key)] = entry.model_dump()
    write_keys(path, raw)
    return key


def _check_names(tenant: str, adapters: list[str], base: bool) -> None:
    """A new key's names (files written before these rules still load): the tenant and each
    adapter follow the registry's name rule, since a customer id with '@' or '/' never matches
    one, and a key must be able to call something."""
    try:
        check_name("tenant", tenant)
        for adapter in adapters:
            if adapter != "*":
                check_name("adapter", adapter)
    except ValueError as exc:
        raise KeysFileError(str(exc)) from None
    if not adapters and not base:
        raise KeysFileError(f"a key for {tenant!r} with no adapters and no base could call nothing")


def revoke(path: str | Path, tenant: str) -> int:
    """Remove every key of a tenant; returns how many. An endpoint drops them on its next reload."""
    raw = read_raw(path)
    kept = {h: t for h, t in raw.items() if t.get("tenant") != tenant}
    if len(kept) == len(raw):
        known = sorted({t.get("tenant", "?") for t in raw.values()})
        raise KeysFileError(f"no keys for tenant {tenant!r} in {path}; tenants: {', '.join(known) or 'none'}")
    write_keys(path, kept)
    return len(raw) - len(kept)


def tenant_rows(path: str | Path) -> list[dict[str, Any]]:
    """One row per tenant for `lorafleet keys list`: never a hash or a key."""
    rows: dict[str, dict[str, Any]] = {}
    for t in load_keys(path).values():
        row = rows.setdefault(
            t.tenant, {"tenant": t.tenant, "keys": 0, "adapters": t.adapters, "base": t.base, **t.limits()}
        )
        row["keys"] += 1
    return sorted(rows.values(), key=lambda r: r["tenant"])


def allows(tenant: Tenant, customer: str | None) -> bool:
    if customer is None:
        return tenant.base
    return "*" in tenant.adapters or customer in tenant.adapters
