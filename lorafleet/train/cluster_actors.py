"""The cluster-wide actors every Ray Train run of ours uses, one of each per cluster: Ray Train's
autoscaling coordinator, and a placement-group cleaner for all runs. A submission starts them as
it begins (`start`), so on a cluster's first submission they come up while the fleet is validated
instead of inside its first run's start-up; later submissions find them running.

Ray Train 2.60 gives each run a detached `PlacementGroupCleaner` actor of its own: if the run's
controller dies without shutting down (its node lost, its process killed), the run's placement
group would otherwise hold its CPUs and GPUs until the job that created it ends, which for a warm
slot driven by a detached host is the cluster's life. That is one more process, importing Ray
Train, per run: on a cold slot it started beside the synchronisation actor and the training
worker and, on a small node, pushed the worker's start back by about a second. Here one detached
actor per cluster watches every run's controller the way Ray's does (the state API, once a
second) and removes the placement group of a controller that died. Ray upstream is moving the
same way (ray-project/ray#65447, "Share PlacementGroupCleaner across Train runs"). The runs reach
it through `lorafleet.train.raytrain.SharedCleanerCallback`; this module imports no Ray Train, so
the cleaner's process starts in a fraction of a second.
"""

from __future__ import annotations

import contextlib
import logging
import threading
from typing import Any

import ray
from ray._common.constants import HEAD_NODE_RESOURCE_NAME

from lorafleet.raystart import NAMESPACE

logger = logging.getLogger(__name__)

CLEANER_NAME = "ray-train-run-cleaner"
CHECK_INTERVAL_S = 1.0  # Ray's own cleaner checks its controller as often
GET_ACTOR_TIMEOUT_S = 10  # Ray Train's GET_ACTOR_TIMEOUT_S


class RunCleaner:
    """Removes the placement group of any watched Ray Train run whose controller is dead."""

    def __init__(self, check_interval_s: float = CHECK_INTERVAL_S) -> None:
        self.runs: dict[str, Any] = {}  # controller actor id -> its worker group's placement group
        self.lock = threading.Lock()
        self.interval = check_interval_s
        threading.Thread(target=self._loop, daemon=True, name="run-cleaner").start()
        # from here, not the driver: the coordinator's module imports Ray Data (half a second)
        threading.Thread(target=start_autoscaling_coordinator, daemon=True).start()

    def watch(self, controller_id: str, placement_group: Any) -> None:
        """A run's worker group started (or restarted) in this placement group."""
        with self.lock:
            self.runs[controller_id] = placement_group

    def forget(self, controller_id: str) -> None:
        """The run's controller shuts down by itself: it removes its own placement group."""
        with self.lock:
            self.runs.pop(controller_id, None)

    def watched(self) -> list[str]:
        with self.lock:
            return sorted(self.runs)

    def _loop(self) -> None:
        stop = threading.Event()
        while not stop.wait(self.interval):
            with self.lock:
                runs = list(self.runs.items())
            for controller_id, placement_group in runs:
                self._check(controller_id, placement_group)

    def _check(self, controller_id: str, placement_group: Any) -> None:
        from ray.train.v2._internal.state.util import is_actor_alive
        from ray.util.placement_group import remove_placement_group

        try:
            if is_actor_alive(actor_id=controller_id, timeout=GET_ACTOR_TIMEOUT_S):
                return
        except Exception:  # the state API is briefly unavailable: ask again next round
            return
        with self.lock:
            if self.runs.get(controller_id) is not placement_group:
                return  # forgotten or replaced meanwhile
            del self.runs[controller_id]
        logger.warning(f"Ray Train controller {controller_id} died: removing its placement group")
        with contextlib.suppress(Exception):  # removed already (its controller did it first)
            remove_placement_group(placement_group)


_CLEANER_ACTOR = ray.remote(RunCleaner)  # made once: each run's controller asks for the cleaner


def run_cleaner() -> Any:
    """The cluster's cleaner, started by the first run that needs it. On the head node, as Ray
    places its own (it outlives every driver and worker node); restarted if its process dies
    (the runs it watched then are unwatched, as with Ray's own cleaner dying)."""
    return _CLEANER_ACTOR.options(
        name=CLEANER_NAME,
        namespace=NAMESPACE,
        lifetime="detached",
        get_if_exists=True,
        max_restarts=-1,
        num_cpus=0,
        resources={HEAD_NODE_RESOURCE_NAME: 0.001},
    ).remote()


def start_autoscaling_coordinator() -> None:
    """Ray Train's cluster-wide autoscaling coordinator (one detached actor, which a run's
    controller otherwise creates and waits for, importing Ray Data first). Ray is pinned (2.60)
    and the function is internal: if it moved, the first run starts it as before."""
    with contextlib.suppress(ImportError, AttributeError):
        from ray.data._internal.cluster_autoscaler.default_autoscaling_coordinator import (
            get_or_create_autoscaling_coordinator,
        )

        get_or_create_autoscaling_coordinator()


def start() -> None:
    """Both actors, started if the cluster lacks them (the cleaner starts the coordinator);
    returns at once."""
    run_cleaner()
