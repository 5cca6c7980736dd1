"""A fleet from file to registered adapters: validate, plan, launch, track, register. This module
is the only place that runs those stages in order; `lorafleet.train` runs jobs on Ray, and
`lorafleet.tracking` / `lorafleet.registry` hold every MLflow call.

- validate: `lorafleet.validate.check_fleet` (spec, base, datasets); a bad dataset fails its job.
- plan: a job MLflow run per customer; a job already trained with the same spec, data and base is
  reused (and registered if it never was), the rest become `JobPlan`s.
- launch: each plan goes to `lorafleet.train.runner.FleetExecution` as soon as it is made, so
  the first jobs train while the driver still writes the later ones' MLflow runs (a 1,000-job
  fleet no longer waits for a job's MLflow writes, 25 to 60 ms here, times 1,000 before its
  first step). With Ray up (or a cluster to join) the board's process starts while the fleet is
  validated and the slots as soon as it is valid, so their start-up overlaps the MLflow writes;
  otherwise the execution starts with the first job that trains, so a fleet that only reuses
  starts no local Ray.
- track: each tick the board's progress is copied into the job runs (state, metric history,
  where it ran).
- register: each adapter that trained becomes a version of its customer's registered model.
"""

from __future__ import annotations

import hashlib
import logging
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lorafleet import settings, tracking
from lorafleet.raystart import connect, joins_cluster
from lorafleet.spec import FleetSpec, JobSpec, RegistrySpec, load_fleet
from lorafleet.train.plan import JobPlan
from lorafleet.train.progress import board_name
from lorafleet.validate import FleetCheck, check_fleet

if TYPE_CHECKING:  # the runner imports Ray and torch: loaded when a fleet runs, not to validate
    from lorafleet.train.runner import FleetExecution, JobEnd


log = logging.getLogger(__name__)


@dataclass
class JobOutcome:
    customer: str
    state: str
    run_id: str
    reason: str | None = None
    metrics: dict[str, float] = field(default_factory=dict)
    adapter_dir: Path | None = None
    reused_from: str | None = None
    registered: str | None = None  # '<model>/<version>'


@dataclass
class FleetResult:
    fleet: str
    fleet_run_id: str
    jobs: dict[str, JobOutcome]
    launched_at: float | None = None  # when its Ray side started (time.time()); None: nothing started

    def ok(self) -> bool:
        return all(j.state == "succeeded" for j in self.jobs.values())


@dataclass(frozen=True)
class PlannedJob:
    """A job to train: what its worker gets, and the MLflow run that records it."""

    plan: JobPlan
    run_id: str


@dataclass
class Submission:
    """What planning produced: the jobs to launch and the outcomes already known."""

    fleet: str
    fleet_run_id: str
    exp_id: str
    registry: RegistrySpec | None  # None: train only, register nothing
    plans: dict[str, PlannedJob] = field(default_factory=dict)
    done: dict[str, JobOutcome] = field(default_factory=dict)
    slot_jobs: set[str] = field(default_factory=set)  # planned jobs that train in warm slots

    def run_id(self, customer: str) -> str:
        return self.plans[customer].run_id


def job_hash(job: JobSpec, data_sha: str, base_fp: str) -> str:
    """Identity of a job's result: same hash, same adapter; decides skip and resume."""
    return hashlib.sha256(f"{job.spec_hash()}|{data_sha}|{base_fp}".encode()).hexdigest()[:16]


# ---- validate + plan ---------------------------------------------------------------------


def open_submission(check: FleetCheck, fleet_file: Path, register: bool = True) -> Submission:
    """The fleet's MLflow experiment and fleet run, for a fleet that passed validation."""
    fleet = check.fleet
    c = tracking.client()
    exp_id = tracking.ensure_experiment(c, fleet.name)
    sub = Submission(
        fleet.name,
        tracking.start_fleet_run(c, exp_id, fleet.name, fleet_file, check.base_fingerprint),
        exp_id,
        fleet.registry if register else None,
    )
    return sub


def plan_jobs(
    sub: Submission, check: FleetCheck, fail_at_step: dict[str, int] | None = None
) -> Iterator[str]:
    """Open each job's MLflow run, in fleet-file order; yields the customers whose jobs are to
    train (bad data fails a job here, a job trained before is reused), as each is planned."""
    c = tracking.client()
    routes = check.own_run_reasons()
    for job in check.jobs:
        _plan_job(c, sub, job, check, (fail_at_step or {}).get(job.customer), routes[job.customer])
        if job.customer in sub.plans:
            yield job.customer


def _plan_job(
    c: Any, sub: Submission, job: JobSpec, check: FleetCheck, fail_at_step: int | None, own_run: str | None
) -> None:
    base_fp = check.base_fingerprint
    tags = {"spec_hash": job.spec_hash(), "base_fingerprint": base_fp}
    tags |= {"trains_in": "own run", "own_run_reason": own_run} if own_run else {"trains_in": "warm slot"}
    if job.customer in check.errors:
        reason = f"failed validation: {check.errors[job.customer]}"
        run_id = tracking.start_job_run(c, sub.exp_id, sub.fleet_run_id, job, tags)
        tracking.set_state(c, run_id, "failed", reason)
        sub.done[job.customer] = JobOutcome(job.customer, "failed", run_id, reason)
        return
    report = check.reports[job.customer]
    tags |= {"dataset_sha256": report.sha256, "job_hash": job_hash(job, report.sha256, base_fp)}
    prior = tracking.find_succeeded(c, sub.exp_id, job.customer, tags["job_hash"])
    run_id = tracking.start_job_run(c, sub.exp_id, sub.fleet_run_id, job, tags)
    tracking.log_dataset_report(c, run_id, report.as_dict())
    plan = JobPlan(
        job=job,
        base_fingerprint=base_fp,
        job_hash=tags["job_hash"],
        fleet_board=board_name(sub.fleet),
        fail_at_step=fail_at_step,
        dataset_sha256=report.sha256,  # the worker refuses bytes changed since validation
    )
    if prior:
        tracking.set_state(c, run_id, "succeeded")
        sub.done[job.customer] = _reuse(c, sub, plan, run_id, prior)
        return
    sub.plans[job.customer] = PlannedJob(plan, run_id)
    if own_run is None:
        sub.slot_jobs.add(job.customer)


def _reuse(c: Any, sub: Submission, plan: JobPlan, run_id: str, prior: Any) -> JobOutcome:
    """Same spec, data and base already trained: point at that run; register it if it never was."""
    outcome = JobOutcome(
        plan.job.customer,
        "succeeded",
        run_id,
        metrics=dict(prior.data.metrics),
        reused_from=prior.info.run_id,
        registered=prior.data.tags.get("lorafleet.registered_version"),
    )
    tracking.set_tags(c, run_id, {"reused_from": prior.info.run_id})
    if outcome.registered is None and sub.registry is not None:
        outcome.adapter_dir = tracking.download_adapter(c, prior.info.run_id)
        register_adapter(c, sub, plan, outcome)
    return outcome


# ---- track -------------------------------------------------------------------------------


class FleetMonitor:
    """Copies the board's events into MLflow and tracks each job's state (driver side)."""

    def __init__(self, c: Any, sub: Submission, execution: FleetExecution):
        self.c, self.sub, self.execution = c, sub, execution
        self.states = {cust: "queued" for cust in sub.plans}
        self.tags: dict[str, dict[str, str]] = {cust: {} for cust in sub.plans}

    def sync(self) -> dict[str, dict[str, Any]]:
        snapshot = self.execution.snapshot()
        for customer, events in self.execution.drain().items():
            tracking.log_history(self.c, self.sub.run_id(customer), events)
        for customer, info in snapshot.items():
            if self.states.get(customer) == "queued" and info.get("state") == "running":
                self.states[customer] = "running"
                run_id = self.sub.run_id(customer)
                tracking.set_state(self.c, run_id, "running")
                tracking.log_metric(self.c, run_id, "total_steps", info["total_steps"])
            self._tag(customer, attempt_tags(info.get("attempts", [])) | packing_tags(info))
        return snapshot

    def _tag(self, customer: str, tags: dict[str, str]) -> None:
        """Only changed tags are written."""
        written = self.tags[customer]
        changed = {k: v for k, v in tags.items() if written.get(k) != v}
        if changed:
            tracking.set_tags(self.c, self.sub.run_id(customer), changed)
            written |= changed


def attempt_tags(attempts: list[dict[str, Any]]) -> dict[str, str]:
    """Where the job runs (rank 0's node) and how often it started; an attempt that began past
    step 0 resumed from a checkpoint (after an earlier submission failed, or within this one
    after a crash or a lost node)."""
    if not attempts:
        return {}
    tags = {
        "node_id": attempts[-1]["node_id"],
        "attempts": str(len(attempts)),
        "node_ids": ",".join(a["node_id"] for a in attempts),
    }
    resumed = [a["start_step"] for a in attempts if a.get("start_step")]
    if resumed:
        tags["resumed_from_step"] = str(resumed[-1])
    return tags


def packing_tags(info: dict[str, Any]) -> dict[str, str]:
    """Which slot trained the job, with whom, how many jobs that slot trains at once, and whether
    the slot was kept warm from an earlier submission (`packing.keep_warm_s`)."""
    if "slot" not in info:
        return {}
    return {
        "slot": info["slot"],
        "slot_reused": str(bool(info.get("slot_reused"))).lower(),
        "pack_k": str(info["pack_k"]),
        "packed_with": ",".join(info.get("packed_with") or []) or "none",
    }


def record_end(c: Any, sub: Submission, end: JobEnd) -> JobOutcome:
    """Record one job's end in MLflow: the adapter on success, the reason otherwise."""
    run_id = sub.run_id(end.customer)
    if end.state != "succeeded":
        tracking.set_state(c, run_id, end.state, end.reason)
        return JobOutcome(end.customer, end.state, run_id, end.reason)
    adapter = Path(tempfile.mkdtemp(prefix=f"lorafleet-{end.customer}-")) / "adapter"
    adapter.mkdir(parents=True)
    for name, data in end.files.items():
        (adapter / name).write_bytes(data)
    tracking.log_adapter(c, run_id, adapter)
    # base_eval_loss too: a job resumed in a new run logged it only in its first attempt's run
    final = {k: v for k, v in end.metrics.items() if k in ("eval_loss", "train_loss", "base_eval_loss")}
    tracking.log_history(c, run_id, [{"step": end.metrics.get("step", 0), **final}])
    tracking.set_state(c, run_id, "succeeded")
    tracking.mark_beats_base(c, run_id)  # also for fleets that register nothing
    return JobOutcome(end.customer, "succeeded", run_id, metrics=end.metrics, adapter_dir=adapter)


# ---- register ----------------------------------------------------------------------------


def fail_planned(sub: Submission, customer: str, reason: str) -> None:
    """A planned job that will not go to Ray: failed on its run, and out of the plans."""
    planned = sub.plans.pop(customer)
    sub.slot_jobs.discard(customer)
    tracking.set_state(tracking.client(), planned.run_id, "failed", reason)
    sub.done[customer] = JobOutcome(customer, "failed", planned.run_id, reason)


def register_adapter(c: Any, sub: Submission, plan: JobPlan, outcome: JobOutcome) -> None:
    """A registry failure is recorded on the run; the trained adapter stays in its artefacts."""
    from lorafleet import registry

    try:
        source_run = outcome.reused_from or outcome.run_id  # the run holding the adapter
        mv = registry.register_job(c, plan.job, source_run, outcome.adapter_dir, sub.registry)
        outcome.registered = f"{mv.name}/{mv.version}"
    except Exception as exc:  # MLflow errors vary by store; the job itself did succeed
        tracking.set_tags(c, outcome.run_id, {"registration_error": str(exc)[:5000]})


# ---- the stages in order -----------------------------------------------------------------


class Launch:
    """The fleet's Ray side: Ray and the board (at once when Ray is up or a cluster is joined, else
    with the first job that trains), new slots as soon as the fleet is valid (Ray up), warm ones
    claimed with the first slot job; planned jobs are handed to it one by one."""

    def __init__(self, storage: str, ray_address: str | None, crash_at_step: dict[str, int]):
        self.storage, self.ray_address, self.crash_at_step = storage, ray_address, crash_at_step
        self.execution: FleetExecution | None = None
        self.launched_at: float | None = None  # when slots or the first job went to Ray (time.time())
        self.candidates: list[JobSpec] | None = None  # the fleet's slot candidates, found once

    def start(self, fleet: FleetSpec) -> FleetExecution:
        if self.execution is None:
            from lorafleet.train.runner import FleetExecution

            connect(self.ray_address)
            self.execution = FleetExecution(fleet.name, self.storage, fleet.packing, self.crash_at_step)
        return self.execution

    def prestart_slots(self, check: FleetCheck) -> None:
        """With Ray up, as soon as the fleet's spec and data are valid: the new slots the warm ones
        on the cluster cannot cover start, so their start-up (a Ray Train run, imports) overlaps
        the MLflow runs being written. They load the base only with a job: if every job turns out
        to be reused they end (or wait warm) having loaded nothing. Not where no node can hold
        a slot: its jobs fail at planning (placement_problem)."""
        candidates = self.slot_candidates(check)
        started = self.execution is not None and candidates
        started = started and not self.placement_problem(check, candidates[0].customer)
        if started and self.execution.prestart_slots(candidates, check.base_fingerprint):
            self.launched_at = self.launched_at or time.time()

    def add(self, sub: Submission, check: FleetCheck, customer: str) -> None:
        execution, candidates = self.start(check.fleet), self.slot_candidates(check)
        if customer in sub.slot_jobs and not execution.slots.started:
            execution.start_slots(candidates, check.base_fingerprint)
        if not candidates and self.launched_at is None:  # no slots here: free the warm ones now
            execution.release_warm_slots()
        self.launched_at = self.launched_at or time.time()
        execution.add(sub.plans[customer].plan, customer in sub.slot_jobs)

    def placement_problem(self, check: FleetCheck, customer: str) -> str | None:
        """Why a job can never start here: a cluster this process started (no autoscaler) whose
        nodes cannot hold its workers; it waited forever, queued with no reason. On a joined
        cluster, which may grow, the job waits, and the console says for what."""
        from lorafleet.raystart import fixed_size
        from lorafleet.train.runner import placement_problem

        self.start(check.fleet)
        job = next(j for j in check.jobs if j.customer == customer)
        problem = placement_problem(job.resources)
        if problem is None:
            return None
        if fixed_size():
            return f"{problem}: lower its resources, or submit to a larger cluster (--ray-address)"
        log.warning("%s waits until the cluster grows: it %s", customer, problem)
        return None

    def slot_candidates(self, check: FleetCheck) -> list[JobSpec]:
        """The fleet's slot candidates, found once per submission (over the whole fleet)."""
        if self.candidates is None:
            self.candidates = slot_candidates(check)
        return self.candidates

    def close(self) -> None:
        if self.execution is not None:
            self.execution.close()


def slot_candidates(check: FleetCheck) -> list[JobSpec]:
    """The jobs that may train in warm slots (their data is valid; some may yet be reused): the
    slots are sized for these before the last of them is planned."""
    routes = check.own_run_reasons()
    return [j for j in check.jobs if routes[j.customer] is None and j.customer not in check.errors]


def run_fleet(
    sub: Submission,
    execution: FleetExecution,
    on_tick: Callable[[dict], None] | None = None,
    on_finished: Callable[[JobOutcome], None] | None = None,
) -> FleetResult:
    """Track the launched jobs into MLflow, register each adapter; wait until all have ended."""
    c = tracking.client()
    monitor = FleetMonitor(c, sub, execution)
    outcomes = dict(sub.done)
    try:
        while execution.busy():
            ends = execution.poll()
            snapshot = monitor.sync()  # after the poll: the rows then show the final progress
            for end in ends:
                outcome = record_end(c, sub, end)
                if outcome.state == "succeeded" and sub.registry is not None:
                    register_adapter(c, sub, sub.plans[end.customer].plan, outcome)
                outcomes[end.customer] = outcome
                if on_finished:
                    on_finished(outcome)
            if on_tick:
                on_tick(_rows(sub, monitor.states, snapshot, outcomes))
    finally:
        execution.close()
    return close_fleet(c, sub, outcomes)


def close_fleet(c: Any, sub: Submission, outcomes: dict[str, JobOutcome]) -> FleetResult:
    state = "succeeded" if all(o.state == "succeeded" for o in outcomes.values()) else "failed"
    tracking.close_fleet_run(c, sub.fleet_run_id, state)
    return FleetResult(sub.fleet, sub.fleet_run_id, outcomes)


def _rows(sub: Submission, states: dict[str, str], snapshot: dict, outcomes: dict) -> dict:
    rows = {}
    for cust in list(sub.plans) + [c for c in sub.done if c not in sub.plans]:
        info = dict(snapshot.get(cust, {}))
        info["state"] = outcomes[cust].state if cust in outcomes else states.get(cust, "queued")
        if cust in outcomes:
            info["reason"] = outcomes[cust].reason
        rows[cust] = info
    return rows


def submit(
    fleet_file: str | Path,
    *,
    ray_address: str | None = None,
    storage: str | None = None,
    on_tick: Callable[[dict], None] | None = None,
    on_finished: Callable[[JobOutcome], None] | None = None,
    fail_at_step: dict[str, int] | None = None,
    register: bool = True,
    crash_at_step: dict[str, int] | None = None,
) -> FleetResult:
    """Validate, train every job of a fleet file, register each new adapter; returns outcomes.
    fail_at_step / crash_at_step (tests): a job raises at that step / its slot's process dies
    there (once)."""
    import ray

    fleet_file = Path(fleet_file)
    launch = Launch(storage or settings.storage_path(), ray_address, crash_at_step or {})
    try:
        if ray.is_initialized() or joins_cluster(ray_address):  # the board starts while validating
            launch.start(load_fleet(fleet_file))  # a spec error raises here, before anything starts
        check = check_fleet(fleet_file)
        launch.prestart_slots(check)  # with Ray up; else the slots start with the first slot job
        sub = open_submission(check, fleet_file, register)
        for customer in plan_jobs(sub, check, fail_at_step):
            if problem := launch.placement_problem(check, customer):
                fail_planned(sub, customer, problem)
            else:
                launch.add(sub, check, customer)
        if launch.launched_at is not None:
            launch.execution.seal()
    except BaseException:
        launch.close()
        raise
    if launch.launched_at is None:  # nothing to train: every job reused, or its data is bad
        launch.close()
        return close_fleet(tracking.client(), sub, dict(sub.done))
    result = run_fleet(sub, launch.execution, on_tick, on_finished)
    result.launched_at = launch.launched_at
    return result
