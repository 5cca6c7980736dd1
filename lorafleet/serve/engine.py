"""The multi-adapter engine behind a replica: one base, many adapters, mixed-adapter batches.

`MultiLoraEngine` is the small interface the deployment uses (load base, add/remove adapter,
generate a mixed batch); `GatheredLoraEngine` implements it with peft-format adapters on any
HF causal LM (fp32/bf16 or NF4 base). A vLLM engine with its multi-LoRA kernels can implement
the same protocol for GPU serving without touching the deployments.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Protocol

import torch

from lorafleet.serve.gathered_lora import AdapterNotSupportedError, RowAdapters, read_adapter, wrap_linears

__all__ = ["AdapterNotSupportedError", "AdapterSlotsFullError", "GatheredLoraEngine",
           "GenerationRequest", "GenerationResult", "MultiLoraEngine"]


class AdapterSlotsFullError(RuntimeError):
    """Every slot holds an adapter; the replica's LRU evicts before adding, so this is a guard."""


@dataclass
class GenerationRequest:
    prompt_ids: list[int]
    adapter: str | None  # name given to add_adapter; None = the base
    max_new_tokens: int = 64
    temperature: float = 0.0  # 0 = greedy
    top_p: float = 1.0
    seed: int | None = None  # per request: a row's sample does not depend on its batch mates
    stop_token_ids: list[int] = field(default_factory=list)


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


class GatheredLoraEngine:
    def __init__(self, model, tokenizer, max_adapters: int = 16, max_rank: int = 64,
                 target_modules: str | list[str] = "all-linear", dtype: torch.dtype = torch.float32):
        self.model, self.tokenizer = model.eval(), tokenizer
        self.max_adapters = max_adapters
        self.rows = RowAdapters()
        self.layers = wrap_linears(model, self.rows, max_adapters, max_rank, dtype, target_modules)
        self.max_rank = max_rank
        self.slots: dict[str, int] = {}
        self.free = list(range(max_adapters, 0, -1))  # slot 0 stays zero: the base
        self.device = next(model.parameters()).device

    @classmethod
    def from_pretrained(cls, base_path: Path, quantization: Literal["nf4", "none"] = "nf4",
                        dtype: str = "auto", device: str = "auto", max_adapters: int = 16,
                        max_rank: int = 64) -> GatheredLoraEngine:
        from lorafleet.models import compute_dtype, load_base, load_tokenizer
        from lorafleet.spec import QuantizationSpec

        device = ("cuda:0" if torch.cuda.is_available() else "cpu") if device == "auto" else device
        quant = QuantizationSpec(load_in_4bit=quantization == "nf4", compute_dtype=dtype)
        model = load_base(Path(base_path), quant, device)
        torch_dtype = compute_dtype(dtype, device.startswith("cuda"))
        return cls(model, load_tokenizer(Path(base_path)), max_adapters, max_rank, dtype=torch_dtype)

    # ---- adapters ----------------------------------------------------------------------

    def add_adapter(self, name: str, folder: Path) -> None:
        if name in self.slots:
            return
        weights = read_adapter(Path(folder), self.max_rank)
        unknown = set(weights) - set(self.layers)
        if unknown:
            raise AdapterNotSupportedError(f"{name}: adapter targets modules this base lacks or "
                                           f"the engine did not wrap: {sorted(unknown)[:3]}")
        if not self.free:
            raise AdapterSlotsFullError(f"all {self.max_adapters} adapter slots are in use; remove one first")
        slot = self.free.pop()
        for module, layer in self.layers.items():
            a, b = weights.get(module, (None, None))  # modules it lacks contribute zero
            layer.fill(slot, a, b)
        self.slots[name] = slot

    def remove_adapter(self, name: str) -> None:
        slot = self.slots.pop(name, None)
        if slot is None:
            return
        for layer in self.layers.values():
            layer.fill(slot, None, None)
        self.free.append(slot)

    def adapters(self) -> list[str]:
        return list(self.slots)

    # ---- generation --------------------------------------------------------------------

    def _slot(self, adapter: str | None) -> int:
        if adapter is None:
            return 0
        if adapter not in self.slots:
            raise KeyError(f"adapter '{adapter}' is not loaded; loaded: {sorted(self.slots)}")
        return self.slots[adapter]

    def _prefill_inputs(self, requests: list[GenerationRequest]) -> tuple[torch.Tensor, torch.Tensor]:
        """Left-padded ids and mask, so every row's next token sits in the last column."""
        width = max(len(r.prompt_ids) for r in requests)
        pad = self.tokenizer.pad_token_id or 0
        ids = torch.full((len(requests), width), pad, dtype=torch.long)
        mask = torch.zeros((len(requests), width), dtype=torch.long)
        for i, r in enumerate(requests):
            ids[i, width - len(r.prompt_ids):] = torch.tensor(r.prompt_ids)
            mask[i, width - len(r.prompt_ids):] = 1
        return ids.to(self.device), mask.to(self.device)

    @torch.inference_mode()
    def generate(self, requests: list[GenerationRequest],
                 on_token: Callable[[int, int], None] | None = None) -> list[GenerationResult]:
        from transformers import DynamicCache

        self.rows.idx = torch.tensor([self._slot(r.adapter) for r in requests], device=self.device)
        gens = [_generator(r.seed) for r in requests]
        ids, mask = self._prefill_inputs(requests)
        positions = (mask.cumsum(-1) - 1).clamp(min=0)  # (B, T)
        cache = DynamicCache()
        results = [GenerationResult([], "length") for _ in requests]
        live = [True] * len(requests)
        try:
            logits = self._step(ids, mask, positions, cache)
            for _ in range(max(r.max_new_tokens for r in requests)):
                tokens = _sample_batch(logits, requests, gens)
                self._record(requests, tokens, results, live, on_token)
                if not any(live):
                    break
                mask = torch.cat([mask, mask.new_ones((len(requests), 1))], dim=1)
                positions = positions[:, -1:] + 1
                nxt = torch.tensor(tokens, device=self.device)[:, None]  # (B, 1)
                logits = self._step(nxt, mask, positions, cache)
        finally:
            self.rows.idx = None
        return results

    def _step(self, ids, mask, positions, cache) -> torch.Tensor:
        out = self.model(input_ids=ids, attention_mask=mask, position_ids=positions,
                         past_key_values=cache, use_cache=True, logits_to_keep=1)
        return out.logits[:, -1].float()  # (B, V)

    @staticmethod
    def _record(requests, tokens, results, live, on_token) -> None:
        for i, (r, tok) in enumerate(zip(requests, tokens, strict=True)):
            if not live[i]:
                continue
            if tok in r.stop_token_ids:
                results[i].finish_reason, live[i] = "stop", False
                continue
            results[i].token_ids.append(tok)
            if on_token is not None:
                on_token(i, tok)
            if len(results[i].token_ids) >= r.max_new_tokens:
                live[i] = False


def _generator(seed: int | None) -> torch.Generator | None:
    return torch.Generator().manual_seed(seed) if seed is not None else None


def _sample_batch(logits: torch.Tensor, requests: list[GenerationRequest],
                  gens: list[torch.Generator | None]) -> list[int]:
    greedy = logits.argmax(-1).tolist()  # one op for every greedy row
    return [greedy[i] if r.temperature == 0 else _sample(logits[i], r, gens[i])
            for i, r in enumerate(requests)]


def _sample(logits: torch.Tensor, r: GenerationRequest, gen: torch.Generator | None) -> int:
    """Greedy at temperature 0, else nucleus sampling with the row's own generator."""
    if r.temperature == 0:
        return int(logits.argmax())
    probs = torch.softmax(logits.cpu() / r.temperature, dim=-1)
    if r.top_p < 1:
        sorted_p, order = probs.sort(descending=True)
        keep = sorted_p.cumsum(0) - sorted_p < r.top_p  # always keeps the top token
        probs = torch.zeros_like(probs).scatter(0, order[keep], sorted_p[keep])
    return int(torch.multinomial(probs, 1, generator=gen))
