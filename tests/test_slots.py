"""Warm slots on real Ray Train, trl, peft and bitsandbytes (NF4) with MLflow on SQLite: several
jobs through one slot (one base load), a failing job alone, a job that kills its process, and a
slot kept warm for the next submission (`packing.keep_warm_s`)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest

from lorafleet import tracking
from lorafleet.cli import main
from lorafleet.pipeline import submit
from lorafleet.raystart import NAMESPACE
from lorafleet.train.pool import POOL_NAME, release
from lorafleet.train.slot import existing_hosts
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
    # a job targeting the embedding, which the endpoint cannot serve: refused at validation, it
    # never reaches the slot (whose first job it was: sizing K from it once failed the slot)
    jobs = {"emb": {"lora": {"target_modules": ["embed_tokens"]}}, "a": {}, "b": {}, "bad": {}}
    jobs["solo"] = {"packing": False}
    path = fleet_file(lf_home, "slots", jobs, base=micro_base, packing={"slots": 1})

    result = submit(path, fail_at_step={"bad": 3})

    states = {c: o.state for c, o in result.jobs.items()}
    reasons = {c: o.reason for c, o in result.jobs.items()}
    expected = {"emb": "failed", "a": "succeeded", "b": "succeeded", "bad": "failed", "solo": "succeeded"}
    assert states == expected, reasons
    assert "injected fault at step 3" in result.jobs["bad"].reason
    assert "['embed_tokens'] name the embedding or the output head" in result.jobs["emb"].reason
    client = tracking.client()
    for customer in ("a", "b", "solo"):
        run = client.get_run(result.jobs[customer].run_id)
        assert run.data.tags["mlflow.parentRunId"] == result.fleet_run_id
        assert [m.step for m in client.get_metric_history(run.info.run_id, "loss")] == [2, 4]
        assert result.jobs[customer].registered == f"{customer}/1"
    tags = {c: client.get_run(result.jobs[c].run_id).data.tags for c in ("a", "b", "bad", "solo")}
    assert len({tags[c]["lorafleet.slot"] for c in ("a", "b", "bad")}) == 1  # one slot, one base
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


def _tags(result, customer):
    return tracking.client().get_run(result.jobs[customer].run_id).data.tags


def _run_end(ray, slot: str, timeout_s: float = 120) -> str | None:
    """How the slot's Ray Train run ended (None: cleanly), once it has; its host thread is gone then."""
    pool = ray.get_actor(POOL_NAME, namespace=NAMESPACE)
    deadline = time.monotonic() + timeout_s
    while slot not in (ends := ray.get(pool.ended_runs.remote())):
        assert time.monotonic() < deadline, f"{slot} is still running"
        time.sleep(0.2)
    while slot in ray.get(existing_hosts().running.remote()):  # it tells the pool first
        assert time.monotonic() < deadline, f"{slot}'s host is still there"
        time.sleep(0.2)
    return ends[slot]


@pytest.mark.integration
def test_a_warm_slot_takes_the_next_submission_and_survives_a_crash_in_it(lf_home, micro_base, ray_session):
    """The second fleet's jobs run on the slot the first kept warm; a job that kills the slot's
    process there resumes in the restarted worker, which finds the second submission through the
    pool (its Ray Train config names the first)."""
    one_at_a_time = {"slots": 1, "max_jobs_per_slot": 1}
    first = fleet_file(
        lf_home, "warm-a", {"a": {}}, base=micro_base, packing=one_at_a_time | {"keep_warm_s": 120}
    )
    jobs = {"b": {"resources": {"max_failures": 1}}, "c": {}}
    second = fleet_file(lf_home, "warm-b", jobs, base=micro_base, packing=one_at_a_time)

    r1 = submit(first)
    r2 = submit(second, crash_at_step={"b": 3})

    assert r1.ok() and r2.ok(), {c: o.reason for c, o in (r1.jobs | r2.jobs).items()}
    a, b, c = _tags(r1, "a"), _tags(r2, "b"), _tags(r2, "c")
    assert a["lorafleet.slot"] == b["lorafleet.slot"] == c["lorafleet.slot"]
    assert (a["lorafleet.slot_reused"], c["lorafleet.slot_reused"]) == ("false", "true")
    assert b["lorafleet.attempts"] == "2" and b["lorafleet.resumed_from_step"] == "2"
    assert r2.jobs["b"].registered == "b/1" and r2.jobs["c"].registered == "c/1"
    # the second fleet keeps nothing warm: its slot's run ends
    assert _run_end(ray_session, a["lorafleet.slot"]) is None  # cleanly
    assert release() == []


@pytest.mark.integration
def test_warm_slots_end_when_released_or_their_wait_runs_out(lf_home, micro_base, ray_session, capsys):
    kept = fleet_file(lf_home, "warm-c", {"d": {}}, base=micro_base, packing={"slots": 1, "keep_warm_s": 600})
    brief = fleet_file(lf_home, "warm-d", {"e": {}}, base=micro_base, packing={"slots": 1, "keep_warm_s": 2})

    slot = _tags(submit(kept), "d")["lorafleet.slot"]
    address = ["--ray-address", ray_session.get_runtime_context().gcs_address]
    assert main(["slots", "--json", *address]) == 0
    listed = {row["slot"]: row for row in json.loads(capsys.readouterr().out)["slots"]}
    assert listed[slot]["state"] in ("idle", "kept") and listed[slot]["keep_warm_s"] == 600
    assert main(["slots", "--release", "--json", *address]) == 0  # e.g. before serving on the same GPUs
    assert json.loads(capsys.readouterr().out)["released"] == [slot]
    assert _run_end(ray_session, slot) is None

    e = _tags(submit(brief), "e")
    assert e["lorafleet.slot"] != slot and e["lorafleet.slot_reused"] == "false"
    assert _run_end(ray_session, e["lorafleet.slot"]) is None  # not claimed: its wait ran out
    assert release() == []


def test_submit_checks_every_fleet_file_before_any_runs(lf_home, micro_base, capsys):
    good = fleet_file(lf_home, "first", {"a": {}}, base=micro_base)
    bad = fleet_file(lf_home, "second", {"b": {}}, base=micro_base, packing={"keep_warm_s": -1})

    assert main(["submit", str(good), str(bad)]) == 2
    assert "packing.keep_warm_s" in capsys.readouterr().err
    assert tracking.latest_fleet_run(tracking.client(), "first") is None  # the first never started


@pytest.mark.integration
def test_fleet_files_submitted_together_pass_on_their_warm_slots(lf_home, micro_base, ray_session):
    first = fleet_file(lf_home, "team-a", {"a": {}}, base=micro_base, packing={"slots": 1, "keep_warm_s": 60})
    second = fleet_file(lf_home, "team-b", {"b": {}}, base=micro_base, packing={"slots": 1})

    assert main(["submit", str(first), str(second)]) == 0

    client = tracking.client()
    a, b = (tracking.job_runs(client, tracking.latest_fleet_run(client, f))[0] for f in ("team-a", "team-b"))
    assert a.data.tags["lorafleet.slot"] == b.data.tags["lorafleet.slot"]
    assert b.data.tags["lorafleet.slot_reused"] == "true"


@pytest.mark.integration
def test_a_warm_slot_outlives_the_process_that_submitted(lf_home, micro_base, ray_session):
    """`lorafleet submit` in a process of its own joins the cluster and exits; the slot it kept
    warm takes the next submission, from another process (here: this one)."""
    kept = {"slots": 1, "keep_warm_s": 120}
    first = fleet_file(lf_home, "proc-a", {"a": {}}, base=micro_base, packing=kept)
    second = fleet_file(lf_home, "proc-b", {"b": {}}, base=micro_base, packing={"slots": 1})
    address = ray_session.get_runtime_context().gcs_address
    cmd = [sys.executable, "-m", "lorafleet.cli", "submit", str(first), "--ray-address", address]

    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=os.environ.copy())
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    r2 = submit(second)

    client = tracking.client()
    a = tracking.job_runs(client, tracking.latest_fleet_run(client, "proc-a"))[0].data.tags
    b = _tags(r2, "b")
    assert r2.ok(), r2.jobs["b"].reason
    assert a["lorafleet.slot"] == b["lorafleet.slot"] and b["lorafleet.slot_reused"] == "true"
    assert _run_end(ray_session, b["lorafleet.slot"]) is None  # the second keeps nothing warm


def test_slots_and_cancel_without_a_cluster_say_how_to_start_one(monkeypatch, capsys):
    from lorafleet import raystart

    def no_cluster(address, **_):
        raise ConnectionError(f"Could not find any running Ray instance at {address}")

    monkeypatch.setattr(raystart, "init_ray", no_cluster)  # as ray.init("auto") answers with none
    for argv in (["slots"], ["cancel", "demo"]):
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert "no running Ray cluster at auto" in err and "ray start --head" in err, err


def test_a_dead_cluster_address_is_an_error_at_once(monkeypatch, capsys):
    """An address where nothing listens: Ray retried it for about two minutes before saying so."""
    from lorafleet.raystart import free_port

    dead = f"127.0.0.1:{free_port()}"
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    for argv in (["slots", "--ray-address", dead], ["cancel", "demo", "--ray-address", dead]):
        started = time.monotonic()
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert f"no running Ray cluster at {dead} (Connection refused)" in err, err
        assert time.monotonic() - started < 10
