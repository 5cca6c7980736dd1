"""`lorafleet bench train`: orchestration overhead, a fleet of small jobs three ways, NF4 base
memory; on a GPU also tokens/s and peak memory of one job and of a fleet sharing the GPU. Ratios
against a baseline measured in the same run, never absolute thresholds.

The fleet three ways, same jobs, same machine, one after another:
- warm slots (the default: slots load the base once and take job after job),
- one Ray Train run per job (`packing.enabled: false`, what every job did before slots),
- plain trl scripts, one after another, each in a fresh Python process (`worker.train_plain`),
  which is what a user with a for-loop would run.
One job alone goes through the fleet three times in this process: first on the cluster (the
cluster-wide actors the runs share start with it), cold (its slot's Ray Train run starts with it,
on a cluster that has run a fleet before) and warm (on the slot the cold submission kept warm,
`packing.keep_warm_s`). Then twice more as `lorafleet submit` commands of their own joining the
same cluster, as a user or a CI job on a long-lived cluster runs them (interpreter, imports,
joining Ray, registration, exit, all counted): cold, then warm on the slot the first command kept.
"""

from __future__ import annotations

import os
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import yaml

from lorafleet.settings import environ

PLAIN_SAMPLES = 3  # plain script processes timed for the one-job baseline (their median)


def _fleet_file(
    folder: Path,
    base: str,
    datasets: dict[str, Path],
    training: dict,
    name: str,
    resources: dict | None = None,
    packing: dict | None = None,
) -> Path:
    spec = {
        "name": name,
        "base_model": base,
        "defaults": {"training": training, "resources": resources or {}},
        "packing": packing or {},
        "jobs": [{"customer": c, "dataset": str(p)} for c, p in datasets.items()],
    }
    path = folder / f"{name}.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


def _plain_seconds(fleet_file: Path, index: int = 0) -> float:
    """One job of the fleet file trained in this process with no Ray: the baseline."""
    from lorafleet.models import fingerprint, resolve_base
    from lorafleet.spec import load_fleet, resolve_jobs
    from lorafleet.train.worker import JobPlan, train_plain

    job = resolve_jobs(load_fleet(fleet_file), fleet_file)[index]
    plan = JobPlan(job=job, base_fingerprint=fingerprint(resolve_base(job.base_model)))
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as out:
        train_plain(plan, out)
    return time.perf_counter() - start


def _plain_processes(fleet_file: Path, n_jobs: int) -> float:
    """The fleet's jobs as plain trl scripts run one after another, each a fresh process
    (imports, base load and training: what a for-loop over scripts costs)."""
    import subprocess
    import sys

    start = time.perf_counter()
    for i in range(n_jobs):
        cmd = [sys.executable, "-m", "lorafleet.bench.train_bench", str(fleet_file), str(i)]
        subprocess.run(cmd, check=True, capture_output=True)
    return time.perf_counter() - start


def _submit_process(fleet_file: Path, address: str) -> float:
    """`lorafleet submit` as a new process joining the running cluster; its wall time."""
    import subprocess
    import sys

    start = time.perf_counter()
    cmd = [sys.executable, "-m", "lorafleet.cli", "submit", str(fleet_file), "--ray-address", address]
    subprocess.run(cmd, check=True, capture_output=True)
    return time.perf_counter() - start


def _fleet_seconds(fleet_file: Path) -> tuple[float, dict[str, float]]:
    from lorafleet.pipeline import submit

    start = time.perf_counter()
    result = submit(fleet_file, register=False)
    wall = time.perf_counter() - start
    bad = {c: o.reason for c, o in result.jobs.items() if o.state != "succeeded"}
    if bad and len(bad) == len(result.jobs):
        raise RuntimeError(f"benchmark jobs failed: {bad}")
    if bad:  # on a loaded machine a Ray Train worker can die at start (ControllerError): say so
        print(f"warning: {len(bad)} benchmark job(s) failed, their time still counts: {bad}")
    return wall, {c: o.metrics["job_wall_s"] for c, o in result.jobs.items() if c not in bad}


def overhead(folder: Path, base: str, dataset: Path, training: dict) -> dict[str, Any]:
    """One job through the fleet (Ray already started) against the same training as a plain
    script in a fresh process (imports, base load, training: what `python train.py` costs; the
    median of three), and
    against the same training in this process, whose imports are already paid. Three times
    through the fleet: the cluster's first submission, cold (its slot starts with it) and warm (a
    slot the cold one kept, `keep_warm_s`); then twice as `lorafleet submit` processes joining
    this cluster, cold and warm."""
    import ray

    from lorafleet.raystart import init_ray

    start = time.perf_counter()
    init_ray(None)
    ray_init_s = time.perf_counter() - start
    plain_file = _fleet_file(folder, base, {"solo": dataset}, training, "bench-plain")
    # the baseline is the median of three processes: one alone ranged 11.6 to 16.5 s here
    plain_samples = [_plain_processes(plain_file, 1) for _ in range(PLAIN_SAMPLES)]
    plain_process = statistics.median(plain_samples)
    plain = _plain_seconds(plain_file)
    solo = {"solo": dataset}
    keep = {"keep_warm_s": 60}
    first, _ = _fleet_seconds(_fleet_file(folder, base, solo, training, "bench-first"))
    cold, _ = _fleet_seconds(_fleet_file(folder, base, solo, training, "bench-solo", packing=keep))
    warm, _ = _fleet_seconds(_fleet_file(folder, base, solo, training, "bench-solo-warm"))
    address = ray.get_runtime_context().gcs_address
    kept = _fleet_file(folder, base, solo, training, "bench-proc-cold", packing=keep)
    process_cold = _submit_process(kept, address)  # the slot above ended: it kept nothing warm
    process_warm = _submit_process(_fleet_file(folder, base, solo, training, "bench-proc-warm"), address)
    return {
        "plain_process_s": plain_process,
        "plain_process_samples_s": plain_samples,
        "plain_in_process_s": plain,
        "fleet_first_s": first,
        "fleet_s": cold,
        "fleet_warm_s": warm,
        "ray_init_s": ray_init_s,
        "cpu_slots": int(ray.cluster_resources().get("CPU", 1)),
        "fleet_first_vs_plain_process": first / plain_process,
        "fleet_vs_plain_process": cold / plain_process,
        "fleet_vs_plain_in_process": cold / plain,
        "fleet_warm_vs_plain_process": warm / plain_process,
        "fleet_warm_vs_plain_in_process": warm / plain,
        "submit_process_cold_s": process_cold,
        "submit_process_warm_s": process_warm,
        "submit_process_cold_vs_plain_process": process_cold / plain_process,
        "submit_process_warm_vs_plain_process": process_warm / plain_process,
        "load": _load(),
    }


def fleet_three_ways(
    folder: Path, base: str, dataset: Path, training: dict, n_jobs: int, record: Any = None
) -> dict[str, Any]:
    """n small jobs: warm slots, one Ray Train run per job, plain scripts one after another;
    `record(out)` after each (a long run that is cut short keeps what it measured)."""
    datasets = {f"job-{i}": dataset for i in range(n_jobs)}
    out: dict[str, Any] = {"jobs": n_jobs}
    slots_file = _fleet_file(folder, base, datasets, training, "bench-slots")
    out["slots_s"], out["slot_job_wall_s"] = _fleet_seconds(slots_file)
    out["load_after_slots"] = _load()
    _record(record, out)
    runs_file = _fleet_file(folder, base, datasets, training, "bench-runs", packing={"enabled": False})
    out["own_runs_s"], _ = _fleet_seconds(runs_file)
    out["slots_vs_own_runs"] = out["slots_s"] / out["own_runs_s"]
    out["load_after_own_runs"] = _load()
    _record(record, out)
    out["plain_processes_s"] = _plain_processes(slots_file, n_jobs)
    out["slots_vs_plain_processes"] = out["slots_s"] / out["plain_processes_s"]
    out["load"] = _load()
    return out


def _record(record: Any, out: dict[str, Any]) -> None:
    if record is not None:
        record(out)


def _load() -> dict[str, Any]:
    """What else the machine was doing: the figures are ratios measured under the same load."""
    return {"loadavg_1_5_15": os.getloadavg(), "cpus": os.cpu_count()}


def base_memory(hidden: int = 768, layers: int = 12, vocab: int = 32000) -> dict[str, Any]:
    """A synthetic Llama of ~110M parameters loaded bf16 against NF4 + double quantisation."""
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

    from lorafleet.models import quantization_config
    from lorafleet.spec import QuantizationSpec

    with tempfile.TemporaryDirectory() as folder:
        config = LlamaConfig(
            vocab_size=vocab,
            hidden_size=hidden,
            intermediate_size=hidden * 8 // 3,
            num_hidden_layers=layers,
            num_attention_heads=hidden // 64,
            num_key_value_heads=hidden // 64,
        )
        model = LlamaForCausalLM(config).to(torch.bfloat16)
        params = sum(p.numel() for p in model.parameters())
        model.save_pretrained(folder)
        del model
        bf16 = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.bfloat16).get_memory_footprint()
        q = quantization_config(QuantizationSpec(), torch.bfloat16)
        nf4 = AutoModelForCausalLM.from_pretrained(
            folder, quantization_config=q, dtype=torch.bfloat16, device_map={"": _device()}
        ).get_memory_footprint()
    return {"parameters": params, "bf16_bytes": bf16, "nf4_dq_bytes": nf4, "nf4_vs_bf16": nf4 / bf16}


def _device() -> str:
    import torch

    return "cuda:0" if torch.cuda.is_available() else "cpu"


class GpuMemoryPeak:
    """Peak GPU memory in use while a block runs, from nvidia-smi: the jobs run in Ray worker
    processes, so this process's torch counters would not see them."""

    def __enter__(self) -> GpuMemoryPeak:
        import threading

        self.peak_mib, self._stop = 0, threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)
        self._thread.start()
        return self

    def _poll(self) -> None:
        import subprocess

        while not self._stop.is_set():
            out = subprocess.run(
                ["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits"],
                capture_output=True,
                text=True,
            ).stdout.split()
            self.peak_mib = max([self.peak_mib, *map(int, out[:1])])
            self._stop.wait(0.2)

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def gpu_throughput(folder: Path, base: str, dataset: Path, training: dict, n_jobs: int) -> dict:
    """One job alone on the GPU, then n jobs sharing it through fractional GPU requests."""
    from lorafleet.data import inspect_dataset
    from lorafleet.models import load_tokenizer, resolve_base

    report = inspect_dataset(dataset, "auto", load_tokenizer(resolve_base(base)), training["max_length"])
    tokens_per_job = (
        training["max_steps"]
        * training["batch_size"]
        * min(report.tokens_total / report.examples, training["max_length"])
    )
    out = {}
    for n in (1, n_jobs):
        res = {"gpus_per_worker": round(1 / n, 3), "cpus_per_worker": 1}
        jobs = {f"g{i}": dataset for i in range(n)}
        fleet = _fleet_file(folder, base, jobs, training, f"bench-gpu{n}", res)
        with GpuMemoryPeak() as mem:
            wall, per_job = _fleet_seconds(fleet)
        out[f"jobs_{n}"] = {
            "wall_s": wall,
            "job_train_s": per_job,
            "peak_gpu_mib": mem.peak_mib,
            "tokens_per_s": n * tokens_per_job / wall,
            "tokens_per_s_in_training": n * tokens_per_job / max(per_job.values()),
        }
    return out


def run_train_bench(
    base: str,
    dataset: Path,
    max_steps: int = 20,
    n_jobs: int = 16,
    with_memory: bool = True,
    on_partial: Any = None,
) -> dict[str, Any]:
    """The figures above; `on_partial(results)` is called as each part is measured."""
    import torch

    training = {
        "max_steps": max_steps,
        "batch_size": 8,
        "max_length": 256,
        "save_steps": 1000,
        "logging_steps": 10,
        "eval_fraction": 0.0,
    }
    results: dict[str, Any] = {"base": base, "max_steps": max_steps}
    # a fresh store: nothing reused from an earlier run
    with tempfile.TemporaryDirectory() as tmp, environ({"LORAFLEET_HOME": tmp}):
        folder = Path(tmp)
        results["load_before"] = _load()
        results["overhead"] = overhead(folder, base, dataset, training)
        _record(on_partial, results)

        def partial_fleet(fleet: dict[str, Any]) -> None:
            _record(on_partial, results | {"fleet": fleet})

        results["fleet"] = fleet_three_ways(folder, base, dataset, training, n_jobs, partial_fleet)
        if torch.cuda.is_available():
            results["gpu"] = gpu_throughput(folder, base, dataset, training, n_jobs)
    if with_memory:
        results["base_memory"] = base_memory()
    return results


if __name__ == "__main__":  # one plain job in a fresh process: python -m ... <fleet file> <job index>
    import sys

    _plain_seconds(Path(sys.argv[1]), int(sys.argv[2]))
