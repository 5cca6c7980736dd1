"""The base-model replica: the Ray Serve deployment around `batcher.Batcher`. It builds the real
engine (one base) and the registry fetcher, and routes requests with Serve's model multiplexing
(so requests go to replicas that already hold their adapter); batching, residency, fair
admission and fault handling live in the Batcher, tested without Serve.

Serve's own `@serve.batch` splits batches by multiplexed id, so the adapter travels with each
call instead and the Batcher's loop batches across adapters.

What the ingress gets (see `batcher` for the details):
- `generate(request)` streams lists of token ids, then one final dict;
- `complete(request)` returns `{"token_ids": [...], "replica": "<node>/<replica>", **final}`;
- final is `{"finish_reason": "stop" | "length"}` or, on error,
  `{"finish_reason": "error", "error": "<message>", "code": "invalid_request" | "server_error"}`
  (invalid_request -> 400, server_error -> 500);
- loading the adapter raises before any token: `RegistryUnavailableError` (503: the registry
  timed out or is unreachable), `RegistryError` (404), `BaseMismatchError` (409), the engine's
  load errors for a malformed adapter (`AdapterInvalidError` / `AdapterNotSupportedError`, 4xx),
  `AdapterSlotsFullError` (503: every slot held by adapters in use; retry later).
"""

from __future__ import annotations

import contextlib
import math
import os
from pathlib import Path
from typing import Any

import ray
from ray import serve
from ray.serve import metrics

from lorafleet.serve.batcher import REGISTRY_TIMEOUT_S, Batcher
from lorafleet.serve.config import AppArgs


def fail_fast_mlflow(timeout_s: float) -> None:
    """MLflow retries a failed HTTP call 7 times with exponential backoff and waits 120 s per
    call by default: against a dead registry one fetch would take minutes. One retry and a
    timeout of the replica's own bound make it fail inside the fetch timeout. An operator's
    explicit setting wins."""
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "1")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "0")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", str(max(1, math.ceil(timeout_s))))


class BaseReplica:
    def __init__(self, args: dict[str, Any]):
        self.args = AppArgs.model_validate(args)
        if self.args.tracking_uri:
            os.environ["MLFLOW_TRACKING_URI"] = self.args.tracking_uri
        timeout_s = float(getattr(self.args, "registry_timeout_s", REGISTRY_TIMEOUT_S))
        fail_fast_mlflow(timeout_s)
        from lorafleet.models import fingerprint, resolve_base
        from lorafleet.serve.engine import GatheredLoraEngine

        base_path = resolve_base(self.args.base_model)
        self.base_fingerprint = fingerprint(base_path)
        # slots beyond the LRU size absorb adapters evicted while requests still use them
        engine = GatheredLoraEngine.from_pretrained(
            base_path,
            quantization=self.args.quantization,
            max_adapters=2 * self.args.max_adapters_per_replica,
            max_rank=self.args.max_rank,
        )
        loads = metrics.Counter("lorafleet_adapter_loads", "adapters loaded on this replica")
        evictions = metrics.Counter("lorafleet_adapter_evictions", "adapters evicted on this replica")
        self.core = Batcher(
            engine,
            self._fetch,
            max_batch_size=self.args.max_batch_size,
            batch_wait_timeout_s=self.args.batch_wait_timeout_s,
            fetch_timeout_s=timeout_s,
            tenant_weights=getattr(self.args, "tenant_weights", None),
            reserved_rows=self.args.reserved_rows,
            on_load=loads.inc,
            on_evict=evictions.inc,
        )
        # which replica answered, on which node: sent back as the x-lorafleet-replica header
        node = ray.get_runtime_context().get_node_id()[:8]
        self.tag = f"{node}/{serve.get_replica_context().replica_id.unique_id}"

        async def load(model_id: str) -> Any:  # a plain function: Serve stores its LRU on it
            return await self.core.load(model_id)

        self.get_adapter = serve.multiplexed(max_num_models_per_replica=self.args.max_adapters_per_replica)(
            load
        )

    def _fetch(self, model_id: str) -> Path:
        """On a fetch thread: registry -> verified local folder, refused if of another base."""
        from lorafleet import registry, tracking

        adapter = registry.fetch(tracking.client(), model_id)
        registry.check_base(adapter, self.base_fingerprint, self.args.display_base_name())
        return adapter.path

    def loaded_adapters(self) -> list[str]:
        return self.core.loaded_adapters()

    # ---- requests ----------------------------------------------------------------------

    async def generate(self, request: Any):
        """Stream one request: lists of token ids, then the final dict. The adapter is the call's
        multiplexed id ('' = the base)."""
        await self._route(request)
        async with contextlib.aclosing(self.core.tokens(request)) as items:
            async for item in items:
                yield item

    async def complete(self, request: Any) -> dict:
        """The whole answer in one reply: a non-streaming request costs one message between
        replica and ingress, not one per token."""
        await self._route(request)
        return {**await self.core.complete(request), "replica": self.tag}

    async def _route(self, request: Any) -> None:
        """Load the call's adapter (Serve's LRU); the Batcher marks it in use when the request's
        stream starts, with no suspension in between, so it cannot be collected meanwhile."""
        model_id = serve.get_multiplexed_model_id()
        if model_id:
            await self.get_adapter(model_id)
        request.adapter = model_id or None

    def check_health(self) -> None:
        self.core.check_health()
