"""The demo: build the tiny base, train the demo fleet, register it, serve it, query it."""

from __future__ import annotations

import time
from pathlib import Path

from lorafleet.ui import console, table

ROOT = Path(__file__).resolve().parents[1]
DEMO_FLEET = ROOT / "jobs" / "demo-fleet.yaml"


def train_demo(fleet_file: Path = DEMO_FLEET) -> dict[str, str]:
    from rich.live import Live

    from lorafleet.pipeline import submit
    from lorafleet.tinybase import tiny_base_path
    from lorafleet.ui import progress_table

    with console.status("building the tiny base (first run only)"):
        tiny_base_path()
    with Live(console=console, refresh_per_second=2) as live:
        result = submit(fleet_file, on_tick=lambda rows: live.update(progress_table("demo", rows)))
    failed = {c: o.reason for c, o in result.jobs.items() if o.state != "succeeded"}
    if failed:
        raise RuntimeError(f"demo jobs failed: {failed}")
    return {c: o.registered or "" for c, o in result.jobs.items()}


def ask_all(base_url: str, customers: list[str], base_name: str) -> list[tuple[str, ...]]:
    """The same questions to the base and to each customer's adapter, with the openai client."""
    from openai import OpenAI

    from lorafleet.demo_customers import heldout_prompts

    client = OpenAI(base_url=base_url, api_key="not-needed")
    rows = []
    for question in [heldout_prompts(c)[3 * i] for i, c in enumerate(customers)]:  # all different
        answers = []
        for model in [base_name, *customers]:
            reply = client.chat.completions.create(
                model=model, messages=[{"role": "user", "content": question}], max_tokens=40, temperature=0
            )
            answers.append(reply.choices[0].message.content.strip())
        rows.append((question, *answers))
    return rows


def run_demo(port: int = 8000) -> None:
    from lorafleet.demo_customers import DEMO_CUSTOMERS
    from lorafleet.serve.config import AppArgs
    from lorafleet.serve.run import start, stop

    t0 = time.time()
    console.rule("1. train the demo fleet (Ray Train, QLoRA on an NF4 base)")
    registered = train_demo()
    console.rule("2. registered adapters (MLflow registry)")
    console.print(table("versions", ["customer", "version"], sorted(registered.items())))
    console.rule("3. serve them all from one base (Ray Serve, OpenAI API)")
    args = AppArgs(base_model="tiny-llama", max_adapters_per_replica=4)
    url = start(args, port=port)
    try:
        console.print(f"endpoint: {url}")
        rows = ask_all(url, list(DEMO_CUSTOMERS), args.display_base_name())
        console.rule("4. the same question to the base and to each customer's adapter")
        console.print(table("answers", ["question", "base", *DEMO_CUSTOMERS], rows))
    finally:
        stop()
    console.print(
        f"demo done in {time.time() - t0:.0f} s; browse it with `lorafleet adapters list` or `lorafleet ui`"
    )
