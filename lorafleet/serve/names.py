"""What the ingress asks the registry, and how it survives the registry being slow or down.

Every MLflow call runs on a small thread pool of its own, never on the event loop, and is
awaited for at most `timeout_s` (a thread cannot be cancelled, so a hung call keeps its thread:
a pool of its own keeps those from starving tokenising). One call per name at a time; callers of
the same name share it. When a call fails or times out:
- a name resolved before keeps serving its last known version (stale-if-error);
- a new name fails at once with RegistryDown for `retry_s`, then the next call tries again,
  so the ingress recovers by itself when the registry returns.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Protocol

from lorafleet.errors import RegistryError, RegistryUnavailableError


class Directory(Protocol):
    """The registry as the ingress sees it (blocking calls)."""

    def resolve(self, ref: Any) -> Any:
        """The ModelVersion a ref points at; RegistryError when the name is wrong."""

    def exists(self, model: str) -> bool:
        """Whether a registered model of this name exists."""

    def served(self) -> list[str]:
        """Registered adapter models that have a production alias."""


class MlflowDirectory:
    """The real registry: lorafleet.registry over an MlflowClient (default: the configured store)."""

    def __init__(self, client: Callable[[], Any] | None = None):
        from lorafleet import tracking

        self.client = client or tracking.client

    def resolve(self, ref: Any) -> Any:
        from lorafleet import registry

        return registry.resolve_version(self.client(), ref)

    def exists(self, model: str) -> bool:
        from lorafleet import registry

        return any(m.name == model for m in registry.adapter_models(self.client()))

    def served(self) -> list[str]:
        from lorafleet import registry

        models = registry.adapter_models(self.client())
        return [m.name for m in models if registry.PRODUCTION in (m.aliases or {})]


class UnknownModel(Exception):
    """No registered model of that name: the ingress words the answer (it must not list others')."""


class RegistryDown(Exception):
    def __init__(self, retry_after_s: float):
        super().__init__(f"the adapter registry is unreachable; retry in {retry_after_s:.0f} s")
        self.retry_after_s = retry_after_s


class NameCache:
    def __init__(self, directory: Directory, timeout_s: float, retry_s: float, refresh_s: float):
        self.directory, self.timeout_s, self.retry_s, self.refresh_s = (
            directory,
            timeout_s,
            retry_s,
            refresh_s,
        )
        self.pool = ThreadPoolExecutor(max_workers=4, thread_name_prefix="registry")
        self.known: dict[str, tuple[float, Any]] = {}  # key -> (when fetched, value)
        self.inflight: dict[str, asyncio.Future] = {}
        self.down_until = 0.0

    async def version(self, name: str, ref: Any) -> Any:
        """The ModelVersion `name` points at (fresh within refresh_s, or the last known one while
        the registry is down); UnknownModel, RegistryError (the name's fault) or RegistryDown."""
        return await self._get(name, lambda: self._resolve(ref))

    async def served(self) -> list[str]:
        return await self._get("\0served", self.directory.served)

    def _resolve(self, ref: Any) -> Any:
        try:
            return self.directory.resolve(ref)
        except RegistryUnavailableError:
            raise
        except RegistryError:
            if not self.directory.exists(ref.model):
                raise UnknownModel(ref.model) from None
            raise

    async def _get(self, key: str, call: Callable[[], Any]) -> Any:
        when, value = self.known.get(key, (0.0, None))
        if value is not None and time.monotonic() - when <= self.refresh_s:
            return value
        if time.monotonic() < self.down_until:  # known down: don't queue behind hung calls
            return self._stale(value)
        try:
            return await asyncio.wait_for(asyncio.shield(self._start(key, call)), self.timeout_s)
        except (UnknownModel, RegistryError) as exc:
            if isinstance(exc, RegistryUnavailableError):
                return self._failed(value)
            raise
        except Exception:  # timeout, connection refused, a 5xx: the registry's fault, not the name's
            return self._failed(value)

    def _start(self, key: str, call: Callable[[], Any]) -> asyncio.Future:
        fut = self.inflight.get(key)
        if fut is None:
            fut = asyncio.get_running_loop().run_in_executor(self.pool, call)
            self.inflight[key] = fut
            fut.add_done_callback(lambda f: self._done(key, f))
        return fut

    def _done(self, key: str, fut: asyncio.Future) -> None:
        """Also for calls whose callers gave up: a late answer still refreshes the cache."""
        self.inflight.pop(key, None)
        if not fut.cancelled() and fut.exception() is None:
            self.known[key] = (time.monotonic(), fut.result())
            self.down_until = 0.0

    def _failed(self, value: Any) -> Any:
        self.down_until = time.monotonic() + self.retry_s
        return self._stale(value)

    def _stale(self, value: Any) -> Any:
        if value is None:
            raise RegistryDown(max(self.down_until - time.monotonic(), 1.0))
        return value
