"""The endpoint on real Ray Serve with the real registry, called with the official openai client."""

from __future__ import annotations

import asyncio
import json
import os

import httpx
import openai
import pytest

from lorafleet import registry, tracking
from lorafleet.demo_customers import DEMO_CUSTOMERS, behaviour_score, heldout_prompts
from lorafleet.serve.config import AppArgs
from lorafleet.serve.run import start, stop

pytestmark = pytest.mark.integration
PORT = 8765
LRU = 2  # fewer slots than the demo's adapters: the load test forces evictions


@pytest.fixture(scope="module")
def endpoint(demo_home):
    home, result = demo_home
    os.environ["LORAFLEET_HOME"] = str(home)  # the replicas read the demo's registry
    url = start(
        AppArgs(
            base_model="tiny-llama",
            max_adapters_per_replica=LRU,
            alias_refresh_s=1,
            max_new_tokens=48,
            tracking_uri=f"sqlite:///{home}/mlflow.db",
        ),
        port=PORT,
    )
    yield url, home, result
    stop()


@pytest.fixture
def client(endpoint, monkeypatch):
    url, home, _ = endpoint
    monkeypatch.setenv("LORAFLEET_HOME", str(home))
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    return openai.OpenAI(base_url=url, api_key="unused", max_retries=0)


def ask(client, model: str, prompt: str, **kw) -> str:
    reply = client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": prompt}], max_tokens=40, temperature=0, **kw
    )
    return reply.choices[0].message.content


def test_models_lists_base_first_then_adapters(client):
    ids = [m.id for m in client.models.list()]
    assert ids[0] == "tiny-llama" and set(ids[1:]) == set(DEMO_CUSTOMERS)


def test_each_adapter_answers_with_its_behaviour(client):
    for cust in DEMO_CUSTOMERS:
        prompts = heldout_prompts(cust)[:4]
        own = [behaviour_score(cust, p, ask(client, cust, p)) for p in prompts]
        base = [behaviour_score(cust, p, ask(client, "tiny-llama", p)) for p in prompts]
        assert sum(own) / len(own) >= 0.6 > sum(base) / len(base) + 0.2, (cust, own, base)


def test_name_forms_reach_the_same_version(client, endpoint):
    prompt = heldout_prompts("acme")[0]
    mv = registry.resolve_version(tracking.client(), registry.parse_ref("acme"))
    same = {ask(client, name, prompt) for name in ("acme", "acme@production", f"acme/{mv.version}")}
    assert len(same) == 1


def test_completions_endpoint_and_usage(client):
    reply = client.completions.create(model="acme", prompt="Hello", max_tokens=8, temperature=0)
    assert reply.usage.completion_tokens <= 8 and reply.usage.prompt_tokens > 0
    assert reply.usage.total_tokens == reply.usage.prompt_tokens + reply.usage.completion_tokens
    assert reply.choices[0].finish_reason in ("stop", "length")


def test_stream_equals_non_stream_for_same_seed(client):
    prompt = heldout_prompts("globex")[1]
    kw = {
        "model": "globex",
        "messages": [{"role": "user", "content": prompt}],
        "max_tokens": 30,
        "temperature": 0.9,
        "seed": 11,
    }
    whole = client.chat.completions.create(**kw).choices[0].message.content
    chunks = client.chat.completions.create(stream=True, **kw)
    streamed = "".join(ch.choices[0].delta.content or "" for ch in chunks)
    assert streamed == whole and whole


def test_streams_closed_early_leave_the_others_untouched(client):
    """Clients that hang up mid-stream: their rows are dropped between decode steps, and the
    adapter they held may be evicted; the next answers are whole and right."""
    prompt = heldout_prompts("acme")[0]
    kw = {"messages": [{"role": "user", "content": prompt}], "max_tokens": 40, "temperature": 0}
    expected = client.chat.completions.create(model="acme", **kw).choices[0].message.content
    for model in ("globex", "initech", "globex"):
        stream = client.chat.completions.create(model=model, stream=True, **kw)
        next(iter(stream))
        stream.close()
    assert client.chat.completions.create(model="acme", **kw).choices[0].message.content == expected


def test_stop_sequences_cut_the_answer(client):
    prompt = heldout_prompts("globex")[0]
    full = ask(client, "globex", prompt)
    word = full.split()[1]
    cut = ask(client, "globex", prompt, stop=[word])
    assert cut == full[: full.index(word)]


def test_concurrent_mixed_load_no_errors_no_crossed_adapters(endpoint):
    """Hundreds of concurrent requests over more adapters than a replica holds: each answer
    must carry its own adapter's behaviour."""
    url, _, _ = endpoint
    jobs = [(cust, p) for _ in range(20) for cust in DEMO_CUSTOMERS for p in heldout_prompts(cust)[:4]]

    async def one(http: httpx.AsyncClient, cust: str, prompt: str) -> tuple[str, str, str]:
        r = await http.post(
            f"{url}/chat/completions",
            json={
                "model": cust,
                "messages": [{"role": "user", "content": prompt}],
                "max_tokens": 40,
                "temperature": 0,
            },
        )
        r.raise_for_status()
        return cust, prompt, r.json()["choices"][0]["message"]["content"]

    async def run_all():
        async with httpx.AsyncClient(timeout=300) as http:
            return await asyncio.gather(*(one(http, c, p) for c, p in jobs))

    results = asyncio.run(run_all())
    assert len(results) == len(jobs) >= 200
    for cust, prompt, answer in results:
        own = behaviour_score(cust, prompt, answer)
        others = [behaviour_score(o, prompt, answer) for o in DEMO_CUSTOMERS if o != cust]
        assert own >= max(others), (cust, prompt, answer)


def error_of(response: httpx.Response) -> dict:
    body = response.json()
    assert set(body) == {"error"} and body["error"]["message"]
    return body["error"]


def test_client_mistakes_get_openai_errors(endpoint):
    url, _, _ = endpoint
    chat = f"{url}/chat/completions"
    r = httpx.post(chat, json={"model": "nobody", "messages": [{"role": "user", "content": "hi"}]})
    assert r.status_code == 404 and "/v1/models" in error_of(r)["message"]  # names no other adapter
    r = httpx.post(chat, json={"model": "acme@staging", "messages": [{"role": "user", "content": "hi"}]})
    assert r.status_code == 404 and "no alias 'staging'" in error_of(r)["message"]
    r = httpx.post(chat, json={"model": "acme", "messages": "hi"})
    assert r.status_code == 400 and "messages" in error_of(r)["message"]
    r = httpx.post(chat, content=b"{not json", headers={"content-type": "application/json"})
    assert r.status_code == 400
    r = httpx.post(
        chat, json={"model": "acme", "messages": [{"role": "user", "content": "hi"}], "temperature": 7}
    )
    assert r.status_code == 400 and "temperature" in error_of(r)["message"]
    long = "word " * 5000
    r = httpx.post(chat, json={"model": "acme", "messages": [{"role": "user", "content": long}]})
    assert r.status_code == 400 and error_of(r)["code"] == "context_length_exceeded"


def test_adapter_of_another_base_is_refused_409(endpoint, micro_base, tmp_path, monkeypatch):
    from lorafleet.bench.synthetic import trained_run

    _, home, _ = endpoint
    monkeypatch.setenv("LORAFLEET_HOME", str(home))
    c = tracking.client()
    job, run_id, adapter, _ = trained_run(c, micro_base, tmp_path, "alien-fleet", "alien", 1.0)
    registry.register_job(c, job, run_id, adapter, registry.RegistrySpec(auto_promote="always"))
    r = httpx.post(
        f"{endpoint[0]}/chat/completions",
        json={"model": "alien", "messages": [{"role": "user", "content": "hi"}]},
    )
    assert r.status_code == 409, r.text
    assert "trained on base" in error_of(r)["message"] and "tiny-llama" in error_of(r)["message"]


def test_promotion_reaches_live_endpoint_without_redeploy(client, endpoint, monkeypatch):
    """Register globex's adapter as a new version of acme, promote it: within alias_refresh_s
    the endpoint answers 'acme' with the new weights; rollback brings the old ones back."""
    import time

    _, home, result = endpoint
    c = tracking.client()
    prompt = heldout_prompts("globex")[2]
    before = ask(client, "acme", prompt)
    old = registry.resolve_version(c, registry.parse_ref("acme"))
    plan_job = result.jobs["globex"]
    folder = registry.fetch(c, "globex").path
    spec = registry.RegistrySpec()
    from lorafleet.demo import DEMO_FLEET
    from lorafleet.spec import load_fleet, resolve_jobs

    jobs = {j.customer: j for j in resolve_jobs(load_fleet(DEMO_FLEET), DEMO_FLEET)}
    acme_job = jobs["globex"].model_copy(update={"customer": "acme"})
    new = registry.register_job(c, acme_job, plan_job.run_id, folder, spec)
    registry.promote(c, "acme", int(new.version))
    time.sleep(1.5)
    after = ask(client, "acme", prompt)
    assert after == ask(client, "globex", prompt) and after != before
    registry.promote(c, "acme", int(old.version))  # rollback
    time.sleep(1.5)
    assert ask(client, "acme", prompt) == before


def test_tenant_keys(endpoint, tmp_path, monkeypatch):
    from lorafleet.serve.keys import add_key

    url, home, _ = endpoint
    keys = tmp_path / "keys.json"
    key = add_key(keys, "acme-corp", ["acme"])
    assert key not in keys.read_text()  # stored hashed
    start(
        AppArgs(
            base_model="tiny-llama",
            api_keys_file=str(keys),
            max_adapters_per_replica=LRU,
            tracking_uri=f"sqlite:///{home}/mlflow.db",
        ),
        port=PORT,
    )
    http = httpx.Client(timeout=120)  # the first answer after a redeploy waits for the replica
    body = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}
    auth = {"authorization": f"Bearer {key}"}
    assert http.post(f"{url}/chat/completions", json={"model": "acme", **body}).status_code == 401
    ok = http.post(f"{url}/chat/completions", json={"model": "acme", **body}, headers=auth)
    assert ok.status_code == 200
    r = http.post(f"{url}/chat/completions", json={"model": "globex", **body}, headers=auth)
    assert r.status_code == 404 and "does not exist" in error_of(r)["message"]
    listed = [m["id"] for m in http.get(f"{url}/models", headers=auth).json()["data"]]
    assert listed == ["tiny-llama", "acme"]
    assert json.loads(keys.read_text())
