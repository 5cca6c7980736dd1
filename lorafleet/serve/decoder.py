"""Continuous batching: one running mixed-adapter batch that new requests join between decode
steps and finished requests leave, KV cache included.

With a batch-synchronous loop a request that arrives during a 64-token generation waits for all
of it, and the batch thins out as its rows finish. Here a newcomer waits at most one decode step:
it is prefilled on its own (its adapters bound for that one forward), then merged into the
running batch: the two KV caches are left-padded to the same length and stacked, the padding
masked out. Leading columns that every row has as padding are trimmed when rows leave, so the
cache does not grow with the batch's history. Each row keeps its own sampler (seeded rows draw
the same tokens whatever their batch mates), its own positions and its own stop conditions.

An engine plugs in through three hooks: `_bind(requests)` routes each row of the next forward to
its adapter, `_unbind()` clears that, `_forward(ids, batch)` runs the model on the KV cache.
Call a Decoder from one thread only (the replica's engine thread).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch


@dataclass
class GenerationRequest:
    prompt_ids: list[int]
    adapter: str | None  # name given to add_adapter; None = the base
    max_new_tokens: int = 64
    temperature: float = 0.0  # 0 = greedy
    top_p: float = 1.0
    seed: int | None = None  # per request: a row's sample does not depend on its batch mates
    stop_token_ids: list[int] = field(default_factory=list)  # not included in the result


@dataclass
class GenerationResult:
    token_ids: list[int]
    finish_reason: str  # "stop" | "length"


class DecodingEngine(Protocol):
    model: Any
    tokenizer: Any
    device: torch.device

    def _bind(self, requests: list[GenerationRequest]) -> None: ...
    def _unbind(self) -> None: ...
    def _forward(self, ids: torch.Tensor, batch: KVBatch) -> torch.Tensor: ...


@dataclass
class Row:
    key: Any  # the caller's handle for this request
    request: GenerationRequest
    gen: torch.Generator | None
    result: GenerationResult = field(default_factory=lambda: GenerationResult([], "length"))
    next_token: int = -1  # sampled and emitted, fed at the next step


@dataclass
class KVBatch:
    """The running batch's attention mask, positions and KV cache, one row per live request."""

    mask: torch.Tensor  # (B, T) 1 = a real token; rows are left padded
    positions: torch.Tensor  # (B, T) at prefill, then (B, 1): the position of the token last fed
    cache: Any  # transformers DynamicCache

    def select(self, keep: list[int]) -> None:
        """Keep only these rows, their KV cache included, then drop all-padding columns."""
        sel = torch.tensor(keep, device=self.mask.device)
        self.cache.batch_select_indices(sel)
        self.mask, self.positions = self.mask[sel], self.positions[sel]
        lead = int((self.mask.sum(0) == 0).int().cumprod(0).sum())  # leading columns nobody uses
        if lead:
            self.mask = self.mask[:, lead:]
            for layer in self.cache.layers:
                layer.keys, layer.values = layer.keys[:, :, lead:], layer.values[:, :, lead:]

    def advance(self) -> None:
        """Grow the mask and positions by the token about to be fed."""
        self.mask = torch.cat([self.mask, self.mask.new_ones((self.mask.shape[0], 1))], dim=1)  # (B, T+1)
        self.positions = self.positions[:, -1:] + 1  # (B, 1)

    def joinable(self) -> bool:
        """Only plain dynamic layers (keys/values as (B, H, T, D) tensors) can be padded and stacked;
        a sliding-window or static cache makes newcomers wait until the batch drains."""
        return all(type(layer).__name__ == "DynamicLayer" for layer in self.cache.layers)

    def join(self, other: KVBatch) -> None:
        """Append other's rows: both caches left-padded to the longer length, then stacked."""
        width = max(self.mask.shape[1], other.mask.shape[1])
        for mine, theirs in zip(self.cache.layers, other.cache.layers, strict=True):
            mine.keys = torch.cat([_left_pad(mine.keys, width, 2), _left_pad(theirs.keys, width, 2)])
            mine.values = torch.cat([_left_pad(mine.values, width, 2), _left_pad(theirs.values, width, 2)])
        self.mask = torch.cat([_left_pad(self.mask, width, 1), _left_pad(other.mask, width, 1)])
        self.positions = torch.cat([self.positions[:, -1:], other.positions[:, -1:]])


def _left_pad(t: torch.Tensor, width: int, dim: int) -> torch.Tensor:
    missing = width - t.shape[dim]
    if missing == 0:
        return t
    shape = list(t.shape)
    shape[dim] = missing
    return torch.cat([t.new_zeros(shape), t], dim=dim)


class Decoder:
    """admit() new requests, step() the running batch; both return the rows that finished."""

    def __init__(self, engine: DecodingEngine, on_token: Callable[[Any, int], None] | None = None):
        self.engine, self.on_token = engine, on_token
        self.rows: list[Row] = []
        self.batch: KVBatch | None = None

    def __len__(self) -> int:
        return len(self.rows)

    @property
    def accepting(self) -> bool:
        return self.batch is None or self.batch.joinable()

    @torch.inference_mode()
    def admit(self, items: list[tuple[Any, GenerationRequest]]) -> list[Row]:
        """Prefill (key, request) pairs and add the rows not finished by their first token.
        A bad request raises before any work and leaves the running batch as it was."""
        validate([r for _, r in items])
        new = [Row(key, r, _generator(r.seed)) for key, r in items]
        done = [row for row in new if row.request.max_new_tokens <= 0]
        new = [row for row in new if row.request.max_new_tokens > 0]
        if not new:
            return done
        try:
            self.engine._bind([row.request for row in new])  # unknown adapters raise here
            batch = self._prefill_batch(new)
            logits = self.engine._forward(self._prefill_ids(new), batch)  # (B, V)
        except BaseException:
            self._rebind()  # the running rows keep their adapters
            raise
        keep, finished = self._sample(new, logits)
        if keep:
            if len(keep) < len(new):
                batch.select(keep)
            if self.batch is None:
                self.batch = batch
            else:
                self.batch.join(batch)
            self.rows += [new[k] for k in keep]
        self._rebind()
        return done + finished

    @torch.inference_mode()
    def step(self) -> list[Row]:
        """One token for every live row."""
        if not self.rows:
            return []
        ids = torch.tensor([row.next_token for row in self.rows], device=self.engine.device)[:, None]
        self.batch.advance()
        logits = self.engine._forward(ids, self.batch)  # (B, V)
        keep, finished = self._sample(self.rows, logits)
        self._keep(keep)
        return finished

    def drop(self, gone: Callable[[Any], bool]) -> list[Row]:
        """Remove the rows whose key says so (their caller went away) before the next step."""
        keep = [k for k, row in enumerate(self.rows) if not gone(row.key)]
        dropped = [row for row in self.rows if gone(row.key)]
        self._keep(keep)
        return dropped

    def _keep(self, keep: list[int]) -> None:
        if len(keep) == len(self.rows):
            return
        self.rows = [self.rows[k] for k in keep]
        if self.rows:
            self.batch.select(keep)
        else:
            self.batch = None
        self._rebind()

    def abort(self) -> list[Row]:
        """Drop every live row (after an engine error); returns them so their callers hear."""
        rows, self.rows, self.batch = self.rows, [], None
        self.engine._unbind()
        return rows

    def _rebind(self) -> None:
        if self.rows:
            self.engine._bind([row.request for row in self.rows])
        else:
            self.engine._unbind()

    def _sample(self, rows: list[Row], logits: torch.Tensor) -> tuple[list[int], list[Row]]:
        tokens = _sample_rows(logits, [r.request for r in rows], [r.gen for r in rows])
        keep, finished = [], []
        for k, (row, tok) in enumerate(zip(rows, tokens, strict=True)):
            if self._emit(row, tok):
                row.next_token = tok
                keep.append(k)
            else:
                finished.append(row)
        return keep, finished

    def _emit(self, row: Row, tok: int) -> bool:
        """Record one token; False when the row is finished."""
        if tok in row.request.stop_token_ids:
            row.result.finish_reason = "stop"
            return False
        row.result.token_ids.append(tok)
        if self.on_token is not None:
            self.on_token(row.key, tok)
        return len(row.result.token_ids) < row.request.max_new_tokens

    def _prefill_batch(self, rows: list[Row]) -> KVBatch:
        from transformers import DynamicCache

        width = max(len(r.request.prompt_ids) for r in rows)
        mask = torch.zeros((len(rows), width), dtype=torch.long)  # (B, T), left padded
        for k, r in enumerate(rows):
            mask[k, width - len(r.request.prompt_ids) :] = 1
        mask = mask.to(self.engine.device)
        positions = (mask.cumsum(-1) - 1).clamp(min=0)  # (B, T): each row counts from its first token
        return KVBatch(mask, positions, DynamicCache(config=self.engine.model.config))

    def _prefill_ids(self, rows: list[Row]) -> torch.Tensor:
        """Left-padded ids, so every row's next token comes from the last column."""
        width = max(len(r.request.prompt_ids) for r in rows)
        pad = self.engine.tokenizer.pad_token_id
        ids = torch.full((len(rows), width), pad if pad is not None else 0, dtype=torch.long)  # (B, T)
        for k, r in enumerate(rows):
            ids[k, width - len(r.request.prompt_ids) :] = torch.tensor(r.request.prompt_ids)
        return ids.to(self.engine.device)


def validate(requests: list[GenerationRequest]) -> None:
    for i, r in enumerate(requests):
        if not r.prompt_ids:
            raise ValueError(f"request {i}: empty prompt")
        if r.temperature < 0 or not 0 < r.top_p <= 1:
            raise ValueError(f"request {i}: temperature must be >= 0 and top_p in (0, 1]")


def _generator(seed: int | None) -> torch.Generator | None:
    return torch.Generator().manual_seed(seed) if seed is not None else None


def _sample_rows(
    logits: torch.Tensor, requests: list[GenerationRequest], gens: list[torch.Generator | None]
) -> list[int]:
    greedy = logits.argmax(-1).tolist()  # one op (and one device sync) for every greedy row
    return [
        greedy[k] if r.temperature == 0 else _sample(logits[k], r, gens[k]) for k, r in enumerate(requests)
    ]


def _sample(logits: torch.Tensor, r: GenerationRequest, gen: torch.Generator | None) -> int:
    """Nucleus sampling on the CPU with the row's own generator (same draw on any device)."""
    probs = torch.softmax(logits.float().cpu() / r.temperature, dim=-1)  # (V,)
    if r.top_p < 1:
        sorted_p, order = probs.sort(descending=True)
        keep = sorted_p.cumsum(0) - sorted_p < r.top_p
        keep[0] = True  # the top token always stays
        probs = torch.zeros_like(probs).scatter(0, order[keep], sorted_p[keep])
    return int(torch.multinomial(probs, 1, generator=gen))
