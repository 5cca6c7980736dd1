"""The OpenAI-compatible HTTP ingress: checks the key, bounds and validates the request, resolves
`model` to a registry version (or the base), tokenizes, and streams from a replica.

`IngressCore` holds all of it without Ray Serve: the replica handle and the registry are
constructor arguments, so tests drive `make_app(core)` in process. `Ingress` is the thin Serve
deployment around it. The order of a request matters and is kept in `_prepare`: the key first
(a stranger's 5 MB body costs nothing), then the body's size, then parsing, then tokenising off
the event loop.
"""

from __future__ import annotations

import asyncio
import json
import os
import time
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from pydantic import ValidationError
from ray import serve
from starlette.exceptions import HTTPException

from lorafleet.serve import api
from lorafleet.serve.access import Tenants
from lorafleet.serve.config import AppArgs
from lorafleet.serve.names import MlflowDirectory, NameCache, RegistryDown, UnknownModel
from lorafleet.serve.replies import Metrics, Replies, replica_error


class IngressCore:
    def __init__(
        self,
        args: AppArgs,
        replica: Any,
        tokenizer: Any,
        context: int,
        base_fingerprint: str,
        names: NameCache | None = None,
        metrics: Metrics | None = None,
    ):
        self.args, self.tokenizer, self.context = args, tokenizer, context
        self.base_fingerprint = base_fingerprint
        self.base_name = args.display_base_name()
        # no token is longer than this many characters: a text over context x this cannot fit,
        # and is refused without spending seconds of CPU tokenising it
        self.max_token_chars = max((len(t) for t in tokenizer.get_vocab()), default=1)
        self.names = names or NameCache(
            MlflowDirectory(), args.registry_timeout_s, args.registry_retry_s, args.alias_refresh_s
        )
        self.tenants = Tenants(args)
        self.replies = Replies(args, replica, tokenizer, metrics or Metrics())

    @classmethod
    def from_args(cls, args: AppArgs, replica: Any, metrics: Metrics | None = None) -> IngressCore:
        from lorafleet.models import fingerprint, load_tokenizer, resolve_base

        base_path = resolve_base(args.base_model)
        tokenizer = load_tokenizer(base_path)
        context = _context_length(base_path, tokenizer)
        return cls(args, replica, tokenizer, context, fingerprint(base_path), metrics=metrics)

    # ---- routes ------------------------------------------------------------------------

    async def chat(self, request: Request) -> Any:
        deadline = time.monotonic() + self.args.request_timeout_s
        tenant, body = await self._prepare(request, api.ChatCompletionRequest)
        ids = await asyncio.to_thread(self._chat_ids, [m.template_dict() for m in body.messages])
        return await self._complete(body, tenant, ids, True, deadline)

    async def completions(self, request: Request) -> Any:
        deadline = time.monotonic() + self.args.request_timeout_s
        tenant, body = await self._prepare(request, api.CompletionRequest)
        ids = (await asyncio.to_thread(self.tokenizer, body.prompt))["input_ids"]
        return await self._complete(body, tenant, ids, False, deadline)

    async def models(self, request: Request) -> dict:
        tenant = self.tenants.check(request)
        cards = [api.model_card(self.base_name, "lorafleet")] if self.tenants.allows(tenant, None) else []
        try:
            served = await self.names.served()
        except RegistryDown as exc:
            raise _registry_down(exc) from None
        for name in served:
            customer = name.removeprefix(self.args.adapter_prefix)
            if name.startswith(self.args.adapter_prefix) and self.tenants.allows(tenant, customer):
                cards.append(api.model_card(customer, "lorafleet"))
        return {"object": "list", "data": cards}

    async def health(self) -> dict:  # never touches the registry: it must answer while MLflow is down
        return {"status": "ok", "base": self.base_name}

    # ---- before the replica --------------------------------------------------------------

    async def _prepare(self, request: Request, schema: type[api._Request]) -> tuple[Any, Any]:
        tenant = self.tenants.check(request)
        raw = await _read_json(request, self.args.max_request_bytes)
        messages = raw.get("messages")
        if isinstance(messages, list) and len(messages) > self.args.max_messages:
            raise api.ApiError(
                413,
                f"{len(messages)} messages; this endpoint takes at most {self.args.max_messages}",
                code="too_many_messages",
                param="messages",
            )
        try:
            body = schema.model_validate(raw)
        except ValidationError as exc:
            raise _invalid(exc) from None
        self._check_bias(body)
        self._check_length(body)
        return tenant, body

    def _check_length(self, body: Any) -> None:
        texts = [m.content for m in body.messages] if hasattr(body, "messages") else [body.prompt]
        chars = sum(len(t) for t in texts)
        if chars > self.context * self.max_token_chars:
            raise api.ApiError(
                400,
                f"the prompt has {chars} characters, more than a context of {self.context} tokens can hold",
                code="context_length_exceeded",
                param="messages" if hasattr(body, "messages") else "prompt",
            )

    def _check_bias(self, body: Any) -> None:
        vocab = len(self.tokenizer)
        bad = sorted(t for t in body.bias() if t >= vocab)
        if bad:
            raise api.ApiError(
                400,
                f"logit_bias: token ids {bad[:5]} are outside the vocabulary (0..{vocab - 1})",
                param="logit_bias",
            )

    def _chat_ids(self, messages: list[dict]) -> list[int]:
        try:
            return self.tokenizer.apply_chat_template(
                messages, add_generation_prompt=True, tokenize=True, return_dict=False
            )
        except Exception as exc:  # the template's own checks (e.g. roles must alternate)
            raise api.ApiError(
                400, f"the model's chat template refused these messages: {exc}", param="messages"
            ) from None

    async def _complete(self, body: Any, tenant: Any, ids: list[int], chat: bool, deadline: float) -> Any:
        adapter_id = await self._resolve(body.model, tenant)
        max_new = self._max_new(body, len(ids), "messages" if chat else "prompt")
        gen = self._request(body, ids, max_new, tenant)
        lease = self.tenants.acquire(tenant, len(ids) + max_new)
        return await self.replies.answer(gen, adapter_id or "", body, chat, deadline, lease)

    def _max_new(self, body: Any, n_prompt: int, prompt_param: str) -> int:
        """New tokens for this request: what the client asked for, or without a limit of its own
        as many as the endpoint's cap and the context leave (as OpenAI and vLLM do). A limit over
        the cap or past the context is a 400 quoting the client's own value, never a clamp it
        would read as its own `finish_reason: length`."""
        param, asked = body.asked_tokens()
        cap, room = self.args.max_new_tokens, self.context - n_prompt
        if room < 1:
            raise api.ApiError(
                400,
                f"the prompt is {n_prompt} tokens and the context length is {self.context}, which "
                "leaves no room for an answer: shorten the prompt",
                code="context_length_exceeded",
                param=prompt_param,
            )
        if asked is None:
            return min(cap, room)
        if asked > cap:
            raise api.ApiError(
                400,
                f"{param} {asked} is over this endpoint's limit of {cap} new tokens a request",
                param=param,
            )
        if asked > room:
            raise api.ApiError(
                400,
                f"the prompt is {n_prompt} tokens and {param} {asked}; the context length is "
                f"{self.context}: shorten the prompt or lower {param} to at most {room}",
                code="context_length_exceeded",
                param=param,
            )
        return asked

    def _request(self, body: Any, ids: list[int], max_new: int, tenant: Any) -> Any:
        from lorafleet.serve.decoder import GenerationRequest

        return GenerationRequest(
            prompt_ids=ids,
            adapter=None,
            max_new_tokens=max_new,
            temperature=body.sampling_temperature(),
            top_p=body.top_p,
            seed=body.seed,
            stop_token_ids=[self.tokenizer.eos_token_id],
            stop=body.stop,
            frequency_penalty=body.frequency_penalty,
            presence_penalty=body.presence_penalty,
            logit_bias=body.bias(),
            tenant=getattr(tenant, "tenant", None),
            tenant_weight=max(1, round(getattr(tenant, "weight", 1))),
        )

    # ---- names ---------------------------------------------------------------------------

    async def _resolve(self, name: str, tenant: Any) -> str | None:
        """None for the base, else the canonical '<model>/<version>' the name points at now."""
        from lorafleet import registry
        from lorafleet.errors import RegistryError

        if name == self.base_name:
            if not self.tenants.allows(tenant, None):
                raise self._unknown(name, tenant)
            return None
        try:
            ref = registry.parse_ref(name, self.args.adapter_prefix)
        except RegistryError:
            raise self._unknown(name, tenant) from None
        if not self.tenants.allows(tenant, ref.model.removeprefix(self.args.adapter_prefix)):
            raise self._unknown(name, tenant)  # another tenant's adapter does not exist for you
        try:
            mv = await self.names.version(name, ref)
        except UnknownModel:
            raise self._unknown(name, tenant) from None
        except RegistryDown as exc:
            raise _registry_down(exc) from None
        except RegistryError as exc:  # an alias or version of the caller's own adapter
            raise api.ApiError(404, str(exc), code="model_not_found", param="model") from None
        self._check_base(mv)
        return f"{mv.name}/{mv.version}"

    def _check_base(self, mv: Any) -> None:
        """Refuse a version trained on another base, or one whose base cannot be told (409)."""
        from lorafleet import registry
        from lorafleet.errors import BaseMismatchError

        name = f"{mv.name}/{mv.version}"
        if "base_fingerprint" not in (mv.tags or {}):
            raise api.ApiError(
                409,
                f"adapter {name} has no lineage tags (base_fingerprint): it was not registered by "
                "lorafleet, so its base cannot be checked; register it again or use another version",
                code="adapter_lineage_missing",
                param="model",
            )
        try:
            registry.check_base(
                registry.ResolvedAdapter(name, None, mv), self.base_fingerprint, self.base_name
            )
        except BaseMismatchError as exc:
            raise api.ApiError(409, str(exc), code="adapter_base_mismatch", param="model") from None

    def _unknown(self, name: str, tenant: Any) -> api.ApiError:
        """Names only the caller's own models: other tenants' adapter names are not theirs to see."""
        hint = "GET /v1/models lists the models you can use"
        own = self.tenants.own_models(tenant, self.base_name)
        if own is not None and len(own) <= 20:
            hint = f"your models: {', '.join(own) or 'none'}"
        return api.ApiError(
            404, f"model '{name}' does not exist; {hint}", code="model_not_found", param="model"
        )


# ---- helpers ---------------------------------------------------------------------------------


def _context_length(base_path: Any, tokenizer: Any) -> int:
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(base_path)
    return int(getattr(config, "max_position_embeddings", None) or tokenizer.model_max_length)


async def _read_json(request: Request, limit: int) -> dict:
    """The body as a JSON object, read no further than `limit` bytes (413 past it)."""
    too_big = api.ApiError(
        413, f"request body over {limit} bytes (max_request_bytes)", code="request_too_large"
    )
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise too_big
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise too_big
        chunks.append(chunk)
    try:
        raw = json.loads(b"".join(chunks))
    except (ValueError, RecursionError):
        raise api.ApiError(400, "the request body is not valid JSON", code="invalid_json") from None
    if not isinstance(raw, dict):
        raise api.ApiError(400, "the request body must be a JSON object", code="invalid_json")
    return raw


def _invalid(exc: ValidationError) -> api.ApiError:
    first = exc.errors()[0]
    where = ".".join(str(p) for p in first["loc"])
    param = str(first["loc"][0]) if first["loc"] else None
    return api.ApiError(400, f"invalid request: {where}: {first['msg']}", param=param)


def _registry_down(exc: RegistryDown) -> api.ApiError:
    return api.ApiError(
        503,
        f"{exc}; adapters already in use keep serving",
        "server_error",
        code="registry_unavailable",
        retry_after_s=exc.retry_after_s,
    )


# ---- the HTTP app ----------------------------------------------------------------------------


def make_app(core: IngressCore) -> FastAPI:
    app = FastAPI(title="lorafleet", docs_url=None, redoc_url=None, openapi_url=None)
    app.add_exception_handler(api.ApiError, _api_error)
    app.add_exception_handler(HTTPException, _http_error)
    app.add_exception_handler(Exception, _server_error)  # nothing answers text/plain
    app.add_api_route("/v1/chat/completions", core.chat, methods=["POST"])
    app.add_api_route("/v1/completions", core.completions, methods=["POST"])
    app.add_api_route("/v1/models", core.models, methods=["GET"])
    app.add_api_route("/health", core.health, methods=["GET"])
    return app


async def _api_error(_: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, api.ApiError)
    return JSONResponse(exc.body(), status_code=exc.status, headers=exc.headers())


async def _http_error(_: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, HTTPException)
    what = {404: "no such route", 405: "method not allowed on this route"}.get(exc.status_code, exc.detail)
    err = api.ApiError(
        exc.status_code, f"{what}; the API is under /v1 (chat/completions, completions, models)"
    )
    return JSONResponse(err.body(), status_code=exc.status_code, headers=getattr(exc, "headers", None))


async def _server_error(_: Request, exc: Exception) -> JSONResponse:
    err = replica_error(exc)
    return JSONResponse(err.body(), status_code=err.status, headers=err.headers())


@serve.ingress()
class Ingress:
    """The Serve deployment: the core over the real base, registry and replica handle."""

    def __init__(self, replica: Any, args: dict[str, Any]):
        cfg = AppArgs.model_validate(args)
        if cfg.tracking_uri:
            os.environ["MLFLOW_TRACKING_URI"] = cfg.tracking_uri
        from lorafleet.serve.replica import fail_fast_mlflow

        fail_fast_mlflow(cfg.registry_timeout_s)  # a dead server must not hold a thread for minutes
        self.core = IngressCore.from_args(cfg, replica, Metrics.serve())

    def __serve_build_asgi_app__(self) -> FastAPI:
        return make_app(self.core)
