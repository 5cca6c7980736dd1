"""Live job progress: workers push trainer log events to one Ray actor per fleet; the driver
reads it for the progress table and copies the events into MLflow. The actor also carries
cancellation requests, so `lorafleet cancel` works from another terminal, and the queue of jobs
the fleet's warm slots take their work from (`lorafleet.train.slot`)."""

from __future__ import annotations

from typing import Any

import ray

from lorafleet.raystart import NAMESPACE

__all__ = ["NAMESPACE", "InjectedFault", "JobCancelled", "ProgressBoard", "board_name"]


class JobCancelled(RuntimeError):
    """Raised inside a worker when its job was cancelled; the runner records state 'cancelled'."""


class InjectedFault(RuntimeError):
    """Raised at a chosen step to test resume (the same path as a crash or a lost node)."""


@ray.remote(num_cpus=0)
class ProgressBoard:
    def __init__(self, submission: str = "") -> None:
        self.submission = submission  # a slot of an earlier submission of the fleet must not work here
        self.jobs: dict[str, dict[str, Any]] = {}
        self.pending: dict[str, list[dict[str, Any]]] = {}
        self.cancelled: set[str] = set()
        self.queue: list[tuple[str, dict[str, Any]]] = []  # slot jobs not yet taken: (customer, plan)
        self.sealed = False  # the driver planned every job: an empty queue stays empty
        self.taken: dict[str, str] = {}  # customer -> slot that took it
        self.ended: dict[str, dict[str, Any]] = {}  # slot jobs' ends, until the driver takes them
        self.slot_failures: dict[str, str] = {}  # slot -> why it stopped taking jobs
        self.plans: dict[str, dict[str, Any]] = {}  # taken slot jobs' plans
        self.done: set[str] = set()  # slot jobs that ended
        self.crashes: dict[str, int] = {}  # slot job -> deaths of processes it trained alone in
        self.deaths: dict[str, int] = {}  # slot job -> deaths of processes training it
        self.training: dict[str, list[str]] = {}  # slot -> the jobs its process trains now

    def update(self, customer: str, **fields: Any) -> None:
        self.jobs.setdefault(customer, {}).update(fields)

    def begin_attempt(self, customer: str, **fields: Any) -> None:
        """A worker group was placed (first run or a restart after a failure): attempts are kept
        as a list so a restart on another node does not hide where the job ran before."""
        job = self.jobs.setdefault(customer, {})
        job.setdefault("attempts", []).append(dict(fields))

    def attempt_started(self, customer: str, **fields: Any) -> None:
        """Training began in the latest attempt (a new one if nobody announced the placement)."""
        job = self.jobs.setdefault(customer, {})
        attempts = job.setdefault("attempts", [])
        if not attempts or "started" in attempts[-1]:
            attempts.append({})
        attempts[-1].update(fields)
        job.update(fields)

    def end_attempt(self, customer: str, ended: float) -> None:
        attempts = self.jobs.get(customer, {}).get("attempts")
        if attempts:
            attempts[-1]["ended"] = ended

    def log(self, customer: str, event: dict[str, Any]) -> None:
        self.pending.setdefault(customer, []).append(event)
        numeric = {k: v for k, v in event.items() if isinstance(v, int | float)}
        self.update(customer, **numeric)

    def snapshot(self) -> dict[str, dict[str, Any]]:
        return {k: _copy_job(v) for k, v in self.jobs.items()}

    def drain(self) -> dict[str, list[dict[str, Any]]]:
        out, self.pending = self.pending, {}
        return out

    def submission_id(self) -> str:
        return self.submission

    def cancel(self, customer: str | None = None) -> None:
        """A queued slot job ends here at once; a training one stops itself at its next step."""
        self.cancelled.add(customer or "*")
        for cust, _ in [q for q in self.queue if self.is_cancelled(q[0])]:
            self.finish(cust, _cancelled(cust))
        self.queue = [q for q in self.queue if not self.is_cancelled(q[0])]

    # ---- the warm slots' queue ----

    def enqueue(self, plans: list[dict[str, Any]]) -> None:
        """Jobs as the driver plans them; one already cancelled (cancel all) ends here at once."""
        for plan in plans:
            customer = plan["job"]["customer"]
            if self.is_cancelled(customer):
                self.finish(customer, _cancelled(customer))
            else:
                self.queue.append((customer, plan))

    def seal(self) -> None:
        self.sealed = True

    def queue_open(self) -> bool:
        """More jobs may be taken: some are queued, or the driver may still add some."""
        return bool(self.queue) or not self.sealed

    def take(self, slot: str, n: int, slots: int) -> list[dict[str, Any]]:
        """Up to n queued plans, in fleet-file order, for `slot` to train; a slot holds at most its
        share (the unfinished jobs over the fleet's slots), so work spreads over the slots (and
        their GPUs) instead of piling into the first one started."""
        unfinished = len(self.queue) + len([c for c in self.taken if c not in self.done])
        n = min(n, max(0, -(-unfinished // slots) - len(self._held(slot))))
        taken, self.queue = self.queue[:n], self.queue[n:]
        for cust, plan in taken:
            self.taken[cust] = slot
            self.plans[cust] = plan
        return [plan for _, plan in taken]

    def set_training(self, slot: str, customers: list[str]) -> None:
        """The jobs `slot`'s process trains right now (a crash is blamed on these)."""
        self.training[slot] = list(customers)

    def in_flight(self, slot: str) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
        """Plans `slot` took and did not finish, after a restart: (those its dead process was
        training, those waiting in it for their turn)."""
        held = self._held(slot)
        training = [c for c in self.training.get(slot, []) if c in held]
        return [self.plans[c] for c in training], [self.plans[c] for c in held if c not in training]

    def record_death(self, customer: str, alone: bool) -> int:
        """A process that was training this job died; it is to blame only if it trained alone.
        Returns the deaths blamed on the job so far."""
        self.deaths[customer] = self.deaths.get(customer, 0) + 1
        if alone:
            self.crashes[customer] = self.crashes.get(customer, 0) + 1
        return self.crashes.get(customer, 0)

    def death_count(self, customer: str) -> int:
        return self.deaths.get(customer, 0)

    def finish(self, customer: str, end: dict[str, Any]) -> None:
        """A slot job's end (a JobEnd's fields), kept until the driver takes it."""
        self.ended[customer] = end
        self.done.add(customer)

    def take_ended(self) -> list[dict[str, Any]]:
        out, self.ended = list(self.ended.values()), {}
        return out

    def slot_failed(self, slot: str, reason: str) -> None:
        self.slot_failures[slot] = reason

    def slot_failure(self, slot: str) -> str | None:
        return self.slot_failures.get(slot)

    def unfinished(self, slot: str) -> list[dict[str, Any]]:
        """The plans `slot` took and did not finish (training, or waiting in it for their turn)."""
        return [self.plans[c] for c in self._held(slot)]

    def _held(self, slot: str) -> list[str]:
        """The jobs `slot` took and did not finish."""
        return [c for c, s in self.taken.items() if s == slot and c not in self.done]

    def taken_by(self, slot: str) -> list[str]:
        return [cust for cust, s in self.taken.items() if s == slot]

    def queued(self) -> int:
        return len(self.queue)

    def cancelled_names(self) -> set[str]:
        return set(self.cancelled)

    def is_cancelled(self, customer: str) -> bool:
        return customer in self.cancelled or "*" in self.cancelled


def _cancelled(customer: str) -> dict[str, Any]:
    return {"customer": customer, "state": "cancelled", "reason": "cancelled by user"}


def _copy_job(job: dict[str, Any]) -> dict[str, Any]:
    out = dict(job)
    if "attempts" in out:
        out["attempts"] = [dict(a) for a in out["attempts"]]
    return out


def board_name(fleet: str) -> str:
    return f"board-{fleet}"


def get_board(fleet: str) -> Any:
    return ray.get_actor(board_name(fleet), namespace=NAMESPACE)
