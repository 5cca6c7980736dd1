"""Every shipped Serve config loads as `serve run` / `serve deploy` would load it: Serve's own
schema, the import path, `build_app` on the app's args (which validates AppArgs), and the exposure
rule `lorafleet serve` applies. No Serve is started."""

from __future__ import annotations

import importlib
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = sorted((ROOT / "serve_apps").glob("*.yaml"))


def test_there_are_serve_configs():
    assert {p.name for p in CONFIGS} >= {"local.yaml", "cluster.yaml"}


@pytest.mark.parametrize("path", CONFIGS, ids=[p.name for p in CONFIGS])
def test_serve_config_builds(path: Path):
    from ray.serve import Application
    from ray.serve.schema import ServeDeploySchema

    from lorafleet.serve.config import AppArgs
    from lorafleet.serve.run import check_exposure

    text = path.read_text()
    assert text.startswith("#") and ("serve " in text.splitlines()[0]), "open with the command that uses it"
    schema = ServeDeploySchema.model_validate(yaml.safe_load(text))
    for app in schema.applications:
        module, _, attr = app.import_path.partition(":")
        build = getattr(importlib.import_module(module), attr)
        assert isinstance(build(app.args), Application), app.name
        args = AppArgs.model_validate(app.args)
        check_exposure(schema.http_options.host, args.api_keys_file, args.allow_unauthenticated)


def test_a_bad_arg_is_refused_with_its_name():
    from lorafleet.errors import SpecError
    from lorafleet.serve.app import build_app

    with pytest.raises(SpecError, match="max_queued_requests"):
        build_app({"max_queued_requests": "lots"})
    with pytest.raises(SpecError, match="reserved_rows 16 must be below max_batch_size 16"):
        build_app({"reserved_rows": 16, "max_batch_size": 16})


def test_queues_are_bounded_where_the_ingress_answers_overload():
    """The replica's queue is the tight bound (its BackPressureError becomes the ingress's JSON 429);
    the ingress takes all of that and more, so Serve's plain-text 429 is only a last resort."""
    from lorafleet.serve.app import build_app

    ingress = build_app({"max_queued_requests": 3, "max_ongoing_requests": 2})._bound_deployment
    replica = ingress.init_args[0]._bound_deployment
    assert (replica.max_ongoing_requests, replica.max_queued_requests) == (2, 3)
    assert ingress.max_ongoing_requests >= 4 * 2 + 3 and ingress.max_queued_requests >= 4 * (4 * 2 + 3)
    assert ingress.backpressure_config.status_code == 429
    unbounded = build_app({"max_queued_requests": -1})._bound_deployment
    assert unbounded.max_queued_requests == -1


def _number_fields(model):
    numbers = (int, float, int | None, float | None)
    return [name for name, info in model.model_fields.items() if info.annotation in numbers]


def test_every_number_a_serve_config_or_keys_file_takes_is_bounded_and_typed():
    """Infinities, NaN, absurd magnitudes and booleans never pass as numbers (a request_timeout_s
    of .inf or a max_batch_size of 10**9 only showed as a hang or an out-of-memory under load)."""
    from pydantic import ValidationError

    from lorafleet.serve.config import AppArgs
    from lorafleet.serve.keys import Tenant

    cases = [(AppArgs, {}, name) for name in _number_fields(AppArgs)]
    cases += [(Tenant, {"tenant": "t", "adapters": ["*"]}, name) for name in _number_fields(Tenant)]
    assert len(cases) > 20
    for model, base, name in cases:
        for value in (float("inf"), float("nan"), 10**30, -(10**30), True):
            with pytest.raises(ValidationError) as err:
                model.model_validate({**base, name: value})
            assert name in str(err.value), (model.__name__, name, value)


def test_min_replicas_over_max_is_refused():
    from pydantic import ValidationError

    from lorafleet.serve.config import AppArgs

    with pytest.raises(ValidationError, match="min_replicas 3 is over max_replicas 2"):
        AppArgs(min_replicas=3, max_replicas=2)
