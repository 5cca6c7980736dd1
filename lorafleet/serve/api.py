"""OpenAI-compatible request and response schemas (the subset lorafleet serves) and errors in
OpenAI's error shape, so the official `openai` client works unchanged.

Every parameter is bounded here, the way OpenAI and vLLM bound it: one request's values reach a
shared batch, so nothing out of range may get past the API (see DESIGN.md, "a batch is shared").
A feature we do not serve (tools, images, logprobs, n > 1, other servers' options such as top_k)
is refused with a 400 that names it, never ignored into a 200 the client would misread; JSON
types are taken strictly (max_tokens: true is not 1 token). Token limits are settled in the
ingress, which knows the context: no limit means what the cap and context leave.
"""

from __future__ import annotations

import time
import uuid
from typing import Annotated, Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, Strict, field_validator, model_validator

MAX_STOP_STRINGS = 4  # OpenAI's bound
MAX_STOP_CHARS = 64
MAX_LOGIT_BIAS = 300  # OpenAI's bound
GREEDY_BELOW = 1e-5  # a temperature under this decodes greedily (logits / 1e-45 overflow)
SEED_RANGE = (-(2**63), 2**64)  # torch.Generator.manual_seed's range, [low, high)
# JSON's types as OpenAI takes them: an integer parameter takes no true, 1.5 or "12" and a number
# parameter no "0.5" or true (pydantic's lax mode made max_tokens: true one token)
Count = Annotated[int, Strict()]
Number = Annotated[float, Strict()]
Switch = Annotated[bool, Strict()]
# OpenAI parameters that change nothing in the answer: taken and ignored. Any other name is
# refused, naming it (top_k, min_p, guided_json, ... are other servers' and not served here).
HARMLESS = ("user", "metadata", "store", "service_tier", "parallel_tool_calls", "prediction")
# handled one by one below (refused unless set to what we serve)
CHECKED = ("tools", "functions", "tool_choice", "function_call", "response_format", "logprobs")
CHECKED += ("top_logprobs", "stream_options", "modalities")
# each taken or checked parameter's JSON type, as OpenAI's API spec gives it: any other type is
# a 400 naming it (a truthiness check read `echo: 0` or `tools: {}` as unset; `user: 5` passed)
EXTRA_TYPES: dict[str, tuple[str, ...]] = {
    "user": ("string",),
    "metadata": ("object",),
    "store": ("boolean",),
    "service_tier": ("string",),
    "parallel_tool_calls": ("boolean",),
    "prediction": ("object",),
    "tools": ("array",),
    "functions": ("array",),
    "tool_choice": ("string", "object"),
    "function_call": ("string", "object"),
    "response_format": ("object",),
    "top_logprobs": ("integer",),
    "modalities": ("array",),
    "stream_options": ("object",),
    "echo": ("boolean",),
    "suffix": ("string",),
    "best_of": ("integer",),
}
METADATA_PAIRS, METADATA_KEY_CHARS, METADATA_VALUE_CHARS = 16, 64, 512  # OpenAI's bounds
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


def json_type(value: Any) -> str:
    """The JSON type of a parsed value (a bool is not a number here, as in JSON)."""
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int):
        return "integer"
    kinds = {str: "string", float: "number", dict: "object", list: "array", type(None): "null"}
    return kinds.get(type(value), type(value).__name__)


def check_type(name: str, value: Any, kinds: tuple[str, ...]) -> None:
    if json_type(value) not in kinds:
        want = " or ".join(f"an {k}" if k[0] in "aeiou" else f"a {k}" for k in kinds)
        raise ApiError(400, f"'{name}' must be {want}, got {json_type(value)} {value!r:.40}", param=name)


def check_metadata(value: dict) -> None:
    """OpenAI's metadata: up to 16 string pairs, keys up to 64 and values up to 512 characters."""
    if len(value) > METADATA_PAIRS or not all(
        isinstance(v, str) and len(k) <= METADATA_KEY_CHARS and len(v) <= METADATA_VALUE_CHARS
        for k, v in value.items()
    ):
        raise ApiError(
            400,
            f"'metadata' holds up to {METADATA_PAIRS} pairs of strings, keys up to {METADATA_KEY_CHARS} "
            f"and values up to {METADATA_VALUE_CHARS} characters",
            param="metadata",
        )


class _Request(BaseModel):
    # extras are kept to be checked: HARMLESS ones pass, CHECKED ones only with the values we
    # serve, and any other name is refused (_refuse_unsupported), never ignored
    model_config = ConfigDict(extra="allow", allow_inf_nan=False)
    checked_here: ClassVar[tuple[str, ...]] = ()  # a route's own parameters, checked by its class
    logprobs_type: ClassVar[tuple[str, ...]] = ("boolean",)  # chat's; completions' is a count

    model: str = Field(max_length=256, description="adapter name (acme, acme@candidate, acme/3) or the base")
    max_tokens: Count | None = Field(None, ge=1, le=1_000_000, description="new tokens at most")
    max_completion_tokens: Count | None = Field(None, ge=1, le=1_000_000)
    temperature: Number = Field(1.0, ge=0, le=2, description=f"below {GREEDY_BELOW}: greedy")
    top_p: Number = Field(1.0, gt=0, le=1)
    frequency_penalty: Number = Field(0.0, ge=-2, le=2)
    presence_penalty: Number = Field(0.0, ge=-2, le=2)
    logit_bias: dict[str, Number] | None = Field(None, description="token id (as a string) -> -100..100")
    stop: str | list[str] | None = Field(None, validate_default=True, description="at most 4 strings")
    seed: Count | None = Field(None, ge=SEED_RANGE[0], lt=SEED_RANGE[1])
    stream: Switch = False
    n: Count = 1

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
        for text in stops:
            check_unicode(text)
            if "\ufffd" in text:  # what a partly decoded character reads as: it would stop early
                raise ValueError("a stop string may not hold U+FFFD, the replacement character")
        return stops

    @field_validator("logit_bias")
    @classmethod
    def _bias(cls, v: dict[str, float] | None) -> dict[str, float] | None:
        if v is None:
            return None
        if len(v) > MAX_LOGIT_BIAS:
            raise ValueError(f"at most {MAX_LOGIT_BIAS} entries, got {len(v)}")
        seen: dict[int, str] = {}
        for key, value in v.items():
            if not key.isascii() or not key.isdigit() or len(key) > 9:
                raise ValueError(f"keys are token ids written as strings, got {key!r}")
            if not -100 <= value <= 100:
                raise ValueError(f"values lie in -100..100, got {value} for token {key}")
            if (other := seen.setdefault(int(key), key)) != key:  # '5' and '05': one token, two values
                raise ValueError(f"keys {other!r} and {key!r} are the same token {int(key)}; give it once")
        return v

    @model_validator(mode="after")
    def _refuse_unsupported(self) -> _Request:
        if self.n < 1:
            raise ApiError(400, f"n must be 1 (got {self.n})", param="n")
        if self.n != 1:
            raise unsupported(f"n={self.n} (several choices per request); only n=1 is served", "n")
        extra = {k: v for k, v in (self.model_extra or {}).items() if v is not None}  # null: not set
        for name, value in extra.items():
            if name not in HARMLESS + CHECKED + self.checked_here:
                raise unsupported(f"the parameter '{name}'", name)
            check_type(name, value, self.logprobs_type if name == "logprobs" else EXTRA_TYPES[name])
        if "metadata" in extra:
            check_metadata(extra["metadata"])
        for name in ("tools", "functions"):
            if extra.get(name):  # an empty list offers nothing to call
                raise unsupported(f"'{name}' (function calling)", name)
        for name in ("tool_choice", "function_call"):
            if extra.get(name) not in (None, "none"):
                raise unsupported(f"'{name}' (function calling)", name)
        fmt = extra.get("response_format")
        if fmt is not None and not (isinstance(fmt, dict) and fmt.get("type") == "text"):
            raise unsupported("response_format other than {'type': 'text'}", "response_format")
        if extra.get("logprobs", False) is not False:  # chat: true; completions: any count, 0 too
            raise unsupported("logprobs", "logprobs")
        if extra.get("top_logprobs", 0) != 0:
            raise unsupported("top_logprobs", "top_logprobs")
        if extra.get("modalities") not in (None, ["text"]):
            raise unsupported("modalities other than ['text']", "modalities")
        self._stream_options(extra.get("stream_options"))
        return self

    def _stream_options(self, options: Any) -> None:
        if options is None:
            return
        if not self.stream:
            raise ApiError(400, "stream_options is only allowed when stream is true", param="stream_options")
        if not isinstance(options, dict) or set(options) - {"include_usage"}:
            raise unsupported("stream_options other than include_usage", "stream_options")
        if not isinstance(options.get("include_usage", False), bool):
            raise ApiError(400, "stream_options.include_usage must be true or false", param="stream_options")

    def include_usage(self) -> bool:
        """OpenAI's stream_options.include_usage: a last chunk with the usage, no choices."""
        return bool(((self.model_extra or {}).get("stream_options") or {}).get("include_usage"))

    def asked_tokens(self) -> tuple[str, int | None]:
        """The client's own limit on new tokens and the parameter that set it (None: not set)."""
        if self.max_completion_tokens is not None:
            return "max_completion_tokens", self.max_completion_tokens
        return "max_tokens", self.max_tokens

    def bias(self) -> dict[int, float]:
        return {int(k): v for k, v in (self.logit_bias or {}).items()}

    def sampling_temperature(self) -> float:
        return 0.0 if self.temperature < GREEDY_BELOW else self.temperature


def check_unicode(text: str) -> str:
    """JSON may carry an unpaired UTF-16 surrogate (\\ud800) no tokenizer can encode: say so."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        bad = text[exc.start : exc.end].encode("unicode_escape").decode()
        raise ValueError(
            f"holds an unpaired UTF-16 surrogate ({bad}) at character {exc.start}; send valid Unicode"
        ) from None
    return text


class ChatMessage(BaseModel):
    # a participant's `name` goes to the chat template, as vLLM passes it; anything else a message
    # may carry (tool_calls, audio, refusal, ...) is refused rather than dropped
    model_config = ConfigDict(extra="forbid")

    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[dict[str, Any]]
    name: str | None = Field(None, max_length=256)

    @field_validator("content")
    @classmethod
    def _text_parts(cls, v: str | list[dict[str, Any]]) -> str:
        """OpenAI's content parts: text parts are joined (as vLLM does); any other kind is refused."""
        if isinstance(v, str):
            return check_unicode(v)
        texts = []
        for part in v:
            kind = part.get("type")
            if kind != "text":
                raise unsupported(f"content part type {kind!r} (this endpoint serves text only)", "content")
            if not isinstance(part.get("text"), str):
                raise ValueError("a text content part needs a string 'text'")
            texts.append(check_unicode(part["text"]))
        return "\n".join(texts)

    def template_dict(self) -> dict[str, str]:
        role = "system" if self.role == "developer" else self.role  # OpenAI's newer name for system
        named = {"name": self.name} if self.name else {}
        return {"role": role, "content": self.content, **named}


class ChatCompletionRequest(_Request):
    messages: list[ChatMessage] = Field(min_length=1)


class CompletionRequest(_Request):
    checked_here: ClassVar[tuple[str, ...]] = ("echo", "suffix", "best_of")
    logprobs_type: ClassVar[tuple[str, ...]] = ("integer", "boolean")  # a count; false also means none
    prompt: str = Field(min_length=1, description="the text to continue (one string)")

    @field_validator("prompt", mode="before")
    @classmethod
    def _one_string(cls, v: Any) -> Any:
        if isinstance(v, list):
            raise ValueError("one string is served: a list of prompts or of token ids is not")
        return check_unicode(v) if isinstance(v, str) else v

    @model_validator(mode="after")
    def _completion_only(self) -> CompletionRequest:
        extra = self.model_extra or {}  # their types are checked with the other extras
        if extra.get("echo"):
            raise unsupported("echo", "echo")
        if extra.get("suffix"):  # "" adds nothing after the completion
            raise unsupported("suffix", "suffix")
        best_of = extra.get("best_of")
        if best_of is not None and best_of < 1:
            raise ApiError(400, f"best_of must be 1 (got {best_of})", param="best_of")
        if best_of is not None and best_of > 1:
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


def usage_chunk(cid: str, model: str, chat: bool, usage: Usage) -> dict:
    """The stream's last chunk when stream_options.include_usage is true: no choices, the usage."""
    return {
        "id": cid,
        "object": "chat.completion.chunk" if chat else "text_completion",
        "created": int(time.time()),
        "model": model,
        "choices": [],
        "usage": usage.model_dump(),
    }


def model_card(name: str, owner: str) -> dict:
    return {"id": name, "object": "model", "created": 0, "owned_by": owner}
