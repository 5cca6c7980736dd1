"""The adapter registry against real MLflow: the embedded SQLite store and a real server process
with proxied artefacts (as on a cluster)."""

from __future__ import annotations

import json
import subprocess
import sys
import time
import uuid

import httpx
import pytest
import torch

from lorafleet import registry, tracking
from lorafleet.bench.synthetic import make_adapter, trained_run
from lorafleet.cli import main
from lorafleet.errors import BaseMismatchError, ChecksumError, RegistryError
from lorafleet.models import fingerprint, merge_adapter
from lorafleet.raystart import free_port
from lorafleet.spec import RegistrySpec

pytestmark = pytest.mark.integration


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory):
    """A real `mlflow server` serving artefacts itself: clients never see its disk."""
    root = tmp_path_factory.mktemp("mlflow-server")
    port = free_port()
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "mlflow",
            "server",
            "--backend-store-uri",
            f"sqlite:///{root}/db.sqlite",
            "--artifacts-destination",
            str(root / "artifacts"),
            "--serve-artifacts",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--workers",
            "1",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 90
    while time.time() < deadline:
        try:
            if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                break
        except httpx.HTTPError:
            time.sleep(0.5)
    else:
        proc.kill()
        pytest.fail("mlflow server did not answer /health in 90 s")
    yield url
    proc.terminate()
    proc.wait(timeout=20)


@pytest.fixture(params=["sqlite", "server"])
def store(request, lf_home, monkeypatch):
    if request.param == "server":
        monkeypatch.setenv("MLFLOW_TRACKING_URI", request.getfixturevalue("mlflow_server"))
    monkeypatch.setenv("LORAFLEET_CACHE", str(lf_home / "cache"))
    return tracking.client()


@pytest.fixture
def prefix() -> str:
    return f"t{uuid.uuid4().hex[:6]}-"  # the server store is shared by tests: names stay apart


def register(c, base, tmp, prefix, eval_loss, seed=0, customer="acme"):
    job, run_id, adapter, parent = trained_run(c, base, tmp, f"{prefix}fleet", customer, eval_loss, seed)
    mv = registry.register_job(c, job, run_id, adapter, RegistrySpec(model_prefix=prefix))
    return mv, run_id, parent


def test_version_records_lineage(store, micro_base, tmp_path, prefix):
    mv, run_id, parent = register(store, micro_base, tmp_path, prefix, eval_loss=1.5)
    assert (mv.name, int(mv.version), mv.run_id) == (f"{prefix}acme", 1, run_id)
    assert mv.aliases == ["candidate"]
    tags = mv.tags
    assert tags["base_fingerprint"] == fingerprint(micro_base)
    assert tags["dataset_sha256"] == "ab" * 32 and tags["spec_hash"] and tags["lora.rank"] == "4"
    assert float(tags["eval_loss"]) == 1.5 and tags["fleet"] == f"{prefix}fleet"
    assert len(tags["sha256.adapter_model.safetensors"]) == 64
    assert "acme" in mv.description and "eval loss 1.5" in mv.description
    run = store.get_run(run_id)  # version -> job run -> fleet run
    assert run.data.tags["mlflow.parentRunId"] == parent
    assert run.data.tags["lorafleet.registered_version"] == f"{prefix}acme/1"


def test_name_forms_and_errors(store, micro_base, tmp_path, prefix):
    register(store, micro_base, tmp_path, prefix, eval_loss=1.0)
    no_production = r"has no alias 'production' \(promote .*aliases: @candidate -> v1"
    with pytest.raises(RegistryError, match=no_production):
        registry.fetch(store, "acme", prefix)
    registry.promote(store, f"{prefix}acme")
    for name in ("acme", "acme@production", "acme@candidate", "acme/1"):
        assert registry.fetch(store, name, prefix).name == f"{prefix}acme/1"
    unknown = f"unknown adapter '{prefix}nobody'; registered adapters: .*{prefix}acme"
    with pytest.raises(RegistryError, match=unknown):
        registry.fetch(store, "nobody", prefix)
    with pytest.raises(RegistryError, match="has no alias 'staging'.*@candidate -> v1.*@production -> v1"):
        registry.fetch(store, "acme@staging", prefix)
    with pytest.raises(RegistryError, match="has no version 7; versions: 1"):
        registry.fetch(store, "acme/7", prefix)
    with pytest.raises(RegistryError, match="is not an adapter name"):
        registry.fetch(store, "Acme!!", prefix)


def test_promote_if_better_and_rollback(store, micro_base, tmp_path, prefix):
    name = f"{prefix}acme"
    register(store, micro_base, tmp_path, prefix, eval_loss=1.0, seed=1)
    assert registry.promote(store, name)["version"] == 1
    register(store, micro_base, tmp_path, prefix, eval_loss=2.0, seed=2)  # worse
    refused = registry.promote(store, name, if_better=True)
    assert not refused["promoted"] and "does not beat production v1" in refused["reason"]
    assert registry.fetch(store, "acme", prefix).name == f"{name}/1"
    register(store, micro_base, tmp_path, prefix, eval_loss=0.5, seed=3)  # better
    assert registry.promote(store, name, if_better=True) == {
        "promoted": True,
        "model": name,
        "version": 3,
        "previous": 1,
    }
    assert registry.promote(store, name, version=1)["previous"] == 3  # rollback
    assert registry.fetch(store, "acme", prefix).name == f"{name}/1"
    assert registry.fetch(store, "acme@candidate", prefix).name == f"{name}/3"


def test_auto_promotion_from_fleet_setting(store, micro_base, tmp_path, prefix):
    job, run_id, adapter, _ = trained_run(store, micro_base, tmp_path, f"{prefix}f", "acme", 1.0)
    registry.register_job(
        store, job, run_id, adapter, RegistrySpec(model_prefix=prefix, auto_promote="if-better")
    )
    assert registry.fetch(store, "acme", prefix).name == f"{prefix}acme/1"


def test_pull_gives_plain_peft_folder_and_checksums_are_enforced(store, micro_base, tmp_path, prefix):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    register(store, micro_base, tmp_path, prefix, eval_loss=1.0)
    out = tmp_path / "pulled"
    registry.pull(store, "acme/1", out, prefix)
    assert sorted(p.name for p in out.iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]
    PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(micro_base), out)
    store.set_model_version_tag(f"{prefix}acme", "1", "sha256.adapter_model.safetensors", "0" * 64)
    with pytest.raises(ChecksumError, match="adapter_model.safetensors has sha256 .* refusing"):
        registry.fetch(store, "acme/1", prefix, cache=tmp_path / "fresh-cache")


def test_base_mismatch_is_refused(store, micro_base, tmp_path, prefix):
    register(store, micro_base, tmp_path, prefix, eval_loss=1.0)
    adapter = registry.fetch(store, "acme@candidate", prefix)
    registry.check_base(adapter, fingerprint(micro_base))
    with pytest.raises(BaseMismatchError, match=f"trained on base '{micro_base}'.*asked to run on 'other'"):
        registry.check_base(adapter, "sha256:" + "1" * 64, "other")


def test_merge_matches_base_plus_adapter(micro_base, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    adapter = make_adapter(micro_base, tmp_path / "a", seed=5)
    merged = merge_adapter(micro_base, adapter, tmp_path / "merged")
    assert (merged / "model.safetensors").is_file()
    ids = torch.tensor([[0, 5, 9, 30, 41, 7]])
    ref = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(micro_base), adapter)
    with torch.no_grad():
        expected = ref(ids).logits
        got = AutoModelForCausalLM.from_pretrained(merged)(ids).logits
        plain = AutoModelForCausalLM.from_pretrained(micro_base)(ids).logits
    assert torch.allclose(got, expected, atol=1e-4)  # stated tolerance: 1e-4 on fp32 logits
    assert not torch.allclose(plain, expected, atol=1e-3)  # the adapter does change the output


def test_cli_browsing(store, micro_base, tmp_path, prefix, capsys):
    register(store, micro_base, tmp_path, prefix, eval_loss=1.0, seed=1)
    register(store, micro_base, tmp_path, prefix, eval_loss=0.8, seed=2)
    assert main(["adapters", "promote", "acme", "--prefix", prefix, "--version", "1"]) == 0
    capsys.readouterr()
    assert main(["adapters", "list", "--json"]) == 0
    rows = {r["adapter"]: r for r in json.loads(capsys.readouterr().out)}
    assert rows[f"{prefix}acme"]["latest"] == 2 and rows[f"{prefix}acme"]["production"] == 1
    assert main(["adapters", "show", "acme", "--prefix", prefix, "--json"]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert [(v["version"], sorted(v["aliases"])) for v in shown["versions"]] == [
        (2, ["candidate"]),
        (1, ["production"]),
    ]
    assert main(["adapters", "pull", "acme@candidate", "--prefix", prefix, "-o", str(tmp_path / "o")]) == 0
    assert capsys.readouterr().out == f"{prefix}acme/2 -> {tmp_path / 'o'}\n"
    assert main(["adapters", "pull", "acme", "--prefix", prefix, "-o", str(tmp_path / "p"), "--json"]) == 0
    pulled = json.loads(capsys.readouterr().out)  # --json is JSON here too
    assert pulled == {
        "adapter": f"{prefix}acme/1",
        "model": f"{prefix}acme",
        "version": 1,
        "output": str(tmp_path / "p"),
    }
    assert main(["adapters", "pull", "ghost", "--prefix", prefix, "-o", str(tmp_path / "o")]) == 2
    assert "unknown adapter" in capsys.readouterr().err


# ---- against the base model --------------------------------------------------------------


@pytest.fixture
def sqlite_store(lf_home, monkeypatch):
    monkeypatch.setenv("LORAFLEET_CACHE", str(lf_home / "cache"))
    return tracking.client()


def register_vs_base(c, base, tmp, eval_loss, base_eval_loss, seed, auto_promote="never"):
    """A job run that measured its base (as worker.BaseEval does), registered."""
    job, run_id, adapter, _ = trained_run(c, base, tmp, "fleet", "acme", eval_loss, seed)
    c.log_metric(run_id, "base_eval_loss", base_eval_loss)
    mv = registry.register_job(c, job, run_id, adapter, RegistrySpec(auto_promote=auto_promote))
    return mv, run_id


def test_beats_base_margin():
    assert tracking.beats_base(0.5, 1.0) is True
    assert tracking.beats_base(0.98, 1.0) is True  # exactly the 2% margin
    assert tracking.beats_base(0.99, 1.0) is False  # better, but within the margin
    assert tracking.beats_base(1.2, 1.0) is False
    assert tracking.beats_base(None, 1.0) is None and tracking.beats_base(0.5, None) is None


def test_version_no_better_than_base_is_marked_and_not_promoted(sqlite_store, micro_base, tmp_path):
    c = sqlite_store
    good, good_run = register_vs_base(c, micro_base, tmp_path, 1.0, 2.0, seed=1)
    assert good.tags["lorafleet.beats_base"] == "true" and float(good.tags["base_eval_loss"]) == 2.0
    assert c.get_run(good_run).data.tags["lorafleet.beats_base"] == "true"
    assert "(base 2.0)" in good.description
    assert registry.promote(c, "acme", if_better=True)["promoted"]  # no production yet: the base decides

    # lower than production's 1.0, but the base on its own eval split was as good
    bad, bad_run = register_vs_base(c, micro_base, tmp_path, 0.5, 0.505, seed=2)
    assert bad.tags["lorafleet.beats_base"] == "false"
    assert c.get_run(bad_run).data.tags["lorafleet.beats_base"] == "false"
    refused = registry.promote(c, "acme", if_better=True)
    assert not refused["promoted"] and refused["version"] == 2
    assert "v2 does not beat the base model: eval loss 0.5 against the base's 0.505" in refused["reason"]
    assert registry.fetch(c, "acme").name == "acme/1"
    assert registry.promote(c, "acme", version=2)["promoted"]  # without --if-better: the user decides
    rows = {r["adapter"]: r for r in registry.list_rows(c)}
    assert rows["acme"]["beats_base"] is False


def test_auto_promote_if_better_checks_the_base(sqlite_store, micro_base, tmp_path):
    c = sqlite_store
    register_vs_base(c, micro_base, tmp_path, 3.0, 3.0, seed=1, auto_promote="if-better")
    model = c.get_registered_model("acme")
    assert "production" not in (model.aliases or {})  # even the first version needs to beat the base
    register_vs_base(c, micro_base, tmp_path, 1.0, 3.0, seed=2, auto_promote="if-better")
    assert registry.fetch(c, "acme").name == "acme/2"


def test_cli_marks_adapters_no_better_than_base(sqlite_store, micro_base, tmp_path, capsys):
    c = sqlite_store
    register_vs_base(c, micro_base, tmp_path, 2.5, 2.4, seed=1)
    assert main(["adapters", "promote", "acme", "--if-better"]) == 0
    assert "not promoted: v1 does not beat the base model" in capsys.readouterr().out
    assert main(["status", "fleet", "--json"]) == 0
    (row,) = json.loads(capsys.readouterr().out)["jobs"]
    assert row["beats_base"] is False and row["base_eval_loss"] == 2.4
    assert main(["status", "fleet"]) == 0
    assert "no better than" in capsys.readouterr().out  # the note column (may wrap)


def test_promote_version_0_moves_nothing_and_show_honours_a_version(
    sqlite_store, micro_base, tmp_path, capsys
):
    c = sqlite_store
    register(c, micro_base, tmp_path, "", eval_loss=1.0)
    with pytest.raises(RegistryError, match="has no version 0"):  # `if version` took 0 as "the candidate"
        registry.promote(c, "acme", version=0)
    assert "production" not in c.get_registered_model("acme").aliases
    with pytest.raises(SystemExit):
        main(["adapters", "promote", "acme", "--version", "0"])
    assert "is not a whole number from 1" in capsys.readouterr().err
    assert main(["adapters", "promote", "acme/1"]) == 2
    assert "give a version with --version N" in capsys.readouterr().err
    assert [v["version"] for v in registry.show(c, "acme/1")["versions"]] == [1]
    with pytest.raises(RegistryError, match="has no version 99"):
        registry.show(c, "acme/99")


def test_pull_writes_a_new_folder_whole_and_overwrites_nothing(sqlite_store, micro_base, tmp_path):
    c = sqlite_store
    register(c, micro_base, tmp_path, "", eval_loss=1.0)
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "adapter_config.json").write_text("mine")
    with pytest.raises(RegistryError, match="is not empty; give a new or empty folder"):
        registry.pull(c, "acme@candidate", busy)
    assert (busy / "adapter_config.json").read_text() == "mine" and len(list(busy.iterdir())) == 1
    afile = tmp_path / "afile"
    afile.write_text("x")
    with pytest.raises(RegistryError, match="is a file"):
        registry.pull(c, "acme@candidate", afile)
    with pytest.raises(RegistryError, match="cannot write to"):
        registry.pull(c, "acme@candidate", afile / "under")
    empty = tmp_path / "empty"
    empty.mkdir()
    registry.pull(c, "acme@candidate", empty)
    assert sorted(p.name for p in empty.iterdir()) == sorted(registry.ALLOWED_FILES)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary folder left


def test_commands_end_after_their_work_and_an_unreachable_store_is_named(tmp_path):
    """`run()` ends like Python's exit: idle pool threads (MLflow's downloads leave some) are woken,
    not joined forever; an MLflow server that does not answer is one line, not a traceback."""
    code = (
        "import concurrent.futures, sys\n"
        "pool = concurrent.futures.ThreadPoolExecutor(1); pool.submit(lambda: 1).result()\n"
        "sys.argv = ['lorafleet', 'schema']\n"
        "from lorafleet.cli import run\nrun()\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and '"title": "FleetSpec"' in out.stdout
    env = {**__import__("os").environ, "MLFLOW_TRACKING_URI": f"http://127.0.0.1:{free_port()}"}
    env["MLFLOW_HTTP_REQUEST_MAX_RETRIES"] = "0"
    cmd = [sys.executable, "-m", "lorafleet.cli", "adapters", "list"]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=120, env=env)
    assert out.returncode == 2, out.stderr[-2000:]
    assert "does not answer" in out.stderr and "Traceback" not in out.stderr
