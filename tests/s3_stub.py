"""An S3 stand-in for tests: moto's server in its own process (the one tests/test_shared_stores.py
runs), on a free local port, with the fake credentials moto accepts. Needs the `dev` extra (moto,
boto3); a missing package skips."""

from __future__ import annotations

import importlib.util
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest

from lorafleet.raystart import free_port

# set anyway, so that no client wanders off to a real AWS credential chain
CREDENTIALS = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
}


@dataclass
class S3Stub:
    endpoint: str  # http://127.0.0.1:<port>
    client: object  # boto3 S3 client

    def put(self, bucket: str, key: str, data: bytes) -> str:
        self.client.put_object(Bucket=bucket, Key=key, Body=data)
        return f"s3://{bucket}/{key}"

    def env(self) -> dict[str, str]:
        """What a cluster's pods carry (infra/): the endpoint and credentials."""
        return CREDENTIALS | {"AWS_ENDPOINT_URL": self.endpoint}

    def pyarrow_url(self, bucket: str, key: str) -> str:
        """The endpoint in the URL itself (pyarrow's form, as test_shared_stores' storage path)."""
        host = self.endpoint.removeprefix("http://")
        return f"s3://{bucket}/{key}?endpoint_override={host}&scheme=http"


@contextmanager
def moto_server(log: Path, buckets: tuple[str, ...] = ()) -> Iterator[S3Stub]:
    missing = [m for m in ("moto", "boto3") if importlib.util.find_spec(m) is None]
    if missing:
        pytest.skip(f"{', '.join(missing)} not installed: pip install -e '.[dev]'")
    import boto3

    port = free_port()
    with open(log, "w") as fh:
        proc = subprocess.Popen(
            [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
            stdout=fh,
            stderr=subprocess.STDOUT,
            env=os.environ | CREDENTIALS,
            start_new_session=True,
        )
    try:
        endpoint = f"http://127.0.0.1:{port}"
        client = boto3.client(
            "s3",
            endpoint_url=endpoint,
            aws_access_key_id=CREDENTIALS["AWS_ACCESS_KEY_ID"],
            aws_secret_access_key=CREDENTIALS["AWS_SECRET_ACCESS_KEY"],
            region_name=CREDENTIALS["AWS_DEFAULT_REGION"],
        )
        _wait_up(client, proc, log)
        for bucket in buckets:
            client.create_bucket(Bucket=bucket)
        yield S3Stub(endpoint, client)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(timeout=20)


def _wait_up(client: object, proc: subprocess.Popen, log: Path, timeout_s: float = 60) -> None:
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"moto server exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
        try:
            client.list_buckets()
            return
        except Exception:  # connection refused until it listens
            time.sleep(0.3)
    pytest.fail(f"moto server did not answer in {timeout_s:.0f} s:\n{log.read_text()[-3000:]}")
