"""The cluster's shared stores, for real, on this machine: PostgreSQL (the MLflow backend store),
an S3-compatible server (moto, standing in for MinIO/S3) holding MLflow artefacts and Ray Train
checkpoints, and a real `mlflow server` on top of both, exactly as infra/mlflow/k8s.yaml and
infra/compose/docker-compose.yaml run it. lorafleet's own code is then pointed at them only
through the environment (MLFLOW_TRACKING_URI) and the storage path, as on a cluster.

Services come from `.ci/install-services.sh` (apt: postgresql) and the `dev` extra (pip: moto,
boto3, psycopg2-binary). A missing service skips with the reason; one that is installed but
does not start fails.
"""

from __future__ import annotations

import glob
import hashlib
import os
import pwd
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
import yaml

from lorafleet import registry, tracking
from lorafleet.bench.synthetic import trained_run
from lorafleet.errors import ChecksumError
from lorafleet.raystart import free_port
from lorafleet.spec import RegistrySpec
from tests.conftest import fleet_file, write_chat

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[1]
# moto accepts any credentials; they are set anyway so no client wanders off to a real AWS chain
S3_ENV = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
}
ARTIFACT_BUCKET, CHECKPOINT_BUCKET = "mlflow", "lorafleet"  # the buckets infra/ creates


def _tail(path: Path, lines: int = 30) -> str:
    return "\n".join(path.read_text(errors="replace").splitlines()[-lines:]) if path.exists() else ""


def _wait(check, what: str, timeout_s: float, log: Path, proc: subprocess.Popen | None = None) -> None:
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        if proc is not None and proc.poll() is not None:
            pytest.fail(f"{what} exited with {proc.returncode}:\n{_tail(log)}")
        try:
            if check():
                return
        except Exception:  # not up yet: connection refused, 503 while migrating, ...
            pass
        time.sleep(0.5)
    pytest.fail(f"{what} did not come up in {timeout_s:.0f} s:\n{_tail(log)}")


# ---- PostgreSQL ------------------------------------------------------------------------------


def postgres_bindir() -> Path | None:
    """Debian keeps initdb/pg_ctl off PATH, in /usr/lib/postgresql/<major>/bin: newest wins."""
    found = sorted(
        glob.glob("/usr/lib/postgresql/*/bin/initdb"),
        key=lambda p: int(Path(p).parts[-3]) if Path(p).parts[-3].isdigit() else 0,
    )
    if found:
        return Path(found[-1]).parent
    on_path = shutil.which("initdb")
    return Path(on_path).resolve().parent if on_path else None


@dataclass
class Postgres:
    bindir: Path
    datadir: Path
    port: int
    as_user: list[str]  # command prefix: postgres refuses to run as root

    def run(self, *args: str) -> subprocess.CompletedProcess:
        return subprocess.run([*self.as_user, *args], capture_output=True, text=True, timeout=120)

    @property
    def log(self) -> Path:
        return self.datadir / "server.log"

    def url(self, db: str) -> str:
        return f"postgresql+psycopg2://lorafleet@127.0.0.1:{self.port}/{db}"


def start_postgres() -> Postgres:
    bindir = postgres_bindir()
    if bindir is None:
        pytest.skip(
            "PostgreSQL is not installed (run .ci/install-services.sh: apt-get install -y postgresql)"
        )
    # not pytest's tmp_path: that sits under a 0700 folder the postgres user cannot enter
    root = Path(tempfile.mkdtemp(prefix="lorafleet-pg-"))
    as_user: list[str] = []
    if os.geteuid() == 0:
        try:
            pg = pwd.getpwnam("postgres")
        except KeyError:
            pytest.skip("running as root and there is no 'postgres' user to run PostgreSQL as")
        runuser = shutil.which("runuser")
        if not runuser:
            pytest.skip("running as root without runuser(1) to drop to the postgres user")
        as_user = [runuser, "-u", "postgres", "--"]
        os.chown(root, pg.pw_uid, pg.pw_gid)
    server = Postgres(bindir, root / "data", free_port(), as_user)
    # trust auth on 127.0.0.1 only: a throwaway cluster; the manifests use a password Secret
    init = server.run(
        str(bindir / "initdb"),
        "-D",
        str(server.datadir),
        "-U",
        "lorafleet",
        "--auth=trust",
        "-E",
        "UTF8",
        "--no-locale",
    )
    if init.returncode != 0:
        pytest.fail(f"initdb failed:\n{init.stdout}\n{init.stderr}")
    # fsync off (-F): a test cluster need not survive a power cut, and it is much faster
    opts = f"-p {server.port} -k {root} -c listen_addresses=127.0.0.1 -F"
    start = server.run(
        str(bindir / "pg_ctl"),
        "-D",
        str(server.datadir),
        "-o",
        opts,
        "-l",
        str(server.log),
        "-w",
        "-t",
        "60",
        "start",
    )
    if start.returncode != 0:
        pytest.fail(f"pg_ctl start failed:\n{start.stdout}\n{start.stderr}\n{_tail(server.log)}")
    return server


def stop_postgres(server: Postgres) -> None:
    server.run(str(server.bindir / "pg_ctl"), "-D", str(server.datadir), "-m", "fast", "-w", "stop")
    shutil.rmtree(server.datadir.parent, ignore_errors=True)


# ---- the whole stack -------------------------------------------------------------------------


@dataclass
class Stores:
    tracking_uri: str
    s3_endpoint: str  # http://127.0.0.1:<port>
    s3: object  # a boto3 S3 client on the server
    pg: Postgres

    def keys(self, bucket: str, prefix: str = "") -> list[str]:
        pages = self.s3.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
        return [o["Key"] for page in pages for o in page.get("Contents", [])]

    def sql(self, query: str, *params) -> list[tuple]:
        import psycopg2

        conn = psycopg2.connect(host="127.0.0.1", port=self.pg.port, user="lorafleet", dbname="mlflow")
        try:
            with conn.cursor() as cur:
                cur.execute(query, params)
                return cur.fetchall()
        finally:
            conn.close()


def _spawn(cmd: list[str], log: Path, env: dict[str, str]) -> subprocess.Popen:
    with open(log, "w") as fh:  # the child keeps its own descriptor
        return subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, env=env, start_new_session=True)


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, 15)  # its own session: the server's workers go too
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, 9)
            proc.wait()


@pytest.fixture(scope="module")
def stores(tmp_path_factory) -> Iterator[Stores]:
    missing = [m for m in ("moto", "boto3", "psycopg2") if _missing(m)]
    if missing:
        pytest.skip(f"{', '.join(missing)} not installed: pip install -e '.[dev]'")
    import boto3
    import psycopg2

    logs = tmp_path_factory.mktemp("shared-stores")
    env = os.environ | S3_ENV
    procs: list[subprocess.Popen] = []
    pg = start_postgres()
    try:
        conn = psycopg2.connect(host="127.0.0.1", port=pg.port, user="lorafleet", dbname="postgres")
        conn.autocommit = True  # CREATE DATABASE refuses to run inside a transaction
        conn.cursor().execute("CREATE DATABASE mlflow")
        conn.close()

        s3_port = free_port()
        procs.append(
            _spawn(
                [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(s3_port)],
                logs / "s3.log",
                env,
            )
        )
        endpoint = f"http://127.0.0.1:{s3_port}"
        s3 = boto3.client("s3", endpoint_url=endpoint, **_boto_creds())
        _wait(lambda: s3.list_buckets() is not None, "moto S3 server", 60, logs / "s3.log", procs[-1])
        for bucket in (ARTIFACT_BUCKET, CHECKPOINT_BUCKET):  # infra/ has a Job doing this for MinIO
            s3.create_bucket(Bucket=bucket)

        # the server command of infra/mlflow/k8s.yaml: Postgres rows, S3 artefacts, proxied
        # (--serve-artifacts) so clients need neither S3 credentials nor the endpoint
        mlflow_port = free_port()
        procs.append(
            _spawn(
                [
                    sys.executable,
                    "-m",
                    "mlflow",
                    "server",
                    "--backend-store-uri",
                    pg.url("mlflow"),
                    "--artifacts-destination",
                    f"s3://{ARTIFACT_BUCKET}/artifacts",
                    "--serve-artifacts",
                    "--host",
                    "127.0.0.1",
                    "--port",
                    str(mlflow_port),
                    "--workers",
                    "1",
                    "--allowed-hosts",
                    manifest_allowed_hosts(),
                ],
                logs / "mlflow.log",
                env | {"MLFLOW_S3_ENDPOINT_URL": endpoint},
            )
        )
        url = f"http://127.0.0.1:{mlflow_port}"
        _wait(
            lambda: httpx.get(f"{url}/health", timeout=2).status_code == 200,
            "mlflow server (on PostgreSQL)",
            180,
            logs / "mlflow.log",
            procs[-1],
        )
        yield Stores(url, endpoint, s3, pg)
    finally:
        for proc in reversed(procs):
            _stop(proc)
        stop_postgres(pg)


def manifest_allowed_hosts() -> str:
    """--allowed-hosts of the MLflow Deployment in infra/mlflow/k8s.yaml: the server here runs
    with the manifest's value, so a value that locks clients out fails here."""
    for doc in yaml.safe_load_all((ROOT / "infra/mlflow/k8s.yaml").read_text()):
        if doc and doc["kind"] == "Deployment" and doc["metadata"]["name"] == "mlflow":
            args = doc["spec"]["template"]["spec"]["containers"][0]["args"]
            return next(a.split("=", 1)[1] for a in args if a.startswith("--allowed-hosts="))
    raise AssertionError("infra/mlflow/k8s.yaml has no mlflow Deployment")


def _missing(module: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(module) is None


def _boto_creds() -> dict[str, str]:
    return {
        "aws_access_key_id": S3_ENV["AWS_ACCESS_KEY_ID"],
        "aws_secret_access_key": S3_ENV["AWS_SECRET_ACCESS_KEY"],
        "region_name": S3_ENV["AWS_DEFAULT_REGION"],
    }


@pytest.fixture
def on_server(stores, lf_home, monkeypatch) -> Stores:
    """lorafleet pointed at the server the way a pod is: by MLFLOW_TRACKING_URI alone."""
    monkeypatch.setenv("MLFLOW_TRACKING_URI", stores.tracking_uri)
    monkeypatch.setenv("LORAFLEET_CACHE", str(lf_home / "cache"))
    return stores


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


# ---- tests -----------------------------------------------------------------------------------


def test_registry_round_trip_through_postgres_and_s3(on_server, micro_base, tmp_path):
    stores, prefix = on_server, f"t{uuid.uuid4().hex[:6]}-"
    c = tracking.client()
    job, run_id, adapter, _ = trained_run(c, micro_base, tmp_path, f"{prefix}fleet", "acme", 1.25)
    mv = registry.register_job(c, job, run_id, adapter, RegistrySpec(model_prefix=prefix))
    assert registry.promote(c, f"{prefix}acme")["promoted"]

    fetched = registry.fetch(c, "acme", prefix)  # production alias -> v1, downloaded, verified

    assert fetched.name == f"{prefix}acme/1" and fetched.version.run_id == run_id
    for name in registry.ALLOWED_FILES:
        local = (adapter / name).read_bytes()
        assert (fetched.path / name).read_bytes() == local
        assert fetched.version.tags[f"sha256.{name}"] == _sha256(local)
    # the rows really are in PostgreSQL (not a silent local fallback) ...
    assert stores.sql("SELECT version, run_id FROM model_versions WHERE name = %s", f"{prefix}acme") == [
        (1, run_id)
    ]
    assert stores.sql(
        "SELECT alias, version FROM registered_model_aliases WHERE name = %s ORDER BY alias", f"{prefix}acme"
    ) == [("candidate", 1), ("production", 1)]
    # ... and the adapter bytes in the S3 bucket, under the run, behind the proxied mv.source
    assert mv.source.startswith("mlflow-artifacts:/")
    keys = [k for k in stores.keys(ARTIFACT_BUCKET) if run_id in k and "/adapter/" in k]
    assert set(registry.ALLOWED_FILES) <= {k.rsplit("/", 1)[1] for k in keys}  # peft adds a README
    weights_key = next(k for k in keys if k.endswith("adapter_model.safetensors"))
    body = stores.s3.get_object(Bucket=ARTIFACT_BUCKET, Key=weights_key)["Body"].read()
    assert body == (adapter / "adapter_model.safetensors").read_bytes()

    # corrupted in the bucket: the registered checksum stops it from ever being loaded
    stores.s3.put_object(Bucket=ARTIFACT_BUCKET, Key=weights_key, Body=body[:-8] + b"\0" * 8)
    with pytest.raises(ChecksumError, match="adapter_model.safetensors has sha256 .* refusing"):
        registry.fetch(c, "acme", prefix, cache=tmp_path / "fresh-cache")


def test_server_answers_the_host_name_pods_use(stores):
    """Ray pods call http://mlflow:5000: MLflow's Host-header guard must let that name in (and
    still keep others out)."""
    api = f"{stores.tracking_uri}/api/2.0/mlflow/experiments/search?max_results=1"
    assert httpx.get(api, headers={"Host": "mlflow:5000"}, timeout=10).status_code == 200
    assert httpx.get(api, headers={"Host": "attacker.example:5000"}, timeout=10).status_code == 403


def test_s3_endpoint_from_environment_as_the_manifests_set_it(stores, monkeypatch):
    """infra/ gives Ray pods AWS_ENDPOINT_URL + credentials and a plain s3:// storage path. Ray
    Train resolves storage_path with pyarrow.fs.FileSystem.from_uri and pickles the filesystem
    to its workers; check pyarrow honours the variable (the AWS SDK reads it) on both sides."""
    import pickle

    import pyarrow.fs

    for key, value in S3_ENV.items():
        monkeypatch.setenv(key, value)
    monkeypatch.setenv("AWS_ENDPOINT_URL", stores.s3_endpoint)
    fs, path = pyarrow.fs.FileSystem.from_uri(f"s3://{CHECKPOINT_BUCKET}/env-probe")
    assert path == f"{CHECKPOINT_BUCKET}/env-probe"
    for i, side in enumerate((fs, pickle.loads(pickle.dumps(fs)))):  # driver, then a worker
        with side.open_output_stream(f"{path}/probe{i}.txt") as out:
            out.write(b"written through AWS_ENDPOINT_URL")
    assert stores.keys(CHECKPOINT_BUCKET, "env-probe/") == ["env-probe/probe0.txt", "env-probe/probe1.txt"]


def test_ray_train_checkpoints_to_s3_and_resumes_from_there(on_server, micro_base, ray_session):
    """A job crashes after its step-4 checkpoint; the checkpoint is in the bucket, and the
    re-submitted job (on a cluster: a new RayJob, another node) resumes from it."""
    stores, home = on_server, Path(os.environ["LORAFLEET_HOME"])
    name, prefix = f"s3fleet{uuid.uuid4().hex[:6]}", f"ckpt-{uuid.uuid4().hex[:6]}"
    write_chat(home / "a.jsonl", "alpha")
    fleet = fleet_file(
        home,
        name,
        {"a": "a.jsonl"},
        base=micro_base,
        training={"max_steps": 8, "save_steps": 4, "eval_fraction": 0.1},
        registry={"model_prefix": f"{name}-", "auto_promote": "always"},
    )
    # The session's Ray workers started before this test and never see AWS_* variables set now,
    # so endpoint and (fake) credentials travel in the URI, in pyarrow's form. Credentials are
    # needed: Ray pickles the filesystem to its workers, and one rebuilt without credentials got
    # 403s. On a cluster every pod has AWS_ENDPOINT_URL and the keys in its environment
    # (previous test) and the path is plain s3://lorafleet/checkpoints.
    endpoint = stores.s3_endpoint.removeprefix("http://")
    creds = f"{S3_ENV['AWS_ACCESS_KEY_ID']}:{S3_ENV['AWS_SECRET_ACCESS_KEY']}"
    storage = f"s3://{creds}@{CHECKPOINT_BUCKET}/{prefix}?endpoint_override={endpoint}&scheme=http"
    from lorafleet.pipeline import submit

    first = submit(fleet, storage=storage, fail_at_step={"a": 6})

    assert first.jobs["a"].state == "failed", first.jobs["a"].reason
    assert "injected fault at step 6" in first.jobs["a"].reason
    saved = stores.keys(CHECKPOINT_BUCKET, f"{prefix}/")
    weights = [k for k in saved if k.endswith("/checkpoint/adapter_model.safetensors")]
    assert len(weights) == 1, saved  # the step-4 checkpoint, persisted before the crash
    assert weights[0].startswith(f"{prefix}/{name}-a-")  # <storage>/<fleet>-<customer>-<hash>/...
    # the job's own training state beside its adapter: trl's in a run of its own, the packed
    # trainer's in a warm slot
    assert any(k.endswith(("/checkpoint/trainer_state.json", "/checkpoint/packed_state.json")) for k in saved)
    assert not os.path.exists(home / "checkpoints")  # nothing went to the local default

    second = submit(fleet, storage=storage)

    outcome = second.jobs["a"]
    assert outcome.state == "succeeded", outcome.reason
    c = tracking.client()
    run = c.get_run(outcome.run_id)
    assert run.data.tags["lorafleet.resumed_from_step"] == "4"
    assert run.data.metrics["step"] == 8
    assert (
        len(
            [
                k
                for k in stores.keys(CHECKPOINT_BUCKET, f"{prefix}/")
                if k.endswith("/checkpoint/adapter_model.safetensors")
            ]
        )
        == 2
    )  # num_to_keep=2
    # the adapter trained on the cluster's stores is registered and served from them
    assert outcome.registered == f"{name}-a/1"
    fetched = registry.fetch(c, "a", f"{name}-")
    assert (fetched.path / "adapter_model.safetensors").read_bytes() == (
        outcome.adapter_dir / "adapter_model.safetensors"
    ).read_bytes()
