"""Packed training against one job at a time, JSON out:

    python -m lorafleet.bench.packed_bench --jobs 4 --steps 20 --out packed.json

- throughput: tokens/s of K jobs packed in one PackedTrainer against the same K jobs one after
  another in the same process (PackedTrainer with max_jobs=1, base loaded once), and against K
  plain trl trainings one after another (`--trl`; each loads its base, as a script would);
- memory: peak of K packed jobs in one process against K separate processes training one job
  each (max RSS of each summed; on a GPU torch.cuda.max_memory_allocated instead);
- lora_forward: the LoRA term's forward + backward as per-job row segments (what packed training
  runs) against a gathered bmm over padded ranks (serving's layout, with a backward).
Every measurement runs in a fresh subprocess, so imports and earlier phases do not pollute RSS.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

TRAINING = {
    "batch_size": 8,
    "max_length": 256,
    "save_steps": 100_000,
    "logging_steps": 10,
    "eval_fraction": 0.0,
    "learning_rate": 2e-4,
}
RANKS = (8, 16, 4, 32)  # jobs cycle through these so the pack mixes ranks


def _plans(base: str, folder: Path, jobs: int, steps: int) -> list[Any]:
    from lorafleet.demo_customers import write_demo_datasets
    from lorafleet.models import fingerprint, resolve_base
    from lorafleet.spec import JobSpec, LoraSpec, QuantizationSpec, ResourcesSpec, TrainingSpec
    from lorafleet.train.worker import JobPlan

    datasets = list(write_demo_datasets(folder).values())
    fp = fingerprint(resolve_base(base))
    plans = []
    for i in range(jobs):
        job = JobSpec(
            fleet="bench",
            customer=f"job-{i}",
            base_model=base,
            dataset=str(datasets[i % len(datasets)]),
            format="auto",
            lora=LoraSpec(rank=RANKS[i % len(RANKS)], alpha=2 * RANKS[i % len(RANKS)]),
            quantization=QuantizationSpec(),
            training=TrainingSpec(max_steps=steps, seed=i, **TRAINING),
            resources=ResourcesSpec(),
        )
        plans.append(JobPlan(job=job, base_fingerprint=fp))
    return plans


def _peaks() -> dict[str, int]:
    import torch

    out = {"max_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}
    if torch.cuda.is_available():
        out["cuda_max_allocated_bytes"] = torch.cuda.max_memory_allocated()
    return out


def _device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def child(
    mode: str, base: str, jobs: int, steps: int, folder: Path, only: int | None = None
) -> dict[str, Any]:
    """One measurement in this process: 'packed' (K at once), 'sequential' (K one by one on one
    base copy) or 'trl' (K plain trl trainings one by one); `only`: just that one of the K jobs."""
    plans = _plans(base, folder / "data", jobs, steps)
    if only is not None:
        plans = plans[only : only + 1]
    start = time.perf_counter()
    if mode == "trl":
        from lorafleet.train.worker import train_plain

        for plan in plans:
            train_plain(plan, str(folder / "out" / plan.job.customer))
        return {"mode": mode, "seconds": time.perf_counter() - start, **_peaks()}
    from lorafleet.train.packed import PackedTrainer

    trainer = PackedTrainer(base, plans[0].job.quantization, device=_device(), max_jobs=len(plans))
    if mode == "sequential":
        trainer.max_jobs = 1
    loaded = time.perf_counter()
    done: dict[str, dict] = {}

    def on_event(customer: str, event: dict) -> None:
        if event["event"] == "state" and event["state"] in ("succeeded", "failed"):
            done[customer] = event

    for plan in plans:
        trainer.add(plan, folder / "out" / plan.job.customer, on_event=on_event)
        if mode == "sequential":
            trainer.run()
    trainer.run()
    seconds = time.perf_counter() - loaded
    failed = {c: e["reason"] for c, e in done.items() if e["state"] == "failed"}
    if failed:
        raise RuntimeError(f"benchmark jobs failed: {failed}")
    tokens = sum(e["tokens"] for e in done.values())
    return {
        "mode": mode,
        "seconds": time.perf_counter() - start,
        "train_seconds": seconds,
        "tokens": tokens,
        "tokens_per_s": tokens / seconds,
        **_peaks(),
    }


def _spawn(mode: str, base: str, jobs: int, steps: int, only: int | None = None) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="packed-bench-") as tmp:
        cmd = [sys.executable, "-m", "lorafleet.bench.packed_bench", "--child", mode]
        cmd += ["--base-model", base, "--jobs", str(jobs), "--steps", str(steps), "--folder", tmp]
        cmd += [] if only is None else ["--only", str(only)]
        started = time.perf_counter()
        proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
        if proc.returncode != 0:
            raise RuntimeError(f"{mode} run failed:\n{proc.stderr[-3000:]}")
        result = json.loads(proc.stdout.strip().splitlines()[-1])
        result["process_seconds"] = time.perf_counter() - started
        return result


def lora_forward(jobs: int = 4, rows: int = 8, length: int = 128, repeats: int = 5) -> dict[str, Any]:
    """One layer (base + LoRA term) fwd+bwd at the tiny base's shapes, mixed ranks: CPU ms of one
    thread (process time, so other load on the machine does not count), best of `repeats`."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    out: dict[str, Any] = {"jobs": jobs, "rows_per_job": rows, "length": length, "ranks": RANKS[:jobs]}
    try:
        for din, dout in ((256, 256), (256, 768), (768, 256)):
            out[f"{din}x{dout}"] = _layer_timings(jobs, rows, length, din, dout, repeats)
    finally:
        torch.set_num_threads(threads)
    return out


def _layer_timings(jobs: int, rows: int, length: int, din: int, dout: int, repeats: int) -> dict[str, float]:
    import torch

    from lorafleet.train.packed_lora import LoraPair, PackedLoraLinear, PackedRows, Segment

    ctx = PackedRows([Segment(f"j{j}", j * rows, (j + 1) * rows, length, 0) for j in range(jobs)])
    layer = PackedLoraLinear(torch.nn.Linear(din, dout, bias=False).requires_grad_(False), ctx, 1)
    for j in range(jobs):
        layer.adapters[f"j{j}"] = LoraPair(din, dout, RANKS[j % len(RANKS)], 2.0, 0.0)
        layer.adapters[f"j{j}"].lora_B.data.normal_()
    x = torch.randn(jobs * rows, length, din, requires_grad=True)
    grad = torch.randn(jobs * rows, length, dout)
    pairs = list(layer.adapters.values())
    idx = torch.arange(jobs).repeat_interleave(rows)
    return {
        "base_only_ms": _best(lambda: layer.base(x).backward(grad), repeats),
        "segments_ms": _best(lambda: layer(x).backward(grad), repeats),
        "gathered_bmm_ms": _best(lambda: _gathered(layer.base, pairs, idx, x).backward(grad), repeats),
    }


def _gathered(base: Any, pairs: list[Any], idx: Any, x: Any) -> Any:
    """Serving's layout with a backward: A/B of all jobs padded to the largest rank and stacked,
    gathered per row, two bmm."""
    import torch
    import torch.nn.functional as F

    r = max(p.lora_A.shape[0] for p in pairs)
    a = torch.stack([F.pad(p.lora_A, (0, 0, 0, r - p.lora_A.shape[0])) for p in pairs])  # (K, r, in)
    b = torch.stack([F.pad(p.lora_B * p.scaling, (0, r - p.lora_B.shape[1])) for p in pairs])  # (K, out, r)
    xa = torch.bmm(x, a[idx].transpose(1, 2))  # (N, T, r)
    return base(x) + torch.bmm(xa, b[idx].transpose(1, 2))  # (N, T, out)


def _best(fn: Any, repeats: int) -> float:
    fn()  # warm up
    times = []
    for _ in range(repeats):
        start = time.process_time()
        fn()
        times.append((time.process_time() - start) * 1e3)
    return round(min(times), 2)


def run(base: str, jobs: int, steps: int, trl: bool) -> dict[str, Any]:
    packed = _spawn("packed", base, jobs, steps)
    sequential = _spawn("sequential", base, jobs, steps)
    singles = [_spawn("packed", base, jobs, steps, only=i) for i in range(jobs)]
    peak_key = "cuda_max_allocated_bytes" if "cuda_max_allocated_bytes" in packed else "max_rss_bytes"
    results: dict[str, Any] = {
        "base": base,
        "jobs": jobs,
        "steps": steps,
        "training": TRAINING,
        "packed": packed,
        "sequential": sequential,
        "throughput_ratio": packed["tokens_per_s"] / sequential["tokens_per_s"],
        "memory": {
            "measure": peak_key,
            "packed_one_process": packed[peak_key],
            "separate_processes_sum": sum(s[peak_key] for s in singles),
            "single_process_each": [s[peak_key] for s in singles],
        },
        "lora_forward": lora_forward(jobs=min(jobs, len(RANKS))),
    }
    results["memory"]["ratio"] = (
        results["memory"]["packed_one_process"] / results["memory"]["separate_processes_sum"]
    )
    if trl:
        results["trl_sequential"] = _spawn("trl", base, jobs, steps)
        results["packed_vs_trl_wall"] = (
            packed["process_seconds"] / results["trl_sequential"]["process_seconds"]
        )
    return results


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--jobs", type=int, default=4)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--base-model", default="tiny-llama")
    p.add_argument("--out", default=None)
    p.add_argument("--trl", action="store_true", help="also K plain trl trainings one by one")
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    p.add_argument("--folder", default=None, help=argparse.SUPPRESS)
    p.add_argument("--only", type=int, default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        print(
            json.dumps(
                child(args.child, args.base_model, args.jobs, args.steps, Path(args.folder), args.only)
            )
        )
        return
    results = run(args.base_model, args.jobs, args.steps, args.trl)
    text = json.dumps(results, indent=2)
    if args.out:
        Path(args.out).write_text(text)
    print(text)


if __name__ == "__main__":
    main()
