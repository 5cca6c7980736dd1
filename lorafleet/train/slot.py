"""Warm slots: a slot is one long-lived Ray Train run (one worker; Ray Train's placement, failure
handling and checkpoints kept) that loads the fleet's base once and trains job after job taken
from the fleet's queue on the progress board.

Per job everything stays as with a run of its own: its MLflow run (the driver copies the board's
events), live state on the board, checkpoints under `<storage>/<fleet>-<customer>-<hash>/`
(the layout Ray Train gives a job's own run, so a re-submit resumes either way), cancel, and
its end reported on the board. A job's Python error is that job's alone: it is retried in the
slot from its last checkpoint while its `max_failures` allows, else it fails, and the slot goes
on. A job that kills its process (out of memory, a crash in a kernel) costs the slot a restart:
Ray Train starts the worker again, the slot's own checkpoint says which job was in flight, and
that job resumes from its checkpoint, or fails once it has crashed more than `max_failures`.
"""

from __future__ import annotations

import os
import tempfile
import time
from pathlib import Path
from typing import Any

import ray
from pydantic import BaseModel, Field

from lorafleet.raystart import NAMESPACE
from lorafleet.spec import QuantizationSpec, ResourcesSpec
from lorafleet.train.checkpoints import JobCheckpoints
from lorafleet.train.worker import JobPlan

STATE_FILE = "slot_state.json"


class SlotConfig(BaseModel):
    """What a slot's worker needs: sent as the Ray Train loop config."""

    slot: str
    fleet_board: str
    base_model: str
    base_fingerprint: str
    quantization: QuantizationSpec
    resources: ResourcesSpec = Field(description="one job's resources: what the slot asks for")
    storage: str
    max_jobs: int = 1
    crash_at_step: dict[str, int] = Field(
        default_factory=dict, description="tests: customer -> step at which its process dies (once)"
    )


class SlotState(BaseModel):
    """The slot's Ray Train checkpoint: the jobs in flight. Ray Train's controller registers a
    reported checkpoint when it next polls the worker, so a process that dies right after taking
    a job can leave the previous one as the latest: the board (on the driver's node) also knows
    what each slot took and keeps the crash counts; a restart resumes the union of both."""

    in_flight: list[JobPlan] = Field(default_factory=list)

    @classmethod
    def restore(cls) -> SlotState:
        import ray.train

        ckpt = ray.train.get_checkpoint()
        if ckpt is None:
            return cls()
        with ckpt.as_directory() as folder:
            return cls.model_validate_json((Path(folder) / STATE_FILE).read_text())

    def save(self) -> None:
        """Reported to Ray Train: a restarted worker reads it back through get_checkpoint()."""
        import ray.train
        from ray.train import Checkpoint

        with tempfile.TemporaryDirectory(prefix="lorafleet-slot-") as folder:
            (Path(folder) / STATE_FILE).write_text(self.model_dump_json())
            ray.train.report({"in_flight": len(self.in_flight)}, checkpoint=Checkpoint.from_directory(folder))


def slot_run_name(fleet: str, submission: str, index: int) -> str:
    return f"{fleet}-slot{index}-{submission}"


def slot_max_failures(plans: list[JobPlan]) -> int:
    """Slot restarts Ray Train may make: each job can crash the process at most max_failures + 1
    times before it is marked failed, so this bound is never what fails a job."""
    return sum(p.job.resources.max_failures + 1 for p in plans)


@ray.remote(num_cpus=0, max_retries=0)
def run_slot(config_json: dict[str, Any], run_name: str, storage: str, max_failures: int) -> None:
    """One slot through Ray Train; its jobs' ends go to the board, so nothing is returned."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    from lorafleet.train.runner import scaling, torch_backend

    res = SlotConfig.model_validate(config_json).resources
    TorchTrainer(
        slot_loop,
        train_loop_config=config_json,
        torch_config=TorchConfig(backend=torch_backend(res.gpus_per_worker)),
        scaling_config=scaling(res),
        run_config=RunConfig(
            name=run_name,
            storage_path=storage,
            failure_config=FailureConfig(max_failures=max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=2),
        ),
    ).fit()


# ---- the slot's worker -------------------------------------------------------------------


def slot_loop(config: dict[str, Any]) -> None:
    """Ray Train entry point of a slot: take jobs until the fleet's queue is empty."""
    from lorafleet.train.runner import cpu_if_no_cuda

    cfg = SlotConfig.model_validate(config)
    board = ray.get_actor(cfg.fleet_board, namespace=NAMESPACE)
    state = SlotState.restore()
    resume = settle_crash(cfg, board, state)
    cpu_if_no_cuda()
    slot = Slot(cfg, board, state)
    try:
        for plan in resume:
            slot.train(plan)
        while plans := ray.get(board.take.remote(cfg.slot, 1)):
            slot.train(JobPlan.model_validate(plans[0]))
    except Exception as exc:  # the slot itself broke (e.g. the base): its jobs fail, not the fleet's
        import traceback

        from lorafleet.train.runner import root_cause

        traceback.print_exc()  # into the worker's log
        reason = f"{cfg.slot} failed: {root_cause(exc)}"
        for plan in state.in_flight:
            ray.get(board.finish.remote(plan.job.customer, _end(plan, "failed", reason)))
        ray.get(board.slot_failed.remote(cfg.slot, reason))  # the slot takes no more jobs
        state.in_flight = []
        state.save()


def settle_crash(cfg: SlotConfig, board: Any, state: SlotState) -> list[JobPlan]:
    """After a restart: the jobs that were in flight when the process died each count a crash;
    those past their max_failures fail, the others are returned to resume."""
    held = {p.job.customer: p for p in state.in_flight}
    for plan_json in ray.get(board.in_flight.remote(cfg.slot)):
        plan = JobPlan.model_validate(plan_json)
        held.setdefault(plan.job.customer, plan)
    resume = []
    for customer, plan in held.items():
        crashes = ray.get(board.count_crash.remote(customer))
        if crashes > plan.job.resources.max_failures:
            reason = (
                f"its process died {crashes} time(s) (crash or out of memory); "
                f"max_failures is {plan.job.resources.max_failures}"
            )
            ray.get(board.finish.remote(customer, _end(plan, "failed", reason)))
        else:
            resume.append(plan)
    if held:
        state.in_flight = resume
        state.save()
    return resume


def _end(plan: JobPlan, state: str, reason: str | None = None, **fields: Any) -> dict[str, Any]:
    return {"customer": plan.job.customer, "state": state, "reason": reason, **fields}


class Slot:
    """The slot's worker: the base loaded once, jobs trained one after another on it."""

    def __init__(self, cfg: SlotConfig, board: Any, state: SlotState):
        self.cfg, self.board, self.state = cfg, board, state
        self.trainer: Any = None  # loaded with the first job: placement is announced first

    def train(self, plan: JobPlan) -> None:
        customer = plan.job.customer
        if plan not in self.state.in_flight:
            self.state.in_flight.append(plan)
            self.state.save()
        failures, start = 0, time.perf_counter()
        while True:
            self._announce(plan)
            try:
                out = self._train_once(plan)
                end = _end(plan, "succeeded", **out)
                end["metrics"]["job_wall_s"] = time.perf_counter() - start
                break
            except Exception as exc:
                from lorafleet.train.progress import JobCancelled
                from lorafleet.train.runner import root_cause

                if isinstance(exc, JobCancelled) or ray.get(self.board.is_cancelled.remote(customer)):
                    end = _end(plan, "cancelled", "cancelled by user")
                    break
                failures += 1
                if failures > plan.job.resources.max_failures:
                    end = _end(plan, "failed", root_cause(exc))
                    break
        ray.get(self.board.finish.remote(customer, end))  # before the slot may end
        self.state.in_flight.remove(plan)
        self.state.save()

    def _announce(self, plan: JobPlan) -> None:
        self.board.begin_attempt.remote(
            plan.job.customer, placed=time.time(), node_id=ray.get_runtime_context().get_node_id()
        )
        self.board.update.remote(plan.job.customer, slot=self.cfg.slot, pack_k=1, packed_with=[])

    def _train_once(self, plan: JobPlan) -> dict[str, Any]:
        from lorafleet.train.sequential import SequentialTrainer

        if self.trainer is None:
            self.trainer = SequentialTrainer.load(self.cfg)
        checkpoints = JobCheckpoints(self.cfg.storage, plan)
        crash = self.cfg.crash_at_step.get(plan.job.customer)
        if crash is not None and ray.get(self.board.crash_count.remote(plan.job.customer)):
            crash = None  # the injected crash happens once
        return self.trainer.train(plan, checkpoints, self.board, crash)


def crash_now() -> None:
    """Kill this process the way an out-of-memory kill or a kernel crash does: no cleanup."""
    os._exit(1)
