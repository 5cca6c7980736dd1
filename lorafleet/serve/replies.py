"""From a GenerationRequest to the HTTP answer: the replica call within the request's deadline,
streams that never show part of a stop string, and every failure in OpenAI's error shape.

A stream's first item is awaited before the response starts, so what fails before any token
(backpressure, an adapter that cannot load, the deadline) still gets its own status code; only
what fails later travels as an error event.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
import uuid
import weakref
from typing import Any

from fastapi.responses import JSONResponse, StreamingResponse

from lorafleet.serve import api
from lorafleet.serve.config import AppArgs
from lorafleet.serve.stops import StopScanner, cut_at_stop
from lorafleet.serve.text import IncrementalDecoder


class Metrics:
    """Request counts, tokens and latency per adapter; without Serve (tests) nothing is recorded."""

    def __init__(self, requests: Any = None, tokens: Any = None, latency: Any = None):
        self.requests, self.tokens, self.latency = requests, tokens, latency

    @classmethod
    def serve(cls) -> Metrics:
        from ray.serve.metrics import Counter, Histogram

        return cls(
            Counter("lorafleet_requests", "requests", tag_keys=("adapter", "status")),
            Counter("lorafleet_generated_tokens", "tokens generated", tag_keys=("adapter",)),
            Histogram(
                "lorafleet_request_latency_s",
                "request latency",
                boundaries=[0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30],
                tag_keys=("adapter",),
            ),
        )

    def done(self, adapter: str, n_tokens: int, start: float, status: str = "ok") -> None:
        if self.requests is None:
            return
        self.requests.inc(tags={"adapter": adapter, "status": status})
        if status == "ok":
            if n_tokens:  # Ray's Counter refuses 0, and an answer may be empty (EOS first)
                self.tokens.inc(n_tokens, tags={"adapter": adapter})
            self.latency.observe(time.perf_counter() - start, tags={"adapter": adapter})


def _message(exc: BaseException) -> str:
    """The user-facing line of an error that crossed Ray (which wraps it in a traceback)."""
    cause = getattr(exc, "cause", None) or exc
    return (str(cause).strip().splitlines() or [type(cause).__name__])[-1]


def replica_error(exc: BaseException) -> api.ApiError:
    """What a failed handle call (or anything unexpected) means to the client."""
    from ray.exceptions import RayActorError
    from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError

    from lorafleet.errors import BaseMismatchError, LorafleetError, RegistryError, RegistryUnavailableError
    from lorafleet.serve.engine import AdapterSlotsFullError
    from lorafleet.serve.gathered_lora import AdapterNotSupportedError

    if isinstance(exc, api.ApiError):
        return exc
    if isinstance(exc, BackPressureError):
        retry = getattr(exc, "_retry_after_s", None) or 1.0
        msg = "the endpoint is at capacity: retry shortly"
        return api.ApiError(429, msg, "rate_limit_error", code="overloaded", retry_after_s=retry)
    if isinstance(exc, DeploymentUnavailableError | RayActorError):
        return api.ApiError(
            503,
            f"no replica can take this now: {_message(exc)}",
            "server_error",
            code="unavailable",
            retry_after_s=5,
        )
    if isinstance(exc, AdapterSlotsFullError):  # every slot held by adapters in use: overload
        return api.ApiError(503, _message(exc), "server_error", code="adapter_slots_full", retry_after_s=2)
    if isinstance(exc, RegistryUnavailableError):
        return api.ApiError(503, _message(exc), "server_error", code="registry_unavailable", retry_after_s=5)
    if isinstance(exc, BaseMismatchError):
        return api.ApiError(409, _message(exc), code="adapter_base_mismatch", param="model")
    if isinstance(exc, RegistryError):
        return api.ApiError(404, _message(exc), code="model_not_found", param="model")
    if isinstance(exc, LorafleetError | AdapterNotSupportedError):  # a malformed adapter, at load
        return api.ApiError(
            422, f"the adapter cannot be served: {_message(exc)}", code="invalid_adapter", param="model"
        )
    return api.ApiError(500, f"generation failed: {_message(exc)}", "server_error", code="server_error")


def final_error(final: dict) -> api.ApiError | None:
    """The replica's final dict failed this row: {"error": msg, "code": invalid_request|server_error}."""
    if "error" not in final:
        return None
    if final.get("code") == "invalid_request":
        return api.ApiError(400, str(final["error"]), code="invalid_request")
    return api.ApiError(500, f"generation failed: {final['error']}", "server_error", code="server_error")


def _timeout(limit_s: float) -> api.ApiError:
    return api.ApiError(
        504, f"the request took longer than {limit_s:g} s (request_timeout_s)", "server_error", code="timeout"
    )


async def _within(awaitable: Any, deadline: float, limit_s: float) -> Any:
    left = deadline - time.monotonic()
    if left <= 0:
        if hasattr(awaitable, "close"):
            awaitable.close()  # a coroutine never awaited warns
        raise _timeout(limit_s)
    try:
        return await asyncio.wait_for(awaitable, left)
    except TimeoutError:
        raise _timeout(limit_s) from None


async def _with_one_retry(call: Any) -> Any:
    """A non-streaming answer is all or nothing, so when its replica dies under it (a lost node)
    asking again is safe: Serve routes the retry to a live replica. Streams are not retried
    (tokens may already be out)."""
    from ray.exceptions import RayActorError  # the actor died or is unreachable

    try:
        return await call()
    except RayActorError:
        return await call()


async def _close(stream: Any) -> None:
    """Stop the replica's work for a stream we no longer read (its row is dropped at the next step)."""
    if hasattr(stream, "aclose"):
        await stream.aclose()
    else:
        _cancel(stream)


def _cancel(stream: Any) -> None:
    """Best effort: Serve's cancel() re-raises a call's own failure (a BackPressureError) when
    the call never reached a replica; that error is already being answered."""
    with contextlib.suppress(Exception):
        stream.cancel()


def _abandon(stream: Any, lease: Any) -> None:
    lease.release(0)  # a no-op when the stream ended normally
    if not hasattr(stream, "aclose"):
        _cancel(stream)


def _event(body: dict) -> str:
    return f"data: {json.dumps(body)}\n\n"


class Replies:
    def __init__(self, args: AppArgs, replica: Any, tokenizer: Any, metrics: Metrics):
        self.args, self.replica, self.tokenizer, self.metrics = args, replica, tokenizer, metrics

    async def answer(
        self, gen: Any, adapter_id: str, body: Any, chat: bool, deadline: float, lease: Any
    ) -> Any:
        """Releases the tenant's lease when the answer is over (for a stream: when it ends)."""
        tag = adapter_id or self.args.display_base_name()
        handle = self.replica.options(multiplexed_model_id=adapter_id, stream=body.stream)
        try:
            if body.stream:
                return await self._stream(handle, gen, body, chat, deadline, lease, tag)
            return await self._collect(handle, gen, body, chat, deadline, lease, tag)
        except Exception:
            lease.release(0)
            self.metrics.done(tag, 0, 0, "error")
            raise

    async def _collect(
        self, handle: Any, gen: Any, body: Any, chat: bool, deadline: float, lease: Any, tag: str
    ) -> JSONResponse:
        start = time.perf_counter()
        calls: list[Any] = []  # the replica call (and its one retry): a timeout cancels it

        def call() -> Any:
            calls.append(handle.complete.remote(gen))
            return calls[-1]

        try:
            final = await _within(_with_one_retry(call), deadline, self.args.request_timeout_s)
        except api.ApiError:  # the timeout: Serve's response goes on unless cancelled
            for response in calls:
                _cancel(response)  # the replica drops the row at its next step
            lease.release(None if calls else 0)  # a row's use before it stopped is not known: all it reserved
            raise
        except Exception as exc:
            raise replica_error(exc) from None
        if (err := final_error(final)) is not None:
            raise err
        n_prompt, n = len(gen.prompt_ids), len(final["token_ids"])
        lease.release(n_prompt + n)  # tokens per minute count the prompt, as they were reserved
        text, stopped = cut_at_stop(
            self.tokenizer.decode(final["token_ids"], skip_special_tokens=True), body.stop
        )
        finish = "stop" if stopped else final.get("finish_reason", "stop")
        self.metrics.done(tag, n, start)
        usage = api.Usage(prompt_tokens=n_prompt, completion_tokens=n, total_tokens=n_prompt + n)
        make = api.chat_response if chat else api.completion_response
        return JSONResponse(
            make(body.model, text, finish, usage), headers={"x-lorafleet-replica": final.get("replica", "")}
        )

    async def _next(self, stream: Any, deadline: float) -> Any:
        try:
            return await _within(stream.__anext__(), deadline, self.args.request_timeout_s)
        except StopAsyncIteration:
            return {"error": "the token stream ended without a final message", "code": "server_error"}
        except Exception as exc:
            await _close(stream)
            raise replica_error(exc) from None

    async def _stream(
        self, handle: Any, gen: Any, body: Any, chat: bool, deadline: float, lease: Any, tag: str
    ) -> StreamingResponse:
        stream = handle.generate.remote(gen)
        first = await self._next(stream, deadline)
        if isinstance(first, dict) and (err := final_error(first)) is not None:
            raise err
        events = self._sse(stream, first, body, chat, deadline, lease, tag, len(gen.prompt_ids))
        # a client gone before the body starts: the generator never runs its finally
        weakref.finalize(events, _abandon, stream, lease)
        return StreamingResponse(events, media_type="text/event-stream")

    async def _sse(
        self,
        stream: Any,
        item: Any,
        body: Any,
        chat: bool,
        deadline: float,
        lease: Any,
        tag: str,
        n_prompt: int,
    ):
        cid = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex[:24]}"
        chunk = api.chat_chunk if chat else api.completion_chunk
        start, decoder, scanner, n = (
            time.perf_counter(),
            IncrementalDecoder(self.tokenizer),
            StopScanner(body.stop),
            0,
        )
        try:
            while not isinstance(item, dict) and not scanner.stopped:
                n += len(item)
                if text := scanner.push("".join(decoder.push(t) for t in item)):
                    yield _event(chunk(cid, body.model, text, None))
                if not scanner.stopped:
                    item = await self._next(stream, deadline)
            if isinstance(item, dict) and (err := final_error(item)) is not None:
                raise err
            finish = "stop" if scanner.stopped else item.get("finish_reason", "stop")
            rest = self.tokenizer.decode(decoder.ids, skip_special_tokens=True)[len(decoder.text) :]
            if text := scanner.push(rest) + scanner.flush():  # a last partial character, held text
                yield _event(chunk(cid, body.model, text, None))
            finish = "stop" if scanner.stopped else finish
        except Exception as exc:  # headers are sent: the error travels as an event
            self.metrics.done(tag, n, start, "error")
            yield _event(replica_error(exc).body())
            return
        finally:  # also when the client hangs up: the replica drops the row at its next step
            lease.release(n_prompt + n)  # its prompt was read: the first tokens came
            if not isinstance(item, dict):
                await _close(stream)
        self.metrics.done(tag, n, start)
        yield _event(chunk(cid, body.model, None, finish))
        if body.include_usage():
            usage = api.Usage(prompt_tokens=n_prompt, completion_tokens=n, total_tokens=n_prompt + n)
            yield _event(api.usage_chunk(cid, body.model, chat, usage))
        yield "data: [DONE]\n\n"
