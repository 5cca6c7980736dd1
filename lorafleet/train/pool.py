"""Warm slots kept between submissions. A fleet whose `packing.keep_warm_s` is above 0 leaves its
slots running when its jobs end: each waits that long, base loaded, for the next submission from
the same process with the same slot key (base, quantisation, slot size, K, storage). That submission takes
them over, so its first jobs start in well under a second instead of after a Ray Train run's
start-up (controller, worker process, imports of torch and transformers, the base load), which is
most of what a small job costs.

The pool is one resource-free actor per driver process, on the driver's node; the slots' Ray
Train runs are owned by that process too, so warm slots end with it (or when `release()` is
called, or when their wait runs out). Its bookkeeping per slot:
- the slot's current assignment (which submission's board it works for), which a restarted
  worker reads back, since its Ray Train config names the first submission only;
- the restarts its Ray Train run has left (FailureConfig is fixed when the run starts): a warm
  slot is only handed a submission whose jobs' crashes (max_failures + 1 each) its remaining
  restarts still cover, as a new slot's budget covers its first submission's.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from typing import Any

import ray
from pydantic import BaseModel, Field

from lorafleet.raystart import NAMESPACE, driver_node_affinity


class Assignment(BaseModel):
    """What a slot needs of the submission it works for (sent by the driver, through the pool)."""

    fleet_board: str
    submission: str = Field(description="the submission (and board) this slot works for")
    slots: int = Field(1, description="the submission's slots: each takes its share of the queue")
    storage: str = Field(description="where the submission keeps its jobs' checkpoints")
    keep_warm_s: float = Field(0.0, description="after the queue is empty: seconds to wait for another")
    crash_at_step: dict[str, int] = Field(
        default_factory=dict, description="tests: customer -> step at which its process dies (once)"
    )


class _Waiter:
    """One idle wait of a slot: how it ended decides what wait_for_work returns."""

    def __init__(self) -> None:
        self.event = asyncio.Event()
        self.outcome = "timed out"  # or "claimed", "released", "superseded"

    def end(self, outcome: str) -> None:
        self.outcome = outcome
        self.event.set()


@ray.remote(num_cpus=0)
class SlotPool:
    """The driver's slots: assignments, restart budgets, and which can take a new submission:
    those waiting idle, and those whose submission ended but that have not reached their wait yet
    (the driver returns as soon as the last job ends; the slot gets there a moment later)."""

    def __init__(self) -> None:
        self.work: dict[str, dict[str, Any]] = {}  # slot -> its current assignment (live slots only)
        self.keys: dict[str, str] = {}
        self.restarts_left: dict[str, int] = {}
        self.started: set[str] = set()  # slots whose worker began once (a later begin is a restart)
        self.ended: set[str] = set()  # submissions whose jobs all ended
        self.idle: dict[str, _Waiter] = {}  # slots waiting for a submission
        self.handed: set[str] = set()  # claimed before they reached their wait: they go on at once
        self.releasing: set[str] = set()  # released before they reached their wait: they end there

    async def add(self, slot: str, key: str, work: dict[str, Any], restarts: int) -> None:
        """A new slot run (not started yet) for a submission; Ray Train may restart it `restarts` times."""
        self.keys[slot], self.work[slot], self.restarts_left[slot] = key, work, restarts

    async def begin(self, slot: str) -> dict[str, Any] | None:
        """The slot's worker starts: its assignment, or None if it is to end. A start after the
        first is a restart: it spends one of the run's restarts, and a wait the dead worker left
        in here is over (its caller is gone)."""
        if slot in self.started:
            self.restarts_left[slot] = self.restarts_left.get(slot, 0) - 1
            if slot in self.idle:
                self.idle.pop(slot).end("superseded")
        self.started.add(slot)
        return self.work.get(slot)

    async def leave(self, slot: str) -> None:
        """The slot's worker returns for good (it broke, or its wait ended): never hand it work."""
        self.work.pop(slot, None)
        self.handed.discard(slot)
        self.releasing.discard(slot)

    async def finished(self, submission: str) -> None:
        """The driver saw every job of `submission` end: its warm slots may be handed on."""
        self.ended.add(submission)

    async def wait_for_work(self, slot: str, keep_warm_s: float) -> dict[str, Any] | None:
        """The slot's submission has no more jobs for it: its next assignment, after waiting up to
        keep_warm_s to be claimed; None: it is to end (released, or not claimed in time)."""
        if slot in self.handed:
            self.handed.discard(slot)
            return self.work.get(slot)
        if slot in self.releasing or slot not in self.work:
            return None
        self.idle[slot] = waiter = _Waiter()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(waiter.event.wait(), keep_warm_s)
        if waiter.outcome == "claimed":
            return self.work.get(slot)
        if self.idle.get(slot) is waiter:  # timed out: nobody else ended this wait
            del self.idle[slot]
        return None

    def _available(self, slot: str) -> bool:
        """Idle, or about to be: its submission ended, it keeps warm, nobody claimed or released it."""
        if slot in self.idle:
            return True
        work = self.work.get(slot)
        on_hold = slot in self.handed or slot in self.releasing
        return bool(work) and work["submission"] in self.ended and work["keep_warm_s"] > 0 and not on_hold

    async def claim(self, key: str, n: int, work: dict[str, Any], restarts_needed: int) -> list[str]:
        """Up to n available slots of `key` with the restarts a submission needs, now working for it."""
        picks = [
            s
            for s in self.work
            if self._available(s) and self.keys.get(s) == key and self.restarts_left[s] >= restarts_needed
        ][:n]
        for slot in picks:
            self.work[slot] = work
            if slot in self.idle:
                self.idle.pop(slot).end("claimed")
            else:
                self.handed.add(slot)
        return picks

    async def release(self, slots: list[str] | None = None) -> list[str]:
        """End the available slots (or these): they hold a worker's resources that the submission
        about to start (or anything else, e.g. serving) may need."""
        out = [s for s in self.work if self._available(s) or (slots is not None and s in slots)]
        for slot in out:
            if slot in self.idle:
                self.idle.pop(slot).end("released")
            else:
                self.releasing.add(slot)
        return out

    async def forget(self, slots: list[str]) -> None:
        """Slots whose runs ended."""
        for slot in slots:
            await self.leave(slot)
            if slot in self.idle:
                self.idle.pop(slot).end("released")

    async def idle_slots(self) -> list[str]:
        return sorted(self.idle)

    async def restarts(self, slot: str) -> int:
        return self.restarts_left.get(slot, 0)


def slot_key(config: dict[str, Any]) -> str:
    """What a warm slot must match to take a submission's jobs: the base copy it holds, how it is
    quantised, the resources its worker has, K, and the storage its Ray Train run reports its
    checkpoints to (a later fleet elsewhere may not keep the first one's folder)."""
    fields = ("base_model", "base_fingerprint", "quantization", "resources", "max_jobs", "k_from_memory")
    chosen = {f: config[f] for f in fields}
    chosen["resources"] = {k: chosen["resources"][k] for k in ("cpus_per_worker", "gpus_per_worker")}
    chosen["storage"] = config["work"]["storage"]
    return json.dumps(chosen, sort_keys=True)


class _DriverPool:
    """The driver's side of the pool: its actor and the refs of the slot runs it started (a ref
    stays with the process that made it; a later submission watches the slots it takes over)."""

    def __init__(self) -> None:
        self.session: tuple[str, str, str] | None = None  # (cluster address, job id, driver node)
        self.actor: Any = None
        self.refs: dict[str, Any] = {}  # slot -> its run's ref
        self.count = 0  # slots started in this Ray session: names are unique across submissions

    @property
    def name(self) -> str:
        return f"slot-pool-{self.session[1] if self.session else ''}"

    def get(self) -> Any:
        """The pool actor of this process's Ray session (a new one after ray.shutdown/init)."""
        if not self.active():
            self.session, self.refs, self.count = _session(), {}, 0
            self.actor = SlotPool.options(
                name=self.name, namespace=NAMESPACE, scheduling_strategy=driver_node_affinity()
            ).remote()
        return self.actor

    def active(self) -> bool:
        return ray.is_initialized() and self.session == _session()

    def new_name(self) -> str:
        name, self.count = f"slot{self.count}", self.count + 1
        return name

    def prune(self) -> None:
        """Forget slot runs that ended (their wait ran out, they were released, or they broke)."""
        if self.refs:
            refs = list(self.refs.values())
            done = set(ray.wait(refs, num_returns=len(refs), timeout=0)[0])
            self.forget([slot for slot, ref in self.refs.items() if ref in done])

    def forget(self, slots: list[str]) -> None:
        for slot in slots:
            self.refs.pop(slot, None)
        if slots and self.active():
            ray.get(self.actor.forget.remote(slots))


def _session() -> tuple[str, str, str]:
    """This driver's Ray session: job ids restart at 1 in every new cluster (a test's, a bench's),
    so the cluster's address and the driver node's id (random per node start) go with it."""
    ctx = ray.get_runtime_context()
    return ctx.gcs_address, ctx.get_job_id(), ctx.get_node_id()


POOL = _DriverPool()


def release() -> list[str]:
    """End this process's idle warm slots now (e.g. before serving on the same GPUs); returns them."""
    if not POOL.active():
        return []
    return ray.get(POOL.actor.release.remote())
