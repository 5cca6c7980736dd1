"""One job inside a PackedTrainer: its adapter weights, optimizer, schedule, data order,
accumulation window, step count, checkpoints and events. Nothing here is shared between jobs."""

from __future__ import annotations

import json
import logging
import math
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from lorafleet.train.packed_data import Row, loss_tokens
from lorafleet.train.packed_lora import PEFT_PREFIX, LoraPair, PackedLoraLinear
from lorafleet.train.worker import ADAPTER_FILES, JobPlan, lora_config

log = logging.getLogger(__name__)
MAX_GRAD_NORM = 1.0  # TrainingArguments' default, which the trl jobs use
SAVE_TOTAL_LIMIT = 2  # as worker.sft_config
STATE_FILE = "packed_state.json"
EventSink = Callable[[str, dict[str, Any]], None]


class Sampler:
    """The job's data order: a permutation of its rows per epoch, drawn from (seed, epoch) alone,
    so the position (epoch, next index) is all a checkpoint needs to continue it."""

    def __init__(self, n: int, batch_size: int, seed: int):
        self.n, self.batch_size, self.seed = n, batch_size, seed
        self.epoch, self.position = 0, 0
        self._perm: tuple[int, list[int]] | None = None

    def _order(self) -> list[int]:
        if self._perm is None or self._perm[0] != self.epoch:
            gen = torch.Generator().manual_seed(self.seed * 7919 + self.epoch)
            self._perm = (self.epoch, torch.randperm(self.n, generator=gen).tolist())
        return self._perm[1]

    def next_window(self, accumulation: int) -> list[list[int]]:
        """Up to `accumulation` micro-batches of indices, never across an epoch's end (as HF)."""
        if self.position >= self.n:
            self.epoch, self.position = self.epoch + 1, 0
        order, window = self._order(), []
        while len(window) < accumulation and self.position < self.n:
            window.append(order[self.position : self.position + self.batch_size])
            self.position += self.batch_size
        return window


def planned_steps(plan: JobPlan, n_rows: int) -> int:
    """max_steps, or epochs of optimizer steps counted as transformers does."""
    t = plan.job.training
    if t.max_steps:
        return t.max_steps
    micro = math.ceil(n_rows / t.batch_size)
    per_epoch = max(micro // t.gradient_accumulation + int(micro % t.gradient_accumulation > 0), 1)
    return math.ceil(t.epochs * per_epoch)


def build_optimizer(plan: JobPlan, params: list[torch.nn.Parameter], max_steps: int) -> tuple[Any, Any]:
    """The job's optimizer (its `training.optimizer`, built as transformers builds it) and schedule."""
    from transformers import Trainer, TrainingArguments, get_scheduler

    t = plan.job.training
    args = TrainingArguments(output_dir=None, optim=t.optimizer, learning_rate=t.learning_rate, report_to=[])
    cls, kwargs = Trainer.get_optimizer_cls_and_kwargs(args)
    optimizer = cls([{"params": params, "weight_decay": 0.0}], **kwargs)
    warmup = math.ceil(max_steps * t.warmup_ratio)  # TrainingArguments.get_warmup_steps for a ratio
    schedule = get_scheduler(t.lr_scheduler, optimizer, num_warmup_steps=warmup, num_training_steps=max_steps)
    return optimizer, schedule


class PackedJob:
    def __init__(
        self,
        plan: JobPlan,
        output_dir: Path,
        rows: tuple[list[Row], list[Row]],
        pairs: dict[str, LoraPair],
        on_event: EventSink | None,
    ):
        self.plan, self.key, self.out = plan, plan.job.customer, output_dir
        self.train_rows, self.eval_rows = rows
        self.pairs, self.on_event = pairs, on_event
        self.params = [p for pair in pairs.values() for p in (pair.lora_A, pair.lora_B)]
        t = plan.job.training
        self.sampler = Sampler(len(self.train_rows), t.batch_size, t.seed)
        self.max_steps = planned_steps(plan, len(self.train_rows))
        self.optimizer, self.schedule = build_optimizer(plan, self.params, self.max_steps)
        self.step = self.micro = 0
        self.window: list[list[Row]] = []
        self.window_tokens = 0
        self.window_loss = 0.0
        self.log_loss, self.log_steps = 0.0, 0
        self.grad_norm = 0.0
        self.tokens = 0  # tokens trained on (padding excluded), for throughput
        self.last_checkpoint: Path | None = None

    # ---- data -------------------------------------------------------------------------------

    def next_micro(self) -> list[Row]:
        """This micro-step's rows; a new accumulation window counts its loss tokens up front, so
        each micro-batch's loss is divided by the window's tokens (transformers' num_items_in_batch)."""
        if not self.window:
            indices = self.sampler.next_window(self.plan.job.training.gradient_accumulation)
            self.window = [[self.train_rows[i] for i in batch] for batch in indices]
            self.window_tokens = max(loss_tokens([r for batch in self.window for r in batch]), 1)
        rows = self.window.pop(0)
        self.tokens += sum(len(r.input_ids) for r in rows)
        return rows

    def dropout_seed(self) -> int:
        """Seeds this micro-step's dropout masks: the job's seed and micro-step, nothing else."""
        return (self.plan.job.training.seed * 1_000_033 + self.micro) % (2**31 - 1) + 1

    # ---- optimisation -----------------------------------------------------------------------

    def micro_done(self, loss: float) -> bool:
        """Record one micro-batch's (window-normalised) loss; True when the window is complete."""
        self.micro += 1
        self.window_loss += loss
        return not self.window

    def optimizer_step(self) -> None:
        grads = [p.grad for p in self.params if p.grad is not None]
        if any(not torch.isfinite(g).all() for g in grads):
            raise FloatingPointError(f"non-finite gradient at step {self.step + 1}")
        self.grad_norm = float(torch.nn.utils.clip_grad_norm_(self.params, MAX_GRAD_NORM))
        self.lr = self.schedule.get_last_lr()[0]
        self.optimizer.step()
        self.schedule.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        self.log_loss += self.window_loss
        self.log_steps += 1
        self.window_loss = 0.0

    def log_metrics(self) -> None:
        self.emit(
            "metrics",
            loss=self.log_loss / max(self.log_steps, 1),
            learning_rate=self.lr,
            grad_norm=self.grad_norm,
            epoch=self.sampler.epoch + self.sampler.position / max(self.sampler.n, 1),
        )
        self.log_loss, self.log_steps = 0.0, 0

    # ---- files ------------------------------------------------------------------------------

    def adapter_tensors(self) -> dict[str, torch.Tensor]:
        tensors = {}
        for name, pair in self.pairs.items():
            tensors[f"{PEFT_PREFIX}{name}.lora_A.weight"] = pair.lora_A.detach().cpu().contiguous()
            tensors[f"{PEFT_PREFIX}{name}.lora_B.weight"] = pair.lora_B.detach().cpu().contiguous()
        return tensors

    def save_adapter(self, folder: Path, config: Any) -> Path:
        """peft's format: adapter_config.json + adapter_model.safetensors, as a trl job saves."""
        folder.mkdir(parents=True, exist_ok=True)
        save_file(self.adapter_tensors(), folder / ADAPTER_FILES[1], metadata={"format": "pt"})
        config.save_pretrained(str(folder))
        return folder

    def save_checkpoint(self, config: Any) -> Path:
        folder = self.save_adapter(self.out / f"checkpoint-{self.step}", config)
        torch.save(self.optimizer.state_dict(), folder / "optimizer.pt")
        torch.save(self.schedule.state_dict(), folder / "scheduler.pt")
        state = {
            "customer": self.key,
            "step": self.step,
            "micro": self.micro,
            "epoch": self.sampler.epoch,
            "position": self.sampler.position,
            "max_steps": self.max_steps,
            "log_loss": self.log_loss,
            "log_steps": self.log_steps,
        }
        (folder / STATE_FILE).write_text(json.dumps(state, indent=1))
        self.last_checkpoint = folder
        self._prune_checkpoints()
        return folder

    def _prune_checkpoints(self) -> None:
        folders = sorted(self.out.glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1]))
        for old in folders[:-SAVE_TOTAL_LIMIT]:
            shutil.rmtree(old, ignore_errors=True)

    def load_checkpoint(self, folder: Path) -> None:
        """Continue at a checkpoint's step: weights, optimizer, schedule, data position, counters."""
        state = json.loads((folder / STATE_FILE).read_text())
        if state["customer"] != self.key:
            raise ValueError(f"checkpoint {folder} belongs to {state['customer']}, not {self.key}")
        tensors = load_file(folder / ADAPTER_FILES[1])
        with torch.no_grad():
            for name, pair in self.pairs.items():
                pair.lora_A.copy_(tensors[f"{PEFT_PREFIX}{name}.lora_A.weight"])
                pair.lora_B.copy_(tensors[f"{PEFT_PREFIX}{name}.lora_B.weight"])
        self.optimizer.load_state_dict(torch.load(folder / "optimizer.pt", weights_only=True))
        self.schedule.load_state_dict(torch.load(folder / "scheduler.pt", weights_only=True))
        self.step, self.micro = state["step"], state["micro"]
        self.sampler.epoch, self.sampler.position = state["epoch"], state["position"]
        self.log_loss, self.log_steps = state["log_loss"], state["log_steps"]
        self.last_checkpoint = folder

    # ---- events -----------------------------------------------------------------------------

    def emit(self, event: str, **fields: Any) -> None:
        if self.on_event is None:
            return
        try:
            self.on_event(self.key, {"event": event, "step": self.step, **fields})
        except Exception:  # a broken listener must not fail the job, nor its batch mates
            log.exception("on_event for %s raised", self.key)


def install(pairs: dict[str, LoraPair], layers: dict[str, PackedLoraLinear], key: str) -> None:
    for name, pair in pairs.items():
        layers[name].adapters[key] = pair


def uninstall(pairs: dict[str, LoraPair], layers: dict[str, PackedLoraLinear], key: str) -> None:
    for name in pairs:
        layers[name].adapters.pop(key, None)


def peft_config(plan: JobPlan, targets: list[str], base_name: str) -> Any:
    """The LoraConfig a trl job saves: 'all-linear' resolved to module names as peft resolves it."""
    config = lora_config(plan.job)
    if isinstance(config.target_modules, str) and config.target_modules.lower() == "all-linear":
        config.target_modules = set(targets)
    config.base_model_name_or_path = base_name
    config.inference_mode = True
    return config
