"""OpenAI-compatible request and response schemas (the subset lorafleet serves) and errors in
OpenAI's error shape, so the official `openai` client works unchanged."""

from __future__ import annotations

import time
import uuid
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator


class ApiError(Exception):
    """An error with its HTTP status, rendered as {"error": {...}} like OpenAI's API."""

    def __init__(
        self,
        status: int,
        message: str,
        type_: str = "invalid_request_error",
        code: str | None = None,
        param: str | None = None,
    ):
        super().__init__(message)
        self.status, self.message, self.type, self.code, self.param = status, message, type_, code, param

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


class _Request(BaseModel):
    model_config = ConfigDict(extra="ignore")  # OpenAI clients send fields we don't use

    model: str = Field(description="adapter name (acme, acme@candidate, acme/3) or the base's name")
    max_tokens: int | None = Field(None, ge=1, description="new tokens at most")
    max_completion_tokens: int | None = Field(None, ge=1)
    temperature: float = Field(1.0, ge=0, le=2)
    top_p: float = Field(1.0, gt=0, le=1)
    stop: str | list[str] | None = None
    seed: int | None = None
    stream: bool = False
    n: int = Field(1, ge=1, le=1, description="only n=1 is served")

    @field_validator("stop")
    @classmethod
    def _stops(cls, v: str | list[str] | None) -> list[str] | None:
        return [v] if isinstance(v, str) else v

    def new_tokens(self, default: int) -> int:
        return self.max_completion_tokens or self.max_tokens or default


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")

    role: Literal["system", "user", "assistant"]
    content: str


class ChatCompletionRequest(_Request):
    messages: list[ChatMessage] = Field(min_length=1)


class CompletionRequest(_Request):
    prompt: str


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
