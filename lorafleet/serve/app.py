"""`build_app`: the Serve application (replicas + ingress) from validated arguments.

Used by `lorafleet serve`, by `serve run lorafleet.serve.app:build_app base_model=...`, and by
Serve config files (`import_path: lorafleet.serve.app:build_app` with an `args:` block).
"""

from __future__ import annotations

from typing import Any

from pydantic import ValidationError
from ray import serve
from ray.serve import Application
from ray.serve.config import BackpressureConfig

from lorafleet.errors import SpecError
from lorafleet.serve.config import AppArgs
from lorafleet.serve.ingress import Ingress
from lorafleet.serve.replica import BaseReplica
from lorafleet.spec import format_validation_error

RETRY_AFTER_S = 1  # what a client is told to wait when the endpoint is full


def build_app(args: dict[str, Any]) -> Application:
    try:
        cfg = AppArgs.model_validate(args)
    except ValidationError as exc:
        raise format_validation_error(exc, "serve app args") from None
    if cfg.reserved_rows >= cfg.max_batch_size:
        raise SpecError(
            f"serve app args: reserved_rows {cfg.reserved_rows} must be below "
            f"max_batch_size {cfg.max_batch_size}"
        )
    if cfg.min_replicas > cfg.max_replicas:
        raise SpecError(f"serve app args: min_replicas {cfg.min_replicas} > max_replicas {cfg.max_replicas}")
    plain = cfg.model_dump()
    replica = (
        serve.deployment(BaseReplica, name="BaseReplica")
        .options(
            autoscaling_config={
                "min_replicas": cfg.min_replicas,
                "max_replicas": cfg.max_replicas,
                "initial_replicas": max(cfg.min_replicas, 1),
                "target_ongoing_requests": cfg.target_ongoing_requests,
                "upscale_delay_s": cfg.upscale_delay_s,
                "downscale_delay_s": cfg.downscale_delay_s,
                "look_back_period_s": cfg.autoscale_look_back_s,
            },
            max_ongoing_requests=cfg.max_ongoing_requests,
            # past this many waiting at a caller, the handle raises BackPressureError: 429 at once
            max_queued_requests=cfg.max_queued_requests,
            ray_actor_options={"num_cpus": cfg.replica_cpus, "num_gpus": cfg.replica_gpus},
        )
        .bind(plain)
    )
    ingress = (
        serve.deployment(Ingress, name="Ingress")
        .options(ray_actor_options={"num_cpus": 0}, **_ingress_bounds(cfg))
        .bind(replica, plain)
    )
    return ingress


def _ingress_bounds(cfg: AppArgs) -> dict[str, Any]:
    """The ingress takes everything the replicas may hold or queue, so overload is answered by the
    ingress itself (429 in OpenAI's shape, from the replica handle's BackPressureError). The proxy's
    queue in front of it stays a last bound (Serve's plain-text 429). Serve counts a burst's
    requests as queued until each is routed, so a tight proxy bound would refuse bursts that fit."""
    if cfg.max_queued_requests < 0:
        return {"max_ongoing_requests": 4 * cfg.max_ongoing_requests, "max_queued_requests": -1}
    ongoing = 4 * cfg.max_ongoing_requests + cfg.max_queued_requests
    return {
        "max_ongoing_requests": ongoing,
        "max_queued_requests": 4 * ongoing,
        "backpressure_config": BackpressureConfig(status_code=429, retry_after_s=RETRY_AFTER_S),
    }
