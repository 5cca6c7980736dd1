"""Gathered LoRA: every adapter's A and B stacked per layer in fixed slots; each row of a batch
picks its adapter by index, and the LoRA term is two batched matmuls whatever the number of
distinct adapters in the batch (the idea behind Punica's BGMV and S-LoRA).

    y = base(x) + bmm(bmm(x, A[idx]), B[idx])      scaling folded into B; slot 0 is all zeros
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
from safetensors.torch import load_file
from torch import nn


class AdapterNotSupportedError(ValueError):
    """An adapter this engine cannot put into a mixed batch (DoRA, embedding LoRA, rank > slots)."""


class RowAdapters:
    """The adapter slot of each batch row, shared by every wrapped layer for one forward."""

    def __init__(self) -> None:
        self.idx: torch.Tensor | None = None  # (B,) slot per row; None = base only


class GatheredLoraLinear(nn.Module):
    def __init__(self, base: nn.Module, rows: RowAdapters, slots: int, max_rank: int,
                 dtype: torch.dtype, device: torch.device):
        super().__init__()
        self.base, self.rows = base, rows
        in_f, out_f = base.in_features, base.out_features
        self.A = nn.Parameter(torch.zeros(slots + 1, in_f, max_rank, dtype=dtype, device=device),
                              requires_grad=False)  # (S+1, in, r)
        self.B = nn.Parameter(torch.zeros(slots + 1, max_rank, out_f, dtype=dtype, device=device),
                              requires_grad=False)  # (S+1, r, out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)  # (B, T, out)
        idx = self.rows.idx
        if idx is None:
            return y
        a, b = self.A[idx], self.B[idx]  # (B, in, r), (B, r, out)
        return y + torch.bmm(torch.bmm(x.to(a.dtype), a), b).to(y.dtype)

    def fill(self, slot: int, a: torch.Tensor | None, b: torch.Tensor | None) -> None:
        """a: (r, in) and b: (out, r) as peft stores them, scaling already in b; None = zero."""
        self.A.data[slot].zero_()
        self.B.data[slot].zero_()
        if a is not None:
            r = a.shape[0]
            self.A.data[slot, :, :r] = a.t().to(self.A.dtype)
            self.B.data[slot, :r, :] = b.t().to(self.B.dtype)


def is_linear(module: nn.Module) -> bool:
    return isinstance(module, nn.Linear) or type(module).__name__ in ("Linear4bit", "Linear8bitLt")


def wrap_linears(model: nn.Module, rows: RowAdapters, slots: int, max_rank: int, dtype: torch.dtype,
                 targets: str | list[str] = "all-linear") -> dict[str, GatheredLoraLinear]:
    """Replace every targeted linear (never the output head) by a gathered wrapper."""
    device = next(model.parameters()).device
    wrapped = {}
    for name, module in list(model.named_modules()):
        leaf = name.rsplit(".", 1)[-1]
        if not is_linear(module) or leaf == "lm_head":
            continue
        if targets != "all-linear" and leaf not in targets:
            continue
        parent = model.get_submodule(name.rsplit(".", 1)[0]) if "." in name else model
        layer = GatheredLoraLinear(module, rows, slots, max_rank, dtype, device)
        setattr(parent, leaf, layer)
        wrapped[name] = layer
    return wrapped


def _scaling(config: dict, module: str, rank: int) -> float:
    leaf_alpha = _pattern(config.get("alpha_pattern") or {}, module)
    alpha = leaf_alpha if leaf_alpha is not None else config["lora_alpha"]
    return alpha / math.sqrt(rank) if config.get("use_rslora") else alpha / rank


def _pattern(patterns: dict, module: str) -> float | None:
    for key, value in patterns.items():
        if module == key or module.endswith("." + key):
            return value
    return None


def read_adapter(folder: Path, max_rank: int) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """{module name: (A (r, in), B*scaling (out, r))} from a peft folder, safetensors only."""
    config = json.loads((folder / "adapter_config.json").read_text())
    if config.get("use_dora"):
        raise AdapterNotSupportedError(
            f"{folder.name}: DoRA adapters cannot join a mixed-adapter batch (their magnitude "
            "rescales the merged weight per adapter); merge it with `lorafleet adapters merge` "
            "and serve the merged model as its own base, or train it with use_dora: false")
    tensors = load_file(folder / "adapter_model.safetensors")
    out = {}
    for key, a in tensors.items():
        if ".lora_A." not in key:
            if ".lora_B." not in key:
                raise AdapterNotSupportedError(f"{folder.name}: unsupported adapter tensor '{key}'")
            continue
        module = key.removeprefix("base_model.model.").split(".lora_A.")[0]
        b = tensors[key.replace(".lora_A.", ".lora_B.")]
        if a.shape[0] > max_rank:
            raise AdapterNotSupportedError(f"{folder.name}: rank {a.shape[0]} > engine max_rank {max_rank}")
        out[module] = (a.float(), b.float() * _scaling(config, module, a.shape[0]))
    return out
