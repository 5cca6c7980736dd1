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
