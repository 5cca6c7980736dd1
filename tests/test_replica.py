"""The replica's batching core without Ray Serve: a real GatheredLoraEngine on a tiny random
Llama and real peft adapter folders, injected into a Batcher with a fetcher the test controls.

The invariant: whatever one request carries (a parameter, an adapter, a fetch that fails, a
caller that hangs up), every other request gets exactly the tokens it gets alone."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import os
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
from lorafleet.serve.engine import (
    AdapterInvalidError,
    AdapterNotSupportedError,
    AdapterSlotsFullError,
    GatheredLoraEngine,
    GenerationRequest,
)
from lorafleet.serve.fair import FairQueue

EOS = 1


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """A tiny model gains nothing from two intra-op threads, and on a busy 2-core box they wait on
    each other (measured: 1.0 s against 0.08 s for 10 tokens)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


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
    """The real engine with injected faults: binding 'poison' fails; a forward fails when a row
    whose prompt starts with PREFILL_FAULT is in its prefill, or one starting with STEP_FAULT is
    in its decode step. Counts decode steps."""

    PREFILL_FAULT, STEP_FAULT = 466, 467
    steps = 0

    def _bind(self, requests):
        if any(r.adapter == "poison" for r in requests):
            raise RuntimeError("injected bind fault")
        super()._bind(requests)
        self.bound = list(requests)

    def _forward(self, ids, batch):
        marker = self.PREFILL_FAULT if ids.shape[1] > 1 else self.STEP_FAULT
        if any(r.prompt_ids[0] == marker for r in self.bound):
            raise RuntimeError("injected prefill fault" if ids.shape[1] > 1 else "injected decode-step fault")
        self.steps += ids.shape[1] == 1
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
    """Serve's multiplex cache in miniature (ray/serve/multiplex.py): a hit returns at once; a miss
    takes the cache lock, drops the least recently used handle, then loads."""

    def __init__(self, batcher: Batcher, size: int):
        self.batcher, self.size = batcher, size
        self.held: OrderedDict = OrderedDict()
        self.lock = asyncio.Lock()

    async def get(self, name: str) -> None:
        if name in self.held:
            self.held.move_to_end(name)
            return
        async with self.lock:
            if name in self.held:
                return
            if len(self.held) >= self.size:
                self.held.popitem(last=False)[1].release()
            self.held[name] = await self.batcher.load(name)


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


def make_batcher(base, folders, max_adapters=6, **kw) -> Batcher:
    engine = FaultyEngine.from_pretrained(base, quantization="none", max_adapters=max_adapters)
    return Batcher(engine, fetcher_for(folders), **{"max_batch_size": 6, "fetch_timeout_s": 0.5} | kw)


WORDS = [f"t{i}" for i in range(100, 160)]  # stop strings: the word-level base's token texts


def good_request(rng: random.Random) -> GenerationRequest:
    """Random but valid values: sampled or greedy, stop strings, penalties, logit_bias, tenants."""
    sampled = rng.random() < 0.5
    return GenerationRequest(
        list(rng.choice(PROMPTS)),
        rng.choice([None, "a", "b"]),
        max_new_tokens=rng.randint(2, 12),
        temperature=0.8 if sampled else 0.0,
        top_p=rng.choice([1.0, 0.9]),
        seed=rng.randint(0, 2**31) if sampled else None,
        stop_token_ids=[EOS],
        stop=rng.sample(WORDS, rng.choice([0, 0, 4])),
        frequency_penalty=rng.choice([0.0, 0.0, 1.5]),
        presence_penalty=rng.choice([0.0, -0.5]),
        logit_bias=rng.choice([{}, {rng.randrange(2, 512): rng.uniform(-100, 100)}]),
        tenant=rng.choice([None, "t1", "t2"]),
    )


HOSTILE = {  # request fields that must fail (or finish) their own row and nobody else's
    "temperature 1e-45": {"temperature": 1e-45, "seed": 3},
    "seed past 64 bits": {"temperature": 0.7, "seed": 2**64},
    "negative temperature": {"temperature": -1.0},
    "infinite temperature": {"temperature": float("inf")},
    "top_p 0": {"top_p": 0.0},
    "top_p nan": {"top_p": float("nan")},
    "empty prompt": {"prompt_ids": []},
    "ids past the vocabulary": {"prompt_ids": [5, 10**6]},
    "no tokens": {"max_new_tokens": 0},
    "penalty 99": {"frequency_penalty": 99.0},
    "penalty nan": {"presence_penalty": float("nan")},
    "logit_bias off the vocabulary": {"logit_bias": {10**6: 5.0}},
    "logit_bias inf": {"logit_bias": {3: float("inf")}},
    "empty stop string": {"stop": [""]},
    "bind fault": {"adapter": "poison"},
    "prefill fault": {"prompt_ids": [FaultyEngine.PREFILL_FAULT, 5, 6]},
    "decode-step fault": {"prompt_ids": [FaultyEngine.STEP_FAULT, 5, 6], "max_new_tokens": 8},
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
    plain = GenerationRequest([5, 6, 7], None, 4)

    async def main():
        lru = Lru(batcher, size=4)
        return {name: await ask(batcher, lru, dataclasses.replace(plain, **f)) for name, f in HOSTILE.items()}

    start = time.monotonic()
    replies = asyncio.run(main())
    assert time.monotonic() - start < 2.5  # the slow fetch (3 s) was cut at its timeout
    invalid = [n for n, r in replies.items() if r.get("code") == INVALID_REQUEST]
    assert set(invalid) == {
        "negative temperature",
        "infinite temperature",
        "top_p 0",
        "top_p nan",
        "empty prompt",
        "ids past the vocabulary",
        "penalty 99",
        "penalty nan",
        "logit_bias off the vocabulary",
        "logit_bias inf",
        "empty stop string",
    }
    assert "top_p" in replies["top_p 0"]["error"] and "empty prompt" in replies["empty prompt"]["error"]
    for name in ("temperature 1e-45", "seed past 64 bits", "no tokens"):  # decodable after all
        assert replies[name]["finish_reason"] in ("stop", "length"), replies[name]
    assert replies["bind fault"]["code"] == SERVER_ERROR and "bind fault" in replies["bind fault"]["error"]
    assert replies["prefill fault"]["code"] == SERVER_ERROR
    assert replies["decode-step fault"]["code"] == SERVER_ERROR
    assert "decode-step fault" in replies["decode-step fault"]["error"]
    raised = {n: r["raised"] for n, r in replies.items() if "raised" in r}
    assert isinstance(raised["registry timeout"], RegistryUnavailableError)
    assert "did not answer within 0.3 s" in str(raised["registry timeout"])
    assert isinstance(raised["registry down"], RegistryUnavailableError)
    assert "Connection refused" in str(raised["registry down"])
    assert type(raised["unknown adapter"]) is RegistryError
    assert isinstance(raised["NaN adapter"], AdapterInvalidError) and "NaN" in str(raised["NaN adapter"])
    assert isinstance(raised["malformed adapter"], AdapterNotSupportedError)
    assert set(batcher.loaded_adapters()) == {"poison"}  # nothing half-loaded
    batcher.close()


def test_a_row_that_hits_a_stop_string_ends_there_and_frees_its_row(base, folders, reference):
    free = GenerationRequest(PROMPTS[1], "b", max_new_tokens=200)
    text = reference(dataclasses.replace(free, max_new_tokens=6))
    stop = GenerationRequest(PROMPTS[1], "b", max_new_tokens=200, stop=[f"t{text[3]}"])
    batcher = make_batcher(base, folders)

    async def main():
        return await ask(batcher, Lru(batcher, 1), stop)

    reply = asyncio.run(main())
    assert reply["token_ids"] == reference(stop) and len(reply["token_ids"]) <= 4
    assert reply["finish_reason"] == "stop" and reply["stop_text"] == stop.stop[0]
    assert len(batcher.decoder) == 0 and batcher.engine.steps < 5
    batcher.close()


def test_a_dead_mlflow_registry_fails_fast_as_unavailable(base, folders, monkeypatch):
    """The real registry code against an MLflow server that is not there."""
    from mlflow.tracking import MlflowClient

    from lorafleet import registry
    from lorafleet.serve.replica import fail_fast_mlflow

    for var in ("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "MLFLOW_HTTP_REQUEST_TIMEOUT"):
        monkeypatch.setenv(var, "unset")  # recorded, so what fail_fast_mlflow sets is undone after
        monkeypatch.delenv(var)
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "0")
    fail_fast_mlflow(2)
    assert os.environ["MLFLOW_HTTP_REQUEST_MAX_RETRIES"] == "1"
    engine = GatheredLoraEngine.from_pretrained(base, quantization="none", max_adapters=1)
    fetch = lambda name: registry.fetch(MlflowClient("http://127.0.0.1:9"), name).path  # noqa: E731
    batcher = Batcher(engine, fetch, fetch_timeout_s=5)
    start = time.monotonic()
    with pytest.raises(RegistryUnavailableError, match="could not be reached while fetching 'acme'"):
        asyncio.run(batcher.load("acme"))
    assert time.monotonic() - start < 5
    batcher.close()


def test_rows_whose_decode_step_fails_fail_alone_and_the_loop_goes_on(base, folders, reference):
    """A decode step that raises: the decoder retries its rows one by one, so only the rows
    that fail alone end (server_error); their batch mates and later requests keep their tokens."""
    rng = random.Random(1)
    faulty = [
        dataclasses.replace(good_request(rng), prompt_ids=[FaultyEngine.STEP_FAULT, 5, 6], max_new_tokens=8)
        for _ in range(3)
    ]
    mates = [dataclasses.replace(good_request(rng), max_new_tokens=10) for _ in range(3)]
    later = [good_request(rng) for _ in range(6)]
    batcher = make_batcher(base, folders)

    async def main():
        lru = Lru(batcher, size=2)
        hit = await asyncio.gather(*(ask(batcher, lru, r) for r in faulty + mates))
        return hit, await asyncio.gather(*(ask(batcher, lru, r) for r in later))

    hit, after = asyncio.run(main())
    assert all(h["code"] == SERVER_ERROR and "decode-step fault" in h["error"] for h in hit[:3]), hit
    assert [h.get("token_ids") for h in hit[3:]] == [reference(r) for r in mates]
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


def test_a_load_waits_for_a_slot_held_by_a_running_row_then_gives_up(base, folders, reference):
    """One slot, held by a's running row: b's load waits for it to finish; a load that would
    wait longer than the timeout is refused as overload, and nothing is left half-loaded."""
    long = GenerationRequest(PROMPTS[2], "a", max_new_tokens=150, stop_token_ids=[])
    short = GenerationRequest(PROMPTS[0], "b", max_new_tokens=3)

    async def main(batcher):
        lru = Lru(batcher, size=1)
        running = asyncio.create_task(ask(batcher, lru, long))
        while not batcher.decoder:
            await asyncio.sleep(0.005)
        return await ask(batcher, lru, short), await running

    waited = make_batcher(base, folders, max_adapters=1, fetch_timeout_s=30)
    second, first = asyncio.run(main(waited))
    assert first["token_ids"] == reference(long) and second["token_ids"] == reference(short)
    assert waited.loaded_adapters() == ["b"]
    waited.close()
    refused = make_batcher(base, folders, max_adapters=1, fetch_timeout_s=0.1)
    second, first = asyncio.run(main(refused))
    assert isinstance(second["raised"], AdapterSlotsFullError)
    assert first["token_ids"] == reference(long) and refused.loaded_adapters() == ["a"]
    refused.close()


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


@pytest.mark.parametrize("reserved_rows", [0, 1])
def test_a_flooding_tenant_does_not_starve_a_trickle(base, folders, reserved_rows):
    """50 queued requests of one tenant, then one of another: the second is among the first rows
    taken after it arrives (FIFO: the 47th); with a reserved row it does not even wait for a
    flood row to finish."""
    batcher = make_batcher(base, folders, max_batch_size=4, reserved_rows=reserved_rows)
    flood = [GenerationRequest(list(PROMPTS[i % 5]), None, 12, tenant="flood") for i in range(50)]
    trickle = GenerationRequest(PROMPTS[3], None, 4, tenant="trickle")
    taken, done = [], []
    take = batcher.waiting.take
    batcher.waiting.take = lambda *a, **kw: taken.extend(got := take(*a, **kw)) or got

    async def run(r: GenerationRequest):
        reply = await batcher.complete(r)
        done.append(r.tenant)
        return reply

    async def main():
        tasks = [asyncio.create_task(run(r)) for r in flood]
        while not taken:  # the flood holds the batch
            await asyncio.sleep(0.001)
        at = len(taken)
        await run(trickle)
        await asyncio.gather(*tasks)
        return at

    at = asyncio.run(main())
    tenants = [p.request.tenant for p in taken]
    assert at == 4 - reserved_rows and len(taken) == 51
    assert tenants.index("trickle") - at < 4  # in the first admission after it arrived
    if reserved_rows:  # admitted beside the flood's rows: done before any of them
        assert done[0] == "trickle"
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
    q.put("big", "B10")
    assert q.take(5, eligible=lambda tenant: tenant != "small") == ["B10"] and len(q) == 5
    with pytest.raises(ValueError, match="integers >= 1"):
        FairQueue({"x": 0})


def test_a_request_carries_its_tenants_weight_into_the_turns():
    """The keys file's weight reaches the replica on each request (the file is re-read live)."""
    q = FairQueue()
    for i in range(6):
        q.put("big", f"B{i}", weight=2)
        q.put("small", f"s{i}", weight=1)
    assert q.take(6) == ["B0", "B1", "s0", "B2", "B3", "s1"]
