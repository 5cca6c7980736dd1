"""The fleet runner: validate every job, hand them to Ray (as many as the cluster can run plus a
queue of half a cluster; Ray places and queues those), and keep MLflow in step with each job's
state and node. One job's failure never touches the others; a lost worker node costs its jobs a
restart from their last checkpoint when `max_failures` allows.
"""

from __future__ import annotations

import hashlib
import os
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

# Ray Train gives a worker group 60 s to start; importing torch, transformers and trl took longer
# than that on a loaded 2-core machine (jobs failed with a ControllerError), and can on a busy node.
RAY_ENV = {
    "env_vars": {
        "RAY_TRAIN_ENABLE_PRINT_PATCH": "0",
        "TOKENIZERS_PARALLELISM": "false",
        "RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S": os.environ.get(
            "RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S", "600"
        ),
    }
}


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


def prepare(
    fleet_file: Path, fail_at_step: dict[str, int] | None = None, register: bool = True
) -> Submission:
    """Validate spec and data, open the MLflow runs; bad jobs fail here, before any training."""
    check = check_fleet(fleet_file)
    fleet, base_fp = check.fleet, check.base_fingerprint
    c = tracking.client()
    exp_id = tracking.ensure_experiment(c, fleet.name)
    sub = Submission(
        fleet.name,
        tracking.start_fleet_run(c, exp_id, fleet.name, fleet_file, base_fp),
        exp_id,
        fleet.registry if register else None,
    )
    for job in check.jobs:
        _prepare_job(c, sub, job, check, (fail_at_step or {}).get(job.customer))
    return sub


def _prepare_job(c: Any, sub: Submission, job: JobSpec, check: FleetCheck, fail_at_step: int | None) -> None:
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
    plan = JobPlan(
        job=job,
        base_fingerprint=base_fp,
        job_hash=tags["job_hash"],
        fleet_board=board_name(sub.fleet),
        fail_at_step=fail_at_step,
    )
    if prior:
        tracking.set_state(c, run_id, "succeeded")
        sub.done[job.customer] = _reuse(c, sub, plan, run_id, prior)
        return
    sub.plans[job.customer] = (plan, run_id)


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
    c.set_tag(run_id, "lorafleet.reused_from", prior.info.run_id)
    if outcome.registered is None and sub.registry is not None:
        folder = c.download_artifacts(prior.info.run_id, "adapter", tempfile.mkdtemp())
        outcome.adapter_dir = Path(folder)
        _register(c, sub, plan, outcome)
    return outcome


def torch_backend(gpus_per_worker: float) -> str:
    """The process-group backend, chosen from the torch build rather than this process's devices:
    this task runs on the driver's node, often a CPU-only head, while the workers hold the GPUs.
    With GPUs, CUDA tensors go over NCCL and CPU tensors over gloo, so a job still trains when a
    node declares GPUs that are not usable (the worker then falls back to the CPU)."""
    import torch.distributed as dist

    if gpus_per_worker > 0 and dist.is_nccl_available():
        return "cpu:gloo,cuda:nccl"
    return "gloo"


def driver_node_affinity() -> Any:
    """Keep the job's Ray Train controller and the progress board on the driver's node: they hold
    no resources, and on a worker node the loss of that node would take down the whole job (or the
    fleet's board) instead of just its workers, which Ray Train restarts elsewhere. Hard affinity:
    with soft=True Ray 2.60 still put the board actor on a worker node. The node is alive while
    the driver is, and nothing here requests resources, so it always fits."""
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    return NodeAffinitySchedulingStrategy(node_id=ray.get_runtime_context().get_node_id(), soft=False)


def train_loop(config: dict[str, Any]) -> None:
    """The worker's loop, run where Ray placed it. Ray Train exports ACCELERATE_TORCH_DEVICE from
    the GPU ids Ray assigned (cuda:N) whether or not torch can use CUDA there, and accelerate then
    puts the trainer on CUDA even with use_cpu. A node that declares a GPU torch cannot use (a
    simulated cluster, a CPU build of torch) trains on the CPU instead of crashing."""
    _announce_placement(config)  # first: imports below take seconds on a busy node
    import torch

    from lorafleet.train.worker import train_loop_per_worker

    if not torch.cuda.is_available() and os.environ.get("ACCELERATE_TORCH_DEVICE", "").startswith("cuda"):
        os.environ["ACCELERATE_TORCH_DEVICE"] = "cpu"
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
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.huggingface.transformers import RayTrainReportCallback
    from ray.train.torch import TorchConfig, TorchTrainer

    from lorafleet.train.worker import ADAPTER_FILES

    res = JobPlan.model_validate(plan_json).job.resources
    per_worker = {"CPU": res.cpus_per_worker} | ({"GPU": res.gpus_per_worker} if res.gpus_per_worker else {})
    trainer = TorchTrainer(
        train_loop,
        train_loop_config=plan_json,
        torch_config=TorchConfig(backend=torch_backend(res.gpus_per_worker)),
        # use_gpu only reserves the GPU (ScalingConfig requires it with a GPU resource) and sets
        # CUDA_VISIBLE_DEVICES; Ray Train touches CUDA only if torch sees a device
        scaling_config=ScalingConfig(
            num_workers=res.workers, use_gpu=res.gpus_per_worker > 0, resources_per_worker=per_worker
        ),
        run_config=RunConfig(
            name=run_name,
            storage_path=storage,
            failure_config=FailureConfig(max_failures=res.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=2),
        ),
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
        self.tags: dict[str, dict[str, str]] = {cust: {} for cust in sub.plans}

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
            self._tag_attempts(customer, info.get("attempts", []))
        return snapshot

    def _tag_attempts(self, customer: str, attempts: list[dict[str, Any]]) -> None:
        """Tag where the job runs (rank 0's node) and how often it started; an attempt that began
        past step 0 resumed from a checkpoint (after an earlier submission failed, or within this
        one after a crash or a lost node). Only changed tags are written."""
        if not attempts:
            return
        tags = {
            "lorafleet.node_id": attempts[-1]["node_id"],
            "lorafleet.attempts": str(len(attempts)),
            "lorafleet.node_ids": ",".join(a["node_id"] for a in attempts),
        }
        resumed = [a["start_step"] for a in attempts if a.get("start_step")]
        if resumed:
            tags["lorafleet.resumed_from_step"] = str(resumed[-1])
        run_id, written = self.sub.plans[customer][1], self.tags[customer]
        for key, value in tags.items():
            if written.get(key) != value:
                self.c.set_tag(run_id, key, value)
                written[key] = value


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
        ray.init(
            address=address,
            namespace=NAMESPACE,
            runtime_env=RAY_ENV,
            log_to_driver=False,
            include_dashboard=False,
        )


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

    def __init__(self, sub: Submission, storage: str, placement: Any):
        self.sub, self.storage, self.placement = sub, storage, placement
        self.pending = list(sub.plans)
        self.refs: dict[Any, str] = {}
        self.demand = {cust: job_demand(plan.job) for cust, (plan, _) in sub.plans.items()}

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
            plan = self.sub.plans[cust][0]
            ref = run_job.options(scheduling_strategy=self.placement).remote(
                plan.model_dump(mode="json"), ray_run_name(plan.job, plan.job_hash), self.storage
            )
            self.refs[ref] = cust

    def busy(self) -> bool:
        return bool(self.pending or self.refs)


def run_fleet(
    sub: Submission,
    storage: str,
    on_tick: Callable[[dict], None] | None = None,
    on_finished: Callable[[JobOutcome], None] | None = None,
) -> FleetResult:
    """Launch the planned jobs (as many as the cluster can place or queue) and wait."""
    c = tracking.client()
    here = driver_node_affinity()
    board = ProgressBoard.options(
        name=board_name(sub.fleet), namespace=NAMESPACE, scheduling_strategy=here
    ).remote()
    monitor = FleetMonitor(c, sub, board)
    launcher = Launcher(sub, storage, here)
    outcomes = dict(sub.done)

    def finished(outcome: JobOutcome) -> None:
        outcomes[outcome.customer] = outcome
        if on_finished:
            on_finished(outcome)

    try:
        while launcher.busy():
            launcher.launch()
            ready = ray.wait(list(launcher.refs), num_returns=1, timeout=1.0)[0] if launcher.refs else []
            snapshot = monitor.sync()
            for cust in _cancel_queued(board, launcher, monitor):
                finished(cancel_pending(c, sub, cust))
            for ref in ready:
                cust = launcher.refs.pop(ref)
                snapshot = monitor.sync()  # fresh: the rows then show this job's final progress
                cancelled = ray.get(board.is_cancelled.remote(cust))
                finished(finish_job(c, sub, cust, ref, cancelled))
            if on_tick:
                on_tick(_rows(sub, monitor.states, snapshot, outcomes))
    finally:
        ray.kill(board)
    return close_fleet(c, sub, outcomes)


def cancel_pending(c: Any, sub: Submission, customer: str) -> JobOutcome:
    """A job cancelled before it was handed to Ray: nothing to stop."""
    run_id = sub.plans[customer][1]
    tracking.set_state(c, run_id, "cancelled", "cancelled by user")
    return JobOutcome(customer, "cancelled", run_id, "cancelled by user")


def close_fleet(c: Any, sub: Submission, outcomes: dict[str, JobOutcome]) -> FleetResult:
    state = "succeeded" if all(o.state == "succeeded" for o in outcomes.values()) else "failed"
    c.set_tag(sub.fleet_run_id, "lorafleet.state", state)
    c.set_terminated(sub.fleet_run_id, "FINISHED")
    return FleetResult(sub.fleet, sub.fleet_run_id, outcomes)


def _cancel_queued(board: Any, launcher: Launcher, monitor: FleetMonitor) -> list[str]:
    """A job cancelled before it started is cancelled as a task, or dropped if still waiting here
    (returned); a running one stops itself."""
    cancelled = ray.get(board.cancelled_names.remote())  # one actor call a tick, not one per job
    if not cancelled:
        return []
    for ref, cust in launcher.refs.items():
        if monitor.states[cust] == "queued" and (cust in cancelled or "*" in cancelled):
            ray.cancel(ref)
    dropped = [cust for cust in launcher.pending if cust in cancelled or "*" in cancelled]
    launcher.pending = [cust for cust in launcher.pending if cust not in dropped]
    return dropped


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
) -> FleetResult:
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
