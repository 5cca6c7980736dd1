"""The fleet file: one YAML naming a base model and its customers, validated by pydantic.

Defaults apply to every job; each job may override any field of any section. Every error
names the file and the dotted path of the bad field, e.g.
``fleet.yaml: jobs[2].training.learning_rate: Input should be greater than 0 (got -0.0001)``.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import json
import re
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from lorafleet.errors import SpecError
from lorafleet.limits import MAX_SERVE_RANK, PREFIX_RULE, Flag, Real, Whole, check_name

SLUG = re.compile(r"[a-z0-9][a-z0-9-]{0,62}")  # fullmatch: `$` alone would let a final newline in


# The transformers optimizers that run with this project's dependencies alone (torch and
# bitsandbytes; no layer-wise, GaLore, APOLLO, LOMO, schedule-free or XLA/NPU ones): a name
# outside these failed only when the job's trainer was built, after the fleet had started.
OPTIMIZERS = (
    "paged_adamw_8bit",
    "paged_adamw_32bit",
    "adamw_8bit",
    "adamw_bnb_8bit",
    "adamw_torch",
    "adamw_torch_fused",
    "adafactor",
    "sgd",
    "adagrad",
    "rmsprop",
    "rmsprop_bnb",
    "rmsprop_bnb_8bit",
    "rmsprop_bnb_32bit",
    "lion_8bit",
    "lion_32bit",
    "paged_lion_8bit",
    "paged_lion_32bit",
    "ademamix",
    "ademamix_8bit",
    "paged_ademamix_8bit",
    "paged_ademamix_32bit",
)
Optimizer = Literal[OPTIMIZERS]


# DeepSpeed presets ship inside the package so a wheel install resolves them too. The files are copies
# of configs/deepspeed (the source of truth a reader looks at); tests/test_deepspeed.py fails when
# the two differ (fix: cp configs/deepspeed/*.json lorafleet/presets/deepspeed/).
def deepspeed_presets() -> dict[str, Path]:
    """Preset name -> its JSON file in the installed package."""
    from importlib.resources import files

    folder = files("lorafleet") / "presets" / "deepspeed"
    return {
        f.name.removesuffix(".json"): Path(str(f))
        for f in sorted(folder.iterdir(), key=lambda f: f.name)
        if f.name.endswith(".json")
    }


def _looks_like_path(ref: str) -> bool:
    return ref.endswith(".json") or "/" in ref


def deepspeed_file(ref: str, relative_to: Path | None = None) -> Path:
    """A preset name or a JSON path (relative paths against `relative_to`) -> the file."""
    if not _looks_like_path(ref):
        return deepspeed_presets()[ref]
    path = Path(ref).expanduser()
    if not path.is_absolute() and relative_to is not None:
        path = relative_to / path
    return path.resolve()


def load_deepspeed(ref: str) -> dict[str, Any]:
    """The DeepSpeed config a job names; a SpecError says which file is missing or malformed."""
    path = deepspeed_file(ref)
    try:
        config = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise SpecError(f"DeepSpeed config {path}: {exc}") from None
    if not isinstance(config, dict):
        raise SpecError(f"DeepSpeed config {path}: expected a JSON object")
    return config


def zero_stage(config: dict[str, Any]) -> int:
    return int(config.get("zero_optimization", {}).get("stage", 0))


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)


class LoraSpec(_Strict):
    rank: Whole = Field(
        16,
        gt=0,
        description="LoRA rank r; higher learns more, costs "
        f"memory; at most {MAX_SERVE_RANK}, the largest the endpoint serves",
    )
    alpha: Real = Field(32, gt=0, le=4096, description="LoRA alpha; the update is scaled by alpha/rank")
    dropout: Real = Field(0.05, ge=0, lt=1, description="dropout on the LoRA input")
    target_modules: Literal["all-linear"] | list[str] = Field(
        "all-linear",
        description=(
            "'all-linear' or a list of the base's linear module names, e.g. [q_proj, v_proj] (not the "
            "embedding or the output head: the endpoint serves LoRA on linear layers)"
        ),
    )
    use_dora: Flag = Field(False, description="weight-decomposed LoRA (DoRA)")
    use_rslora: Flag = Field(False, description="rank-stabilised scaling alpha/sqrt(rank)")

    @field_validator("target_modules", mode="before")
    @classmethod
    def _module_list(cls, v: Any) -> Any:
        # peft reads one string as a regular expression over whole module names: `q_proj` alone
        # then matches nothing, so a single name must be a list
        if isinstance(v, str) and v != "all-linear":
            raise ValueError(f"give a list of module names, e.g. [{v}], or 'all-linear'")
        if isinstance(v, list) and not v:
            raise ValueError("an empty list trains nothing; name modules, e.g. [q_proj, v_proj]")
        if isinstance(v, list) and not all(isinstance(name, str) and name.strip() for name in v):
            raise ValueError("each module name must be a non-empty string")
        return v

    @field_validator("rank")
    @classmethod
    def _servable(cls, v: int) -> int:
        # a job the endpoint would refuse must not train, register and get promoted first
        if v > MAX_SERVE_RANK:
            raise ValueError(
                f"must be <= {MAX_SERVE_RANK}, the largest rank the endpoint serves "
                "(lorafleet.limits.MAX_SERVE_RANK); lower the rank"
            )
        return v


class QuantizationSpec(_Strict):
    load_in_4bit: Flag = Field(True, description="load the base in 4 bits (QLoRA); false = full")
    quant_type: Literal["nf4", "fp4"] = Field("nf4", description="4-bit data type")
    double_quant: Flag = Field(True, description="quantise the quantisation constants too")
    compute_dtype: Literal["auto", "bfloat16", "float16", "float32"] = Field(
        "auto", description="'auto' = bfloat16 on a GPU, float32 on a CPU"
    )


class TrainingSpec(_Strict):
    epochs: Real = Field(1.0, gt=0, le=1000, description="passes over the data (if no max_steps)")
    max_steps: Whole | None = Field(None, gt=0, le=1_000_000, description="optimizer steps; wins over epochs")
    learning_rate: Real = Field(2e-4, gt=0, le=1, description="peak learning rate")
    lr_scheduler: Literal["linear", "cosine", "constant", "constant_with_warmup"] = "cosine"
    warmup_ratio: Real = Field(0.03, ge=0, lt=1, description="fraction of steps warming up")
    batch_size: Whole = Field(8, gt=0, le=4096, description="examples per device per step")
    gradient_accumulation: Whole = Field(1, gt=0, le=4096, description="micro-batches per optimizer step")
    max_length: Whole = Field(
        512, gt=8, le=1_048_576, description="tokens per example; longer ones truncated (at most the base's)"
    )
    optimizer: Optimizer = Field(
        "paged_adamw_8bit", description="a transformers optimizer that needs only torch and bitsandbytes"
    )
    eval_fraction: Real = Field(0.1, ge=0, lt=0.9, description="held-out share for eval loss")
    seed: Whole = Field(0, ge=0, le=2**32 - 1, description="data order, dropout and init (numpy's range)")
    save_steps: Whole = Field(50, gt=0, le=1_000_000, description="checkpoint every N steps (resume point)")
    logging_steps: Whole = Field(5, gt=0, le=1_000_000)
    gradient_checkpointing: Flag = True
    deepspeed: str | None = Field(
        None,
        description="DeepSpeed preset (zero2, zero3; see configs/deepspeed) or a path to a DeepSpeed "
        "JSON file, relative to the fleet file",
    )

    @field_validator("deepspeed")
    @classmethod
    def _known_preset(cls, v: str | None) -> str | None:
        if v is not None and not _looks_like_path(v) and v not in deepspeed_presets():
            raise ValueError(
                f"unknown DeepSpeed preset '{v}'; presets: {', '.join(deepspeed_presets())}, "
                "or give a path to a DeepSpeed JSON file"
            )
        return v


class ResourcesSpec(_Strict):
    workers: Whole = Field(1, gt=0, le=1024, description="Ray Train workers (data parallel) for one job")
    gpus_per_worker: Real = Field(0, ge=0, le=64, description="fractions share a GPU, e.g. 0.25")
    cpus_per_worker: Real = Field(1, gt=0, le=1024)
    max_failures: Whole = Field(
        0, ge=0, le=100, description="restarts from the last checkpoint after a crash"
    )

    @field_validator("gpus_per_worker")
    @classmethod
    def _whole_or_fraction(cls, v: float) -> float:
        if v > 1 and v != int(v):
            raise ValueError(f"above 1 GPU must be a whole number (got {v})")
        return v

    @model_validator(mode="after")
    def _one_gpu_per_rank(self) -> ResourcesSpec:
        # Ray packs fractional GPUs onto the same device, and NCCL refuses two ranks of one process
        # group on one GPU ("Duplicate GPU detected"): a data-parallel job needs whole GPUs.
        if self.workers > 1 and 0 < self.gpus_per_worker < 1:
            raise ValueError(
                f"{self.workers} workers with gpus_per_worker {self.gpus_per_worker}: NCCL cannot run two "
                "ranks of one job on one GPU; use gpus_per_worker: 1 (or more), or workers: 1 to share a "
                "GPU between jobs"
            )
        return self


class RegistrySpec(_Strict):
    model_prefix: str = Field(
        "",
        max_length=128,  # MLflow's model name column holds 256: prefix + customer (63) must fit
        description="registered model name = prefix + customer; letters, digits, "
        "'.', '_', '-' (the endpoint's adapter_prefix must match it)",
    )

    @field_validator("model_prefix")
    @classmethod
    def _prefix(cls, v: str) -> str:
        return check_name("model_prefix", v, PREFIX_RULE)

    auto_promote: Literal["never", "always", "if-better"] = Field(
        "never", description="move the 'production' alias to each new version"
    )


class PackingSpec(_Strict):
    """Warm slots: long-lived Ray Train runs that load the base once and train the fleet's jobs
    one after another (several at once where packed training is available). Jobs that cannot
    share a slot (several workers, DeepSpeed, another quantisation or per-worker resources than
    the fleet defaults) train in a Ray Train run of their own; `lorafleet validate` lists which."""

    enabled: Flag = Field(
        True, description="train eligible jobs in warm slots; false: one Ray Train run per job"
    )
    max_jobs_per_slot: Whole | None = Field(
        None, gt=0, le=64, description="K, the jobs one slot trains at once; default: from memory"
    )
    slots: Whole | None = Field(
        None,
        gt=0,
        le=1024,
        description="slots to start; default: as many as the cluster holds (each asks for one job's "
        "resources), at most one per slot job",
    )
    keep_warm_s: Real = Field(
        0.0,
        ge=0,
        le=3600,
        description="after the fleet's jobs end, its slots wait this long (base loaded, resources "
        "held) for the next submission on the same Ray cluster (from this process or a later "
        "`lorafleet submit` joining it) with the same base, quantisation, slot size, K and storage "
        "path, whose jobs then start at once; 0: slots end with the fleet",
    )


class Defaults(_Strict):
    lora: LoraSpec = LoraSpec()
    quantization: QuantizationSpec = QuantizationSpec()
    training: TrainingSpec = TrainingSpec()
    resources: ResourcesSpec = ResourcesSpec()


class Overrides(_Strict):
    """Per-job overrides: any subset of any section's fields."""

    lora: dict[str, Any] = Field(default_factory=dict)
    quantization: dict[str, Any] = Field(default_factory=dict)
    training: dict[str, Any] = Field(default_factory=dict)
    resources: dict[str, Any] = Field(default_factory=dict)


class JobEntry(Overrides):
    customer: Annotated[str, Field(description="customer id: lower-case slug, unique")]
    dataset: Annotated[str, Field(min_length=1, description="path (relative to the fleet file) or URI")]
    format: Literal["auto", "chat", "prompt_completion", "text", "csv", "parquet"] = "auto"
    packing: Flag = Field(True, description="false: this job trains in a Ray Train run of its own")

    @field_validator("customer")
    @classmethod
    def _slug(cls, v: str) -> str:
        if not isinstance(v, str) or not SLUG.fullmatch(v):
            raise ValueError(f"{v!r} is not a slug: use a-z, 0-9 and '-', starting alphanumeric")
        return v


class FleetSpec(_Strict):
    name: str = Field(description="fleet name (slug); names the MLflow experiment runs")
    base_model: str = Field(description="'tiny-llama', a local HF model folder, or a hub id")
    defaults: Defaults = Defaults()
    registry: RegistrySpec = RegistrySpec()
    packing: PackingSpec = PackingSpec()
    jobs: list[JobEntry] = Field(min_length=1)

    @field_validator("name")
    @classmethod
    def _slug(cls, v: str) -> str:
        if not isinstance(v, str) or not SLUG.fullmatch(v):
            raise ValueError(f"{v!r} is not a slug: use a-z, 0-9 and '-', starting alphanumeric")
        return v

    def repeated_customers(self) -> list[str]:
        """`jobs[i].customer` errors for each id used before (reported with the jobs' own)."""
        first: dict[str, int] = {}
        errors = []
        for i, job in enumerate(self.jobs):
            if job.customer in first:
                also = first[job.customer]
                errors.append(
                    f"jobs[{i}].customer: customer '{job.customer}' appears twice (also jobs[{also}]); "
                    "ids must be unique: rename one, or merge the two jobs"
                )
            first.setdefault(job.customer, i)
        return errors


class JobSpec(_Strict):
    """One job with defaults and overrides merged: everything a worker needs."""

    fleet: str
    customer: str
    base_model: str
    dataset: str
    format: str
    lora: LoraSpec
    quantization: QuantizationSpec
    training: TrainingSpec
    resources: ResourcesSpec
    packing: bool = True  # may share a warm slot (the fleet's and the job's setting)

    def spec_hash(self) -> str:
        """Hash of what determines the trained weights (not resources, which only place it)."""
        payload = self.model_dump(include={"base_model", "lora", "quantization", "training"})
        return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]


_BOUNDS = {"greater_than": ">", "greater_than_equal": ">=", "less_than": "<", "less_than_equal": "<="}


# YAML 1.1 reads these words as booleans, so `customer: no` or a key `on:` arrive as false/true
_YAML_BOOLEAN_HINT = "YAML reads yes, no, on, off, true and false as booleans: quote the word ('no')"


def _dotted(loc: tuple) -> str:
    return "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in loc).lstrip(".")


def _format_error(err: dict[str, Any], prefix: str = "") -> str:
    loc = err["loc"]
    path = _dotted(loc)
    kind = err["type"]
    if kind == "invalid_key":  # pydantic puts the key itself last in the path: name the mapping
        where = _dotted(loc[:-1])
        hint = f"; {_YAML_BOOLEAN_HINT}" if isinstance(err.get("input"), bool) else ""
        return f"{prefix}{where}: the key {err.get('input')!r} is not a field name{hint}"
    if kind == "string_type" and isinstance(err.get("input"), bool):
        return f"{prefix}{path}: {err['msg']} (got {err.get('input')!r}); {_YAML_BOOLEAN_HINT}"
    if kind == "extra_forbidden":
        return f"{prefix}{path}: unknown field; check the spelling (see `lorafleet schema`)"
    if kind == "missing":
        return f"{prefix}{path}: required field is missing"
    if kind in _BOUNDS:
        limit = next(iter(err["ctx"].values()))
        msg = f"must be {_BOUNDS[kind]} {limit}"
    else:
        msg = err["msg"].removeprefix("Value error, ")
    return f"{prefix}{path}: {msg} (got {err.get('input')!r})"


def format_validation_error(exc: ValidationError, source: str, prefix: str = "") -> SpecError:
    lines = [f"{source}: {_format_error(e, prefix)}" for e in exc.errors()]
    return SpecError("\n".join(lines))


def load_fleet(path: str | Path) -> FleetSpec:
    """Parse and validate a fleet file (jobs merged too); raises SpecError naming file and field."""
    path = Path(path)
    if path.is_dir():
        raise SpecError(f"{path}: is a folder; give the fleet's YAML file")
    if not path.is_file():
        raise SpecError(f"{path}: no such fleet file")
    try:
        raw = yaml.load(path.read_text(encoding="utf-8"), Loader=_UniqueKeyLoader)
    except UnicodeDecodeError as exc:
        raise SpecError(
            f"{path}: not UTF-8 text (byte {exc.object[exc.start]:#04x} at offset {exc.start})"
        ) from None
    except yaml.YAMLError as exc:
        raise SpecError(f"{path}: not valid YAML: {exc}") from exc
    if not isinstance(raw, dict):
        raise SpecError(f"{path}: expected a mapping with name, base_model and jobs")
    try:
        fleet = FleetSpec.model_validate(raw)
    except ValidationError as exc:
        errors = [str(format_validation_error(exc, str(path))), *_job_errors(_stand_in(raw, exc), path)]
        raise SpecError("\n".join(errors)) from None
    if errors := _job_errors(fleet, path):
        raise SpecError("\n".join(errors))
    return fleet


# top-level fields whose own errors leave the jobs checkable, and a valid value to stand in
_STAND_INS: dict[str, Any] = {"name": "fleet", "base_model": "base", "registry": {}, "packing": {}}


def _stand_in(raw: dict[str, Any], exc: ValidationError) -> FleetSpec | None:
    """The fleet with its bad fields stood in for, so that every job's own errors come in the
    same report: bad top-level fields get a valid value, unknown fields and bad optional ones are
    dropped (their defaults apply), a job's bad customer or dataset gets a placeholder. None when
    what is bad leaves no jobs to check (`jobs` itself)."""
    fixed = copy.deepcopy(raw)
    for err in exc.errors():
        loc = err["loc"]
        if not loc:
            return None
        if loc[0] in _STAND_INS and len(loc) >= 1 and err["type"] != "extra_forbidden":
            fixed[loc[0]] = _STAND_INS[loc[0]]
        elif loc[0] == "jobs" and len(loc) >= 3 and loc[2] in _JOB_STAND_INS:
            _put(fixed, loc[:3], _placeholder(fixed, loc[2], loc[1]))
        elif err["type"] == "extra_forbidden" or (loc[0] in ("defaults", "jobs") and len(loc) >= 3):
            _drop(fixed, loc[:3] if loc[0] == "defaults" else loc)
        else:
            return None
    try:
        return FleetSpec.model_validate(fixed)
    except ValidationError:
        return None


# a job's required fields, standing in when bad (a placeholder no real job uses)
_JOB_STAND_INS = {"customer": "stand-in-{i}", "dataset": "stand-in-{i}.jsonl"}


def _placeholder(fleet: dict[str, Any], field: str, index: int) -> str:
    """A stand-in no job of the fleet uses (a real customer may be called 'stand-in-2')."""
    taken = {str(job.get(field)) for job in fleet["jobs"] if isinstance(job, dict)}
    value = _JOB_STAND_INS[field].format(i=index)
    while value in taken:
        value = value.replace("stand-in", "stand-in-x", 1)
    return value


def _put(tree: Any, loc: tuple, value: Any) -> None:
    for key in loc[:-1]:
        tree = tree[key]
    tree[loc[-1]] = value


def _drop(tree: Any, loc: tuple) -> None:
    """Remove the value at loc (a mapping's key), if it is there."""
    with contextlib.suppress(KeyError, IndexError, TypeError):
        for key in loc[:-1]:
            tree = tree[key]
        if isinstance(tree, dict):
            tree.pop(loc[-1], None)


def _job_errors(fleet: FleetSpec | None, path: Path) -> list[str]:
    """Repeated customers and every job's bad overrides (checked only once merged)."""
    if fleet is None:
        return []
    errors = [f"{path}: {e}" for e in fleet.repeated_customers()]
    try:
        resolve_jobs(fleet, path)
    except SpecError as exc:
        errors.append(str(exc))
    return errors


class _UniqueKeyLoader(yaml.SafeLoader):
    """yaml.safe_load, except that a key written twice in one mapping is an error: PyYAML keeps
    the last, so a job's second `lora:` silently replaced its first. Keys a merge (`<<: *anchor`)
    brings in may still be overridden, as YAML intends."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        seen: dict[Any, int] = {}
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue
            key = self.construct_object(key_node, deep=True)
            try:
                first = seen.setdefault(key, key_node.start_mark.line + 1)
            except TypeError:
                continue  # an unhashable key: PyYAML's own error says so
            if first != key_node.start_mark.line + 1:
                raise yaml.constructor.ConstructorError(
                    None,
                    None,
                    f"key {key!r} appears twice in one mapping (first on line {first}); "
                    "the second would silently replace the first: keep one",
                    key_node.start_mark,
                )
        return super().construct_mapping(node, deep=deep)


def resolve_jobs(fleet: FleetSpec, fleet_file: Path) -> list[JobSpec]:
    """Every job with defaults merged; all bad overrides reported together."""
    jobs, errors = [], []
    for i in range(len(fleet.jobs)):
        try:
            jobs.append(resolve_job(fleet, i, fleet_file))
        except SpecError as exc:
            errors.append(str(exc))
    if errors:
        raise SpecError("\n".join(errors))
    return jobs


def resolve_job(fleet: FleetSpec, index: int, fleet_file: Path | None = None) -> JobSpec:
    """Merge a job's overrides onto the fleet defaults; errors name `jobs[i].section.field`."""
    job = fleet.jobs[index]
    sections: dict[str, Any] = {}
    for section in ("lora", "quantization", "training", "resources"):
        merged = getattr(fleet.defaults, section).model_dump(exclude_unset=True)
        merged.update(getattr(job, section))
        sections[section] = merged
    dataset = job.dataset
    if fleet_file is not None and "://" not in dataset and not Path(dataset).is_absolute():
        dataset = _absolute(Path(fleet_file).parent / dataset)
    source = str(fleet_file) if fleet_file else "fleet"
    ds = sections["training"].get("deepspeed")
    if isinstance(ds, str) and fleet_file is not None and _looks_like_path(ds):
        sections["training"]["deepspeed"] = str(deepspeed_file(ds, Path(fleet_file).parent))
    try:
        spec = JobSpec(
            fleet=fleet.name,
            customer=job.customer,
            base_model=fleet.base_model,
            dataset=dataset,
            format=job.format,
            packing=fleet.packing.enabled and job.packing,
            **sections,
        )
    except ValidationError as exc:
        raise format_validation_error(exc, source, prefix=f"jobs[{index}].") from None
    problem = deepspeed_problem(spec)
    if problem:
        raise SpecError(f"{source}: jobs[{index}].training.deepspeed: {problem}")
    return spec


def _absolute(path: Path) -> str:
    try:
        return str(path.resolve())
    except (OSError, RuntimeError):  # a symlink loop: reading it says what is wrong, per job
        return str(path.absolute())


def deepspeed_problem(job: JobSpec) -> str | None:
    """Why a job's DeepSpeed config cannot run (None if it can), found before any worker starts."""
    if job.training.deepspeed is None:
        return None
    try:
        config = load_deepspeed(job.training.deepspeed)
        stage = zero_stage(config)
    except SpecError as exc:
        return str(exc)
    except (AttributeError, TypeError, ValueError):
        stage = -1
    if stage not in (0, 1, 2, 3):
        return f"{job.training.deepspeed}: zero_optimization.stage must be 0, 1, 2 or 3"
    return None


def json_schema() -> dict[str, Any]:
    return FleetSpec.model_json_schema()
