"""The replica's batching core without Ray Serve: a real GatheredLoraEngine on a tiny random
Llama and real peft adapter folders, injected into a Batcher with a fetcher the test controls.

The invariant: whatever one request carries (a parameter, an adapter, a fetch that fails, a
caller that hangs up), every other request gets exactly the tokens it gets alone."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import random
import time
from collections import OrderedDict
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from test_engine import PROMPTS, make_lora

from lorafleet.bench.engine_bench import synthetic_base
from lorafleet.errors import RegistryError, RegistryUnavailableError
from lorafleet.serve.batcher import INVALID_REQUEST, SERVER_ERROR, Batcher
from lorafleet.serve.engine import AdapterNotSupportedError, GatheredLoraEngine, GenerationRequest
from lorafleet.serve.fair import FairQueue

EOS = 1


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    return synthetic_base(tmp_path_factory.mktemp("base"), hidden=128, layers=2, vocab=512)


@pytest.fixture(scope="module")
def folders(base, tmp_path_factory) -> dict[str, Path]:
    """Good adapters a and b, 'poison' (a copy of a the faulty engine refuses to bind), an adapter
    with NaN weights, and one the engine refuses at load (a bias on lora_B)."""
    root = tmp_path_factory.mktemp("adapters")
    out = {
        "a": make_lora(base, root / "a", 0, r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]),
        "b": make_lora(base, root / "b", 1, r=8, lora_alpha=16, target_modules="all-linear"),
        "poison": make_lora(base, root / "poison", 0, r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]),
        "bias": make_lora(base, root / "bias", 2, r=4, target_modules=["q_proj"], lora_bias=True),
    }
    out["nan"] = _with_nan(out["b"], root / "nan")
    return out


def _with_nan(src: Path, dest: Path) -> Path:
    dest.mkdir()
    (dest / "adapter_config.json").write_text((src / "adapter_config.json").read_text())
    tensors = load_file(src / "adapter_model.safetensors")
    key = next(k for k in tensors if "lora_B" in k)
    tensors[key] = torch.full_like(tensors[key], float("nan"))
    save_file(tensors, dest / "adapter_model.safetensors")
    return dest


class FaultyEngine(GatheredLoraEngine):
    """The real engine with injected faults: binding 'poison' fails, a prompt that starts with
    PREFILL_FAULT fails its prefill forward, and the decode step number fail_step fails."""

    PREFILL_FAULT = 466

    fail_step: int | None = None
    steps = 0

    def _bind(self, requests):
        if any(r.adapter == "poison" for r in requests):
            raise RuntimeError("injected bind fault")
        super()._bind(requests)
        self.bound = list(requests)

    def _forward(self, ids, batch):
        if ids.shape[1] > 1 and any(r.prompt_ids[0] == self.PREFILL_FAULT for r in self.bound):
            raise RuntimeError("injected prefill fault")
        if ids.shape[1] == 1:
            self.steps += 1
            if self.steps == self.fail_step:
                raise RuntimeError("injected decode-step fault")
        return super()._forward(ids, batch)


def fetcher_for(folders: dict[str, Path]):
    """Names the test's registry knows, and names that fail the ways a registry fails."""

    def fetch(name: str) -> Path:
        if name == "slow":
            time.sleep(3)
        if name == "down":
            raise ConnectionRefusedError(111, "Connection refused")
        if name == "unknown":
            raise RegistryError(f"unknown adapter '{name}'; registered adapters: a, b")
        return folders[name]

    return fetch


class Lru:
    """Serve's multiplex cache in miniature: one load per name, `size` handles, oldest dropped."""

    def __init__(self, batcher: Batcher, size: int):
        self.batcher, self.size = batcher, size
        self.held: OrderedDict = OrderedDict()
        self.locks: dict[str, asyncio.Lock] = {}

    async def get(self, name: str) -> None:
        async with self.locks.setdefault(name, asyncio.Lock()):
            if name in self.held:
                self.held.move_to_end(name)
                return
            self.held[name] = await self.batcher.load(name)
            while len(self.held) > self.size:
                self.held.popitem(last=False)[1].release()


async def ask(batcher: Batcher, lru: Lru, request: GenerationRequest) -> dict:
    """What BaseReplica.complete does: load the adapter, then the whole answer (or the load error)."""
    try:
        if request.adapter:
            await lru.get(request.adapter)
        return await batcher.complete(request)
    except Exception as exc:
        return {"raised": exc}


async def hang_up(batcher: Batcher, lru: Lru, request: GenerationRequest) -> dict:
    """A streaming caller that leaves after its first tokens."""
    await lru.get(request.adapter) if request.adapter else None
    async with contextlib.aclosing(batcher.tokens(request)) as items:
        first = await anext(items)
    return {"hung_up_after": first}


@pytest.fixture(scope="module")
def reference(base, folders):
    """Each request alone on a clean engine: the tokens every good request must get."""
    engine = GatheredLoraEngine.from_pretrained(base, quantization="none", max_adapters=2)
    for name in "ab":
        engine.add_adapter(name, folders[name])
    return lambda r: engine.generate([dataclasses.replace(r)])[0].token_ids


def make_batcher(base, folders, **kw) -> Batcher:
    engine = FaultyEngine.from_pretrained(base, quantization="none", max_adapters=6)
    return Batcher(engine, fetcher_for(folders), **{"max_batch_size": 6, "fetch_timeout_s": 0.5} | kw)


def good_request(rng: random.Random, tenant: str | None = None) -> GenerationRequest:
    sampled = rng.random() < 0.5
    return GenerationRequest(
        list(rng.choice(PROMPTS)),
        rng.choice([None, "a", "b"]),
        max_new_tokens=rng.randint(2, 12),
        temperature=0.8 if sampled else 0.0,
        top_p=rng.choice([1.0, 0.9]),
        seed=rng.randint(0, 2**31) if sampled else None,
        stop_token_ids=[EOS],
    )


HOSTILE = {  # request fields that must fail (or finish) their own row and nobody else's
    "temperature 1e-45": {"temperature": 1e-45, "seed": 3},
    "seed past 64 bits": {"temperature": 0.7, "seed": 2**64},
    "negative temperature": {"temperature": -1.0},
    "top_p 0": {"top_p": 0.0},
    "top_p nan": {"top_p": float("nan")},
    "empty prompt": {"prompt_ids": []},
    "ids past the vocabulary": {"prompt_ids": [5, 10**6]},
    "no tokens": {"max_new_tokens": 0},
    "bind fault": {"adapter": "poison"},
    "prefill fault": {"prompt_ids": [FaultyEngine.PREFILL_FAULT, 5, 6]},
    "NaN adapter": {"adapter": "nan"},
    "registry timeout": {"adapter": "slow"},
    "registry down": {"adapter": "down"},
    "unknown adapter": {"adapter": "unknown"},
    "malformed adapter": {"adapter": "bias"},
}


def test_good_requests_get_their_solo_tokens_beside_hostile_ones(base, folders, reference):
    rng = random.Random(0)
    good = [good_request(rng) for _ in range(40)]
    hostile = [
        dataclasses.replace(good_request(rng), **fields) for fields in HOSTILE.values() for _ in range(2)
    ]
    quitters = [dataclasses.replace(good_request(rng), max_new_tokens=60) for _ in range(4)]
    expected = [reference(r) for r in good]
    batcher = make_batcher(base, folders)

    async def main():
        lru = Lru(batcher, size=2)  # fewer than the adapters in use: evictions under running rows
        jobs = [("good", r, ask) for r in good] + [("hostile", r, ask) for r in hostile]
        jobs += [("quit", r, hang_up) for r in quitters]
        rng.shuffle(jobs)
        tasks = []
        for _, r, call in jobs:
            tasks.append(asyncio.create_task(call(batcher, lru, r)))
            await asyncio.sleep(rng.random() * 0.01)  # arrivals spread over the running batch
        replies = await asyncio.gather(*tasks)
        await asyncio.sleep(0.1)  # hang-ups' rows leave at the next step
        return jobs, replies

    jobs, replies = asyncio.run(main())
    by_kind = {"good": [], "hostile": [], "quit": []}
    for (kind, r, _), reply in zip(jobs, replies, strict=True):
        by_kind[kind].append((r, reply))
    got = {id(r): reply for r, reply in by_kind["good"]}
    for r, want in zip(good, expected, strict=True):
        assert got[id(r)].get("token_ids") == want and "error" not in got[id(r)], (r, got[id(r)])
    for r, reply in by_kind["hostile"]:  # each ends (no hang), alone, and says why when it fails
        assert "raised" in reply or "finish_reason" in reply, (r, reply)
        if reply.get("finish_reason") == "error":
            assert reply["code"] in (INVALID_REQUEST, SERVER_ERROR) and reply["error"], reply
    assert all("hung_up_after" in reply for _, reply in by_kind["quit"])
    assert len(batcher.decoder) == 0 and not +batcher.residency.in_use
    batcher.close()


def test_hostile_requests_get_the_answer_that_names_their_fault(base, folders):
    batcher = make_batcher(base, folders, fetch_timeout_s=0.3)

    async def main():
        lru = Lru(batcher, size=4)
        one = lambda **f: ask(batcher, lru, GenerationRequest([5, 6, 7], None, 4, **f))  # noqa: E731
        return {
            "top_p": await one(top_p=0.0),
            "empty": await ask(batcher, lru, GenerationRequest([], None, 4)),
            "slow": await one(adapter="slow"),
            "down": await one(adapter="down"),
            "unknown": await one(adapter="unknown"),
            "bias": await one(adapter="bias"),
            "after": await one(),
        }

    start = time.monotonic()
    replies = asyncio.run(main())
    assert time.monotonic() - start < 2.5  # the slow fetch (3 s) was cut at its timeout
    assert replies["top_p"]["code"] == INVALID_REQUEST and "top_p" in replies["top_p"]["error"]
    assert replies["empty"]["code"] == INVALID_REQUEST and "empty prompt" in replies["empty"]["error"]
    assert isinstance(replies["slow"]["raised"], RegistryUnavailableError)
    assert "did not answer within 0.3 s" in str(replies["slow"]["raised"])
    assert isinstance(replies["down"]["raised"], RegistryUnavailableError)
    assert "Connection refused" in str(replies["down"]["raised"])
    unknown = replies["unknown"]["raised"]
    assert isinstance(unknown, RegistryError) and not isinstance(unknown, RegistryUnavailableError)
    assert isinstance(replies["bias"]["raised"], AdapterNotSupportedError)
    assert replies["after"]["finish_reason"] in ("stop", "length")
    assert batcher.loaded_adapters() == []  # nothing half-loaded
    batcher.close()


def test_a_dead_mlflow_registry_fails_fast_as_unavailable(base, folders, monkeypatch):
    """The real registry code against an MLflow server that is not there."""
    from mlflow.tracking import MlflowClient

    from lorafleet import registry
    from lorafleet.serve.replica import fail_fast_mlflow

    for var in ("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "MLFLOW_HTTP_REQUEST_TIMEOUT"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "0")
    fail_fast_mlflow(2)
    engine = GatheredLoraEngine.from_pretrained(base, quantization="none", max_adapters=1)
    fetch = lambda name: registry.fetch(MlflowClient("http://127.0.0.1:9"), name).path  # noqa: E731
    batcher = Batcher(engine, fetch, fetch_timeout_s=5)
    start = time.monotonic()
    with pytest.raises(RegistryUnavailableError, match="could not be reached while fetching 'acme'"):
        asyncio.run(batcher.load("acme"))
    assert time.monotonic() - start < 5
    batcher.close()


def test_a_failed_decode_step_fails_its_rows_and_the_loop_goes_on(base, folders, reference):
    rng = random.Random(1)
    first = [dataclasses.replace(good_request(rng), max_new_tokens=10, stop_token_ids=[]) for _ in range(4)]
    later = [good_request(rng) for _ in range(8)]
    batcher = make_batcher(base, folders)
    batcher.engine.fail_step = 3

    async def main():
        lru = Lru(batcher, size=2)
        hit = await asyncio.gather(*(ask(batcher, lru, r) for r in first))
        return hit, await asyncio.gather(*(ask(batcher, lru, r) for r in later))

    hit, after = asyncio.run(main())
    assert all(h["code"] == SERVER_ERROR and "decode-step fault" in h["error"] for h in hit), hit
    assert [a["token_ids"] for a in after] == [reference(r) for r in later]
    batcher.close()


def test_eviction_never_removes_an_adapter_in_use(base, folders, reference):
    long = GenerationRequest(PROMPTS[2], "a", max_new_tokens=40)
    short = GenerationRequest(PROMPTS[0], "b", max_new_tokens=2)
    batcher = make_batcher(base, folders)

    async def main():
        lru = Lru(batcher, size=1)
        running = asyncio.create_task(ask(batcher, lru, long))
        while not batcher.decoder:
            await asyncio.sleep(0.005)
        mid = await ask(batcher, lru, short)  # loads b, drops a's handle while a's row runs
        assert set(batcher.loaded_adapters()) == {"a", "b"}
        done = await running
        await asyncio.sleep(0.05)
        await ask(batcher, lru, GenerationRequest(PROMPTS[1], "b", 1))  # a step: collects a
        return mid, done

    mid, done = asyncio.run(main())
    assert done["token_ids"] == reference(long) and mid["token_ids"] == reference(short)
    assert batcher.loaded_adapters() == ["b"]
    batcher.close()


def test_a_caller_that_hangs_up_frees_its_row(base, folders, reference):
    stays = GenerationRequest(PROMPTS[2], "b", max_new_tokens=12)
    leaves = GenerationRequest(PROMPTS[0], "a", max_new_tokens=200)
    batcher = make_batcher(base, folders)

    async def main():
        lru = Lru(batcher, size=2)
        kept = asyncio.create_task(ask(batcher, lru, stays))
        await hang_up(batcher, lru, leaves)
        reply = await kept
        return reply, len(batcher.decoder), batcher.engine.steps

    reply, rows_left, steps = asyncio.run(main())
    assert reply["token_ids"] == reference(stays)
    assert rows_left == 0 and steps < 40  # the 200-token row did not run on
    assert not +batcher.residency.in_use
    batcher.close()


def test_a_flooding_tenant_does_not_starve_a_trickle(base, folders):
    batcher = make_batcher(base, folders, max_batch_size=4)
    flood = [GenerationRequest(list(PROMPTS[i % 5]), None, 6, tenant="flood") for i in range(50)]
    trickle = GenerationRequest(PROMPTS[3], None, 6, tenant="trickle")
    started: list[str] = []

    async def run(r: GenerationRequest, label: str):
        async with contextlib.aclosing(batcher.tokens(r)) as items:
            async for item in items:
                if label not in started:
                    started.append(label)
                if isinstance(item, dict):
                    return item

    async def main():
        tasks = [asyncio.create_task(run(r, f"flood{i}")) for i, r in enumerate(flood)]
        while len(started) < 4:  # the first batch runs the flood
            await asyncio.sleep(0.001)
        at = len(started)
        await run(trickle, "trickle")
        await asyncio.gather(*tasks)
        return at

    at = asyncio.run(main())
    assert started.index("trickle") - at < 4  # admitted at the next rows that freed, not 46th
    batcher.close()


def test_fair_queue_round_robin_weights_and_dropped_items():
    q = FairQueue({"big": 3})
    for i in range(10):
        q.put("big", f"B{i}")
        q.put("small", f"s{i}")
    assert q.take(8) == ["B0", "B1", "B2", "s0", "B3", "B4", "B5", "s1"]
    q.put(None, "n0")  # no tenant is a tenant: it joins the turn
    assert q.take(4, drop=lambda item: item == "s2") == ["B6", "B7", "B8", "s3"]  # a drop costs no turn
    assert q.take(3) == ["n0", "B9", "s4"] and len(q) == 5
    with pytest.raises(ValueError, match="integers >= 1"):
        FairQueue({"x": 0})
