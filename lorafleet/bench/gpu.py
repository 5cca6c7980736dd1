"""GPU figures in one short run (`python -m lorafleet.bench.gpu OUT.json`): the engine on a base
of realistic size in bf16, QLoRA training tokens/s and peak memory for one job and for a fleet
of jobs sharing the GPU, NF4 vs bf16 base memory, and continuous against batch-synchronous
decoding (`OUT.json serve` runs the serving part alone). Needs torch, transformers, peft, trl,
bitsandbytes and datasets; no Ray or MLflow (those are measured on the CPU benchmarks)."""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch


def train_job(base: str, dataset: str, steps: int, device: str = "cuda:0") -> dict:
    from lorafleet.models import fingerprint
    from lorafleet.spec import JobSpec, LoraSpec, QuantizationSpec, ResourcesSpec, TrainingSpec
    from lorafleet.train.worker import JobPlan, build_trainer

    job = JobSpec(
        fleet="gpu",
        customer="g",
        base_model=base,
        dataset=dataset,
        format="auto",
        lora=LoraSpec(rank=16),
        quantization=QuantizationSpec(),
        training=TrainingSpec(
            max_steps=steps,
            batch_size=8,
            max_length=256,
            eval_fraction=0,
            save_steps=10_000,
            logging_steps=10,
        ),
        resources=ResourcesSpec(gpus_per_worker=1),
    )
    with tempfile.TemporaryDirectory() as out:
        trainer = build_trainer(JobPlan(job=job, base_fingerprint=fingerprint(base)), out, device, [])
        tokens = sum(min(len(x), 256) for x in trainer.train_dataset["input_ids"][: steps * 8])
        if device.startswith("cuda"):
            torch.cuda.reset_peak_memory_stats()
        start = time.perf_counter()
        trainer.train()
        wall = time.perf_counter() - start
    return {
        "train_s": wall,
        "tokens": tokens,
        "tokens_per_s": tokens / wall,
        "peak_gpu_mib": torch.cuda.max_memory_allocated() / 2**20 if device.startswith("cuda") else 0,
    }


def fleet_sharing_gpu(base: str, dataset: str, steps: int, n: int) -> dict:
    """n jobs at once on the one GPU (as fractional GPU requests would place them)."""
    start = time.perf_counter()
    procs = [
        subprocess.Popen(
            [sys.executable, "-m", "lorafleet.bench.gpu", "--job", base, dataset, str(steps)],
            stdout=subprocess.PIPE,
            text=True,
        )
        for _ in range(n)
    ]
    results = [json.loads(p.communicate()[0].strip().splitlines()[-1]) for p in procs]
    wall = time.perf_counter() - start
    return {
        "jobs": n,
        "wall_s": wall,
        "tokens_per_s": sum(r["tokens"] for r in results) / wall,
        "per_job": results,
    }


def main(out: str, parts: set[str]) -> None:
    from lorafleet.bench.engine_bench import _synthetic_base
    from lorafleet.demo_customers import write_demo_datasets

    results: dict = {"device": torch.cuda.get_device_name(0)}
    tmp = Path(tempfile.mkdtemp())
    dataset = str(write_demo_datasets(tmp / "data", n_train=800)["globex"])
    base = str(_synthetic_base(tmp / "base", hidden=2048, layers=16))  # ~1B parameters
    for part, run in (("train", train_figures), ("serve", serve_figures)):
        if part in parts:
            run(base, dataset, results, out)
    print(json.dumps(results, indent=2))


def _save(results: dict, out: str) -> None:
    Path(out).write_text(json.dumps(results, indent=2))


def train_figures(base: str, dataset: str, results: dict, out: str) -> None:
    from lorafleet.bench.train_bench import base_memory

    results["base_memory_110m"] = base_memory()
    results["train_one_job"] = train_job(base, dataset, steps=40)
    results["train_fleet_4_sharing"] = fleet_sharing_gpu(base, dataset, 40, 4)
    _save(results, out)


def serve_figures(base: str, dataset: str, results: dict, out: str) -> None:
    """Mixed-adapter engine throughput, then continuous against batch-synchronous decoding."""
    from lorafleet.bench.batching_bench import run_batching_bench
    from lorafleet.bench.engine_bench import run_engine_bench

    for batch in (16, 64):
        results[f"engine_bf16_b{batch}"] = run_engine_bench(
            Path(base), n_adapters=16, batch_size=batch, new_tokens=64, quantization="none"
        )
        _save(results, out)
        results[f"batching_bf16_b{batch}"] = run_batching_bench(
            Path(base), n_requests=8 * batch, batch=batch, n_adapters=16, clock="wall"
        )
        _save(results, out)


if __name__ == "__main__":
    if sys.argv[1] == "--job":
        print(json.dumps(train_job(sys.argv[2], sys.argv[3], int(sys.argv[4]))))
    else:  # OUT.json [train] [serve]: both by default
        main(sys.argv[1], set(sys.argv[2:]) or {"train", "serve"})
