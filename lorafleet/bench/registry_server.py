"""A real `mlflow server` on a temporary SQLite backend and artefact folder, which the registry
outage benchmark stops (SIGKILL, as a crash would) and starts again on the same port and store."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx

from lorafleet.raystart import free_port


class RegistryServer:
    def __init__(self, home: Path, port: int | None = None):
        self.home, self.port = home, port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen | None = None

    def command(self) -> list[str]:
        return [
            sys.executable,
            "-m",
            "mlflow",
            "server",
            "--backend-store-uri",
            f"sqlite:///{self.home / 'registry.db'}",
            "--artifacts-destination",
            str(self.home / "registry-artifacts"),
            "--serve-artifacts",
            "--host",
            "127.0.0.1",
            "--port",
            str(self.port),
            "--workers",
            "1",
        ]

    def start(self, timeout_s: float = 180) -> float:
        """Start it and wait for /health; returns the seconds that took."""
        t0 = time.perf_counter()
        log = open(self.home / "mlflow-server.log", "ab")  # noqa: SIM115 (the child keeps it)
        # own session: the server forks workers, and killpg reaches all of them (and nothing else)
        self.proc = subprocess.Popen(self.command(), stdout=log, stderr=log, start_new_session=True)
        while time.perf_counter() - t0 < timeout_s:
            if self.proc.poll() is not None:
                raise RuntimeError(f"mlflow server exited ({self.proc.returncode}); see {log.name}")
            if self.healthy():
                return time.perf_counter() - t0
            time.sleep(0.5)
        raise TimeoutError(f"mlflow server not healthy in {timeout_s:.0f} s; see {log.name}")

    def healthy(self) -> bool:
        try:
            return httpx.get(f"{self.url}/health", timeout=2).status_code == 200
        except httpx.HTTPError:
            return False

    def kill(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(timeout=30)
        self.proc = None
