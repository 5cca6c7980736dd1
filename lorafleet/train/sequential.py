"""The slot's trainer until packed training lands: one job at a time on the slot's one base copy.
peft wraps the base for a job (trl's SFTTrainer, configured exactly as `worker.build_trainer`
does for a job's own run) and is unloaded after it, so the next job starts from the same base."""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

from transformers import TrainerCallback

from lorafleet.train.checkpoints import JobCheckpoints, UploadCheckpoints
from lorafleet.train.worker import ADAPTER_FILES, JobPlan


class CrashAt(TrainerCallback):
    """Tests: the process dies at this step, as in an out-of-memory kill (no cleanup, no report)."""

    def __init__(self, step: int | None):
        self.step = step

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if self.step is not None and state.global_step == self.step:
            from lorafleet.train.slot import crash_now

            crash_now()


class SequentialTrainer:
    def __init__(self, base: Any, tokenizer: Any, device: str):
        self.base, self.tokenizer, self.device = base, tokenizer, device

    @classmethod
    def load(cls, cfg: Any) -> SequentialTrainer:
        """The slot's base (checked against the fleet's fingerprint) and tokenizer, loaded once."""
        import ray.train
        import torch

        from lorafleet.models import load_base, load_tokenizer, resolve_base
        from lorafleet.train.worker import check_base

        on_gpu = cfg.resources.gpus_per_worker > 0 and torch.cuda.is_available()
        device = str(ray.train.torch.get_device()) if on_gpu else "cpu"
        torch.set_num_threads(max(1, int(cfg.resources.cpus_per_worker)))
        path = resolve_base(cfg.base_model)
        check_base(path, cfg.base_fingerprint)
        return cls(load_base(path, cfg.quantization, device), load_tokenizer(path), device)

    def train(
        self, plan: JobPlan, checkpoints: JobCheckpoints, board: Any, crash_at: int | None
    ) -> dict[str, Any]:
        """Train one job to its end (resuming from its last checkpoint); its adapter and metrics."""
        from lorafleet.train.progress import ProgressCallback

        progress = ProgressCallback(board, plan.job.customer, 0, plan.fail_at_step)
        with tempfile.TemporaryDirectory(prefix="lorafleet-job-") as out:
            trainer = self._trainer(plan, out, [progress, UploadCheckpoints(checkpoints), CrashAt(crash_at)])
            try:
                resume = checkpoints.latest()
                board.update.remote(plan.job.customer, resumed=resume is not None)
                trainer.train(resume_from_checkpoint=resume)
                adapter = Path(out) / "adapter"
                trainer.model.save_pretrained(str(adapter))
                files = {name: (adapter / name).read_bytes() for name in ADAPTER_FILES}
            finally:
                self._unwrap(trainer.model)
        return {"files": files, "metrics": _final_metrics(trainer.state.log_history)}

    def _trainer(self, plan: JobPlan, out: str, callbacks: list[Any]) -> Any:
        from trl import SFTTrainer

        from lorafleet.train.worker import _datasets, _lora_to_fp32, lora_config, sft_config

        job = plan.job
        train_ds, eval_ds = _datasets(job)
        args = sft_config(job, out, self.device.startswith("cuda"), eval_ds is not None)
        if "messages" in train_ds.column_names:
            # loss on assistant tokens only needs {% generation %} markers in the chat template
            args.assistant_only_loss = "{% generation %}" in (self.tokenizer.chat_template or "")
        trainer = SFTTrainer(
            model=self.base,
            args=args,
            train_dataset=train_ds,
            eval_dataset=eval_ds,
            processing_class=self.tokenizer,
            peft_config=lora_config(job),
            callbacks=callbacks,
        )
        if not args.bf16:
            _lora_to_fp32(trainer.model)
        return trainer

    def _unwrap(self, model: Any) -> None:
        """Back to the bare base: LoRA layers out (not merged), the input-grad hook removed."""
        from peft import PeftModel

        if isinstance(model, PeftModel):
            self.base = model.unload()
        if getattr(self.base, "_require_grads_hook", None) is not None:
            self.base.disable_input_require_grads()


def _final_metrics(log_history: list[dict[str, Any]]) -> dict[str, float]:
    """The last value of each logged number (step, loss, eval_loss, train_loss, ...)."""
    merged: dict[str, float] = {}
    for entry in log_history:
        merged |= {k: v for k, v in entry.items() if isinstance(v, int | float)}
    return merged
