"""Run the app on a local (or given) Ray cluster: in the foreground for `lorafleet serve`, or
started and left running for the demo and tests."""

from __future__ import annotations

import ipaddress
import signal
import threading
import time
from typing import Any

import httpx

from lorafleet import settings
from lorafleet.errors import LorafleetError
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
    check_exposure(host, args.api_keys_file, getattr(args, "allow_unauthenticated", False))
    from ray import serve

    from lorafleet.raystart import init_ray
    from lorafleet.serve.app import build_app
    from lorafleet.train.pool import release as release_warm_slots

    if args.tracking_uri is None:  # replicas don't share our cwd: give them the absolute store
        args = args.model_copy(update={"tracking_uri": settings.tracking_uri()})
    init_ray(ray_address)
    release_warm_slots()  # idle warm training slots on the cluster would hold the replicas' resources
    serve.start(http_options={"host": host, "port": port})
    serve.run(build_app(args.model_dump()), name=APP_NAME, route_prefix="/", blocking=False)
    url = f"http://{host}:{port}"
    _wait_healthy(url, timeout_s)
    return f"{url}/v1"


class OpenEndpointError(LorafleetError):
    """An endpoint about to listen beyond this machine with no API keys."""


def is_loopback(host: str) -> bool:
    """Only this machine can connect. A name other than 'localhost' may resolve to anything, so it
    counts as reachable from outside; '0.0.0.0' and '::' listen on every interface."""
    if host.strip().lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip().strip("[]")).is_loopback
    except ValueError:
        return False


def check_exposure(host: str, api_keys_file: str | None, allow_unauthenticated: bool) -> None:
    """Refuse to serve every adapter to anyone who can reach the port, unless the config says so."""
    if api_keys_file or allow_unauthenticated or is_loopback(host):
        return
    raise OpenEndpointError(
        f"refusing to listen on {host} without API keys: anyone who can reach it could call every "
        "adapter. Create keys (`lorafleet keys create TENANT --adapters ...`) and pass --keys-file "
        "(api_keys_file in a Serve config), or set allow_unauthenticated: true in the app args "
        "(--allow-unauthenticated) if the endpoint is meant to be open; or bind to 127.0.0.1"
    )


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
