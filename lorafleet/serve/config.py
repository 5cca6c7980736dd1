"""The Serve app's arguments: one pydantic schema for `lorafleet serve`, `serve run` and the
`args:` block of a Serve config file (serve_apps/*.yaml)."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from lorafleet.limits import MAX_SERVE_RANK, PREFIX_RULE, Flag, Real, Whole, check_name

DAY_S = 86_400.0


class AppArgs(BaseModel):
    # every number bounded, no infinities: a serve config's `request_timeout_s: .inf` or
    # `max_batch_size: 1e9` would only show as a hang or an out-of-memory under load
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    base_model: str = Field("tiny-llama", description="'tiny-llama', a local HF folder or hub id")
    base_name: str | None = Field(None, description="the base's name in /v1/models (default: derived)")
    quantization: Literal["nf4", "none"] = Field("nf4", description="load the base NF4 or full")
    adapter_prefix: str = Field(
        "", description="registered model name = prefix + customer (the fleet file's registry.model_prefix)"
    )
    max_rank: Whole = Field(
        MAX_SERVE_RANK,
        gt=0,
        le=1024,
        description="largest LoRA rank a replica serves; "
        "fleet files are validated against lorafleet.limits.MAX_SERVE_RANK",
    )

    @field_validator("adapter_prefix")
    @classmethod
    def _prefix(cls, v: str) -> str:
        return check_name("adapter_prefix", v, PREFIX_RULE)

    tracking_uri: str | None = Field(None, description="MLflow; default MLFLOW_TRACKING_URI/embedded")
    max_adapters_per_replica: Whole = Field(8, gt=0, le=1024, description="LRU size of loaded adapters")
    max_batch_size: Whole = Field(16, gt=0, le=1024, description="requests in one forward pass, any adapters")
    batch_wait_timeout_s: Real = Field(0.01, ge=0, le=10, description="wait to fill a batch")
    reserved_rows: Whole = Field(
        0,
        ge=0,
        le=1023,
        description="batch rows only a tenant with nothing running may take, so a tenant that floods "
        "holds at most max_batch_size - reserved_rows (costs peak throughput when one tenant is alone)",
    )
    max_new_tokens: Whole = Field(256, gt=0, le=1_000_000, description="default and cap of max_tokens")
    alias_refresh_s: Real = Field(
        5.0,
        ge=0,
        le=DAY_S,
        description="how long a resolved alias is trusted: a promotion reaches the endpoint within this time",
    )
    api_keys_file: str | None = Field(
        None, description="tenant keys file (hashed keys, limits); unset = open (loopback only)"
    )
    keys_reload_s: Real = Field(
        2.0,
        gt=0,
        le=DAY_S,
        description="how often the keys file is checked: new keys, limits, revocations apply within it",
    )
    allow_unauthenticated: Flag = Field(
        False, description="serve a non-loopback address without a keys file (an endpoint open to anyone)"
    )
    registry_timeout_s: Real = Field(
        10,
        gt=0,
        le=3600,
        description="longest wait for one MLflow call; past it, a known alias serves its last version",
    )
    registry_retry_s: Real = Field(
        5,
        gt=0,
        le=3600,
        description="after a failed registry call, new names get 503 at once for this long (Retry-After)",
    )
    max_request_bytes: Whole = Field(
        1_000_000, gt=0, le=1 << 30, description="largest request body; larger: 413"
    )
    max_messages: Whole = Field(
        256, gt=0, le=100_000, description="most messages in one chat request; more: 413"
    )
    request_timeout_s: Real = Field(
        120,
        gt=0,
        le=DAY_S,
        description="longest a request may take end to end; past it: 504 (an error event in a stream)",
    )
    max_queued_requests: Whole = Field(
        512,
        ge=-1,
        le=1_000_000,
        description="requests each caller queues for busy replicas beyond max_ongoing_requests; past it: "
        "429 with Retry-After at once (-1: no bound); lower it if queued requests miss request_timeout_s",
    )
    min_replicas: Whole = Field(
        1, ge=0, le=1024, description="replicas kept up with no traffic (0: scale to zero)"
    )
    max_replicas: Whole = Field(1, ge=1, le=1024, description="replicas the autoscaler may start")
    target_ongoing_requests: Real = Field(8, gt=0, le=100_000, description="autoscaling target per replica")
    upscale_delay_s: Real = Field(
        5, ge=0, le=DAY_S, description="load must stay high this long before a scale-up"
    )
    downscale_delay_s: Real = Field(
        30, ge=0, le=DAY_S, description="load must stay low this long before a scale-down"
    )
    autoscale_look_back_s: Real = Field(30, gt=0, le=DAY_S, description="window the load is averaged over")
    replica_cpus: Real = Field(1, ge=0, le=1024, description="CPUs reserved per replica")
    replica_gpus: Real = Field(0, ge=0, le=64, description="GPUs reserved per replica (fractions share one)")
    max_ongoing_requests: Whole = Field(
        64, gt=0, le=100_000, description="per replica; more queue at the caller"
    )

    @model_validator(mode="after")
    def _consistent(self) -> AppArgs:
        if self.min_replicas > self.max_replicas:
            raise ValueError(f"min_replicas {self.min_replicas} is over max_replicas {self.max_replicas}")
        return self

    def display_base_name(self) -> str:
        return self.base_name or self.base_model.rstrip("/").split("/")[-1]
