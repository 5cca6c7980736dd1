"""The fleet runner: validate every job, start all of them at once, let Ray queue what does not
fit, and keep MLflow in step with each job's state. One job's failure never touches the others.
"""

from __future__ import annotations

import hashlib
import tempfile
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import ray

from lorafleet import settings, tracking
from lorafleet.errors import LorafleetError
from lorafleet.spec import JobSpec, RegistrySpec
from lorafleet.train.progress import NAMESPACE, ProgressBoard, board_name
from lorafleet.train.worker import JobPlan
from lorafleet.validate import FleetCheck, check_fleet

RAY_ENV = {"env_vars": {"RAY_TRAIN_ENABLE_PRINT_PATCH": "0", "TOKENIZERS_PARALLELISM": "false"}}


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

    def ok(self) -> bool:
        return all(j.state == "succeeded" for j in self.jobs.values())


@dataclass
class Submission:
    """What submit prepared: the plans to launch and the outcomes already known."""

    fleet: str
    fleet_run_id: str
    exp_id: str
    registry: RegistrySpec | None  # None: train only, register nothing
    plans: dict[str, tuple[JobPlan, str]] = field(default_factory=dict)  # customer -> (plan, run)
    done: dict[str, JobOutcome] = field(default_factory=dict)


def job_hash(job: JobSpec, data_sha: str, base_fp: str) -> str:
    """Identity of a job's result: same hash, same adapter; decides skip and resume."""
    return hashlib.sha256(f"{job.spec_hash()}|{data_sha}|{base_fp}".encode()).hexdigest()[:16]


def ray_run_name(job: JobSpec, jhash: str) -> str:
    return f"{job.fleet}-{job.customer}-{jhash[:8]}"


def prepare(fleet_file: Path, fail_at_step: dict[str, int] | None = None,
            register: bool = True) -> Submission:
    """Validate spec and data, open the MLflow runs; bad jobs fail here, before any training."""
    check = check_fleet(fleet_file)
    fleet, base_fp = check.fleet, check.base_fingerprint
    c = tracking.client()
    exp_id = tracking.ensure_experiment(c, fleet.name)
    sub = Submission(fleet.name, tracking.start_fleet_run(c, exp_id, fleet.name, fleet_file, base_fp),
                     exp_id, fleet.registry if register else None)
    for job in check.jobs:
        _prepare_job(c, sub, job, check, (fail_at_step or {}).get(job.customer))
    return sub


def _prepare_job(c: Any, sub: Submission, job: JobSpec, check: FleetCheck,
                 fail_at_step: int | None) -> None:
    base_fp = check.base_fingerprint
    tags = {"spec_hash": job.spec_hash(), "base_fingerprint": base_fp}
    if job.customer in check.errors:
        reason = f"invalid dataset: {check.errors[job.customer]}"
        run_id = tracking.start_job_run(c, sub.exp_id, sub.fleet_run_id, job, tags)
        tracking.set_state(c, run_id, "failed", reason)
        sub.done[job.customer] = JobOutcome(job.customer, "failed", run_id, reason)
        return
    report = check.reports[job.customer]
    tags |= {"dataset_sha256": report.sha256, "job_hash": job_hash(job, report.sha256, base_fp)}
    prior = tracking.find_succeeded(c, sub.exp_id, job.customer, tags["job_hash"])
    run_id = tracking.start_job_run(c, sub.exp_id, sub.fleet_run_id, job, tags)
    c.log_dict(run_id, report.as_dict(), "dataset_report.json")
    plan = JobPlan(job=job, base_fingerprint=base_fp, job_hash=tags["job_hash"],
                   fleet_board=board_name(sub.fleet), fail_at_step=fail_at_step)
    if prior:
        tracking.set_state(c, run_id, "succeeded")
        sub.done[job.customer] = _reuse(c, sub, plan, run_id, prior)
        return
    sub.plans[job.customer] = (plan, run_id)


def _reuse(c: Any, sub: Submission, plan: JobPlan, run_id: str, prior: Any) -> JobOutcome:
    """Same spec, data and base already trained: point at that run; register it if it never was."""
    outcome = JobOutcome(plan.job.customer, "succeeded", run_id,
                         metrics=dict(prior.data.metrics), reused_from=prior.info.run_id,
                         registered=prior.data.tags.get("lorafleet.registered_version"))
    c.set_tag(run_id, "lorafleet.reused_from", prior.info.run_id)
    if outcome.registered is None and sub.registry is not None:
        folder = c.download_artifacts(prior.info.run_id, "adapter", tempfile.mkdtemp())
        outcome.adapter_dir = Path(folder)
        _register(c, sub, plan, outcome)
    return outcome


@ray.remote(num_cpus=0, max_retries=0)
def run_job(plan_json: dict[str, Any], run_name: str, storage: str) -> dict[str, Any]:
    """One job through Ray Train; returns the adapter's files (small) and final metrics."""
    import torch
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.huggingface.transformers import RayTrainReportCallback
    from ray.train.torch import TorchConfig, TorchTrainer

    from lorafleet.train.worker import ADAPTER_FILES, train_loop_per_worker

    res = JobPlan.model_validate(plan_json).job.resources
    per_worker = {"CPU": res.cpus_per_worker} | ({"GPU": res.gpus_per_worker} if res.gpus_per_worker else {})
    trainer = TorchTrainer(
        train_loop_per_worker, train_loop_config=plan_json,
        torch_config=TorchConfig(backend="nccl" if torch.cuda.is_available() else "gloo"),
        scaling_config=ScalingConfig(num_workers=res.workers, use_gpu=res.gpus_per_worker > 0,
                                     resources_per_worker=per_worker),
        run_config=RunConfig(name=run_name, storage_path=storage,
                             failure_config=FailureConfig(max_failures=res.max_failures),
                             checkpoint_config=CheckpointConfig(num_to_keep=2)),
    )
    start = time.perf_counter()
    result = trainer.fit()
    fit_s = time.perf_counter() - start
    with result.checkpoint.as_directory() as folder:
        hf = Path(folder) / RayTrainReportCallback.CHECKPOINT_NAME
        files = {name: (hf / name).read_bytes() for name in ADAPTER_FILES}
    metrics = {k: v for k, v in result.metrics.items() if isinstance(v, int | float)}
    return {"files": files, "metrics": metrics | {"job_wall_s": fit_s}}


class FleetMonitor:
    """Driver-side loop state: copies board events into MLflow and tracks each job's state."""

    def __init__(self, c: Any, sub: Submission, board: Any):
        self.c, self.sub, self.board = c, sub, board
        self.states = {cust: "queued" for cust in sub.plans}

    def sync(self) -> dict[str, dict[str, Any]]:
        snapshot = ray.get(self.board.snapshot.remote())
        for customer, events in ray.get(self.board.drain.remote()).items():
            run_id = self.sub.plans[customer][1]
            tracking.log_history(self.c, run_id, events)
        for customer, info in snapshot.items():
            if self.states.get(customer) == "queued" and info.get("state") == "running":
                self.states[customer] = "running"
                run_id = self.sub.plans[customer][1]
                tracking.set_state(self.c, run_id, "running")
                self.c.log_metric(run_id, "total_steps", info["total_steps"])
                if info.get("resumed"):
                    self.c.set_tag(run_id, "lorafleet.resumed_from_step", str(info["start_step"]))
        return snapshot


def _root_cause(exc: BaseException) -> str:
    """The user's error inside Ray's wrappers: its last line is what went wrong."""
    text = "".join(traceback.format_exception_only(type(exc), exc)).strip()
    lines = [ln for ln in text.splitlines() if ln.strip()]
    causes = [ln for ln in lines if "Error" in ln or "Exception" in ln or "Fault" in ln]
    return (causes[-1] if causes else lines[-1]).strip()[:2000]


def finish_job(c: Any, sub: Submission, customer: str, ref: Any, cancelled: bool) -> JobOutcome:
    """Record one job's end in MLflow: the adapter on success, the reason otherwise."""
    _, run_id = sub.plans[customer]
    try:
        out = ray.get(ref)
    except Exception as exc:  # any job error (Ray wraps the worker's) is that job's alone
        state = "cancelled" if cancelled else "failed"
        reason = "cancelled by user" if cancelled else _root_cause(exc)
        tracking.set_state(c, run_id, state, reason)
        return JobOutcome(customer, state, run_id, reason)
    adapter = Path(tempfile.mkdtemp(prefix=f"lorafleet-{customer}-")) / "adapter"
    adapter.mkdir(parents=True)
    for name, data in out["files"].items():
        (adapter / name).write_bytes(data)
    c.log_artifacts(run_id, str(adapter), "adapter")
    tracking.log_history(c, run_id, [{"step": out["metrics"].get("step", 0), **_final(out["metrics"])}])
    tracking.set_state(c, run_id, "succeeded")
    outcome = JobOutcome(customer, "succeeded", run_id, metrics=out["metrics"], adapter_dir=adapter)
    if sub.registry is not None:
        _register(c, sub, sub.plans[customer][0], outcome)
    return outcome


def _final(metrics: dict[str, float]) -> dict[str, float]:
    return {k: v for k, v in metrics.items() if k in ("eval_loss", "train_loss")}


def _register(c: Any, sub: Submission, plan: JobPlan, outcome: JobOutcome) -> None:
    """A registry failure is recorded on the run; the trained adapter stays in its artefacts."""
    from lorafleet import registry

    try:
        source_run = outcome.reused_from or outcome.run_id  # the run holding the adapter
        mv = registry.register_job(c, plan.job, source_run, outcome.adapter_dir, sub.registry)
        outcome.registered = f"{mv.name}/{mv.version}"
    except Exception as exc:  # MLflow errors vary by store; the job itself did succeed
        c.set_tag(outcome.run_id, "lorafleet.registration_error", str(exc)[:5000])


def init_ray(address: str | None) -> None:
    if not ray.is_initialized():
        ray.init(address=address, namespace=NAMESPACE, runtime_env=RAY_ENV,
                 log_to_driver=False, include_dashboard=False)


def run_fleet(sub: Submission, storage: str, on_tick: Callable[[dict], None] | None = None,
              on_finished: Callable[[JobOutcome], None] | None = None) -> FleetResult:
    """Launch every planned job at once and wait; Ray holds the ones that do not fit yet."""
    c = tracking.client()
    board = ProgressBoard.options(name=board_name(sub.fleet), namespace=NAMESPACE).remote()
    monitor = FleetMonitor(c, sub, board)
    refs = {run_job.remote(plan.model_dump(mode="json"), ray_run_name(plan.job, plan.job_hash),
                           storage): cust for cust, (plan, _) in sub.plans.items()}
    outcomes = dict(sub.done)
    try:
        while refs:
            ready, _ = ray.wait(list(refs), num_returns=1, timeout=1.0)
            snapshot = monitor.sync()
            _cancel_queued(board, refs, monitor)
            for ref in ready:
                cust = refs.pop(ref)
                monitor.sync()
                cancelled = ray.get(board.is_cancelled.remote(cust))
                outcomes[cust] = finish_job(c, sub, cust, ref, cancelled)
                if on_finished:
                    on_finished(outcomes[cust])
            if on_tick:
                on_tick(_rows(sub, monitor.states, snapshot, outcomes))
    finally:
        ray.kill(board)
    return close_fleet(c, sub, outcomes)


def close_fleet(c: Any, sub: Submission, outcomes: dict[str, JobOutcome]) -> FleetResult:
    state = "succeeded" if all(o.state == "succeeded" for o in outcomes.values()) else "failed"
    c.set_tag(sub.fleet_run_id, "lorafleet.state", state)
    c.set_terminated(sub.fleet_run_id, "FINISHED")
    return FleetResult(sub.fleet, sub.fleet_run_id, outcomes)


def _cancel_queued(board: Any, refs: dict[Any, str], monitor: FleetMonitor) -> None:
    """A job cancelled before it started is cancelled as a task; a running one stops itself."""
    cancelled = ray.get(board.cancelled_names.remote())  # one actor call a tick, not one per job
    if not cancelled:
        return
    for ref, cust in refs.items():
        if monitor.states[cust] == "queued" and (cust in cancelled or "*" in cancelled):
            ray.cancel(ref)


def _rows(sub: Submission, states: dict[str, str], snapshot: dict, outcomes: dict) -> dict:
    rows = {}
    for cust in list(sub.plans) + [c for c in sub.done if c not in sub.plans]:
        info = dict(snapshot.get(cust, {}))
        info["state"] = outcomes[cust].state if cust in outcomes else states.get(cust, "queued")
        if cust in outcomes:
            info["reason"] = outcomes[cust].reason
        rows[cust] = info
    return rows


def submit(fleet_file: str | Path, *, ray_address: str | None = None, storage: str | None = None,
           on_tick: Callable[[dict], None] | None = None,
           on_finished: Callable[[JobOutcome], None] | None = None,
           fail_at_step: dict[str, int] | None = None, register: bool = True) -> FleetResult:
    """Validate, train every job of a fleet file, register each new adapter; returns outcomes."""
    sub = prepare(Path(fleet_file), fail_at_step, register)
    if not sub.plans:
        return close_fleet(tracking.client(), sub, dict(sub.done))
    init_ray(ray_address)
    return run_fleet(sub, storage or settings.storage_path(), on_tick, on_finished)


def cancel(fleet: str, customer: str | None = None, ray_address: str = "auto") -> None:
    """Ask a running submission to stop one job or all; works from another process."""
    init_ray(ray_address)
    try:
        board = ray.get_actor(board_name(fleet), namespace=NAMESPACE)
    except ValueError:
        raise LorafleetError(f"no running submission of fleet '{fleet}' on this Ray cluster") from None
    ray.get(board.cancel.remote(customer))
