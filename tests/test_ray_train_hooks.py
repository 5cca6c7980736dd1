"""The two places lorafleet leans on Ray Train internals to cut a cold start (Ray is pinned):
the trainer hook that drops the DatasetManager actor, and Ray's autoscaling-coordinator factory
a slot host calls early. If a Ray upgrade moves either, these fail before a fleet is slower."""

from __future__ import annotations

import pytest

from lorafleet.spec import ResourcesSpec
from lorafleet.train.runner import ray_trainer, without_dataset_manager


def _loop(config: dict) -> None:
    pass


def _callback_names(trainer) -> list[str]:
    return [type(c).__name__ for c in trainer._create_default_callbacks()]


@pytest.mark.parametrize("torch_backend", [False, True], ids=["slot", "own-run"])
def test_runs_without_ray_datasets_start_no_dataset_manager(torch_backend, tmp_path):
    trainer = ray_trainer(_loop, {}, ResourcesSpec(), "run", str(tmp_path), 0, torch_backend=torch_backend)
    names = _callback_names(trainer)
    assert "DatasetsCallback" not in names
    # everything else Ray Train sets up stays: placement-group cleanup, accelerators, metrics
    assert {"PlacementGroupCleanerCallback", "AcceleratorSetupCallback", "BackendSetupCallback"} <= set(names)
    assert type(trainer).__name__ == ("TorchTrainer" if torch_backend else "DataParallelTrainer")


def test_a_run_given_ray_datasets_keeps_its_dataset_manager():
    from ray.train.v2.api.data_parallel_trainer import DataParallelTrainer

    trainer = without_dataset_manager(DataParallelTrainer)(_loop, datasets={"train": lambda: None})
    assert "DatasetsCallback" in _callback_names(trainer)


def test_the_autoscaling_coordinator_factory_a_slot_host_calls_exists():
    # slot.start_autoscaling_coordinator tolerates its absence (only the overlap is lost): this
    # says when an upgrade took it away
    from ray.data._internal.cluster_autoscaler import default_autoscaling_coordinator as coordinator

    assert callable(coordinator.get_or_create_autoscaling_coordinator)
