"""Warm slots kept between submissions. A fleet whose `packing.keep_warm_s` is above 0 leaves its
slots running when its jobs end: each waits that long, base loaded, for the next submission from
the same process with the same slot key (base, quantisation, slot size, K). That submission takes
them over, so its first jobs start in well under a second instead of after a Ray Train run's
start-up (controller, worker process, imports of torch and transformers, the base load), which is
most of what a small job costs.

The pool is one resource-free actor per driver process, on the driver's node; the slots' Ray
Train runs are owned by that process too, so warm slots end with it (or when `release()` is
called, or when their wait runs out). Its bookkeeping per slot:
- the slot's current assignment (which submission's board it works for), which a restarted
  worker reads back, since its Ray Train config names the first submission only;
- the restarts its Ray Train run has left (FailureConfig is fixed when the run starts): a warm
  slot is only handed a submission whose jobs cannot, crashing each past its max_failures,
  exhaust them, so Ray Train's bound still never decides a job's fate.
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


@ray.remote(num_cpus=0)
class SlotPool:
    """The driver's slots: assignments, restart budgets, and the idle ones waiting for work."""

    def __init__(self) -> None:
        self.work: dict[str, dict[str, Any]] = {}  # slot -> its current assignment
        self.restarts_left: dict[str, int] = {}
        self.started: set[str] = set()  # slots whose worker began once (a later begin is a restart)
        self.idle: dict[str, str] = {}  # slot -> its key, while it waits for a submission
        self.wakeup: dict[str, asyncio.Event] = {}

    async def add(self, slot: str, work: dict[str, Any], restarts: int) -> None:
        """A new slot run (not started yet) for a submission; Ray Train may restart it `restarts` times."""
        self.work[slot], self.restarts_left[slot] = work, restarts

    async def begin(self, slot: str) -> dict[str, Any] | None:
        """The slot's worker starts: its assignment, or None if it is to end. A start after the
        first is a restart, and spends one of the run's restarts."""
        if slot in self.started:
            self.restarts_left[slot] = self.restarts_left.get(slot, 0) - 1
        self.started.add(slot)
        return self.work.get(slot)

    async def wait_for_work(self, slot: str, key: str, keep_warm_s: float) -> dict[str, Any] | None:
        """An idle slot waits up to keep_warm_s to be claimed; None: it is to end (released or
        not claimed in time). Either way it leaves the idle set here, so a claim never races it."""
        self.idle[slot] = key
        self.wakeup[slot] = event = asyncio.Event()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(event.wait(), keep_warm_s)
        self.wakeup.pop(slot, None)
        if self.idle.pop(slot, None) is not None:  # nobody claimed it: it ends
            self.work.pop(slot, None)
            return None
        return self.work.get(slot)

    async def claim(self, key: str, n: int, work: dict[str, Any], restarts_needed: int) -> list[str]:
        """Up to n idle slots of `key` with the restarts a submission needs, now working for it."""
        picks = [s for s, k in self.idle.items() if k == key and self.restarts_left[s] >= restarts_needed]
        for slot in picks[:n]:
            del self.idle[slot]
            self.work[slot] = work
            self.wakeup[slot].set()
        return picks[:n]

    async def release(self, keep_key: str | None = None) -> list[str]:
        """End the idle slots (all, or those of other keys than `keep_key`): they hold a worker's
        resources that the submission about to start (or anything else) may need."""
        out = [s for s, k in self.idle.items() if k != keep_key]
        for slot in out:
            self.wakeup[slot].set()  # still in idle: wait_for_work returns None
        return out

    async def forget(self, slots: list[str]) -> None:
        """Slots whose runs ended or were cancelled."""
        for slot in slots:
            self.work.pop(slot, None)
            self.idle.pop(slot, None)

    async def idle_slots(self) -> dict[str, str]:
        return dict(self.idle)


def slot_key(config: dict[str, Any]) -> str:
    """What a warm slot must match to take a submission's jobs: the base copy it holds, how it is
    quantised, the resources its worker has, and K."""
    fields = ("base_model", "base_fingerprint", "quantization", "resources", "max_jobs", "k_from_memory")
    chosen = {f: config[f] for f in fields}
    chosen["resources"] = {k: chosen["resources"][k] for k in ("cpus_per_worker", "gpus_per_worker")}
    return json.dumps(chosen, sort_keys=True)


class _DriverPool:
    """The driver's side of the pool: its actor and the refs of the slot runs it started (a ref
    stays with the process that made it; a later submission watches the slots it takes over)."""

    def __init__(self) -> None:
        self.job_id: str | None = None
        self.actor: Any = None
        self.refs: dict[str, Any] = {}  # slot -> its run's ref
        self.count = 0  # slots started in this Ray session: names are unique across submissions

    @property
    def name(self) -> str:
        return f"slot-pool-{self.job_id}"

    def get(self) -> Any:
        """The pool actor of this process's Ray session (a new one after ray.shutdown/init)."""
        job_id = ray.get_runtime_context().get_job_id()
        if job_id != self.job_id:
            self.job_id, self.refs, self.count = job_id, {}, 0
            self.actor = SlotPool.options(
                name=self.name, namespace=NAMESPACE, scheduling_strategy=driver_node_affinity()
            ).remote()
        return self.actor

    def active(self) -> bool:
        return ray.is_initialized() and self.job_id == ray.get_runtime_context().get_job_id()

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
            self.actor.forget.remote(slots)


POOL = _DriverPool()


def release() -> list[str]:
    """End this process's idle warm slots now (e.g. before serving on the same GPUs); returns them."""
    if not POOL.active():
        return []
    return ray.get(POOL.actor.release.remote())
