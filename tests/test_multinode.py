"""Fleets on a simulated multi-node cluster (`ray.cluster_utils.Cluster`): one head and GPU nodes
as separate raylets on this machine. The GPU nodes declare a GPU they do not have, so jobs are
placed by the GPU resource while the workers train on the CPU. Real Ray Train, trl, peft,
bitsandbytes and MLflow, as in test_fleet.

The module runs its own cluster: its fixture stops the session's local Ray first and starts it
again afterwards, so the modules after it find Ray as the `ray_session` fixture left it.
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from lorafleet import settings, tracking
from lorafleet.bench.scale_bench import max_concurrent
from lorafleet.pipeline import submit
from lorafleet.raystart import init_ray
from tests.conftest import fleet_file, start_local_ray

pytestmark = [pytest.mark.integration, pytest.mark.multinode]

GPU_NODE = {"num_cpus": 2, "num_gpus": 1}
# a crashed node is declared dead after ~3 s instead of ~30 s, so the lost-node test stays short
FAST_NODE_DEATH = {
    "health_check_period_ms": 1000,
    "health_check_failure_threshold": 3,
    "health_check_timeout_ms": 1000,
}


@pytest.fixture(scope="module")
def cluster():
    """Head node without GPUs (driver, controllers, progress board); tests add GPU nodes."""
    import ray
    from ray.cluster_utils import Cluster

    had_ray = ray.is_initialized()
    ray.shutdown()
    c = Cluster(
        initialize_head=True, head_node_args={"num_cpus": 1, "num_gpus": 0, "_system_config": FAST_NODE_DEATH}
    )
    try:
        init_ray(c.address)  # the same path as `lorafleet submit --ray-address`
        yield c
    finally:
        ray.shutdown()
        c.shutdown()
        if had_ray:
            start_local_ray()


def gpu_nodes(cluster, n: int) -> dict[str, object]:
    """Exactly n one-GPU worker nodes, by node id."""
    nodes = list(cluster.worker_nodes)
    while len(nodes) < n:
        nodes.append(cluster.add_node(**GPU_NODE))
    while len(nodes) > n:
        cluster.remove_node(nodes.pop())
    cluster.wait_for_nodes()
    gpus_free(n)
    return {node.node_id: node for node in nodes}


def gpus_free(n: int, timeout_s: float = 120) -> None:
    """Wait until the n GPUs are free: an earlier test's slot run may still be starting (it ends by
    itself), but a placement group left behind would hold a GPU for good and stall this test."""
    import ray

    deadline = time.monotonic() + timeout_s
    while ray.available_resources().get("GPU", 0) < n - 0.01:
        if time.monotonic() > deadline:
            held = [g for g in ray.util.placement_group_table().values() if g["state"] != "REMOVED"]
            raise AssertionError(f"GPUs still held after {timeout_s} s, by placement groups {held}")
        time.sleep(1)


def gpu_resources(gpus: float) -> dict:
    """Each job asks for `gpus` of a GPU node's one GPU (and one CPU); one restart allowed."""
    return {"gpus_per_worker": gpus, "cpus_per_worker": 1, "max_failures": 1}


SAVE_AT_END = {"save_steps": 4}  # jobs here train conftest's 4 steps, with a checkpoint at the end


class Timeline:
    """An on_tick recorder: the latest rows, which carry each job's attempts: node, placed (its
    worker group started), started (training began), ended; and the fewest GPUs Ray had free."""

    def __init__(self) -> None:
        import ray

        self.rows: dict[str, dict] = {}
        self.min_free_gpus = ray.cluster_resources().get("GPU", 0.0)

    def __call__(self, rows: dict[str, dict]) -> None:
        import ray

        self.rows = rows
        # Ray's own accounting, sampled each tick: reservations span worker start-up, so a moment
        # when jobs share the cluster is seen even when their training steps do not overlap
        self.min_free_gpus = min(self.min_free_gpus, ray.available_resources().get("GPU", 0.0))

    def attempts(self, customer: str) -> list[dict]:
        return self.rows[customer].get("attempts", [])

    def intervals(self) -> list[tuple[float, float]]:
        """When each attempt held its slot: Ray reserves it before `placed` and frees it after
        `ended`, so these never overlap more than the reservations do."""
        return [(a["placed"], a["ended"]) for c in self.rows for a in self.attempts(c)]


def test_jobs_spread_over_nodes_and_queue_beyond_capacity(cluster, lf_home, micro_base):
    nodes = gpu_nodes(cluster, 2)
    customers = ["a", "b", "c"]
    # one job per slot at a time: this is about queueing beyond capacity (packed, three jobs
    # would train at once on the two GPUs, which is the point of packing)
    one_each = {"max_jobs_per_slot": 1}
    jobs = dict.fromkeys(customers, {})
    path = fleet_file(
        lf_home,
        "spread",
        jobs,
        base=micro_base,
        training=SAVE_AT_END,
        resources=gpu_resources(1),
        packing=one_each,
    )
    timeline = Timeline()

    result = submit(path, on_tick=timeline)

    assert all(o.state == "succeeded" for o in result.jobs.values()), result.jobs
    client = tracking.client()
    ran_on = {}
    for c in customers:
        (attempt,) = timeline.attempts(c)  # nothing failed, nothing restarted
        tags = client.get_run(result.jobs[c].run_id).data.tags
        assert tags["lorafleet.node_id"] == attempt["node_id"] and tags["lorafleet.attempts"] == "1"
        ran_on[c] = attempt["node_id"]
    assert set(ran_on.values()) == set(nodes)  # both GPU nodes used, never the GPU-less head
    # two GPUs, three one-GPU jobs: both GPUs busy at once, never three jobs, and the third
    # waited for a free GPU
    assert timeline.min_free_gpus == 0
    assert max_concurrent(timeline.intervals()) <= 2
    first, second, third = sorted(timeline.intervals())
    assert third[0] >= min(first[1], second[1])


def test_fractional_gpus_pack_two_jobs_on_one_gpu(cluster, lf_home, micro_base):
    (node,) = gpu_nodes(cluster, 1)
    path = fleet_file(
        lf_home,
        "pack",
        {"p": {}, "q": {}},
        base=micro_base,
        training=SAVE_AT_END,
        resources=gpu_resources(0.5),
    )
    timeline = Timeline()

    result = submit(path, on_tick=timeline)

    assert all(o.state == "succeeded" for o in result.jobs.values()), result.jobs
    assert {a["node_id"] for c in "pq" for a in timeline.attempts(c)} == {node}
    assert timeline.min_free_gpus == 0  # two half-GPU jobs held the one GPU together


def _checkpoint_registered(customer: str) -> bool:
    """A checkpoint of the job is in the storage path: for a job in a warm slot (these are) its
    checkpoint folder, uploaded before its next step; for a run of its own the file Ray Train's
    controller writes once it has recorded a reported checkpoint."""
    storage = Path(settings.storage_path())
    return any(storage.glob(f"*-{customer}-*/checkpoint_*/checkpoint/packed_state.json")) or any(
        storage.glob(f"*-{customer}-*/checkpoint_manager_snapshot.json")
    )


class NodeKiller(Timeline):
    """Crashes the node running `victim` once its first checkpoint is recorded (and it is past it)."""

    def __init__(self, cluster, nodes: dict[str, object], victim: str, first_save: int) -> None:
        super().__init__()
        self.cluster, self.nodes, self.victim, self.first_save = cluster, nodes, victim, first_save
        self.killed: str | None = None

    def __call__(self, rows: dict[str, dict]) -> None:
        super().__call__(rows)
        info = rows[self.victim]
        if self.killed or info.get("state") != "running" or (info.get("step") or 0) <= self.first_save:
            return
        if _checkpoint_registered(self.victim):
            self.killed = info["attempts"][-1]["node_id"]
            self.cluster.remove_node(self.nodes[self.killed], allow_graceful=False)


def test_lost_node_resumes_job_elsewhere_and_resubmit_reuses(cluster, lf_home, micro_base):
    nodes = gpu_nodes(cluster, 2)
    # the victim trains long enough (~20 s) to be caught between its first checkpoint and its end;
    # both jobs train in warm slots, one per GPU node
    jobs = {"victim": {"training": {"max_steps": 300, "save_steps": 20}}, "steady": {}}
    path = fleet_file(
        lf_home, "lost", jobs, base=micro_base, training=SAVE_AT_END, resources=gpu_resources(1)
    )
    killer = NodeKiller(cluster, nodes, "victim", first_save=20)

    first = submit(path, on_tick=killer)

    assert killer.killed is not None, "the victim finished before its node could be killed"
    assert all(o.state == "succeeded" for o in first.jobs.values()), first.jobs
    client = tracking.client()
    victim = client.get_run(first.jobs["victim"].run_id).data.tags
    assert victim["lorafleet.trains_in"] == "warm slot"
    before, after = victim["lorafleet.node_ids"].split(",")
    assert victim["lorafleet.attempts"] == "2" and before == killer.killed and after != killer.killed
    # the slot restarted on the other node and its job went on from its checkpoint there
    first_try, second_try = killer.attempts("victim")
    assert first_try["start_step"] == 0 and second_try["node_id"] == after
    resumed = int(victim["lorafleet.resumed_from_step"])
    assert resumed == second_try["start_step"]
    assert resumed >= 20 and resumed % 20 == 0  # a checkpoint step, not a restart from zero
    steps = [m.step for m in client.get_metric_history(first.jobs["victim"].run_id, "loss")]
    assert all(steps.count(s) == 1 for s in range(2, resumed + 1, 2))  # trained once up to there
    assert max(steps) == 300
    steady = client.get_run(first.jobs["steady"].run_id).data.tags
    assert steady["lorafleet.attempts"] == "1" and "lorafleet.resumed_from_step" not in steady

    second = submit(path)

    assert {c: o.reused_from for c, o in second.jobs.items()} == {
        c: o.run_id for c, o in first.jobs.items()
    }  # nothing retrained


def test_lost_node_resumes_a_job_in_its_own_run_elsewhere(cluster, lf_home, micro_base):
    """The same for a job that trains in a Ray Train run of its own (`packing: false`): Ray Train
    restarts its worker group on the other node, from the job's last reported checkpoint."""
    nodes = gpu_nodes(cluster, 2)
    jobs = {"victim": {"packing": False, "training": {"max_steps": 300, "save_steps": 20}}}
    path = fleet_file(
        lf_home, "lost-own", jobs, base=micro_base, training=SAVE_AT_END, resources=gpu_resources(1)
    )
    killer = NodeKiller(cluster, nodes, "victim", first_save=20)

    result = submit(path, on_tick=killer)

    assert killer.killed is not None, "the victim finished before its node could be killed"
    assert result.jobs["victim"].state == "succeeded", result.jobs["victim"].reason
    client = tracking.client()
    victim = client.get_run(result.jobs["victim"].run_id).data.tags
    assert victim["lorafleet.trains_in"] == "own run"
    before, after = victim["lorafleet.node_ids"].split(",")
    assert victim["lorafleet.attempts"] == "2" and before == killer.killed and after != killer.killed
    resumed = int(victim["lorafleet.resumed_from_step"])
    assert resumed >= 20 and resumed % 20 == 0  # a checkpoint step, not a restart from zero
    steps = [m.step for m in client.get_metric_history(result.jobs["victim"].run_id, "loss")]
    assert max(steps) == 300
