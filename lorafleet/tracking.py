"""MLflow runs: a fleet is a parent run, each customer job a child run whose state tag follows it.

Only the driver writes here (one writer keeps the embedded SQLite store free of lock fights);
workers push progress to a Ray actor and the driver copies it over.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lorafleet import settings
from lorafleet.data import redact
from lorafleet.spec import JobSpec

if TYPE_CHECKING:  # MLflow (about a second of imports) loads with the first client, not before:
    # a submission's slots start before it writes its first run
    from mlflow.entities import Run
    from mlflow.tracking import MlflowClient

TERMINAL = {"succeeded": "FINISHED", "failed": "FAILED", "cancelled": "KILLED"}
STATES = ("queued", "running", "succeeded", "failed", "cancelled")
T = "lorafleet."  # tag namespace
# An adapter "beats the base" when its eval loss is at least this fraction below the base model's
# on the same eval split (both measured by the job, see worker.BaseEval). Relative, so it means the
# same at loss 5 and at loss 0.2; 2% because a smaller gain on a split of a few dozen examples is
# noise, not a behaviour learned.
BEATS_BASE_MARGIN = 0.02


def client() -> MlflowClient:
    # not mlflow.set_tracking_uri(): it also sets MLFLOW_TRACKING_URI in os.environ, which would
    # pin every later call (and every child process) to the first store this process touched
    from mlflow.tracking import MlflowClient

    return MlflowClient(settings.tracking_uri())


def experiment_name(fleet: str) -> str:
    return f"lorafleet-{fleet}"


def ensure_experiment(c: MlflowClient, fleet: str) -> str:
    exp = c.get_experiment_by_name(experiment_name(fleet))
    if exp is not None:
        return exp.experiment_id
    return c.create_experiment(experiment_name(fleet), artifact_location=_artifact_location(fleet))


def _artifact_location(fleet: str) -> str | None:
    root = settings.artifact_root()
    return f"{root}/{fleet}" if root else None


def start_fleet_run(c: MlflowClient, exp_id: str, fleet: str, spec_file: Path, base_fp: str) -> str:
    run = c.create_run(
        exp_id,
        run_name=fleet,
        tags={
            T + "kind": "fleet",
            T + "fleet": fleet,
            T + "base_fingerprint": base_fp,
        },
    )
    c.log_artifact(run.info.run_id, str(spec_file), "spec")
    return run.info.run_id


def _flat_params(job: JobSpec) -> dict[str, str]:
    params = {"base_model": job.base_model, "dataset": redact(job.dataset)}
    for section in ("lora", "quantization", "training", "resources"):
        for key, value in getattr(job, section).model_dump().items():
            params[f"{section}.{key}"] = json.dumps(value) if isinstance(value, list) else str(value)
    return params


def start_job_run(c: MlflowClient, exp_id: str, parent: str, job: JobSpec, tags: dict[str, str]) -> str:
    run = c.create_run(
        exp_id,
        run_name=job.customer,
        tags={
            "mlflow.parentRunId": parent,
            T + "kind": "job",
            T + "fleet": job.fleet,
            T + "customer": job.customer,
            T + "state": "queued",
            **{T + k: v for k, v in tags.items()},
        },
    )
    run_id = run.info.run_id
    c.log_batch(run_id, params=[_param(k, v) for k, v in _flat_params(job).items()])
    c.log_dict(run_id, job.model_dump(mode="json") | {"dataset": redact(job.dataset)}, "job_spec.json")
    return run_id


def _param(key: str, value: str) -> Any:
    from mlflow.entities import Param

    return Param(key, value[:6000])


def set_state(c: MlflowClient, run_id: str, state: str, reason: str | None = None) -> None:
    c.set_tag(run_id, T + "state", state)
    if reason:
        c.set_tag(run_id, T + "failure_reason", reason[:5000])
    if state in TERMINAL:
        c.set_terminated(run_id, TERMINAL[state])


def log_history(c: MlflowClient, run_id: str, points: list[dict[str, Any]]) -> None:
    """Log the trainer's log events (each has 'step' and numeric metrics) as metric history."""
    from mlflow.entities import Metric

    now = int(time.time() * 1000)
    metrics = [
        Metric(key, float(value), now, int(p["step"]))
        for p in points
        for key, value in p.items()
        if isinstance(value, int | float)  # 'step' too: status shows the last one
    ]
    for i in range(0, len(metrics), 900):  # log_batch takes at most 1000 metrics
        c.log_batch(run_id, metrics=metrics[i : i + 900])


def find_succeeded(c: MlflowClient, exp_id: str, customer: str, job_hash: str) -> Run | None:
    """A finished run of this customer with the same spec, data and base: nothing to retrain."""
    runs = c.search_runs(
        [exp_id],
        f"tags.`{T}customer` = '{customer}' AND tags.`{T}job_hash` = '{job_hash}' "
        f"AND tags.`{T}state` = 'succeeded' AND tags.`{T}reused_from` IS NULL",
        order_by=["attributes.start_time DESC"],
        max_results=1,
    )
    return runs[0] if runs else None


def latest_fleet_run(c: MlflowClient, fleet: str) -> Run | None:
    exp = c.get_experiment_by_name(experiment_name(fleet))
    if exp is None:
        return None
    runs = c.search_runs(
        [exp.experiment_id],
        f"tags.`{T}kind` = 'fleet'",
        order_by=["attributes.start_time DESC"],
        max_results=1,
    )
    return runs[0] if runs else None


def job_runs(c: MlflowClient, fleet_run: Run) -> list[Run]:
    return c.search_runs(
        [fleet_run.info.experiment_id],
        f"tags.`mlflow.parentRunId` = '{fleet_run.info.run_id}'",
        order_by=["tags.`lorafleet.customer` ASC"],
    )


def beats_base(eval_loss: float | None, base_eval_loss: float | None) -> bool | None:
    """Whether an adapter's eval loss beats the base's by BEATS_BASE_MARGIN; None: not measured."""
    if eval_loss is None or base_eval_loss is None:
        return None
    return eval_loss <= base_eval_loss * (1 - BEATS_BASE_MARGIN)


def mark_beats_base(c: MlflowClient, run_id: str) -> bool | None:
    """Tag a finished job run `lorafleet.beats_base` = true/false from its metrics (no tag when
    the job had no eval split); returns the verdict."""
    metrics = c.get_run(run_id).data.metrics
    verdict = beats_base(metrics.get("eval_loss"), metrics.get("base_eval_loss"))
    if verdict is not None:
        c.set_tag(run_id, T + "beats_base", str(verdict).lower())
    return verdict


def job_row(run: Run) -> dict[str, Any]:
    """One job's status as read back from MLflow (works with the Ray cluster gone)."""
    from mlflow.entities import RunStatus

    tags, metrics = run.data.tags, run.data.metrics
    return {
        "customer": tags.get(T + "customer"),
        "state": tags.get(T + "state"),
        "step": int(metrics["step"]) if "step" in metrics else None,
        "total_steps": int(metrics["total_steps"]) if "total_steps" in metrics else None,
        "loss": metrics.get("loss"),
        "eval_loss": metrics.get("eval_loss"),
        "base_eval_loss": metrics.get("base_eval_loss"),
        "beats_base": _beats_base_of(tags, metrics),
        "reason": tags.get(T + "failure_reason"),
        "reused_from": tags.get(T + "reused_from"),
        "run_id": run.info.run_id,
        "status": RunStatus.to_string(RunStatus.from_string(run.info.status)),
    }


# ---- small writes the fleet pipeline makes (lorafleet.pipeline) ----------------------------


def set_tags(c: MlflowClient, run_id: str, tags: dict[str, str]) -> None:
    """Tags in the lorafleet namespace ('node_id' is written as 'lorafleet.node_id')."""
    for key, value in tags.items():
        c.set_tag(run_id, T + key, value)


def log_metric(c: MlflowClient, run_id: str, key: str, value: float) -> None:
    c.log_metric(run_id, key, value)


def log_dataset_report(c: MlflowClient, run_id: str, report: dict[str, Any]) -> None:
    c.log_dict(run_id, report, "dataset_report.json")


def log_adapter(c: MlflowClient, run_id: str, folder: Path) -> None:
    c.log_artifacts(run_id, str(folder), "adapter")


def download_adapter(c: MlflowClient, run_id: str) -> Path:
    import tempfile

    return Path(c.download_artifacts(run_id, "adapter", tempfile.mkdtemp()))


def close_fleet_run(c: MlflowClient, run_id: str, state: str) -> None:
    c.set_tag(run_id, T + "state", state)
    c.set_terminated(run_id, "FINISHED")


def _beats_base_of(tags: dict[str, str], metrics: dict[str, float]) -> bool | None:
    """The run's verdict: its tag once the job finished; None while it is still training (the last
    eval of a running job is not its result)."""
    if T + "beats_base" in tags:
        return tags[T + "beats_base"] == "true"
    if tags.get(T + "state") != "succeeded":
        return None
    return beats_base(metrics.get("eval_loss"), metrics.get("base_eval_loss"))
