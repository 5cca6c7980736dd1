"""Every job measures its base: before the first step the trainer logs `base_eval_loss` on the
job's eval split, which is the base model's own loss (LoRA B starts at zero), and a resumed job
does not pay for it again."""

from __future__ import annotations

from pathlib import Path

import pytest

from lorafleet.models import fingerprint
from lorafleet.spec import JobSpec, LoraSpec, QuantizationSpec, ResourcesSpec, TrainingSpec
from lorafleet.train.worker import JobPlan, build_trainer
from tests.conftest import write_chat

pytestmark = pytest.mark.integration


def plan(base: Path, dataset: Path) -> JobPlan:
    job = JobSpec(
        fleet="f",
        customer="acme",
        base_model=str(base),
        dataset=str(dataset),
        format="auto",
        lora=LoraSpec(rank=4),
        quantization=QuantizationSpec(),
        training=TrainingSpec(max_steps=4, save_steps=2, batch_size=4, learning_rate=1e-2, eval_fraction=0.2),
        resources=ResourcesSpec(),
    )
    return JobPlan(job=job, base_fingerprint=fingerprint(base))


def base_evals(trainer) -> list[dict]:
    return [h for h in trainer.state.log_history if "base_eval_loss" in h]


def test_base_eval_is_the_base_loss_and_not_repeated_on_resume(micro_base, tmp_path):
    p = plan(micro_base, write_chat(tmp_path / "acme.jsonl", "acme", n=30))
    trainer = build_trainer(p, str(tmp_path / "out"), "cpu", [])
    trainer.train()
    (first,) = base_evals(trainer)
    assert first["step"] == 0
    with trainer.model.disable_adapter():  # the base itself, same eval split
        base_loss = trainer.evaluate()["eval_loss"]
    assert first["base_eval_loss"] == pytest.approx(base_loss, rel=1e-5)
    assert trainer.evaluate()["eval_loss"] < base_loss  # and the adapter did learn

    resumed = build_trainer(p, str(tmp_path / "out"), "cpu", [])
    resumed.train(resume_from_checkpoint=str(tmp_path / "out" / "checkpoint-2"))
    assert base_evals(resumed) == [first]  # carried in the checkpoint's history, not measured again
