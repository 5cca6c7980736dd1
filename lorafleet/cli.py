"""The `lorafleet` command. Thin: each subcommand calls one library function and prints."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from lorafleet.errors import LorafleetError

COMMANDS: dict[str, Callable[[argparse.Namespace], int]] = {}


def _number(kind: type, low: float, high: float, what: str) -> Callable[[str], Any]:
    """An argparse type: a number of `kind` in [low, high], or a usage error saying so."""

    def parse(text: str) -> Any:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not {what}") from None
        if not low <= value <= high or value != value:  # value != value: NaN
            raise argparse.ArgumentTypeError(f"{text} is not {what}")
        return value

    return parse


whole = _number(int, 1, 10**9, "a whole number from 1")
port = _number(int, 1, 65535, "a port (1 to 65535)")
real = _number(float, 1e-9, 1e6, "a number above 0")
share = _number(float, 0, 1e6, "a number from 0")


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
    routes = check.own_run_reasons()
    if args.json:
        print_json(
            {
                "ok": check.ok(),
                "base_fingerprint": check.base_fingerprint,
                "datasets": {k: v.as_dict() for k, v in check.reports.items()},
                "errors": check.errors,
                "training": {c: _route(reason) for c, reason in routes.items()},
            }
        )
        return 0 if check.ok() else 1
    rows = [
        (c, r.format, r.examples, r.tokens_total, r.tokens_max, r.over_max_length, r.sha256[:12])
        for c, r in check.reports.items()
    ]
    console.print(
        table(
            f"{check.fleet.name}: datasets",
            ["customer", "format", "examples", "tokens", "max tokens", "truncated", "sha256"],
            rows,
        )
    )
    route_rows = [(c, _route(reason)["trains_in"], reason or "") for c, reason in routes.items()]
    console.print(
        table(f"{check.fleet.name}: where each job trains", ["customer", "trains in", "why"], route_rows)
    )
    for customer, err in check.errors.items():
        console.print(f"[red]{customer}[/red]: {err}")
    return 0 if check.ok() else 1


def _route(own_run_reason: str | None) -> dict[str, str | None]:
    return {"trains_in": "own run" if own_run_reason else "warm slot", "reason": own_run_reason}


@command("submit")
def cmd_submit(args: argparse.Namespace) -> int:
    """Every fleet file's spec is checked before any runs; then the fleets run one after another
    in this process, so a fleet with `packing.keep_warm_s` hands its slots to the next one."""
    from lorafleet.spec import load_fleet

    for fleet_file in args.fleets:
        load_fleet(fleet_file)  # a spec error in any file stops all of them, before anything runs
    if len(args.fleets) > 1:
        from lorafleet.raystart import connect

        connect(args.ray_address)  # one Ray for all: the warm slots live in it
    results = [_submit_one(fleet_file, args) for fleet_file in args.fleets]
    return 0 if all(result.ok() for result in results) else 1


def _submit_one(fleet_file: str, args: argparse.Namespace) -> Any:
    from rich.live import Live

    from lorafleet.pipeline import submit
    from lorafleet.ui import console, progress_table

    fleet_name = Path(fleet_file).stem
    with Live(console=console, refresh_per_second=2, transient=False) as live:
        result = submit(
            fleet_file,
            ray_address=args.ray_address,
            storage=args.storage,
            on_tick=lambda rows: live.update(progress_table(fleet_name, rows)),
        )
        rows = {
            c: {
                "state": o.state,
                "loss": o.metrics.get("train_loss"),
                "eval_loss": o.metrics.get("eval_loss"),
                "reason": o.reason,
                "step": o.metrics.get("step"),
            }
            for c, o in result.jobs.items()
        }
        live.update(progress_table(result.fleet, rows))
    console.print(
        f"fleet run {result.fleet_run_id}: "
        f"{sum(o.state == 'succeeded' for o in result.jobs.values())}/{len(result.jobs)} succeeded"
    )
    return result


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
    console.print(
        table(
            f"fleet {args.fleet} (run {fleet_run.info.run_id})",
            ["customer", "state", "steps", "loss", "eval loss", "run", "note"],
            [
                (
                    r["customer"],
                    r["state"],
                    f"{r['step'] or 0}/{r['total_steps'] or '?'}",
                    fmt(r["loss"]),
                    fmt(r["eval_loss"]),
                    r["run_id"][:8],
                    _note(r),
                )
                for r in rows
            ],
        )
    )
    return 0


def _note(row: dict) -> str:
    if row["reason"]:
        return row["reason"][:70]
    notes = [f"reused run {row['reused_from'][:8]}"] if row["reused_from"] else []
    if row["beats_base"] is False:
        notes.append(f"no better than the base (its eval loss {row['base_eval_loss']:.3g})")
    return "; ".join(notes)


@command("slots")
def cmd_slots(args: argparse.Namespace) -> int:
    """The warm slots on a running cluster; --release ends the idle ones (they hold resources)."""
    import json

    from rich.table import Table

    from lorafleet.raystart import join_cluster
    from lorafleet.train.pool import live_slots, release
    from lorafleet.ui import console

    join_cluster(args.ray_address)
    released = release() if args.release else []
    rows = live_slots()
    if args.json:
        print(json.dumps({"slots": rows, "released": released}, indent=2))
        return 0
    table = Table("slot", "state", "base model", "working for", "keep warm (s)", "restarts left")
    for r in rows:
        table.add_row(
            r["slot"],
            r["state"],
            r["base_model"],
            r["fleet_board"],
            f"{r['keep_warm_s']:g}",
            str(r["restarts_left"]),
        )
    console.print(table if rows else "no live slots on this cluster")
    if released:
        console.print(f"released {len(released)} idle slot(s): {', '.join(released)}")
    return 0


@command("cancel")
def cmd_cancel(args: argparse.Namespace) -> int:
    from lorafleet.train.runner import cancel

    cancel(args.fleet, args.job, args.ray_address)
    print(f"cancel requested for {args.job or 'every job'} of fleet {args.fleet}")
    return 0


def _age(seconds: int | None) -> str:
    if seconds is None:
        return ""
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds // size}{unit}"
    return f"{seconds}s"


@command("adapters")
def cmd_adapters(args: argparse.Namespace) -> int:
    from lorafleet import tracking

    c = tracking.client()
    return ADAPTER_ACTIONS[args.action](c, args)


def adapters_list(c, args) -> int:
    from lorafleet import registry
    from lorafleet.ui import console, print_json, table

    rows = registry.list_rows(c)
    if args.json:
        print_json(rows)
        return 0
    console.print(
        table(
            "adapters",
            ["adapter", "latest", "production", "eval loss", "beats base", "base", "age"],
            [
                (
                    r["adapter"],
                    r["latest"],
                    r["production"],
                    r["eval_loss"],
                    _yes_no(r["beats_base"]),
                    r["base"],
                    _age(r["age_s"]),
                )
                for r in rows
            ],
        )
    )
    return 0


def _yes_no(value: bool | None) -> str:
    return "" if value is None else "yes" if value else "NO"


def adapters_show(c, args) -> int:
    from lorafleet import registry
    from lorafleet.ui import console, print_json, table

    info = registry.show(c, args.name, args.prefix)
    if args.json:
        print_json(info)
        return 0
    console.print(f"[bold]{info['adapter']}[/bold]: {info['description']}")
    keys = ("eval_loss", "base_eval_loss", "base_model", "base_fingerprint", "dataset_sha256")
    keys += ("spec_hash", "fleet")
    console.print(
        table(
            "versions",
            ["version", "aliases", *keys, "run"],
            [
                (
                    v["version"],
                    ",".join(v["aliases"]),
                    *[str(v["tags"].get(k, ""))[:24] for k in keys],
                    v["run_id"][:8],
                )
                for v in info["versions"]
            ],
        )
    )
    return 0


def adapters_promote(c, args) -> int:
    from lorafleet import registry
    from lorafleet.ui import print_json

    ref = registry.parse_ref(args.customer)
    if ref.version is not None or ref.alias != registry.PRODUCTION:
        raise LorafleetError(
            f"promote takes a customer ('acme'), not {args.customer!r}; give a version with --version N"
        )
    result = registry.promote(c, args.prefix + ref.model, args.version, args.if_better)
    if args.json:
        print_json(result)
    elif result["promoted"]:
        was = f"v{result['previous']}" if result["previous"] else "unset"
        print(f"{result['model']}@production -> v{result['version']} (was {was})")
    else:
        print(f"not promoted: {result['reason']}")
    return 0


def adapters_pull(c, args) -> int:
    from lorafleet import registry

    adapter = registry.pull(c, args.name, Path(args.output), args.prefix)
    _written(args, adapter, f"{adapter.name} -> {args.output}")
    return 0


def _written(args: argparse.Namespace, adapter: Any, line: str, **more: Any) -> None:
    """What pull and merge wrote: a line, or with --json the version and folder."""
    from lorafleet.ui import print_json

    if not args.json:
        print(line)
        return
    mv = adapter.version
    print_json(
        {"adapter": adapter.name, "model": mv.name, "version": int(mv.version)}
        | more
        | {"output": str(Path(args.output).resolve())}
    )


def adapters_merge(c, args) -> int:
    from lorafleet import registry
    from lorafleet.models import fingerprint, merge_adapter, resolve_base

    adapter = registry.fetch(c, args.name, args.prefix)
    out = registry.fresh_output(Path(args.output))
    base_name = args.base or adapter.version.tags["base_model"]
    base_path = resolve_base(base_name)
    registry.check_base(adapter, fingerprint(base_path), base_name)
    with registry.written_whole(out) as tmp:
        merge_adapter(base_path, adapter.path, tmp)
    _written(args, adapter, f"{adapter.name} merged into {base_name} -> {args.output}", base_model=base_name)
    return 0


ADAPTER_ACTIONS = {
    "list": adapters_list,
    "show": adapters_show,
    "promote": adapters_promote,
    "pull": adapters_pull,
    "merge": adapters_merge,
}


@command("ui")
def cmd_ui(args: argparse.Namespace) -> int:
    import subprocess

    from lorafleet import settings

    cmd = [
        sys.executable,
        "-m",
        "mlflow",
        "ui",
        "--backend-store-uri",
        settings.tracking_uri(),
        "--host",
        args.host,
        "--port",
        str(args.port),
    ]
    if settings.artifact_root():
        cmd += ["--default-artifact-root", settings.artifact_root()]
    _check_can_listen(args.host, args.port)  # MLflow's server exits 0 when it cannot
    print(f"MLflow UI on http://{args.host}:{args.port} (Ctrl-C stops it)")
    return subprocess.call(cmd)


def _check_can_listen(host: str, port: int) -> None:
    import socket

    try:
        with socket.create_server((host, port)):
            pass
    except OSError as exc:
        raise LorafleetError(
            f"cannot listen on {host}:{port} ({exc.strerror or exc}); choose another --port or --host"
        ) from None


def _adapter_parsers(sub: argparse._SubParsersAction) -> None:
    a = sub.add_parser("adapters", help="browse, promote, pull and merge registered adapters")
    acts = a.add_subparsers(dest="action", required=True)
    parsers = {
        "list": acts.add_parser("list", help="one row per customer"),
        "show": acts.add_parser("show", help="every version of one adapter with its lineage"),
        "promote": acts.add_parser("promote", help="move 'production' to the candidate or a version"),
        "pull": acts.add_parser("pull", help="download an adapter folder usable with plain peft"),
        "merge": acts.add_parser("merge", help="a standalone model: adapter merged into the base"),
    }
    parsers["show"].add_argument("name", help="customer, e.g. acme")
    for name in ("pull", "merge"):
        parsers[name].add_argument("name", help="acme | acme@alias | acme/3")
    parsers["promote"].add_argument("customer")
    parsers["promote"].add_argument(
        "--version", type=whole, default=None, help="the version to promote (default: the candidate)"
    )
    parsers["promote"].add_argument(
        "--if-better", action="store_true", help="only if its eval loss beats production's"
    )
    for name in ("pull", "merge"):
        parsers[name].add_argument("-o", "--output", required=True)
    parsers["merge"].add_argument("--base", default=None, help="base to merge into (default: its own)")
    for p in parsers.values():
        p.add_argument("--json", action="store_true")
        p.add_argument("--prefix", default="", help="registered model name prefix")
    u = sub.add_parser("ui", help="open the MLflow UI on the same store")
    u.add_argument("--host", default="127.0.0.1")
    u.add_argument("--port", type=port, default=5000)


@command("serve")
def cmd_serve(args: argparse.Namespace) -> int:
    import yaml

    from lorafleet.serve.run import app_args_from, serve_forever

    overrides, http = {}, {}
    if args.config:  # a Serve config file: take the args of its lorafleet application
        config = yaml.safe_load(Path(args.config).read_text())
        overrides = next(
            a.get("args", {}) for a in config["applications"] if "lorafleet.serve" in a["import_path"]
        )
        http = config.get("http_options") or {}
    overrides |= {
        "base_model": args.base_model,
        "adapter_prefix": args.prefix,
        "api_keys_file": args.api_keys,
    }
    if args.allow_unauthenticated:  # only when asked: older AppArgs have no such field
        overrides["allow_unauthenticated"] = True
    host = args.host or http.get("host", "127.0.0.1")
    port = args.port or int(http.get("port", 8000))
    serve_forever(app_args_from(overrides), host, port, args.ray_address)
    return 0


@command("keys")
def cmd_keys(args: argparse.Namespace) -> int:
    return KEY_ACTIONS[args.action](args)


def keys_create(args: argparse.Namespace) -> int:
    from lorafleet.serve.keys import add_key

    key = add_key(
        args.file,
        args.tenant,
        [a.strip() for a in args.adapters.split(",") if a.strip()],
        base=not args.no_base,
        max_concurrent=args.max_concurrent,
        tokens_per_minute=args.tokens_per_minute,
        weight=args.weight,
    )
    print(f"API key for tenant {args.tenant} (shown once; only its hash is stored in {args.file}):")
    print(key)
    return 0


def keys_revoke(args: argparse.Namespace) -> int:
    from lorafleet.serve.keys import revoke

    n = revoke(args.file, args.tenant)
    print(f"revoked {n} key(s) of tenant {args.tenant}; a running endpoint drops them within keys_reload_s")
    return 0


def keys_list(args: argparse.Namespace) -> int:
    from lorafleet.serve.keys import tenant_rows
    from lorafleet.ui import console, print_json, table

    rows = tenant_rows(args.file)
    if args.json:
        print_json(rows)
        return 0
    cols = ["tenant", "keys", "adapters", "base", "max_concurrent", "tokens_per_minute", "weight"]
    cells = [[",".join(r[c]) if c == "adapters" else r[c] for c in cols] for r in rows]
    console.print(table(f"tenants in {args.file}", cols, cells))
    return 0


KEY_ACTIONS = {"create": keys_create, "revoke": keys_revoke, "list": keys_list}


def legacy_keys_form(argv: list[str]) -> list[str]:
    """`lorafleet keys TENANT --adapters ...` (the form before create/revoke/list) means create."""
    if len(argv) >= 2 and argv[0] == "keys" and argv[1] not in (*KEY_ACTIONS, "-h", "--help"):
        return ["keys", "create", *argv[1:]]
    return argv


def _serve_parsers(sub: argparse._SubParsersAction) -> None:
    s = sub.add_parser("serve", help="run the OpenAI-compatible endpoint in the foreground")
    s.add_argument("--config", default=None, help="a serve_apps/*.yaml file to take args and host from")
    s.add_argument("--base-model", default=None)
    s.add_argument("--prefix", default=None, help="registered model name prefix")
    s.add_argument(
        "--keys-file", "--api-keys", dest="api_keys", default=None, help="tenant keys (`lorafleet keys`)"
    )
    s.add_argument(
        "--allow-unauthenticated",
        action="store_true",
        help="serve without keys on a non-loopback host (anyone who reaches the port may call any adapter)",
    )
    s.add_argument("--host", default=None, help="default: the config's http_options.host, else 127.0.0.1")
    s.add_argument("--port", type=port, default=None, help="default: the config's, else 8000")
    s.add_argument("--ray-address", default=None)
    _keys_parsers(sub)


def _keys_parsers(sub: argparse._SubParsersAction) -> None:
    k = sub.add_parser("keys", help="tenant API keys: create (default), revoke, list")
    acts = k.add_subparsers(dest="action", required=True)
    create = acts.add_parser("create", help="a new key for a tenant (`lorafleet keys TENANT ...` also works)")
    create.add_argument("tenant")
    create.add_argument("--adapters", required=True, help="comma-separated customers, or '*'")
    create.add_argument("--no-base", action="store_true", help="deny the bare base model")
    limits = "the tenant's limit, on all its keys; default: the one its keys have, else none"
    create.add_argument("--max-concurrent", type=int, default=None, help=f"requests in flight ({limits})")
    create.add_argument(
        "--tokens-per-minute", type=int, default=None, help=f"prompt and answer tokens a minute ({limits})"
    )
    create.add_argument(
        "--weight", type=float, default=None, help="share of batch slots against others (default 1)"
    )
    revoke = acts.add_parser("revoke", help="remove every key of a tenant")
    revoke.add_argument("tenant")
    listing = acts.add_parser("list", help="tenants, adapters and limits (never keys or hashes)")
    listing.add_argument("--json", action="store_true")
    for p in (create, revoke, listing):
        p.add_argument("--file", default="api-keys.json", help="the keys file")


@command("demo")
def cmd_demo(args: argparse.Namespace) -> int:
    from lorafleet.demo import run_demo

    run_demo(port=args.port)
    return 0


@command("bench")
def cmd_bench(args: argparse.Namespace) -> int:
    import json
    import tempfile

    from lorafleet.ui import print_json

    if args.what == "train":
        from lorafleet.bench.train_bench import run_train_bench
        from lorafleet.demo_customers import write_demo_datasets

        dataset = (
            Path(args.dataset) if args.dataset else write_demo_datasets(Path(tempfile.mkdtemp()))["acme"]
        )

        def partial(results: dict) -> None:  # a run cut short keeps what it measured
            if args.out:
                Path(args.out).write_text(json.dumps(results | {"partial": True}, indent=2, default=str))

        results = run_train_bench(args.base_model, dataset, args.steps, args.jobs, on_partial=partial)
    elif args.what == "scale":
        from lorafleet.bench.scale_bench import run_scale_bench
        from lorafleet.demo_customers import write_demo_datasets

        dataset = (
            Path(args.dataset) if args.dataset else write_demo_datasets(Path(tempfile.mkdtemp()))["acme"]
        )
        results = run_scale_bench(
            args.base_model,
            dataset,
            args.scale_jobs,
            args.scale_steps,
            args.nodes,
            args.gpus_per_node,
            args.cpus_per_node,
            args.gpus_per_job,
            args.cpus_per_job,
            packing=not args.no_packing,
        )
    else:
        from lorafleet.bench.serve_bench import run_serve_bench

        results = run_serve_bench(args)
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=2, default=str))
    print_json(results)
    return 0


def _bench_parsers(sub: argparse._SubParsersAction) -> None:
    d = sub.add_parser("demo", help="train, register, serve and query the demo fleet")
    d.add_argument("--port", type=port, default=8000)
    b = sub.add_parser("bench", help="benchmarks, JSON out: train | serve | scale")
    b.add_argument("what", choices=["train", "serve", "scale"])
    b.add_argument("--base-model", default="tiny-llama")
    b.add_argument("--dataset", default=None, help="train: dataset (default: a demo dataset)")
    b.add_argument("--steps", type=whole, default=20, help="train: steps per job")
    b.add_argument("--jobs", type=whole, default=16, help="train: jobs in the fleet run three ways")
    b.add_argument("--adapters", type=whole, default=16, help="serve: distinct adapters")
    b.add_argument("--requests", type=whole, default=128, help="serve: HTTP requests per mix")
    b.add_argument("--large", action="store_true", help="serve: also a ~100M-parameter base")
    b.add_argument("--scale-jobs", type=whole, default=50, help="scale: jobs in the fleet")
    b.add_argument("--scale-steps", type=whole, default=2, help="scale: steps per job")
    b.add_argument("--nodes", type=whole, default=4, help="scale: simulated worker nodes")
    b.add_argument("--gpus-per-node", type=share, default=1, help="scale: GPUs each node declares")
    b.add_argument("--cpus-per-node", type=real, default=2, help="scale: CPUs each node declares")
    b.add_argument("--gpus-per-job", type=share, default=1, help="scale: gpus_per_worker of each job")
    b.add_argument("--cpus-per-job", type=real, default=1, help="scale: cpus_per_worker of each job")
    b.add_argument("--no-packing", action="store_true", help="scale: one Ray Train run per job, no slots")
    b.add_argument("--out", default=None, help="also write the JSON here")
    _bench_serve_trust_parsers(b)


def _bench_serve_trust_parsers(b: argparse.ArgumentParser) -> None:
    """`bench serve` modes for issue 11's figures; any of them replaces the throughput bench."""
    for mode, what in (
        ("hostile", "good throughput with 10%% hostile requests mixed in, misrouted answers, 5xx"),
        ("fairness", "a flooding tenant against one sending a request at a time"),
        ("overload", "arrivals at 2x capacity: share of 429s, p95 of the admitted"),
        ("registry-outage", "a real mlflow server killed for --outage-s under traffic"),
    ):
        b.add_argument(f"--{mode}", action="store_true", help=f"serve: {what}")
    b.add_argument("--max-tokens", type=whole, default=32, help="serve modes: max_tokens of a request")
    b.add_argument("--long-tokens", type=whole, default=128, help="fairness: max_tokens of a flood request")
    b.add_argument("--flood", type=whole, default=64, help="fairness: flood requests in flight")
    b.add_argument("--trickle", type=whole, default=20, help="fairness: one-at-a-time requests")
    b.add_argument("--overload-s", type=real, default=20, help="overload: seconds of 2x arrivals")
    b.add_argument("--outage-s", type=real, default=30, help="registry-outage: seconds stopped")
    b.add_argument("--outage-before-s", type=real, default=5, help="registry-outage: traffic before")
    b.add_argument("--outage-after-s", type=real, default=30, help="registry-outage: traffic after")
    b.add_argument("--timeout-s", type=real, default=120, help="serve modes: client timeout")
    b.add_argument("--port", type=port, default=8123, help="serve modes: endpoint port")
    b.add_argument(
        "--app-arg", action="append", default=[], metavar="KEY=VALUE", help="serve modes: an AppArgs field"
    )


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="lorafleet", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)
    sub.add_parser("schema", help="print the fleet file JSON Schema")
    v = sub.add_parser("validate", help="check a fleet file and its datasets; no training")
    v.add_argument("fleet")
    v.add_argument("--json", action="store_true")
    s = sub.add_parser("submit", help="validate, then train every job of one or more fleet files")
    s.add_argument(
        "fleets",
        nargs="+",
        metavar="fleet",
        help="fleet file(s); several run one after another, and slots kept warm "
        "(packing.keep_warm_s) pass from one to the next",
    )
    s.add_argument("--ray-address", default=None, help="Ray cluster (default: start a local one)")
    s.add_argument("--storage", default=None, help="checkpoint storage path or s3:// URI")
    st = sub.add_parser("status", help="a fleet's jobs as recorded in MLflow")
    st.add_argument("fleet", help="fleet name")
    st.add_argument("--json", action="store_true")
    sl = sub.add_parser("slots", help="warm slots on a running cluster (packing.keep_warm_s)")
    sl.add_argument(
        "--release", action="store_true", help="end the idle ones: they hold a worker's resources"
    )
    sl.add_argument("--json", action="store_true")
    sl.add_argument("--ray-address", default="auto")
    c = sub.add_parser("cancel", help="cancel a running fleet, or one job of it")
    c.add_argument("fleet", help="fleet name")
    c.add_argument("--job", default=None, help="customer id (default: all jobs)")
    c.add_argument("--ray-address", default="auto")
    for extend in EXTENSIONS:
        extend(sub)
    return p


EXTENSIONS: list[Callable[[argparse._SubParsersAction], None]] = [
    _adapter_parsers,
    _serve_parsers,
    _bench_parsers,
]


# MLflow's HTTP defaults retry 7 times with backoff, about 4 minutes before a command says the
# server is down; 4 retries still ride out a restart (about 30 s). Only for the commands that
# read the registry for a person waiting at a terminal: a fleet's training keeps MLflow's own
# patience for a server restarting mid-fleet. A value the user sets wins.
MLFLOW_HTTP = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "4", "MLFLOW_HTTP_REQUEST_TIMEOUT": "30"}
BROWSING = ("adapters", "status")


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    args = build_parser().parse_args(legacy_keys_form(sys.argv[1:] if argv is None else argv))
    for name, value in MLFLOW_HTTP.items() if args.command in BROWSING else ():
        os.environ.setdefault(name, value)
    try:
        return COMMANDS[args.command](args)
    except LorafleetError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except Exception as exc:
        if (message := _unreachable_store(exc)) is None:
            raise
        print(f"error: {message}", file=sys.stderr)
        return 2


def _unreachable_store(exc: Exception) -> str | None:
    """A message for an MLflow server that does not answer, None for any other error."""
    from lorafleet import settings

    text = str(exc)
    if type(exc).__name__ != "MlflowException" or not any(
        sign in text for sign in ("Connection refused", "Max retries exceeded", "Failed to establish")
    ):
        return None
    return (
        f"the MLflow tracking server at {settings.tracking_uri()} does not answer; start it, or point "
        "MLFLOW_TRACKING_URI at one that runs (unset: the embedded ./mlflow.db)"
    )


def run() -> None:
    """The `lorafleet` command: main(), Ray's shutdown, the exit handlers (logging's flush,
    MLflow's), then the process ends without Python's teardown of every module it loaded (Ray,
    pyarrow, MLflow; torch in some commands), which took about 0.8 s after each command. An
    exception or SystemExit takes Python's normal exit."""
    import atexit
    import threading

    code = main()
    # what Python's own exit waits for, first, and the way it does: its thread-exit hooks wake
    # idle pool workers (MLflow's artifact downloads leave some), then non-daemon threads are
    # joined. A bare join of those workers never returned (`adapters pull` hung after its work).
    shutdown = getattr(threading, "_shutdown", None)
    if shutdown is not None:
        shutdown()
    for thread in threading.enumerate():
        if not thread.daemon and thread is not threading.current_thread():
            thread.join()
    ray = sys.modules.get("ray")  # only where the command used Ray
    if ray is not None and ray.is_initialized():
        # now, not from the exit hook, which first sleeps 0.5 s for worker logs to print:
        # lorafleet's drivers get none (log_to_driver=False, raystart.init_ray)
        ray.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    atexit._run_exitfuncs()
    os._exit(code)


if __name__ == "__main__":
    run()
