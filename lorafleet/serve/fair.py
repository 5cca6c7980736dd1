"""Fair admission: the requests waiting for a batch row, one FIFO per tenant, taken round-robin.

A plain FIFO lets a tenant that sends 50 requests at once hold every row that frees up until its
flood drains; a tenant sending one request at a time then waits behind all of it. Here each free
row goes to the next tenant in turn (a tenant with weight w takes up to w rows per turn), so a
trickle tenant's request is admitted at the first admission after it arrives. The replica also
offers free rows to tenants with no running row first, and may keep a few rows for them only
(`reserved_rows`), so that a trickle does not even wait for a flooding tenant's row to finish.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Mapping
from typing import Any

Tenant = str | None  # None: requests that carry no tenant, served as one tenant


class FairQueue:
    """Weighted round-robin over per-tenant FIFOs. Not thread-safe: one event loop uses it."""

    def __init__(self, weights: Mapping[Tenant, int] | None = None):
        bad = {t: w for t, w in (weights or {}).items() if not (isinstance(w, int) and w >= 1)}
        if bad:
            raise ValueError(f"tenant weights must be integers >= 1; got {bad}")
        self.weights = dict(weights or {})
        self.queues: dict[Tenant, deque] = {}  # insertion order is the turn order
        self.credit: dict[Tenant, int] = {}  # rows the tenant at the head may still take this turn
        self.size = 0

    def __len__(self) -> int:
        return self.size

    def put(self, tenant: Tenant, item: Any, weight: int | None = None) -> None:
        """weight: the tenant's current weight, when the request carries it (the keys file is
        re-read live, so the latest request's weight wins)."""
        if weight is not None:
            self.weights[tenant] = max(1, int(weight))
        self.queues.setdefault(tenant, deque()).append(item)  # a new tenant joins at the end
        self.size += 1

    def take(
        self,
        n: int,
        drop: Callable[[Any], bool] = lambda item: False,
        eligible: Callable[[Tenant], bool] = lambda tenant: True,
    ) -> list[Any]:
        """Up to n items in turn order, from eligible tenants only; items for which drop() is
        true are discarded on the way (a caller that left while waiting) and cost their tenant
        nothing."""
        out: list[Any] = []
        while len(out) < n:
            tenant = next((t for t in self.queues if eligible(t)), _NONE)
            if tenant is _NONE:
                break
            queue = self.queues[tenant]
            item = queue.popleft()
            self.size -= 1
            if not drop(item):
                out.append(item)
                self.credit[tenant] = self.credit.get(tenant, self.weights.get(tenant, 1)) - 1
            if not queue:
                del self.queues[tenant]
                self.credit.pop(tenant, None)
            elif self.credit.get(tenant, 1) <= 0:  # its turn is over: to the back of the line
                del self.credit[tenant]
                self.queues[tenant] = self.queues.pop(tenant)
        return out


_NONE = object()  # no eligible tenant (None is a tenant)
