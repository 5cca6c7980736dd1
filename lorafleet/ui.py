"""Terminal output: rich tables for people, JSON for scripts."""

from __future__ import annotations

import json
import time
from collections.abc import Iterable
from typing import Any

from rich.console import Console
from rich.table import Table

console = Console()

STATE_STYLE = {
    "queued": "dim",
    "running": "cyan",
    "succeeded": "green",
    "failed": "red",
    "cancelled": "yellow",
}


def table(title: str, columns: list[str], rows: Iterable[Iterable[Any]]) -> Table:
    t = Table(title=title, title_justify="left")
    for col in columns:
        t.add_column(col)
    for row in rows:
        t.add_row(*["" if v is None else str(v) for v in row])
    return t


def print_json(data: Any) -> None:
    print(json.dumps(data, indent=2, default=str))


def fmt(value: Any, digits: int = 4) -> str:
    return f"{value:.{digits}f}" if isinstance(value, float) else ("" if value is None else str(value))


def eta(info: dict[str, Any]) -> str:
    """Remaining time from the pace since this run (re)started: steps already done don't count."""
    step, total, started = info.get("step"), info.get("total_steps"), info.get("started")
    done = (step or 0) - (info.get("start_step") or 0)
    if not (step and total and started and done > 0) or info.get("state") != "running":
        return ""
    return f"{(time.time() - started) / done * (total - step):.0f}s"


def progress_table(fleet: str, rows: dict[str, dict[str, Any]]) -> Table:
    t = Table(title=f"fleet {fleet}", title_justify="left")
    for col in ("customer", "state", "step", "loss", "eval loss", "ETA", "reason"):
        t.add_column(col)
    for customer, info in rows.items():
        state = info.get("state", "queued")
        steps = f"{info.get('step') or 0}/{info.get('total_steps') or '?'}"
        t.add_row(
            customer,
            f"[{STATE_STYLE.get(state, '')}]{state}",
            steps,
            fmt(info.get("loss")),
            fmt(info.get("eval_loss")),
            eta(info),
            (info.get("reason") or "")[:80],
        )
    return t
