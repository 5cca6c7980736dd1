"""Warm slots: a slot is one long-lived Ray Train run (one worker; Ray Train's placement, failure
handling and checkpoints kept) that loads the fleet's base once and trains job after job taken
from the fleet's queue on the progress board.

Per job everything stays as with a run of its own: its MLflow run (the driver copies the board's
events), live state on the board, checkpoints under `<storage>/<fleet>-<customer>-<hash>/`
(the folder a run of its own would use; a re-submit resumes from them while the job trains the
same way: a packed checkpoint holds the packed trainer's state, a run's holds trl's, so a job
moved between a slot and a run of its own, e.g. by `packing: false`, starts over), cancel, and
its end reported on the board. A job's Python error is that job's alone: it is retried in the
slot from its last checkpoint while its `max_failures` allows, else it fails, and the slot goes
on. A job that kills its process (out of memory, a crash in a kernel) costs the slot a restart:
Ray Train starts the worker again, the slot's own checkpoint says which job was in flight, and
that job resumes from its checkpoint, or fails once it has crashed more than `max_failures`.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import ray
from pydantic import BaseModel, Field

from lorafleet.errors import root_cause
from lorafleet.raystart import NAMESPACE
from lorafleet.spec import JobSpec, QuantizationSpec, ResourcesSpec
from lorafleet.train.checkpoints import JobCheckpoints
from lorafleet.train.plan import JobPlan
from lorafleet.train.pool import POOL_NAME, Assignment
from lorafleet.train.pool import pool as cluster_pool

STATE_FILE = "slot_state.json"
DEFAULT_MAX_JOBS = 8  # K when the fleet file does not bound it: the most memory may lower it to


class SlotConfig(BaseModel):
    """What a slot's worker needs: sent as the Ray Train loop config. The submission it works for
    comes from the pool (`lorafleet.train.pool`): a warm slot moves on to later submissions."""

    slot: str
    pool: str = Field(description="the cluster's SlotPool actor: assignments and restart budgets")
    work: Assignment = Field(description="the submission the slot was started for")
    base_model: str
    base_fingerprint: str
    quantization: QuantizationSpec
    resources: ResourcesSpec = Field(description="one job's resources: what the slot asks for")
    max_jobs: int = Field(
        DEFAULT_MAX_JOBS, description="K: jobs trained at once; the most, when k_from_memory"
    )
    k_from_memory: bool = True


class SlotState(BaseModel):
    """The slot's Ray Train checkpoint: the jobs in flight. Ray Train's controller registers a
    reported checkpoint when it next polls the worker, so a process that dies right after taking
    a job can leave the previous one as the latest: the board (on the driver's node) is what a
    restart reads (what each slot took and was training, and the crash counts)."""

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


def slot_run_name(fleet: str, submission: str, slot: str) -> str:
    """The slot's Ray Train run, named after the submission that started it (a warm slot keeps it)."""
    return f"{fleet}-{slot}-{submission}"


def slot_max_failures(jobs: list[JobSpec]) -> int:
    """Slot restarts Ray Train may make: each job can crash the process at most max_failures + 1
    times before it is marked failed, so this bound is never what fails a job."""
    return sum(job.resources.max_failures + 1 for job in jobs)


HOSTS_NAME = "slot-hosts-v1"
MAX_RUN_ENDS = 1000  # how many ended slot runs the hosts remember (a long-lived cluster's)
GONE = "its host was gone"
HOST_THREADS = 256  # runs driven, plus submissions watching one, at once


@ray.remote(num_cpus=0, max_concurrency=HOST_THREADS)
class SlotHosts:
    """Drives the cluster's slot runs, each from a thread of this one detached process (a plain
    DataParallelTrainer: a slot is one worker, so the torch backend's process group, and torch in
    this process, buy nothing). Its runs' ends go to the pool; `ended` tells whichever
    submission watches a slot how its run ended.

    One process for every slot, not a host actor per slot: that host was the first link of a
    cold slot's chain of process starts, and it paid a process start and an import of Ray Train
    (2 to 3 s on a small node) before the run's controller could start. This process pays them
    once, when the cluster's first slot starts; later runs begin at once. Detached, because a
    warm slot outlives the submission that started it (the next `lorafleet submit` on the cluster
    takes it over); on the node of the submission that started it, where the runs' Ray Train
    controllers land too, so drivers belong on the head node. Not a thread of the driver: a slot
    run still starting when its fleet ends finishes by itself, and a driver thread blocked in it
    made ray.shutdown() abort the whole process."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.live: dict[str, threading.Event] = {}  # slot -> set when its run has ended
        self.ends: dict[str, str | None] = {}  # slot -> how its run ended (None: cleanly)
        threading.Thread(target=_import_ray_train, daemon=True).start()  # before the first run asks

    def run(
        self, config_json: dict[str, Any], run_name: str, storage: str, restarts: int, key: str
    ) -> str | None:
        """One slot's Ray Train run, to its end: None when it ended cleanly, else why it failed.
        The run's arguments come with this call, which the cluster holds once it reaches this
        actor; the run then goes on whatever becomes of the process that asked for it."""
        slot = config_json["slot"]
        with self.lock:
            self.live[slot] = threading.Event()
        error = None
        try:
            # this process, not the driver, adds the slot to the pool: the driver waits for nothing
            added = cluster_pool().add.remote(slot, key, config_json["work"], restarts)
            from lorafleet.train.raytrain import ray_trainer

            cfg = SlotConfig.model_validate(config_json)
            trainer = ray_trainer(
                slot_loop, config_json, cfg.resources, run_name, storage, restarts, torch_backend=False
            )
            ray.get(added)  # the pool knows the slot before its worker asks for work
            trainer.fit()
        except Exception as exc:  # Ray Train gave up (restarts spent, a lost node past them), or worse
            error = root_cause(exc)
        finally:
            _report_run_end(config_json["pool"], slot, error)
            self._ended(slot, error)
        return error

    def ended(self, slot: str) -> str | None:
        """Wait until the slot's run ends (a submission watching a warm slot it took over): None
        when it ended cleanly, else why it failed; at once if no run of that name is known here."""
        with self.lock:
            done = self.live.get(slot)
            known = slot in self.ends
        if done is None and not known:  # this process never ran it (it was restarted): say so
            _report_run_end(POOL_NAME, slot, GONE)
            return GONE
        if done is not None:
            done.wait()
        with self.lock:
            return self.ends.get(slot)

    def running(self) -> list[str]:
        with self.lock:
            return sorted(self.live)

    def _ended(self, slot: str, error: str | None) -> None:
        with self.lock:
            self.ends[slot] = error
            while len(self.ends) > MAX_RUN_ENDS:
                self.ends.pop(next(iter(self.ends)))
            self.live.pop(slot).set()


def _import_ray_train() -> None:
    import lorafleet.train.raytrain  # noqa: F401


def _report_run_end(pool_name: str, slot: str, error: str | None) -> None:
    with contextlib.suppress(ValueError, ray.exceptions.RayActorError):  # the pool's node was lost
        actor = ray.get_actor(pool_name, namespace=NAMESPACE)
        ray.get(actor.run_ended.remote(slot, error))


def slot_hosts(placement: Any) -> Any:
    """The cluster's slot hosts, started by the first submission that starts a slot, on its node."""
    return SlotHosts.options(
        name=HOSTS_NAME,
        namespace=NAMESPACE,
        lifetime="detached",
        get_if_exists=True,
        scheduling_strategy=placement,
    ).remote()


def existing_hosts() -> Any:
    """The cluster's slot hosts, or None (no slot ever started on it, or its process is gone)."""
    try:
        return ray.get_actor(HOSTS_NAME, namespace=NAMESPACE)
    except ValueError:
        return None


# ---- the slot's worker -------------------------------------------------------------------


def slot_loop(config: dict[str, Any]) -> None:
    """Ray Train entry point of a slot: take its submission's jobs until the queue is empty; then,
    if the submission keeps its slots warm, wait for the next submission the pool hands it."""
    cfg = SlotConfig.model_validate(config)
    try:
        pool = ray.get_actor(cfg.pool, namespace=NAMESPACE)
        work = ray.get(pool.begin.remote(cfg.slot))
    except (ValueError, ray.exceptions.RayActorError):
        return  # the pool is gone (the node it ran on was lost)
    try:
        slot = None
        while work is not None:
            assignment = Assignment.model_validate(work)
            slot, ok = work_for(cfg, assignment, slot)
            if not ok or assignment.keep_warm_s <= 0:
                return
            work = ray.get(pool.wait_for_work.remote(cfg.slot, assignment.keep_warm_s))
    except ray.exceptions.RayActorError:
        return  # the pool is gone (the node it ran on was lost)
    finally:
        with contextlib.suppress(ray.exceptions.RayActorError):
            ray.get(pool.leave.remote(cfg.slot))  # a slot that returns is never handed work again


def submission_board(work: Assignment) -> Any:
    """The board of the submission the slot works for; None when that submission has ended (the
    board is gone, or the name is now a later submission's)."""
    try:
        board = ray.get_actor(work.fleet_board, namespace=NAMESPACE)
        if ray.get(board.submission_id.remote()) == work.submission:
            return board
    except (ValueError, ray.exceptions.RayActorError):
        pass
    return None


def work_for(cfg: SlotConfig, work: Assignment, slot: Slot | None) -> tuple[Slot | None, bool]:
    """Train one submission's share of jobs; returns the slot (base loaded, for the next
    submission) and whether it may go on (False: the slot itself broke)."""
    from lorafleet.train.raytrain import cpu_if_no_cuda

    board = submission_board(work)
    if board is None:
        return slot, True
    if slot is None:  # the worker's first submission, or the one it was training when it died
        state = SlotState.restore()
        resume, one_at_a_time = settle_crash(cfg, board, state)
        cpu_if_no_cuda()
        slot = Slot(cfg, work, board, state)
        slot.reused = work.submission != cfg.work.submission  # restarted while on a later submission
    else:
        slot.take_over(work, board)
        resume, one_at_a_time = [], False
    try:
        slot.run(resume, one_at_a_time)
    except Exception as exc:  # the slot itself broke (e.g. the base): its jobs fail, not the fleet's
        import traceback

        from lorafleet.train.packed import DeviceBrokenError  # imported with the trainer already

        traceback.print_exc()  # into the worker's log
        if isinstance(exc, DeviceBrokenError):  # only a new process helps: die as a crash does,
            crash_now()  # and the jobs in flight resume one at a time (settle_crash)
        reason = f"{cfg.slot} failed: {root_cause(exc)}"
        try:  # every job it took and did not finish, those waiting for their turn after a restart too
            for plan in map(JobPlan.model_validate, ray.get(board.unfinished.remote(cfg.slot))):
                ray.get(board.finish.remote(plan.job.customer, _end(plan, "failed", reason)))
            ray.get(board.slot_failed.remote(cfg.slot, reason))  # the slot takes no more jobs
        except ray.exceptions.RayActorError:
            pass  # the board is gone: the submission ended (its driver stopped), nothing to tell
        return slot, False
    return slot, True


def settle_crash(cfg: SlotConfig, board: Any, state: SlotState) -> tuple[list[JobPlan], bool]:
    """After a restart: a death while the process trained one job is that job's crash (past its
    max_failures it fails); a death while it trained several blames none, and those jobs then
    resume one at a time, so that a job that keeps killing its process is found alone. Returns
    the jobs to resume and whether they go one at a time."""
    training, waiting = ray.get(board.in_flight.remote(cfg.slot))
    training = [JobPlan.model_validate(p) for p in training]
    waiting = [JobPlan.model_validate(p) for p in waiting]
    resume = []
    for plan in training:
        crashes = ray.get(board.record_death.remote(plan.job.customer, len(training) == 1))
        if crashes > plan.job.resources.max_failures:
            reason = (
                f"its process died {crashes} time(s) (crash or out of memory) while it trained "
                f"alone; max_failures is {plan.job.resources.max_failures}"
            )
            ray.get(board.finish.remote(plan.job.customer, _end(plan, "failed", reason)))
        else:
            resume.append(plan)
    resume += waiting
    if state.in_flight != resume:  # the board is the truth; the checkpoint may be an earlier submission's
        state.in_flight = resume
        state.save()
    return resume, len(training) > 1 or bool(waiting)


def _end(plan: JobPlan, state: str, reason: str | None = None, **fields: Any) -> dict[str, Any]:
    return {"customer": plan.job.customer, "state": state, "reason": reason, **fields}


@dataclass
class SlotJob:
    """A job while it is in this slot: what the driver will read in its end."""

    plan: JobPlan
    out: Path  # the trainer's output folder for it (local)
    checkpoints: JobCheckpoints
    started: float = field(default_factory=time.perf_counter)
    failures: int = 0
    losses: list[float] = field(default_factory=list)
    mates: set[str] = field(default_factory=set)  # jobs that shared a step with it
    metrics: dict[str, float] = field(default_factory=dict)
    result: dict[str, Any] | None = None  # the trainer's final state event


class Slot:
    """The slot's worker: one PackedTrainer (the base loaded once) co-training up to K jobs, each
    with its own adapter, optimizer, schedule, checkpoints and events; a job that ends leaves and
    the next queued one joins at the next step."""

    def __init__(self, cfg: SlotConfig, work: Assignment, board: Any, state: SlotState):
        self.cfg, self.work, self.board, self.state = cfg, work, board, state
        self.reused = False  # True once the slot works for a later submission than its first
        self.k_for_next = False  # K from memory is to be worked out again with the next job admitted
        self.trainer: Any = None  # loaded with the first job: its placement is announced first
        self.k = cfg.max_jobs
        self.jobs: dict[str, SlotJob] = {}
        self.changed = False  # jobs joined or left since the board and checkpoint last heard
        self.folder = Path(tempfile.mkdtemp(prefix=f"lorafleet-{cfg.slot}-"))

    def take_over(self, work: Assignment, board: Any) -> None:
        """A later submission's jobs, on the base already loaded (the slot held no job meanwhile);
        K from memory is worked out again with its first job (its jobs may be larger)."""
        self.work, self.board, self.reused = work, board, True
        self.state.in_flight, self.changed = [], False
        self.k_for_next = self.cfg.k_from_memory

    def run(self, resume: list[JobPlan], one_at_a_time: bool) -> None:
        alone = list(resume) if one_at_a_time else []
        for plan in [] if one_at_a_time else resume:
            self.admit(plan)
        while True:
            try:
                if alone and not self.jobs:
                    self.admit(alone.pop(0))
                elif not alone:
                    self.fill()
                self.announce()
            except ray.exceptions.RayActorError:
                if self.jobs:
                    raise
                return  # the board went while the slot held nothing: the submission is over
            if not self.jobs:
                if not self.more_to_come():
                    return
                time.sleep(0.05)  # the driver is still planning the fleet's jobs
                continue
            self.apply_cancels()
            self.trainer.step()
            self.crash_if_asked()
            for customer in self.trainer.jobs:  # who trained beside whom
                self.jobs[customer].mates |= set(self.trainer.jobs) - {customer}
            self.settle()

    def announce(self) -> None:
        """Before a step: the board learns which jobs this process trains (a crash is blamed on
        them) and Ray Train gets the slot's checkpoint, once for all the jobs that joined or left
        since the last step: one report per job cost each handover about a second."""
        if self.changed:
            ray.get(self.board.set_training.remote(self.cfg.slot, list(self.jobs)))
            self.state.save()
            self.changed = False

    def more_to_come(self) -> bool:
        """Jobs may still come to this slot: the queue is not sealed yet (or not empty)."""
        try:
            return ray.get(self.board.queue_open.remote())
        except ray.exceptions.RayActorError:
            return False

    def fill(self) -> None:
        free = self.k - len(self.jobs)
        if free > 0:
            for plan in ray.get(self.board.take.remote(self.cfg.slot, free, self.work.slots)):
                self.admit(JobPlan.model_validate(plan))

    def admit(self, plan: JobPlan) -> None:
        customer = plan.job.customer
        self.board.begin_attempt.remote(
            customer, placed=time.time(), node_id=ray.get_runtime_context().get_node_id(), slot=self.cfg.slot
        )
        if customer not in self.jobs:
            out = self.folder / f"{self.work.submission}-{customer}"
            self.jobs[customer] = SlotJob(plan, out, JobCheckpoints(self.work.storage, plan))
            if plan not in self.state.in_flight:
                self.state.in_flight.append(plan)
        self.changed = True
        job = self.jobs[customer]
        if self.trainer is None:  # a base that does not load breaks the slot: every job it took fails
            self.load()  # with the reason (work_for); a job's own error below (its K too) is that job's
        try:
            if self.k_for_next:
                self.k = self.trainer.max_jobs = k_from_memory(self.trainer, plan, self.cfg.max_jobs)
            self.k_for_next = False
            self.trainer.add(plan, job.out, job.checkpoints.latest(), self.on_event)
        except Exception as exc:  # PackingError, a dataset that changed: this job's
            job.result = {"state": "failed", "reason": root_cause(exc)}

    def load(self) -> None:
        """The slot's base, once; K from memory (unless the fleet file bounds it) with the job
        admitted next, inside that job's own try: its targets may be what cannot be sized."""
        from lorafleet.train.packed import PackedTrainer

        res = self.cfg.resources
        on_gpu = res.gpus_per_worker > 0 and torch_cuda()
        device = str(ray.train.torch.get_device()) if on_gpu else "cpu"
        _threads(res.cpus_per_worker)
        self.trainer = PackedTrainer(
            self.cfg.base_model,
            self.cfg.quantization,
            device=device,
            max_jobs=self.k,
            base_fingerprint=self.cfg.base_fingerprint,
        )
        self.k_for_next = self.cfg.k_from_memory

    def apply_cancels(self) -> None:
        cancelled = ray.get(self.board.cancelled_names.remote())  # one call a step for all jobs
        for customer in self.jobs:
            if customer in cancelled or "*" in cancelled:
                self.trainer.cancel(customer)

    def crash_if_asked(self) -> None:
        """Tests: a job's process dies at its crash step, once (as an OOM kill would kill it)."""
        for customer, step in self.work.crash_at_step.items():
            running = self.trainer.jobs.get(customer)
            at_step = running is not None and running.step == step
            if at_step and not ray.get(self.board.death_count.remote(customer)):
                crash_now()

    def on_event(self, customer: str, event: dict[str, Any]) -> None:
        """The trainer's events: live state and log events to the board, checkpoints to storage."""
        job, kind, step = self.jobs[customer], event["event"], event["step"]
        if kind == "state" and event["state"] == "running":
            self.board.attempt_started.remote(
                customer,
                state="running",
                total_steps=event["max_steps"],
                start_step=step,
                started=time.time(),
                node_id=ray.get_runtime_context().get_node_id(),
            )
            self.board.update.remote(customer, slot=self.cfg.slot, pack_k=self.k, slot_reused=self.reused)
        elif kind == "state":
            self.board.end_attempt.remote(customer, time.time())
            job.result = event
        elif kind == "checkpoint":
            job.checkpoints.save(Path(event["path"]), step)
        else:  # base_eval, metrics, eval: the numbers a trl job logs
            numbers = {k: v for k, v in event.items() if isinstance(v, int | float)}
            job.metrics |= numbers
            if "loss" in numbers:
                job.losses.append(numbers["loss"])
            self.board.log.remote(customer, numbers)

    def settle(self) -> None:
        """Jobs that left the trainer this step: finished, retried from their checkpoint (a
        failure within max_failures), or ended."""
        for customer, job in list(self.jobs.items()):
            if job.result is None:
                continue
            end = self.end_of(customer, job)
            if end is None:  # retried
                continue
            self.board.update.remote(customer, packed_with=sorted(job.mates))
            ray.get(self.board.finish.remote(customer, end))  # before the slot may end
            del self.jobs[customer]
            shutil.rmtree(job.out, ignore_errors=True)  # its adapter went out with its end
            self.state.in_flight.remove(job.plan)
            self.changed = True

    def end_of(self, customer: str, job: SlotJob) -> dict[str, Any] | None:
        result, job.result = job.result, None
        if result["state"] == "succeeded":
            return _end(job.plan, "succeeded", **self.outputs(job, Path(result["adapter"])))
        if result["state"] == "cancelled" or ray.get(self.board.is_cancelled.remote(customer)):
            return _end(job.plan, "cancelled", "cancelled by user")
        job.failures += 1
        if job.failures > job.plan.job.resources.max_failures:
            return _end(job.plan, "failed", result["reason"])
        self.admit(job.plan)  # a new attempt from its last checkpoint
        return None

    def outputs(self, job: SlotJob, adapter: Path) -> dict[str, Any]:
        from lorafleet.train.plan import ADAPTER_FILES

        metrics = dict(job.metrics)
        if job.losses:  # trl's train_loss: the mean training loss over the run's logged steps
            metrics["train_loss"] = sum(job.losses) / len(job.losses)
        metrics["job_wall_s"] = time.perf_counter() - job.started
        return {"files": {n: (adapter / n).read_bytes() for n in ADAPTER_FILES}, "metrics": metrics}


def torch_cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def _threads(cpus: float) -> None:
    import torch

    torch.set_num_threads(max(1, int(cpus)))


def k_from_memory(trainer: Any, plan: JobPlan, cap: int) -> int:
    """How many jobs like `plan` fit beside the base: half the free memory of the slot's device
    (the rest is left to the base's activations, the allocator and whatever shares the node)."""
    import psutil

    from lorafleet.train.packed import estimate_job_bytes, jobs_that_fit

    on_gpu = trainer.device.startswith("cuda")
    if on_gpu:
        import torch

        torch.cuda.empty_cache()  # blocks cached for jobs that left are free for the next ones
        free = torch.cuda.mem_get_info(torch.device(trainer.device))[0]
    else:
        free = psutil.virtual_memory().available
    layers = [trainer.layers[name] for name in trainer.targets(plan)]
    in_out = [(layer.in_features, layer.out_features) for layer in layers]
    job = estimate_job_bytes(plan, trainer.model.config, in_out, on_gpu)
    return max(1, jobs_that_fit(free // 2, [job] * cap, cap))


def crash_now() -> None:
    """Kill this process the way an out-of-memory kill or a kernel crash does: no cleanup."""
    os._exit(1)
