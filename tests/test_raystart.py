"""Ray start-up: a cluster started here hands its processes the worker env by inheritance (no
runtime env, so Ray's prestarted idle workers serve our actors); a driver joining a cluster that
lacks it, or with other values, gives it as the job's runtime env."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from lorafleet import raystart

pytestmark = pytest.mark.usefixtures("ray_session")

PROBE = """
import json, os, sys
import ray
from lorafleet.raystart import init_ray
init_ray(sys.argv[1])
@ray.remote(num_cpus=0)
def probe():
    return dict(os.environ), dict(ray.get_runtime_context().runtime_env)
print(json.dumps(ray.get(probe.remote())))
"""


def _actor_view(ray) -> tuple[dict, dict]:
    @ray.remote(num_cpus=0)
    class Probe:
        def view(self) -> tuple[dict, dict]:
            return dict(os.environ), dict(ray.get_runtime_context().runtime_env)

    return ray.get(Probe.remote().view.remote())


def _joined_view(ray, **env: str) -> tuple[dict, dict]:
    """A task's environment and runtime env, in a driver of its own joining this cluster."""
    address = ray.get_runtime_context().gcs_address
    done = subprocess.run(
        [sys.executable, "-c", PROBE, address],
        env=os.environ | env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    environ, runtime_env = json.loads(done.stdout.strip().splitlines()[-1])
    return environ, runtime_env


def _worker_env_in(environ: dict, ray) -> None:
    for name, value in raystart.WORKER_ENV.items():
        assert environ.get(name) == value, name
    # the state API in every process asks this cluster, not whichever it finds on the machine
    assert environ["RAY_ADDRESS"] == ray.get_runtime_context().gcs_address


def test_a_local_cluster_s_processes_inherit_the_worker_env(ray_session):
    environ, runtime_env = _actor_view(ray_session)
    _worker_env_in(environ, ray_session)
    assert runtime_env == {}  # nothing for Ray's runtime-env agent to set up per process
    assert raystart.carries_worker_env()
    assert "RAY_GCS_SERVER_PORT" not in os.environ  # the driver's own environment is back


def test_a_driver_joining_the_marked_cluster_needs_no_runtime_env(ray_session):
    environ, runtime_env = _joined_view(ray_session)
    _worker_env_in(environ, ray_session)
    assert "env_vars" not in runtime_env


def test_a_driver_with_other_settings_gives_them_as_its_runtime_env(ray_session):
    environ, runtime_env = _joined_view(ray_session, RAY_TRAIN_HEALTH_CHECK_INTERVAL_S="1.5")
    assert environ["RAY_TRAIN_HEALTH_CHECK_INTERVAL_S"] == "1.5"
    assert runtime_env["env_vars"]["RAY_TRAIN_HEALTH_CHECK_INTERVAL_S"] == "1.5"
    assert environ["RAY_ADDRESS"] == ray_session.get_runtime_context().gcs_address


def test_a_cluster_without_the_mark_gets_the_worker_env_as_runtime_env(ray_session):
    from ray.experimental import internal_kv

    mark = internal_kv._internal_kv_get(raystart.ENV_MARK, namespace=raystart.NAMESPACE.encode())
    internal_kv._internal_kv_del(raystart.ENV_MARK, namespace=raystart.NAMESPACE.encode())
    try:
        assert not raystart.carries_worker_env()
        environ, runtime_env = _joined_view(ray_session)
    finally:
        internal_kv._internal_kv_put(raystart.ENV_MARK, mark, namespace=raystart.NAMESPACE.encode())
    assert raystart.WORKER_ENV.items() <= runtime_env["env_vars"].items()
    _worker_env_in(environ, ray_session)


def test_only_local_or_unset_addresses_start_a_cluster(monkeypatch):
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    assert raystart.starts_new_cluster("local")
    assert not raystart.starts_new_cluster("10.0.0.1:6379")
    assert not raystart.starts_new_cluster("auto")
    monkeypatch.setenv("RAY_ADDRESS", "10.0.0.1:6379")
    assert not raystart.starts_new_cluster(None)
    assert raystart.starts_new_cluster("local")
    for address in ("local", "10.0.0.1:6379", "auto", None):  # one rule for both questions
        assert raystart.joins_cluster(address) is not raystart.starts_new_cluster(address)


def test_the_runtime_env_is_a_new_dict_each_time():
    # Ray adds its own entries to the env_vars it is given: WORKER_ENV must stay as it is, or the
    # mark this process writes or compares no longer matches (seen after a join then a restart)
    env = raystart.runtime_env()
    env["env_vars"]["__RAY_ADDED"] = "x"
    assert "__RAY_ADDED" not in raystart.WORKER_ENV
    assert raystart.runtime_env()["env_vars"] == raystart.WORKER_ENV


def test_a_cluster_started_in_cluster_env_carries_the_worker_env_on_every_node(ray_session):
    """The benches' simulated multi-node cluster: each node's raylet is started inside
    `cluster_env`, so workers on every node inherit it, and a driver joins without a runtime env."""
    from ray.cluster_utils import Cluster

    from tests.conftest import start_local_ray

    ray_session.shutdown()
    try:
        with raystart.cluster_env() as address:
            cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0})
            node = cluster.add_node(num_cpus=1, resources={"worker_node": 1})
            cluster.wait_for_nodes()
        assert cluster.address == address
        raystart.mark_cluster(address)
        try:
            raystart.init_ray(cluster.address)
            assert raystart.carries_worker_env()

            @ray_session.remote(num_cpus=1, resources={"worker_node": 1})
            def on_worker_node() -> tuple[dict, dict, str]:
                runtime = ray_session.get_runtime_context()
                return dict(os.environ), dict(runtime.runtime_env), runtime.get_node_id()

            environ, runtime_env, node_id = ray_session.get(on_worker_node.remote())
            assert node_id == node.node_id
            _worker_env_in(environ, ray_session)
            assert runtime_env == {}
        finally:
            ray_session.shutdown()
            cluster.shutdown()
    finally:
        start_local_ray()


def test_environ_brings_back_only_its_own_names(monkeypatch):
    # cluster_env relies on it: Ray sets RAY_AUTH_MODE in the driver while it starts, and it stays
    from lorafleet.settings import environ

    monkeypatch.setenv("LF_SET_BEFORE", "before")
    monkeypatch.delenv("LF_UNSET_BEFORE", raising=False)
    monkeypatch.delenv("LF_SET_INSIDE", raising=False)
    monkeypatch.setenv("LF_UNSET_INSIDE", "before")
    with environ({"LF_SET_BEFORE": "inside", "LF_UNSET_BEFORE": "inside", "LF_UNSET_INSIDE": None}):
        assert os.environ["LF_SET_BEFORE"] == os.environ["LF_UNSET_BEFORE"] == "inside"
        assert "LF_UNSET_INSIDE" not in os.environ
        monkeypatch.setenv("LF_SET_INSIDE", "stays")
    assert os.environ["LF_SET_BEFORE"] == "before"
    assert "LF_UNSET_BEFORE" not in os.environ
    assert os.environ["LF_SET_INSIDE"] == "stays"
    assert os.environ["LF_UNSET_INSIDE"] == "before"
