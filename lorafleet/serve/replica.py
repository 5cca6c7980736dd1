"""The base-model replica: one base, adapters loaded on demand through Ray Serve model
multiplexing (so requests go to replicas that already hold their adapter), and one batching
loop that puts requests for *different* adapters into the same forward pass.

Serve's own `@serve.batch` splits batches by multiplexed id, so the adapter travels with each
call instead and the loop below batches across adapters. All engine work (generate, add,
remove) runs on one thread, so an adapter never changes under a running batch.
"""

from __future__ import annotations

import asyncio
import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from ray import serve
from ray.serve.metrics import Counter

from lorafleet.serve.config import AppArgs


class LoadedAdapter:
    """What the multiplex LRU holds. Serve calls __del__ on eviction; the engine slot is freed
    once no queued or running request still uses it."""

    def __init__(self, replica: BaseReplica, name: str):
        self.replica, self.name = replica, name
        self.users = 0
        self.evicted = False
        self.lock = threading.Lock()

    def acquire(self) -> None:
        with self.lock:
            self.users += 1

    def release(self) -> None:
        with self.lock:
            self.users -= 1
            free = self.evicted and self.users == 0
        if free:
            self.replica.remove_adapter(self.name)

    def __del__(self) -> None:  # called by Serve's LRU, and again by the GC: act once
        with self.lock:
            if self.evicted:
                return
            self.evicted = True
            free = self.users == 0
        if free:
            self.replica.remove_adapter(self.name)


@dataclass
class Pending:
    request: Any  # GenerationRequest
    loop: asyncio.AbstractEventLoop
    tokens: asyncio.Queue = field(default_factory=asyncio.Queue)  # token ids, then a final dict


class BaseReplica:
    def __init__(self, args: dict[str, Any]):
        self.args = AppArgs.model_validate(args)
        if self.args.tracking_uri:
            os.environ["MLFLOW_TRACKING_URI"] = self.args.tracking_uri
        from lorafleet.models import fingerprint, resolve_base
        from lorafleet.serve.engine import GatheredLoraEngine

        base_path = resolve_base(self.args.base_model)
        self.base_fingerprint = fingerprint(base_path)
        # slots beyond the LRU size absorb adapters evicted while requests still use them
        self.engine = GatheredLoraEngine.from_pretrained(
            base_path, quantization=self.args.quantization,
            max_adapters=2 * self.args.max_adapters_per_replica)
        self.worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="engine")
        self.queue: asyncio.Queue[Pending] | None = None
        self.loads = Counter("lorafleet_adapter_loads", "adapters loaded on this replica")
        self.evictions = Counter("lorafleet_adapter_evictions", "adapters evicted on this replica")
        async def load(model_id: str) -> LoadedAdapter:  # a plain function: Serve stores its LRU on it
            return await self._load(model_id)

        self.get_adapter = serve.multiplexed(
            max_num_models_per_replica=self.args.max_adapters_per_replica)(load)

    async def _load(self, model_id: str) -> LoadedAdapter:
        """Registry -> verified local folder -> checked base -> engine slot."""
        from lorafleet import registry, tracking

        c = tracking.client()
        adapter = await asyncio.to_thread(registry.fetch, c, model_id)
        registry.check_base(adapter, self.base_fingerprint, self.args.display_base_name())
        await asyncio.get_running_loop().run_in_executor(
            self.worker, self.engine.add_adapter, model_id, adapter.path)
        self.loads.inc()
        return LoadedAdapter(self, model_id)

    def remove_adapter(self, name: str) -> None:
        self.evictions.inc()
        self.worker.submit(self.engine.remove_adapter, name)

    def loaded_adapters(self) -> list[str]:
        return self.engine.adapters()

    # ---- requests ----------------------------------------------------------------------

    async def generate(self, request: Any):
        """Stream one request's token ids, then a dict with finish_reason. The adapter is the
        call's multiplexed id ('' = the base)."""
        model_id = serve.get_multiplexed_model_id()
        adapter = await self.get_adapter(model_id) if model_id else None
        request.adapter = model_id or None
        if adapter is not None:
            adapter.acquire()
        try:
            pending = Pending(request, asyncio.get_running_loop())
            await self._enqueue(pending)
            while True:
                item = await pending.tokens.get()
                yield item
                if isinstance(item, dict):
                    return
        finally:
            if adapter is not None:
                adapter.release()

    async def _enqueue(self, pending: Pending) -> None:
        if self.queue is None:
            self.queue = asyncio.Queue()
            asyncio.get_running_loop().create_task(self._batch_loop())
        await self.queue.put(pending)

    async def _batch_loop(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            batch = [await self.queue.get()]
            deadline = time.monotonic() + self.args.batch_wait_timeout_s
            while len(batch) < self.args.max_batch_size:
                timeout = deadline - time.monotonic()
                if timeout <= 0 and self.queue.empty():
                    break
                try:
                    batch.append(await asyncio.wait_for(self.queue.get(), max(timeout, 0)))
                except TimeoutError:
                    break
            await loop.run_in_executor(self.worker, self._run_batch, batch)

    def _run_batch(self, batch: list[Pending]) -> None:
        """On the engine thread: one mixed-adapter generate; tokens stream back as they come."""
        def on_token(i: int, token: int) -> None:
            p = batch[i]
            p.loop.call_soon_threadsafe(p.tokens.put_nowait, token)

        try:
            results = self.engine.generate([p.request for p in batch], on_token=on_token)
            finals = [{"finish_reason": r.finish_reason} for r in results]
        except Exception as exc:  # a broken batch fails its requests, not the replica
            finals = [{"error": f"{type(exc).__name__}: {exc}"} for _ in batch]
        for p, final in zip(batch, finals, strict=True):
            p.loop.call_soon_threadsafe(p.tokens.put_nowait, final)

    def check_health(self) -> None:
        if self.worker._shutdown:
            raise RuntimeError("engine thread stopped")
