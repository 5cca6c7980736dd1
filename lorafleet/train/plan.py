"""What a job's worker needs, made on the driver and sent as the Ray Train loop config. A module
of its own without torch or transformers: the driver, the fleet's board and the tasks that start
Ray Train runs import it, and each of those processes would otherwise pay seconds of imports."""

from __future__ import annotations

import hashlib
from typing import Any

from pydantic import BaseModel, model_validator

from lorafleet.spec import JobSpec, load_deepspeed

ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")


def ray_run_name(job: JobSpec, jhash: str) -> str:
    """A job's Ray Train run (and its checkpoints' folder in the storage path): readable, and
    unique to its fleet and customer through the hash (fleet 'shop' with customer 'eu-x' and
    fleet 'shop-eu' with customer 'x' once shared one folder, and one resumed the other's)."""
    own = hashlib.sha256(f"{job.fleet}\0{job.customer}\0{jhash}".encode()).hexdigest()
    return f"{job.fleet}-{job.customer}-{own[:8]}"


class JobPlan(BaseModel):
    """Everything a worker needs, sent as the Ray Train loop config."""

    job: JobSpec
    base_fingerprint: str
    job_hash: str = ""
    # sha256 of the dataset as validated; the worker reads it again (from wherever it lives, e.g.
    # s3://) and refuses bytes that changed since: the lineage would name data it did not train on
    dataset_sha256: str = ""
    fleet_board: str | None = None
    fail_at_step: int | None = None
    # the job's DeepSpeed config itself, read where the plan is made (the driver): workers on other
    # nodes then need neither the preset files nor a custom JSON's path
    deepspeed: dict[str, Any] | None = None

    @model_validator(mode="after")
    def _read_deepspeed(self) -> JobPlan:
        if self.deepspeed is None and self.job.training.deepspeed is not None:
            self.deepspeed = load_deepspeed(self.job.training.deepspeed)
        return self
