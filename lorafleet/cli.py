"""The `lorafleet` command. Thin: each subcommand calls one library function and prints."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path

from lorafleet.errors import LorafleetError

COMMANDS: dict[str, Callable[[argparse.Namespace], int]] = {}


def command(name: str) -> Callable:
    def register(fn: Callable[[argparse.Namespace], int]) -> Callable:
        COMMANDS[name] = fn
        return fn
    return register


@command("schema")
def cmd_schema(args: argparse.Namespace) -> int:
    from lorafleet.spec import json_schema
    from lorafleet.ui import print_json

    print_json(json_schema())
    return 0


@command("validate")
def cmd_validate(args: argparse.Namespace) -> int:
    from lorafleet.ui import console, print_json, table
    from lorafleet.validate import check_fleet

    check = check_fleet(args.fleet)
    if args.json:
        print_json({"ok": check.ok(), "base_fingerprint": check.base_fingerprint,
                    "datasets": {k: v.as_dict() for k, v in check.reports.items()},
                    "errors": check.errors})
        return 0 if check.ok() else 1
    rows = [(c, r.format, r.examples, r.tokens_total, r.tokens_max, r.over_max_length, r.sha256[:12])
            for c, r in check.reports.items()]
    console.print(table(f"{check.fleet.name}: datasets", ["customer", "format", "examples", "tokens",
                                                          "max tokens", "truncated", "sha256"], rows))
    for customer, err in check.errors.items():
        console.print(f"[red]{customer}[/red]: {err}")
    return 0 if check.ok() else 1


@command("submit")
def cmd_submit(args: argparse.Namespace) -> int:
    from rich.live import Live

    from lorafleet.train.runner import submit
    from lorafleet.ui import console, progress_table

    fleet_name = Path(args.fleet).stem
    with Live(console=console, refresh_per_second=2, transient=False) as live:
        result = submit(args.fleet, ray_address=args.ray_address, storage=args.storage,
                        on_tick=lambda rows: live.update(progress_table(fleet_name, rows)))
        rows = {c: {"state": o.state, "loss": o.metrics.get("train_loss"),
                    "eval_loss": o.metrics.get("eval_loss"), "reason": o.reason,
                    "step": o.metrics.get("step")} for c, o in result.jobs.items()}
        live.update(progress_table(result.fleet, rows))
    console.print(f"fleet run {result.fleet_run_id}: "
                  f"{sum(o.state == 'succeeded' for o in result.jobs.values())}/{len(result.jobs)} succeeded")
    return 0 if result.ok() else 1


@command("status")
def cmd_status(args: argparse.Namespace) -> int:
    from lorafleet import tracking
    from lorafleet.ui import console, fmt, print_json, table

    c = tracking.client()
    fleet_run = tracking.latest_fleet_run(c, args.fleet)
    if fleet_run is None:
        raise LorafleetError(f"no runs of fleet '{args.fleet}' in {tracking.experiment_name(args.fleet)}")
    rows = [tracking.job_row(r) for r in tracking.job_runs(c, fleet_run)]
    if args.json:
        print_json({"fleet_run": fleet_run.info.run_id, "jobs": rows})
        return 0
    console.print(table(f"fleet {args.fleet} (run {fleet_run.info.run_id})",
                        ["customer", "state", "steps", "loss", "eval loss", "run", "reason"],
                        [(r["customer"], r["state"], f"{r['step'] or 0}/{r['total_steps'] or '?'}",
                          fmt(r["loss"]), fmt(r["eval_loss"]), r["run_id"][:8],
                          (r["reason"] or (f"reused {r['reused_from'][:8]}" if r["reused_from"] else ""))[:70])
                         for r in rows]))
    return 0


@command("cancel")
def cmd_cancel(args: argparse.Namespace) -> int:
    from lorafleet.train.runner import cancel

    cancel(args.fleet, args.job, args.ray_address)
    print(f"cancel requested for {args.job or 'every job'} of fleet {args.fleet}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="lorafleet", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)
    sub.add_parser("schema", help="print the fleet file JSON Schema")
    v = sub.add_parser("validate", help="check a fleet file and its datasets; no training")
    v.add_argument("fleet")
    v.add_argument("--json", action="store_true")
    s = sub.add_parser("submit", help="validate, then train every job of a fleet file")
    s.add_argument("fleet")
    s.add_argument("--ray-address", default=None, help="Ray cluster (default: start a local one)")
    s.add_argument("--storage", default=None, help="checkpoint storage path or s3:// URI")
    st = sub.add_parser("status", help="a fleet's jobs as recorded in MLflow")
    st.add_argument("fleet", help="fleet name")
    st.add_argument("--json", action="store_true")
    c = sub.add_parser("cancel", help="cancel a running fleet, or one job of it")
    c.add_argument("fleet", help="fleet name")
    c.add_argument("--job", default=None, help="customer id (default: all jobs)")
    c.add_argument("--ray-address", default="auto")
    for extend in EXTENSIONS:
        extend(sub)
    return p


EXTENSIONS: list[Callable[[argparse._SubParsersAction], None]] = []


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return COMMANDS[args.command](args)
    except LorafleetError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
