"""Residency: which adapters an LRU holds and which requests use, so the replica removes only
the adapters neither needs."""

from __future__ import annotations

import threading
from collections import Counter


class Residency:
    """Which adapters may leave the engine. The LRU says what is resident (a live LoadedAdapter);
    requests say what is in use. An adapter is removed, on the engine thread, only when it is
    neither: eviction never pulls weights from under a queued request, and a reload of the same
    name never loses its slot to an older eviction."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.resident: Counter[str] = Counter()
        self.in_use: Counter[str] = Counter()

    def change(self, counter: Counter[str], name: str, delta: int) -> None:
        with self.lock:
            counter[name] += delta

    def removable(self, loaded: list[str]) -> list[str]:
        with self.lock:
            return [n for n in loaded if self.resident[n] <= 0 and self.in_use[n] <= 0]


class LoadedAdapter:
    """What an LRU holds (Serve's multiplex cache): released on eviction, which Serve signals
    by dropping it (__del__, maybe called again by the GC later)."""

    def __init__(self, residency: Residency, name: str):  # counted resident by Batcher._add
        self.residency, self.name, self.released = residency, name, False

    def release(self) -> None:
        if not self.released:
            self.released = True
            self.residency.change(self.residency.resident, self.name, -1)

    def __del__(self) -> None:
        self.release()
