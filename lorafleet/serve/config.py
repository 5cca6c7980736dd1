"""The Serve app's arguments: one pydantic schema for `lorafleet serve`, `serve run` and the
`args:` block of a Serve config file (serve_apps/*.yaml)."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from lorafleet.limits import MAX_SERVE_RANK, PREFIX_RULE, check_name


class AppArgs(BaseModel):
    model_config = ConfigDict(extra="forbid")

    base_model: str = Field("tiny-llama", description="'tiny-llama', a local HF folder or hub id")
    base_name: str | None = Field(None, description="the base's name in /v1/models (default: derived)")
    quantization: Literal["nf4", "none"] = Field("nf4", description="load the base NF4 or full")
    adapter_prefix: str = Field(
        "", description="registered model name = prefix + customer (the fleet file's registry.model_prefix)"
    )
    max_rank: int = Field(
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
    max_adapters_per_replica: int = Field(8, gt=0, description="LRU size of loaded adapters")
    max_batch_size: int = Field(16, gt=0, description="requests in one forward pass, any adapters")
    batch_wait_timeout_s: float = Field(0.01, ge=0, description="wait to fill a batch")
    max_new_tokens: int = Field(256, gt=0, description="default and cap of max_tokens")
    alias_refresh_s: float = Field(
        5.0,
        ge=0,
        description="how long a resolved alias is trusted: a promotion reaches the endpoint within this time",
    )
    api_keys_file: str | None = Field(None, description="tenant keys (hashed); unset = open")
    min_replicas: int = Field(1, ge=0)
    max_replicas: int = Field(1, ge=1)
    target_ongoing_requests: float = Field(8, gt=0, description="autoscaling target per replica")
    upscale_delay_s: float = Field(5, ge=0)
    downscale_delay_s: float = Field(30, ge=0)
    autoscale_look_back_s: float = Field(30, gt=0, description="window the load is averaged over")
    replica_cpus: float = Field(1, ge=0)
    replica_gpus: float = Field(0, ge=0)
    max_ongoing_requests: int = Field(64, gt=0, description="per replica; more queue at the proxy")

    def display_base_name(self) -> str:
        return self.base_name or self.base_model.rstrip("/").split("/")[-1]
