"""`lorafleet bench scale`: many short jobs on a simulated multi-node cluster, to measure the
orchestration rather than the training.

The cluster is `ray.cluster_utils.Cluster`: a GPU-less head (driver, Train controllers, progress
board) and N worker nodes, each a raylet on this machine declaring GPUs and CPUs it may not have.
Jobs are placed by those declared resources and train on the real CPU. Eligible jobs train in
warm slots (one per job-sized place in the cluster, each co-training up to K jobs on one base
copy); `--no-packing` runs one Ray Train run per job instead. The figures:

- slot utilisation: the share of slots x makespan during which a slot had a job in training or
  setting up (for each slot, the union of its jobs' [placed, ended] intervals: placed = the slot
  took the job, which covers model load for its first one; ended = end of training). Jobs in
  their own runs count each run as a slot.
- makespan against ideal packing: ideal = those busy slot-seconds spread evenly over the slots
  with no gap; what the makespan adds is orchestration (worker start, Ray Train set-up, idle
  slots waiting for work, the tail where some slots are done). It is 1 / utilisation.
- time from submit to the first worker placed and to the first training step.
- slot idle gaps: within a slot's life, the periods with no job (a handover between jobs).
- warm slot utilisation: busy time over each slot's span from its first job to its last end, so
  without the slots' start-up (Ray Train's controller and worker processes) and the tail: a
  diagnostic of the handovers, not the goal's figure.

The makespan counts from the fleet's launch (its Ray side started: new slots right after
validation, so the MLflow runs are written while they start; with warm slots only, the first job
handed to them) to `submit`'s return. Before the slots started early, launch came after the first
job's MLflow run: the cold makespan then left about 5 s of slot start-up out.

The fleet runs twice on the same cluster: cold (its slots start with it; the top-level
figures) and warm (`warm`: a second fleet of the same jobs under another name, on the slots the
first kept warm with `packing.keep_warm_s`, as a process that submits fleets one after another
gets them).

On a machine with fewer real cores than slots, jobs and Ray's own processes compete for the CPU,
so every figure here is inflated by that contention; compare runs on the same machine only.
"""

from __future__ import annotations

import os
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import yaml

from lorafleet.settings import environ

# a crashed node is declared dead within ~3 s; not exercised here, but keeps shutdown quick
_SYSTEM_CONFIG = {"health_check_period_ms": 1000, "health_check_failure_threshold": 3}


def start_cluster(nodes: int, gpus_per_node: float, cpus_per_node: float) -> Any:
    import ray
    from ray.cluster_utils import Cluster

    from lorafleet.raystart import cluster_env, init_ray, mark_cluster

    ray.shutdown()
    with cluster_env() as address:  # its nodes inherit the worker env, as a local cluster's do
        cluster = Cluster(
            initialize_head=True,
            head_node_args={"num_cpus": 1, "num_gpus": 0, "_system_config": _SYSTEM_CONFIG},
        )
        for _ in range(nodes):
            cluster.add_node(num_cpus=cpus_per_node, num_gpus=gpus_per_node)
        cluster.wait_for_nodes()
    if cluster.address == address:
        mark_cluster(address)
    init_ray(cluster.address)
    return cluster


def fleet_file(
    folder: Path,
    base: str,
    dataset: Path,
    n_jobs: int,
    training: dict,
    resources: dict,
    packing: dict,
    name: str = "bench-scale",
) -> Path:
    spec = {
        "name": name,
        "base_model": base,
        "defaults": {"training": training, "resources": resources, "lora": {"rank": 4}},
        "packing": packing,
        "jobs": [{"customer": f"job-{i:03d}", "dataset": str(dataset)} for i in range(n_jobs)],
    }
    path = folder / f"{name}.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


class LastRows:
    """on_tick recorder: the latest progress rows, with each job's attempts (node, times)."""

    def __init__(self) -> None:
        self.rows: dict[str, dict] = {}

    def __call__(self, rows: dict[str, dict]) -> None:
        self.rows = rows


def _attempts(rows: dict[str, dict]) -> list[dict]:
    return [a for info in rows.values() for a in info.get("attempts", []) if "ended" in a]


def union(intervals: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """Overlapping intervals merged, in order."""
    merged: list[tuple[float, float]] = []
    for start, end in sorted(intervals):
        if merged and start <= merged[-1][1]:
            merged[-1] = (merged[-1][0], max(merged[-1][1], end))
        else:
            merged.append((start, end))
    return merged


def slot_timelines(attempts: list[dict]) -> dict[str, list[tuple[float, float]]]:
    """Per slot (a warm slot's id; a job's own run is a slot of its own), its busy intervals."""
    slots: dict[str, list[tuple[float, float]]] = {}
    for i, a in enumerate(attempts):
        slots.setdefault(a.get("slot") or f"run-{i}", []).append((a["placed"], a["ended"]))
    return {slot: union(spans) for slot, spans in slots.items()}


def idle_gaps(timelines: dict[str, list[tuple[float, float]]]) -> list[float]:
    return [b[0] - a[1] for spans in timelines.values() for a, b in zip(spans, spans[1:], strict=False)]


def max_concurrent(intervals: list[tuple[float, float]]) -> int:
    """Most intervals open at one instant (an end at t comes before a start at t)."""
    events = sorted([(s, 1) for s, _ in intervals] + [(e, -1) for _, e in intervals])
    running = peak = 0
    for _, delta in events:
        running += delta
        peak = max(peak, running)
    return peak


def _stats(values: list[float]) -> dict[str, float]:
    if not values:
        return {}
    ordered = sorted(values)
    return {
        "n": len(values),
        "median": statistics.median(ordered),
        "mean": statistics.fmean(ordered),
        "p90": ordered[min(len(ordered) - 1, int(0.9 * len(ordered)))],
        "max": ordered[-1],
    }


def figures(
    t0: float,
    t_launch: float,
    t_end: float,
    rows: dict[str, dict],
    walls: list[float],
    slots: int,
) -> dict[str, Any]:
    attempts = _attempts(rows)
    makespan = t_end - t_launch
    timelines = slot_timelines(attempts)
    busy = sum(end - start for spans in timelines.values() for start, end in spans)
    slots = max(slots, len([s for s in timelines if not s.startswith("run-")]))
    nodes: dict[str, int] = {}
    for a in attempts:
        nodes[a["node_id"][:12]] = nodes.get(a["node_id"][:12], 0) + 1
    return {
        "prepare_s": t_launch - t0,
        "submit_to_first_placed_s": min(a["placed"] for a in attempts) - t0,
        "submit_to_first_training_s": min(a["started"] for a in attempts) - t0,
        "makespan_s": makespan,
        "makespan_incl_prepare_s": t_end - t0,
        # from the last job's end in its slot to the driver's return (its MLflow writes)
        "driver_tail_s": t_end - max(a["ended"] for a in attempts),
        "job_slot_s": _stats([a["ended"] - a["placed"] for a in attempts]),
        "job_fit_wall_s": _stats(walls),
        "slots": slots,
        "slot_busy_s": busy,
        "ideal_s": busy / slots,
        "makespan_vs_ideal": makespan * slots / busy,
        "slot_utilisation": busy / (slots * makespan),
        # the same share counted from each slot's first job to its last: once warm, how busy
        "warm_slot_utilisation": busy / sum(spans[-1][1] - spans[0][0] for spans in timelines.values()),
        "slot_idle_gap_s": _stats(idle_gaps(timelines)),
        "peak_concurrent_jobs": max_concurrent([(a["placed"], a["ended"]) for a in attempts]),
        "jobs_per_node": nodes,
    }


def run_scale_bench(
    base: str,
    dataset: Path,
    n_jobs: int = 50,
    steps: int = 2,
    nodes: int = 4,
    gpus_per_node: float = 1,
    cpus_per_node: float = 2,
    gpus_per_job: float = 1,
    cpus_per_job: float = 1,
    packing: bool = True,
) -> dict[str, Any]:
    import ray

    from lorafleet.train.runner import queue_depth

    training = {
        "max_steps": steps,
        "batch_size": 4,
        "max_length": 64,
        "save_steps": 1000,
        "logging_steps": 1,
        "eval_fraction": 0.0,
    }
    resources = {"gpus_per_worker": gpus_per_job, "cpus_per_worker": cpus_per_job}
    per_node = int(
        min(gpus_per_node / gpus_per_job if gpus_per_job else float("inf"), cpus_per_node / cpus_per_job)
    )
    config = {
        "nodes": nodes,
        "gpus_per_node": gpus_per_node,
        "cpus_per_node": cpus_per_node,
        "jobs": n_jobs,
        "steps": steps,
        "base": base,
        "resources_per_job": resources,
        "slots": per_node * nodes,
        "queue_depth": queue_depth(),
        "real_cpus": os.cpu_count(),
        "packing": packing,
        "training": training,
        "dataset": str(dataset),
        "loadavg_1_5_15_before": os.getloadavg(),
    }
    # a throwaway MLflow store and checkpoint folder
    with tempfile.TemporaryDirectory() as tmp, environ({"LORAFLEET_HOME": tmp}):
        start = time.perf_counter()
        cluster = start_cluster(nodes, gpus_per_node, cpus_per_node)
        config["cluster_start_s"] = time.perf_counter() - start
        try:
            # cold: the slots start with the fleet; they stay warm for the second fleet (same
            # jobs, another name so nothing is reused), whose figures are those of warm slots
            cold = timed_fleet(Path(tmp), "bench-scale", n_jobs, config, keep_warm_s=120 if packing else 0)
            warm = timed_fleet(Path(tmp), "bench-scale-warm", n_jobs, config) if packing else None
        finally:
            ray.shutdown()
            cluster.shutdown()
    config["loadavg_1_5_15_after"] = os.getloadavg()
    return {"config": config, **cold} | ({"warm": warm} if warm else {})


def timed_fleet(folder: Path, name: str, n_jobs: int, config: dict, keep_warm_s: float = 0) -> dict:
    """One fleet of the bench's jobs through `submit`, and its figures; the makespan counts from
    the fleet's launch (its Ray side started: see the module's docstring)."""
    from lorafleet.pipeline import submit

    packing = {"enabled": config["packing"], "keep_warm_s": keep_warm_s}
    base, dataset, training = config["base"], Path(config["dataset"]), config["training"]
    path = fleet_file(folder, base, dataset, n_jobs, training, config["resources_per_job"], packing, name)
    rows = LastRows()
    t0 = time.time()
    result = submit(path, register=False, storage=str(folder / "checkpoints"), on_tick=rows)
    t_end = time.time()
    t_launch = result.launched_at or t0
    bad = {c: o.reason for c, o in result.jobs.items() if o.state != "succeeded"}
    if bad:
        raise RuntimeError(f"benchmark jobs failed: {bad}")
    walls = [o.metrics["job_wall_s"] for o in result.jobs.values()]
    return figures(t0, t_launch, t_end, rows.rows, walls, config["slots"])
