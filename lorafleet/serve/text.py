"""Token ids to text as they arrive, and stop sequences."""

from __future__ import annotations

from typing import Any


class IncrementalDecoder:
    """Decodes the growing id list and returns only the new text; a partial UTF-8 character
    (byte-level BPE splits them) is held back until it is complete."""

    def __init__(self, tokenizer: Any):
        self.tokenizer = tokenizer
        self.ids: list[int] = []
        self.text = ""

    def push(self, token_id: int) -> str:
        self.ids.append(token_id)
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        if text.endswith("\ufffd"):
            return ""
        delta, self.text = text[len(self.text) :], text
        return delta


def cut_at_stop(text: str, stops: list[str] | None) -> tuple[str, bool]:
    """Text up to the first stop sequence, and whether one was found."""
    cut = min((i for s in stops or [] if s and (i := text.find(s)) >= 0), default=-1)
    return (text[:cut], True) if cut >= 0 else (text, False)
