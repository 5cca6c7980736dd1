"""The replica's batching core, without Ray Serve: one engine, adapters fetched on demand, and one
continuous batching loop that puts requests for *different* adapters into the same forward pass.

The engine (a `MultiLoraEngine`) and the fetcher (adapter name -> local peft folder) are
constructor arguments, as Ray Serve LLM injects its engine, so the loop, residency and eviction,
fair admission and fault handling are tested on a CPU without Serve (tests/test_replica.py);
`replica.BaseReplica` is the Serve deployment around it.

Threads: all engine work (admit, step, add, remove) runs on one engine thread, so an adapter
never changes under a running batch; fetches run on their own threads with a timeout, so a slow
registry never blocks the event loop nor the batch.

A batch is shared, a request is alone: a row whose request or step fails is ended with an error
and its batch mates go on; a caller that hangs up has its row dropped before the next step.

Replies. `tokens()` yields lists of token ids, then one final dict; `complete()` returns
`{"token_ids": [...], **final}`. The final dict is one of
    {"finish_reason": "stop" | "length"}
    {"finish_reason": "stop", "stop_text": "<the stop string that ended it>"}
    {"finish_reason": "error", "error": "<message>", "code": "invalid_request" | "server_error"}
"invalid_request" (answer 400): the request failed the engine's check before any work (bad
sampling values, an unknown adapter). "server_error" (answer 500): its row failed while decoding.
Token lists yielded before an error final dict are valid tokens of that request.
Loading an adapter raises instead (before any token): `RegistryUnavailableError` when the
fetcher timed out or could not reach the registry (answer 503), other `LorafleetError`s as the
fetcher raised them (`RegistryError` 404, `BaseMismatchError` 409, `ChecksumError`), the
engine's load errors for a malformed or unsupported adapter (`AdapterInvalidError`,
`AdapterNotSupportedError`: 4xx), and `AdapterSlotsFullError` when every engine slot stayed
held by adapters in use for fetch_timeout_s (overloaded: 503 with Retry-After).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import Counter
from collections.abc import AsyncIterator, Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lorafleet.errors import LorafleetError, RegistryUnavailableError
from lorafleet.serve.engine import AdapterSlotsFullError
from lorafleet.serve.fair import FairQueue, Tenant
from lorafleet.serve.residency import LoadedAdapter, Residency

log = logging.getLogger(__name__)
INVALID_REQUEST, SERVER_ERROR = "invalid_request", "server_error"
REGISTRY_TIMEOUT_S = 10.0
SLOT_POLL_S = 0.05
Fetcher = Callable[[str], Path]  # adapter name -> local folder; called on a fetch thread


def error_final(message: str, code: str) -> dict:
    return {"finish_reason": "error", "error": message, "code": code}


def _describe(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"


@dataclass(eq=False)
class Pending:
    request: Any  # GenerationRequest
    loop: asyncio.AbstractEventLoop
    tokens: asyncio.Queue = field(default_factory=asyncio.Queue)  # token ids, then a final dict
    gone: bool = False  # the caller left before the end (a closed stream): drop the row

    def put(self, item: int | dict) -> None:
        """From the engine thread: hand a token (or the final dict) to the request's event loop.
        Never raises: a caller whose loop is closed is gone."""
        if self.gone:
            return
        try:
            self.loop.call_soon_threadsafe(self.tokens.put_nowait, item)
        except RuntimeError:
            self.gone = True


class Batcher:
    """Continuous batching over an injected engine; adapters come from an injected fetcher.

    tenant_weights: rows a tenant takes per admission turn (default 1; request.tenant None is a
    tenant too). reserved_rows: rows that only tenants with no running row may take (a tenant
    that floods then holds at most max_batch_size - reserved_rows). on_load / on_evict: called
    after each adapter load / removal (metrics)."""

    def __init__(
        self,
        engine: Any,
        fetcher: Fetcher,
        *,
        max_batch_size: int = 16,
        batch_wait_timeout_s: float = 0.01,
        fetch_timeout_s: float = REGISTRY_TIMEOUT_S,
        tenant_weights: Mapping[Tenant, int] | None = None,
        reserved_rows: int = 0,
        fetch_threads: int = 4,
        on_load: Callable[[], None] = lambda: None,
        on_evict: Callable[[], None] = lambda: None,
    ):
        self.engine, self.fetcher = engine, fetcher
        self.max_batch_size, self.batch_wait_timeout_s = max_batch_size, batch_wait_timeout_s
        if not 0 <= reserved_rows < max_batch_size:
            raise ValueError(f"reserved_rows {reserved_rows} must be in [0, max_batch_size {max_batch_size})")
        self.fetch_timeout_s, self.reserved_rows = fetch_timeout_s, reserved_rows
        self.on_load, self.on_evict = on_load, on_evict
        self.worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="engine")
        self.fetch_pool = ThreadPoolExecutor(max_workers=fetch_threads, thread_name_prefix="fetch")
        self.residency = Residency()
        self.waiting = FairQueue(tenant_weights)
        self.arrived: asyncio.Event | None = None
        self.loop_task: asyncio.Task | None = None
        self.decoder = engine.decoder(lambda pending, token: pending.put(token))

    # ---- adapters ----------------------------------------------------------------------

    async def load(self, name: str) -> LoadedAdapter:
        """Registry -> local folder (off the event loop, with a timeout) -> engine slot.
        The adapter stays resident until the returned handle is released. With every slot
        held by adapters in use, waits up to fetch_timeout_s for running rows to free one, then
        raises AdapterSlotsFullError (the replica is overloaded: retry later)."""
        folder = await self._fetch(name)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.fetch_timeout_s
        while True:
            try:
                await self._add_resident(name, folder)
                break
            except AdapterSlotsFullError:
                if loop.time() > deadline:
                    raise
                await asyncio.sleep(SLOT_POLL_S)  # rows finishing free their adapters at each step
        self.on_load()
        return LoadedAdapter(self.residency, name)

    async def _add_resident(self, name: str, folder: Path) -> None:
        added = asyncio.get_running_loop().run_in_executor(self.worker, self._add, name, folder)
        try:
            await asyncio.shield(added)  # once added it is resident: a cancelled caller releases it
        except asyncio.CancelledError:
            added.add_done_callback(lambda job: self._unresident(job, name))
            raise

    def _unresident(self, added: asyncio.Future, name: str) -> None:
        if not added.cancelled() and added.exception() is None:
            self.residency.change(self.residency.resident, name, -1)

    async def _fetch(self, name: str) -> Path:
        job = asyncio.get_running_loop().run_in_executor(self.fetch_pool, self.fetcher, name)
        try:
            return await asyncio.wait_for(job, self.fetch_timeout_s)
        except TimeoutError:
            raise RegistryUnavailableError(
                f"the adapter registry did not answer within {self.fetch_timeout_s:g} s while "
                f"fetching '{name}': it is down or overloaded; retry later"
            ) from None
        except LorafleetError:
            raise
        except Exception as exc:
            if not _unreachable(exc):
                raise
            raise RegistryUnavailableError(
                f"the adapter registry could not be reached while fetching '{name}' "
                f"({_describe(exc).splitlines()[0][:300]}); retry later"
            ) from None

    def _add(self, name: str, folder: Path) -> None:
        """On the engine thread: free what may go, then fill a slot. Resident from here on, so
        a batch collecting between this and the LoadedAdapter's creation cannot remove it."""
        self._collect()
        self.residency.change(self.residency.resident, name, +1)
        try:
            self.engine.add_adapter(name, folder)
        except BaseException:
            self.residency.change(self.residency.resident, name, -1)
            raise

    def _collect(self) -> None:
        """On the engine thread: remove the adapters neither resident nor in use. A removal that
        fails is retried at the next collection; it never fails a request."""
        for name in self.residency.removable(self.engine.adapters()):
            try:
                self.engine.remove_adapter(name)
                self.on_evict()
            except Exception:
                log.exception("removing adapter %s failed; retrying at the next step", name)

    def loaded_adapters(self) -> list[str]:
        return self.engine.adapters()

    # ---- requests ----------------------------------------------------------------------

    async def tokens(self, request: Any) -> AsyncIterator[list[int] | dict]:
        """Stream one request: lists of token ids (whatever is ready when the caller asks), then
        the final dict. request.adapter must be loaded (load()) before iteration starts: the
        in-use mark below is taken before the first suspension, so nothing collects it between."""
        name = request.adapter
        if name:
            self.residency.change(self.residency.in_use, name, +1)
        pending = Pending(request, asyncio.get_running_loop())
        try:
            self._enqueue(pending)
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
            if name:
                self.residency.change(self.residency.in_use, name, -1)

    async def complete(self, request: Any) -> dict:
        """The whole answer: {"token_ids": [...], **final}."""
        token_ids: list[int] = []
        async with contextlib.aclosing(self.tokens(request)) as items:
            async for item in items:
                if isinstance(item, dict):
                    return {"token_ids": token_ids, **item}
                token_ids += item
        raise RuntimeError("the token stream ended without a final message")

    def _enqueue(self, pending: Pending) -> None:
        if self.loop_task is None:
            self.arrived = asyncio.Event()
            self.loop_task = asyncio.get_running_loop().create_task(self._batch_loop())
        request = pending.request
        self.waiting.put(getattr(request, "tenant", None), pending, getattr(request, "tenant_weight", None))
        self.arrived.set()

    # ---- the batching loop -------------------------------------------------------------

    async def _batch_loop(self) -> None:
        """Continuous batching: between two decode steps, waiting requests join the running
        batch (up to max_batch_size rows), taken round-robin across tenants. Each step is its own
        job on the engine thread, so an adapter load queued meanwhile runs between two steps."""
        loop = asyncio.get_running_loop()
        while True:
            new: list[Pending] = []
            try:
                if not self.decoder:
                    await self._first_arrivals()
                if self.decoder.accepting:
                    new = self._newcomers()
                await loop.run_in_executor(self.worker, self._step, new)
            except Exception as exc:  # never let the loop die: every later request would hang
                log.exception("batching loop step failed")
                self._fail(new + self._abort(), exc, SERVER_ERROR)
                await asyncio.sleep(0.05)  # an engine thread that is gone must not spin the loop

    def _newcomers(self) -> list[Pending]:
        """Free rows go first to tenants with no running row (one each, in turn), then
        round-robin to every tenant, less the reserved rows. Read between steps: the decoder's
        rows do not change meanwhile."""
        running = Counter(getattr(row.request, "tenant", None) for row in self.decoder.rows)
        room = self.max_batch_size - len(self.decoder)
        gone = lambda p: p.gone  # noqa: E731
        new: list[Pending] = []
        while len(new) < room and (got := self.waiting.take(1, gone, lambda t: running[t] == 0)):
            new += got
            running[getattr(got[0].request, "tenant", None)] += 1
        return new + self.waiting.take(room - len(new) - self.reserved_rows, drop=gone)

    async def _first_arrivals(self) -> None:
        """Idle: wait for a request, then up to batch_wait_timeout_s for company."""
        while not self.waiting:
            self.arrived.clear()
            await self.arrived.wait()
        deadline = asyncio.get_running_loop().time() + self.batch_wait_timeout_s
        while len(self.waiting) < self.max_batch_size:
            left = deadline - asyncio.get_running_loop().time()
            if left <= 0:
                return
            self.arrived.clear()
            try:
                await asyncio.wait_for(self.arrived.wait(), left)
            except TimeoutError:
                return

    def _step(self, new: list[Pending]) -> None:
        """On the engine thread: one decode step for the running rows, then admit newcomers.
        Rows whose caller left go first, then adapters nobody uses (never the other way round:
        a left row's adapter may already be marked unused)."""
        try:
            self.decoder.drop(lambda pending: pending.gone)
            self._collect()
            finished = self.decoder.step()  # per-row failures come back as rows with .error
        except Exception as exc:  # a broken step fails the running requests, not the replica
            log.exception("decode step failed")
            self._fail(self._abort(), exc, SERVER_ERROR)
            finished = []
        self._finish(finished)
        self._admit(new)

    def _abort(self) -> list[Pending]:
        """Every running row out of the batch (after an engine error): their callers, to be told."""
        rows = list(self.decoder.rows)  # read first: abort() may raise after clearing them
        try:
            self.decoder.abort()
        except Exception:
            log.exception("aborting the batch failed")
        return [row.key for row in rows]

    def _admit(self, new: list[Pending]) -> None:
        ok = []
        for p in (p for p in new if not p.gone):  # a bad request fails alone, before any work
            try:
                self.engine.check(p.request)
                ok.append(p)
            except Exception as exc:
                p.put(error_final(str(exc) or type(exc).__name__, INVALID_REQUEST))
        try:
            self._finish(self.decoder.admit([(p, p.request) for p in ok]))
        except Exception:  # a decoder that raised for the group: admit each alone, so it fails alone
            for p in ok:
                self._admit_alone(p)

    def _admit_alone(self, p: Pending) -> None:
        try:
            self._finish(self.decoder.admit([(p, p.request)]))
        except Exception as exc:
            p.put(error_final(_describe(exc), SERVER_ERROR))

    @staticmethod
    def _finish(rows: list[Any]) -> None:
        """Tell each caller how its row ended. A row that failed after passing the check failed
        while decoding: a server error (the decoder already kept it from its batch mates)."""
        for row in rows:
            if getattr(row, "error", None):
                row.key.put(error_final(row.error, SERVER_ERROR))
            elif getattr(row.result, "stop_text", None) is not None:
                row.key.put({"finish_reason": row.result.finish_reason, "stop_text": row.result.stop_text})
            else:
                row.key.put({"finish_reason": row.result.finish_reason})

    @staticmethod
    def _fail(pendings: list[Pending], exc: Exception, code: str) -> None:
        for p in pendings:
            p.put(error_final(_describe(exc), code))

    # ---- health and shutdown -----------------------------------------------------------

    def check_health(self) -> None:
        if self.worker._shutdown:
            raise RuntimeError("engine thread stopped")
        if self.loop_task is not None and self.loop_task.done():
            raise RuntimeError("the batching loop ended; requests would hang")

    def close(self) -> None:
        """Stop the loop and the threads (a replica is torn down with its process; tests call it)."""
        if self.loop_task is not None:
            self.loop_task.cancel()
        self.worker.shutdown(wait=True, cancel_futures=True)
        self.fetch_pool.shutdown(wait=False, cancel_futures=True)


def _unreachable(exc: BaseException) -> bool:
    """A failure to talk to the registry (network, HTTP, MLflow's client), as opposed to a bug:
    MLflow wraps connection errors in MlflowException("API request to ... failed ...")."""
    package = type(exc).__module__.split(".")[0]
    return isinstance(exc, OSError) or package in {"mlflow", "requests", "urllib3", "http"}
