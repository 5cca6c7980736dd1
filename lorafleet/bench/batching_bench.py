"""Continuous against batch-synchronous decoding on the same engine and the same requests.

A saturated queue of requests with mixed adapters and mixed lengths (max_new_tokens drawn from a
range, as real answers vary): batch-synchronous takes up to `batch` requests, decodes until the
longest is done and only then takes more, so its batch thins out as short rows finish;
continuous refills each free row between decode steps. Both run the same Decoder code, so the
ratio is the scheduling alone. On a CPU, times are this process's CPU time (see CLOCKS): run it
with one torch thread; on a GPU the wall clock is the one that matters (`clock="wall"`).
Reports tokens/s and the mean and p95 time from the start (every request is queued at t=0) to a
request's last token.
"""

from __future__ import annotations

import random
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from lorafleet.serve.decoder import GenerationRequest


def make_requests(
    n: int, vocab: int, adapters: list[str | None], min_new: int, max_new: int, seed: int = 0
) -> list[GenerationRequest]:
    rng = random.Random(seed)
    return [
        GenerationRequest(
            [rng.randrange(3, vocab) for _ in range(rng.randint(8, 32))],
            adapters[i % len(adapters)],
            max_new_tokens=rng.randint(min_new, max_new),
            stop_token_ids=[],
        )  # no early stop: every run does the same work
        for i in range(n)
    ]


def run_static(
    engine: Any, requests: list[GenerationRequest], batch: int, clock: Callable[[], float]
) -> dict[str, float]:
    start, done_at, tokens = clock(), [], 0
    for i in range(0, len(requests), batch):
        results = engine.generate(requests[i : i + batch])
        now = clock() - start
        done_at += [now] * len(results)
        tokens += sum(len(r.token_ids) for r in results)
    return _summary(clock() - start, tokens, done_at)


def run_continuous(
    engine: Any, requests: list[GenerationRequest], batch: int, clock: Callable[[], float]
) -> dict[str, float]:
    start, done_at, tokens = clock(), [], 0
    decoder, queue = engine.decoder(), list(enumerate(requests))
    while queue or decoder:
        room = batch - len(decoder)
        joining, queue = queue[:room], queue[room:]
        finished = decoder.step() + (decoder.admit(joining) if joining else [])
        now = clock() - start
        done_at += [now] * len(finished)
        tokens += sum(len(row.result.token_ids) for row in finished)
    return _summary(clock() - start, tokens, done_at)


# cpu: this process's CPU time. On a shared CPU (other jobs on the 2-core CI box) wall time swung
# 30x between runs; CPU time counts only this process's work (use one torch thread with it).
CLOCKS = {"cpu": time.process_time, "wall": time.perf_counter}


def _summary(wall: float, tokens: int, done_at: list[float]) -> dict[str, float]:
    return {
        "wall_s": round(wall, 3),
        "tokens_per_s": round(tokens / wall, 1),
        "mean_done_s": round(statistics.mean(done_at), 3),
        "p95_done_s": round(statistics.quantiles(done_at, n=20)[18], 3),
    }


def run_batching_bench(
    base_path: Path | None = None,
    n_requests: int = 128,
    batch: int = 16,
    n_adapters: int = 8,
    min_new: int = 8,
    max_new: int = 64,
    hidden: int = 256,
    layers: int = 4,
    quantization: str = "none",
    clock: str = "cpu",
) -> dict[str, Any]:
    import json
    import tempfile

    from lorafleet.bench.engine_bench import random_adapters, synthetic_base
    from lorafleet.serve.engine import GatheredLoraEngine

    with tempfile.TemporaryDirectory() as tmp:
        base = Path(base_path) if base_path else synthetic_base(Path(tmp) / "base", hidden, layers)
        engine = GatheredLoraEngine.from_pretrained(base, quantization=quantization, max_adapters=n_adapters)
        for i, folder in enumerate(random_adapters(base, Path(tmp), n_adapters)):
            engine.add_adapter(f"a{i}", folder)
        vocab = json.loads((base / "config.json").read_text())["vocab_size"]
        names: list[str | None] = [f"a{i}" for i in range(n_adapters)]
        requests = make_requests(n_requests, vocab, names, min_new, max_new)
        engine.generate(requests[:batch])  # warm-up
        out: dict[str, Any] = {
            "base": str(base_path or f"synthetic h{hidden} x{layers}"),
            "requests": n_requests,
            "batch": batch,
            "adapters": n_adapters,
            "new_tokens": [min_new, max_new],
            "quantization": quantization,
            "clock": clock,
        }
        out["static"] = run_static(engine, requests, batch, CLOCKS[clock])
        out["continuous"] = run_continuous(engine, requests, batch, CLOCKS[clock])
    out["continuous_vs_static_tokens_per_s"] = round(
        out["continuous"]["tokens_per_s"] / out["static"]["tokens_per_s"], 3
    )
    out["continuous_vs_static_mean_done"] = round(
        out["continuous"]["mean_done_s"] / out["static"]["mean_done_s"], 3
    )
    return out
