"""The Ray Train runs lorafleet starts (a slot's, a job's own), with only the processes they need.

A cold run is a chain of processes, each started by the one before: the run's driver (a slot's
host, a job's task) creates the controller, which creates the synchronisation actor and the worker
group, whose worker then imports torch and trains. Each link costs a process start and an import
of Ray Train, and on a small node every process started beside the chain slows it down. Ray Train
2.60 adds to it, for every run: a DatasetManager actor, a placement-group cleaner actor, and a
runtime env on the controller and on each worker. Cut here, where they buy us nothing:
- no DatasetManager when a run is given no Ray Datasets (ours never are);
- one placement-group cleaner per cluster (`cluster_actors`) instead of one per run;
- no runtime env on the controller and workers when every variable Ray Train would put in it is
  one they inherit anyway (`inherits`). Ray starts a process with a runtime env of its own
  through its runtime-env agent (about 0.5 s more per process here), and never gives it one of
  the idle processes it keeps. On a cluster lorafleet started, or one joined with WORKER_ENV as
  the job's runtime env, every process already holds those variables.
Ray is pinned; the internals overridden here are checked by tests/test_ray_train_hooks.py.
"""

from __future__ import annotations

import os
import threading
from typing import Any

import ray
from ray._common.constants import RAY_WARN_BLOCKING_GET_INSIDE_ASYNC_ENV_VAR
from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
from ray.train.v2._internal.callbacks.datasets import DatasetsCallback
from ray.train.v2._internal.callbacks.placement_group_callback import PlacementGroupCleanerCallback
from ray.train.v2._internal.constants import DEFAULT_RAY_WARN_BLOCKING_GET_INSIDE_ASYNC_VALUE as NO_WARN
from ray.train.v2._internal.constants import get_env_vars_to_propagate
from ray.train.v2._internal.execution.callback import ControllerCallback, WorkerGroupCallback
from ray.train.v2._internal.execution.controller import TrainController
from ray.train.v2._internal.execution.worker_group import WorkerGroup

from lorafleet.spec import ResourcesSpec
from lorafleet.train.cluster_actors import run_cleaner


def backend_name(gpus_per_worker: float) -> str:
    """The process-group backend, chosen from the torch build rather than this process's devices:
    this task runs on the driver's node, often a CPU-only head, while the workers hold the GPUs.
    With GPUs, CUDA tensors go over NCCL and CPU tensors over gloo, so a job still trains when a
    node declares GPUs that are not usable (the worker then falls back to the CPU)."""
    import torch.distributed as dist

    if gpus_per_worker > 0 and dist.is_nccl_available():
        return "cpu:gloo,cuda:nccl"
    return "gloo"


def cpu_if_no_cuda() -> None:
    """Ray Train exports ACCELERATE_TORCH_DEVICE from the GPU ids Ray assigned (cuda:N) whether or
    not torch can use CUDA there, and accelerate then puts the trainer on CUDA even with use_cpu.
    A node that declares a GPU torch cannot use (a simulated cluster, a CPU build of torch) trains
    on the CPU instead of crashing."""
    import torch

    if not torch.cuda.is_available() and os.environ.get("ACCELERATE_TORCH_DEVICE", "").startswith("cuda"):
        os.environ["ACCELERATE_TORCH_DEVICE"] = "cpu"


def scaling(res: Any) -> ScalingConfig:
    """One Ray Train worker group as a job's (or a slot's) resources ask for it."""
    per_worker = {"CPU": res.cpus_per_worker} | ({"GPU": res.gpus_per_worker} if res.gpus_per_worker else {})
    # use_gpu only reserves the GPU (ScalingConfig requires it with a GPU resource) and sets
    # CUDA_VISIBLE_DEVICES; Ray Train touches CUDA only if torch sees a device
    return ScalingConfig(
        num_workers=res.workers, use_gpu=res.gpus_per_worker > 0, resources_per_worker=per_worker
    )


def ray_trainer(
    loop: Any,
    config: dict[str, Any],
    res: ResourcesSpec,
    run_name: str,
    storage: str,
    max_failures: int,
    torch_backend: bool = True,
) -> Any:
    """The Ray Train run of one job or one slot: its workers, backend, storage and restarts. A job
    gets the torch backend (its workers form a process group: DDP, DeepSpeed); a slot, one worker
    that needs none, gets Ray Train's plain data-parallel trainer."""
    run_config = RunConfig(
        name=run_name,
        storage_path=storage,
        failure_config=FailureConfig(max_failures=max_failures),
        checkpoint_config=CheckpointConfig(num_to_keep=2),
    )
    if not torch_backend:
        from ray.train.v2.api.data_parallel_trainer import DataParallelTrainer

        return lean(DataParallelTrainer)(
            loop, train_loop_config=config, scaling_config=scaling(res), run_config=run_config
        )
    from ray.train.torch import TorchConfig, TorchTrainer

    return lean(TorchTrainer)(
        loop,
        train_loop_config=config,
        torch_config=TorchConfig(backend=backend_name(res.gpus_per_worker)),
        scaling_config=scaling(res),
        run_config=run_config,
    )


def lean(trainer_cls: type) -> type:
    """`trainer_cls` with the three cuts above. Everything else Ray Train sets up stays."""

    class Trainer(trainer_cls):
        def _create_default_callbacks(self) -> list[Any]:
            callbacks = []
            for callback in super()._create_default_callbacks():
                if isinstance(callback, DatasetsCallback) and not self.datasets:
                    continue
                if type(callback) is PlacementGroupCleanerCallback:
                    callback = SharedCleanerCallback()
                callbacks.append(callback)
            return callbacks

        def _initialize_and_run_controller(self, **controller_init_kwargs: Any) -> Any:
            return run_controller(self, controller_init_kwargs)

    Trainer.__name__ = Trainer.__qualname__ = trainer_cls.__name__
    return Trainer


def inherits(env_vars: dict[str, str]) -> bool:
    """Whether an actor this process creates without a runtime env gets `env_vars` anyway: it
    inherits this process's environment (the cluster's, or the job's runtime env), and Ray Train
    builds `env_vars` from that same environment, so this holds unless a variable it adds (its
    async-warning switch) is missing, or the process changed one after it started (ours never do)."""
    return all(os.environ.get(name) == value for name, value in env_vars.items())


def run_controller(trainer: Any, controller_init_kwargs: dict[str, Any]) -> Any:
    """DataParallelTrainer._initialize_and_run_controller (Ray 2.60) with `LeanController`, and no
    runtime env when the controller inherits its variables."""
    env_vars = get_env_vars_to_propagate()
    env_vars.setdefault(RAY_WARN_BLOCKING_GET_INSIDE_ASYNC_ENV_VAR, NO_WARN)
    own_env = {} if inherits(env_vars) else {"runtime_env": {"env_vars": env_vars}}
    node = {ray._raylet.RAY_NODE_ID_KEY: ray.get_runtime_context().get_node_id()}
    controller_cls = ray.remote(num_cpus=0, label_selector=node, **own_env)(LeanController)
    controller = controller_cls.remote(**controller_init_kwargs)
    if threading.current_thread() is threading.main_thread():
        trainer._register_sigint_handler(controller)
    ray.get(controller.run.remote())
    return ray.get(controller.get_result.remote())


class InheritingWorkerGroup(WorkerGroup):
    """A worker group whose workers get no runtime env when they inherit its variables."""

    @staticmethod
    def _get_worker_runtime_env(custom_runtime_env: Any) -> Any:
        runtime_env = WorkerGroup._get_worker_runtime_env(custom_runtime_env)
        if set(runtime_env) == {"env_vars"} and inherits(runtime_env["env_vars"]):
            return None
        return runtime_env


class LeanController(TrainController):
    worker_group_cls = InheritingWorkerGroup


class SharedCleanerCallback(ControllerCallback, WorkerGroupCallback):
    """Ray Train's PlacementGroupCleanerCallback with the cluster's one cleaner in place of an
    actor per run. Nothing here waits on the cleaner (Ray's waited for its own to start before
    the run's workers trained): a run's calls to it queue in order, so its `forget` never
    overtakes its `watch`."""

    def __init__(self) -> None:
        self.controller_id: str | None = None
        self.cleaner: Any = None

    def after_controller_start(self, train_run_context: Any) -> None:
        self.controller_id = ray.get_runtime_context().get_actor_id()
        self.cleaner = run_cleaner()

    def after_worker_group_start(self, worker_group: Any) -> None:
        if self.cleaner is not None:
            state = worker_group.get_worker_group_state()
            self.cleaner.watch.remote(self.controller_id, state.placement_group_handle.placement_group)

    async def before_controller_shutdown(self) -> None:
        self._forget()

    def before_controller_abort(self) -> None:
        self._forget()

    def _forget(self) -> None:
        """The controller ends by itself and removes its placement group: stop watching it."""
        if self.cleaner is not None:
            self.cleaner.forget.remote(self.controller_id)
            self.cleaner = None
