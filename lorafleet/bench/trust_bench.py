"""`lorafleet bench serve --hostile --fairness --overload --registry-outage`: issue 11's figures for
a multi-tenant endpoint, each against its own baseline measured in the same run, over HTTP with
tenant keys (a temporary keys file) on whatever the endpoint is today.

- hostile: good requests' throughput with 10% hostile requests mixed in against a clean run;
  misrouted good answers (greedy: each compared with its clean answer); 5xx counts. Goal >= 0.9x,
  0 misrouted, 0 5xx.
- fairness: tenant 'flood' keeps `--flood` long requests in flight while tenant 'trickle' sends
  one at a time: trickle's p95 against its p95 alone. Goal <= 2x.
- overload: requests arriving at 2x the measured capacity: share of 429s, p95 of the admitted
  against light load.
- registry outage: a real `mlflow server` killed for `--outage-s` under traffic, then restarted:
  failed requests for already-loaded adapters (goal 0), /health, a new adapter during the outage.
"""

from __future__ import annotations

import asyncio
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import yaml

from lorafleet.bench.hostile import (
    Call,
    Client,
    Outcome,
    by_kind,
    good_call,
    mix_hostile,
    p95,
    ratio,
    status_counts,
)
from lorafleet.bench.registry_server import RegistryServer
from lorafleet.settings import environ

MODES = ("fairness", "overload", "hostile", "registry_outage")  # run in this order
TENANTS = ("bench", "flood", "trickle")


@dataclass
class Endpoint:
    root: str  # http://host:port (the OpenAI API is under /v1)
    adapters: list[str]  # registered, promoted and loaded before any timing
    keys: dict[str, str]  # tenant -> key
    max_batch_size: int
    registry: RegistryServer | None = None
    unloaded: str | None = None  # registered, never requested (the registry outage mode)


# ---- the endpoint --------------------------------------------------------------------------------


def parse_app_args(items: list[str]) -> dict[str, Any]:
    """--app-arg key=value (YAML values): fields today's AppArgs may or may not have."""
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep:
            raise ValueError(f"--app-arg {item!r}: expected key=value")
        out[key.strip()] = yaml.safe_load(value)
    return out


def bench_app_args(args: Any, tracking_uri: str, keys_file: Path) -> Any:
    from lorafleet.serve.config import AppArgs

    fields = {
        "base_model": args.base_model,
        "max_adapters_per_replica": args.adapters + 2,
        "max_batch_size": 16,
        "max_new_tokens": max(args.long_tokens, args.max_tokens),
        "tracking_uri": tracking_uri,
        "api_keys_file": str(keys_file),
        "alias_refresh_s": 1.0,  # resolved aliases go stale during an outage: the fallback is measured
    }
    return AppArgs.model_validate(fields | parse_app_args(args.app_arg or []))


def _warm(root: str, adapters: list[str], key: str) -> None:
    """Every adapter loaded once before timing; a failure here is the endpoint's, so say which."""
    for name in adapters:
        r = httpx.post(
            f"{root}/v1/chat/completions",
            timeout=300,
            headers={"authorization": f"Bearer {key}"},
            json={"model": name, "max_tokens": 1, "messages": [{"role": "user", "content": "hi"}]},
        )
        if r.status_code != 200:
            raise RuntimeError(f"warming {name}: {r.status_code} {r.text[:300]}")


def _deploy(args: Any, home: Path, tracking_uri: str, registry: RegistryServer | None) -> Endpoint:
    from lorafleet import tracking
    from lorafleet.bench.synthetic import register_random
    from lorafleet.models import resolve_base
    from lorafleet.serve.keys import add_key
    from lorafleet.serve.run import start

    keys_file = home / "keys.json"
    keys = {t: add_key(keys_file, t, ["*"]) for t in TENANTS}
    cfg = bench_app_args(args, tracking_uri, keys_file)
    adapters = [f"tenant-{i}" for i in range(args.adapters)]
    unloaded = "unloaded-0" if registry else None
    base = resolve_base(args.base_model)
    register_random(
        tracking.client(), base, home, adapters + ([unloaded] if unloaded else []), cfg.display_base_name()
    )
    url = start(cfg, port=args.port)
    root = url.removesuffix("/v1")
    _warm(root, adapters, keys["bench"])
    return Endpoint(root, adapters, keys, cfg.max_batch_size, registry, unloaded)


@contextmanager
def trust_endpoint(args: Any, home: Path) -> Iterator[Endpoint]:
    """Adapters registered (in a real mlflow server when the outage mode runs, else SQLite),
    an endpoint with tenant keys, every adapter warm; everything stopped on the way out."""
    from lorafleet.serve.run import stop

    registry = RegistryServer(home) if args.registry_outage else None
    uri = f"sqlite:///{home}/mlflow.db"
    try:
        if registry:
            registry.start()
            uri = registry.url
        with environ({"MLFLOW_TRACKING_URI": uri, "LORAFLEET_HOME": str(home)}):
            try:
                yield _deploy(args, home, uri, registry)
            finally:
                stop()
    finally:
        if registry:
            registry.kill()


# ---- (a) hostile requests ------------------------------------------------------------------------


def _good_calls(ep: Endpoint, n: int, max_tokens: int) -> list[Call]:
    return [good_call(i, ep.adapters[i % len(ep.adapters)], ep.keys["bench"], max_tokens) for i in range(n)]


def _mismatches(a: list[Outcome], b: list[Outcome]) -> int:
    return sum(x.status == y.status == 200 and x.answer != y.answer for x, y in zip(a, b, strict=True))


async def hostile_mode(ep: Endpoint, args: Any) -> dict[str, Any]:
    client = Client(ep.root, args.timeout_s)
    good = _good_calls(ep, args.requests, args.max_tokens)
    try:
        clean, clean_wall = await client.closed_loop(good, 16)
        control, _ = await client.closed_loop(good, 16)  # the noise floor of "same answer"
        mixed = mix_hostile(good, 0.1, ep.adapters, ep.keys["bench"], args.max_tokens)
        outcomes, wall = await client.closed_loop(mixed, 16)
    finally:
        await client.close()
    good_out = [o for c, o in zip(mixed, outcomes, strict=True) if c.kind == "good"]
    hostile = [o for o in outcomes if o.kind != "good"]
    clean_rps = sum(o.status == 200 for o in clean) / clean_wall
    mixed_rps = sum(o.status == 200 for o in good_out) / wall
    server_errors = [o for o in outcomes if o.status >= 500]
    return {
        "good_requests": len(good),
        "hostile_requests": len(hostile),
        "clean_good_per_s": round(clean_rps, 2),
        "mixed_good_per_s": round(mixed_rps, 2),
        "good_throughput_ratio": ratio(mixed_rps, clean_rps),
        "misrouted_good": _mismatches(clean, good_out),
        "clean_vs_clean_mismatches": _mismatches(clean, control),
        "good_not_200": sum(o.status != 200 for o in good_out),
        "clean_not_200": sum(o.status != 200 for o in clean),
        "5xx": len(server_errors),
        "errors_not_in_openai_shape": sum(not o.openai_shape for o in outcomes if o.status >= 400),
        "good_statuses": status_counts(good_out),
        "hostile_statuses": by_kind(hostile),
        "5xx_examples": [(o.kind, o.status, o.error) for o in server_errors[:8]],
        "goal": "ratio >= 0.9, misrouted 0, 5xx 0",
    }


# ---- (b) fairness --------------------------------------------------------------------------------


async def _trickle(client: Client, ep: Endpoint, n: int, model: str, max_tokens: int) -> list[Outcome]:
    """One request at a time."""
    return [
        await client.send(good_call(i, model, ep.keys["trickle"], max_tokens, "trickle")) for i in range(n)
    ]


async def _flood(client: Client, ep: Endpoint, width: int, model: str, tokens: int, stop: asyncio.Event):
    """`width` requests always in flight until stop; each finishes (no hang-ups here)."""
    outcomes: list[Outcome] = []

    async def worker(w: int) -> None:
        i = 0
        while not stop.is_set():
            outcomes.append(
                await client.send(good_call(w * 10_000 + i, model, ep.keys["flood"], tokens, "flood"))
            )
            i += 1

    await asyncio.gather(*(worker(w) for w in range(width)))
    return outcomes


async def fairness_mode(ep: Endpoint, args: Any) -> dict[str, Any]:
    client = Client(ep.root, args.timeout_s)
    trickle_model, flood_model = ep.adapters[0], ep.adapters[1 % len(ep.adapters)]
    try:
        alone = await _trickle(client, ep, args.trickle, trickle_model, args.max_tokens)
        stop = asyncio.Event()
        flood = asyncio.create_task(_flood(client, ep, args.flood, flood_model, args.long_tokens, stop))
        await asyncio.sleep(2.0)  # the flood fills every slot and queue first
        under = await _trickle(client, ep, args.trickle, trickle_model, args.max_tokens)
        stop.set()
        flooded = await flood
    finally:
        await client.close()
    ok = lambda outs: [o.latency_s for o in outs if o.status == 200]  # noqa: E731
    alone_p95, under_p95 = p95(ok(alone)), p95(ok(under))
    return {
        "flood_in_flight": args.flood,
        "flood_max_tokens": args.long_tokens,
        "trickle_requests": args.trickle,
        "trickle_p95_alone_s": alone_p95,
        "trickle_p95_under_flood_s": under_p95,
        "trickle_p95_ratio": ratio(under_p95, alone_p95),
        "trickle_statuses_alone": status_counts(alone),
        "trickle_statuses_under_flood": status_counts(under),
        "flood_statuses": status_counts(flooded),
        "goal": "trickle_p95_ratio <= 2",
    }


# ---- (c) overload --------------------------------------------------------------------------------


async def _open_loop(client: Client, calls: Iterator[Call], rate: float, duration_s: float) -> list[Outcome]:
    """Arrivals at a fixed rate whatever the answers do (clients past capacity keep coming)."""
    loop = asyncio.get_running_loop()
    t0, tasks = loop.time(), []
    while loop.time() - t0 < duration_s:
        tasks.append(asyncio.create_task(client.send(next(calls))))
        await asyncio.sleep(max(0.0, t0 + len(tasks) / rate - loop.time()))
    return list(await asyncio.gather(*tasks))


def _calls_forever(ep: Endpoint, max_tokens: int) -> Iterator[Call]:
    i = 0
    while True:
        yield good_call(i, ep.adapters[i % len(ep.adapters)], ep.keys["bench"], max_tokens)
        i += 1


async def overload_mode(ep: Endpoint, args: Any) -> dict[str, Any]:
    client = Client(ep.root, args.timeout_s)
    try:
        light, _ = await client.closed_loop(_good_calls(ep, 8, args.max_tokens), 1)
        saturated, wall = await client.closed_loop(
            _good_calls(ep, args.requests, args.max_tokens), ep.max_batch_size
        )
        capacity = sum(o.status == 200 for o in saturated) / wall
        offered = await _open_loop(client, _calls_forever(ep, args.max_tokens), 2 * capacity, args.overload_s)
    finally:
        await client.close()
    admitted = [o.latency_s for o in offered if o.status == 200]
    light_p95, admitted_p95 = p95([o.latency_s for o in light if o.status == 200]), p95(admitted)
    share = lambda pred: round(sum(pred(o) for o in offered) / max(len(offered), 1), 3)  # noqa: E731
    return {
        "capacity_per_s": round(capacity, 2),
        "offered_per_s": round(2 * capacity, 2),
        "offered": len(offered),
        "statuses": status_counts(offered),
        "share_429": share(lambda o: o.status == 429),
        "share_5xx": share(lambda o: o.status >= 500),
        "share_no_answer": share(lambda o: o.status == 0),
        "429_with_retry_after": sum(o.status == 429 and o.retry_after is not None for o in offered),
        "p95_light_s": light_p95,
        "p95_admitted_s": admitted_p95,
        "p95_admitted_vs_light": ratio(admitted_p95, light_p95),
        "goal": "past capacity, 429s at once; the admitted keep a p95 near light load",
    }


# ---- (d) registry outage -------------------------------------------------------------------------


async def _traffic(
    client: Client, ep: Endpoint, phase: dict, stop: asyncio.Event, args: Any
) -> list[Outcome]:
    """Closed-loop requests for loaded adapters (by alias name), tagged with the phase they began in."""
    outcomes: list[Outcome] = []

    async def worker(w: int) -> None:
        i = 0
        while not stop.is_set():
            name = phase["name"]
            model = ep.adapters[(w + i) % len(ep.adapters)]
            out = await client.send(good_call(i, model, ep.keys["bench"], args.max_tokens, f"loaded:{name}"))
            outcomes.append(out)
            i += 1

    await asyncio.gather(*(worker(w) for w in range(4)))
    return outcomes


async def _health(client: Client, phase: dict, stop: asyncio.Event) -> list[Outcome]:
    outcomes = []
    while not stop.is_set():
        call = Call(f"health:{phase['name']}", b"", path="/health", method="GET", hangup_after_s=2.0)
        outcomes.append(await client.send(call))
        await asyncio.sleep(1.0)
    return outcomes


async def _outage(ep: Endpoint, args: Any, phase: dict, client: Client) -> dict[str, Any]:
    """Kill the registry, ask for a never-loaded adapter half-way (without waiting for it: the
    outage lasts outage_s whatever the endpoint does), restart it, let traffic go on."""
    assert ep.registry is not None and ep.unloaded is not None  # set up by trust_endpoint
    new = lambda kind: good_call(0, ep.unloaded, ep.keys["bench"], 4, kind)  # noqa: E731
    await asyncio.sleep(args.outage_before_s)
    phase["name"] = "outage"
    await asyncio.to_thread(ep.registry.kill)
    await asyncio.sleep(args.outage_s / 2)
    during = asyncio.create_task(client.send(new("new_adapter:outage")))
    await asyncio.sleep(args.outage_s / 2)
    phase["name"] = "restarting"
    restart_s = await asyncio.to_thread(ep.registry.start)
    phase["name"], restarted_at = "after", client.clock()
    await asyncio.sleep(args.outage_after_s)
    after = await client.send(new("new_adapter:after"))
    return {
        "restart_s": round(restart_s, 1),
        "restarted_at": restarted_at,
        "new_adapter_during": await during,
        "new_adapter_after": after,
    }


def _phase_summary(outcomes: list[Outcome]) -> dict[str, Any]:
    phases: dict[str, list[Outcome]] = {}
    for o in outcomes:
        phases.setdefault(o.kind.split(":", 1)[1], []).append(o)
    return {
        name: {
            "statuses": status_counts(outs),
            "failed": sum(o.status != 200 for o in outs),
            "max_latency_s": round(max(o.latency_s for o in outs), 2),
        }
        for name, outs in phases.items()
    }


def _first_ok_after(outcomes: list[Outcome], since: float) -> float | None:
    """Seconds from the registry's return to the first answer of a request sent after it."""
    done = [o.started_s + o.latency_s for o in outcomes if o.status == 200 and o.started_s >= since]
    return round(min(done) - since, 2) if done else None


def _brief(o: Outcome) -> dict[str, Any]:
    return {"status": o.status, "latency_s": round(o.latency_s, 2), "error": o.error}


async def registry_outage_mode(ep: Endpoint, args: Any) -> dict[str, Any]:
    client = Client(ep.root, args.timeout_s)
    phase, stop = {"name": "before"}, asyncio.Event()
    try:
        traffic = asyncio.create_task(_traffic(client, ep, phase, stop, args))
        health = asyncio.create_task(_health(client, phase, stop))
        try:
            events = await _outage(ep, args, phase, client)
        finally:
            stop.set()
            loaded, probes = await traffic, await health
    finally:
        await client.close()
    phases = _phase_summary(loaded)
    return {
        "outage_s": args.outage_s,
        "loaded_adapter_requests": phases,  # by the phase a request was sent in
        "failed_loaded_requests": sum(p["failed"] for p in phases.values()),
        "loaded_first_ok_after_restart_s": _first_ok_after(loaded, events["restarted_at"]),
        "health": _phase_summary(probes),  # every 1 s; 'hung_up' = no answer within 2 s
        "new_adapter_during_outage": _brief(events["new_adapter_during"]),
        "new_adapter_after_restart": _brief(events["new_adapter_after"]),
        "registry_restart_s": events["restart_s"],
        "goal": "0 failed for loaded adapters; /health answers; a new adapter gets a quick 503",
    }


# ---- the run -------------------------------------------------------------------------------------

RUNNERS = {
    "fairness": fairness_mode,
    "overload": overload_mode,
    "hostile": hostile_mode,
    "registry_outage": registry_outage_mode,
}


def selected_modes(args: Any) -> list[str]:
    return [m for m in MODES if getattr(args, m, False)]


def run_trust_bench(args: Any) -> dict[str, Any]:
    """One endpoint for all selected modes; a mode that fails is reported and the next one runs."""
    results: dict[str, Any] = {"modes": selected_modes(args)}
    with tempfile.TemporaryDirectory() as tmp, trust_endpoint(args, Path(tmp)) as ep:
        results["adapters"] = len(ep.adapters)
        for mode in results["modes"]:
            try:
                results[mode] = asyncio.run(RUNNERS[mode](ep, args))
            except Exception as exc:  # the figure is "it broke": keep it and go on
                results[mode] = {"error": f"{type(exc).__name__}: {exc}"[:500]}
    return results
