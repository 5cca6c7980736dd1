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
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from ray import serve
from ray.serve import metrics

from lorafleet.serve.config import AppArgs


class Residency:
    """Which adapters may leave the engine. Serve's LRU says what is resident (a live
    LoadedAdapter); requests say what is in use. An adapter is removed, on the engine thread,
    only when it is neither: eviction never pulls weights from under a queued request, and a
    reload of the same name never loses its slot to an older eviction."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.resident: Counter[str] = Counter()
        self.in_use: Counter[str] = Counter()

    def change(self, counter: Counter[str], name: str, delta: int) -> None:
        with self.lock:
            counter[name] += delta

    def removable(self, loaded: list[str]) -> list[str]:
        with self.lock:
            return [n for n in loaded if self.resident[n] <= 0 and self.in_use[n] <= 0]


class LoadedAdapter:
    """What the multiplex LRU holds; Serve calls __del__ on eviction (and the GC again later)."""

    def __init__(self, residency: Residency, name: str):  # counted resident by BaseReplica._add
        self.residency, self.name, self.evicted = residency, name, False

    def __del__(self) -> None:
        if not self.evicted:
            self.evicted = True
            self.residency.change(self.residency.resident, self.name, -1)


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
        self.residency = Residency()
        self.queue: asyncio.Queue[Pending] | None = None
        self.loads = metrics.Counter("lorafleet_adapter_loads", "adapters loaded on this replica")
        self.evictions = metrics.Counter("lorafleet_adapter_evictions", "adapters evicted on this replica")
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
        await asyncio.get_running_loop().run_in_executor(self.worker, self._add, model_id, adapter.path)
        self.loads.inc()
        return LoadedAdapter(self.residency, model_id)

    def _add(self, name: str, folder: Any) -> None:
        """On the engine thread: free what may go, then fill a slot. Resident from here on, so
        a batch collecting between this and the LoadedAdapter's creation cannot remove it."""
        self._collect()
        self.residency.change(self.residency.resident, name, +1)
        try:
            self.engine.add_adapter(name, folder)
        except Exception:
            self.residency.change(self.residency.resident, name, -1)
            raise

    def _collect(self) -> None:
        for name in self.residency.removable(self.engine.adapters()):
            self.engine.remove_adapter(name)
            self.evictions.inc()

    def loaded_adapters(self) -> list[str]:
        return self.engine.adapters()

    # ---- requests ----------------------------------------------------------------------

    async def generate(self, request: Any):
        """Stream one request's token ids, then a dict with finish_reason. The adapter is the
        call's multiplexed id ('' = the base)."""
        model_id = serve.get_multiplexed_model_id()
        if model_id:
            await self.get_adapter(model_id)
            # no await between the load and this mark: the adapter cannot be collected in between
            self.residency.change(self.residency.in_use, model_id, +1)
        request.adapter = model_id or None
        try:
            pending = Pending(request, asyncio.get_running_loop())
            await self._enqueue(pending)
            while True:
                item = await pending.tokens.get()
                yield item
                if isinstance(item, dict):
                    return
        finally:
            if model_id:
                self.residency.change(self.residency.in_use, model_id, -1)

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
            self._collect()
            results = self.engine.generate([p.request for p in batch], on_token=on_token)
            finals = [{"finish_reason": r.finish_reason} for r in results]
        except Exception as exc:  # a broken batch fails its requests, not the replica
            finals = [{"error": f"{type(exc).__name__}: {exc}"} for _ in batch]
        for p, final in zip(batch, finals, strict=True):
            p.loop.call_soon_threadsafe(p.tokens.put_nowait, final)

    def check_health(self) -> None:
        if self.worker._shutdown:
            raise RuntimeError("engine thread stopped")
