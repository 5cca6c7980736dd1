"""Autoscaling on a local cluster: load on the endpoint adds a replica, idleness takes it away."""

from __future__ import annotations

import os
import threading
import time

import httpx
import pytest

from lorafleet.serve.config import AppArgs
from lorafleet.serve.run import APP_NAME, start, stop

pytestmark = pytest.mark.integration
PORT = 8766
# Serve pushes load metrics every 10 s by default; 1 s keeps this test to seconds. Set at import,
# before the session's Ray starts, so the replicas and the ingress inherit them.
os.environ.setdefault("RAY_SERVE_HANDLE_AUTOSCALING_METRIC_PUSH_INTERVAL_S", "1")
os.environ.setdefault("RAY_SERVE_REPLICA_AUTOSCALING_METRIC_PUSH_INTERVAL_S", "1")


def running_replicas() -> int:
    from ray import serve

    status = serve.status().applications[APP_NAME].deployments["BaseReplica"]
    return sum(n for state, n in status.replica_states.items() if str(state).endswith("RUNNING"))


def wait_for(predicate, timeout_s: float) -> float:
    start_t = time.monotonic()
    while time.monotonic() - start_t < timeout_s:
        if predicate():
            return time.monotonic() - start_t
        time.sleep(0.5)
    raise AssertionError(f"not reached in {timeout_s} s (running replicas: {running_replicas()})")


class Load:
    """Clients sending completions to the base in a loop until stopped; counts answers and errors."""

    def __init__(self, url: str, clients: int):
        self.url, self.stop_event = url, threading.Event()
        self.ok, self.errors = 0, []
        self.threads = [threading.Thread(target=self._client, daemon=True) for _ in range(clients)]

    def _client(self) -> None:
        with httpx.Client(timeout=120) as http:
            while not self.stop_event.is_set():
                r = http.post(
                    f"{self.url}/completions",
                    json={
                        "model": "tiny-llama",
                        "prompt": "The ticket says",
                        "max_tokens": 32,
                        "temperature": 0,
                    },
                )
                if r.status_code == 200 and r.json()["usage"]["completion_tokens"] > 0:
                    self.ok += 1
                else:
                    self.errors.append((r.status_code, r.text[:200]))

    def __enter__(self) -> Load:
        for t in self.threads:
            t.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop_event.set()
        for t in self.threads:
            t.join()


def test_replicas_scale_up_under_load_and_back_down_when_idle(ray_session, lf_home):
    url = start(
        AppArgs(
            base_model="tiny-llama",
            min_replicas=1,
            max_replicas=2,
            target_ongoing_requests=2,
            upscale_delay_s=1,
            downscale_delay_s=3,
            autoscale_look_back_s=2,
            replica_cpus=0.5,
            max_new_tokens=32,
        ),
        port=PORT,
    )
    try:
        assert running_replicas() == 1
        with Load(url, clients=12) as load:
            up_s = wait_for(lambda: running_replicas() == 2, timeout_s=90)
            served_before = load.ok
            time.sleep(3)  # both replicas take traffic
            assert load.ok > served_before
        down_s = wait_for(lambda: running_replicas() == 1, timeout_s=90)
        assert load.errors == [] and load.ok > 0
        print(
            f"scaled 1->2 in {up_s:.1f} s under load, 2->1 in {down_s:.1f} s once idle; "
            f"{load.ok} requests, no errors"
        )
    finally:
        stop()
