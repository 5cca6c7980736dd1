"""Warm slots on real Ray Train, trl, peft and bitsandbytes (NF4) with MLflow on SQLite: several
jobs through one slot (one base load), a failing job alone, a job that kills its process."""

from __future__ import annotations

import json

import pytest

from lorafleet import tracking
from lorafleet.cli import main
from lorafleet.pipeline import submit
from lorafleet.validate import check_fleet
from tests.conftest import fleet_file


def test_validate_says_which_jobs_share_slots(lf_home, micro_base, capsys):
    jobs = {
        "warm": {},
        "alone": {"packing": False},
        "wide": {"resources": {"workers": 2}},
        "zero": {"training": {"deepspeed": "zero2"}},
        "full": {"quantization": {"load_in_4bit": False}},
        "dora": {"lora": {"use_dora": True}},
    }
    reasons = check_fleet(fleet_file(lf_home, "slots", jobs, base=micro_base)).own_run_reasons()
    assert reasons["warm"] is None
    assert "packing: false" in reasons["alone"]
    assert "workers is 2" in reasons["wide"]
    assert "DeepSpeed" in reasons["zero"]
    assert "quantization" in reasons["full"]
    assert "DoRA" in reasons["dora"]
    off = check_fleet(fleet_file(lf_home, "off", {"warm": {}}, base=micro_base, packing={"enabled": False}))
    assert off.own_run_reasons() == {"warm": "packing.enabled is false"}

    assert main(["validate", str(lf_home / "slots.yaml"), "--json"]) == 0
    training = json.loads(capsys.readouterr().out)["training"]
    assert training["warm"] == {"trains_in": "warm slot", "reason": None}
    assert training["alone"]["trains_in"] == "own run"


@pytest.mark.integration
def test_jobs_share_one_slot_and_a_failing_one_fails_alone(lf_home, micro_base, ray_session):
    jobs = {"a": {}, "b": {}, "bad": {}, "solo": {"packing": False}}
    path = fleet_file(lf_home, "slots", jobs, base=micro_base, packing={"slots": 1})

    result = submit(path, fail_at_step={"bad": 3})

    states = {c: o.state for c, o in result.jobs.items()}
    reasons = {c: o.reason for c, o in result.jobs.items()}
    assert states == {"a": "succeeded", "b": "succeeded", "bad": "failed", "solo": "succeeded"}, reasons
    assert "injected fault at step 3" in result.jobs["bad"].reason
    client = tracking.client()
    for customer in ("a", "b", "solo"):
        run = client.get_run(result.jobs[customer].run_id)
        assert run.data.tags["mlflow.parentRunId"] == result.fleet_run_id
        assert [m.step for m in client.get_metric_history(run.info.run_id, "loss")] == [2, 4]
        assert result.jobs[customer].registered == f"{customer}/1"
    tags = {c: client.get_run(result.jobs[c].run_id).data.tags for c in ("a", "b", "bad", "solo")}
    assert {tags[c]["lorafleet.slot"] for c in ("a", "b", "bad")} == {"slot0"}  # one slot, one base
    assert tags["a"]["lorafleet.trains_in"] == "warm slot" and tags["a"]["lorafleet.pack_k"] == "8"
    assert tags["a"]["lorafleet.packed_with"] == "b,bad"  # trained at once, on one base copy
    assert tags["solo"]["lorafleet.trains_in"] == "own run" and "lorafleet.slot" not in tags["solo"]


@pytest.mark.integration
def test_a_job_that_kills_its_process_costs_a_slot_restart(lf_home, micro_base, ray_session):
    jobs = {
        "crash": {"resources": {"max_failures": 1}},
        "doomed": {},  # max_failures 0: its one crash fails it
        "steady": {},
    }
    # one job at a time in the slot: a crash is then blamed on the job that trained
    path = fleet_file(lf_home, "slots", jobs, base=micro_base, packing={"slots": 1, "max_jobs_per_slot": 1})

    result = submit(path, crash_at_step={"crash": 3, "doomed": 3})

    states = {c: o.state for c, o in result.jobs.items()}
    reasons = {c: o.reason for c, o in result.jobs.items()}
    assert states == {"crash": "succeeded", "doomed": "failed", "steady": "succeeded"}, reasons
    assert "process died 1 time(s)" in result.jobs["doomed"].reason
    client = tracking.client()
    crash = client.get_run(result.jobs["crash"].run_id)
    assert crash.data.tags["lorafleet.attempts"] == "2"
    assert crash.data.tags["lorafleet.resumed_from_step"] == "2"  # its step-2 checkpoint
    assert [m.step for m in client.get_metric_history(crash.info.run_id, "loss")] == [2, 4]
    steady = client.get_run(result.jobs["steady"].run_id).data.tags
    assert steady["lorafleet.attempts"] == "1"
