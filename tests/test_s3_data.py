"""Datasets at a URL (s3:// and other fsspec protocols): read, hashed and validated like local
files, against moto's S3 server (the stand-in tests/test_shared_stores.py uses), and read again
by the training worker, which refuses bytes that changed since validation."""

from __future__ import annotations

import json

import pytest

from lorafleet.data import dataset_hash, inspect_dataset, load_records, read_dataset
from lorafleet.errors import DataError
from lorafleet.models import load_tokenizer
from tests.conftest import fleet_file, write_chat
from tests.s3_stub import moto_server

BUCKET = "customer-data"


@pytest.fixture(scope="module")
def s3(tmp_path_factory):
    with moto_server(tmp_path_factory.mktemp("s3") / "moto.log", (BUCKET,)) as stub:
        yield stub


@pytest.fixture
def s3_env(s3, monkeypatch):
    """The process sees the endpoint and keys the way a cluster's pods do."""
    for key, value in s3.env().items():
        monkeypatch.setenv(key, value)
    return s3


@pytest.fixture
def chat_file(tmp_path):
    return write_chat(tmp_path / "acme.jsonl", "acme", n=30)


def test_s3_dataset_reads_and_hashes_like_the_local_file(s3_env, chat_file):
    url = s3_env.put(BUCKET, "acme/v1/acme.jsonl", chat_file.read_bytes())
    assert load_records(url) == load_records(chat_file)
    assert dataset_hash(url) == dataset_hash(chat_file)
    # the endpoint in the URL (pyarrow's form) needs no environment for it
    records, sha = read_dataset(s3_env.pyarrow_url(BUCKET, "acme/v1/acme.jsonl"))
    assert (len(records), sha) == (30, dataset_hash(chat_file))


def test_validation_errors_name_the_object(s3_env):
    bad = b'{"messages": [{"role": "user", "content": "hi"}]}\n{not json\n'
    url = s3_env.put(BUCKET, "bad/acme.jsonl", bad)
    both = r"acme.jsonl:1: no assistant turn(.|\n)*acme.jsonl:2: malformed JSON"
    with pytest.raises(DataError, match=both):
        load_records(url)
    with pytest.raises(DataError, match="is empty"):
        load_records(s3_env.put(BUCKET, "empty.jsonl", b""))


def test_missing_object_or_bucket_is_a_clear_error(s3_env):
    missing = f"s3://{BUCKET}/nobody/acme.jsonl"
    with pytest.raises(DataError, match=f"^{missing}: dataset object not found; check the bucket and key"):
        load_records(missing)
    with pytest.raises(DataError, match="^s3://no-such-bucket/acme.jsonl: "):
        dataset_hash("s3://no-such-bucket/acme.jsonl")


def test_credentials_in_a_url_stay_out_of_reports_and_errors(s3, chat_file, micro_base):
    host = s3.endpoint.removeprefix("http://")
    s3.put(BUCKET, "creds/acme.jsonl", chat_file.read_bytes())
    url = f"s3://testing:testing@{BUCKET}/creds/acme.jsonl?endpoint_override={host}&scheme=http"
    report = inspect_dataset(url, "auto", load_tokenizer(micro_base), 64)
    assert report.examples == 30 and report.path.startswith("s3://***@customer-data/")
    with pytest.raises(DataError) as err:
        load_records(url.replace("creds/", "gone/"))
    assert "testing:testing" not in str(err.value) and "dataset object not found" in str(err.value)


def test_validate_accepts_an_s3_dataset(s3_env, chat_file, micro_base, tmp_path, capsys):
    from lorafleet.cli import main

    url = s3_env.put(BUCKET, "fleet/acme.jsonl", chat_file.read_bytes())
    jobs = {"acme": url, "ghost": f"s3://{BUCKET}/ghost.jsonl"}
    fleet = fleet_file(tmp_path, "s3f", jobs, base=micro_base)
    assert main(["validate", str(fleet), "--json"]) != 0  # ghost's object is missing
    out = json.loads(capsys.readouterr().out)
    text = json.dumps(out)
    assert dataset_hash(chat_file) in text and url in text  # acme: hashed, with token stats
    assert "ghost.jsonl: dataset object not found" in text


def test_worker_reads_the_url_and_refuses_changed_bytes(s3_env, chat_file, micro_base):
    from lorafleet.spec import JobSpec, LoraSpec, QuantizationSpec, ResourcesSpec, TrainingSpec
    from lorafleet.train.worker import _datasets

    url = s3_env.put(BUCKET, "train/acme.jsonl", chat_file.read_bytes())
    job = JobSpec(
        fleet="f",
        customer="acme",
        base_model=str(micro_base),
        dataset=url,
        format="auto",
        lora=LoraSpec(),
        quantization=QuantizationSpec(),
        training=TrainingSpec(),
        resources=ResourcesSpec(),
    )
    train, evals = _datasets(job, dataset_hash(chat_file))
    assert len(train) + len(evals) == 30
    s3_env.put(BUCKET, "train/acme.jsonl", chat_file.read_bytes() + chat_file.read_bytes())
    with pytest.raises(DataError, match="changed since the fleet was validated"):
        _datasets(job, dataset_hash(chat_file))


def test_other_fsspec_protocols():
    import fsspec

    with fsspec.open("memory://bucket/acme.jsonl", "w") as fh:
        fh.write(json.dumps({"prompt": "p", "completion": "c"}) + "\n")
    assert load_records("memory://bucket/acme.jsonl") == [{"prompt": "p", "completion": "c"}]
    with pytest.raises(DataError, match="^memory://bucket/none.jsonl: dataset object not found"):
        load_records("memory://bucket/none.jsonl")
