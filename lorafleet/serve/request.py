"""What one row of the decoder is asked and what it gives back: the request (an OpenAI request's
sampling parameters, already bounded by the API) and the result. Their own module so that the
decoder and the sampling functions both read them without importing each other."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass
class GenerationRequest:
    prompt_ids: list[int]
    adapter: str | None  # name given to add_adapter; None = the base
    max_new_tokens: int = 64
    temperature: float = 0.0  # 0 = greedy
    top_p: float = 1.0
    seed: int | None = None  # per request: a row's sample does not depend on its batch mates
    stop_token_ids: list[int] = field(default_factory=list)  # not included in the result
    stop: list[str] = field(default_factory=list)  # stop strings: the row ends once its text holds one
    frequency_penalty: float = 0.0  # OpenAI's: minus count x this on each generated token's logit
    presence_penalty: float = 0.0  # OpenAI's: minus this once a token has been generated
    logit_bias: dict[int, float] = field(default_factory=dict)  # token id -> added to its logit
    tenant: str | None = None  # for the replica's fair admission; the decoder ignores it
    tenant_weight: int = 1  # the tenant's share of admission turns (keys file `weight`)

    def __post_init__(self) -> None:
        """OpenAI's JSON forms: stop may be null or one string; logit_bias keys are strings. A
        tokenizer without an eos token gives stop_token_ids [None]: nothing to stop on."""
        if isinstance(self.stop_token_ids, list):
            self.stop_token_ids = [t for t in self.stop_token_ids if t is not None]
        if self.stop is None or isinstance(self.stop, str):
            self.stop = [self.stop] if self.stop else []
        if self.logit_bias is None:
            self.logit_bias = {}
        elif isinstance(self.logit_bias, dict):
            self.logit_bias = {_token_id(t): v for t, v in self.logit_bias.items()}


def _token_id(key: Any) -> Any:
    return int(key) if isinstance(key, str) and key.isdigit() else key


@dataclass
class GenerationResult:
    token_ids: list[int]
    finish_reason: str  # "stop" | "length" | "error"
    error: str | None = None  # one line naming what failed, when finish_reason is "error"
    stop_text: str | None = None  # the stop string that ended the row (its text holds it; cut there)
