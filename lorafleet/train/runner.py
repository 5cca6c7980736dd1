"""Running a fleet's jobs on Ray: launching them (as many as the cluster can run plus a queue of
half a cluster; Ray places and queues those), watching them end, and cancelling them. Nothing here
touches MLflow or decides what is registered: `lorafleet.pipeline` owns the fleet's stages and
reads what this module reports (board snapshots, log events, `JobEnd`s). One job's failure never
touches the others; a lost worker node costs its jobs a restart from their last checkpoint when
`max_failures` allows.
"""

from __future__ import annotations

import os
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import ray

from lorafleet.errors import LorafleetError, root_cause
from lorafleet.raystart import NAMESPACE, driver_node_affinity, init_ray, join_cluster
from lorafleet.spec import JobSpec, PackingSpec, ResourcesSpec
from lorafleet.train import cluster_actors
from lorafleet.train.plan import JobPlan, ray_run_name
from lorafleet.train.pool import POOL_NAME, Assignment, existing_pool, new_slot_name, pool, release, slot_key
from lorafleet.train.progress import ProgressBoard, board_name
from lorafleet.train.slot import (
    DEFAULT_MAX_JOBS,
    GONE,
    SlotConfig,
    existing_hosts,
    slot_hosts,
    slot_max_failures,
    slot_run_name,
)

__all__ = [
    "NAMESPACE",
    "FleetExecution",
    "JobEnd",
    "cancel",
    "driver_node_affinity",
    "init_ray",
    "ray_run_name",
]


@dataclass
class JobEnd:
    """How one job left Ray: its adapter's files (small) and final metrics when it succeeded."""

    customer: str
    state: Literal["succeeded", "failed", "cancelled"]
    reason: str | None = None
    files: dict[str, bytes] = field(default_factory=dict)
    metrics: dict[str, float] = field(default_factory=dict)


def train_loop(config: dict[str, Any]) -> None:
    """The worker's loop of a job with a Ray Train run of its own, run where Ray placed it."""
    _announce_placement(config)  # first: imports below take seconds on a busy node
    from lorafleet.train.raytrain import cpu_if_no_cuda
    from lorafleet.train.worker import train_loop_per_worker

    cpu_if_no_cuda()
    train_loop_per_worker(config)


def _announce_placement(config: dict[str, Any]) -> None:
    """Rank 0 tells the board where and when its worker group started: a new attempt (the first,
    or a restart after a failure). Model loading comes after, so this marks the slot handover."""
    import ray.train

    board = config.get("fleet_board")
    if board and ray.train.get_context().get_world_rank() == 0:
        ray.get_actor(board, namespace=NAMESPACE).begin_attempt.remote(
            config["job"]["customer"], placed=time.time(), node_id=ray.get_runtime_context().get_node_id()
        )


@ray.remote(num_cpus=0, max_retries=0)
def run_job(plan_json: dict[str, Any], run_name: str, storage: str) -> dict[str, Any]:
    """One job through Ray Train; returns the adapter's files (small) and final metrics."""
    from ray.train.huggingface.transformers import RayTrainReportCallback

    from lorafleet.train.plan import ADAPTER_FILES
    from lorafleet.train.raytrain import ray_trainer

    res = JobPlan.model_validate(plan_json).job.resources
    trainer = ray_trainer(train_loop, plan_json, res, run_name, storage, res.max_failures)
    start = time.perf_counter()
    result = trainer.fit()
    fit_s = time.perf_counter() - start
    with result.checkpoint.as_directory() as folder:
        hf = Path(folder) / RayTrainReportCallback.CHECKPOINT_NAME
        files = {name: (hf / name).read_bytes() for name in ADAPTER_FILES}
    metrics = {k: v for k, v in result.metrics.items() if isinstance(v, int | float)}
    return {"files": files, "metrics": metrics | {"job_wall_s": fit_s}}


def job_end(customer: str, ref: Any, cancelled: bool) -> JobEnd:
    """A finished run_job task as a JobEnd; any error (Ray wraps the worker's) is that job's alone."""
    try:
        out = ray.get(ref)
    except Exception as exc:
        if cancelled:
            return JobEnd(customer, "cancelled", "cancelled by user")
        return JobEnd(customer, "failed", root_cause(exc))
    return JobEnd(customer, "succeeded", files=out["files"], metrics=out["metrics"])


def queue_depth() -> float:
    """How much demand may be handed to Ray beyond what the cluster holds (1.5 = half a cluster
    waiting): enough that a freed slot is taken at once by a job already waiting in Ray, and that
    an autoscaler sees pending demand; bounded so a 1,000-job fleet does not park ~1 GB of idle
    driver task and Train controller per queued job on the head node."""
    return float(os.environ.get("LORAFLEET_QUEUE_DEPTH", "1.5"))


def job_demand(job: JobSpec) -> dict[str, float]:
    res = job.resources
    demand = {"CPU": res.cpus_per_worker * res.workers}
    if res.gpus_per_worker:
        demand["GPU"] = res.gpus_per_worker * res.workers
    return demand


class Launcher:
    """Hands jobs to Ray in fleet-file order while the in-flight demand stays within queue_depth()
    times the cluster's resources (read each tick: nodes come and go); Ray queues and places
    those, the rest wait here. The head of the line is never skipped, so large jobs don't starve,
    and one job always goes out, so a job too large for the cluster still reaches Ray (which
    reports it, or an autoscaler grows the cluster)."""

    def __init__(self, plans: dict[str, JobPlan], storage: str, placement: Any):
        self.plans, self.storage, self.placement = plans, storage, placement
        self.pending = list(plans)
        self.refs: dict[Any, str] = {}
        self.demand = {cust: job_demand(plan.job) for cust, plan in plans.items()}

    def launch(self) -> None:
        limit = {k: v * queue_depth() for k, v in ray.cluster_resources().items()}
        used: dict[str, float] = {}
        for cust in self.refs.values():
            for k, v in self.demand[cust].items():
                used[k] = used.get(k, 0) + v
        while self.pending:
            need = self.demand[self.pending[0]]
            if self.refs and any(used.get(k, 0) + v > limit.get(k, 0) for k, v in need.items()):
                return
            cust = self.pending.pop(0)
            for k, v in need.items():
                used[k] = used.get(k, 0) + v
            plan = self.plans[cust]
            ref = run_job.options(scheduling_strategy=self.placement).remote(
                plan.model_dump(mode="json"), ray_run_name(plan.job, plan.job_hash), self.storage
            )
            self.refs[ref] = cust

    def add(self, plan: JobPlan) -> None:
        customer = plan.job.customer
        self.plans[customer], self.demand[customer] = plan, job_demand(plan.job)
        self.pending.append(customer)

    def busy(self) -> bool:
        return bool(self.pending or self.refs)


class FleetExecution:
    """A fleet's jobs on Ray: the fleet's board (progress, cancellation, the slots' queue), its
    warm slots and the runs of the jobs that train alone. Jobs are added as the driver plans them
    (`add`); `seal` says no more will come. The caller polls it until `busy()` is false, and
    closes it."""

    def __init__(
        self,
        fleet: str,
        storage: str,
        packing: PackingSpec | None = None,
        crash_at_step: dict[str, int] | None = None,
    ):
        here = driver_node_affinity()
        self.submission = uuid.uuid4().hex[:8]
        # the board first, while the fleet is validated: with warm slots on the cluster it is what
        # the first job waits for (a slot taken over looks it up); new slots follow validation
        self.board = ProgressBoard.options(
            name=board_name(fleet), namespace=NAMESPACE, scheduling_strategy=here
        ).remote(self.submission)
        self.packing, self.crash_at_step = packing or PackingSpec(), crash_at_step or {}
        self.launcher = Launcher({}, storage, here)
        self.slots = Slots(fleet, self.submission, storage, self.board, here)
        self.sealed = False
        self.running: set[str] = set()  # jobs the board has seen training
        self.runs_began = False  # a slot or a job's own run went to Ray

    def prestart_slots(self, jobs: list[JobSpec], base_fingerprint: str) -> int:
        """New slots for these jobs before any is planned (`Slots.prestart`); how many started."""
        started = self.slots.prestart(jobs, base_fingerprint, self.packing, self.crash_at_step)
        self._runs_begin()
        return started

    def start_slots(self, jobs: list[JobSpec], base_fingerprint: str) -> None:
        """Warm slots for these jobs (those that may share one; the first of them is planned)."""
        self.slots.start(jobs, base_fingerprint, self.packing, self.crash_at_step)
        self._runs_begin()

    def add(self, plan: JobPlan, in_slot: bool) -> None:
        """A planned job: into the slots' queue, or to the launcher for a run of its own."""
        if in_slot:
            self.slots.add(plan)
        else:
            self.launcher.add(plan)
            self.launcher.launch()
        self._runs_begin()

    def _runs_begin(self) -> None:
        """The cluster-wide actors the runs use, started (once per cluster) right after the first
        runs: not before, where the cleaner would take the idle process Ray keeps that the slot
        hosts, first in a run's chain of process starts, get instead."""
        if not self.runs_began:
            self.runs_began = True
            cluster_actors.start()

    def seal(self) -> None:
        """Every job is planned: slots that find the queue empty from now on are done."""
        ray.get(self.board.seal.remote())
        self.sealed = True
        if not self.slots.started and self.launcher.plans:  # runs of their own need the resources
            self.release_warm_slots()

    def release_warm_slots(self) -> None:
        """Warm slots an earlier submission left hold resources the jobs in runs of their own need."""
        release()

    def busy(self) -> bool:
        return not self.sealed or self.launcher.busy() or self.slots.busy()

    def poll(self, timeout_s: float = 0.25) -> list[JobEnd]:
        """Launch what fits, wait up to timeout_s, and return the jobs that ended meanwhile."""
        launcher = self.launcher
        launcher.launch()
        refs = list(launcher.refs) + list(self.slots.refs)
        ready = ray.wait(refs, num_returns=1, timeout=timeout_s)[0] if refs else []
        self.snapshot()  # which jobs run: those stop themselves when cancelled
        ends = [JobEnd(c, "cancelled", "cancelled by user") for c in self._cancel_queued()]
        for ref in [r for r in ready if r in launcher.refs]:
            cust = launcher.refs.pop(ref)
            ends.append(job_end(cust, ref, ray.get(self.board.is_cancelled.remote(cust))))
        return ends + self.slots.poll([r for r in ready if r in self.slots.refs])

    def snapshot(self) -> dict[str, dict[str, Any]]:
        """Each job's live state on the board (state, steps, losses, attempts)."""
        snapshot = ray.get(self.board.snapshot.remote())
        self.running |= {c for c, info in snapshot.items() if info.get("state") == "running"}
        return snapshot

    def drain(self) -> dict[str, list[dict[str, Any]]]:
        """The trainers' log events since the last drain, per job."""
        return ray.get(self.board.drain.remote())

    def close(self) -> None:
        """Kill the board. Slot runs are never cancelled: cancelling one while its worker group
        started left that group behind (Ray Train's cleaner never removed it, and the simulated
        cluster's GPU it held was the one a slot restarted after a lost node needed). A slot still
        working for this submission finds the board gone and returns; one that keeps warm waits
        for the next submission, unless this one stopped early (jobs still open): then it ends at
        its wait."""
        if self.slots.started or self.slots.refs:  # prestarted slots too
            actor = pool()
            if self.busy():
                ray.get(actor.release.remote(list(self.slots.refs.values())))
            ray.get(actor.finished.remote(self.submission))  # before the next submission claims
        ray.kill(self.board)

    def _cancel_queued(self) -> list[str]:
        """A job cancelled before it started is cancelled as a task, or dropped if still waiting
        here (returned); a running one stops itself. Queued slot jobs end on the board."""
        cancelled = ray.get(self.board.cancelled_names.remote())  # one actor call a tick, not one per job
        if not cancelled:
            return []
        launcher = self.launcher
        for ref, cust in launcher.refs.items():
            if cust not in self.running and (cust in cancelled or "*" in cancelled):
                ray.cancel(ref)
        dropped = [cust for cust in launcher.pending if cust in cancelled or "*" in cancelled]
        launcher.pending = [cust for cust in launcher.pending if cust not in dropped]
        return dropped


# Ray Train restarts a slot kept warm may make beyond what its first submission's jobs need: its
# later submissions' jobs need them (a warm slot is only handed a submission they still cover)
WARM_SLOT_RESTARTS = 256


def slots_that_fit(res: ResourcesSpec) -> int:
    """How many one-job workers of `res` the cluster's live nodes hold at once."""
    fit = 0
    for node in ray.nodes():
        if not node.get("Alive"):
            continue
        have = node.get("Resources", {})
        per_node = have.get("CPU", 0) // res.cpus_per_worker
        if res.gpus_per_worker:
            per_node = min(per_node, have.get("GPU", 0) // res.gpus_per_worker)
        fit += int(per_node)
    return fit


def placement_problem(res: ResourcesSpec) -> str | None:
    """Why the cluster's live nodes cannot hold one run of `res` now (its workers, each on one
    node), None when they can."""
    fit = slots_that_fit(res)
    if fit >= res.workers:
        return None
    need = (
        f"needs {res.workers} worker(s) of {res.cpus_per_worker:g} CPU and {res.gpus_per_worker:g} GPU each"
    )
    if fit:
        return f"{need}, and the cluster's nodes hold {fit} such worker(s) at once"
    nodes = [n.get("Resources", {}) for n in ray.nodes() if n.get("Alive")]
    cpus = max((n.get("CPU", 0) for n in nodes), default=0)
    gpus = max((n.get("GPU", 0) for n in nodes), default=0)
    return f"{need}, and no node of the cluster holds one (the largest: {cpus:g} CPUs, {gpus:g} GPUs)"


def slot_template(job: JobSpec, base_fp: str, packing: PackingSpec, work: Any, pool: str) -> dict[str, Any]:
    """A slot's Ray Train loop config, less its name: what every slot of the fleet holds."""
    return SlotConfig(
        slot="",
        pool=pool,
        work=work,
        base_model=job.base_model,
        base_fingerprint=base_fp,
        quantization=job.quantization,
        resources=job.resources.model_copy(update={"workers": 1, "max_failures": 0}),
        max_jobs=packing.max_jobs_per_slot or DEFAULT_MAX_JOBS,
        k_from_memory=packing.max_jobs_per_slot is None,
    ).model_dump(mode="json")


@dataclass(frozen=True)
class _SlotSetup:
    count: int  # slots this submission trains on
    template: dict[str, Any]  # SlotConfig, less the slot's name
    key: str  # what a warm slot must match (pool.slot_key)
    work: dict[str, Any]  # the Assignment slots get
    needed: int  # restarts this submission's jobs may cost
    restarts: int  # the budget a new slot gets


class Slots:
    """The fleet's warm slots (lorafleet.train.slot): their jobs wait in the board's queue; each
    slot is one Ray Train run that takes jobs until the queue is sealed and empty."""

    def __init__(self, fleet: str, submission: str, storage: str, board: Any, placement: Any):
        self.fleet, self.submission, self.storage = fleet, submission, storage
        self.board, self.placement = board, placement
        self.open: set[str] = set()  # queued or training, not ended yet
        self.refs: dict[Any, str] = {}  # the end of a slot's run (SlotHosts.run / ended) -> slot id
        self.failure: str | None = None
        self.started = False  # claimed and started with the first slot job (prestart comes before)
        self.setup: _SlotSetup | None = None

    def add(self, plan: JobPlan) -> None:
        self.open.add(plan.job.customer)
        self.board.enqueue.remote([plan.model_dump(mode="json")])  # in order with seal(): one caller

    def _setup(
        self, jobs: list[JobSpec], base_fp: str, packing: PackingSpec, crash: dict[str, int]
    ) -> _SlotSetup:
        """What every slot of this submission shares (worked out once)."""
        if self.setup is None:
            count = max(1, min(packing.slots or slots_that_fit(jobs[0].resources), len(jobs)))
            work = Assignment(
                fleet_board=board_name(self.fleet),
                submission=self.submission,
                slots=count,
                storage=self.storage,
                keep_warm_s=packing.keep_warm_s,
                crash_at_step=crash,
            )
            template = slot_template(jobs[0], base_fp, packing, work, POOL_NAME)
            needed = slot_max_failures(jobs)
            # a slot that may stay warm gets a restart budget for later submissions as well
            restarts = needed + WARM_SLOT_RESTARTS if packing.keep_warm_s > 0 else needed
            self.setup = _SlotSetup(
                count, template, slot_key(template), work.model_dump(mode="json"), needed, restarts
            )
        return self.setup

    def prestart(self, jobs: list[JobSpec], base_fp: str, packing: PackingSpec, crash: dict[str, int]) -> int:
        """Before any job is planned: new slots for what the warm ones on the cluster cannot cover,
        so their start-up overlaps the planning. Claims and releases nothing: every job may yet
        turn out to be reused (the slots then end, or wait warm), and other fleets' idle slots
        are not this submission's to end until it trains. Returns how many it started."""
        setup = self._setup(jobs, base_fp, packing, crash)
        actor = existing_pool()
        # no pool yet: no slot ever ran on this cluster, so none is warm (the slot hosts start
        # the pool: its start-up no longer comes before theirs)
        warm = ray.get(actor.available.remote(setup.key, setup.needed)) if actor else 0
        new = max(0, setup.count - warm)
        self._start_new(setup, new)
        return new

    def start(self, jobs: list[JobSpec], base_fp: str, packing: PackingSpec, crash: dict[str, int]) -> None:
        """With the first slot job: take over warm slots that match (`lorafleet.train.pool`) and
        start the rest: one per job-sized place in the cluster, at most one per job."""
        self.started = True
        setup = self._setup(jobs, base_fp, packing, crash)
        actor = pool()
        claimed = ray.get(
            actor.claim.remote(setup.key, setup.count - len(self.refs), setup.work, setup.needed)
        )
        ray.get(actor.release.remote())  # idle slots not taken hold resources this submission may need
        gone = [slot for slot in claimed if not self.watch(slot)]
        ray.get([actor.run_ended.remote(slot, GONE) for slot in gone])
        self._start_new(setup, setup.count - len(self.refs))

    def _start_new(self, setup: _SlotSetup, n: int) -> None:
        """n new slots: the cluster's slot hosts add each to the pool, then run its Ray Train run.
        Nothing here waits (not even for the hosts' start on a cluster's first submission)."""
        hosts = slot_hosts(self.placement) if n else None
        for _ in range(n):
            name = new_slot_name()
            run_name = slot_run_name(self.fleet, self.submission, name)
            config = setup.template | {"slot": name}
            self.refs[hosts.run.remote(config, run_name, self.storage, setup.restarts, setup.key)] = name

    def watch(self, slot: str) -> bool:
        """Follow a claimed slot's run until it ends; False if the cluster's slot hosts are gone
        (their node was lost before the run could tell the pool)."""
        hosts = existing_hosts()
        if hosts is not None:
            self.refs[hosts.ended.remote(slot)] = slot
        return hosts is not None

    def busy(self) -> bool:
        return bool(self.open)

    def poll(self, ready: list[Any]) -> list[JobEnd]:
        """Jobs the slots finished; when the last slot is gone, the jobs it left fail."""
        ends = [JobEnd(**end) for end in ray.get(self.board.take_ended.remote())]
        self.open -= {end.customer for end in ends}
        for ref in ready:  # a slot's own end: the jobs it finished ended on the board before
            slot = self.refs.pop(ref)
            try:
                error = ray.get(ref)
            except ray.exceptions.RayActorError as exc:  # its hosts died (their node was lost)
                error = root_cause(exc)
                pool().run_ended.remote(slot, error)  # it could not say so itself
            if error:
                self.failure = reason = f"{slot} failed: {error}"
            else:
                self.failure = ray.get(self.board.slot_failure.remote(slot)) or self.failure
                reason = self.failure or f"{slot} ended before it finished the job"
            lost = [c for c in ray.get(self.board.taken_by.remote(slot)) if c in self.open]
            ends += [JobEnd(c, "failed", reason) for c in lost]
            self.open -= set(lost)
        if not self.refs and self.open:
            reason = self.failure or "no slot left to train it"
            ends += [JobEnd(c, "failed", reason) for c in sorted(self.open)]
            self.open.clear()
        return ends


def cancel(fleet: str, customer: str | None = None, ray_address: str = "auto") -> None:
    """Ask a running submission to stop one job or all; works from another process."""
    join_cluster(ray_address)
    try:
        board = ray.get_actor(board_name(fleet), namespace=NAMESPACE)
    except ValueError:
        raise LorafleetError(f"no running submission of fleet '{fleet}' on this Ray cluster") from None
    ray.get(board.cancel.remote(customer))
