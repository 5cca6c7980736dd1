"""Gathered LoRA: every adapter's A and B stacked per layer in fixed slots; each row of a batch
picks its adapter by index, and the LoRA term is two batched matmuls whatever the number of
distinct adapters in the batch (the idea behind Punica's BGMV and S-LoRA):

    y = base(x) + bmm(bmm(x, A[idx]^T), B[idx])      scaling folded into B; slot 0 is all zeros

Ranks are padded with zeros to the layer's rank capacity (which grows to the largest rank loaded,
up to `max_rank`), and each forward uses only the columns up to the largest rank among the
batch's slots: a batch of rank-8 adapters does rank-8 work even when a rank-64 adapter is loaded,
and a layer that none of the batch's adapters targets does no LoRA work at all.

DoRA is served in the same batched path. peft's DoRA output for a linear layer (eval, no dropout)
is `base(x) + (g - 1) * (W x) + g * s * B A x` with `g = magnitude / ||W + s B A||` per output
row, a constant at inference. So a DoRA slot stores `g * s * B` as its B and `g - 1` in a per-slot
vector `G`; the layer adds `G[idx] * (base(x) - bias)`, one elementwise product per row, computed
only when the batch holds a DoRA row. (peft itself refuses DoRA in `adapter_names=` batches.)
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file
from torch import nn

PREFIX = "base_model.model."
# LoraConfig fields whose variants change the forward beyond LoRA (+ DoRA): refused, not guessed at
UNSUPPORTED = {
    "lora_bias": "a bias on lora_B",
    "alora_invocation_tokens": "activated LoRA (aLoRA)",
    "use_qalora": "QA-LoRA",
    "layer_replication": "layer replication",
    "target_parameters": "LoRA on nn.Parameter targets",
    "arrow_config": "Arrow routing",
    "use_bdlora": "block-diagonal LoRA",
    "velora_config": "VeLoRA",
    "kasa_config": "KaSA",
    "monteclora_config": "MonteCLoRA",
    "trainable_token_indices": "trainable tokens",
    "modules_to_save": "modules_to_save (full copies of base modules)",
    "megatron_config": "Megatron parallel layers",
}


class AdapterNotSupportedError(ValueError):
    """An adapter the gathered path cannot serve exactly (a LoRA variant it does not implement,
    embedding LoRA, a rank above max_rank, a module the base lacks or the engine did not wrap)."""


class AdapterInvalidError(AdapterNotSupportedError):
    """A malformed adapter folder: a missing file, a config without a numeric lora_alpha or r,
    lora_A and lora_B that disagree on the rank or with the base layer, NaN or inf weights.
    Refused at load; a ValueError, so callers answer it as the client's fault (4xx)."""


@dataclass
class ModuleWeights:
    a: torch.Tensor  # (r, in) as peft stores lora_A
    b: torch.Tensor  # (out, r) lora_B with the scaling folded in
    magnitude: torch.Tensor | None = None  # (out,) DoRA magnitude; None for plain LoRA


@dataclass
class AdapterWeights:
    modules: dict[str, ModuleWeights]  # module name in the base model -> weights
    dora: bool

    @property
    def rank(self) -> int:
        return max((w.a.shape[0] for w in self.modules.values()), default=0)


class BatchRows:
    """The slot of each row of the running batch, shared by every wrapped layer.

    Wrapped layers read it during the forward; the engine sets it for a batch and clears it after.
    `banks` caches each layer's gathered A/B/G for the batch (the rows' slots are fixed until
    a row joins or leaves, when the engine sets them again), so decode steps do not gather
    again; the engine turns it off when too big."""

    def __init__(self) -> None:
        self.idx: torch.Tensor | None = None  # (B,) slot per row; None = every row on the base
        self.slots: frozenset[int] = frozenset()
        self.cache_banks = True
        self.banks: dict[int, Any] = {}

    def set(self, idx: list[int], device: torch.device, cache_banks: bool = True) -> None:
        self.slots = frozenset(idx) - {0}
        self.idx = torch.tensor(idx, device=device) if self.slots else None
        self.cache_banks, self.banks = cache_banks, {}

    def clear(self) -> None:
        self.idx, self.slots, self.banks = None, frozenset(), {}


def _grow(t: torch.Tensor, rank: int) -> torch.Tensor:
    """t (S+1, R, n) -> (S+1, rank, n), zero-padded."""
    out = t.new_zeros((t.shape[0], rank, t.shape[2]))
    out[:, : t.shape[1]] = t
    return out


class GatheredLoraLinear(nn.Module):
    """A base Linear / Linear4bit, called as is, plus the gathered LoRA term of every row."""

    def __init__(
        self,
        base: nn.Module,
        rows: BatchRows,
        slots: int,
        max_rank: int,
        dtype: torch.dtype,
        device: torch.device,
    ):
        super().__init__()
        self.base, self.rows, self.max_rank = base, rows, max_rank
        in_f, out_f = base.in_features, base.out_features
        # (slot, rank, features): one slot's first r rows are contiguous, so A[:, :r][idx] is cheap
        zeros: dict[str, Any] = {"dtype": dtype, "device": device}
        self.register_buffer("A", torch.zeros(slots + 1, 0, in_f, **zeros), persistent=False)  # (S+1,R,in)
        self.register_buffer("B", torch.zeros(slots + 1, 0, out_f, **zeros), persistent=False)  # (S+1,R,out)
        self.register_buffer("G", torch.zeros(slots + 1, out_f, **zeros), persistent=False)  # (S+1, out)
        self.ranks = [0] * (slots + 1)  # rank of each slot in this layer (0 = not targeted)
        self.dora = [False] * (slots + 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)  # (B, T, out)
        bank = self._bank() if self.rows.idx is not None else None
        if bank is None:
            return y
        a, b, g = bank  # (B, r, in), (B, r, out), (B, out) or None
        x3 = x.reshape(x.shape[0], -1, x.shape[-1]).to(a.dtype)  # (B, T, in)
        y3 = y.reshape(x3.shape[0], x3.shape[1], -1)  # (B, T, out)
        xa = torch.bmm(x3, a.transpose(1, 2))  # (B, T, r)
        if g is None and y3.dtype == b.dtype:
            return torch.baddbmm(y3, xa, b).reshape(y.shape)  # y + xa @ b, the add fused in
        delta = torch.bmm(xa, b)  # (B, T, out)
        if g is not None:  # DoRA rows: (g - 1) * W x, W x being the base output less its bias
            delta = delta + g[:, None, :] * self._without_bias(y3).to(g.dtype)
        return (y3 + delta.to(y.dtype)).reshape(y.shape)

    def _without_bias(self, y: torch.Tensor) -> torch.Tensor:
        bias = getattr(self.base, "bias", None)
        return y if bias is None else y - bias

    def _bank(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None] | None:
        """This batch's rows of A, B (and G): gathered once per batch when caching is on."""
        rows = self.rows
        if id(self) in rows.banks:
            return rows.banks[id(self)]
        r = max((self.ranks[s] for s in rows.slots), default=0)
        dora = any(self.dora[s] for s in rows.slots)
        bank = None
        if r or dora:
            idx = rows.idx
            bank = (self.A[:, :r][idx], self.B[:, :r][idx], self.G[idx] if dora else None)
        if rows.cache_banks:
            rows.banks[id(self)] = bank
        return bank

    def bank_bytes(self, rows: int, slots: frozenset[int]) -> int:
        """Bytes the gathered bank takes for `rows` rows using `slots`."""
        r = max((self.ranks[s] for s in slots), default=0)
        return rows * r * (self.A.shape[2] + self.B.shape[2]) * self.A.element_size()

    def fill(self, slot: int, w: ModuleWeights | None) -> None:
        """Write one adapter's weights into `slot` (None = zero: the adapter lacks this module)."""
        self.A[slot].zero_()
        self.B[slot].zero_()
        self.G[slot].zero_()
        self.ranks[slot], self.dora[slot] = 0, False
        if w is None:
            return
        dev = self.A.device  # adapter tensors come from safetensors on the CPU
        a, b = w.a.to(dev, torch.float32), w.b.to(dev, torch.float32)  # (r, in), (out, r)
        r = a.shape[0]
        self._ensure_rank(r)
        if w.magnitude is not None:
            g = w.magnitude.to(dev, torch.float32) / self._dora_norm(a, b)  # (out,)
            if not torch.isfinite(g).all():  # ||W + s B A|| = 0 somewhere
                raise AdapterInvalidError("DoRA magnitude over a zero weight norm is infinite")
            b = b * g[:, None]
            self.G[slot] = (g - 1).to(self.G.dtype)
            self.dora[slot] = True
        self.A[slot, :r] = a.to(self.A.dtype)
        self.B[slot, :r] = b.t().to(self.B.dtype)
        self.ranks[slot] = r

    def _ensure_rank(self, r: int) -> None:
        """Grow the rank capacity (next power of two, at most max_rank) when a bigger adapter comes."""
        if r <= self.A.shape[1]:
            return
        cap = min(self.max_rank, 1 << (r - 1).bit_length())
        self.A, self.B = _grow(self.A, cap), _grow(self.B, cap)

    def _dora_norm(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        """||W + s B A|| per output row, as peft computes it (b already holds the scaling)."""
        w = dense_weight(self.base, self.G.dtype).to(a.device)  # (out, in)
        return torch.linalg.norm(w + b @ a, dim=1)  # (out,)


@torch.no_grad()
def dense_weight(module: nn.Module, dtype: torch.dtype, chunk: int = 1024) -> torch.Tensor:
    """The weight (out, in) a layer really applies, read back through its own forward as
    base(I) - bias: exact for fp32/bf16 and for NF4/int8 in whatever layout bitsandbytes keeps
    them (its CPU kernel repacks 4-bit weights on the first forward, after which
    dequantize_4bit, and so peft's DoRA on a CPU, reads garbage)."""
    in_f = module.in_features
    device = next(module.parameters()).device
    cols = []
    for start in range(0, in_f, chunk):
        n = min(chunk, in_f - start)
        eye = torch.zeros(n, in_f, dtype=dtype, device=device)  # rows start..start+n of I
        eye[torch.arange(n), torch.arange(start, start + n)] = 1
        cols.append(module(eye).float())  # (n, out)
    w_t = torch.cat(cols)  # (in, out)
    bias = getattr(module, "bias", None)
    return (w_t if bias is None else w_t - bias.float()).t()  # (out, in)


def is_linear(module: nn.Module) -> bool:
    return isinstance(module, nn.Linear)  # bitsandbytes' Linear4bit / Linear8bitLt subclass it


def _targeted(name: str, targets: str | list[str]) -> bool:
    """peft's matching: 'all-linear', a regex for the full name, or names matching a suffix."""
    if targets == "all-linear":
        return True
    if isinstance(targets, str):
        return re.fullmatch(targets, name) is not None
    return any(name == t or name.endswith("." + t) for t in targets)


def wrap_linears(
    model: nn.Module,
    rows: BatchRows,
    slots: int,
    max_rank: int,
    dtype: torch.dtype,
    targets: str | list[str] = "all-linear",
) -> dict[str, GatheredLoraLinear]:
    """Replace every targeted linear (never the output head) by a gathered wrapper, in place."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    wrapped = {}
    for name, module in list(model.named_modules()):
        if not is_linear(module) or module is head or not _targeted(name, targets):
            continue
        device = next(module.parameters()).device
        parent_name, _, leaf = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        layer = GatheredLoraLinear(module, rows, slots, max_rank, dtype, device)
        setattr(parent, leaf, layer)
        wrapped[name] = layer
    return wrapped


# ---- reading peft adapter folders ------------------------------------------------------------


def _pattern_value(patterns: dict[str, Any], module: str) -> Any:
    """peft's get_pattern_key: a key matches when the module name ends with it (regex allowed)."""
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?({key})$", module):
            return value
    return None


def _scaling(config: dict, module: str, rank: int) -> float:
    alpha = _pattern_value(config.get("alpha_pattern") or {}, module)
    alpha = config["lora_alpha"] if alpha is None else alpha
    return alpha / rank**0.5 if config.get("use_rslora") else alpha / rank


def _number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def check_numbers(name: str, config: dict) -> None:
    """lora_alpha and r (and their per-module patterns) must be finite numbers, r > 0."""
    for key in ("lora_alpha", "r"):
        if not _number(config.get(key)):
            raise AdapterInvalidError(
                f"{name}: adapter_config.json {key} is {config.get(key)!r}, not a number"
            )
    if config["r"] <= 0:
        raise AdapterInvalidError(f"{name}: adapter_config.json r is {config['r']!r}; it must be > 0")
    for key in ("alpha_pattern", "rank_pattern"):
        patterns = config.get(key) or {}
        if not isinstance(patterns, dict):
            raise AdapterInvalidError(f"{name}: adapter_config.json {key} is {patterns!r}, not an object")
        bad = {k: v for k, v in patterns.items() if not _number(v)}
        if bad:
            raise AdapterInvalidError(f"{name}: adapter_config.json {key} has non-numeric values {bad!r}")


def check_config(name: str, config: dict) -> None:
    """Refuse what the gathered path would serve wrongly, naming it."""
    if config.get("peft_type", "LORA") != "LORA":
        raise AdapterNotSupportedError(f"{name}: peft_type {config.get('peft_type')} is not LoRA")
    used = [what for key, what in UNSUPPORTED.items() if config.get(key)]
    if config.get("init_lora_weights") == "mica":
        used.append("MiCA")
    if config.get("bias", "none") != "none":
        used.append(f"bias={config['bias']!r} (trained base biases)")
    if used:
        raise AdapterNotSupportedError(
            f"{name}: {', '.join(used)} cannot be served by the gathered "
            "LoRA engine; retrain as plain LoRA or DoRA, or merge it"
        )


def _split_key(key: str) -> tuple[str, str]:
    """'base_model.model.X.lora_A.weight' -> ('X', 'lora_A.weight')."""
    body = key.removeprefix(PREFIX)
    for part in (".lora_A.", ".lora_B.", ".lora_magnitude_vector"):
        if part in body:
            module, _, rest = body.partition(part)
            return module, part.strip(".") + ("." + rest if rest else "")
    return body, ""


def read_adapter(folder: Path, max_rank: int, name: str | None = None) -> AdapterWeights:
    """{module: A, B*scaling, magnitude} from a peft folder (adapter_config.json +
    adapter_model.safetensors; pickled .bin files are never read). name (default: the folder's)
    is the adapter named in every refusal."""
    folder = Path(folder)
    name = name or folder.name
    config = _read_config(name, folder)
    check_config(name, config)
    check_numbers(name, config)
    parts: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in _read_tensors(name, folder).items():
        module, kind = _split_key(key)
        if kind not in ("lora_A.weight", "lora_B.weight", "lora_magnitude_vector"):
            raise AdapterNotSupportedError(
                f"{name}: unsupported adapter tensor '{key}' (embedding LoRA or saved base modules)"
            )
        if not torch.isfinite(tensor).all():
            raise AdapterInvalidError(f"{name}: tensor '{key}' holds NaN or infinite values")
        parts.setdefault(module, {})[kind] = tensor
    modules = {m: _module_weights(name, config, m, p, max_rank) for m, p in parts.items()}
    return AdapterWeights(modules, dora=bool(config.get("use_dora")))


def _read_config(name: str, folder: Path) -> dict:
    path = folder / "adapter_config.json"
    if not path.is_file():
        raise AdapterInvalidError(f"{name}: no adapter_config.json in {folder}")
    try:
        config = json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError) as exc:
        raise AdapterInvalidError(f"{name}: adapter_config.json is not valid JSON ({exc})") from None
    if not isinstance(config, dict):
        raise AdapterInvalidError(f"{name}: adapter_config.json is not a JSON object")
    return config


def _read_tensors(name: str, folder: Path) -> dict[str, torch.Tensor]:
    path = folder / "adapter_model.safetensors"
    if not path.is_file():
        raise AdapterInvalidError(
            f"{name}: no adapter_model.safetensors in {folder} (.bin files are never read)"
        )
    try:
        return load_file(path)
    except Exception as exc:  # safetensors raises its own error types for a corrupt header
        raise AdapterInvalidError(f"{name}: adapter_model.safetensors cannot be read ({exc})") from None


def _module_weights(
    name: str, config: dict, module: str, p: dict[str, torch.Tensor], max_rank: int
) -> ModuleWeights:
    if "lora_A.weight" not in p or "lora_B.weight" not in p:
        raise AdapterInvalidError(f"{name}: {module} lacks lora_A or lora_B")
    a, b = p["lora_A.weight"].float(), p["lora_B.weight"].float()  # (r, in), (out, r)
    if a.dim() != 2 or b.dim() != 2 or a.shape[0] != b.shape[1] or a.shape[0] == 0:
        raise AdapterInvalidError(
            f"{name}: {module} lora_A {tuple(a.shape)} and lora_B {tuple(b.shape)} do not share a rank "
            "(expected (r, in) and (out, r), r > 0)"
        )
    r = a.shape[0]
    if r > max_rank:
        raise AdapterNotSupportedError(
            f"{name}: rank {r} at {module} > the engine's max_rank {max_rank}; "
            "serve with a larger max_rank or retrain at a lower rank"
        )
    scaled = b * _scaling(config, module, r)
    if not torch.isfinite(scaled).all():
        raise AdapterInvalidError(f"{name}: {module}'s lora_alpha scaling makes lora_B infinite")
    mag = p.get("lora_magnitude_vector")
    if mag is not None and tuple(mag.shape) != (b.shape[0],):
        raise AdapterInvalidError(f"{name}: {module} DoRA magnitude {tuple(mag.shape)} != ({b.shape[0]},)")
    return ModuleWeights(a, scaled, None if mag is None else mag.float())
