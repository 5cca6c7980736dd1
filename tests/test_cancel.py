"""`lorafleet cancel` from another process stops one running job; the others finish."""

from __future__ import annotations

import subprocess
import sys

import pytest

from lorafleet import tracking
from lorafleet.pipeline import submit
from tests.conftest import fleet_file

pytestmark = pytest.mark.integration


def cli(*args: str) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "lorafleet.cli", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def test_cancel_from_another_process_stops_one_job(lf_home, micro_base, ray_session):
    jobs = {"slow": {"training": {"max_steps": 5000}}, "quick": {}}
    training = {"max_steps": 6, "save_steps": 3, "logging_steps": 1}
    path = fleet_file(lf_home, "cancelme", jobs, base=micro_base, training=training)
    address = ray_session.get_runtime_context().gcs_address
    calls: list[subprocess.Popen] = []

    def on_tick(rows: dict) -> None:  # once the slow job is training, cancel it from a new process
        if not calls and rows["slow"].get("state") == "running" and rows["slow"].get("step", 0) >= 2:
            calls.append(cli("cancel", "cancelme", "--job", "slow", "--ray-address", address))

    result = submit(path, on_tick=on_tick)
    assert calls and calls[0].wait(timeout=120) == 0, calls[0].stdout.read()
    slow, quick = result.jobs["slow"], result.jobs["quick"]
    assert (slow.state, slow.reason) == ("cancelled", "cancelled by user")
    assert quick.state == "succeeded" and quick.registered
    run = tracking.client().get_run(slow.run_id)
    assert run.data.tags["lorafleet.state"] == "cancelled"
    assert run.data.metrics.get("step", 0) < 5000  # stopped early, not run to the end

    gone = cli("cancel", "cancelme", "--ray-address", address)  # the submission is over
    out = gone.communicate(timeout=120)[0]
    assert gone.returncode == 2 and "no running submission of fleet 'cancelme'" in out, out
