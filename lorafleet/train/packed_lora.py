"""The LoRA layer of packed training: one frozen base linear, called once for every row of the
batch, plus the LoRA term of each job on that job's rows only (per-adapter row segments):

    y = base(x);   y[seg_j, :L_j] += dropout_j(x[seg_j, :L_j]) @ A_j^T @ B_j^T * s_j

Each job's A and B are its own nn.Parameters (ranks may differ, a job may not target a layer),
so a job's gradients come only from its own rows. Segments were measured against the gathered
bmm of serving (`serve/gathered_lora.py`) with a backward: see packed_bench --lora-forward.

`L_j` is the job's own padded length (its longest row in this micro-batch): the LoRA term and
its dropout mask have the shape they would have if the job trained alone, so the batch mates'
lengths change neither the job's arithmetic nor its random numbers. Dropout masks come from a
generator seeded per (job, micro-step, layer): the same masks alone or packed, and again when
gradient checkpointing recomputes a layer in the backward.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

PEFT_PREFIX = "base_model.model."


@dataclass(frozen=True)
class Segment:
    """Rows start:stop of the batch belong to job `key`; its own padded length is `length`."""

    key: str
    start: int
    stop: int
    length: int
    dropout_seed: int  # differs per micro-step of the job; 0 when dropout is off (eval)


@dataclass
class PackedRows:
    """The running micro-batch's segments, shared by every wrapped layer; set by the trainer for a
    forward and kept until its backward is done (checkpointed layers read it again there)."""

    segments: list[Segment] = field(default_factory=list)


class LoraPair(nn.Module):
    """One job's A (r, in) and B (out, r) for one layer, initialised as peft does (A Kaiming-uniform,
    B zero) but from the job's own generator."""

    def __init__(self, in_f: int, out_f: int, rank: int, scaling: float, dropout: float, **tensor: object):
        super().__init__()
        self.lora_A = nn.Parameter(torch.empty(rank, in_f, **tensor))  # type: ignore[arg-type]
        self.lora_B = nn.Parameter(torch.zeros(out_f, rank, **tensor))  # type: ignore[arg-type]
        self.scaling, self.dropout = scaling, dropout

    def reset(self, generator: torch.Generator) -> None:
        with torch.no_grad():
            a = torch.empty(self.lora_A.shape, dtype=torch.float32)
            nn.init.kaiming_uniform_(a, a=math.sqrt(5), generator=generator)
            self.lora_A.copy_(a)
            self.lora_B.zero_()

    def delta(self, x: torch.Tensor, seed: int) -> torch.Tensor:
        """(rows, L, in) -> (rows, L, out): the LoRA term for this job's rows."""
        x = x.to(self.lora_A.dtype)
        if self.dropout > 0 and seed:
            gen = torch.Generator(device=x.device).manual_seed(seed)
            keep = torch.rand(x.shape, generator=gen, device=x.device, dtype=torch.float32) >= self.dropout
            x = x * keep.to(x.dtype) / (1 - self.dropout)
        return ((x @ self.lora_A.t()) * self.scaling) @ self.lora_B.t()  # scaled at rank width: cheaper


class PackedLoraLinear(nn.Module):
    """A frozen base Linear / Linear4bit plus the LoRA term of every job that targets it."""

    def __init__(self, base: nn.Module, rows: PackedRows, index: int):
        super().__init__()
        self.base, self.rows, self.index = base, rows, index
        self.in_features, self.out_features = base.in_features, base.out_features
        # a plain dict, not a ModuleDict: job weights stay out of the base model's parameters
        self.adapters: dict[str, LoraPair] = {}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)  # (B, T, out)
        segments = self.rows.segments
        if not any(s.key in self.adapters for s in segments):
            return y
        xs = x.split([s.stop - s.start for s in segments])  # split, not slicing: one grad copy back
        # one cat and one add whatever the number of jobs (an in-place add per segment measured
        # slower: its backward clones the whole gradient once per segment)
        return y + torch.cat([self._delta(seg, xj, y) for seg, xj in zip(segments, xs, strict=True)])

    def _delta(self, seg: Segment, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """(rows, T, out): this segment's LoRA term, zero past its own length L_j."""
        pair = self.adapters.get(seg.key)
        if pair is None:
            return y.new_zeros(x.shape[0], x.shape[1], y.shape[-1])
        seed = seg.dropout_seed * 1_000_003 + self.index if seg.dropout_seed else 0
        pad = x.shape[1] - seg.length
        d = pair.delta(x[:, : seg.length] if pad else x, seed).to(y.dtype)  # (rows, L_j, out)
        return F.pad(d, (0, 0, 0, pad)) if pad else d


def linear_names(model: nn.Module) -> list[str]:
    """Every linear layer LoRA may target ('all-linear' in peft): never the output head."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    return [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and m is not head]


def wrap_linears(model: nn.Module, rows: PackedRows) -> dict[str, PackedLoraLinear]:
    """Replace every LoRA-targetable linear by a packed wrapper, in place."""
    wrapped = {}
    for index, name in enumerate(linear_names(model), 1):
        parent_name, _, leaf = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        layer = PackedLoraLinear(getattr(parent, leaf), rows, index)
        setattr(parent, leaf, layer)
        wrapped[name] = layer
    return wrapped
