"""`lorafleet bench scale`: many short jobs on a simulated multi-node cluster, to measure the
orchestration rather than the training.

The cluster is `ray.cluster_utils.Cluster`: a GPU-less head (driver, Train controllers, progress
board) and N worker nodes, each a raylet on this machine declaring GPUs and CPUs it may not have.
Jobs are placed by those declared resources and train on the real CPU. The figures:

- makespan against ideal packing: each job's slot time is taken from its worker group starting
  (the train function entered) to its end of training, which covers model load, trainer set-up
  and the steps; ideal = the sum of those over the slots (jobs the cluster runs at once). What
  the makespan adds is orchestration: worker process start, Ray Train set-up, checkpoint report,
  teardown, placement of the next job. `fit()` walls are reported too, but are no job duration:
  up to queue_depth x slots jobs sit inside `fit()` at once, the extra ones waiting in Ray's queue.
- time from submit to the first worker group placed and to the first training step.
- the scheduler's overhead per job: slot-seconds per job not spent in a job's train function
  ((makespan x slots - sum of slot times) / jobs), and the slot handover: from a job's end of
  training on a node to the next job's worker group starting there.

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

# a crashed node is declared dead within ~3 s; not exercised here, but keeps shutdown quick
_SYSTEM_CONFIG = {"health_check_period_ms": 1000, "health_check_failure_threshold": 3}


def start_cluster(nodes: int, gpus_per_node: float, cpus_per_node: float) -> Any:
    import ray
    from ray.cluster_utils import Cluster

    from lorafleet.raystart import init_ray

    ray.shutdown()
    cluster = Cluster(
        initialize_head=True, head_node_args={"num_cpus": 1, "num_gpus": 0, "_system_config": _SYSTEM_CONFIG}
    )
    for _ in range(nodes):
        cluster.add_node(num_cpus=cpus_per_node, num_gpus=gpus_per_node)
    cluster.wait_for_nodes()
    init_ray(cluster.address)
    return cluster


def fleet_file(folder: Path, base: str, dataset: Path, n_jobs: int, training: dict, resources: dict) -> Path:
    spec = {
        "name": "bench-scale",
        "base_model": base,
        "defaults": {"training": training, "resources": resources, "lora": {"rank": 4}},
        "jobs": [{"customer": f"job-{i:03d}", "dataset": str(dataset)} for i in range(n_jobs)],
    }
    path = folder / "bench-scale.yaml"
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


def handovers(attempts: list[dict], slots_per_node: int) -> list[float]:
    """Per node, each placement beyond the node's first `slots_per_node` took the slot of the
    earliest earlier end not yet taken: seconds from that end to this placement."""
    gaps = []
    for node in {a["node_id"] for a in attempts}:
        here = [a for a in attempts if a["node_id"] == node]
        ends = sorted(a["ended"] for a in here)
        for a in sorted(here, key=lambda a: a["placed"])[slots_per_node:]:
            free = [e for e in ends if e <= a["placed"]]
            if free:
                ends.remove(free[0])
                gaps.append(a["placed"] - free[0])
    return gaps


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
    slots_per_node: int,
) -> dict[str, Any]:
    attempts = _attempts(rows)
    makespan = t_end - t_launch
    busy = [a["ended"] - a["placed"] for a in attempts]
    ideal = sum(busy) / slots
    nodes: dict[str, int] = {}
    for a in attempts:
        nodes[a["node_id"][:12]] = nodes.get(a["node_id"][:12], 0) + 1
    return {
        "prepare_s": t_launch - t0,
        "submit_to_first_placed_s": min(a["placed"] for a in attempts) - t0,
        "submit_to_first_training_s": min(a["started"] for a in attempts) - t0,
        "makespan_s": makespan,
        "makespan_incl_prepare_s": t_end - t0,
        "job_slot_s": _stats(busy),
        "job_fit_wall_s": _stats(walls),
        "ideal_s": ideal,
        "makespan_vs_ideal": makespan / ideal,
        "orchestration_slot_s_per_job": (makespan * slots - sum(busy)) / len(busy),
        "slot_handover_s": _stats(handovers(attempts, slots_per_node)),
        "slot_utilisation": sum(busy) / (slots * makespan),
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
) -> dict[str, Any]:
    import ray

    from lorafleet.pipeline import prepare, run_fleet
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
    }
    saved_home = os.environ.get("LORAFLEET_HOME")
    with tempfile.TemporaryDirectory() as tmp:
        os.environ["LORAFLEET_HOME"] = tmp  # a throwaway MLflow store and checkpoint folder
        start = time.perf_counter()
        cluster = start_cluster(nodes, gpus_per_node, cpus_per_node)
        config["cluster_start_s"] = time.perf_counter() - start
        try:
            path = fleet_file(Path(tmp), base, dataset, n_jobs, training, resources)
            rows = LastRows()
            t0 = time.time()
            sub = prepare(path, register=False)
            t_launch = time.time()
            result = run_fleet(sub, str(Path(tmp) / "checkpoints"), on_tick=rows)
            t_end = time.time()
        finally:
            ray.shutdown()
            cluster.shutdown()
            if saved_home is None:
                os.environ.pop("LORAFLEET_HOME", None)
            else:
                os.environ["LORAFLEET_HOME"] = saved_home
    bad = {c: o.reason for c, o in result.jobs.items() if o.state != "succeeded"}
    if bad:
        raise RuntimeError(f"benchmark jobs failed: {bad}")
    walls = [o.metrics["job_wall_s"] for o in result.jobs.values()]
    return {"config": config, **figures(t0, t_launch, t_end, rows.rows, walls, per_node * nodes, per_node)}
