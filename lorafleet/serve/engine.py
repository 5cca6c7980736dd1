"""The multi-adapter engine behind a replica: one base, many adapters, mixed-adapter batches.

`MultiLoraEngine` is the small interface the deployment uses (add/remove adapter, generate a
mixed batch). `GatheredLoraEngine` implements it with peft-format adapters on an HF causal LM
(fp32/bf16 or NF4 base): each LoRA-targeted linear does `base(x) + bmm(bmm(x, A[idx]), B[idx])`
over per-layer slot banks, so a batch costs the same whether its rows use one adapter or sixteen.
`PeftEngine` is the same protocol on one peft model with `adapter_names=` (peft loops over the
distinct adapters in every layer): the reference for tests and benchmarks.

DoRA: served by `GatheredLoraEngine` in the same mixed batches as LoRA, exactly (its magnitude
term is a per-slot constant at inference; see `gathered_lora`), tested token for token against
peft. `PeftEngine` cannot mix DoRA rows: peft refuses `adapter_names=` with DoRA.
Adapter variants that change the forward otherwise (aLoRA, lora_bias, trainable tokens, ...)
raise `AdapterNotSupportedError` naming the variant.

Both engines decode through `decoder.Decoder`: a left-padded prefill with the attention mask, then
one token per step on the KV cache; finished rows (a stop token or their max_new_tokens) leave the
batch and new requests join it between steps (continuous batching); each seeded row samples with
its own `torch.Generator`. `generate()` is a Decoder run to the end. Engines are not
thread-safe: call them from one thread (the replica's engine worker).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal, Protocol

import torch

from lorafleet.limits import MAX_SERVE_RANK
from lorafleet.serve.decoder import Decoder, GenerationRequest, GenerationResult, KVBatch, Row
from lorafleet.serve.gathered_lora import (
    AdapterInvalidError,
    AdapterNotSupportedError,
    BatchRows,
    read_adapter,
    wrap_linears,
)
from lorafleet.serve.sampling import NonFiniteLogitsError, validate_request

__all__ = [
    "AdapterInvalidError",
    "AdapterNotSupportedError",
    "AdapterSlotsFullError",
    "GatheredLoraEngine",
    "GenerationRequest",
    "GenerationResult",
    "MultiLoraEngine",
    "NonFiniteLogitsError",
    "PeftEngine",
    "Row",
    "UnknownAdapterError",
]
BASE = "__base__"  # peft's adapter_names entry for "no adapter"


class AdapterSlotsFullError(RuntimeError):
    """Every slot holds an adapter; the replica's LRU evicts before adding, so this is a guard."""


class UnknownAdapterError(KeyError):
    """A request names an adapter that is not loaded. The message names that adapter only: it
    may reach a tenant, who must not learn the other tenants' adapter names."""

    def __str__(self) -> str:
        return str(self.args[0])


class MultiLoraEngine(Protocol):
    max_adapters: int

    def add_adapter(self, name: str, folder: Path) -> None: ...
    def remove_adapter(self, name: str) -> None: ...
    def adapters(self) -> list[str]: ...
    def generate(
        self,
        requests: list[GenerationRequest],
        on_token: Callable[[int, int], None] | None = None,
        raise_errors: bool = True,
    ) -> list[GenerationResult]: ...
    def decoder(self, on_token: Callable[[Any, int], None] | None = None) -> Decoder: ...
    def check(self, request: GenerationRequest) -> None: ...


# ---- the decode loop both engines share ----------------------------------------------------------


class _DecodingEngine:
    """generate() and a continuous-batching Decoder for any engine that can bind per-row adapters
    and run one forward on a KV cache."""

    model: Any
    tokenizer: Any
    device: torch.device

    def _bind(self, requests: list[GenerationRequest]) -> None: ...
    def _unbind(self) -> None: ...

    def _forward_kwargs(self) -> dict[str, Any]:
        return {}

    def _forward(self, ids: torch.Tensor, batch: KVBatch) -> torch.Tensor:
        out = self.model(
            input_ids=ids,
            attention_mask=batch.mask,
            position_ids=batch.positions,
            past_key_values=batch.cache,
            use_cache=True,
            logits_to_keep=1,
            **self._forward_kwargs(),
        )
        return out.logits[:, -1]  # (B, V): logits only for the last position

    def decoder(self, on_token: Callable[[Any, int], None] | None = None) -> Decoder:
        return Decoder(self, on_token)

    @property
    def vocab_size(self) -> int:
        return self.model.get_input_embeddings().num_embeddings

    def check(self, request: GenerationRequest) -> None:
        """Raise what admitting this request would fail it with (a bad value: ValueError; an
        unknown adapter: UnknownAdapterError). Never binds: the running rows keep their adapters."""
        validate_request(request, self.vocab_size)
        if request.adapter is not None and request.adapter not in self.adapters():
            raise UnknownAdapterError(f"adapter '{request.adapter}' is not loaded")

    def generate(
        self,
        requests: list[GenerationRequest],
        on_token: Callable[[int, int], None] | None = None,
        raise_errors: bool = True,
    ) -> list[GenerationResult]:
        """Generate for a mixed-adapter batch; on_token(request_index, token_id) streams. A row
        that failed raises its error at the end (raise_errors), or comes back with
        finish_reason "error" and result.error; its batch mates' results are unaffected."""
        decoder = self.decoder(on_token)
        done = decoder.admit(list(enumerate(requests)))
        while decoder:
            done += decoder.step()
        failed = [row for row in done if row.exception is not None]
        if failed and raise_errors:
            raise failed[0].exception
        results = {row.key: row.result for row in done}
        return [results[i] for i in range(len(requests))]


# ---- gathered LoRA ---------------------------------------------------------------------------------


class GatheredLoraEngine(_DecodingEngine):
    """Mixed-adapter batches in two batched matmuls per LoRA layer; slot 0 is the base.

    max_rank caps an adapter's rank (banks grow to the largest rank loaded, so memory per layer is
    (max_adapters + 1) x rank x (in + out) elements). bank_cache_mb bounds the per-batch gathered
    copy of the banks kept for the decode steps; a bigger batch gathers at every step instead."""

    def __init__(
        self,
        model: Any,
        tokenizer: Any,
        max_adapters: int = 16,
        target_modules: str | list[str] = "all-linear",
        *,
        max_rank: int = MAX_SERVE_RANK,
        lora_dtype: torch.dtype | None = None,
        bank_cache_mb: float = 512,
    ):
        self.model, self.tokenizer = model.eval(), tokenizer
        self.max_adapters, self.max_rank = max_adapters, max_rank
        emb = model.get_input_embeddings().weight
        self.device = emb.device
        self.rows = BatchRows()
        self.layers = wrap_linears(
            model, self.rows, max_adapters, max_rank, lora_dtype or emb.dtype, target_modules
        )
        self.slots: dict[str, int] = {}
        self.free = list(range(max_adapters, 0, -1))  # pop() hands out 1, 2, ...; slot 0 stays zero
        self.bank_cache_bytes = int(bank_cache_mb * 2**20)

    @classmethod
    def from_pretrained(
        cls,
        base_path: Path,
        quantization: Literal["nf4", "none"] = "nf4",
        dtype: str = "auto",
        device: str = "auto",
        max_adapters: int = 16,
        *,
        max_rank: int = MAX_SERVE_RANK,
        target_modules: str | list[str] = "all-linear",
    ) -> GatheredLoraEngine:
        """Load the base (bitsandbytes NF4 with double quantisation, or full precision) and wrap it.
        dtype 'auto' = bf16 compute on a GPU, fp32 on a CPU."""
        model, tokenizer = _load(base_path, quantization, dtype, device)
        return cls(model, tokenizer, max_adapters, target_modules, max_rank=max_rank)

    # ---- adapters ----

    def add_adapter(self, name: str, folder: Path) -> None:
        """Load into a free slot (or over the same name's slot: a new version replaces the old)."""
        weights = read_adapter(Path(folder), self.max_rank, name)
        self._check_fits(name, weights.modules)
        slot = self.slots.get(name) or self._take_slot()
        try:
            for module, layer in self.layers.items():
                layer.fill(slot, weights.modules.get(module))  # modules it lacks stay zero
        except AdapterInvalidError as exc:
            self._release(slot)
            self.slots.pop(name, None)
            raise AdapterInvalidError(f"{name}: {exc}") from None
        except Exception:
            self._release(slot)
            self.slots.pop(name, None)
            raise
        self.slots[name] = slot

    def _take_slot(self) -> int:
        if not self.free:
            raise AdapterSlotsFullError(f"all {self.max_adapters} adapter slots are in use; remove one first")
        return self.free.pop()

    def _check_fits(self, name: str, modules: dict) -> None:
        unknown = sorted(set(modules) - set(self.layers))
        if unknown:
            raise AdapterNotSupportedError(
                f"{name}: targets modules this base lacks or the engine did not wrap: {unknown[:3]}"
            )
        for module, w in modules.items():
            layer = self.layers[module]
            if (w.a.shape[1], w.b.shape[0]) != (layer.A.shape[2], layer.B.shape[2]):
                raise AdapterInvalidError(
                    f"{name}: {module} has lora_B {tuple(w.b.shape)} x lora_A {tuple(w.a.shape)}, the base "
                    f"layer is {layer.B.shape[2]} x {layer.A.shape[2]}: trained on another base?"
                )

    def remove_adapter(self, name: str) -> None:
        """Zero and free its slot; unknown names are ignored (an LRU finaliser may call twice)."""
        slot = self.slots.pop(name, None)
        if slot is not None:
            self._release(slot)

    def _release(self, slot: int) -> None:
        for layer in self.layers.values():
            layer.fill(slot, None)
        if slot not in self.free:
            self.free.append(slot)

    def adapters(self) -> list[str]:
        return list(self.slots)

    # ---- generate hooks ----

    def _slot(self, adapter: str | None) -> int:
        if adapter is None:
            return 0
        if adapter not in self.slots:
            raise UnknownAdapterError(f"adapter '{adapter}' is not loaded")
        return self.slots[adapter]

    def _bind(self, requests: list[GenerationRequest]) -> None:
        idx = [self._slot(r.adapter) for r in requests]
        slots = frozenset(idx) - {0}
        size = sum(layer.bank_bytes(len(idx), slots) for layer in self.layers.values())
        self.rows.set(idx, self.device, cache_banks=size <= self.bank_cache_bytes)

    def _unbind(self) -> None:
        self.rows.clear()  # releases the gathered banks too


# ---- peft reference --------------------------------------------------------------------------------


class PeftEngine(_DecodingEngine):
    """One peft model; each batch's rows routed with `adapter_names=` (peft's mixed-batch path,
    which loops over the batch's distinct adapters in every LoRA layer). Same decode loop as
    GatheredLoraEngine, so benchmarks compare the LoRA paths alone. No DoRA rows (peft refuses)."""

    def __init__(self, model: Any, tokenizer: Any, max_adapters: int = 16):
        self.base, self.peft, self.tokenizer = model.eval(), None, tokenizer
        self.max_adapters = max_adapters
        self.device = model.get_input_embeddings().weight.device
        self._names: list[str] = []

    @classmethod
    def from_pretrained(
        cls,
        base_path: Path,
        quantization: Literal["nf4", "none"] = "nf4",
        dtype: str = "auto",
        device: str = "auto",
        max_adapters: int = 16,
    ) -> PeftEngine:
        model, tokenizer = _load(base_path, quantization, dtype, device)
        return cls(model, tokenizer, max_adapters)

    @property
    def model(self) -> Any:
        return self.peft if self.peft is not None else self.base

    def add_adapter(self, name: str, folder: Path) -> None:
        from peft import PeftModel

        self.remove_adapter(name)
        if len(self.adapters()) >= self.max_adapters:
            raise AdapterSlotsFullError(f"all {self.max_adapters} adapter slots are in use; remove one first")
        if self.peft is None:
            self.peft = PeftModel.from_pretrained(self.base, Path(folder), adapter_name=name).eval()
        else:
            self.peft.load_adapter(Path(folder), adapter_name=name)

    def remove_adapter(self, name: str) -> None:
        if name not in self.adapters():
            return
        if len(self.adapters()) == 1:
            self.base, self.peft = self.peft.unload(), None  # peft wants at least one adapter
        else:
            self.peft.delete_adapter(name)

    def adapters(self) -> list[str]:
        return list(self.peft.peft_config) if self.peft is not None else []

    def _bind(self, requests: list[GenerationRequest]) -> None:
        unknown = {r.adapter for r in requests if r.adapter is not None} - set(self.adapters())
        if unknown:
            raise UnknownAdapterError(f"adapter '{sorted(unknown)[0]}' is not loaded")
        self._names = [r.adapter or BASE for r in requests]

    def _unbind(self) -> None:
        self._names = []

    def _forward_kwargs(self) -> dict[str, Any]:
        return {"adapter_names": self._names} if self.peft is not None else {}


def _load(base_path: Path, quantization: str, dtype: str, device: str) -> tuple[Any, Any]:
    from lorafleet.models import load_base, load_tokenizer
    from lorafleet.spec import QuantizationSpec

    device = ("cuda:0" if torch.cuda.is_available() else "cpu") if device == "auto" else device
    quant = QuantizationSpec(load_in_4bit=quantization == "nf4", compute_dtype=dtype)
    return load_base(Path(base_path), quant, device), load_tokenizer(Path(base_path))
