"""Check a whole fleet before any GPU time: the spec, the base, and every job's dataset."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lorafleet.data import DatasetReport, inspect_dataset, read_dataset
from lorafleet.errors import LorafleetError
from lorafleet.models import (
    WEIGHT_SUFFIXES,
    context_length,
    fingerprint,
    load_tokenizer,
    matrix_modules,
    resolve_base,
    target_matches,
    vocab_size,
    weight_files,
)
from lorafleet.spec import FleetSpec, JobSpec, load_fleet, resolve_jobs


@dataclass
class FleetCheck:
    fleet: FleetSpec
    jobs: list[JobSpec]
    base_path: Path
    base_fingerprint: str
    tokenizer: Any
    reports: dict[str, DatasetReport] = field(default_factory=dict)
    errors: dict[str, str] = field(default_factory=dict)  # customer -> what is wrong with its data

    def ok(self) -> bool:
        return not self.errors

    def own_run_reasons(self) -> dict[str, str | None]:
        """customer -> why the job trains in a Ray Train run of its own (None: in a warm slot)."""
        return {job.customer: own_run_reason(self.fleet, job) for job in self.jobs}


def own_run_reason(fleet: FleetSpec, job: JobSpec) -> str | None:
    """Why a job cannot share a warm slot, None if it can. A slot holds one copy of the fleet's
    base, quantised as the fleet defaults say, on one worker sized as the defaults say."""
    slot = fleet.defaults
    res = job.resources
    if not fleet.packing.enabled:
        return "packing.enabled is false"
    if not job.packing:
        return "the job sets packing: false"
    if res.workers > 1:
        return f"resources.workers is {res.workers}: data-parallel jobs need a run of their own"
    if job.training.deepspeed is not None:
        return f"DeepSpeed ({job.training.deepspeed}) needs a run of its own"
    if job.lora.use_dora:
        return "DoRA adapters are not trained packed"
    if job.quantization != slot.quantization:
        return "its quantization differs from the fleet defaults (the slot's base copy)"
    if (res.cpus_per_worker, res.gpus_per_worker) != (
        slot.resources.cpus_per_worker,
        slot.resources.gpus_per_worker,
    ):
        return "its cpus/gpus per worker differ from the fleet defaults (the slot's size)"
    return None


@dataclass
class BaseFacts:
    """What the checks need of the base: read once, before any job's."""

    path: Path
    fingerprint: str
    tokenizer: Any
    modules: dict[str, tuple[int, int]]  # every weight matrix and its shape
    context: int | None
    vocab: int | None  # the embedding's rows (config.json vocab_size): token ids must stay below


def check_fleet(fleet_file: str | Path) -> FleetCheck:
    """Spec errors raise (nothing can run); data errors are collected per job (the rest can). A
    base that cannot be read raises too, after reading every dataset, so one pass names them all."""
    fleet_file = Path(fleet_file)
    fleet = load_fleet(fleet_file)
    jobs = resolve_jobs(fleet, fleet_file)
    try:
        base = inspect_base(fleet.base_model)
    except LorafleetError as exc:
        raise LorafleetError("\n".join([f"base_model: {exc}", *_unread_datasets(jobs)])) from None
    check = FleetCheck(fleet, jobs, base.path, base.fingerprint, base.tokenizer)
    for job in jobs:
        try:
            if problem := targets_problem(job, base.modules, base.vocab):
                raise LorafleetError(problem)
            t = job.training
            report = inspect_dataset(
                job.dataset, job.format, check.tokenizer, t.max_length, t.eval_fraction, t.seed, base.vocab
            )
            if problem := context_problem(job, report, base.context):
                raise LorafleetError(problem)
            check.reports[job.customer] = report
        except LorafleetError as exc:
            check.errors[job.customer] = str(exc)
    return check


def inspect_base(name: str) -> BaseFacts:
    """The base's path, fingerprint, tokenizer, weight matrices and context. A folder that is not
    a whole model (no weights, no tokenizer, an unreadable file) is an error naming it here: it
    was a transformers traceback, or passed and failed in every job's worker."""
    path = resolve_base(name)
    if not weight_files(path):
        raise LorafleetError(f"{path} holds no weights ({' or '.join(WEIGHT_SUFFIXES)} files)")
    try:
        tokenizer = load_tokenizer(path)
        digest, modules = fingerprint(path), matrix_modules(path)
    except Exception as exc:  # transformers, tokenizers and json raise many kinds for a broken folder
        why = " ".join(str(exc).split())[:300]
        raise LorafleetError(
            f"{path} cannot be read as a model ({type(exc).__name__}: {why}); a base folder needs "
            "config.json, its tokenizer files (tokenizer.json or tokenizer_config.json) and its weights"
        ) from None
    return BaseFacts(path, digest, tokenizer, modules, context_length(path), vocab_size(path))


def _unread_datasets(jobs: list[JobSpec]) -> list[str]:
    """The datasets' own errors (reading and format; measuring them needs the base's tokenizer)."""
    errors = []
    for i, job in enumerate(jobs):
        try:
            read_dataset(job.dataset, job.format)
        except LorafleetError as exc:
            errors.append(f"jobs[{i}] ({job.customer}): {exc}")
    return errors


def targets_problem(job: JobSpec, modules: dict[str, tuple[int, int]], vocab: int | None) -> str | None:
    """Target module names none of the base's modules answers to (peft's rule: the whole name,
    or its last dotted parts), or that name the embedding or the output head (a matrix with a row
    per token): the endpoint serves LoRA on linear layers only, so such an adapter trained and
    could never be served. Found here rather than when the job's adapter is built."""
    targets = job.lora.target_modules
    if targets == "all-linear" or not modules:
        return None

    def hits(target: str, names: Iterable[str]) -> list[str]:
        return [m for m in names if target_matches(m, target)]

    missing = [t for t in targets if not hits(t, modules)]
    if missing:
        kinds = sorted({m.rsplit(".", 1)[-1] for m in modules})
        return f"lora.target_modules {missing} match no module of the base; its modules end in {kinds}"
    per_token = [m for m, shape in modules.items() if vocab is not None and shape[0] == vocab]
    if heads := [t for t in targets if hits(t, per_token)]:
        return (
            f"lora.target_modules {heads} name the embedding or the output head; the endpoint serves "
            "LoRA on linear layers only: target the projections inside the layers (q_proj, v_proj, ...) "
            "or all-linear"
        )
    return None


def context_problem(job: JobSpec, report: DatasetReport, context: int | None) -> str | None:
    """Examples longer than the base's context, kept whole by a max_length above it."""
    max_length = job.training.max_length
    if context is None or max_length <= context or report.tokens_max <= context:
        return None
    return (
        f"an example has {report.tokens_max} tokens and training.max_length {max_length} keeps them, but "
        f"the base's context is {context} tokens: lower training.max_length to {context} or less"
    )
