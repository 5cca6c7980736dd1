"""Fleet file validation: every error names the file and the path of the bad field."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import yaml

from lorafleet.cli import main
from lorafleet.errors import SpecError
from lorafleet.spec import load_fleet, resolve_jobs

GOOD = {
    "name": "acme-fleet",
    "base_model": "tiny-llama",
    "defaults": {"training": {"max_steps": 20, "learning_rate": 1e-3}, "lora": {"rank": 8}},
    "jobs": [
        {"customer": "acme", "dataset": "acme.jsonl"},
        {
            "customer": "globex",
            "dataset": "globex.jsonl",
            "lora": {"rank": 4},
            "resources": {"gpus_per_worker": 0.25},
        },
    ],
}


def write(tmp_path: Path, data: dict) -> Path:
    path = tmp_path / "fleet.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def with_job(**fields) -> dict:
    data = json.loads(json.dumps(GOOD))
    data["jobs"].append({"customer": "initech", "dataset": "i.jsonl", **fields})
    return data


def test_overrides_merge_onto_defaults(tmp_path):
    path = write(tmp_path, GOOD)
    jobs = resolve_jobs(load_fleet(path), path)
    acme, globex = jobs
    assert (acme.lora.rank, globex.lora.rank) == (8, 4)
    assert globex.training.learning_rate == 1e-3  # fleet default kept where not overridden
    assert globex.resources.gpus_per_worker == 0.25
    assert acme.lora.target_modules == "all-linear"
    assert acme.training.optimizer == "paged_adamw_8bit"
    assert acme.dataset == str(tmp_path / "acme.jsonl")  # relative to the fleet file


def test_spec_hash_ignores_resources_but_not_training(tmp_path):
    path = write(tmp_path, GOOD)
    acme, _ = resolve_jobs(load_fleet(path), path)
    moved = acme.model_copy(update={"resources": acme.resources.model_copy(update={"workers": 2})})
    retuned = acme.model_copy(update={"training": acme.training.model_copy(update={"seed": 7})})
    assert moved.spec_hash() == acme.spec_hash()
    assert retuned.spec_hash() != acme.spec_hash()


@pytest.mark.parametrize(
    ("job_fields", "expected"),
    [
        (
            {"training": {"learning_rate": -1e-4}},
            "fleet.yaml: jobs[2].training.learning_rate: must be > 0.0 (got -0.0001)",
        ),
        ({"training": {"learnin_rate": 1e-4}}, "jobs[2].training.learnin_rate: unknown field"),
        ({"lora": {"rank": 0}}, "jobs[2].lora.rank: must be > 0"),
        ({"lora": {"rank": 128}}, "jobs[2].lora.rank: must be <= 64, the largest rank the endpoint serves"),
        ({"quantization": {"quant_type": "int3"}}, "jobs[2].quantization.quant_type: Input should be"),
        ({"resources": {"gpus_per_worker": 1.5}}, "above 1 GPU must be a whole number"),
        ({"epochs": 3}, "jobs[2].epochs: unknown field"),
    ],
)
def test_bad_override_names_file_and_field(tmp_path, job_fields, expected):
    with pytest.raises(SpecError) as err:
        load_fleet(write(tmp_path, with_job(**job_fields)))
    assert expected in str(err.value)
    assert str(tmp_path / "fleet.yaml") in str(err.value)


@pytest.mark.parametrize(
    ("mutate", "expected"),
    [
        (
            lambda d: d["jobs"].append({"customer": "acme", "dataset": "x"}),
            "jobs[2].customer: customer 'acme' appears twice (also jobs[0])",
        ),
        (lambda d: d["jobs"].append({"customer": "acme\n", "dataset": "x"}), "jobs[2].customer: 'acme\\n'"),
        (lambda d: d.update(name="fleet\n"), "name: 'fleet\\n' is not a slug"),
        (lambda d: d["jobs"].append({"customer": False, "dataset": "x"}), "quote the word"),
        (lambda d: d["jobs"][0].update({True: 3}), "jobs[0]: the key True is not a field name; YAML reads"),
        (lambda d: d.update(registry={"model_prefix": "p" * 129}), "registry.model_prefix"),
        (
            lambda d: d["jobs"].append({"customer": "Bad_Id", "dataset": "x"}),
            "jobs[2].customer: 'Bad_Id' is not a slug",
        ),
        (lambda d: d.update(base_modle="x"), "base_modle: unknown field"),
        (
            lambda d: d.update(registry={"model_prefix": "team/"}),
            "registry.model_prefix: model_prefix 'team/'",
        ),
        (lambda d: d.pop("jobs"), "jobs: required field is missing"),
        (lambda d: d.update(jobs=[]), "jobs: List should have at least 1 item"),
        (lambda d: d["defaults"]["training"].update(batch_size="eight"), "defaults.training.batch_size"),
        (lambda d: d.update(packing={"keep_warm_s": -1}), "packing.keep_warm_s"),
        (lambda d: d.update(packing={"keep_warm_s": 86400}), "packing.keep_warm_s"),
    ],
)
def test_bad_fleet_fields(tmp_path, mutate, expected):
    data = json.loads(json.dumps(GOOD))
    mutate(data)
    with pytest.raises(SpecError, match=None) as err:
        load_fleet(write(tmp_path, data))
    assert expected in str(err.value)


def test_all_errors_reported_at_once(tmp_path):
    data = with_job(training={"learning_rate": -1}, lora={"alpha": -2})
    with pytest.raises(SpecError) as err:
        load_fleet(write(tmp_path, data))
    assert "learning_rate" in str(err.value) and "alpha" in str(err.value)
    # top-level mistakes no longer hide the jobs' own: one pass reports them all
    data.update(name="Bad Name", base_modle="x", packing={"slots": 0})
    data["jobs"].append({"customer": "acme", "dataset": "a.jsonl"})
    with pytest.raises(SpecError) as err:
        load_fleet(write(tmp_path, data))
    found = {line.split(": ", 2)[1] for line in str(err.value).splitlines()}
    top = {"name", "base_modle", "packing.slots"}
    assert found == top | {"jobs[3].customer", "jobs[2].lora.alpha", "jobs[2].training.learning_rate"}


def test_bad_defaults_and_bad_job_entries_do_not_hide_other_jobs_overrides(tmp_path):
    """A bad default, a job's bad customer or missing dataset, and unknown keys: each is reported,
    and the other jobs' overrides are still merged and checked in the same pass (the first
    such error hid every override error, so fixing a fleet took a run per layer)."""
    data = with_job(training={"learning_rate": -1, "max_lenght": 64}, lora={"rank": 1000})
    data["defaults"]["training"]["batch_size"] = 0
    data["jobs"] += [{"customer": "Bad Name", "dataset": "a.jsonl"}, {"customer": "c", "datasett": "a.jsonl"}]
    with pytest.raises(SpecError) as err:
        load_fleet(write(tmp_path, data))
    found = {line.split(": ", 2)[1] for line in str(err.value).splitlines()}
    assert found == {
        "defaults.training.batch_size",
        "jobs[2].training.learning_rate",
        "jobs[2].training.max_lenght",
        "jobs[2].lora.rank",
        "jobs[3].customer",
        "jobs[4].dataset",
        "jobs[4].datasett",
    }


def test_a_stand_in_never_takes_a_real_customers_name(tmp_path):
    """A bad customer stands in as 'stand-in-<i>' while the other jobs are checked: a job really
    called that was then reported as a repeated customer."""
    data = with_job(training={"learning_rate": -1})
    data["jobs"] += [
        {"customer": "stand-in-3", "dataset": "a.jsonl"},
        {"customer": "B A D", "dataset": "a.jsonl"},
    ]
    with pytest.raises(SpecError) as err:
        load_fleet(write(tmp_path, data))
    assert "appears twice" not in str(err.value)
    assert {line.split(": ", 2)[1] for line in str(err.value).splitlines()} == {
        "jobs[2].training.learning_rate",
        "jobs[4].customer",
    }


def test_a_deepspeed_setting_that_is_not_a_name_or_path_is_a_spec_error(tmp_path):
    data = with_job(training={"deepspeed": 5})
    with pytest.raises(SpecError, match=r"jobs\[2\]\.training\.deepspeed"):
        load_fleet(write(tmp_path, data))


def test_missing_and_malformed_files(tmp_path):
    with pytest.raises(SpecError, match="no such fleet file"):
        load_fleet(tmp_path / "nope.yaml")
    with pytest.raises(SpecError, match="is a folder; give the fleet's YAML file"):
        load_fleet(tmp_path)
    binary = tmp_path / "model.bin"
    binary.write_bytes(b"\x00\xff\xfe binary")
    with pytest.raises(SpecError, match="not UTF-8 text \\(byte 0xff at offset 1\\)"):
        load_fleet(binary)
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: [unclosed")
    with pytest.raises(SpecError, match="not valid YAML"):
        load_fleet(bad)


def test_schema_command_prints_json_schema(capsys):
    assert main(["schema"]) == 0
    schema = json.loads(capsys.readouterr().out)
    assert schema["title"] == "FleetSpec"
    assert "jobs" in schema["required"]
    assert schema["$defs"]["LoraSpec"]["properties"]["rank"]["description"]


@pytest.mark.parametrize(
    ("argv", "code", "stream", "text"),
    [
        (["schema"], 0, "stdout", '"title": "FleetSpec"'),
        (["validate", "{missing}"], 2, "stderr", "no such fleet file"),
    ],
)
def test_the_command_exits_with_mains_code_and_all_its_output(tmp_path, argv, code, stream, text):
    """`lorafleet` (cli.run) skips Python's teardown after the exit handlers: the exit code and
    every line written must still come through."""
    import subprocess
    import sys

    argv = [a.format(missing=tmp_path / "nope.yaml") for a in argv]
    out = subprocess.run([sys.executable, "-m", "lorafleet.cli", *argv], capture_output=True, text=True)
    assert out.returncode == code, out.stderr[-2000:]
    assert text in getattr(out, stream)
    if stream == "stdout":
        json.loads(out.stdout)  # the whole schema, not a cut-off buffer


def test_shipped_fleet_files_validate():
    root = Path(__file__).resolve().parents[1]
    files = sorted((root / "jobs").glob("*.yaml"))
    assert files, "jobs/ ships at least the demo fleet"
    for path in files:
        assert path.read_text().startswith("#"), f"{path} opens with the command that uses it"
        resolve_jobs(load_fleet(path), path)


def test_prefixed_names_resolve_back_to_their_model():
    """Every prefix the fleet file accepts gives names the endpoint can parse back (an 'lf_' prefix
    once registered adapters nobody could reach)."""
    from lorafleet.registry import parse_ref
    from lorafleet.spec import RegistrySpec

    for prefix in ("", "lf_", "team.a-", "Acme2_"):
        name = RegistrySpec(model_prefix=prefix).model_prefix + "acme"
        assert parse_ref(f"{name}/3").model == name
        assert parse_ref("acme@candidate", prefix).model == name


def _number_fields():
    """(section, field) for every number a job's sections take."""
    from lorafleet.spec import LoraSpec, ResourcesSpec, TrainingSpec

    numbers = (int, float, int | None, float | None)
    for section, model in (("lora", LoraSpec), ("training", TrainingSpec), ("resources", ResourcesSpec)):
        for name, info in model.model_fields.items():
            if info.annotation in numbers:
                yield section, name


@pytest.mark.parametrize(("section", "name"), list(_number_fields()))
def test_every_number_a_job_takes_is_bounded_and_typed(tmp_path, section, name):
    """Infinities, NaN, absurd magnitudes and booleans never pass as numbers: each is an error
    naming the field (`rank: true` was rank 1; `epochs: .inf` overflowed at training time)."""
    for value in (float("inf"), float("-inf"), float("nan"), 10**30, -(10**30), True):
        with pytest.raises(SpecError) as err:
            load_fleet(write(tmp_path, with_job(**{section: {name: value}})))
        assert f"jobs[2].{section}.{name}:" in str(err.value), (value, str(err.value))


@pytest.mark.parametrize("name", ["max_jobs_per_slot", "slots", "keep_warm_s"])
def test_every_packing_number_is_bounded_and_typed(tmp_path, name):
    for value in (float("inf"), float("nan"), 10**30, -1, True):
        data = json.loads(json.dumps(GOOD)) | {"packing": {name: value}}
        with pytest.raises(SpecError, match=f"packing.{name}:"):
            load_fleet(write(tmp_path, data))


@pytest.mark.parametrize(
    ("fields", "expected"),
    [
        ({"lora": {"target_modules": "q_proj"}}, "give a list of module names, e.g. [q_proj]"),
        ({"lora": {"target_modules": []}}, "an empty list trains nothing"),
        ({"lora": {"target_modules": ["q_proj", ""]}}, "each module name must be a non-empty string"),
        ({"training": {"optimizer": "adamw_bogus"}}, "jobs[2].training.optimizer: Input should be"),
        ({"training": {"seed": 2**32}}, "jobs[2].training.seed: must be <= 4294967295"),
        ({"training": {"max_steps": 10.0}}, "jobs[2].training.max_steps: Input should be a valid integer"),
        (
            {"quantization": {"load_in_4bit": "yes"}},
            "quantization.load_in_4bit: Input should be a valid boolean",
        ),
        ({"packing": "off"}, "jobs[2].packing: Input should be a valid boolean"),
    ],
)
def test_values_that_failed_only_at_training_time_are_refused(tmp_path, fields, expected):
    with pytest.raises(SpecError) as err:
        load_fleet(write(tmp_path, with_job(**fields)))
    assert expected in str(err.value)


def test_numbers_yaml_reads_as_strings_still_parse(tmp_path):
    """YAML 1.1 reads `1e-4` (no dot) as a string: a learning rate written that way is a number."""
    path = tmp_path / "fleet.yaml"
    path.write_text(yaml.safe_dump(GOOD).replace("learning_rate: 0.001", "learning_rate: 1e-3"))
    assert "1e-3" in path.read_text()
    assert resolve_jobs(load_fleet(path), path)[0].training.learning_rate == 1e-3


def test_a_key_written_twice_is_an_error_but_a_merge_may_override(tmp_path):
    path = tmp_path / "fleet.yaml"
    path.write_text(
        "name: f\nbase_model: tiny-llama\njobs:\n  - customer: a\n    dataset: a.jsonl\n"
        "    lora: {rank: 8}\n    lora: {alpha: 4}\n"
    )
    with pytest.raises(SpecError, match=r"key 'lora' appears twice in one mapping \(first on line 6\)"):
        load_fleet(path)
    path.write_text(
        "x-job: &job {customer: a, dataset: a.jsonl}\nname: f\nbase_model: tiny-llama\n"
        "jobs:\n  - <<: *job\n    customer: b\n"
    )
    with pytest.raises(SpecError, match="x-job: unknown field"):  # the merge itself is fine
        load_fleet(path)


def test_every_accepted_optimizer_builds_and_steps():
    """Each name the spec takes is one transformers knows and builds with this project's
    dependencies (a name outside them used to fail only when the job's trainer was built)."""
    import torch
    from transformers import Trainer, TrainingArguments
    from transformers.training_args import OptimizerNames

    from lorafleet.spec import OPTIMIZERS

    assert set(OPTIMIZERS) <= {o.value for o in OptimizerNames}
    for name in OPTIMIZERS:
        cls, kwargs = Trainer.get_optimizer_cls_and_kwargs(
            TrainingArguments(output_dir=None, optim=name, learning_rate=1e-3, report_to=[])
        )
        param = torch.nn.Parameter(torch.ones(64, 64))
        optimizer = cls([param], **kwargs)
        param.sum().backward()
        optimizer.step()
        assert not torch.equal(param.detach(), torch.ones(64, 64)), name


def test_model_names_with_a_trailing_newline_do_not_resolve():
    from lorafleet.errors import RegistryError
    from lorafleet.registry import parse_ref

    for bad in ("acme\n", "acme/1\n", "acme@production\n", "acme/\u0661"):  # \u0661: an Arabic-Indic 1
        with pytest.raises(RegistryError, match="is not an adapter name"):
            parse_ref(bad)


@pytest.mark.parametrize(
    ("name", "reason"),
    [
        ("acme/0", "versions start at 1"),  # once read as plain 'acme': production served
        ("acme/000", "versions start at 1"),
        ("acme@PRODUCTION", "aliases are lower case: '@production'"),
        ("acme/x", "a version is a whole number"),
        ("acme@", "use 'acme'"),
    ],
)
def test_a_bad_version_or_alias_says_what_is_wrong(name, reason):
    from lorafleet.errors import RegistryError
    from lorafleet.registry import parse_ref

    with pytest.raises(RegistryError, match=re.escape(reason)):
        parse_ref(name)


def test_every_name_form_reads_back_as_itself():
    """str(ref) is the canonical name: it parses back to the same reference (version 1 and up,
    any lower-case alias, the bare name as production)."""
    from lorafleet.registry import PRODUCTION, AdapterRef, parse_ref

    for name in ("acme", "acme/1", "acme/12", "acme@candidate", "Acme.2@prod_b", "a/007"):
        ref = parse_ref(name)
        assert parse_ref(str(ref)) == ref
        assert ref.version != 0 and (ref.alias is None) != (ref.version is None)
    assert parse_ref("acme") == AdapterRef("acme", PRODUCTION)


def test_a_job_the_base_cannot_train_fails_alone_at_validation(tmp_path, micro_base):
    """Target modules the base lacks, examples longer than its context kept whole by max_length,
    and a dataset that is a symlink loop: each is that job's error, named, and the other jobs'
    checks still run (peft, training or a traceback found them before)."""
    from lorafleet.validate import check_fleet
    from tests.conftest import write_chat

    good = write_chat(tmp_path / "good.jsonl", "g")
    long = tmp_path / "long.jsonl"
    long.write_text(
        json.dumps(
            {"messages": [{"role": "user", "content": "word " * 400}, {"role": "assistant", "content": "ok"}]}
        )
        + "\n"
    )
    (tmp_path / "loop.jsonl").symlink_to(tmp_path / "loop.jsonl")
    jobs = [
        {"customer": "good", "dataset": "good.jsonl", "lora": {"target_modules": ["q_proj", "v_proj"]}},
        {"customer": "typo", "dataset": "good.jsonl", "lora": {"target_modules": ["q_proj", "qproj"]}},
        {"customer": "long", "dataset": "long.jsonl", "training": {"max_length": 4096}},
        {"customer": "loop", "dataset": "loop.jsonl"},
    ]
    path = tmp_path / "fleet.yaml"
    path.write_text(yaml.safe_dump({"name": "f", "base_model": str(micro_base), "jobs": jobs}))
    check = check_fleet(path)
    assert set(check.errors) == {"typo", "long", "loop"}, check.errors
    assert "lora.target_modules ['qproj'] match no module of the base" in check.errors["typo"]
    assert "q_proj" in check.errors["typo"]  # the names it has
    assert "base's context is 256 tokens: lower training.max_length" in check.errors["long"]
    assert "loop.jsonl" in check.errors["loop"]
    assert check.reports["good"].examples == 40 and good.exists()


@pytest.mark.parametrize(
    ("keep", "reason"),
    [
        (
            {"config.json", "tokenizer.json", "tokenizer_config.json"},
            "holds no weights (.safetensors or .bin",
        ),
        ({"config.json", "model.safetensors"}, "cannot be read as a model (ValueError"),
        ({"model.safetensors", "tokenizer.json", "tokenizer_config.json", "config.json:{bad"}, "OSError"),
    ],
)
def test_a_broken_base_folder_is_named_with_every_datasets_error(tmp_path, micro_base, keep, reason):
    """A base folder missing its weights or tokenizer, or with a broken config, is one error that
    names it and says what a base folder needs; the datasets are still read, so a missing one is
    named in the same pass. It was a transformers traceback, or (no weights) a failure in every
    job's worker."""
    import shutil

    from lorafleet.errors import LorafleetError
    from lorafleet.validate import check_fleet
    from tests.conftest import write_chat

    base = tmp_path / "base"
    base.mkdir()
    for name in keep:
        name, _, text = name.partition(":")
        if text:
            (base / name).write_text(text)
        else:
            shutil.copy(micro_base / name, base / name)
    write_chat(tmp_path / "good.jsonl", "g")
    jobs = [{"customer": "good", "dataset": "good.jsonl"}, {"customer": "gone", "dataset": "gone.jsonl"}]
    path = tmp_path / "fleet.yaml"
    path.write_text(yaml.safe_dump({"name": "f", "base_model": str(base), "jobs": jobs}))
    with pytest.raises(LorafleetError) as err:
        check_fleet(path)
    first, *rest = str(err.value).splitlines()
    assert first.startswith(f"base_model: {base}") and reason in first, first
    assert "config.json" in first or "no weights" in first
    assert rest == [
        f"jobs[1] (gone): {tmp_path / 'gone.jsonl'}: dataset file not found; check the job's `dataset` path"
    ]


@pytest.mark.parametrize(
    "argv",
    [
        ["bench", "train", "--jobs", "0"],
        ["bench", "train", "--steps", "-5"],
        ["bench", "scale", "--cpus-per-job", "0"],
        ["bench", "scale", "--nodes", "1e12"],
        ["bench", "serve", "--max-tokens", "nan"],
        ["ui", "--port", "99999"],
        ["serve", "--port", "0"],
        ["adapters", "promote", "acme", "--version", "-1"],
    ],
)
def test_command_line_numbers_are_checked_before_anything_runs(argv, capsys):
    with pytest.raises(SystemExit) as exit_:
        main(argv)
    assert exit_.value.code == 2
    assert "is not a" in capsys.readouterr().err


def test_ui_refuses_an_address_it_cannot_listen_on(capsys):
    """MLflow's server exits 0 when its port is taken: the command checks first and says so."""
    import socket

    with socket.create_server(("127.0.0.1", 0)) as taken:
        port = taken.getsockname()[1]
        assert main(["ui", "--port", str(port)]) == 2
    assert f"cannot listen on 127.0.0.1:{port}" in capsys.readouterr().err


def test_every_fleet_and_customer_gets_a_checkpoint_folder_of_its_own():
    """Fleet 'shop' with customer 'eu-x' and fleet 'shop-eu' with customer 'x' joined into one
    folder name with the same settings' hash; one job then found the other's checkpoints."""
    from lorafleet.spec import JobSpec, LoraSpec, QuantizationSpec, ResourcesSpec, TrainingSpec
    from lorafleet.train.plan import ray_run_name

    def job(fleet: str, customer: str) -> JobSpec:
        sections = {"lora": LoraSpec(), "quantization": QuantizationSpec(), "training": TrainingSpec()}
        names = {"fleet": fleet, "customer": customer, "base_model": "tiny-llama", "dataset": "d.jsonl"}
        return JobSpec(**names, format="auto", resources=ResourcesSpec(), **sections)

    pairs = [("shop", "eu-x"), ("shop-eu", "x"), ("shop", "eu"), ("sho", "p-eu")]
    names = {ray_run_name(job(f, c), "a" * 64) for f, c in pairs}
    assert len(names) == len(pairs)
    assert ray_run_name(job("shop", "eu-x"), "a" * 64).startswith("shop-eu-x-")  # still readable
    assert ray_run_name(job("shop", "eu-x"), "a" * 64) == ray_run_name(job("shop", "eu-x"), "a" * 64)


def test_targets_the_endpoint_cannot_serve_fail_their_job_at_validation(tmp_path, micro_base):
    """The embedding and the output head (a row per token) take no LoRA the endpoint serves: such
    an adapter trained, then every request for it failed. Projections inside the layers pass."""
    from lorafleet.validate import check_fleet
    from tests.conftest import write_chat

    write_chat(tmp_path / "d.jsonl", "d")
    jobs = [
        {"customer": "emb", "dataset": "d.jsonl", "lora": {"target_modules": ["q_proj", "embed_tokens"]}},
        {"customer": "head", "dataset": "d.jsonl", "lora": {"target_modules": ["lm_head"]}},
        {"customer": "ok", "dataset": "d.jsonl", "lora": {"target_modules": ["q_proj", "down_proj"]}},
    ]
    path = tmp_path / "fleet.yaml"
    path.write_text(yaml.safe_dump({"name": "f", "base_model": str(micro_base), "jobs": jobs}))
    errors = check_fleet(path).errors
    assert "['embed_tokens'] name the embedding or the output head" in errors["emb"]
    assert set(errors) <= {"emb", "head"} and "ok" not in errors
    assert "['lm_head']" in errors["head"]  # the head, or (tied to the embedding) no module at all
