"""Run the app on a local (or given) Ray cluster: in the foreground for `lorafleet serve`, or
started and left running for the demo and tests."""

from __future__ import annotations

import signal
import threading
import time
from typing import Any

import httpx

from lorafleet import settings
from lorafleet.serve.config import AppArgs

APP_NAME = "lorafleet"


def start(
    args: AppArgs,
    host: str = "127.0.0.1",
    port: int = 8000,
    ray_address: str | None = None,
    timeout_s: float = 300,
) -> str:
    """Deploy the app and wait until it answers; returns the OpenAI base URL."""
    from ray import serve

    from lorafleet.serve.app import build_app
    from lorafleet.train.runner import init_ray

    if args.tracking_uri is None:  # replicas don't share our cwd: give them the absolute store
        args = args.model_copy(update={"tracking_uri": settings.tracking_uri()})
    init_ray(ray_address)
    serve.start(http_options={"host": host, "port": port})
    serve.run(build_app(args.model_dump()), name=APP_NAME, route_prefix="/", blocking=False)
    url = f"http://{host}:{port}"
    _wait_healthy(url, timeout_s)
    return f"{url}/v1"


def _wait_healthy(url: str, timeout_s: float) -> None:
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        try:
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise TimeoutError(f"the endpoint at {url} did not become healthy in {timeout_s:.0f} s")


def stop() -> None:
    from ray import serve

    serve.shutdown()


def serve_forever(args: AppArgs, host: str, port: int, ray_address: str | None = None) -> None:
    """Foreground: until Ctrl-C or SIGTERM, then shut Serve down cleanly."""
    url = start(args, host, port, ray_address)
    print(f"serving {args.display_base_name()} and its adapters on {url} (Ctrl-C stops)")
    done = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: done.set())
    done.wait()
    print("shutting down")
    stop()


def app_args_from(overrides: dict[str, Any]) -> AppArgs:
    return AppArgs.model_validate({k: v for k, v in overrides.items() if v is not None})
