"""The endpoint on a simulated two-node cluster (`ray.cluster_utils.Cluster`): adapters spread
over the replicas, and losing a node (with its replica) loses no more than the requests in flight
on it. Real Ray Serve, real registry (MLflow on SQLite), real engine.

Like test_multinode, the module runs its own cluster and gives the session's local Ray back after.
"""

from __future__ import annotations

import threading
import time
from collections import Counter, defaultdict

import httpx
import pytest

from lorafleet.serve.config import AppArgs
from lorafleet.serve.run import start, stop
from tests.conftest import start_local_ray

pytestmark = [pytest.mark.integration, pytest.mark.multinode]
PORT = 8767
ADAPTERS = [f"tenant-{i}" for i in range(6)]
# a killed node is declared dead after ~3 s instead of ~30 s
FAST_NODE_DEATH = {
    "health_check_period_ms": 1000,
    "health_check_failure_threshold": 3,
    "health_check_timeout_ms": 1000,
}


@pytest.fixture(scope="module")
def two_nodes():
    """A head with no CPUs (Serve's controller, proxy and the ingress, all zero-CPU) and two
    one-CPU worker nodes: a one-CPU replica fits on each worker node and nowhere else."""
    import ray
    from ray import serve
    from ray.cluster_utils import Cluster

    from lorafleet.raystart import init_ray

    had_ray = ray.is_initialized()
    ray.shutdown()
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0, "_system_config": FAST_NODE_DEATH})
    workers = [cluster.add_node(num_cpus=1) for _ in range(2)]
    cluster.wait_for_nodes()
    try:
        init_ray(cluster.address)
        # one proxy, on the head: the simulated nodes share this host's ports
        serve.start(proxy_location="HeadOnly", http_options={"host": "127.0.0.1", "port": PORT})
        yield cluster, workers
    finally:
        stop()
        ray.shutdown()
        cluster.shutdown()
        if had_ray:
            start_local_ray()


@pytest.fixture(scope="module")
def endpoint(two_nodes, tmp_path_factory):
    import os

    from lorafleet import tracking
    from lorafleet.bench.synthetic import register_random
    from lorafleet.models import resolve_base

    home = tmp_path_factory.mktemp("two-node-home")
    os.environ["LORAFLEET_HOME"] = str(home)
    register_random(tracking.client(), resolve_base("tiny-llama"), home, ADAPTERS, "tiny-llama")
    url = start(
        AppArgs(
            base_model="tiny-llama",
            min_replicas=2,
            max_replicas=2,
            replica_cpus=1,
            max_adapters_per_replica=4,
            max_new_tokens=24,
            tracking_uri=f"sqlite:///{home}/mlflow.db",
        ),
        port=PORT,
    )
    yield url
    os.environ.pop("LORAFLEET_HOME", None)


def ask(http: httpx.Client, url: str, model: str) -> httpx.Response:
    return http.post(
        f"{url}/completions",
        json={"model": model, "prompt": "Where is my order?", "max_tokens": 24, "temperature": 0},
    )


def replica_nodes() -> dict[str, str]:
    """node id (8 chars, as in the x-lorafleet-replica header) of each actor class that matters."""
    from ray.util.state import list_actors

    nodes: dict[str, str] = {}
    for actor in list_actors(filters=[("state", "=", "ALIVE")], limit=1000):
        if "Ingress" in actor.class_name or "BaseReplica" in actor.class_name:
            nodes[actor.class_name.rsplit(":", 1)[-1] + "@" + actor.node_id[:8]] = actor.node_id
    return nodes


def test_adapters_spread_over_replicas_and_stick_to_them(endpoint):
    served: dict[str, Counter] = defaultdict(Counter)
    with httpx.Client(timeout=120) as http:
        for _ in range(3):
            for name in ADAPTERS:
                r = ask(http, endpoint, name)
                assert r.status_code == 200, r.text
                served[name][r.headers["x-lorafleet-replica"]] += 1
    replicas = {rep for counts in served.values() for rep in counts}
    assert len(replicas) == 2, served  # both replicas hold adapters
    # multiplexing routes an adapter back to the replica that loaded it
    sticky = sum(counts.most_common(1)[0][1] for counts in served.values())
    assert sticky >= 0.8 * 3 * len(ADAPTERS), served


class Load:
    """Clients asking for every adapter in turn until stopped; each outcome kept with its time."""

    def __init__(self, url: str, clients: int):
        self.url, self.done = url, threading.Event()
        self.outcomes: list[tuple[float, int, str]] = []  # (finished at, status, replica or error)
        self.threads = [threading.Thread(target=self._client, args=(i,), daemon=True) for i in range(clients)]

    def _client(self, i: int) -> None:
        with httpx.Client(timeout=120) as http:
            k = i
            while not self.done.is_set():
                r = ask(http, self.url, ADAPTERS[k % len(ADAPTERS)])
                label = r.headers.get("x-lorafleet-replica", "") if r.status_code == 200 else r.text[:200]
                self.outcomes.append((time.monotonic(), r.status_code, label))
                k += 1

    def __enter__(self) -> Load:
        for t in self.threads:
            t.start()
        return self

    def __exit__(self, *exc) -> None:
        self.done.set()
        for t in self.threads:
            t.join()


def test_losing_a_node_loses_at_most_its_in_flight_requests(two_nodes, endpoint):
    cluster, workers = two_nodes
    nodes = replica_nodes()
    ingress_node = next(node for key, node in nodes.items() if key.startswith("Ingress"))
    victim = next(w for w in workers if w.node_id != ingress_node)
    victim_tag = victim.node_id[:8]
    clients = 6
    with Load(endpoint, clients) as load:
        time.sleep(4)
        killed_at = time.monotonic()
        cluster.remove_node(victim, allow_graceful=False)
        time.sleep(12)
    before = [o for o in load.outcomes if o[0] < killed_at]
    after = [o for o in load.outcomes if o[0] >= killed_at]
    failed = [o for o in after if o[1] != 200]
    assert any(o[2].startswith(victim_tag) for o in before if o[1] == 200)  # it was serving
    assert len(failed) <= clients, failed  # at most what was in flight when the node died
    settled = [o for o in after if o[0] > killed_at + 6]
    assert settled and all(o[1] == 200 and not o[2].startswith(victim_tag) for o in settled), settled
    print(
        f"node lost: {len(before)} answers before, {len(after) - len(failed)} after, "
        f"{len(failed)} failed (clients in flight: {clients})"
    )
