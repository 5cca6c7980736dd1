"""Ray start-up shared by training, serving, benchmarks and tests: one namespace (named actors are
found across processes: `lorafleet cancel` reaches a submission's board) and one worker
environment (WORKER_ENV): inherited by every process of a cluster started here, given as the
job's runtime env on a cluster joined that lacks it."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from lorafleet.settings import environ

NAMESPACE = "lorafleet"


def _setting(name: str, default: str) -> str:
    """An override from this process's environment (an empty one counts as unset)."""
    return os.environ.get(name) or default


# What every Ray process of ours needs in its environment. Ray Train gives a worker group 60 s to
# start; importing torch, transformers and trl took longer than that on a loaded 2-core machine
# (jobs failed with a ControllerError), and can on a busy node.
WORKER_ENV = {
    "RAY_TRAIN_ENABLE_PRINT_PATCH": "0",
    "TOKENIZERS_PARALLELISM": "false",
    # Ray Train sets this one (its controller is async and blocks on purpose) on its controller
    # and workers through a runtime env: held here, they inherit it and need none (raytrain.py)
    "RAY_WARN_BLOCKING_GET_INSIDE_ASYNC": "0",
    "RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S": _setting("RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S", "600"),
    # each Ray Train run (a slot, a job's own run) otherwise starts one more actor process to
    # watch for node preemption notices, which our loops do not act on: a lost node is a
    # restart from the last checkpoint either way
    "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "0",
    # a worker holds one reported result until its controller polls (every 2 s by default):
    # a slot reporting its checkpoint at two handovers in a row waited for that poll, and a
    # job's own run ended up to 2 s after its last step
    "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": _setting("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.5"),
}


def runtime_env() -> dict[str, Any]:
    """WORKER_ENV as a job's runtime env, for a cluster whose processes were not started with it
    (one joined: `ray start`, KubeRay). A new dict each time: Ray adds its own entries to the
    env_vars it is given. Its cost is why clusters started here inherit WORKER_ENV instead: Ray
    starts a process for a runtime env through its runtime-env agent (~0.4 s more per actor
    process here) and never hands it one of the idle processes the raylet prestarted, so each
    actor of a cold slot's chain (host, controller, synchronisation actor, placement-group
    cleaner, worker) paid a fresh, slower start."""
    hook = "lorafleet.raystart.pin_cluster_address"
    return {"env_vars": dict(WORKER_ENV), "worker_process_setup_hook": hook}


# GCS key saying a cluster's processes carry WORKER_ENV (its value) and their own cluster's
# address, so a driver joining it needs no runtime env
ENV_MARK = b"lorafleet/worker-env"


def init_ray(address: str | None, **options: Any) -> None:
    """Join `address` (None: a running local cluster or a new one; 'local': always a new one).

    A cluster started here inherits WORKER_ENV (`cluster_env`) and is marked so; a joined one
    without that mark gets it as the job's runtime env (a second join, milliseconds). A cluster
    started here also runs its dashboard on a free loopback port: Ray Train's placement-group
    cleaner asks the dashboard's state API whether its run's controller lives, and without one
    of our own that question went to whatever answered on the default port (another Ray
    instance on the machine), which did not know the controller; the cleaner then removed the
    run's placement group and killed a healthy worker. (Ignored when joining a cluster.)"""
    import ray

    if ray.is_initialized():
        return
    common = {"namespace": NAMESPACE, "log_to_driver": False}
    if not starts_new_cluster(address):
        ray.init(address=address, **common, **options)
        if not carries_worker_env():  # join again, giving the job WORKER_ENV as its runtime env
            ray.shutdown()
            ray.init(address=address, runtime_env=runtime_env(), **common, **options)
        return
    local = {"include_dashboard": True, "dashboard_host": "127.0.0.1", "dashboard_port": free_port()}
    with cluster_env() as gcs_address:  # the local cluster's processes inherit WORKER_ENV
        ray.init(address="local", **local, **common, **options)
    if ray.get_runtime_context().gcs_address == gcs_address:
        mark_cluster()
    else:
        ray.shutdown()  # Ray put its GCS elsewhere (never seen): its processes name a wrong address
        ray.init(address="local", runtime_env=runtime_env(), **local, **common, **options)
    _STARTED_HERE.add(ray.get_runtime_context().gcs_address)


_STARTED_HERE: set[str] = set()  # GCS addresses of the local clusters this process started


def fixed_size() -> bool:
    """Whether the cluster Ray is connected to is one this process started on this machine: it
    has no autoscaler, so what its nodes hold is all there will be. A joined cluster may grow."""
    import ray

    return ray.is_initialized() and ray.get_runtime_context().gcs_address in _STARTED_HERE


def starts_new_cluster(address: str | None) -> bool:
    """Whether `ray.init(address)` starts a local cluster (Ray's own rule: 'local', or None with
    neither RAY_ADDRESS nor a cluster from `ray start` on this machine)."""
    from ray._private.services import get_ray_address_from_environment

    return address == "local" or (address is None and get_ray_address_from_environment(None, None) is None)


@contextmanager
def cluster_env() -> Iterator[str]:
    """os.environ for the Ray nodes started inside (their raylets and every worker they start
    inherit it): WORKER_ENV, and RAY_ADDRESS pinned to the GCS address chosen here (see
    `pin_cluster_address`). Yields that address; the driver's own environment comes back after.
    `mark_cluster` it once its nodes are up."""
    from ray._private.services import get_node_ip_address

    port = free_port()
    address = f"{get_node_ip_address()}:{port}"
    with environ(WORKER_ENV | {"RAY_GCS_SERVER_PORT": str(port), "RAY_ADDRESS": address}):
        yield address


def mark_cluster(gcs_address: str | None = None) -> None:
    """Record on a cluster started in `cluster_env` that its processes carry WORKER_ENV: the one
    this process is connected to (None), else the one at the address `cluster_env` yielded."""
    mark, namespace = json.dumps(WORKER_ENV).encode(), NAMESPACE.encode()
    if gcs_address is None:  # through this driver's own connection: no second GCS client
        from ray.experimental import internal_kv

        internal_kv._internal_kv_put(ENV_MARK, mark, namespace=namespace)
        return
    from ray._raylet import GcsClient

    GcsClient(address=gcs_address).internal_kv_put(ENV_MARK, mark, True, namespace)


def carries_worker_env() -> bool:
    """Whether the cluster this process joined was started in `cluster_env` with this
    WORKER_ENV (a driver whose environment sets other values gives them as a runtime env)."""
    from ray.experimental import internal_kv

    mark = internal_kv._internal_kv_get(ENV_MARK, namespace=NAMESPACE.encode())
    return mark is not None and json.loads(mark) == WORKER_ENV


def joins_cluster(address: str | None) -> bool:
    """Whether Ray comes from a running cluster (joining costs milliseconds) rather than a local
    one started here (seconds): Ray's own rule, so an unnamed `ray start` cluster on this machine
    counts as the running cluster it is (`ray.init()` joins it)."""
    return not starts_new_cluster(address)


def connect(address: str | None) -> None:
    """Ray for a submission: join the cluster `address` names (a clear error when there is none),
    else a local one (`init_ray`)."""
    (join_cluster if joins_cluster(address) else init_ray)(address)


def join_cluster(address: str | None) -> None:
    """Join a running cluster (`lorafleet cancel`, `lorafleet slots`): never start one, and say how
    to name it when there is none."""
    from lorafleet.errors import LorafleetError

    address = address or os.environ.get("RAY_ADDRESS") or "auto"
    how = "start one with `ray start --head` and submit with --ray-address auto, or pass the address of yours"
    if why := unreachable(address):  # Ray itself retries a dead address for about two minutes
        raise LorafleetError(f"no running Ray cluster at {address} ({why}); {how}")
    try:
        init_ray(address)
    except ConnectionError as exc:
        raise LorafleetError(f"no running Ray cluster at {address} ({exc}); {how}") from None


def unreachable(address: str, timeout_s: float = 3.0) -> str | None:
    """Why nothing listens at a 'host:port' (or 'ray://host:port') address; None when something
    does, or when the address is not one ('auto': Ray finds the cluster itself)."""
    import socket

    host, sep, port = address.removeprefix("ray://").rpartition(":")
    if not sep or not host or not port.isdigit():
        return None
    try:
        with socket.create_connection((host.strip("[]"), int(port)), timeout=timeout_s):
            return None
    except OSError as exc:
        return exc.strerror or f"no answer in {timeout_s:g} s"


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
    slot pool, the slot hosts) stay on the node of the submission that started them, so drivers
    belong on the head node (a worker node that goes takes them with it)."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    return NodeAffinitySchedulingStrategy(node_id=ray.get_runtime_context().get_node_id(), soft=False)
