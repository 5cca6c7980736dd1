"""Token ids to text as they arrive, and stop sequences: found in the decoder's tail window
(`first_stop`, `stop_window`) and cut from an answer (`cut_at_stop`). A stream holds back text
that may begin a stop string with the ingress's `stops.StopScanner`."""

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


def stop_window(stops: list[str]) -> int:
    """How many trailing tokens to decode to see any of these stop strings end at the last token:
    a token is at least one byte, a character at most four."""
    return 4 * max((len(s) for s in stops), default=0) + 4


def first_stop(text: str, stops: list[str]) -> str | None:
    """The stop string that occurs earliest in text, or None."""
    found = [(i, s) for s in stops if s and (i := text.find(s)) >= 0]
    return min(found)[1] if found else None


def stop_holdback(text: str, stops: list[str] | None) -> int:
    """How many trailing characters of text a stream must hold back: the longest tail of text that
    begins some stop string (it may complete with the next token, and then must never be sent)."""
    return max(
        (n for s in stops or [] for n in range(min(len(s) - 1, len(text)), 0, -1) if s.startswith(text[-n:])),
        default=0,
    )
