"""A packed job's data, prepared the way trl's SFTTrainer prepares a single job's (trl 1.16,
`SFTTrainer._prepare_dataset`), so a job sees the same tokens whichever way it trains:

- chat (`messages`): the tokenizer's chat template; loss on assistant tokens only when the
  template marks them with {% generation %} (as `worker.build_trainer` sets assistant_only_loss),
  else on every token;
- prompt/completion: EOS appended to the completion, loss on the completion only (the completion
  starts where prompt and prompt+completion tokens diverge);
- text: EOS appended, loss on every token;
then truncated to max_length, and rows left without a loss token dropped.
tests/test_packed.py checks this against SFTTrainer's own prepared dataset.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

IGNORE = -100


@dataclass(frozen=True)
class Row:
    input_ids: list[int]
    labels: list[int]  # IGNORE where the token is not trained on


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n


def _chat(example: dict, tokenizer: Any, assistant_only: bool) -> tuple[list[int], list[int]]:
    out = tokenizer.apply_chat_template(
        example["messages"], tokenize=True, return_dict=True, return_assistant_tokens_mask=assistant_only
    )
    ids = list(out["input_ids"])
    mask = list(out["assistant_masks"]) if assistant_only else [1] * len(ids)
    if assistant_only and 1 not in mask:
        raise ValueError(
            "a conversation has no assistant tokens under the chat template's {% generation %} markers; "
            "check the template"
        )
    return ids, mask


def _with_eos(text: str, eos: str) -> str:
    return text if text.endswith(eos) else text + eos


def _prompt_completion(example: dict, tokenizer: Any) -> tuple[list[int], list[int]]:
    prompt_ids = tokenizer(text=example["prompt"])["input_ids"]
    ids = tokenizer(text=example["prompt"] + _with_eos(example["completion"], tokenizer.eos_token))[
        "input_ids"
    ]
    n = _common_prefix(prompt_ids, ids)
    return list(ids), [0] * n + [1] * (len(ids) - n)


def _text(example: dict, tokenizer: Any) -> tuple[list[int], list[int]]:
    ids = list(tokenizer(text=_with_eos(example["text"], tokenizer.eos_token))["input_ids"])
    return ids, [1] * len(ids)


def tokenize(ds: Any, tokenizer: Any, max_length: int) -> list[Row]:
    """Every example of a split as (input_ids, labels), truncated, fully-masked rows dropped."""
    assistant_only = "{% generation %}" in (tokenizer.chat_template or "")
    rows = []
    for example in ds:
        if "messages" in example:
            ids, mask = _chat(example, tokenizer, assistant_only)
        elif "prompt" in example:
            ids, mask = _prompt_completion(example, tokenizer)
        else:
            ids, mask = _text(example, tokenizer)
        labels = [t if m else IGNORE for t, m in zip(ids, mask, strict=True)][:max_length]
        if any(t != IGNORE for t in labels):
            rows.append(Row(ids[:max_length], labels))
    return rows


def loss_tokens(rows: list[Row]) -> int:
    """Tokens that carry loss once labels are shifted (the first token predicts nothing)."""
    return sum(sum(t != IGNORE for t in r.labels[1:]) for r in rows)


def collate(rows: list[Row], length: int, pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad rows to `length`: input_ids, attention_mask, labels (B, length)."""
    ids = torch.full((len(rows), length), pad_id, dtype=torch.long)
    labels = torch.full((len(rows), length), IGNORE, dtype=torch.long)
    mask = torch.zeros((len(rows), length), dtype=torch.long)
    for i, r in enumerate(rows):
        n = len(r.input_ids)
        ids[i, :n] = torch.tensor(r.input_ids)
        labels[i, :n] = torch.tensor(r.labels)
        mask[i, :n] = 1
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}
