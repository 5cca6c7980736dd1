"""Stop strings on text that arrives in pieces: a stream never sends any part of a stop string.

The text is cut where the first stop string to *complete* begins (the replica stops there too,
so later text never exists). While the tail of the text could still grow into a stop string it
is held back; the streamed pieces joined therefore equal the whole answer cut once, whatever the
pieces' boundaries (a stop string split over two tokens included).
"""

from __future__ import annotations

from lorafleet.serve.text import stop_holdback


class StopScanner:
    """push() the new text of each step, get back what may be sent now; flush() at the end."""

    def __init__(self, stops: list[str] | None):
        self.stops = [s for s in stops or [] if s]
        self.pending = ""  # received, not sent: it may be the start of a stop string
        self.stopped = False

    def push(self, delta: str) -> str:
        if self.stopped:
            return ""
        text = self.pending + delta
        cut = first_stop(text, self.stops)
        if cut is not None:
            self.stopped, self.pending = True, ""
            return text[:cut]
        keep = stop_holdback(text, self.stops)
        self.pending = text[len(text) - keep :]
        return text[: len(text) - keep]

    def flush(self) -> str:
        """The end of the answer: what was held back was not a stop string after all."""
        out, self.pending = ("" if self.stopped else self.pending), ""
        return out


def first_stop(text: str, stops: list[str]) -> int | None:
    """Where the stop string that completes first begins (ties: the longer one, which starts
    earlier), or None. Each stop's first occurrence is also the first it completes."""
    found = [(i + len(s), i) for s in stops if (i := text.find(s)) >= 0]
    return min(found)[1] if found else None


def cut_at_stop(text: str, stops: list[str] | None) -> tuple[str, bool]:
    """The whole answer cut as a stream would cut it, and whether a stop string was found."""
    scanner = StopScanner(stops)
    out = scanner.push(text)
    return out + scanner.flush(), scanner.stopped
