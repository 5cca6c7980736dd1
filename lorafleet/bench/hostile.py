"""Requests for the trust benchmarks: good ones (greedy, so each has one right answer) and hostile
ones drawn from the cases issue 11 reproduced (huge seeds, temperature 1e-45, bad logit_bias, long
stop lists, unknown adapters, malformed bodies, hang-ups, ...), and the HTTP client that sends
them and keeps every outcome (status, latency, answer, whether an error was in OpenAI's shape)."""

from __future__ import annotations

import asyncio
import random
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import httpx

PROMPTS = (
    "Tell me about the weather today.",
    "What is the price of a small box?",
    "How do I reset my password?",
    "Where is my order?",
)
HANGUP = -1  # status of a request the bench hung up on purpose
NO_ANSWER = 0  # status of a request that timed out or lost its connection


@dataclass
class Call:
    """One request: a JSON body or raw bytes, the headers, and how the client behaves."""

    kind: str
    body: dict | bytes
    headers: dict = field(default_factory=dict)
    path: str = "/v1/chat/completions"
    method: str = "POST"
    hangup_after_s: float | None = None  # give up waiting (the connection closes) after this
    stream_hangup: bool = False  # read the first event of a stream, then close


@dataclass
class Outcome:
    kind: str
    status: int
    latency_s: float
    started_s: float  # since the bench's clock origin
    answer: str | None = None
    error: str | None = None
    openai_shape: bool = True  # an error body of the form {"error": {"message": ...}}
    retry_after: str | None = None  # the Retry-After header of a 429 or 503


def auth(key: str | None) -> dict:
    return {"authorization": f"Bearer {key}"} if key else {}


def good_call(i: int, model: str, key: str | None, max_tokens: int, kind: str = "good") -> Call:
    body = {
        "model": model,
        "max_tokens": max_tokens,
        "temperature": 0,
        "messages": [{"role": "user", "content": PROMPTS[i % len(PROMPTS)] + f" ({i})"}],
    }
    return Call(kind, body, auth(key))


# ---- hostile requests: each maker takes (rng, a good body, key) and returns a Call -------------


def _with(**changes: Any) -> Callable[[random.Random, dict, str], Call]:
    def make(rng: random.Random, body: dict, key: str) -> Call:
        return Call("", {**body, **changes}, auth(key))

    return make


def _stream_hangup(rng: random.Random, body: dict, key: str) -> Call:
    return Call("", {**body, "stream": True, "max_tokens": 256}, auth(key), stream_hangup=True)


def _early_hangup(rng: random.Random, body: dict, key: str) -> Call:
    return Call("", {**body, "max_tokens": 256}, auth(key), hangup_after_s=rng.uniform(0.01, 0.3))


def _raw(data: bytes) -> Callable[[random.Random, dict, str], Call]:
    return lambda rng, body, key: Call("", data, auth(key) | {"content-type": "application/json"})


def _messages(messages: Any) -> Callable[[random.Random, dict, str], Call]:
    return lambda rng, body, key: Call("", {**body, "messages": messages}, auth(key))


def _empty_completion(rng: random.Random, body: dict, key: str) -> Call:
    return Call("", {"model": body["model"], "prompt": "", "max_tokens": 8}, auth(key), "/v1/completions")


HOSTILE: dict[str, Callable[[random.Random, dict, str], Call]] = {
    "huge_seed": _with(seed=2**64),
    "negative_huge_seed": _with(seed=-(2**70)),
    "tiny_temperature": _with(temperature=1e-45),
    "tiny_top_p": _with(temperature=1.0, top_p=1e-300),
    "logit_bias_not_a_token": _with(logit_bias={"not-a-token": 100}),
    "logit_bias_out_of_vocab": _with(logit_bias={"999999999": 100}),
    "logit_bias_huge": _with(logit_bias={"5": 1e308}),
    "stop_many": _with(stop=[f"s{i}" for i in range(64)]),
    "stop_long": _with(stop=["x" * 100_000]),
    "stop_empty": _with(stop=[""]),
    "huge_max_tokens": _with(max_tokens=10**12),
    "n_many": _with(n=16),
    "penalties": _with(presence_penalty=1e30, frequency_penalty=-1e30),
    "unknown_adapter": _with(model="no-such-adapter-7f3a"),
    "images": _messages([{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]),
    "bad_roles": _messages([{"role": "assistant", "content": "a"}, {"role": "assistant", "content": "b"}]),
    "content_not_text": _messages([{"role": "user", "content": 42}]),
    "many_messages": _messages([{"role": "user", "content": "a"}] * 20_000),
    "big_prompt": _messages([{"role": "user", "content": "word " * 50_000}]),
    "empty_completion": _empty_completion,
    "truncated_json": _raw(b'{"model": "x", "messages": [{"role": "user", "content": "hi"'),
    "not_utf8": _raw(b"\xff\xfe\x00garbage"),
    "json_list": _raw(b"[1, 2, 3]"),
    "stream_hangup": _stream_hangup,
    "early_hangup": _early_hangup,
}


def hostile_call(rng: random.Random, kind: str, model: str, key: str, max_tokens: int) -> Call:
    call = HOSTILE[kind](rng, good_call(rng.randrange(1000), model, key, max_tokens).body, key)
    call.kind = f"hostile:{kind}"
    if rng.random() < 0.1:  # some come without a key, or with a wrong one
        call.headers = {k: v for k, v in call.headers.items() if k != "authorization"}
        if rng.random() < 0.5:
            call.headers["authorization"] = "Bearer lf-not-a-key"
    return call


def mix_hostile(good: list[Call], share: float, models: list[str], key: str, max_tokens: int, seed: int = 0):
    """good calls with hostile ones spread among them, `share` of the total. The kinds cycle in a
    shuffled order, so even a small run meets as many kinds as it has hostile requests."""
    rng = random.Random(seed)
    kinds = sorted(HOSTILE)
    rng.shuffle(kinds)
    calls = list(good)
    for i in range(round(len(good) * share / (1 - share))):
        hostile = hostile_call(rng, kinds[i % len(kinds)], rng.choice(models), key, max_tokens)
        calls.insert(rng.randrange(len(calls) + 1), hostile)
    return calls


# ---- sending -------------------------------------------------------------------------------------


class Client:
    """One httpx client for a run, on the server's root URL (paths start with /v1 or /health);
    outcomes carry start times on the run's own clock."""

    def __init__(self, base_url: str, timeout_s: float):
        self.base_url, self.timeout_s, self.origin = base_url, timeout_s, time.perf_counter()
        self.http = httpx.AsyncClient(timeout=timeout_s, limits=httpx.Limits(max_connections=None))

    def clock(self) -> float:
        return time.perf_counter() - self.origin

    async def close(self) -> None:
        await self.http.aclose()

    async def send(self, call: Call) -> Outcome:
        t0 = time.perf_counter()
        out = Outcome(call.kind, NO_ANSWER, 0.0, t0 - self.origin)
        try:
            if call.stream_hangup:
                out.status = await self._stream_then_hang_up(call)
            else:
                await self._post(call, out)
        except TimeoutError:  # wait_for gave up: the bench hung up
            out.status = HANGUP
        except httpx.HTTPError as exc:
            out.error = f"{type(exc).__name__}: {exc}"[:200]
        out.latency_s = time.perf_counter() - t0
        return out

    async def _post(self, call: Call, out: Outcome) -> None:
        kw = {"content": call.body} if isinstance(call.body, bytes) else {"json": call.body}
        if call.method == "GET":
            kw = {}
        request = self.http.request(call.method, self.base_url + call.path, headers=call.headers, **kw)
        r = await (asyncio.wait_for(request, call.hangup_after_s) if call.hangup_after_s else request)
        out.status, out.retry_after = r.status_code, r.headers.get("retry-after")
        try:
            data = r.json()
        except ValueError:
            data = None
        if r.status_code == 200 and isinstance(data, dict) and data.get("choices"):
            choice = data["choices"][0]
            out.answer = choice["message"]["content"] if "message" in choice else choice.get("text")
        elif r.status_code != 200:
            err = data.get("error") if isinstance(data, dict) else None
            out.openai_shape = isinstance(err, dict) and "message" in err
            out.error = (err or {}).get("message", r.text[:200]) if out.openai_shape else r.text[:200]

    async def _stream_then_hang_up(self, call: Call) -> int:
        url = self.base_url + call.path
        async with self.http.stream("POST", url, json=call.body, headers=call.headers) as r:
            if r.status_code != 200:
                return r.status_code
            async for _ in r.aiter_lines():
                break  # first event: then the connection closes under the replica
        return HANGUP

    async def closed_loop(self, calls: list[Call], concurrency: int) -> tuple[list[Outcome], float]:
        """All calls, at most `concurrency` in flight; outcomes in the calls' order, and the wall."""
        sem = asyncio.Semaphore(concurrency)

        async def one(call: Call) -> Outcome:
            async with sem:
                return await self.send(call)

        t0 = time.perf_counter()
        outcomes = await asyncio.gather(*(one(c) for c in calls))
        return list(outcomes), time.perf_counter() - t0


# ---- figures -------------------------------------------------------------------------------------


def p95(values: list[float]) -> float | None:
    if not values:
        return None
    if len(values) < 2:
        return values[0]
    return statistics.quantiles(values, n=20, method="inclusive")[18]


def status_counts(outcomes: list[Outcome]) -> dict[str, int]:
    counts: dict[str, int] = {}
    for o in outcomes:
        key = {HANGUP: "hung_up", NO_ANSWER: "no_answer"}.get(o.status, str(o.status))
        counts[key] = counts.get(key, 0) + 1
    return dict(sorted(counts.items()))


def by_kind(outcomes: list[Outcome]) -> dict[str, dict[str, int]]:
    kinds: dict[str, list[Outcome]] = {}
    for o in outcomes:
        kinds.setdefault(o.kind, []).append(o)
    return {k: status_counts(v) for k, v in sorted(kinds.items())}


def ratio(a: float | None, b: float | None) -> float | None:
    return round(a / b, 3) if a is not None and b else None
