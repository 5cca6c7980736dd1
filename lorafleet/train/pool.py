"""Warm slots kept between submissions. A fleet whose `packing.keep_warm_s` is above 0 leaves its
slots running when its jobs end: each waits that long, base loaded, for the next submission on
the same Ray cluster with the same slot key (base, quantisation, slot size, K, storage), from this
process or another `lorafleet submit` joining the cluster. That submission takes them over, so
its first jobs start in well under a second instead of after a Ray Train run's start-up
(controller, worker process, imports of torch and transformers, the base load), which is most of
what a small job costs.

The pool is one detached, resource-free actor per cluster; the slots' Ray Train runs are driven
by another (`lorafleet.train.slot.SlotHosts`, a thread per run), so a warm slot outlives the
process that started it and ends when its wait runs out, when `release()` is called, or with the
cluster. Its bookkeeping per slot:
- the slot's current assignment (which submission's board it works for), which a restarted
  worker reads back, since its Ray Train config names the first submission only;
- the restarts its Ray Train run has left (FailureConfig is fixed when the run starts): a warm
  slot is only handed a submission whose jobs' crashes (max_failures + 1 each) its remaining
  restarts still cover, as a new slot's budget covers its first submission's;
- how each slot's run ended (the host reports it), for the submission watching it.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import uuid
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


POOL_NAME = "slot-pool-v2"  # the version of its protocol: a cluster may outlive a lorafleet upgrade
MAX_RUN_ENDS = 1000  # how many ended slot runs the pool remembers (a long-lived cluster's pool)


@ray.remote(num_cpus=0)
class SlotPool:
    """The cluster's slots: assignments, restart budgets, and which can take a new submission:
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
        self.run_ends: dict[str, str | None] = {}  # slot -> how its run ended (None: cleanly)

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
            await self.leave(slot)
            return None
        self.idle[slot] = waiter = _Waiter()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(waiter.event.wait(), keep_warm_s)
        if waiter.outcome == "claimed":
            return self.work.get(slot)
        if self.idle.get(slot) is waiter:  # timed out: nobody else ended this wait
            del self.idle[slot]
        if waiter.outcome != "superseded":  # its restarted worker lives on; any other end is final
            await self.leave(slot)  # now, not when the worker says so: a claim in between was lost
        return None

    def _available(self, slot: str) -> bool:
        """Idle, or about to be: its submission ended, it keeps warm, nobody claimed or released it."""
        if slot in self.idle:
            return True
        work = self.work.get(slot)
        on_hold = slot in self.handed or slot in self.releasing
        return bool(work) and work["submission"] in self.ended and work["keep_warm_s"] > 0 and not on_hold

    def _claimable(self, key: str, restarts_needed: int) -> list[str]:
        return [
            s
            for s in self.work
            if self._available(s) and self.keys.get(s) == key and self.restarts_left[s] >= restarts_needed
        ]

    async def available(self, key: str, restarts_needed: int) -> int:
        """How many slots a claim(key, ..., restarts_needed) could take now (nothing is claimed)."""
        return len(self._claimable(key, restarts_needed))

    async def claim(self, key: str, n: int, work: dict[str, Any], restarts_needed: int) -> list[str]:
        """Up to n available slots of `key` with the restarts a submission needs, now working for it."""
        picks = self._claimable(key, restarts_needed)[:n]
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

    async def run_ended(self, slot: str, error: str | None) -> None:
        """The slot's Ray Train run is over (the slot hosts report it): never hand it work again."""
        await self.leave(slot)
        if slot in self.idle:
            self.idle.pop(slot).end("released")
        for table in (self.keys, self.restarts_left):  # a long-lived cluster's pool sees many slots
            table.pop(slot, None)
        self.started.discard(slot)
        self.run_ends[slot] = error
        while len(self.run_ends) > MAX_RUN_ENDS:
            self.run_ends.pop(next(iter(self.run_ends)))

    async def ended_runs(self) -> dict[str, str | None]:
        return dict(self.run_ends)

    async def describe(self) -> list[dict[str, Any]]:
        """The live slots: which submission each works for, whether it waits idle, its base."""
        rows = []
        for slot, work in sorted(self.work.items()):
            state = "idle" if slot in self.idle else "kept" if self._available(slot) else "working"
            rows.append(
                {
                    "slot": slot,
                    "state": state,
                    "base_model": json.loads(self.keys[slot])["base_model"],
                    "fleet_board": work["fleet_board"],
                    "keep_warm_s": work["keep_warm_s"],
                    "restarts_left": self.restarts_left.get(slot, 0),
                }
            )
        return rows

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


def pool() -> Any:
    """The cluster's pool actor; the first submission that needs it starts it, on its node."""
    return SlotPool.options(
        name=POOL_NAME,
        namespace=NAMESPACE,
        lifetime="detached",
        get_if_exists=True,
        scheduling_strategy=driver_node_affinity(),
    ).remote()


def new_slot_name() -> str:
    """Unique on the cluster: slots from every process share one pool."""
    return f"slot-{uuid.uuid4().hex[:8]}"


def existing_pool() -> Any:
    """The cluster's pool actor, or None (Ray is not up, or no submission started slots on it)."""
    if not ray.is_initialized():
        return None
    try:
        return ray.get_actor(POOL_NAME, namespace=NAMESPACE)
    except ValueError:
        return None


def release() -> list[str]:
    """End the cluster's idle warm slots now (e.g. before serving on the same GPUs); returns them."""
    actor = existing_pool()
    return ray.get(actor.release.remote()) if actor else []


def live_slots() -> list[dict[str, Any]]:
    """The cluster's live slots (`SlotPool.describe`), for `lorafleet slots`."""
    actor = existing_pool()
    return ray.get(actor.describe.remote()) if actor else []
