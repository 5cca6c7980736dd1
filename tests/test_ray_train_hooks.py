"""The places lorafleet leans on Ray Train internals to cut a cold start (Ray is pinned): the
trainer hooks in `lorafleet.train.raytrain` (no DatasetManager, one placement-group cleaner per
cluster, no runtime env on a controller or worker that inherits its variables) and Ray's
autoscaling-coordinator factory. If a Ray upgrade moves one, these fail before a fleet is slower
or a placement group leaks."""

from __future__ import annotations

import json
import os
import time

import pytest

from lorafleet.raystart import WORKER_ENV
from lorafleet.spec import ResourcesSpec
from lorafleet.train.raytrain import InheritingWorkerGroup, inherits, lean, ray_trainer


def _loop(config: dict) -> None:
    pass


def _callback_names(trainer) -> list[str]:
    return [type(c).__name__ for c in trainer._create_default_callbacks()]


@pytest.mark.parametrize("torch_backend", [False, True], ids=["slot", "own-run"])
def test_runs_without_ray_datasets_start_no_dataset_manager_and_share_one_cleaner(torch_backend, tmp_path):
    trainer = ray_trainer(_loop, {}, ResourcesSpec(), "run", str(tmp_path), 0, torch_backend=torch_backend)
    names = _callback_names(trainer)
    assert "DatasetsCallback" not in names
    assert "PlacementGroupCleanerCallback" not in names and names.count("SharedCleanerCallback") == 1
    # everything else Ray Train sets up stays: accelerators, the backend, metrics
    assert {"AcceleratorSetupCallback", "BackendSetupCallback"} <= set(names)
    assert type(trainer).__name__ == ("TorchTrainer" if torch_backend else "DataParallelTrainer")


def test_a_run_given_ray_datasets_keeps_its_dataset_manager():
    from ray.train.v2.api.data_parallel_trainer import DataParallelTrainer

    trainer = lean(DataParallelTrainer)(_loop, datasets={"train": lambda: None})
    assert "DatasetsCallback" in _callback_names(trainer)


def test_the_ray_internals_overridden_are_where_they_were():
    import inspect

    from ray.data._internal.cluster_autoscaler import default_autoscaling_coordinator as coordinator
    from ray.train.v2._internal.execution.controller import TrainController
    from ray.train.v2._internal.execution.worker_group import WorkerGroup
    from ray.train.v2.api.data_parallel_trainer import DataParallelTrainer

    assert callable(coordinator.get_or_create_autoscaling_coordinator)
    assert TrainController.worker_group_cls is WorkerGroup
    assert isinstance(inspect.getattr_static(WorkerGroup, "_get_worker_runtime_env"), staticmethod)
    # run_controller copies this method: a change to it is a change to copy
    source = inspect.getsource(DataParallelTrainer._initialize_and_run_controller)
    assert 'runtime_env={"env_vars": env_vars}' in source and "(TrainController)" in source


def test_inherits_only_what_this_process_holds(monkeypatch):
    monkeypatch.setenv("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.5")
    assert inherits({"RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.5"})
    assert not inherits({"RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "2"})
    monkeypatch.delenv("RAY_WARN_BLOCKING_GET_INSIDE_ASYNC", raising=False)
    assert not inherits({"RAY_WARN_BLOCKING_GET_INSIDE_ASYNC": "0"})


def test_workers_get_a_runtime_env_only_when_they_would_lack_something(monkeypatch):
    for name in ("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "RAY_TRAIN_ENABLE_PRINT_PATCH"):
        monkeypatch.setenv(name, WORKER_ENV[name])
    assert InheritingWorkerGroup._get_worker_runtime_env({}) is None
    # a run that asks for its own worker env keeps Ray's merge of both
    env = InheritingWorkerGroup._get_worker_runtime_env({"env_vars": {"X": "1"}})
    assert env["env_vars"]["X"] == "1" and env["env_vars"]["RAY_TRAIN_HEALTH_CHECK_INTERVAL_S"] == "0.5"
    env = InheritingWorkerGroup._get_worker_runtime_env({"pip": ["nothing"]})
    assert env["pip"] == ["nothing"] and "env_vars" in env


@pytest.mark.usefixtures("ray_session")
def test_a_lean_run_starts_no_runtime_env_and_no_cleaner_of_its_own(tmp_path):
    """A real run, driven from a task as a job's own run is, on the session's cluster (started by
    init_ray: its processes hold WORKER_ENV): its controller and worker get no runtime env yet see
    WORKER_ENV, and the cluster's one cleaner watched its controller instead of an actor of the
    run's own."""
    import ray
    from ray.util.state import list_actors

    from lorafleet.train.cluster_actors import run_cleaner

    seen = tmp_path / "worker.json"

    def loop(config: dict) -> None:
        view = {k: os.environ.get(k) for k in WORKER_ENV}
        seen.write_text(json.dumps([view, ray.get_runtime_context().runtime_env]))

    @ray.remote(num_cpus=0)
    def drive() -> None:
        res = ResourcesSpec(cpus_per_worker=1)
        ray_trainer(loop, {}, res, "lean-run", str(tmp_path), 0, torch_backend=False).fit()

    ray.get(drive.remote())
    env, runtime_env = json.loads(seen.read_text())
    assert env == WORKER_ENV and not runtime_env.get("env_vars")
    actors = list_actors(detail=True, limit=10_000)
    run = [a for a in actors if a.class_name in ("LeanController", "RayTrainWorker")]
    assert {a.class_name for a in run} == {"LeanController", "RayTrainWorker"}
    assert all(not json.loads(a.serialized_runtime_env or "{}").get("env_vars") for a in run)
    assert "PlacementGroupCleaner" not in {a.class_name for a in actors}
    assert ray.get(run_cleaner().watched.remote()) == []  # the run ended cleanly: forgotten


@pytest.mark.usefixtures("ray_session")
@pytest.mark.parametrize("forgotten", [False, True], ids=["controller-died", "controller-ended"])
def test_the_cleaner_removes_the_placement_group_of_a_dead_controller_only(forgotten):
    import ray
    from ray.util import placement_group, placement_group_table, remove_placement_group

    from lorafleet.train.cluster_actors import RunCleaner

    cleaner = ray.remote(RunCleaner).options(num_cpus=0).remote(0.2)
    controller = ray.remote(num_cpus=0)(type("Controller", (), {"ping": lambda self: 1})).remote()
    ray.get(controller.ping.remote())
    group = placement_group([{"CPU": 0.01}])
    ray.get(group.ready())
    controller_id = controller._actor_id.hex()
    ray.get(cleaner.watch.remote(controller_id, group))
    if forgotten:
        ray.get(cleaner.forget.remote(controller_id))
    ray.kill(controller)
    deadline = time.time() + (3 if forgotten else 30)
    while time.time() < deadline and placement_group_table(group)["state"] != "REMOVED":
        time.sleep(0.2)
    assert (placement_group_table(group)["state"] == "REMOVED") is not forgotten
    assert ray.get(cleaner.watched.remote()) == []
    if forgotten:
        remove_placement_group(group)
    ray.kill(cleaner)
