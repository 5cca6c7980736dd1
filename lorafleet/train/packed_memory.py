"""How many packed jobs fit: a rough per-job memory estimate (LoRA weights, gradients, optimizer
state, activations of one micro-batch) and a budget check, for choosing K."""

from __future__ import annotations

from typing import Any

from lorafleet.train.plan import JobPlan


def estimate_job_bytes(plan: JobPlan, config: Any, in_out: list[tuple[int, int]], on_gpu: bool) -> int:
    """Rough bytes one packed job adds: LoRA weights + grads, optimizer state, and activations of
    a micro-batch (batch_size x max_length). `in_out` = (in, out) of each layer it targets;
    `config` = the base's transformers config. With gradient checkpointing each layer keeps its
    input, and one layer's full activations (~8 hidden + 4 intermediate values a token) live at a
    time; logits and their gradient take 2 x vocab floats a token."""
    t, lora = plan.job.training, plan.job.lora
    params = sum(lora.rank * (i + o) for i, o in in_out)
    weight_bytes = 2 if on_gpu and plan.job.quantization.load_in_4bit else 4
    optim = 2 if "8bit" in t.optimizer else 8
    tokens = t.batch_size * t.max_length
    act = 2 if on_gpu else 4
    layer = tokens * (8 * config.hidden_size + 4 * config.intermediate_size) * act
    layers = config.num_hidden_layers * tokens * config.hidden_size * act
    if not t.gradient_checkpointing:
        layers = config.num_hidden_layers * layer
    logits = 2 * tokens * config.vocab_size * 4
    return params * (2 * weight_bytes + optim) + layer + layers + logits


def jobs_that_fit(budget_bytes: int, job_bytes: list[int], max_jobs: int) -> int:
    """How many of the queued jobs (in order) fit in `budget_bytes` beside the base, at most max_jobs."""
    used, n = 0, 0
    for b in job_bytes[:max_jobs]:
        if used + b > budget_bytes:
            break
        used, n = used + b, n + 1
    return n
