"""The base-model replica: one base, adapters loaded on demand through Ray Serve model
multiplexing (so requests go to replicas that already hold their adapter), and one batching
loop that puts requests for *different* adapters into the same forward pass, continuously: new
requests join the running batch between decode steps and finished ones leave it.

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

import ray
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


@dataclass(eq=False)
class Pending:
    request: Any  # GenerationRequest
    loop: asyncio.AbstractEventLoop
    tokens: asyncio.Queue = field(default_factory=asyncio.Queue)  # token ids, then a final dict
    gone: bool = False  # the caller left before the end (a closed stream): drop the row

    def put(self, item: int | dict) -> None:
        """From the engine thread: hand a token (or the final dict) to the request's event loop."""
        self.loop.call_soon_threadsafe(self.tokens.put_nowait, item)


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
            base_path,
            quantization=self.args.quantization,
            max_adapters=2 * self.args.max_adapters_per_replica,
            max_rank=self.args.max_rank,
        )
        self.worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="engine")
        self.residency = Residency()
        self.queue: asyncio.Queue[Pending] | None = None
        # which replica answered, on which node: sent back as the x-lorafleet-replica header
        node = ray.get_runtime_context().get_node_id()[:8]
        self.tag = f"{node}/{serve.get_replica_context().replica_id.unique_id}"
        self.decoder = self.engine.decoder(lambda pending, token: pending.put(token))
        self.loads = metrics.Counter("lorafleet_adapter_loads", "adapters loaded on this replica")
        self.evictions = metrics.Counter("lorafleet_adapter_evictions", "adapters evicted on this replica")

        async def load(model_id: str) -> LoadedAdapter:  # a plain function: Serve stores its LRU on it
            return await self._load(model_id)

        self.get_adapter = serve.multiplexed(max_num_models_per_replica=self.args.max_adapters_per_replica)(
            load
        )

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
        """Stream one request: lists of token ids (whatever is ready when the caller asks), then
        a dict with finish_reason or error. The adapter is the call's multiplexed id ('' = the base)."""
        async for item in self._tokens(request):
            yield item

    async def complete(self, request: Any) -> dict:
        """The whole answer in one reply, {"token_ids": [...], "finish_reason"|"error": ...}: a
        non-streaming request costs one message between replica and ingress, not one per token."""
        token_ids: list[int] = []
        async for item in self._tokens(request):
            if isinstance(item, dict):
                return {"token_ids": token_ids, "replica": self.tag, **item}
            token_ids += item
        raise RuntimeError("the token stream ended without a final message")

    async def _tokens(self, request: Any):
        model_id = serve.get_multiplexed_model_id()
        if model_id:
            await self.get_adapter(model_id)
            # no await between the load and this mark: the adapter cannot be collected in between
            self.residency.change(self.residency.in_use, model_id, +1)
        request.adapter = model_id or None
        pending = Pending(request, asyncio.get_running_loop())
        try:
            await self._enqueue(pending)
            while True:
                ready = [await pending.tokens.get()]
                while not pending.tokens.empty() and not isinstance(ready[-1], dict):
                    ready.append(pending.tokens.get_nowait())
                final = ready.pop() if isinstance(ready[-1], dict) else None
                if ready:
                    yield ready
                if final is not None:
                    yield final
                    return
        finally:
            # a caller that leaves early must not keep decoding, nor hold an adapter the replica
            # may free: the engine thread drops the row before its next step
            pending.gone = True
            if model_id:
                self.residency.change(self.residency.in_use, model_id, -1)

    async def _enqueue(self, pending: Pending) -> None:
        if self.queue is None:
            self.queue = asyncio.Queue()
            asyncio.get_running_loop().create_task(self._batch_loop())
        await self.queue.put(pending)

    async def _batch_loop(self) -> None:
        """Continuous batching: between two decode steps, waiting requests join the running
        batch (up to max_batch_size rows). Each step is its own job on the engine thread, so an
        adapter load queued meanwhile runs between two steps instead of after the whole batch."""
        loop = asyncio.get_running_loop()
        while True:
            new = [] if self.decoder else await self._first_arrivals()
            room = self.args.max_batch_size - len(self.decoder) - len(new)
            while room > 0 and self.decoder.accepting and not self.queue.empty():
                new.append(self.queue.get_nowait())
                room -= 1
            try:
                await loop.run_in_executor(self.worker, self._step, new)
            except Exception as exc:  # never let the loop die: every later request would hang
                self._fail(new, exc)

    async def _first_arrivals(self) -> list[Pending]:
        """Idle: wait for a request, then up to batch_wait_timeout_s for company."""
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
        return batch

    def _step(self, new: list[Pending]) -> None:
        """On the engine thread: one decode step for the running rows, then admit newcomers.
        Rows whose caller left go first, then adapters nobody uses (never the other way round:
        a left row's adapter may already be marked unused)."""
        try:
            self.decoder.drop(lambda pending: pending.gone)
            self._collect()
            finished = self.decoder.step()
        except Exception as exc:  # a broken step fails the running requests, not the replica
            self._fail([row.key for row in self.decoder.abort()], exc)
            finished = []
        for row in finished:
            row.key.put({"finish_reason": row.result.finish_reason})
        self._admit(new)

    def _admit(self, new: list[Pending]) -> None:
        ok = []
        for p in (p for p in new if not p.gone):  # a bad request fails alone, before any work
            try:
                self.engine.check(p.request)
                ok.append(p)
            except Exception as exc:
                p.put({"error": f"{type(exc).__name__}: {exc}"})
        try:
            for row in self.decoder.admit([(p, p.request) for p in ok]):
                row.key.put({"finish_reason": row.result.finish_reason})
        except Exception as exc:  # a failed prefill fails its newcomers; running rows go on
            self._fail(ok, exc)

    @staticmethod
    def _fail(pendings: list[Pending], exc: Exception) -> None:
        for p in pendings:
            p.put({"error": f"{type(exc).__name__}: {exc}"})

    def check_health(self) -> None:
        if self.worker._shutdown:
            raise RuntimeError("engine thread stopped")
