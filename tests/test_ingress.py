"""The ingress without Ray Serve: its FastAPI app driven in process (httpx.ASGITransport), a real
MLflow (SQLite) registry behind it, and a small fake replica standing in for our own replica.
Hostile and malformed input, overload, time limits, registry outages, stop strings."""

from __future__ import annotations

import asyncio
import json
import random
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
from mlflow.tracking import MlflowClient

from lorafleet import registry
from lorafleet.serve.config import AppArgs
from lorafleet.serve.ingress import IngressCore, make_app
from lorafleet.serve.names import MlflowDirectory, NameCache
from lorafleet.serve.stops import StopScanner, cut_at_stop

FP = "sha256:test-base"
BASE = "micro"
CHAT = "/v1/chat/completions"
HI = [{"role": "user", "content": "hi"}]


# ---- builders --------------------------------------------------------------------------------


class _Method:
    def __init__(self, fn: Any):
        self.remote = fn


class FakeReplica:
    """Answers like BaseReplica (token id lists, then a final dict) with scripted timing/faults."""

    def __init__(self, token_ids: list[int], per_step: int = 1, delay_s: float = 0.0, raises: Any = None):
        self.token_ids, self.per_step, self.delay_s, self.raises = token_ids, per_step, delay_s, raises
        self.final: dict = {"finish_reason": "length"}
        self.requests: list[Any] = []
        self.model_ids: list[str] = []
        self.complete, self.generate = _Method(self._complete), _Method(self._generate)

    def options(self, multiplexed_model_id: str = "", stream: bool = False) -> FakeReplica:
        self.model_ids.append(multiplexed_model_id)
        return self

    def _take(self, gen: Any) -> None:
        from lorafleet.serve.sampling import validate_request

        validate_request(gen)  # what the real engine checks first: the ingress must pass it
        self.requests.append(gen)

    async def _complete(self, gen: Any) -> dict:
        self._take(gen)
        if self.raises:
            raise self.raises
        await asyncio.sleep(self.delay_s)
        return {"token_ids": list(self.token_ids), **self.final}

    async def _generate(self, gen: Any):
        self._take(gen)
        if self.raises:
            raise self.raises
        for i in range(0, len(self.token_ids), self.per_step):
            await asyncio.sleep(self.delay_s)
            yield self.token_ids[i : i + self.per_step]
        yield dict(self.final)


class Flaky:
    """A real directory that can be taken down (refuses at once) or made slow (hangs)."""

    def __init__(self, inner: Any):
        self.inner, self.down, self.slow_s, self.calls = inner, False, 0.0, 0

    def _gate(self) -> None:
        self.calls += 1
        if self.slow_s:
            time.sleep(self.slow_s)
        if self.down or self.slow_s:
            raise ConnectionError("Connection refused: the registry is down")

    def resolve(self, ref: Any) -> Any:
        self._gate()
        return self.inner.resolve(ref)

    def exists(self, model: str) -> bool:
        self._gate()
        return self.inner.exists(model)

    def served(self) -> list[str]:
        self._gate()
        return self.inner.served()


def register(c: MlflowClient, name: str, tags: dict[str, str] | None = None) -> None:
    """A registered adapter version as the ingress sees it (its weights are never read here)."""
    c.create_registered_model(name, tags={f"{registry.T}kind": "adapter"})
    mv = c.create_model_version(
        name, "s3://lorafleet-test/never-read", tags={"base_fingerprint": FP} if tags is None else tags
    )
    c.set_registered_model_alias(name, registry.PRODUCTION, mv.version)


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> str:
    uri = f"sqlite:///{tmp_path_factory.mktemp('registry') / 'mlflow.db'}"
    c = MlflowClient(uri)
    for name in ("acme", "globex", "initech"):
        register(c, name)
    register(c, "oldie", tags={})  # registered outside lorafleet: no lineage tags
    register(c, "alien", tags={"base_fingerprint": "sha256:another-base", "base_model": "other"})
    return uri


@pytest.fixture(scope="module")
def tokenizer(micro_base):
    from lorafleet.models import load_tokenizer

    return load_tokenizer(micro_base)


class Endpoint:
    def __init__(self, core: IngressCore, replica: FakeReplica, directory: Flaky):
        self.core, self.replica, self.directory = core, replica, directory
        transport = httpx.ASGITransport(app=make_app(core), raise_app_exceptions=False)
        self.http = httpx.AsyncClient(transport=transport, base_url="http://ingress")

    async def chat(self, model: str = BASE, headers: dict | None = None, **body: Any) -> httpx.Response:
        return await self.http.post(CHAT, json={"model": model, "messages": HI, **body}, headers=headers)


@pytest.fixture
def make(store, tokenizer):
    def build(
        replica: FakeReplica | None = None, tok: Any = None, uri: str | None = None, **args: Any
    ) -> Endpoint:
        cfg = AppArgs(**{"base_model": "micro", "max_new_tokens": 32, **args})
        directory = Flaky(MlflowDirectory(lambda: MlflowClient(uri or store)))
        names = NameCache(directory, cfg.registry_timeout_s, cfg.registry_retry_s, cfg.alias_refresh_s)
        replica = replica or FakeReplica(tokenizer("the answer is 42")["input_ids"])
        core = IngressCore(cfg, replica, tok or tokenizer, 256, FP, names)
        return Endpoint(core, replica, directory)

    return build


def run(coro: Any) -> Any:
    return asyncio.run(coro)


def error_of(r: httpx.Response, status: int) -> dict:
    assert r.status_code == status, r.text
    assert r.headers["content-type"].startswith("application/json")
    body = r.json()
    assert set(body) == {"error"} and body["error"]["message"], body
    return body["error"]


def sse(r: httpx.Response) -> tuple[str, list[dict]]:
    events = [json.loads(line[6:]) for line in r.text.splitlines() if line.startswith("data: {")]
    text = "".join(
        (e["choices"][0].get("delta") or {}).get("content") or "" for e in events if e.get("choices")
    )
    return text, events


# ---- hostile and malformed input -------------------------------------------------------------


BAD = [
    ("temperature", -0.1),
    ("temperature", 2.5),
    ("top_p", 0),
    ("top_p", 1.01),
    ("seed", 2**64),
    ("seed", -(2**63) - 1),
    ("seed", 1.5),
    ("frequency_penalty", 2.1),
    ("presence_penalty", -3),
    ("logit_bias", {"abc": 1}),
    ("logit_bias", {"-3": 1}),
    ("logit_bias", {"5": 101}),
    ("logit_bias", {str(i): 1 for i in range(301)}),
    ("logit_bias", {"100000": 1}),  # outside the vocabulary
    ("stop", ["a", "b", "c", "d", "e"]),
    ("stop", ""),
    ("stop", "x" * 65),
    ("stop", ["ok", "\ufffd"]),  # a partly decoded character reads as U+FFFD: it would stop early
    ("max_tokens", 0),
    ("max_tokens", "many"),
    # JSON types as OpenAI takes them: lax coercion made these 1 token, seed 1, greedy 0.5, ...
    ("max_tokens", True),
    ("max_tokens", "12"),
    ("max_tokens", 1.5),
    ("max_completion_tokens", 2.0),
    ("seed", True),
    ("n", True),
    ("n", 0),
    ("n", -1),
    ("temperature", "0.5"),
    ("top_p", True),
    ("stream", "yes"),
    ("stream", 1),
    ("logit_bias", {"5": True}),
    ("logit_bias", {"5": -100, "05": 100}),  # one token, two values
    ("stream_options", {"include_usage": True}),  # without stream: true
    ("model", None),
    ("messages", []),
    ("messages", [{"role": "wizard", "content": "hi"}]),
    ("stream", "perhaps"),
]


@pytest.mark.parametrize(("param", "value"), BAD, ids=[f"{p}={str(v)[:20]}" for p, v in BAD])
def test_each_bad_parameter_is_a_400_naming_it(make, param, value):
    ep = make()
    body = {"model": BASE, "messages": HI, param: value}
    err = error_of(run(ep.http.post(CHAT, json=body)), 400)
    assert err["param"] == param and param in err["message"], err
    assert not ep.replica.requests


def test_nan_and_infinity_are_refused(make):
    ep = make()
    raw = b'{"model": "micro", "messages": [{"role": "user", "content": "hi"}], "temperature": NaN}'
    err = error_of(run(ep.http.post(CHAT, content=raw, headers={"content-type": "application/json"})), 400)
    assert err["param"] == "temperature"
    raw = raw.replace(b'"temperature": NaN', b'"logit_bias": {"5": Infinity}')
    assert error_of(run(ep.http.post(CHAT, content=raw)), 400)["param"] == "logit_bias"


def test_edge_values_pass_and_reach_the_replica(make):
    ep = make()
    for seed in (2**64 - 1, -(2**63)):
        r = run(ep.chat(seed=seed, temperature=1e-45, stop=["x" * 64] * 4, logit_bias={"5": -100}))
        assert r.status_code == 200, r.text
        gen = ep.replica.requests[-1]
        assert gen.seed == seed and gen.temperature == 0.0  # below the floor: greedy


def test_null_parameters_are_their_defaults(make):
    """OpenAI's spec marks these nullable; a client built from it sends null for one left unset."""
    from lorafleet.serve.api import NULLABLE

    ep = make()
    r = run(ep.chat(**dict.fromkeys(NULLABLE)))
    assert r.status_code == 200, r.text
    plain = run(ep.chat())
    assert plain.status_code == 200
    nulls, defaults = ep.replica.requests[-2:]
    assert nulls == defaults
    assert error_of(run(ep.http.post(CHAT, json={"model": None, "messages": HI})), 400)["param"] == "model"


@pytest.mark.parametrize(
    ("extra", "param"),
    [
        ({"n": 2}, "n"),
        ({"tools": [{"type": "function", "function": {"name": "f"}}]}, "tools"),
        ({"tool_choice": "auto"}, "tool_choice"),
        ({"functions": [{"name": "f"}]}, "functions"),
        ({"response_format": {"type": "json_object"}}, "response_format"),
        ({"logprobs": True}, "logprobs"),
        ({"top_logprobs": 3}, "top_logprobs"),
        (
            {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]},
            "content",
        ),
        (
            {"messages": [{"role": "user", "content": [{"type": "input_audio", "input_audio": {}}]}]},
            "content",
        ),
        ({"messages": [{"role": "tool", "content": "42", "tool_call_id": "1"}]}, "messages"),
        ({"messages": [*HI, {"role": "assistant", "content": "", "tool_calls": []}]}, "messages"),
        ({"modalities": ["text", "audio"]}, "modalities"),
        ({"stream": True, "stream_options": {"include_obfuscation": True}}, "stream_options"),
        # other servers' sampling and decoding options: ignored, they would mislead a 200
        *[
            ({name: value}, name)
            for name, value in {
                "top_k": 1,
                "min_p": 0.1,
                "repetition_penalty": 1.2,
                "min_tokens": 5,
                "ignore_eos": True,
                "guided_json": {},
                "guided_choice": ["a"],
                "chat_template": "{{ x }}",
                "add_generation_prompt": False,
                "echo": True,
                "skip_special_tokens": False,
            }.items()
        ],
    ],
)
def test_unsupported_features_are_a_400_that_says_so(make, extra, param):
    ep = make()
    err = error_of(run(ep.http.post(CHAT, json={"model": BASE, "messages": HI, **extra})), 400)
    assert err["param"] == param, err
    assert "not supported" in err["message"] or param in err["message"]
    assert not ep.replica.requests


JSON_SAMPLES = {"string": "x", "boolean": False, "integer": 0, "number": 0.5, "object": {}, "array": []}


@pytest.mark.parametrize("path", [CHAT, "/v1/completions"])
def test_every_taken_parameter_of_the_wrong_json_type_is_a_400_naming_it(make, path):
    """Each parameter taken or checked beside the served ones (user, metadata, echo, best_of,
    tools, ...) has its JSON type: a value of any other type is a 400 naming the parameter and
    the type it wants. A truthiness check took `echo: 0`, `tools: {}`, `best_of: true`, and any
    type for the harmless ones."""
    from lorafleet.serve.api import EXTRA_TYPES

    ep = make()
    body = {"model": BASE, **({"messages": HI} if path == CHAT else {"prompt": "hi"})}
    own = {"echo", "suffix", "best_of"} if path != CHAT else set()
    types = {**EXTRA_TYPES, "logprobs": ("boolean",) if path == CHAT else ("integer", "boolean")}
    for name, kinds in types.items():
        if name in {"echo", "suffix", "best_of"} - own:
            continue  # another route's parameter: refused by name (test_unsupported_features...)
        for kind, value in JSON_SAMPLES.items():
            if kind in kinds or (kind == "integer" and "number" in kinds):
                continue
            extra = {"stream": True} if name == "stream_options" else {}
            err = error_of(run(ep.http.post(path, json={**body, **extra, name: value})), 400)
            assert err["param"] == name and f"'{name}' must be" in err["message"], (name, kind, err)
    assert not ep.replica.requests


def test_completions_logprobs_zero_and_best_of_below_one_are_refused(make):
    ep = make()

    def post(**extra: Any) -> httpx.Response:
        return run(ep.http.post("/v1/completions", json={"model": BASE, "prompt": "hi", **extra}))

    assert error_of(post(logprobs=0), 400)["param"] == "logprobs"  # 0 asks for the chosen tokens'
    assert "best_of must be 1 (got 0)" in error_of(post(best_of=0), 400)["message"]
    assert error_of(post(metadata={"k": 1}), 400)["param"] == "metadata"
    assert error_of(post(metadata={f"k{i}": "v" for i in range(17)}), 400)["param"] == "metadata"
    assert post(best_of=1, echo=False, suffix="", logprobs=None, tools=[]).status_code == 200
    assert post(logprobs=False).status_code == 200  # lenient clients send false for "none"


def test_parameters_that_change_nothing_are_taken(make):
    harmless = {"user": "u1", "metadata": {"k": "v"}, "store": False, "service_tier": "auto"}
    ep = make()
    r = run(ep.chat(**harmless, parallel_tool_calls=False, modalities=["text"], tool_choice="none"))
    assert r.status_code == 200, r.text
    assert run(ep.chat(top_k=None, min_p=None)).status_code == 200  # null: not set
    named = [{"role": "user", "content": "hi", "name": "ann"}]
    assert run(ep.http.post(CHAT, json={"model": BASE, "messages": named})).status_code == 200


def _prompt_of(tokenizer, low: int, high: int) -> str:
    """A completions prompt whose token count lies in [low, high)."""
    words = 1
    while len(tokenizer(" ".join(["order"] * words))["input_ids"]) < low:
        words += 1
    text = " ".join(["order"] * words)
    assert low <= len(tokenizer(text)["input_ids"]) < high
    return text


def test_without_max_tokens_a_long_prompt_gets_the_room_the_context_leaves(make, tokenizer):
    """Context 256, cap 32: a 240-token prompt sent without max_tokens is answered in the 16 tokens
    left (it was refused, quoting a max_tokens of 32 the client never sent)."""
    ep = make()
    prompt = _prompt_of(tokenizer, 230, 250)
    r = run(ep.http.post("/v1/completions", json={"model": BASE, "prompt": prompt}))
    assert r.status_code == 200, r.text
    gen = ep.replica.requests[-1]
    assert gen.max_new_tokens == 256 - len(gen.prompt_ids) < 32
    short = run(ep.http.post("/v1/completions", json={"model": BASE, "prompt": "hi"}))
    assert short.status_code == 200 and ep.replica.requests[-1].max_new_tokens == 32


def test_a_token_limit_the_endpoint_cannot_keep_is_a_400_quoting_the_clients_value(make, tokenizer):
    ep = make()
    err = error_of(run(ep.chat(max_tokens=33)), 400)  # over the cap: it was clamped to 32 silently
    assert (
        err["param"] == "max_tokens" and "max_tokens 33 is over" in err["message"] and "32" in err["message"]
    )
    err = error_of(run(ep.chat(max_completion_tokens=1000)), 400)
    assert err["param"] == "max_completion_tokens"
    prompt = _prompt_of(tokenizer, 230, 250)
    body = {"model": BASE, "prompt": prompt, "max_tokens": 30}
    err = error_of(run(ep.http.post("/v1/completions", json=body)), 400)
    assert err["code"] == "context_length_exceeded" and "max_tokens 30" in err["message"]
    assert err["param"] == "max_tokens" and "at most" in err["message"]
    full = {"model": BASE, "prompt": _prompt_of(tokenizer, 256, 300)}
    err = error_of(run(ep.http.post("/v1/completions", json=full)), 400)
    assert err["code"] == "context_length_exceeded" and err["param"] == "prompt"
    assert not ep.replica.requests


def test_include_usage_ends_the_stream_with_the_usage(make, tokenizer):
    ids = tokenizer("the answer is 42")["input_ids"]
    ep = make(replica=FakeReplica(ids, per_step=2))
    r = run(ep.chat(stream=True, stream_options={"include_usage": True}))
    text, events = sse(r)
    assert text == "the answer is 42"
    last = events[-1]
    n_prompt = len(ep.replica.requests[-1].prompt_ids)
    assert last["choices"] == [] and last["id"] == events[0]["id"]
    assert last["usage"] == {
        "prompt_tokens": n_prompt,
        "completion_tokens": len(ids),
        "total_tokens": n_prompt + len(ids),
    }
    plain = run(ep.chat(stream=True, stream_options={"include_usage": False}))
    assert all("usage" not in e for e in sse(plain)[1])


def test_completions_refuse_echo_and_an_empty_prompt(make):
    ep = make()
    err = error_of(run(ep.http.post("/v1/completions", json={"model": BASE, "prompt": ""})), 400)
    assert err["param"] == "prompt"
    err = error_of(
        run(ep.http.post("/v1/completions", json={"model": BASE, "prompt": "a", "echo": True})), 400
    )
    assert err["param"] == "echo"
    assert run(ep.http.post("/v1/completions", json={"model": BASE, "prompt": "a"})).status_code == 200


def test_text_content_parts_are_the_text(make, tokenizer):
    ep = make()
    parts = [{"type": "text", "text": "hello"}, {"type": "text", "text": "world"}]
    msgs = [{"role": "developer", "content": "be brief"}, {"role": "user", "content": parts}]
    r = run(ep.http.post(CHAT, json={"model": BASE, "messages": msgs}))
    assert r.status_code == 200, r.text
    plain = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hello\nworld"}]
    expected = tokenizer.apply_chat_template(
        plain, add_generation_prompt=True, tokenize=True, return_dict=False
    )
    assert ep.replica.requests[-1].prompt_ids == expected


def test_a_chat_template_that_raises_is_a_400(make, micro_base):
    from lorafleet.models import load_tokenizer

    strict = load_tokenizer(micro_base)
    strict.chat_template = (
        "{% for m in messages %}{% if (m['role'] == 'user') != (loop.index0 % 2 == 0) %}"
        "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant') }}"
        "{% endif %}{{ m['content'] }}{% endfor %}"
    )
    ep = make(tok=strict)
    msgs = [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]
    err = error_of(run(ep.http.post(CHAT, json={"model": BASE, "messages": msgs})), 400)
    assert "alternate" in err["message"] and err["param"] == "messages"


def test_bodies_and_message_counts_are_bounded(make):
    ep = make(max_request_bytes=10_000, max_messages=8)
    big = {"model": BASE, "messages": [{"role": "user", "content": "x" * 20_000}]}
    assert error_of(run(ep.http.post(CHAT, json=big)), 413)["code"] == "request_too_large"

    async def chunked():  # no Content-Length: the read itself stops at the bound
        for _ in range(100):
            yield b" " * 1000

    assert error_of(run(ep.http.post(CHAT, content=chunked())), 413)["code"] == "request_too_large"
    many = {"model": BASE, "messages": HI * 9}
    assert error_of(run(ep.http.post(CHAT, json=many)), 413)["param"] == "messages"
    assert error_of(run(ep.http.post(CHAT, content=b"{not json")), 400)["code"] == "invalid_json"
    assert error_of(run(ep.http.post(CHAT, json=[1, 2])), 400)["code"] == "invalid_json"


def test_a_prompt_too_long_for_any_tokenisation_is_refused_untokenised(make, tokenizer):
    ep = make()
    longest = max(len(t) for t in tokenizer.get_vocab())
    body = {"model": BASE, "messages": [{"role": "user", "content": "x" * (256 * longest + 1)}]}
    assert error_of(run(ep.http.post(CHAT, json=body)), 400)["code"] == "context_length_exceeded"
    body = {"model": BASE, "prompt": "x" * (256 * longest + 1)}
    assert error_of(run(ep.http.post("/v1/completions", json=body)), 400)["param"] == "prompt"


def test_routes_and_methods_answer_json(make):
    ep = make()
    assert "/v1" in error_of(run(ep.http.get("/v2/chat")), 404)["message"]
    error_of(run(ep.http.get(CHAT)), 405)


def test_an_unexpected_failure_is_a_json_500(make, tokenizer):
    class Broken:
        def __getattr__(self, name: str) -> Any:
            return getattr(tokenizer, name)

        def __len__(self) -> int:
            return len(tokenizer)

        def __call__(self, *a: Any, **k: Any) -> Any:
            raise RuntimeError("tokenizer exploded")

    ep = make(tok=Broken())
    err = error_of(run(ep.http.post("/v1/completions", json={"model": BASE, "prompt": "a"})), 500)
    assert err["type"] == "server_error"


# ---- names ------------------------------------------------------------------------------------


def test_unknown_names_reveal_no_other_adapter(make):
    ep = make()
    for name in ("nobody", "bad name!"):
        err = error_of(run(ep.chat(model=name)), 404)
        assert "/v1/models" in err["message"] and "acme" not in err["message"], err
    assert "staging" in error_of(run(ep.chat(model="acme@staging")), 404)["message"]
    assert run(ep.chat(model="acme")).status_code == 200
    assert ep.replica.model_ids[-1].startswith("acme/")


def test_versions_without_lineage_or_of_another_base_are_409(make):
    ep = make()
    assert error_of(run(ep.chat(model="oldie")), 409)["code"] == "adapter_lineage_missing"
    assert error_of(run(ep.chat(model="alien")), 409)["code"] == "adapter_base_mismatch"


def test_models_lists_base_and_production_adapters(make):
    ids = [m["id"] for m in run(make().http.get("/v1/models")).json()["data"]]
    assert ids[0] == BASE and set(ids[1:]) == {"acme", "globex", "initech", "oldie", "alien"}


# ---- overload and time -----------------------------------------------------------------------


def test_backpressure_is_a_429_with_retry_after(make, tokenizer):
    from ray.serve.exceptions import BackPressureError

    ep = make(replica=FakeReplica([5], raises=BackPressureError(10, 10, retry_after_s=2.5)))
    for stream in (False, True):
        r = run(ep.chat(stream=stream))
        assert error_of(r, 429)["code"] == "overloaded" and r.headers["retry-after"] == "3"


def test_backpressure_on_a_serve_like_stream_is_a_429(make):
    """Serve's stream raises BackPressureError at the first read, and its cancel() raises it again."""
    from ray.serve.exceptions import BackPressureError

    class Refused:
        def __init__(self) -> None:
            self.error = BackPressureError(4, 4, retry_after_s=1)

        async def __anext__(self) -> Any:
            raise self.error

        def cancel(self) -> None:
            raise self.error

    replica = FakeReplica([5])
    replica.generate = _Method(lambda gen: Refused())
    r = run(make(replica=replica).chat(stream=True))
    assert error_of(r, 429)["code"] == "overloaded" and r.headers["retry-after"] == "1"


def test_a_slow_request_is_a_504(make, tokenizer):
    ids = tokenizer("one two three four")["input_ids"]
    ep = make(replica=FakeReplica(ids, delay_s=1.0), request_timeout_s=0.2)
    start = time.perf_counter()
    assert error_of(run(ep.chat()), 504)["code"] == "timeout"
    assert error_of(run(ep.chat(stream=True)), 504)["code"] == "timeout"  # before the first token
    assert time.perf_counter() - start < 1.5


def test_a_stream_past_its_deadline_ends_with_an_error_event(make, tokenizer):
    class SlowLater(FakeReplica):
        async def _generate(self, gen: Any):
            yield self.token_ids[:1]
            await asyncio.sleep(1.0)
            yield self.token_ids[1:]

    ep = make(replica=SlowLater(tokenizer("one two three")["input_ids"]), request_timeout_s=0.3)
    r = run(ep.chat(stream=True))
    assert r.status_code == 200
    _, events = sse(r)
    assert events[-1]["error"]["code"] == "timeout" and "[DONE]" not in r.text


def test_a_failed_row_is_a_400_or_500_json(make):
    ep = make()
    ep.replica.final = {"finish_reason": "error", "error": "seed out of range", "code": "invalid_request"}
    assert "seed" in error_of(run(ep.chat()), 400)["message"]
    ep.replica.final = {"finish_reason": "error", "error": "NaN logits", "code": "server_error"}
    error_of(run(ep.chat()), 500)
    r = run(ep.chat(stream=True))  # tokens went out first: the error is the stream's last event
    assert r.status_code == 200 and sse(r)[1][-1]["error"]["code"] == "server_error"
    ep.replica.token_ids = []  # fails before any token: a real status code
    error_of(run(ep.chat(stream=True)), 500)


# ---- registry outages -------------------------------------------------------------------------


def test_registry_down_known_alias_serves_new_name_503_health_ok(make):
    ep = make(alias_refresh_s=0, registry_retry_s=0.5)
    assert run(ep.chat(model="acme")).status_code == 200
    assert run(ep.http.get("/v1/models")).status_code == 200
    ep.directory.down = True
    for _ in range(3):  # refresh due at every request: each falls back to the last known version
        assert run(ep.chat(model="acme")).status_code == 200
    start = time.perf_counter()
    r = run(ep.chat(model="globex"))
    assert error_of(r, 503)["code"] == "registry_unavailable" and int(r.headers["retry-after"]) >= 1
    assert time.perf_counter() - start < 0.5
    assert run(ep.http.get("/health")).json()["status"] == "ok"
    assert run(ep.http.get("/v1/models")).status_code == 200  # the last known list
    ep.directory.down = False
    time.sleep(0.6)  # registry_retry_s: then it is asked again
    assert run(ep.chat(model="globex")).status_code == 200


def test_a_hung_registry_never_blocks_the_event_loop(make):
    ep = make(registry_timeout_s=0.3, registry_retry_s=5)
    ep.directory.slow_s = 2.0

    async def scenario() -> tuple[float, httpx.Response, float, httpx.Response]:
        t0 = time.perf_counter()
        ask = asyncio.create_task(ep.chat(model="initech"))
        await asyncio.sleep(0.05)
        health = await ep.http.get("/health")
        t_health = time.perf_counter() - t0
        r = await ask
        return t_health, health, time.perf_counter() - t0, r

    t_health, health, t_ask, r = run(scenario())
    assert health.status_code == 200 and t_health < 0.25
    assert error_of(r, 503)["code"] == "registry_unavailable" and t_ask < 1.0
    calls = ep.directory.calls
    start = time.perf_counter()
    error_of(run(ep.chat(model="initech")), 503)  # known down: answered at once, no new call
    assert time.perf_counter() - start < 0.2 and ep.directory.calls == calls


@pytest.mark.integration
def test_a_real_mlflow_server_killed_and_restarted_under_traffic(make, tmp_path, monkeypatch):
    """Known names never fail while the server is gone; a new name gets a quick 503; both work
    again once it is back, with nothing restarted on the ingress side."""
    from lorafleet.bench.registry_server import RegistryServer

    server = RegistryServer(tmp_path)
    server.start()
    try:
        for name in ("acme", "globex"):
            register(MlflowClient(server.url), name)
        monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")  # as the Serve ingress sets them
        monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "5")
        ep = make(uri=server.url, alias_refresh_s=0, registry_timeout_s=5, registry_retry_s=1)

        async def scenario() -> tuple[list[int], httpx.Response, float, httpx.Response]:
            for _ in range(30):  # a fresh server on a busy machine may miss the first timeouts
                if (await ep.chat(model="acme")).status_code == 200:
                    break
                await asyncio.sleep(1)
            codes: list[int] = []
            stop = asyncio.Event()

            async def traffic() -> None:
                while not stop.is_set():
                    codes.append((await ep.chat(model="acme")).status_code)
                    await asyncio.sleep(0.05)

            task = asyncio.create_task(traffic())
            await asyncio.to_thread(server.kill)
            t0 = time.perf_counter()
            new = await ep.chat(model="globex")
            t_new = time.perf_counter() - t0
            assert (await ep.http.get("/health")).status_code == 200
            await asyncio.to_thread(server.start)
            for _ in range(60):  # it recovers by itself: the first calls to a fresh server may be slow
                back = await ep.chat(model="globex")
                if back.status_code != 503:
                    break
                await asyncio.sleep(0.5)
            stop.set()
            await task
            return codes, new, t_new, back

        codes, new, t_new, back = run(scenario())
    finally:
        server.kill()
    assert codes and set(codes) == {200}, codes
    assert error_of(new, 503)["code"] == "registry_unavailable" and t_new < 3
    assert back.status_code == 200, back.text


# ---- stop strings -----------------------------------------------------------------------------


def brute_cut(text: str, stops: list[str]) -> str:
    """The reference: generation ends at the first character where some stop string is complete."""
    for end in range(len(text) + 1):
        done = [text[:end].rfind(s) for s in stops if text[:end].endswith(s)]
        if done:
            return text[: min(done)]
    return text


def test_stop_scanner_streams_exactly_the_cut_text():
    rng = random.Random(0)
    for _ in range(3000):
        alphabet = "ab c\n"[: rng.randint(2, 5)]
        text = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 40)))
        stops = [
            "".join(rng.choice(alphabet) for _ in range(rng.randint(1, 4))) for _ in range(rng.randint(0, 4))
        ]
        whole, _ = cut_at_stop(text, stops)
        assert whole == brute_cut(text, stops), (text, stops)
        scanner, sent, i = StopScanner(stops), [], 0
        while i < len(text) and not scanner.stopped:
            step = rng.randint(0, 5)
            piece = scanner.push(text[i : i + step])
            sent.append(piece)
            assert not any(s in "".join(sent) for s in stops)  # no stop string ever sent
            i += step
        streamed = "".join(sent) + scanner.flush()
        assert streamed == whole, (text, stops, sent)


def test_streamed_text_equals_the_whole_answer(make, tokenizer):
    text = "user asks about item 12 and the assistant answers number 84"
    ids = tokenizer(text)["input_ids"]
    for stops in ([], ["item 1"], ["answers", "nothing"], ["4"], ["zzz"]):
        ep = make(replica=FakeReplica(ids, per_step=2))
        whole = run(ep.chat(stop=stops)).json()["choices"][0]["message"]["content"]
        r = run(ep.chat(stop=stops, stream=True))
        streamed, events = sse(r)
        assert streamed == whole == cut_at_stop(text, stops)[0], (stops, streamed, whole)
        finish = events[-1]["choices"][0]["finish_reason"]
        assert finish == ("stop" if whole != text else "length")


# ---- tenants ----------------------------------------------------------------------------------


@pytest.fixture
def keys(tmp_path) -> tuple[Path, str, str]:
    from lorafleet.serve.keys import add_key

    path = tmp_path / "keys.json"
    one = add_key(path, "acme-corp", ["acme"], max_concurrent=1)
    other = add_key(path, "globex-inc", ["globex"])
    return path, one, other


def test_the_key_is_checked_before_the_body_is_read(make, keys, tokenizer):
    path, one, _ = keys

    class Counting:
        calls = 0

        def __getattr__(self, name: str) -> Any:
            Counting.calls += 1
            return getattr(tokenizer, name)

        def __len__(self) -> int:
            return len(tokenizer)

    ep = make(tok=Counting(), api_keys_file=str(path), max_request_bytes=10_000_000)
    Counting.calls = 0
    body = {"model": "acme", "messages": [{"role": "user", "content": "word " * 1_000_000}]}
    start = time.perf_counter()
    error_of(run(ep.http.post(CHAT, json=body)), 401)
    assert time.perf_counter() - start < 1.0 and Counting.calls == 0


def test_tenants_see_only_their_own_models_and_their_limits(make, keys, tokenizer):
    path, one, other = keys
    ep = make(replica=FakeReplica(tokenizer("a b c")["input_ids"], delay_s=0.3), api_keys_file=str(path))
    auth = {"authorization": f"Bearer {one}"}
    ids = [m["id"] for m in run(ep.http.get("/v1/models", headers=auth)).json()["data"]]
    assert ids == [BASE, "acme"]
    err = error_of(run(ep.chat(model="globex", headers=auth)), 404)
    assert "acme" in err["message"] and "initech" not in err["message"]

    async def two_at_once() -> list[httpx.Response]:
        return await asyncio.gather(ep.chat(model="acme", headers=auth), ep.chat(model="acme", headers=auth))

    codes = sorted(r.status_code for r in run(two_at_once()))
    assert codes == [200, 429]  # max_concurrent=1
    for stream in (True, True, False):  # each answer gives its slot back, streams included
        assert run(ep.chat(model="acme", headers=auth, stream=stream)).status_code == 200
    assert (
        error_of(run(ep.chat(model="acme", headers=auth, max_tokens=10**6 + 1)), 400)["param"] == "max_tokens"
    )
    assert run(ep.chat(model="globex", headers={"authorization": f"Bearer {other}"})).status_code == 200
    assert getattr(ep.replica.requests[-1], "tenant", "globex-inc") == "globex-inc"


def test_a_request_over_the_tenants_whole_token_budget_is_a_400_not_a_retry(make, tmp_path):
    """A request larger than the tenant's tokens a minute can never run: a 429 sent clients into
    retries a minute apart that could not succeed."""
    from lorafleet.serve.keys import add_key

    path = tmp_path / "keys.json"
    auth = {"authorization": f"Bearer {add_key(path, 'tiny-corp', ['acme'], tokens_per_minute=24)}"}
    ep = make(api_keys_file=str(path))
    r = run(ep.chat(model="acme", headers=auth, max_tokens=30))
    err = error_of(r, 400)
    assert err["code"] == "request_too_large" and "can never run" in err["message"]
    assert "retry-after" not in r.headers
    assert run(ep.chat(model="acme", headers=auth, max_tokens=2)).status_code == 200


def test_tokens_per_minute_count_the_prompt_as_well_as_the_answer(make, tmp_path, tokenizer):
    """What a request reserved (its prompt and max_tokens) is corrected on release to its prompt
    and the tokens it got: it was corrected to the answer's tokens only, so long prompts with
    max_tokens 1 ran past the limit."""
    from lorafleet.serve.keys import add_key

    path = tmp_path / "keys.json"
    auth = {"authorization": f"Bearer {add_key(path, 'tiny-corp', ['acme'], tokens_per_minute=10**4)}"}
    answer = tokenizer("one two three")["input_ids"]
    ep = make(replica=FakeReplica(answer), api_keys_file=str(path))
    prompt = ep.core.tokenizer.apply_chat_template(
        HI, add_generation_prompt=True, tokenize=True, return_dict=False
    )
    used = 0
    for stream in (False, True):
        r = run(ep.chat(model="acme", headers=auth, stream=stream, max_tokens=len(answer)))
        assert r.status_code == 200
        used += len(prompt) + len(answer)
        assert ep.core.tenants.limiter.tokens_in_window("tiny-corp") == used


class ServeLikeResponse:
    """As Serve's DeploymentResponse: a caller that stops awaiting it leaves the replica's work
    running; only cancel() stops it."""

    def __init__(self, coro: Any):
        self.task = asyncio.ensure_future(coro)
        self.cancelled = False

    def __await__(self):
        return asyncio.shield(self.task).__await__()

    def cancel(self) -> None:
        self.cancelled = True
        self.task.cancel()


def test_a_timed_out_answer_cancels_its_replica_call_and_keeps_its_reservation(make, tmp_path, tokenizer):
    """A non-streaming request past request_timeout_s: the 504 cancels the replica call (its row
    decoded on to max_tokens, holding a batch row while the tenant's slot was free again), and
    the tenant keeps what it reserved, as its row's use is not known."""
    from lorafleet.serve.keys import add_key

    path = tmp_path / "keys.json"
    auth = {"authorization": f"Bearer {add_key(path, 'tiny-corp', ['acme'], tokens_per_minute=10**4)}"}
    replica = FakeReplica(tokenizer("one two")["input_ids"], delay_s=5.0)
    calls: list[ServeLikeResponse] = []
    replica.complete = _Method(
        lambda gen: calls.append(ServeLikeResponse(replica._complete(gen))) or calls[-1]
    )
    ep = make(replica=replica, api_keys_file=str(path), request_timeout_s=0.2)

    async def timed_out() -> tuple[httpx.Response, bool]:
        r = await ep.chat(model="acme", headers=auth, max_tokens=7)
        await asyncio.sleep(0)  # the cancelled task settles
        return r, calls[-1].task.cancelled()

    r, stopped = run(timed_out())
    assert error_of(r, 504)["code"] == "timeout"
    assert calls[-1].cancelled and stopped
    prompt = ep.core.tokenizer.apply_chat_template(
        HI, add_generation_prompt=True, tokenize=True, return_dict=False
    )
    assert ep.core.tenants.limiter.tokens_in_window("tiny-corp") == len(prompt) + 7
    assert ep.core.tenants.limiter.in_flight("tiny-corp") == 0


@pytest.mark.parametrize(
    ("path", "body", "param"),
    [
        (CHAT, '{"model": "micro", "messages": [{"role": "user", "content": "hi \\ud800"}]}', "messages"),
        (
            CHAT,
            '{"model": "micro", "messages": [{"role": "user", "content": '
            '[{"type": "text", "text": "\\udfff"}]}]}',
            "messages",
        ),
        (
            CHAT,
            '{"model": "micro", "messages": [{"role": "user", "content": "hi"}], "stop": ["\\ud800"]}',
            "stop",
        ),
        ("/v1/completions", '{"model": "micro", "prompt": "a \\ud800 b"}', "prompt"),
    ],
)
def test_an_unpaired_surrogate_is_a_400_that_names_it(make, path, body, param):
    """JSON may escape a lone UTF-16 surrogate, which no tokenizer encodes: it was refused as a
    chat template failure with the tokenizer's TypeError."""
    ep = make()
    headers = {"content-type": "application/json"}
    err = error_of(run(ep.http.post(path, content=body.encode(), headers=headers)), 400)
    assert err["param"] == param and "unpaired UTF-16 surrogate" in err["message"], err
