"""One row's next token: its request checked and bounded, its logits adjusted (OpenAI's frequency
and presence penalties, logit_bias), then greedy or nucleus sampling with its own generator.

Everything here works on one row, so a bad value can only fail that row (the decoder catches per
row). The API validates the same bounds; these checks are the engine's own defence in depth.
"""

from __future__ import annotations

import math

import torch

from lorafleet.serve.request import GenerationRequest

# Below this temperature a row decodes greedily: logits / 1e-45 overflow to inf and softmax to
# NaN (vLLM's _SAMPLING_EPS is the same floor).
TEMPERATURE_FLOOR = 1e-5
MAX_PENALTY = 2.0  # OpenAI's range for frequency_penalty and presence_penalty: [-2, 2]
MAX_LOGIT_BIAS = 100.0  # OpenAI's range for a logit_bias value: [-100, 100]


class NonFiniteLogitsError(RuntimeError):
    """The model gave NaN or inf logits for a row (a broken adapter, an overflow): that row fails."""


def validate_request(r: GenerationRequest, vocab_size: int | None = None) -> None:
    """Raise ValueError naming the first value the engine cannot decode with."""
    if not r.prompt_ids:
        raise ValueError("empty prompt")
    if not isinstance(r.prompt_ids, list) or not all(_int(t) for t in r.prompt_ids):
        raise ValueError("prompt_ids must be a list of token ids (integers)")
    if not _int(r.max_new_tokens):
        raise ValueError(f"max_new_tokens {r.max_new_tokens!r} must be an integer")
    if not isinstance(r.stop_token_ids, list) or not all(_int(t) for t in r.stop_token_ids):
        raise ValueError("stop_token_ids must be a list of token ids (integers)")
    if vocab_size is not None and (min(r.prompt_ids) < 0 or max(r.prompt_ids) >= vocab_size):
        raise ValueError(f"prompt token ids must be in [0, {vocab_size})")
    if not (isinstance(r.temperature, int | float) and math.isfinite(r.temperature) and r.temperature >= 0):
        raise ValueError(f"temperature {r.temperature!r} must be a finite number >= 0")
    if not (isinstance(r.top_p, int | float) and 0 < r.top_p <= 1):
        raise ValueError(f"top_p {r.top_p!r} must be in (0, 1]")
    if r.seed is not None and not _int(r.seed):
        raise ValueError(f"seed {r.seed!r} must be an integer")
    for name in ("frequency_penalty", "presence_penalty"):
        value = getattr(r, name)
        if not (isinstance(value, int | float) and -MAX_PENALTY <= value <= MAX_PENALTY):
            raise ValueError(f"{name} {value!r} must be in [-{MAX_PENALTY:g}, {MAX_PENALTY:g}]")
    if not isinstance(r.logit_bias, dict):
        raise ValueError(f"logit_bias {r.logit_bias!r} must map token ids to numbers")
    _check_logit_bias(r.logit_bias, vocab_size)
    if not isinstance(r.stop, list) or any(not isinstance(s, str) or not s for s in r.stop):
        raise ValueError(f"stop {r.stop!r} must be non-empty strings")


def _int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _check_logit_bias(bias: dict[int, float], vocab_size: int | None) -> None:
    for token, value in bias.items():
        if not _int(token) or token < 0 or (vocab_size is not None and token >= vocab_size):
            raise ValueError(f"logit_bias token id {token!r} is not in the vocabulary [0, {vocab_size})")
        if not (isinstance(value, int | float) and -MAX_LOGIT_BIAS <= value <= MAX_LOGIT_BIAS):
            raise ValueError(
                f"logit_bias {value!r} for token {token} must be in [-{MAX_LOGIT_BIAS:g}, {MAX_LOGIT_BIAS:g}]"
            )


def generator(seed: int | None) -> torch.Generator | None:
    """A row's own generator. Any int is reduced to 64 bits, the range manual_seed accepts, so a
    huge or negative seed never raises (and equal seeds mod 2**64 draw the same tokens)."""
    return torch.Generator().manual_seed(seed % 2**64) if seed is not None else None


def adjusted(r: GenerationRequest) -> bool:
    """Whether the row's logits need more than the batch's greedy argmax or plain sampling."""
    return bool(r.logit_bias or r.frequency_penalty or r.presence_penalty)


def adjust(logits: torch.Tensor, r: GenerationRequest, generated: list[int]) -> torch.Tensor:
    """OpenAI's definition on one row: mu[j] - c[j] * frequency - (c[j] > 0) * presence
    + logit_bias[j], c[j] counting how often token j was generated so far. logits (V,) -> (V,) fp32."""
    x = logits.float().cpu().clone()  # (V,)
    vocab = x.shape[0]
    if r.logit_bias:
        _check_logit_bias(r.logit_bias, vocab)  # the head may be narrower than the embeddings
        x.index_add_(0, torch.tensor(list(r.logit_bias)), torch.tensor(list(r.logit_bias.values())).float())
    if generated and (r.frequency_penalty or r.presence_penalty):
        counts = torch.bincount(torch.tensor(generated), minlength=vocab)[:vocab].float()  # (V,)
        x -= counts * r.frequency_penalty + (counts > 0).float() * r.presence_penalty
    return x


def next_token(
    logits: torch.Tensor, r: GenerationRequest, gen: torch.Generator | None, generated: list[int], greedy: int
) -> int:
    """The row's token from its logits (V,); greedy = the batch's argmax for this row, used when
    nothing adjusts the logits (one argmax op serves every plain greedy row)."""
    if adjusted(r):
        logits = adjust(logits, r, generated)
        greedy = int(logits.argmax())
    if r.temperature < TEMPERATURE_FLOOR:
        return greedy
    return sample(logits, r.temperature, r.top_p, gen)


def sample(logits: torch.Tensor, temperature: float, top_p: float, gen: torch.Generator | None) -> int:
    """Nucleus sampling on the CPU with the row's own generator (same draw on any device)."""
    probs = torch.softmax(logits.float().cpu() / temperature, dim=-1)  # (V,)
    if top_p < 1:
        sorted_p, order = probs.sort(descending=True)
        keep = sorted_p.cumsum(0) - sorted_p < top_p
        keep[0] = True  # the top token always stays
        probs = torch.zeros_like(probs).scatter(0, order[keep], sorted_p[keep])
    return int(torch.multinomial(probs, 1, generator=gen))
