"""Continuous batching: one running mixed-adapter batch that new requests join between decode
steps and finished requests leave, KV cache included.

With a batch-synchronous loop a request that arrives during a 64-token generation waits for all
of it, and the batch thins out as its rows finish. Here a newcomer waits at most one decode step:
it is prefilled on its own (its adapters bound for that one forward), then merged into the
running batch: the two KV caches are left-padded to the same length and stacked, the padding
masked out. Leading columns that every row has as padding are trimmed when rows leave, so the
cache does not grow with the batch's history. Each row keeps its own sampler (seeded rows draw
the same tokens whatever their batch mates), its own positions and its own stop conditions.

A batch is shared, a request is alone. `admit()` and `step()` never raise for one row's problem:
a request that fails its check, its prefill, its sampling (NaN logits included), its stop check
or its caller's callback leaves the batch with `row.error` set and finish_reason "error", and its
batch mates decode on as if it had never been there. A forward that fails for a group (a prefill
or a decode step) is retried row by row, so only the rows that fail alone fail (a step's half-
written KV cache is cut back first). The batch's adapter binding is restored on every path. A
failure that cannot be pinned on one row fails the rows it touched, each with `row.error`, and
clears the batch if it was the running batch: still no exception.

An engine plugs in through four hooks: `check(request)` raises what admitting it would raise,
`_bind(requests)` routes each row of the next forward to its adapter, `_unbind()` clears that,
`_forward(ids, batch)` runs the model on the KV cache.
Call a Decoder from one thread only (the replica's engine thread).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch

from lorafleet.serve import sampling
from lorafleet.serve.request import GenerationRequest, GenerationResult
from lorafleet.serve.text import first_stop, stop_window


class DecodingEngine(Protocol):
    model: Any
    tokenizer: Any
    device: torch.device

    def check(self, request: GenerationRequest) -> None: ...
    def _bind(self, requests: list[GenerationRequest]) -> None: ...
    def _unbind(self) -> None: ...
    def _forward(self, ids: torch.Tensor, batch: KVBatch) -> torch.Tensor: ...


@dataclass(eq=False)  # rows are compared by identity
class Row:
    key: Any  # the caller's handle for this request
    request: GenerationRequest
    gen: torch.Generator | None
    result: GenerationResult = field(default_factory=lambda: GenerationResult([], "length"))
    next_token: int = -1  # sampled and emitted, fed at the next step
    error: str | None = None  # set when the row failed (then result.finish_reason == "error")
    exception: Exception | None = None  # what failed it, for callers that map error types

    def fail(self, exc: Exception, context: str = "") -> Row:
        self.exception = exc
        self.error = context + (" ".join(str(exc).split()) or type(exc).__name__)
        self.result.finish_reason, self.result.error = "error", self.error
        return self


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

    def undo_advance(self, mask: torch.Tensor, positions: torch.Tensor) -> None:
        """Back to before a step whose forward raised: the saved mask and positions, and every layer
        cut to the mask's width (the forward may have appended to some layers and not others)."""
        self.mask, self.positions = mask, positions
        width = mask.shape[1]
        for layer in self.cache.layers:
            layer.keys, layer.values = layer.keys[:, :, :width], layer.values[:, :, :width]

    def row(self, k: int, config: Any) -> KVBatch:
        """Row k alone, sharing the tensors (a forward appends by concatenation, never in place)."""
        from transformers import DynamicCache

        cache = DynamicCache(config=config)
        for mine, theirs in zip(cache.layers, self.cache.layers, strict=True):
            mine.lazy_initialization(theirs.keys, theirs.values)
            mine.keys, mine.values = theirs.keys[k : k + 1], theirs.values[k : k + 1]
        return KVBatch(self.mask[k : k + 1], self.positions[k : k + 1], cache)

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
    """admit() new requests, step() the running batch; both return the rows that left the batch
    (finished, or failed with row.error set) and never raise for one row's problem."""

    def __init__(self, engine: DecodingEngine, on_token: Callable[[Any, int], None] | None = None):
        self.engine, self.on_token = engine, on_token
        self.rows: list[Row] = []
        self.batch: KVBatch | None = None
        self._out: list[Row] = []  # rows that left the batch since admit/step last returned
        self._joining: list[Row] = []  # newcomers of the admit() under way
        # special tokens decode to nothing (skip_special_tokens): the stop window skips them
        self._silent = frozenset(getattr(engine.tokenizer, "all_special_ids", ()) or ())

    def __len__(self) -> int:
        return len(self.rows)

    @property
    def accepting(self) -> bool:
        return self.batch is None or self.batch.joinable()

    @torch.inference_mode()
    def admit(self, items: list[tuple[Any, GenerationRequest]]) -> list[Row]:
        """Check and prefill (key, request) pairs; rows not finished by their first token join the
        running batch. A request that fails (its check, its prefill, its first token) fails alone."""
        self._joining = [Row(key, r, None) for key, r in items]
        try:
            new = [row for row in self._joining if self._checked(row)]
            self._out += [row for row in new if row.request.max_new_tokens <= 0]
            new = [row for row in new if row.request.max_new_tokens > 0]
            if new:
                self._prefill(new)
        except Exception as exc:  # a join or a rebind that broke the batch itself
            self._fail_all(exc, "admission")
        self._joining = []
        return self._drain()

    @torch.inference_mode()
    def step(self) -> list[Row]:
        """One token for every live row."""
        if not self.rows:
            return self._drain()
        ids = torch.tensor([row.next_token for row in self.rows], device=self.engine.device)[:, None]
        saved = self.batch.mask, self.batch.positions
        try:
            self.batch.advance()
            logits = self.engine._forward(ids, self.batch)  # (B, V)
        except Exception as exc:
            logits = self._step_rows_alone(ids, saved, exc)
            if logits is None:
                return self._drain()
        self._guarded(self._keep, self._sample(self.rows, logits))
        return self._drain()

    def _step_rows_alone(self, ids: torch.Tensor, saved: tuple, exc: Exception) -> torch.Tensor | None:
        """The batch's forward raised: undo its half-written step, then run each row alone on its
        slice of the cache, so only the rows that fail alone fail; the others form the batch again.
        A cache that cannot be split (sliding window) fails the running rows."""
        try:
            if not self.batch.joinable():
                raise exc
            self.batch.undo_advance(*saved)
            parts = []
            for k, row in enumerate(self.rows):
                part = self.batch.row(k, self.engine.model.config)
                part.advance()
                try:
                    parts.append((row, part, self._forward_bound([row], ids[k : k + 1], part)))
                except Exception as row_exc:
                    self._out.append(row.fail(row_exc, "decode step failed: "))
            self.rows, self.batch = [row for row, _, _ in parts], None
            for _, part, _ in parts:
                if self.batch is None:
                    self.batch = part
                else:
                    self.batch.join(part)
            self._rebind()
            return torch.cat([logits for _, _, logits in parts]) if parts else None  # (B', V)
        except Exception as batch_exc:  # no row to pin it on
            self._fail_all(batch_exc, "decode step")
            return None

    def drop(self, gone: Callable[[Any], bool]) -> list[Row]:
        """Remove the rows whose key says so (their caller went away) before the next step."""
        keep = [k for k, row in enumerate(self.rows) if not gone(row.key)]
        dropped = [row for row in self.rows if gone(row.key)]
        self._guarded(self._keep, keep)
        return dropped

    def abort(self) -> list[Row]:
        """Drop every live row and the rows not yet returned; returns them so their callers hear."""
        rows, self.rows, self.batch = self.rows + self._drain(), [], None
        self.engine._unbind()
        return rows

    # ---- admission -------------------------------------------------------------------------

    def _checked(self, row: Row) -> bool:
        try:
            self.engine.check(row.request)  # bad values, unknown adapter: this row alone
            row.gen = sampling.generator(row.request.seed)
            return True
        except Exception as exc:
            self._out.append(row.fail(exc))
            return False

    def _prefill(self, rows: list[Row], retry: bool = True) -> None:
        """Prefill rows as one group; if that fails, find the rows that fail alone, then prefill
        the others as a group again (a prefill runs on its own fresh cache, so a retry is safe)."""
        try:
            batch, logits = self._prefill_forward(rows)
        except Exception as exc:
            if len(rows) > 1 and retry:
                good = [row for row in rows if self._prefills_alone(row)]
                if good:
                    self._prefill(good, retry=False)
            else:
                self._out += [row.fail(exc, "prefill failed: ") for row in rows]
            return
        keep = self._sample(rows, logits)
        if not keep:
            return
        if len(keep) < len(rows):
            batch.select(keep)
        if self.batch is None:
            self.batch = batch
        else:
            self.batch.join(batch)
        self.rows += [rows[k] for k in keep]
        self._rebind()

    def _prefills_alone(self, row: Row) -> bool:
        try:
            self._prefill_forward([row])
            return True
        except Exception as exc:
            self._out.append(row.fail(exc, "prefill failed: "))
            return False

    def _prefill_forward(self, rows: list[Row]) -> tuple[KVBatch, torch.Tensor]:
        """The newcomers' forward with their adapters bound; the running rows' binding comes back
        whatever happens (else they would decode their next token on the newcomers' adapters)."""
        batch = self._prefill_batch(rows)
        return batch, self._forward_bound(rows, self._prefill_ids(rows), batch)

    def _forward_bound(self, rows: list[Row], ids: torch.Tensor, batch: KVBatch) -> torch.Tensor:
        try:
            self.engine._bind([row.request for row in rows])  # unknown adapters raise here
            return self.engine._forward(ids, batch)  # (B, V)
        finally:
            self._rebind()

    # ---- per-row sampling and stop conditions ------------------------------------------------

    def _sample(self, rows: list[Row], logits: torch.Tensor) -> list[int]:
        """Each row's next token; returns the indices of the rows that go on. A row whose logits
        are not finite, or whose sampling, callback or stop check raises, fails alone."""
        # each row's argmax and whether its logits are finite, in one transfer (one device sync)
        greedy, finite = torch.stack([logits.argmax(-1), torch.isfinite(logits).all(-1)]).tolist()
        keep = []
        for k, row in enumerate(rows):
            try:
                if not finite[k]:
                    raise sampling.NonFiniteLogitsError(
                        f"non-finite logits (NaN or inf) on adapter {row.request.adapter or 'base'!r}"
                    )
                tok = self._next_token(row, logits[k], greedy[k])
                if self._emit(row, tok):
                    row.next_token = tok
                    keep.append(k)
                else:
                    self._out.append(row)
            except Exception as exc:
                self._out.append(row.fail(exc))
        return keep

    def _next_token(self, row: Row, logits: torch.Tensor, greedy: int) -> int:
        return sampling.next_token(logits, row.request, row.gen, row.result.token_ids, greedy)

    def _emit(self, row: Row, tok: int) -> bool:
        """Record one token; False when the row is finished."""
        r = row.request
        if tok in r.stop_token_ids:
            row.result.finish_reason = "stop"
            return False
        row.result.token_ids.append(tok)
        if self.on_token is not None:
            self.on_token(row.key, tok)
        if r.stop and (hit := self._stop_hit(row)) is not None:
            row.result.finish_reason, row.result.stop_text = "stop", hit
            return False
        return len(row.result.token_ids) < r.max_new_tokens

    def _stop_hit(self, row: Row) -> str | None:
        """A stop string in the row's text: only the tail that the last token could complete one
        in is decoded (earlier matches would have ended the row before). The tail is counted in
        tokens that decode to text: special tokens between a stop string's parts once pushed
        its start out of the window, and the row decoded on to max_tokens."""
        ids, window, start = row.result.token_ids, stop_window(row.request.stop), len(row.result.token_ids)
        while start > 0 and window > 0:  # back to the window's first token with text
            start -= 1
            window -= ids[start] not in self._silent
        text = self.engine.tokenizer.decode(ids[start:], skip_special_tokens=True)  # as the ingress does
        return first_stop(text, row.request.stop)

    # ---- the batch's rows, binding and failures -----------------------------------------------

    def _keep(self, keep: list[int]) -> None:
        if len(keep) == len(self.rows):
            return
        self.rows = [self.rows[k] for k in keep]
        if self.rows:
            self.batch.select(keep)
        else:
            self.batch = None
        self._rebind()

    def _rebind(self) -> None:
        if self.rows:
            self.engine._bind([row.request for row in self.rows])
        else:
            self.engine._unbind()

    def _guarded(self, fn: Callable[..., None], *args: Any) -> None:
        try:
            fn(*args)
        except Exception as exc:  # selecting or rebinding the running batch broke it
            self._fail_all(exc, "batch update")

    def _fail_all(self, exc: Exception, stage: str) -> None:
        """A failure no single row explains: the running rows (and newcomers still in flight)
        fail with it, the batch is cleared and unbound."""
        gone = {id(row) for row in self._out}  # already failed or finished
        victims = [row for row in self.rows + self._joining if id(row) not in gone]
        victims = list({id(row): row for row in victims}.values())  # a newcomer may be running already
        self._out += [row.fail(exc, f"{stage} failed for the whole batch: ") for row in victims]
        self.rows, self.batch = [], None
        with contextlib.suppress(Exception):  # nothing left to route; the next bind sets every row
            self.engine._unbind()

    def _drain(self) -> list[Row]:
        out, self._out = self._out, []
        return out

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
