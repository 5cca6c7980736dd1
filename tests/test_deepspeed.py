"""Several workers per job: DDP (gloo) and DeepSpeed ZeRO-2/3 on real Ray Train, trl, peft, NF4.

The trained adapter of a 2-worker job must have the same form as a one-worker job's and register
the same way; preset names must resolve from an installed wheel; impossible settings fail at
validation with a message saying what to use instead.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
from safetensors.torch import load_file

from lorafleet import registry, tracking
from lorafleet.cli import main
from lorafleet.errors import SpecError
from lorafleet.pipeline import submit
from lorafleet.spec import deepspeed_presets, load_fleet
from tests.conftest import fleet_file, write_chat

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "configs" / "deepspeed"


# two short steps of short rows: enough for a 2-worker job to train and save once
TWO_STEPS = {
    "max_steps": 2,
    "save_steps": 2,
    "batch_size": 2,
    "max_length": 48,
    "logging_steps": 1,
    "eval_fraction": 0.1,
}


def test_packaged_presets_are_the_configs_files():
    """configs/deepspeed is the source of truth; the package ships byte-identical copies."""
    shipped = deepspeed_presets()
    assert {"zero2", "zero3"} <= set(shipped)
    assert sorted(shipped) == sorted(p.stem for p in CONFIGS.glob("*.json")), (
        "cp configs/deepspeed/*.json lorafleet/presets/deepspeed/"
    )
    for name, path in shipped.items():
        assert path.read_bytes() == (CONFIGS / f"{name}.json").read_bytes(), (
            f"{path} differs from configs/deepspeed/{name}.json; copy it over"
        )


def test_wheel_resolves_presets_without_the_checkout(tmp_path):
    """Build the wheel, unpack it away from the repository, and resolve the presets from it."""
    pytest.importorskip("setuptools", reason="building the wheel offline needs setuptools in the venv")
    src = tmp_path / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(ROOT / name, src / name)
    shutil.copytree(ROOT / "lorafleet", src / "lorafleet", ignore=shutil.ignore_patterns("__pycache__"))
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "-q",
            "-w",
            str(tmp_path / "dist"),
            str(src),
        ],
        check=True,
        capture_output=True,
    )
    (wheel,) = (tmp_path / "dist").glob("lorafleet-*.whl")
    site = tmp_path / "site"
    with zipfile.ZipFile(wheel) as zf:
        assert "lorafleet/presets/deepspeed/zero3.json" in zf.namelist()
        zf.extractall(site)
    code = (
        "import json, lorafleet.spec as s; print(json.dumps({k: [str(p), s.load_deepspeed(k)] "
        "for k, p in s.deepspeed_presets().items()}))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code],
        cwd=tmp_path,
        env={"PYTHONPATH": str(site)},
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    found = json.loads(out)
    assert set(found) == {p.stem for p in CONFIGS.glob("*.json")}
    for name, (path, config) in found.items():
        assert path.startswith(str(site))  # from the unpacked wheel, not the checkout
        assert config == json.loads((CONFIGS / f"{name}.json").read_text())


def test_unknown_preset_fails_validation_listing_presets(lf_home, capsys):
    write_chat(lf_home / "a.jsonl", "alpha")
    jobs = {"a": {"dataset": "a.jsonl", "training": {"deepspeed": "zero5"}}}
    path = fleet_file(lf_home, "multi", jobs, base="tiny-llama", training=TWO_STEPS)
    expected = (
        "jobs[0].training.deepspeed: unknown DeepSpeed preset 'zero5'; presets: zero2, zero3, "
        "or give a path to a DeepSpeed JSON file"
    )
    with pytest.raises(SpecError) as err:
        load_fleet(path)
    assert expected in str(err.value) and str(path) in str(err.value)
    assert main(["validate", str(path)]) == 2  # the CLI says it before touching the base or data
    assert expected in capsys.readouterr().err
    with pytest.raises(SpecError, match="unknown DeepSpeed preset 'zero5'"):
        submit(path)  # and submit refuses it before any training


def test_deepspeed_json_path_is_relative_to_the_fleet_file(lf_home):
    (lf_home / "ds").mkdir()
    (lf_home / "ds" / "mine.json").write_text(json.dumps({"zero_optimization": {"stage": 2}}))
    (lf_home / "ds" / "typo.json").write_text(json.dumps({"zero_optimization": {"stage": 4}}))
    jobs = {
        "a": {"dataset": "a.jsonl", "training": {"deepspeed": "ds/mine.json"}},
        "b": {"dataset": "b.jsonl", "training": {"deepspeed": "ds/missing.json"}},
        "c": {"dataset": "c.jsonl", "training": {"deepspeed": "ds/typo.json"}},
    }
    with pytest.raises(SpecError) as err:
        load_fleet(fleet_file(lf_home, "multi", jobs, base="tiny-llama", training=TWO_STEPS))
    msg = str(err.value)
    assert f"jobs[1].training.deepspeed: DeepSpeed config {lf_home / 'ds' / 'missing.json'}" in msg
    assert "No such file" in msg and "jobs[0]" not in msg  # the good path resolved
    assert "jobs[2].training.deepspeed: " in msg and "zero_optimization.stage must be 0, 1, 2 or 3" in msg


def test_several_workers_on_fractional_gpus_is_refused(lf_home):
    jobs = {"a": {"dataset": "a.jsonl", "resources": {"workers": 2, "gpus_per_worker": 0.5}}}
    with pytest.raises(SpecError) as err:
        load_fleet(fleet_file(lf_home, "multi", jobs, base="tiny-llama", training=TWO_STEPS))
    assert "jobs[0].resources: 2 workers with gpus_per_worker 0.5" in str(err.value)
    assert "NCCL" in str(err.value) and "gpus_per_worker: 1" in str(err.value)


def adapter_form(folder: Path) -> tuple[dict, dict]:
    """Keys, shapes and dtypes of the weights, and the adapter config (target_modules is a set)."""
    weights = load_file(folder / "adapter_model.safetensors")
    config = json.loads((folder / "adapter_config.json").read_text())
    if isinstance(config.get("target_modules"), list):
        config["target_modules"] = sorted(config["target_modules"])
    return {k: (tuple(w.shape), w.dtype) for k, w in weights.items()}, config


def one_worker_adapter(path: Path, customer: str, out: Path) -> Path:
    """The same job with one worker, trained by the very build_trainer the Ray workers run (in this
    process: a fourth Ray job would add ~45 s of worker start-up; test_fleet covers 1-worker Ray jobs)."""
    from lorafleet.models import fingerprint, resolve_base
    from lorafleet.spec import resolve_jobs
    from lorafleet.train.worker import JobPlan, train_plain

    (job,) = [j for j in resolve_jobs(load_fleet(path), path) if j.customer == customer]
    job = job.model_copy(update={"resources": job.resources.model_copy(update={"workers": 1})})
    return train_plain(JobPlan(job=job, base_fingerprint=fingerprint(resolve_base(job.base_model))), str(out))


@pytest.mark.integration
def test_multi_worker_jobs_train_and_register_like_one_worker(lf_home, micro_base, ray_session, tmp_path):
    """One fleet: 2-worker DDP, 2-worker ZeRO-2 and 2-worker ZeRO-3, all on an NF4 base."""
    two = {"workers": 2, "cpus_per_worker": 0.5}  # two jobs at once on the session's 2 CPUs
    kinds = {
        "ddp": {"resources": two},
        "zero2": {"resources": two, "training": {"deepspeed": "zero2"}},
        "zero3": {"resources": two, "training": {"deepspeed": "zero3"}},
    }
    for customer in kinds:
        write_chat(lf_home / f"{customer}.jsonl", customer, n=24)
    jobs = {c: {"dataset": f"{c}.jsonl", **extra} for c, extra in kinds.items()}
    path = fleet_file(lf_home, "multi", jobs, base=micro_base, training=TWO_STEPS)

    result = submit(path)

    assert {c: (o.state, o.reason) for c, o in result.jobs.items()} == {c: ("succeeded", None) for c in kinds}
    ref_shapes, ref_config = adapter_form(one_worker_adapter(path, "ddp", tmp_path / "one"))
    assert any("lora_A" in k for k in ref_shapes)
    client = tracking.client()
    for customer, outcome in result.jobs.items():
        shapes, config = adapter_form(outcome.adapter_dir)
        assert shapes == ref_shapes, customer  # same keys, shapes and dtypes: no ZeRO-3 empty shards
        assert config == ref_config, customer
        weights = load_file(outcome.adapter_dir / "adapter_model.safetensors")
        assert any("lora_B" in k and w.abs().sum() > 0 for k, w in weights.items()), customer  # trained
        assert outcome.registered == f"{customer}/1"
        fetched = registry.fetch(client, f"{customer}@candidate")  # downloads and checks sha256
        assert fetched.version.run_id == outcome.run_id
        sha = hashlib.sha256((fetched.path / "adapter_model.safetensors").read_bytes()).hexdigest()
        assert sha == fetched.version.tags["sha256.adapter_model.safetensors"]
        assert client.get_run(outcome.run_id).data.params["resources.workers"] == "2"


@pytest.mark.integration
@pytest.mark.gpu
def test_deepspeed_jobs_on_gpus(lf_home, micro_base, ray_session):
    """NF4 with bf16 compute (quant_storage bf16, which ZeRO-3 shards); 2 workers where 2 GPUs exist."""
    import torch

    resources = {"workers": min(2, torch.cuda.device_count()), "gpus_per_worker": 1}
    jobs = {
        c: {"dataset": f"{c}.jsonl", "resources": resources, "training": {"deepspeed": c}}
        for c in ("zero2", "zero3")
    }
    for customer in jobs:
        write_chat(lf_home / f"{customer}.jsonl", customer, n=24)

    result = submit(fleet_file(lf_home, "multi", jobs, base=micro_base, training=TWO_STEPS))

    assert {c: (o.state, o.reason) for c, o in result.jobs.items()} == {
        "zero2": ("succeeded", None),
        "zero3": ("succeeded", None),
    }
    assert adapter_form(result.jobs["zero2"].adapter_dir) == adapter_form(result.jobs["zero3"].adapter_dir)
    assert {o.registered for o in result.jobs.values()} == {"zero2/1", "zero3/1"}
