"""Live job progress: workers push trainer log events to one Ray actor per fleet; the driver
reads it for the progress table and copies the events into MLflow. The actor also carries
cancellation requests, so `lorafleet cancel` works from another terminal."""

from __future__ import annotations

import time
from typing import Any

import ray
from transformers import TrainerCallback

NAMESPACE = "lorafleet"


class JobCancelled(RuntimeError):
    """Raised inside a worker when its job was cancelled; the runner records state 'cancelled'."""


class InjectedFault(RuntimeError):
    """Raised at a chosen step to test resume (the same path as a crash or a lost node)."""


@ray.remote(num_cpus=0)
class ProgressBoard:
    def __init__(self) -> None:
        self.jobs: dict[str, dict[str, Any]] = {}
        self.pending: dict[str, list[dict[str, Any]]] = {}
        self.cancelled: set[str] = set()

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

    def cancel(self, customer: str | None = None) -> None:
        self.cancelled.add(customer or "*")

    def cancelled_names(self) -> set[str]:
        return set(self.cancelled)

    def is_cancelled(self, customer: str) -> bool:
        return customer in self.cancelled or "*" in self.cancelled


def _copy_job(job: dict[str, Any]) -> dict[str, Any]:
    out = dict(job)
    if "attempts" in out:
        out["attempts"] = [dict(a) for a in out["attempts"]]
    return out


def board_name(fleet: str) -> str:
    return f"board-{fleet}"


def get_board(fleet: str) -> Any:
    return ray.get_actor(board_name(fleet), namespace=NAMESPACE)


class ProgressCallback(TrainerCallback):
    """Rank 0 reports steps and losses; every rank checks for cancellation each step."""

    def __init__(self, board: Any, customer: str, rank: int, fail_at_step: int | None = None):
        self.board, self.customer, self.rank = board, customer, rank
        self.fail_at_step = fail_at_step
        self.started = time.time()

    def on_train_begin(self, args, state, control, **kwargs):
        if self.rank == 0 and self.board is not None:
            # the node of rank 0 tells users (and tests) where the job ran; a restart after a lost
            # node begins a new attempt, usually elsewhere
            self.board.attempt_started.remote(
                self.customer,
                state="running",
                total_steps=state.max_steps,
                start_step=state.global_step,
                started=time.time(),
                node_id=ray.get_runtime_context().get_node_id(),
            )

    def on_train_end(self, args, state, control, **kwargs):
        if self.rank == 0 and self.board is not None:
            self.board.end_attempt.remote(self.customer, time.time())

    def on_step_end(self, args, state, control, **kwargs):
        if self.board is not None and ray.get(self.board.is_cancelled.remote(self.customer)):
            raise JobCancelled(f"job '{self.customer}' was cancelled at step {state.global_step}")
        if self.fail_at_step is not None and state.global_step == self.fail_at_step:
            raise InjectedFault(f"injected fault at step {state.global_step}")
        if self.rank == 0 and self.board is not None:
            self.board.update.remote(self.customer, step=state.global_step)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if self.rank == 0 and self.board is not None and logs:
            self.board.log.remote(self.customer, {"step": state.global_step, **logs})
