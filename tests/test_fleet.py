"""The fleet runner on real Ray Train, trl, peft and bitsandbytes (NF4) with MLflow on SQLite."""

from __future__ import annotations

import json

import pytest
from safetensors.torch import load_file

from lorafleet import tracking
from lorafleet.cli import main
from lorafleet.pipeline import submit
from tests.conftest import fleet_file, write_chat

pytestmark = pytest.mark.integration


# eight steps, a checkpoint every four and an eval split (conftest.TRAINING logs every two steps)
MECH = {"max_steps": 8, "save_steps": 4, "eval_fraction": 0.1}


def test_bad_job_fails_alone_and_good_ones_train(lf_home, micro_base, ray_session):
    write_chat(lf_home / "a.jsonl", "alpha")
    write_chat(lf_home / "b.jsonl", "beta")
    (lf_home / "c.jsonl").write_text('{"messages": [{"role": "user", "content": "x"}]}\n')
    jobs: dict = {"a": "a.jsonl", "b": "b.jsonl", "c": "c.jsonl"}
    # more than any node of the session's cluster (2 CPUs, no GPU) holds: they waited forever
    jobs |= {"big": {"dataset": "a.jsonl", "resources": {"cpus_per_worker": 64}}}
    jobs |= {"gpu": {"dataset": "a.jsonl", "resources": {"gpus_per_worker": 1}}}
    path = fleet_file(lf_home, "mech", jobs, base=micro_base, training=MECH)

    result = submit(path)

    states = {c: o.state for c, o in result.jobs.items()}
    assert states == {"a": "succeeded", "b": "succeeded", "c": "failed", "big": "failed", "gpu": "failed"}
    assert "c.jsonl:1: no assistant turn" in result.jobs["c"].reason
    largest = "no node of the cluster holds one (the largest: 2 CPUs, 0 GPUs)"
    assert "1 worker(s) of 64 CPU and 0 GPU each" in result.jobs["big"].reason
    assert largest in result.jobs["big"].reason and largest in result.jobs["gpu"].reason
    client = tracking.client()
    for customer in ("a", "b"):
        run = client.get_run(result.jobs[customer].run_id)
        assert run.info.status == "FINISHED" and run.data.tags["lorafleet.state"] == "succeeded"
        assert run.data.tags["mlflow.parentRunId"] == result.fleet_run_id
        assert [m.step for m in client.get_metric_history(run.info.run_id, "loss")] == [2, 4, 6, 8]
        assert "eval_loss" in run.data.metrics
        assert run.data.params["lora.rank"] == "4"
        assert run.data.params["training.optimizer"] == "paged_adamw_8bit"
        files = {f.path for f in client.list_artifacts(run.info.run_id, "adapter")}
        assert files == {"adapter/adapter_config.json", "adapter/adapter_model.safetensors"}
        weights = load_file(result.jobs[customer].adapter_dir / "adapter_model.safetensors")
        assert any("lora_B" in k and w.abs().sum() > 0 for k, w in weights.items())  # trained
    failed = client.get_run(result.jobs["c"].run_id)
    assert failed.info.status == "FAILED"
    assert "no assistant turn" in failed.data.tags["lorafleet.failure_reason"]


def test_resume_continues_from_checkpoint_and_skips_succeeded(lf_home, micro_base, ray_session, capsys):
    write_chat(lf_home / "a.jsonl", "alpha")
    write_chat(lf_home / "b.jsonl", "beta")
    jobs = {"a": "a.jsonl", "b": "b.jsonl"}
    path = fleet_file(lf_home, "resume", jobs, base=micro_base, training=MECH | {"max_steps": 10})

    first = submit(path, fail_at_step={"a": 6})  # crash after the step-4 checkpoint
    assert first.jobs["a"].state == "failed" and "injected fault at step 6" in first.jobs["a"].reason
    assert first.jobs["b"].state == "succeeded"

    second = submit(path)

    client = tracking.client()
    a_run = client.get_run(second.jobs["a"].run_id)
    assert second.jobs["a"].state == "succeeded"
    assert a_run.data.tags["lorafleet.resumed_from_step"] == "4"
    # the step counter continues from the checkpoint instead of starting over
    assert [m.step for m in client.get_metric_history(a_run.info.run_id, "loss")] == [6, 8, 10]
    assert second.jobs["b"].reused_from == first.jobs["b"].run_id  # not retrained

    capsys.readouterr()  # drop what the runs printed (Ray writes its warnings to stdout)
    assert main(["status", "resume", "--json"]) == 0
    rows = {r["customer"]: r for r in json.loads(capsys.readouterr().out)["jobs"]}
    assert rows["a"]["state"] == "succeeded" and rows["a"]["step"] == 10
    assert rows["b"]["reused_from"] == first.jobs["b"].run_id
