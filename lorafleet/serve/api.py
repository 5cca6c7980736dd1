"""OpenAI-compatible request and response schemas (the subset lorafleet serves) and errors in
OpenAI's error shape, so the official `openai` client works unchanged.

Every parameter is bounded here, the way OpenAI and vLLM bound it: one request's values reach a
shared batch, so nothing out of range may get past the API (see DESIGN.md, "a batch is shared").
A feature we do not serve (tools, images, logprobs, n > 1) is refused with a 400 that names it,
never ignored into a 200 the client would misread.
"""

from __future__ import annotations

import time
import uuid
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

MAX_STOP_STRINGS = 4  # OpenAI's bound
MAX_STOP_CHARS = 64
MAX_LOGIT_BIAS = 300  # OpenAI's bound
GREEDY_BELOW = 1e-5  # a temperature under this decodes greedily (logits / 1e-45 overflow)
SEED_RANGE = (-(2**63), 2**64)  # torch.Generator.manual_seed's range, [low, high)
# the parameters OpenAI's API spec marks nullable: null means the default (clients built from the
# spec send null for a parameter left unset, and OpenAI and vLLM answer them)
NULLABLE = (
    "max_tokens",
    "max_completion_tokens",
    "temperature",
    "top_p",
    "frequency_penalty",
    "presence_penalty",
    "logit_bias",
    "stop",
    "seed",
    "stream",
    "n",
)


class ApiError(Exception):
    """An error with its HTTP status, rendered as {"error": {...}} like OpenAI's API."""

    def __init__(
        self,
        status: int,
        message: str,
        type_: str = "invalid_request_error",
        code: str | None = None,
        param: str | None = None,
        retry_after_s: float | None = None,
    ):
        super().__init__(message)
        self.status, self.message, self.type, self.code, self.param = status, message, type_, code, param
        self.retry_after_s = retry_after_s

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def headers(self) -> dict[str, str] | None:
        if self.retry_after_s is None:
            return None
        return {"Retry-After": str(max(1, int(-(-self.retry_after_s // 1))))}  # whole seconds, up


def unsupported(feature: str, param: str) -> ApiError:
    return ApiError(400, f"{feature} is not supported by this endpoint", code="unsupported", param=param)


class _Request(BaseModel):
    # OpenAI clients send fields we don't use (user, stream_options, ...); the ones that would
    # change the answer's meaning are refused by _refuse_unsupported instead of being ignored
    model_config = ConfigDict(extra="allow", allow_inf_nan=False)

    model: str = Field(max_length=256, description="adapter name (acme, acme@candidate, acme/3) or the base")
    max_tokens: int | None = Field(None, ge=1, le=1_000_000, description="new tokens at most")
    max_completion_tokens: int | None = Field(None, ge=1, le=1_000_000)
    temperature: float = Field(1.0, ge=0, le=2, description=f"below {GREEDY_BELOW}: greedy")
    top_p: float = Field(1.0, gt=0, le=1)
    frequency_penalty: float = Field(0.0, ge=-2, le=2)
    presence_penalty: float = Field(0.0, ge=-2, le=2)
    logit_bias: dict[str, float] | None = Field(None, description="token id (as a string) -> -100..100")
    stop: str | list[str] | None = Field(None, validate_default=True, description="at most 4 strings")
    seed: int | None = Field(None, ge=SEED_RANGE[0], lt=SEED_RANGE[1])
    stream: bool = False
    n: int = 1

    @model_validator(mode="before")
    @classmethod
    def _nulls_are_defaults(cls, data: Any) -> Any:
        if isinstance(data, dict):
            return {k: v for k, v in data.items() if not (v is None and k in NULLABLE)}
        return data

    @field_validator("stop")
    @classmethod
    def _stops(cls, v: str | list[str] | None) -> list[str]:
        stops = [v] if isinstance(v, str) else list(v or [])
        if len(stops) > MAX_STOP_STRINGS:
            raise ValueError(f"at most {MAX_STOP_STRINGS} stop strings, got {len(stops)}")
        if any(not s or len(s) > MAX_STOP_CHARS for s in stops):
            raise ValueError(f"each stop string must have 1 to {MAX_STOP_CHARS} characters")
        return stops

    @field_validator("logit_bias")
    @classmethod
    def _bias(cls, v: dict[str, float] | None) -> dict[str, float] | None:
        if v is None:
            return None
        if len(v) > MAX_LOGIT_BIAS:
            raise ValueError(f"at most {MAX_LOGIT_BIAS} entries, got {len(v)}")
        for key, value in v.items():
            if not key.isascii() or not key.isdigit() or len(key) > 9:
                raise ValueError(f"keys are token ids written as strings, got {key!r}")
            if not -100 <= value <= 100:
                raise ValueError(f"values lie in -100..100, got {value} for token {key}")
        return v

    @model_validator(mode="after")
    def _refuse_unsupported(self) -> _Request:
        if self.n != 1:
            raise unsupported(f"n={self.n} (several choices per request); only n=1 is served", "n")
        extra = self.model_extra or {}
        for name in ("tools", "functions"):
            if extra.get(name):
                raise unsupported(f"'{name}' (function calling)", name)
        for name in ("tool_choice", "function_call"):
            if extra.get(name) not in (None, "none"):
                raise unsupported(f"'{name}' (function calling)", name)
        fmt = extra.get("response_format")
        if fmt is not None and not (isinstance(fmt, dict) and fmt.get("type") == "text"):
            raise unsupported("response_format other than {'type': 'text'}", "response_format")
        if extra.get("logprobs") not in (None, False) or extra.get("top_logprobs") not in (None, 0):
            raise unsupported("logprobs", "logprobs")
        return self

    def new_tokens(self, default: int) -> int:
        return self.max_completion_tokens or self.max_tokens or default

    def bias(self) -> dict[int, float]:
        return {int(k): v for k, v in (self.logit_bias or {}).items()}

    def sampling_temperature(self) -> float:
        return 0.0 if self.temperature < GREEDY_BELOW else self.temperature


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")

    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[dict[str, Any]]

    @field_validator("content")
    @classmethod
    def _text_parts(cls, v: str | list[dict[str, Any]]) -> str:
        """OpenAI's content parts: text parts are joined (as vLLM does); any other kind is refused."""
        if isinstance(v, str):
            return v
        texts = []
        for part in v:
            kind = part.get("type")
            if kind != "text":
                raise unsupported(f"content part type {kind!r} (this endpoint serves text only)", "content")
            if not isinstance(part.get("text"), str):
                raise ValueError("a text content part needs a string 'text'")
            texts.append(part["text"])
        return "\n".join(texts)

    def template_dict(self) -> dict[str, str]:
        role = "system" if self.role == "developer" else self.role  # OpenAI's newer name for system
        return {"role": role, "content": self.content}


class ChatCompletionRequest(_Request):
    messages: list[ChatMessage] = Field(min_length=1)


class CompletionRequest(_Request):
    prompt: str = Field(min_length=1, description="the text to continue (one string)")

    @model_validator(mode="after")
    def _completion_only(self) -> CompletionRequest:
        extra = self.model_extra or {}
        if extra.get("echo"):
            raise unsupported("echo", "echo")
        if extra.get("suffix"):
            raise unsupported("suffix", "suffix")
        if extra.get("best_of") not in (None, 1):
            raise unsupported("best_of > 1", "best_of")
        return self


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


def _id(kind: str) -> str:
    return f"{kind}-{uuid.uuid4().hex[:24]}"


def chat_response(model: str, text: str, finish: str, usage: Usage) -> dict:
    return {
        "id": _id("chatcmpl"),
        "object": "chat.completion",
        "created": int(time.time()),
        "model": model,
        "usage": usage.model_dump(),
        "choices": [{"index": 0, "finish_reason": finish, "message": {"role": "assistant", "content": text}}],
    }


def completion_response(model: str, text: str, finish: str, usage: Usage) -> dict:
    return {
        "id": _id("cmpl"),
        "object": "text_completion",
        "created": int(time.time()),
        "model": model,
        "usage": usage.model_dump(),
        "choices": [{"index": 0, "finish_reason": finish, "text": text, "logprobs": None}],
    }


def chat_chunk(cid: str, model: str, delta: str | None, finish: str | None) -> dict:
    body = {} if delta is None else {"content": delta}
    return {
        "id": cid,
        "object": "chat.completion.chunk",
        "created": int(time.time()),
        "model": model,
        "choices": [{"index": 0, "delta": body, "finish_reason": finish}],
    }


def completion_chunk(cid: str, model: str, delta: str | None, finish: str | None) -> dict:
    return {
        "id": cid,
        "object": "text_completion",
        "created": int(time.time()),
        "model": model,
        "choices": [{"index": 0, "text": delta or "", "finish_reason": finish, "logprobs": None}],
    }


def model_card(name: str, owner: str) -> dict:
    return {"id": name, "object": "model", "created": 0, "owned_by": owner}
