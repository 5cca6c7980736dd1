"""`lorafleet bench serve`: the endpoint over HTTP against baselines measured in the same run.

- engine level: a batch spread over N distinct adapters against the same batch on one adapter
  (lorafleet.bench.engine_bench), on the tiny base and optionally a ~100M-parameter one;
- end to end: a uniform mix over N adapters against the same requests to the base alone, and
  against a hand-written server holding every adapter in one peft model, calling
  `set_adapter` before each request;
- continuous against batch-synchronous decoding on the same requests (bench.batching_bench);
- p50/p95 latency, and cold start of an adapter from the registry to its first token.

With --hostile, --fairness, --overload or --registry-outage it runs those instead
(lorafleet.bench.trust_bench: a multi-tenant endpoint under hostile input, floods, overload and
a registry outage).
"""

import asyncio
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
from fastapi import FastAPI
from ray import serve

from lorafleet.serve import api

PROMPTS = (
    "Tell me about the weather today.",
    "What is the price of a small box?",
    "How do I reset my password?",
    "Where is my order?",
)
naive_app = FastAPI()


@serve.ingress(naive_app)
class NaivePeftServer:
    """The baseline: one peft model with every adapter, one request at a time."""

    def __init__(self, base_path: str, adapters: dict[str, str]):
        import threading

        from peft import PeftModel

        from lorafleet.models import load_base, load_tokenizer
        from lorafleet.spec import QuantizationSpec

        self.tok = load_tokenizer(Path(base_path))
        model = load_base(Path(base_path), QuantizationSpec(), "cpu")
        names = list(adapters)
        self.model = PeftModel.from_pretrained(model, adapters[names[0]], adapter_name=names[0])
        for name in names[1:]:
            self.model.load_adapter(adapters[name], adapter_name=name)
        self.lock = threading.Lock()

    @naive_app.post("/v1/chat/completions")
    def chat(self, body: api.ChatCompletionRequest) -> dict:
        import torch

        ids = self.tok.apply_chat_template(
            [m.model_dump() for m in body.messages],
            add_generation_prompt=True,
            return_tensors="pt",
            return_dict=True,
        )
        with self.lock, torch.no_grad():
            self.model.set_adapter(body.model)
            out = self.model.generate(
                **ids, max_new_tokens=body.max_tokens, do_sample=False, pad_token_id=self.tok.pad_token_id
            )
        new = out[0, ids["input_ids"].shape[1] :]
        usage = api.Usage(
            prompt_tokens=ids["input_ids"].shape[1],
            completion_tokens=len(new),
            total_tokens=ids["input_ids"].shape[1] + len(new),
        )
        return api.chat_response(body.model, self.tok.decode(new, skip_special_tokens=True), "length", usage)


async def _load(
    url: str, models: list[str], n_requests: int, concurrency: int, max_tokens: int
) -> dict[str, Any]:
    """n requests, `concurrency` in flight, models assigned round-robin (a uniform mix)."""
    sem = asyncio.Semaphore(concurrency)
    latencies: list[float] = []
    tokens = 0

    async def one(http: httpx.AsyncClient, i: int) -> None:
        nonlocal tokens
        body = {
            "model": models[i % len(models)],
            "max_tokens": max_tokens,
            "temperature": 0,
            "messages": [{"role": "user", "content": PROMPTS[i % len(PROMPTS)]}],
        }
        async with sem:
            t0 = time.perf_counter()
            r = await http.post(f"{url}/chat/completions", json=body)
            latencies.append(time.perf_counter() - t0)
        r.raise_for_status()
        tokens += r.json()["usage"]["completion_tokens"]

    start = time.perf_counter()
    async with httpx.AsyncClient(timeout=600) as http:
        await asyncio.gather(*(one(http, i) for i in range(n_requests)))
    wall = time.perf_counter() - start
    q = statistics.quantiles(latencies, n=20)
    return {
        "requests": n_requests,
        "wall_s": wall,
        "tokens_per_s": tokens / wall,
        "requests_per_s": n_requests / wall,
        "p50_s": statistics.median(latencies),
        "p95_s": q[18],
    }


def _cold_start(url: str, c: Any, base: Path, tmp: Path, base_name: str) -> dict[str, float]:
    """Registry -> replica -> first token for an adapter never loaded, against a warm one."""
    from lorafleet.bench.synthetic import register_random

    register_random(c, base, tmp, ["cold-start"], base_name)
    body = {"max_tokens": 1, "temperature": 0, "messages": [{"role": "user", "content": "hi"}]}
    timings = {}
    for label in ("cold", "warm"):
        t0 = time.perf_counter()
        reply = httpx.post(f"{url}/chat/completions", json={"model": "cold-start", **body}, timeout=120)
        reply.raise_for_status()
        timings[f"{label}_first_token_s"] = time.perf_counter() - t0
    return timings


def run_serve_bench(args: Any) -> dict[str, Any]:
    from lorafleet.bench.trust_bench import run_trust_bench, selected_modes

    if selected_modes(args):
        return run_trust_bench(args)
    return run_throughput_bench(args)


def run_throughput_bench(args: Any) -> dict[str, Any]:
    from lorafleet import registry, tracking
    from lorafleet.bench.batching_bench import run_batching_bench
    from lorafleet.bench.engine_bench import run_engine_bench
    from lorafleet.models import resolve_base
    from lorafleet.serve.config import AppArgs
    from lorafleet.serve.run import start, stop

    n, results = args.adapters, {}
    base = resolve_base(args.base_model)
    results["engine_tiny"] = run_engine_bench(base_path=base, n_adapters=n)
    results["engine_batching_tiny"] = run_batching_bench(base_path=base, n_adapters=min(n, 8))
    if args.large:
        results["engine_100m"] = run_engine_bench(None, n_adapters=n, hidden=768, layers=12)
    with tempfile.TemporaryDirectory() as tmp:
        home = Path(tmp)
        import os

        os.environ["LORAFLEET_HOME"] = str(home)
        c = tracking.client()
        from lorafleet.bench.synthetic import register_random

        app_args = AppArgs(
            base_model=args.base_model,
            max_adapters_per_replica=n + 2,
            max_batch_size=16,
            tracking_uri=f"sqlite:///{home}/mlflow.db",
        )
        customers = register_random(
            c, base, home, [f"tenant-{i}" for i in range(n)], app_args.display_base_name()
        )
        url = start(app_args, port=8123)
        try:
            for name in customers:  # warm: every adapter loaded once before timing
                httpx.post(
                    f"{url}/chat/completions",
                    timeout=120,
                    json={"model": name, "max_tokens": 1, "messages": [{"role": "user", "content": "hi"}]},
                )
            run = lambda models: asyncio.run(_load(url, models, args.requests, 16, 32))  # noqa: E731
            results["http_base_only"] = run([app_args.display_base_name()])
            results["http_mixed"] = run(customers)
            results["cold_start"] = _cold_start(url, c, base, home, app_args.display_base_name())
        finally:
            stop()
        folders = {cu: str(registry.fetch(c, cu).path) for cu in customers}
        serve.run(
            serve.deployment(NaivePeftServer).bind(str(base), folders),
            name="naive",
            route_prefix="/",
            blocking=False,
        )
        naive_url = "http://127.0.0.1:8000/v1"
        naive = _load(naive_url, customers, args.requests // 2, 16, 32)
        results["http_naive_set_adapter"] = asyncio.run(naive)
        serve.shutdown()
    mixed, base_only, naive = (
        results[k]["tokens_per_s"] for k in ("http_mixed", "http_base_only", "http_naive_set_adapter")
    )
    results["ratios"] = {
        "engine_distinct_vs_one_adapter": results["engine_tiny"].get("distinct_vs_one_adapter"),
        "http_mixed_vs_base_only": mixed / base_only,
        "http_mixed_vs_naive_set_adapter": mixed / naive,
    }
    return results
