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

Both engines run their own decode loop: a left-padded prefill with the attention mask, then one
token per step on the KV cache; rows that finish (a stop token or their max_new_tokens) leave the
batch, KV cache included; each seeded row samples with its own `torch.Generator`. Engines are not
thread-safe: call them from one thread (the replica's engine worker).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Protocol

import torch

from lorafleet.serve.gathered_lora import AdapterNotSupportedError, BatchRows, read_adapter, wrap_linears

__all__ = ["AdapterNotSupportedError", "AdapterSlotsFullError", "GatheredLoraEngine", "GenerationRequest",
           "GenerationResult", "MultiLoraEngine", "PeftEngine", "UnknownAdapterError"]
BASE = "__base__"  # peft's adapter_names entry for "no adapter"


class AdapterSlotsFullError(RuntimeError):
    """Every slot holds an adapter; the replica's LRU evicts before adding, so this is a guard."""


class UnknownAdapterError(KeyError):
    """A request names an adapter that is not loaded."""

    def __str__(self) -> str:
        return str(self.args[0])


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


class MultiLoraEngine(Protocol):
    max_adapters: int

    def add_adapter(self, name: str, folder: Path) -> None: ...
    def remove_adapter(self, name: str) -> None: ...
    def adapters(self) -> list[str]: ...
    def generate(self, requests: list[GenerationRequest],
                 on_token: Callable[[int, int], None] | None = None) -> list[GenerationResult]: ...


# ---- the decode loop both engines share ----------------------------------------------------------

@dataclass
class _Batch:
    rows: list[int]  # request index of each live row
    mask: torch.Tensor  # (B, T) 1 = a real token
    positions: torch.Tensor  # (B, T) at prefill, then (B, 1)
    cache: Any  # transformers DynamicCache

    def select(self, keep: list[int]) -> None:
        """Drop finished rows everywhere, their KV cache included."""
        sel = torch.tensor(keep, device=self.mask.device)
        self.cache.batch_select_indices(sel)
        self.rows = [self.rows[k] for k in keep]
        self.mask, self.positions = self.mask[sel], self.positions[sel]

    def advance(self) -> None:
        """Grow the mask and positions by the token about to be fed."""
        self.mask = torch.cat([self.mask, self.mask.new_ones((len(self.rows), 1))], dim=1)  # (B, T+1)
        self.positions = self.positions[:, -1:] + 1  # (B, 1)


class _DecodingEngine:
    """generate() for any engine that can bind per-row adapters and run one forward."""

    model: Any
    tokenizer: Any
    device: torch.device

    def _bind(self, requests: list[GenerationRequest]) -> None: ...
    def _select_rows(self, keep: list[int]) -> None: ...
    def _unbind(self) -> None: ...

    def _forward_kwargs(self) -> dict[str, Any]:
        return {}

    @torch.inference_mode()
    def generate(self, requests: list[GenerationRequest],
                 on_token: Callable[[int, int], None] | None = None) -> list[GenerationResult]:
        """Generate for a mixed-adapter batch; on_token(request_index, token_id) streams."""
        _validate(requests)
        results = [GenerationResult([], "length") for _ in requests]
        rows = [i for i, r in enumerate(requests) if r.max_new_tokens > 0]
        if not rows:
            return results
        self._bind([requests[i] for i in rows])  # unknown adapters raise before any work
        try:
            self._decode(requests, rows, results, on_token)
        finally:
            self._unbind()
        return results

    def _decode(self, requests: list[GenerationRequest], rows: list[int], results: list[GenerationResult],
                on_token: Callable[[int, int], None] | None) -> None:
        gens = [_generator(r.seed) for r in requests]
        batch = self._prefill_batch(requests, rows)
        logits = self._forward(self._prefill_ids(requests, rows), batch)  # (B, V)
        while True:
            live = [requests[i] for i in batch.rows]
            tokens = _sample_rows(logits, live, [gens[i] for i in batch.rows])
            keep = [k for k, (i, tok) in enumerate(zip(batch.rows, tokens, strict=True))
                    if _emit(i, requests[i], tok, results[i], on_token)]
            if not keep:
                return
            if len(keep) < len(batch.rows):
                batch.select(keep)
                self._select_rows(keep)
            batch.advance()
            ids = torch.tensor([tokens[k] for k in keep], device=self.device)[:, None]  # (B, 1)
            logits = self._forward(ids, batch)

    def _prefill_batch(self, requests: list[GenerationRequest], rows: list[int]) -> _Batch:
        from transformers import DynamicCache

        width = max(len(requests[i].prompt_ids) for i in rows)
        mask = torch.zeros((len(rows), width), dtype=torch.long)  # (B, T), left padded
        for k, i in enumerate(rows):
            mask[k, width - len(requests[i].prompt_ids):] = 1
        mask = mask.to(self.device)
        positions = (mask.cumsum(-1) - 1).clamp(min=0)  # (B, T): each row counts from its first token
        return _Batch(list(rows), mask, positions, DynamicCache(config=self.model.config))

    def _prefill_ids(self, requests: list[GenerationRequest], rows: list[int]) -> torch.Tensor:
        """Left-padded ids, so every row's next token comes from the last column."""
        width = max(len(requests[i].prompt_ids) for i in rows)
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        ids = torch.full((len(rows), width), pad, dtype=torch.long)  # (B, T)
        for k, i in enumerate(rows):
            ids[k, width - len(requests[i].prompt_ids):] = torch.tensor(requests[i].prompt_ids)
        return ids.to(self.device)

    def _forward(self, ids: torch.Tensor, batch: _Batch) -> torch.Tensor:
        out = self.model(input_ids=ids, attention_mask=batch.mask, position_ids=batch.positions,
                         past_key_values=batch.cache, use_cache=True, logits_to_keep=1,
                         **self._forward_kwargs())
        return out.logits[:, -1]  # (B, V): logits only for the last position


def _validate(requests: list[GenerationRequest]) -> None:
    for i, r in enumerate(requests):
        if not r.prompt_ids:
            raise ValueError(f"request {i}: empty prompt")
        if r.temperature < 0 or not 0 < r.top_p <= 1:
            raise ValueError(f"request {i}: temperature must be >= 0 and top_p in (0, 1]")


def _emit(i: int, r: GenerationRequest, tok: int, result: GenerationResult,
          on_token: Callable[[int, int], None] | None) -> bool:
    """Record one token for request i; False when the row is finished."""
    if tok in r.stop_token_ids:
        result.finish_reason = "stop"
        return False
    result.token_ids.append(tok)
    if on_token is not None:
        on_token(i, tok)
    return len(result.token_ids) < r.max_new_tokens


def _generator(seed: int | None) -> torch.Generator | None:
    return torch.Generator().manual_seed(seed) if seed is not None else None


def _sample_rows(logits: torch.Tensor, requests: list[GenerationRequest],
                 gens: list[torch.Generator | None]) -> list[int]:
    greedy = logits.argmax(-1).tolist()  # one op (and one device sync) for every greedy row
    return [greedy[k] if r.temperature == 0 else _sample(logits[k], r, gens[k])
            for k, r in enumerate(requests)]


def _sample(logits: torch.Tensor, r: GenerationRequest, gen: torch.Generator | None) -> int:
    """Nucleus sampling on the CPU with the row's own generator (same draw on any device)."""
    probs = torch.softmax(logits.float().cpu() / r.temperature, dim=-1)  # (V,)
    if r.top_p < 1:
        sorted_p, order = probs.sort(descending=True)
        keep = sorted_p.cumsum(0) - sorted_p < r.top_p
        keep[0] = True  # the top token always stays
        probs = torch.zeros_like(probs).scatter(0, order[keep], sorted_p[keep])
    return int(torch.multinomial(probs, 1, generator=gen))


# ---- gathered LoRA ---------------------------------------------------------------------------------

class GatheredLoraEngine(_DecodingEngine):
    """Mixed-adapter batches in two batched matmuls per LoRA layer; slot 0 is the base.

    max_rank caps an adapter's rank (banks grow to the largest rank loaded, so memory per layer is
    (max_adapters + 1) x rank x (in + out) elements). bank_cache_mb bounds the per-batch gathered
    copy of the banks kept for the decode steps; a bigger batch gathers at every step instead."""

    def __init__(self, model: Any, tokenizer: Any, max_adapters: int = 16,
                 target_modules: str | list[str] = "all-linear", *, max_rank: int = 64,
                 lora_dtype: torch.dtype | None = None, bank_cache_mb: float = 512):
        self.model, self.tokenizer = model.eval(), tokenizer
        self.max_adapters, self.max_rank = max_adapters, max_rank
        emb = model.get_input_embeddings().weight
        self.device = emb.device
        self.rows = BatchRows()
        self.layers = wrap_linears(model, self.rows, max_adapters, max_rank, lora_dtype or emb.dtype,
                                   target_modules)
        self.slots: dict[str, int] = {}
        self.free = list(range(max_adapters, 0, -1))  # pop() hands out 1, 2, ...; slot 0 stays zero
        self.bank_cache_bytes = int(bank_cache_mb * 2**20)

    @classmethod
    def from_pretrained(cls, base_path: Path, quantization: Literal["nf4", "none"] = "nf4",
                        dtype: str = "auto", device: str = "auto", max_adapters: int = 16, *,
                        max_rank: int = 64, target_modules: str | list[str] = "all-linear",
                        ) -> GatheredLoraEngine:
        """Load the base (bitsandbytes NF4 with double quantisation, or full precision) and wrap it.
        dtype 'auto' = bf16 compute on a GPU, fp32 on a CPU."""
        model, tokenizer = _load(base_path, quantization, dtype, device)
        return cls(model, tokenizer, max_adapters, target_modules, max_rank=max_rank)

    # ---- adapters ----

    def add_adapter(self, name: str, folder: Path) -> None:
        """Load into a free slot (or over the same name's slot: a new version replaces the old)."""
        weights = read_adapter(Path(folder), self.max_rank)
        self._check_fits(name, weights.modules)
        slot = self.slots.get(name) or self._take_slot()
        try:
            for module, layer in self.layers.items():
                layer.fill(slot, weights.modules.get(module))  # modules it lacks stay zero
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
            raise AdapterNotSupportedError(f"{name}: targets modules this base lacks or the engine did not "
                                           f"wrap: {unknown[:3]}")
        for module, w in modules.items():
            layer = self.layers[module]
            if (w.a.shape[1], w.b.shape[0]) != (layer.A.shape[2], layer.B.shape[2]):
                raise AdapterNotSupportedError(f"{name}: {module} has shape {tuple(w.b.shape)}x"
                                               f"{tuple(w.a.shape)}: trained on another base?")

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
            raise UnknownAdapterError(f"adapter '{adapter}' is not loaded; loaded: {sorted(self.slots)}")
        return self.slots[adapter]

    def _bind(self, requests: list[GenerationRequest]) -> None:
        idx = [self._slot(r.adapter) for r in requests]
        slots = frozenset(idx) - {0}
        size = sum(layer.bank_bytes(len(idx), slots) for layer in self.layers.values())
        self.rows.set(idx, self.device, cache_banks=size <= self.bank_cache_bytes)

    def _select_rows(self, keep: list[int]) -> None:
        self.rows.select(keep)

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
    def from_pretrained(cls, base_path: Path, quantization: Literal["nf4", "none"] = "nf4",
                        dtype: str = "auto", device: str = "auto", max_adapters: int = 16) -> PeftEngine:
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

    def _select_rows(self, keep: list[int]) -> None:
        self._names = [self._names[k] for k in keep]

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
