"""Registered adapters without training: a random LoRA on a base, logged as a job run would be.
Used by the serving benchmark (N adapters in seconds) and the registry tests."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from lorafleet.spec import JobSpec, LoraSpec, QuantizationSpec, RegistrySpec, ResourcesSpec, TrainingSpec

# registry/tracking (MLflow) are imported where used: make_adapter must run where MLflow is absent


def make_adapter(
    base: Path, out: Path, seed: int, rank: int = 4, targets: list[str] | str = ("q_proj", "v_proj")
) -> Path:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = get_peft_model(
        AutoModelForCausalLM.from_pretrained(base),
        LoraConfig(
            r=rank,
            lora_alpha=2 * rank,
            target_modules=list(targets) if not isinstance(targets, str) else targets,
            init_lora_weights=False,
        ),
    )
    model.save_pretrained(out)
    return out


def trained_run(
    c: Any,
    base: Path,
    tmp: Path,
    fleet: str,
    customer: str,
    eval_loss: float,
    seed: int = 0,
    base_name: str | None = None,
) -> tuple[JobSpec, str, Path, str]:
    """A job run as the runner leaves it: adapter artefacts, lineage tags, eval loss."""
    from lorafleet import tracking
    from lorafleet.models import fingerprint

    job = JobSpec(
        fleet=fleet,
        customer=customer,
        base_model=base_name or str(base),
        dataset="d.jsonl",
        format="auto",
        lora=LoraSpec(rank=4),
        quantization=QuantizationSpec(),
        training=TrainingSpec(),
        resources=ResourcesSpec(),
    )
    exp = tracking.ensure_experiment(c, fleet)
    spec_file = tmp / f"{fleet}.yaml"
    spec_file.write_text(f"name: {fleet}\n")
    parent = tracking.start_fleet_run(c, exp, fleet, spec_file, fingerprint(base))
    run_id = tracking.start_job_run(
        c,
        exp,
        parent,
        job,
        {"base_fingerprint": fingerprint(base), "dataset_sha256": "ab" * 32, "spec_hash": job.spec_hash()},
    )
    adapter = make_adapter(base, tmp / f"{customer}-{seed}", seed)
    c.log_artifacts(run_id, str(adapter), "adapter")
    c.log_metric(run_id, "eval_loss", eval_loss)
    tracking.set_state(c, run_id, "succeeded")
    return job, run_id, adapter, parent


def register_random(c: Any, base: Path, tmp: Path, customers: list[str], base_name: str) -> list[str]:
    """One promoted random adapter per customer; returns the customer names."""
    from lorafleet import registry

    for i, customer in enumerate(customers):
        job, run_id, adapter, _ = trained_run(
            c, base, tmp, "bench-synthetic", customer, 1.0, seed=i, base_name=base_name
        )
        registry.register_job(c, job, run_id, adapter, RegistrySpec(auto_promote="always"))
    return customers
