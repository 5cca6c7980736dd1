"""Packed training: up to K LoRA jobs co-trained on ONE frozen base copy in one process.

Each micro-step's batch holds one micro-batch of every running job; the base runs over all rows
(in one forward, or one per group of similar lengths: `max_padding`) and each row goes through its
own job's adapter (`packed_lora`). Everything else stays per job (`packed_job`): optimizer,
schedule, accumulation, step count, data order, eval split, checkpoints, events. Losses are
normalised per job (the job's token-loss sum over its own loss tokens), so a job's gradients are
the ones it would get alone: tests/test_packed.py trains a job beside three others and alone and
compares the adapters.

    trainer = PackedTrainer("tiny-llama", QuantizationSpec(), device="cpu", max_jobs=4)
    trainer.add(plan, "out/acme", on_event=lambda customer, event: print(customer, event))
    trainer.run()          # or call trainer.step() in a loop, adding and cancelling in between

One thread drives it (add, step, run); cancel() may also come from another thread.

Events (`on_event(customer, event)`; every event has "event" and "step", the job's optimizer
steps so far):
- {"event": "state", "state": "running", "max_steps", "resumed": bool, "packed_with": [customers]}
- {"event": "base_eval", "base_eval_loss"}  before the first update (B = 0: the base's loss)
- {"event": "metrics", "loss", "learning_rate", "grad_norm", "epoch"}  every logging_steps
- {"event": "eval", "eval_loss"}  every save_steps and at the last step (when there is an eval split)
- {"event": "checkpoint", "path"}  every save_steps
- {"event": "state", "state": "succeeded", "adapter": path, "tokens": tokens trained on}
- {"event": "state", "state": "failed", "reason", "checkpoint": path or None}  (no checkpoint key
  when add() itself failed: unreadable data or resume checkpoint)
- {"event": "state", "state": "cancelled", "checkpoint": path or None}

Files under a job's output_dir: `checkpoint-<step>/` (adapter_config.json,
adapter_model.safetensors, optimizer.pt, scheduler.pt, packed_state.json; the last two kept) and
`adapter/` (the final adapter, the same files and keys as a trl job's).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from lorafleet.spec import QuantizationSpec
from lorafleet.train.packed_data import IGNORE, Row, collate, loss_tokens, tokenize
from lorafleet.train.packed_job import EventSink, PackedJob, install, notify, peft_config, uninstall
from lorafleet.train.packed_lora import LoraPair, PackedRows, Segment, wrap_linears
from lorafleet.train.packed_memory import estimate_job_bytes, jobs_that_fit
from lorafleet.train.progress import InjectedFault
from lorafleet.train.worker import JobPlan, lora_config

__all__ = ["PackedTrainer", "PackingError", "estimate_job_bytes", "jobs_that_fit"]
log = logging.getLogger(__name__)


class PackingError(ValueError):
    """A job that cannot join this trainer (another base, DoRA, DeepSpeed, no room)."""


class PackedTrainer:
    def __init__(
        self,
        base_model: str,
        quantization: QuantizationSpec,
        *,
        device: str = "cpu",
        max_jobs: int = 4,
        base_fingerprint: str | None = None,
        gradient_checkpointing: bool = True,
        max_padding: float = 0.25,
    ):
        from lorafleet.models import compute_dtype, fingerprint, load_base, load_tokenizer, resolve_base
        from lorafleet.train.worker import check_base

        path = resolve_base(base_model)
        if base_fingerprint is not None:
            check_base(path, base_fingerprint)
        self.base_model, self.quantization, self.device = base_model, quantization, device
        self.fingerprint = base_fingerprint or fingerprint(path)
        self.max_jobs, self.max_padding = max_jobs, max_padding
        self.tokenizer = load_tokenizer(path)
        self.model = load_base(path, quantization, device)
        if device == "cpu":
            from lorafleet.train.worker import keep_4bit_layout

            keep_4bit_layout(self.model)  # its step-0 base eval would repack the weights for inference
        self.model.requires_grad_(False)
        self.model.config.use_cache = False
        self.rows = PackedRows()
        self.layers = wrap_linears(self.model, self.rows)
        if gradient_checkpointing:
            self.model.activation_checkpointing_enable({"use_reentrant": False})
        self.model.train()
        dtype = compute_dtype(quantization.compute_dtype, device.startswith("cuda"))
        # the dtype trl leaves LoRA weights in: bf16 on a bf16 QLoRA base, else fp32 (peft's autocast)
        self.lora_dtype = dtype if quantization.load_in_4bit else torch.float32
        self.jobs: dict[str, PackedJob] = {}
        self.pending: list[PackedJob] = []
        self._cancelled: set[str] = set()
        self.batch_tokens = 0  # rows x padded length of every training forward: the base's work
        # jobs whose shared forward failed while each ran alone (e.g. out of memory together):
        # they train alone from then on, instead of failing together again at every step
        self.apart: set[str] = set()

    # ---- public surface ---------------------------------------------------------------------

    def add(
        self,
        plan: JobPlan,
        output_dir: str | Path,
        resume_from: str | Path | None = None,
        on_event: EventSink | None = None,
    ) -> str:
        """Prepare a job to join at the next step: 'pending', or 'failed' (its data or checkpoint
        could not be read; the event says why). Raises PackingError if it can never pack here."""
        self._check_packable(plan)
        job: PackedJob | None = None
        try:
            job = self._build_job(plan, Path(output_dir), on_event)
            if resume_from is not None:
                job.load_checkpoint(Path(resume_from))
        except Exception as exc:
            reason = f"{type(exc).__name__}: {exc}"
            if job is not None:
                uninstall(job.pairs, self.layers, job.key)
            notify(
                on_event,
                plan.job.customer,
                {"event": "state", "state": "failed", "step": 0, "reason": reason},
            )
            return "failed"
        self.pending.append(job)
        return "pending"

    def cancel(self, customer: str) -> bool:
        """Remove a job at the next step (its last checkpoint stays); False if it is not here."""
        known = customer in self.jobs or any(j.key == customer for j in self.pending)
        if known:
            self._cancelled.add(customer)
        return known

    def estimate_bytes(self, plan: JobPlan) -> int:
        """Rough memory one more job takes here (see estimate_job_bytes)."""
        layers = [(self.layers[n].in_features, self.layers[n].out_features) for n in self.targets(plan)]
        return estimate_job_bytes(plan, self.model.config, layers, self.device.startswith("cuda"))

    def has_room(self) -> bool:
        return len(self.jobs) + len(self.pending) < self.max_jobs

    def active(self) -> list[str]:
        return list(self.jobs) + [j.key for j in self.pending]

    def step(self) -> int:
        """One micro-step of every running job; returns how many jobs remain (running + pending)."""
        self._apply_cancels()
        self._admit()
        parts = self._gather()
        if parts:
            self._train(parts)
        return len(self.jobs) + len(self.pending)

    def run(self) -> None:
        while self.step():
            pass

    # ---- joining and leaving ----------------------------------------------------------------

    def _check_packable(self, plan: JobPlan) -> None:
        job = plan.job
        problems = []
        if plan.base_fingerprint != self.fingerprint:
            problems.append(
                f"base fingerprint {plan.base_fingerprint} is not this trainer's {self.fingerprint}"
            )
        if job.quantization != self.quantization:
            problems.append("its quantization differs from the loaded base's")
        if job.lora.use_dora:
            problems.append("DoRA is not packed")
        if job.training.deepspeed is not None or job.resources.workers > 1:
            problems.append("DeepSpeed or several workers need a run of their own")
        if job.customer in self.active():
            problems.append("a job of this customer is already here")
        if not self.has_room():
            problems.append(f"all {self.max_jobs} places are taken")
        if problems:
            raise PackingError(f"{job.customer} cannot join this packed trainer: " + "; ".join(problems))

    def _build_job(self, plan: JobPlan, output_dir: Path, on_event: EventSink | None) -> PackedJob:
        from lorafleet.data import job_splits

        job, t = plan.job, plan.job.training  # the data validated, or this job fails (as in its own run)
        train_ds, eval_ds = job_splits(job.dataset, job.format, t.eval_fraction, t.seed, plan.dataset_sha256)
        train = tokenize(train_ds, self.tokenizer, t.max_length)
        evals = tokenize(eval_ds, self.tokenizer, t.max_length) if eval_ds is not None else []
        if not train:
            raise ValueError("no training example keeps a loss token after truncation at max_length")
        pairs = self._new_pairs(plan)
        install(pairs, self.layers, plan.job.customer)
        return PackedJob(plan, output_dir, (train, evals), pairs, on_event)

    def targets(self, plan: JobPlan) -> list[str]:
        """The base's linear layers a job's LoRA targets, matched as peft matches them."""
        from peft.tuners.tuners_utils import check_target_module_exists

        from lorafleet.models import target_matches

        config = lora_config(plan.job)
        if isinstance(config.target_modules, str) and config.target_modules.lower() == "all-linear":
            return list(self.layers)
        names = [n for n in self.layers if check_target_module_exists(config, n)]
        # each target on its own: one that is no linear layer (embed_tokens, lm_head) was left out
        # silently beside one that is, and the job trained another adapter than it would alone
        alone = [t for t in config.target_modules if not any(target_matches(n, t) for n in names)]
        if alone or not names:
            raise ValueError(
                f"target_modules {sorted(alone or config.target_modules)} match no linear layer packed "
                "training holds (it trains linear layers, not the embedding or the output head); "
                "train this job in a run of its own with packing: false"
            )
        return names

    def _new_pairs(self, plan: JobPlan) -> dict[str, LoraPair]:
        lora = plan.job.lora
        scaling = lora.alpha / (lora.rank**0.5 if lora.use_rslora else lora.rank)
        gen = torch.Generator().manual_seed(plan.job.training.seed)
        pairs = {}
        for name in self.targets(plan):
            layer = self.layers[name]
            pair = LoraPair(
                layer.in_features,
                layer.out_features,
                lora.rank,
                scaling,
                lora.dropout,
                dtype=self.lora_dtype,
                device=self.device,
            )
            pair.reset(gen)
            pairs[name] = pair
        return pairs

    def _admit(self) -> None:
        while self.pending and len(self.jobs) < self.max_jobs:
            job = self.pending.pop(0)
            self.jobs[job.key] = job
            mates = [k for k in self.jobs if k != job.key]
            resumed = job.step > 0
            job.emit("state", state="running", max_steps=job.max_steps, resumed=resumed, packed_with=mates)
            if not resumed and job.eval_rows:
                try:
                    job.emit("base_eval", base_eval_loss=self._evaluate(job))
                except Exception as exc:
                    self._fail(job, exc)

    def _apply_cancels(self) -> None:
        for key in list(self._cancelled):
            self._cancelled.discard(key)  # one by one: cancel() may be called from another thread
            job = self.jobs.get(key) or next((j for j in self.pending if j.key == key), None)
            if job is not None:
                self._leave(job)
                job.emit("state", state="cancelled", checkpoint=_str(job.last_checkpoint))

    def _leave(self, job: PackedJob) -> None:
        uninstall(job.pairs, self.layers, job.key)
        self.jobs.pop(job.key, None)
        self.apart.discard(job.key)
        if job in self.pending:
            self.pending.remove(job)

    def _fail(self, job: PackedJob, exc: BaseException) -> None:
        log.warning("packed job %s failed at step %d: %s", job.key, job.step, exc)
        self._leave(job)
        reason = f"{type(exc).__name__}: {exc}"
        job.emit("state", state="failed", reason=reason, checkpoint=_str(job.last_checkpoint))

    # ---- one micro-step ---------------------------------------------------------------------

    def _gather(self) -> list[tuple[PackedJob, list[Row]]]:
        parts = []
        for job in list(self.jobs.values()):
            try:
                parts.append((job, job.next_micro()))
            except Exception as exc:
                self._fail(job, exc)
        return parts

    def _forward(self, parts: list[tuple[PackedJob, list[Row]]], dropout: bool) -> tuple[Any, torch.Tensor]:
        """Token losses (B, T-1) of one packed batch; the segments stay set for the backward."""
        segments, rows, start = [], [], 0
        for job, job_rows in parts:
            length = max(len(r.input_ids) for r in job_rows)
            seed = job.dropout_seed() if dropout else 0
            segments.append(Segment(job.key, start, start + len(job_rows), length, seed))
            rows += job_rows
            start += len(job_rows)
        batch = collate(rows, max(s.length for s in segments), self.tokenizer.pad_token_id)
        if dropout:  # a training forward
            self.batch_tokens += batch["input_ids"].numel()
        batch = {k: v.to(self.device) for k, v in batch.items()}
        self.rows.segments = segments
        logits = self.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        labels = batch["labels"][:, 1:]
        flat = F.cross_entropy(
            logits[:, :-1].flatten(0, 1).float(), labels.flatten(), ignore_index=IGNORE, reduction="none"
        )
        return segments, flat.view(labels.shape)

    def job_losses(
        self, parts: list[tuple[PackedJob, list[Row]]], segments: list[Segment], tokens: torch.Tensor
    ) -> list[torch.Tensor]:
        """Each job's loss: its token-loss sum over its own loss tokens (of its accumulation
        window), never over the batch's: so its gradients are the ones it would get alone."""
        return [
            tokens[s.start : s.stop].sum() / job.window_tokens
            for (job, _), s in zip(parts, segments, strict=True)
        ]

    def _train(self, parts: list[tuple[PackedJob, list[Row]]]) -> None:
        results = []
        together = [p for p in parts if p[0].key not in self.apart]
        alone = [[p] for p in parts if p[0].key in self.apart]
        for group in length_groups(together, self.max_padding) + alone:
            results += self._isolated(group)
        for job, loss, ok in results:
            try:  # from here on, an error is one job's
                if not ok:
                    raise FloatingPointError(f"non-finite loss ({loss.item()}) at step {job.step + 1}")
                self._after_micro(job, loss.item())
            except Exception as exc:
                self._fail(job, exc)

    def _isolated(self, group: list[tuple[PackedJob, list[Row]]]) -> list[tuple[PackedJob, Any, bool]]:
        """_train_group, with an error inside the shared forward or backward (a token id past the
        embedding, out of memory on one job's batch) traced to its job: the group's gradients are
        put back as they were and each job runs again alone, on the same rows with the same
        dropout seed, so its gradient is the one it would get alone. A job that fails alone
        fails; the others go on. Before, the error left the step and the slot failed every job.
        When every job passes alone, the combination was the trouble: they train apart from then
        on rather than pay a failed forward at every step."""
        saved = _grads(group)
        try:
            return self._train_group(group)
        except Exception as exc:
            self._raise_if_device_broken(exc)
            _restore(saved)
            if len(group) == 1:
                self._fail(group[0][0], exc)
                return []
            log.warning("a packed forward of %d jobs failed (%s): each runs alone", len(group), exc)
        results = []
        for part in group:
            saved = _grads([part])
            try:
                results += self._train_group([part])
            except Exception as exc:
                self._raise_if_device_broken(exc)
                _restore(saved)
                self._fail(part[0], exc)
        if len(results) == len(group):  # no culprit: it is the combination (its memory, say)
            self.apart |= {job.key for job, _ in group}
            log.warning("jobs %s train apart from now on", sorted(job.key for job, _ in group))
        return results

    def _raise_if_device_broken(self, exc: Exception) -> None:
        """A CUDA error that sticks (a device-side assert, an illegal memory access) fails every
        later call in this process: no job can be told from another then, so the error leaves
        the step (DeviceBrokenError) and the slot's process restarts: its jobs resume from their
        checkpoints one at a time, so a job that breaks the device again is found alone."""
        if not self.device.startswith("cuda"):
            return
        try:
            torch.cuda.synchronize(self.device)
        except Exception:
            raise DeviceBrokenError(f"the device is unusable after: {type(exc).__name__}: {exc}") from exc

    def _train_group(self, parts: list[tuple[PackedJob, list[Row]]]) -> list[tuple[PackedJob, Any, bool]]:
        """Forward and backward of one group; each job is in one group, so its gradients are whole."""
        try:
            segments, tokens = self._forward(parts, dropout=True)
            losses = self.job_losses(parts, segments, tokens)
            finite = [bool(torch.isfinite(loss)) for loss in losses]
            kept = [loss for loss, ok in zip(losses, finite, strict=True) if ok]
            if kept:
                torch.stack(kept).sum().backward()
        finally:
            # only now: checkpointed layers recompute in the backward with the same jobs' adapters
            self.rows.segments = []
        return [(job, loss, ok) for (job, _), loss, ok in zip(parts, losses, finite, strict=True)]

    def _after_micro(self, job: PackedJob, loss: float) -> None:
        if not job.micro_done(loss):
            return
        job.optimizer_step()
        t = job.plan.job.training
        if job.step % t.logging_steps == 0:
            job.log_metrics()
        if job.plan.fail_at_step == job.step:
            raise InjectedFault(f"injected fault at step {job.step}")
        last = job.step >= job.max_steps
        if job.eval_rows and (job.step % t.save_steps == 0 or last):
            job.emit("eval", eval_loss=self._evaluate(job))
        config = peft_config(job.plan, list(job.pairs), str(self.model.name_or_path))
        if job.step % t.save_steps == 0:
            job.emit("checkpoint", path=str(job.save_checkpoint(config)))
        if last:
            adapter = job.save_adapter(job.out / "adapter", config)
            self._leave(job)
            job.emit("state", state="succeeded", adapter=str(adapter), tokens=job.tokens)

    @torch.no_grad()
    def _evaluate(self, job: PackedJob) -> float:
        """Mean token loss per eval batch, averaged over rows (as transformers' evaluation loop)."""
        self.model.eval()
        total, rows = 0.0, 0
        size = job.plan.job.training.batch_size
        try:
            for i in range(0, len(job.eval_rows), size):
                batch = job.eval_rows[i : i + size]
                _, tokens = self._forward([(job, batch)], dropout=False)
                n = max(loss_tokens(batch), 1)
                total += float(tokens.sum()) / n * len(batch)
                rows += len(batch)
        finally:
            self.rows.segments = []
            self.model.train()
        return total / max(rows, 1)


def _grads(group: list[tuple[PackedJob, list[Row]]]) -> list[tuple[torch.Tensor, torch.Tensor | None]]:
    """The group's jobs' accumulated gradients (None between windows: nothing to copy), to put
    back when a backward fails part-way."""
    return [(p, None if p.grad is None else p.grad.clone()) for job, _ in group for p in job.params]


def _restore(saved: list[tuple[torch.Tensor, torch.Tensor | None]]) -> None:
    for param, grad in saved:
        param.grad = grad


class DeviceBrokenError(RuntimeError):
    """The device failed in a way that outlives the call (sticky CUDA errors): only a new process helps."""


def length_groups(
    parts: list[tuple[PackedJob, list[Row]]], max_padding: float
) -> list[list[tuple[PackedJob, list[Row]]]]:
    """The step's jobs in forwards of similar lengths: jobs sorted by their own padded length, a new
    forward started where one more job would make more than `max_padding` of the batch's tokens
    padding beyond what the jobs pay alone (measured on the tiny base, 8 demo jobs: one forward for
    all ran the base over 1.35x the tokens, and cost 1.15x the CPU time of one job at a time)."""

    def cost(part: tuple[PackedJob, list[Row]]) -> tuple[int, int]:
        rows = part[1]
        return len(rows), max(len(r.input_ids) for r in rows)

    groups: list[list[tuple[PackedJob, list[Row]]]] = []
    own = batch_rows = 0
    for part in sorted(parts, key=lambda p: cost(p)[1]):
        rows, length = cost(part)
        padded = (batch_rows + rows) * length  # sorted: this job's length is the group's longest
        if groups and padded - (own + rows * length) <= max_padding * padded:
            groups[-1].append(part)
            own, batch_rows = own + rows * length, batch_rows + rows
        else:
            groups.append([part])
            own, batch_rows = rows * length, rows
    return groups


def _str(path: Path | None) -> str | None:
    return None if path is None else str(path)
