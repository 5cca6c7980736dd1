"""Tenants at the ingress: who a key belongs to (re-read from the keys file while serving, so keys,
limits and revocations need no redeploy) and how much each tenant may ask for at once.

- `KeyStore(path, reload_s).tenant(authorization_header)` -> Tenant, or None for a bad key.
- `TenantLimiter().acquire(tenant, max_tokens)` -> Lease, or raises TenantLimitError (429 with
  Retry-After at the ingress); `lease.release(tokens_used)` (prompt and generated) when the answer is done.

Both are meant for one asyncio event loop (the ingress): their methods never await and hold a
threading lock only for a few dict operations, so they are also safe from threads.
"""

from __future__ import annotations

import logging
import math
import os
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from lorafleet.errors import LorafleetError
from lorafleet.serve.keys import KeysFileError, Tenant, key_hash, load_keys

log = logging.getLogger(__name__)

Clock = Callable[[], float]
WINDOW_S = 60.0  # tokens_per_minute is counted over a sliding minute


class TenantLimitError(LorafleetError):
    """A tenant past one of its limits: answer 429 with `Retry-After: ceil(retry_after_s)`.
    `code` says which limit: concurrent_requests_exceeded, tokens_per_minute_exceeded, or
    request_too_large (max_tokens alone is over the per-minute limit: retrying cannot help)."""

    def __init__(self, message: str, retry_after_s: float, code: str = "rate_limit_exceeded"):
        super().__init__(message)
        self.message, self.retry_after_s, self.code = message, retry_after_s, code


# ---- keys ---------------------------------------------------------------------------------------


def bearer_key(authorization_header: str | None) -> str:
    """'Bearer <key>' -> '<key>' ('' when absent)."""
    value = (authorization_header or "").strip()
    scheme, _, rest = value.partition(" ")
    return rest.strip() if scheme.lower() == "bearer" else ""


class KeyStore:
    """The keys file, re-read when its mtime, size or inode changes, checked at most every reload_s.
    A file that disappears or stops validating keeps the last good keys (and logs a warning): a
    bad edit never opens the endpoint nor locks every tenant out. A bad file at start raises."""

    def __init__(self, path: str | Path, reload_s: float = 2.0, clock: Clock = time.monotonic):
        self.path, self.reload_s, self.clock = Path(path), reload_s, clock
        self._lock = threading.Lock()
        self._keys = load_keys(self.path)
        self._signature = self._stat()
        self._checked = clock()
        self._warned: str | None = None
        if os.stat(self.path).st_mode & 0o077:  # hashes only, but a key list is still nobody's business
            log.warning("keys file %s is readable by other users: chmod 600 it", self.path)

    def tenant(self, authorization_header: str | None) -> Tenant | None:
        """The tenant of a request's Authorization header, or None for a missing or unknown key."""
        self._maybe_reload()
        key = bearer_key(authorization_header)
        return self._keys.get(key_hash(key)) if key else None

    def tenants(self) -> dict[str, Tenant]:
        """key hash -> Tenant as last loaded (for listing; does not reload)."""
        return dict(self._keys)

    def _maybe_reload(self) -> None:
        now = self.clock()
        if now - self._checked < self.reload_s:
            return
        with self._lock:
            if now - self._checked < self.reload_s:  # another thread just did it
                return
            self._checked = now
            self._reload_if_changed()

    def _reload_if_changed(self) -> None:
        try:
            signature = self._stat()
            if signature == self._signature:
                return
            self._keys = load_keys(self.path)
            self._signature, self._warned = signature, None
            log.info("keys file %s reloaded: %d keys", self.path, len(self._keys))
        except (OSError, KeysFileError) as exc:
            # the signature is left as it was, so the next check retries; warn once per problem
            if str(exc) != self._warned:
                self._warned = str(exc)
                log.warning("keys file %s not reloaded, keeping the last good keys: %s", self.path, exc)

    def _stat(self) -> tuple[int, int, int]:
        st = os.stat(self.path)
        return st.st_mtime_ns, st.st_size, st.st_ino


# ---- limits -------------------------------------------------------------------------------------


@dataclass
class _Reservation:
    at: float  # admission time: the tokens count in the window from then on
    tokens: int
    expired: bool = False


@dataclass
class _Usage:
    """One tenant's in-flight requests and its token reservations in the window (with their sum,
    so a flooding tenant's long window costs O(1) per request)."""

    in_flight: int = 0
    tokens: int = 0
    window: deque = field(default_factory=deque)  # _Reservation, oldest first


class Lease:
    """One admitted request. release() once with the tokens it used, its prompt and what it
    generated (0: it failed and is not charged; None keeps the reservation, for a request whose
    use is not known); a second release does nothing, so it is safe in every finally."""

    def __init__(self, limiter: TenantLimiter, tenant: str, entry: _Reservation):
        self._limiter, self.tenant, self._entry, self._released = limiter, tenant, entry, False

    def release(self, tokens_used: int | None = None) -> None:
        if self._released:
            return
        self._released = True
        self._limiter._release(self.tenant, self._entry, tokens_used)


class TenantLimiter:
    """Per-tenant concurrent requests and tokens per sliding minute, read from the Tenant at each
    acquire (so a reloaded keys file applies at once). Tokens are reserved at admission as the
    request's prompt and max_tokens, and corrected to the tokens used on release."""

    def __init__(self, clock: Clock = time.monotonic, concurrency_retry_after_s: float = 1.0):
        self.clock, self.concurrency_retry_after_s = clock, concurrency_retry_after_s
        self._lock = threading.Lock()
        self._usage: dict[str, _Usage] = {}

    def acquire(self, tenant: Tenant, max_tokens: int) -> Lease:
        """Admit a request of up to max_tokens new tokens, or raise TenantLimitError."""
        with self._lock:
            now = self.clock()
            usage = self._usage.setdefault(tenant.tenant, _Usage())
            self._expire(usage, now)
            self._check_concurrency(tenant, usage)
            self._check_tokens(tenant, usage, max_tokens, now)
            entry = _Reservation(now, max_tokens)
            usage.window.append(entry)
            usage.tokens += max_tokens
            usage.in_flight += 1
            return Lease(self, tenant.tenant, entry)

    def in_flight(self, tenant: str) -> int:
        usage = self._usage.get(tenant)
        return usage.in_flight if usage else 0

    def tokens_in_window(self, tenant: str) -> int:
        with self._lock:
            usage = self._usage.get(tenant)
            if usage is None:
                return 0
            self._expire(usage, self.clock())
            return usage.tokens

    def _check_concurrency(self, tenant: Tenant, usage: _Usage) -> None:
        if tenant.max_concurrent is not None and usage.in_flight >= tenant.max_concurrent:
            raise TenantLimitError(
                f"tenant {tenant.tenant!r} has {usage.in_flight} requests in flight, its limit is "
                f"{tenant.max_concurrent}: wait for one to finish",
                self.concurrency_retry_after_s,
                "concurrent_requests_exceeded",
            )

    def _check_tokens(self, tenant: Tenant, usage: _Usage, max_tokens: int, now: float) -> None:
        limit = tenant.tokens_per_minute
        if limit is None:
            return
        if max_tokens > limit:
            raise TenantLimitError(
                f"the request may use {max_tokens} tokens (its prompt and max_tokens), over tenant "
                f"{tenant.tenant!r}'s limit of {limit} tokens per minute, so it can never run: shorten "
                "the prompt or lower max_tokens",
                WINDOW_S,
                "request_too_large",
            )
        used = usage.tokens
        if used + max_tokens <= limit:
            return
        raise TenantLimitError(
            f"tenant {tenant.tenant!r} has used {used} of its {limit} tokens per minute and asks for "
            f"{max_tokens} more: retry later or lower max_tokens",
            self._wait_for(usage, used + max_tokens - limit, now),
            "tokens_per_minute_exceeded",
        )

    @staticmethod
    def _wait_for(usage: _Usage, excess: int, now: float) -> float:
        """Seconds until enough of the oldest reservations leave the window to free `excess`."""
        freed = 0
        for r in usage.window:
            freed += r.tokens
            if freed >= excess:
                return max(r.at + WINDOW_S - now, 0.0)
        return WINDOW_S  # unreachable while max_tokens <= limit; kept as a safe bound

    @staticmethod
    def _expire(usage: _Usage, now: float) -> None:
        while usage.window and usage.window[0].at <= now - WINDOW_S:
            gone = usage.window.popleft()
            gone.expired = True
            usage.tokens -= gone.tokens

    def _release(self, tenant: str, entry: _Reservation, tokens_used: int | None) -> None:
        with self._lock:
            usage = self._usage.get(tenant)
            if usage is None:
                return
            usage.in_flight = max(usage.in_flight - 1, 0)
            if tokens_used is not None and not entry.expired:
                used = max(int(tokens_used), 0)  # still counted from its admission time
                usage.tokens += used - entry.tokens
                entry.tokens = used
            self._expire(usage, self.clock())
            if usage.in_flight == 0 and usage.tokens == 0:
                del self._usage[tenant]  # a tenant that went quiet (or was revoked) costs nothing


def retry_after_header(exc: TenantLimitError) -> str:
    """Retry-After takes whole seconds; round up so a client that obeys it is admitted."""
    return str(max(1, math.ceil(exc.retry_after_s)))
