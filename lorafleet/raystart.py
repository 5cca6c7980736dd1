"""Ray start-up shared by training, serving, benchmarks and tests: one namespace (named actors are
found across processes: `lorafleet cancel` reaches a submission's board) and one runtime env."""

from __future__ import annotations

import os
from typing import Any

NAMESPACE = "lorafleet"

# Ray Train gives a worker group 60 s to start; importing torch, transformers and trl took longer
# than that on a loaded 2-core machine (jobs failed with a ControllerError), and can on a busy node.
RAY_ENV = {
    "env_vars": {
        "RAY_TRAIN_ENABLE_PRINT_PATCH": "0",
        "TOKENIZERS_PARALLELISM": "false",
        "RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S": os.environ.get(
            "RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S", "600"
        ),
        # each Ray Train run (a slot, a job's own run) otherwise starts one more actor process to
        # watch for node preemption notices, which our loops do not act on: a lost node is a
        # restart from the last checkpoint either way
        "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "0",
        # a worker holds one reported result until its controller polls (every 2 s by default):
        # a slot reporting its checkpoint at two handovers in a row waited for that poll, and a
        # job's own run ended up to 2 s after its last step
        "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": os.environ.get("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.5"),
    },
}


def init_ray(address: str | None, **options: Any) -> None:
    """Join `address` (None: a running local cluster or a new one; 'local': always a new one). A
    cluster started here runs its dashboard on a free loopback port: Ray Train's placement-group
    cleaner asks the dashboard's state API whether its run's controller lives, and without one
    of our own that question went to whatever answered on the default port (another Ray
    instance on the machine), which did not know the controller; the cleaner then removed the
    run's placement group and killed a healthy worker. (Ignored when joining a cluster.)"""
    import ray

    if not ray.is_initialized():
        ray.init(
            address=address,
            namespace=NAMESPACE,
            runtime_env=RAY_ENV | {"worker_process_setup_hook": "lorafleet.raystart.pin_cluster_address"},
            log_to_driver=False,
            include_dashboard=True,
            dashboard_host="127.0.0.1",
            dashboard_port=free_port(),
            **options,
        )


def joins_cluster(address: str | None) -> bool:
    """Whether Ray comes from a running cluster (joining costs milliseconds) rather than a local
    one started here (seconds)."""
    return (address or os.environ.get("RAY_ADDRESS") or None) not in (None, "local")


def connect(address: str | None) -> None:
    """Ray for a submission: join the cluster `address` names (a clear error when there is none),
    else a local one (`init_ray`)."""
    (join_cluster if joins_cluster(address) else init_ray)(address)


def join_cluster(address: str | None) -> None:
    """Join a running cluster (`lorafleet cancel`, `lorafleet slots`): never start one, and say how
    to name it when there is none."""
    from lorafleet.errors import LorafleetError

    address = address or os.environ.get("RAY_ADDRESS") or "auto"
    try:
        init_ray(address)
    except ConnectionError as exc:
        raise LorafleetError(
            f"no running Ray cluster at {address} ({exc}); start one with `ray start --head` "
            "and submit with --ray-address auto, or pass the address of yours"
        ) from None


def free_port() -> int:
    """A free loopback port (the dashboard of a cluster started here; the benches' and tests'
    servers)."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def pin_cluster_address() -> None:
    """Every worker process of ours (Ray Train's controllers and placement-group cleaners too)
    names its own cluster in RAY_ADDRESS: the state API otherwise finds a cluster by scanning the
    machine, and with a second Ray instance there (a test cluster, a benchmark) it raised or
    asked the wrong one (see init_ray)."""
    import ray

    os.environ["RAY_ADDRESS"] = ray.get_runtime_context().gcs_address


def driver_node_affinity() -> Any:
    """Keep resource-free control actors (a job's Ray Train controller, the fleet's board) on the
    driver's node: on a worker node the loss of that node would take down the whole job (or the
    fleet's board) instead of just its workers, which Ray Train restarts elsewhere. Hard affinity:
    with soft=True Ray 2.60 still put the board actor on a worker node. The node is alive while
    the driver is, and nothing here requests resources, so it always fits. The detached ones (the
    slot pool, a slot's host) stay on the node of the submission that started them, so drivers
    belong on the head node (a worker node that goes takes them with it)."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    return NodeAffinitySchedulingStrategy(node_id=ray.get_runtime_context().get_node_id(), soft=False)
