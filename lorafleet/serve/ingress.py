"""The OpenAI-compatible HTTP ingress: resolves `model` to a registry version (or the base),
enforces tenant keys, tokenizes, and streams from the replica that holds the adapter.

(No `from __future__ import annotations` here: FastAPI must see the real types.)
"""

import json
import os
import time
import uuid
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from ray import serve
from ray.serve.metrics import Counter, Histogram

from lorafleet.serve import api
from lorafleet.serve.config import AppArgs
from lorafleet.serve.text import IncrementalDecoder, cut_at_stop

app = FastAPI(title="lorafleet", docs_url=None, redoc_url=None)


@app.exception_handler(api.ApiError)
async def _api_error(_: Request, exc: api.ApiError) -> JSONResponse:
    return JSONResponse(exc.body(), status_code=exc.status)


@app.exception_handler(RequestValidationError)
async def _bad_body(_: Request, exc: RequestValidationError) -> JSONResponse:
    first = exc.errors()[0]
    where = ".".join(str(p) for p in first["loc"] if p != "body")
    err = api.ApiError(400, f"invalid request: {where}: {first['msg']}", param=where or None)
    return JSONResponse(err.body(), status_code=400)


def _context_length(base_path: Any, tokenizer: Any) -> int:
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(base_path)
    return int(getattr(config, "max_position_embeddings", None) or tokenizer.model_max_length)


def _message(exc: Exception) -> str:
    """The user-facing line of an error that crossed Ray (which wraps it in a traceback)."""
    cause = getattr(exc, "cause", None) or exc
    return str(cause).strip().splitlines()[-1]


# helpers above the class: serve.ingress copies the class when it is defined


async def _with_one_retry(call: Any) -> Any:
    """A non-streaming answer is all or nothing, so when its replica dies under it (a lost node)
    asking again is safe: Serve routes the retry to a live replica. Streams are not retried
    (tokens may already be out)."""
    from ray.exceptions import RayActorError  # the actor died or is unreachable

    try:
        return await call()
    except RayActorError:
        return await call()


@serve.ingress(app)
class Ingress:
    def __init__(self, replica: Any, args: dict[str, Any]):
        from lorafleet.models import fingerprint, load_tokenizer, resolve_base

        self.args = AppArgs.model_validate(args)
        if self.args.tracking_uri:
            os.environ["MLFLOW_TRACKING_URI"] = self.args.tracking_uri
        self.replica = replica
        base_path = resolve_base(self.args.base_model)
        self.base_fingerprint = fingerprint(base_path)
        self.tokenizer = load_tokenizer(base_path)
        self.context = _context_length(base_path, self.tokenizer)
        self.base_name = self.args.display_base_name()
        self.resolved: dict[str, tuple[float, Any]] = {}  # name -> (when, ModelVersion)
        self.keys = self._load_keys()
        self.requests = Counter("lorafleet_requests", "requests", tag_keys=("adapter", "status"))
        self.tokens = Counter("lorafleet_generated_tokens", "tokens generated", tag_keys=("adapter",))
        self.latency = Histogram(
            "lorafleet_request_latency_s",
            "request latency",
            boundaries=[0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30],
            tag_keys=("adapter",),
        )

    def _load_keys(self) -> dict | None:
        from lorafleet.serve.keys import load_keys

        return load_keys(self.args.api_keys_file) if self.args.api_keys_file else None

    # ---- routes ------------------------------------------------------------------------

    @app.get("/v1/models")
    async def models(self, request: Request) -> dict:
        from lorafleet import registry, tracking
        from lorafleet.serve.keys import allows

        tenant = self._tenant(request)
        cards = [api.model_card(self.base_name, "lorafleet")] if tenant is None or tenant.base else []
        for model in registry.adapter_models(tracking.client()):
            customer = model.name.removeprefix(self.args.adapter_prefix)
            if "production" in (model.aliases or {}) and (tenant is None or allows(tenant, customer)):
                cards.append(api.model_card(customer, "lorafleet"))
        return {"object": "list", "data": cards}

    @app.post("/v1/chat/completions")
    async def chat(self, body: api.ChatCompletionRequest, request: Request) -> Any:
        messages = [m.model_dump() for m in body.messages]
        ids = self.tokenizer.apply_chat_template(
            messages, add_generation_prompt=True, tokenize=True, return_dict=False
        )
        return await self._complete(body, request, ids, chat=True)

    @app.post("/v1/completions")
    async def completions(self, body: api.CompletionRequest, request: Request) -> Any:
        ids = self.tokenizer(body.prompt)["input_ids"]
        return await self._complete(body, request, ids, chat=False)

    @app.get("/health")
    async def health(self) -> dict:
        return {"status": "ok", "base": self.base_name}

    # ---- the path every completion takes -----------------------------------------------

    async def _complete(self, body: Any, request: Request, ids: list[int], chat: bool) -> Any:
        adapter_id = self._resolve(body.model, self._tenant(request))
        max_new = min(body.new_tokens(self.args.max_new_tokens), self.args.max_new_tokens)
        if len(ids) + max_new > self.context:
            raise api.ApiError(
                400,
                f"prompt is {len(ids)} tokens and max_tokens {max_new}; the "
                f"context length is {self.context}: shorten the prompt or max_tokens",
                code="context_length_exceeded",
                param="messages" if chat else "prompt",
            )
        gen = self._request(body, ids, max_new)
        tag = {"adapter": adapter_id or self.base_name}
        replica = self.replica.options(multiplexed_model_id=adapter_id or "", stream=body.stream)
        if body.stream:
            stream = replica.generate.remote(gen)
            return StreamingResponse(self._sse(stream, body, chat, tag), media_type="text/event-stream")
        return await self._collect(lambda: replica.complete.remote(gen), body, chat, len(ids), tag)

    def _request(self, body: Any, ids: list[int], max_new: int) -> Any:
        from lorafleet.serve.engine import GenerationRequest

        return GenerationRequest(
            prompt_ids=ids,
            adapter=None,
            max_new_tokens=max_new,
            temperature=body.temperature,
            top_p=body.top_p,
            seed=body.seed,
            stop_token_ids=[self.tokenizer.eos_token_id],
        )

    async def _collect(self, call: Any, body: Any, chat: bool, n_prompt: int, tag: dict) -> JSONResponse:
        start = time.perf_counter()
        try:
            final = await _with_one_retry(call)
        except Exception as exc:  # the replica could not load or run the adapter
            raise self._replica_error(exc, tag) from None
        self._check_final(final, tag)
        n = len(final["token_ids"])
        text, stopped = cut_at_stop(
            self.tokenizer.decode(final["token_ids"], skip_special_tokens=True), body.stop
        )
        finish = "stop" if stopped else final.get("finish_reason", "stop")
        self._record(tag, n, start, "ok")
        usage = api.Usage(prompt_tokens=n_prompt, completion_tokens=n, total_tokens=n_prompt + n)
        make = api.chat_response if chat else api.completion_response
        return JSONResponse(
            make(body.model, text, finish, usage), headers={"x-lorafleet-replica": final.get("replica", "")}
        )

    async def _sse(self, stream: Any, body: Any, chat: bool, tag: dict):
        cid = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex[:24]}"
        chunk = api.chat_chunk if chat else api.completion_chunk
        start, decoder, sent, n, finish = time.perf_counter(), IncrementalDecoder(self.tokenizer), "", 0, None
        try:
            async for item in stream:
                if isinstance(item, dict):
                    self._check_final(item, tag)
                    finish = item.get("finish_reason", "stop")
                    break
                n += len(item)
                full, stopped = cut_at_stop(sent + "".join(decoder.push(t) for t in item), body.stop)
                if full != sent:
                    yield f"data: {json.dumps(chunk(cid, body.model, full[len(sent) :], None))}\n\n"
                    sent = full
                if stopped:
                    finish = "stop"
                    break
        except Exception as exc:  # headers are sent: the error travels as an event
            err = exc if isinstance(exc, api.ApiError) else self._replica_error(exc, tag)
            yield f"data: {json.dumps(err.body())}\n\n"
            return
        self._record(tag, n, start, "ok")
        yield f"data: {json.dumps(chunk(cid, body.model, None, finish or 'stop'))}\n\n"
        yield "data: [DONE]\n\n"

    def _replica_error(self, exc: Exception, tag: dict) -> api.ApiError:
        from lorafleet.errors import BaseMismatchError, RegistryError

        self.requests.inc(tags={**tag, "status": "error"})
        if isinstance(exc, BaseMismatchError):
            return api.ApiError(409, _message(exc), code="adapter_base_mismatch", param="model")
        if isinstance(exc, RegistryError):
            return api.ApiError(404, _message(exc), code="model_not_found", param="model")
        return api.ApiError(500, f"generation failed: {_message(exc)}", "server_error")

    def _check_final(self, final: dict, tag: dict) -> None:
        if "error" in final:
            self.requests.inc(tags={**tag, "status": "error"})
            raise api.ApiError(500, f"generation failed: {final['error']}", "server_error")

    def _record(self, tag: dict, n_tokens: int, start: float, status: str) -> None:
        self.requests.inc(tags={**tag, "status": status})
        if n_tokens:  # Ray's Counter refuses 0, and an answer may be empty (EOS first)
            self.tokens.inc(n_tokens, tags=tag)
        self.latency.observe(time.perf_counter() - start, tags=tag)

    # ---- names and tenants -------------------------------------------------------------

    def _tenant(self, request: Request) -> Any:
        if self.keys is None:
            return None
        from lorafleet.serve.keys import key_hash

        auth = request.headers.get("authorization", "")
        tenant = self.keys.get(key_hash(auth.removeprefix("Bearer ").strip()))
        if tenant is None:
            raise api.ApiError(
                401,
                "invalid or missing API key: send 'Authorization: Bearer <key>'",
                "authentication_error",
                code="invalid_api_key",
            )
        return tenant

    def _resolve(self, name: str, tenant: Any) -> str | None:
        """'' for the base, else the canonical '<model>/<version>' the name points at now.
        Aliases are trusted for alias_refresh_s, so a promotion arrives without a redeploy."""
        from lorafleet import registry
        from lorafleet.errors import BaseMismatchError, RegistryError
        from lorafleet.serve.keys import allows

        if name == self.base_name:
            if tenant is not None and not tenant.base:
                raise self._unknown(name, tenant)
            return None
        try:
            ref = registry.parse_ref(name, self.args.adapter_prefix)
        except RegistryError as exc:
            raise api.ApiError(404, str(exc), code="model_not_found", param="model") from None
        if tenant is not None and not allows(tenant, ref.model.removeprefix(self.args.adapter_prefix)):
            raise self._unknown(name, tenant)  # another tenant's adapter does not exist for you
        mv = self._version(name, ref)
        try:
            registry.check_base(
                registry.ResolvedAdapter(f"{mv.name}/{mv.version}", None, mv),
                self.base_fingerprint,
                self.base_name,
            )
        except BaseMismatchError as exc:
            raise api.ApiError(409, str(exc), code="adapter_base_mismatch", param="model") from None
        return f"{mv.name}/{mv.version}"

    def _version(self, name: str, ref: Any) -> Any:
        from lorafleet import registry, tracking
        from lorafleet.errors import RegistryError

        when, mv = self.resolved.get(name, (0.0, None))
        if mv is None or time.time() - when > self.args.alias_refresh_s or ref.version is not None:
            try:
                mv = registry.resolve_version(tracking.client(), ref)
            except RegistryError as exc:
                raise api.ApiError(
                    404, f"{exc}; the base is '{self.base_name}'", code="model_not_found", param="model"
                ) from None
            self.resolved[name] = (time.time(), mv)
        return mv

    def _unknown(self, name: str, tenant: Any) -> api.ApiError:
        names = ([self.base_name] if tenant.base else []) + sorted(tenant.adapters)
        return api.ApiError(
            404,
            f"model '{name}' does not exist; available: {', '.join(names)}",
            code="model_not_found",
            param="model",
        )
