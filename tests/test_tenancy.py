"""Tenants without a server: the keys file (atomic, private, CLI), its live reload, per-tenant
limits with an injected clock, and the refusal to serve an open endpoint beyond loopback."""

from __future__ import annotations

import json
import logging
import os
import stat

import pytest

from lorafleet.cli import main
from lorafleet.serve.keys import KeysFileError, Tenant, add_key, load_keys, revoke, tenant_rows
from lorafleet.serve.run import OpenEndpointError, check_exposure, is_loopback
from lorafleet.serve.tenancy import (
    KeyStore,
    TenantLimiter,
    TenantLimitError,
    bearer_key,
    retry_after_header,
)


class FakeClock:
    def __init__(self, now: float = 1000.0):
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, s: float) -> None:
        self.now += s


def bearer(key: str) -> str:
    return f"Bearer {key}"


def tenant(name: str = "acme-corp", **limits) -> Tenant:
    return Tenant(tenant=name, adapters=["acme"], **limits)


def mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


# ---- the keys file ------------------------------------------------------------------------------


def test_add_key_writes_private_file_atomically(tmp_path):
    path = tmp_path / "keys.json"
    path.write_text("{}")
    path.chmod(0o644)  # an existing file readable by all is replaced by a private one
    key = add_key(path, "acme-corp", ["acme"], max_concurrent=4, tokens_per_minute=1000, weight=2)
    assert mode(path) == 0o600
    assert key not in path.read_text()
    assert os.listdir(tmp_path) == ["keys.json"]  # no temp file left behind
    (entry,) = load_keys(path).values()
    assert (entry.max_concurrent, entry.tokens_per_minute, entry.weight) == (4, 1000, 2.0)


def test_a_new_key_sets_the_tenants_limits_on_all_its_keys(tmp_path):
    path = tmp_path / "keys.json"
    add_key(path, "acme-corp", ["acme"], max_concurrent=4)
    add_key(path, "globex", ["globex"])
    add_key(path, "acme-corp", ["acme"], max_concurrent=8)
    limits = {(t.tenant, t.max_concurrent) for t in load_keys(path).values()}
    assert limits == {("acme-corp", 8), ("globex", None)}


def test_bad_limits_and_bad_files_are_refused_with_the_entry_named(tmp_path):
    path = tmp_path / "keys.json"
    with pytest.raises(KeysFileError, match="max_concurrent"):
        add_key(path, "acme-corp", ["acme"], max_concurrent=0)
    path.write_text(json.dumps({"ab" * 32: {"tenant": "x", "adapters": [], "max_concurent": 3}}))
    with pytest.raises(KeysFileError, match="max_concurent"):  # a typo is not "no limit"
        load_keys(path)
    with pytest.raises(KeysFileError, match="does not exist"):
        load_keys(tmp_path / "missing.json")


def test_revoke_removes_every_key_of_a_tenant(tmp_path):
    path = tmp_path / "keys.json"
    add_key(path, "acme-corp", ["acme"])
    add_key(path, "acme-corp", ["acme"])
    add_key(path, "globex", ["globex"])
    assert revoke(path, "acme-corp") == 2
    assert [r["tenant"] for r in tenant_rows(path)] == ["globex"]
    with pytest.raises(KeysFileError, match="tenants: globex"):
        revoke(path, "acme-corp")


# ---- the CLI ------------------------------------------------------------------------------------


def test_cli_keys_create_list_revoke(tmp_path, capsys):
    path = str(tmp_path / "keys.json")
    assert main(["keys", "acme-corp", "--adapters", "acme", "--file", path]) == 0  # README's form
    key = capsys.readouterr().out.strip().splitlines()[-1]
    args = ["--adapters", "globex,initech", "--max-concurrent", "2", "--tokens-per-minute", "500"]
    assert main(["keys", "create", "globex", *args, "--weight", "0.5", "--file", path]) == 0
    capsys.readouterr()
    assert main(["keys", "list", "--json", "--file", path]) == 0
    listed = capsys.readouterr().out
    rows = json.loads(listed)
    assert [(r["tenant"], r["adapters"], r["max_concurrent"]) for r in rows] == [
        ("acme-corp", ["acme"], None),
        ("globex", ["globex", "initech"], 2),
    ]
    assert rows[1]["tokens_per_minute"] == 500 and rows[1]["weight"] == 0.5
    assert key not in listed and not any(h in listed for h in load_keys(path))  # no keys, no hashes
    assert main(["keys", "revoke", "acme-corp", "--file", path]) == 0
    assert main(["keys", "revoke", "acme-corp", "--file", path]) == 2  # an error, not a traceback
    assert "no keys for tenant 'acme-corp'" in capsys.readouterr().err
    assert main(["keys", "list", "--file", path]) == 0
    assert "globex" in capsys.readouterr().out


# ---- KeyStore: reload, revocation, a bad edit ---------------------------------------------------


def test_keystore_reloads_within_reload_s(tmp_path):
    path, clock = tmp_path / "keys.json", FakeClock()
    old = add_key(path, "acme-corp", ["acme"])
    store = KeyStore(path, reload_s=2.0, clock=clock)
    assert store.tenant(bearer(old)).tenant == "acme-corp"
    new = add_key(path, "globex", ["globex"], max_concurrent=3)
    revoke(path, "acme-corp")
    clock.advance(1.0)
    assert store.tenant(bearer(old)) is not None and store.tenant(bearer(new)) is None  # not yet
    clock.advance(1.0)
    assert store.tenant(bearer(old)) is None  # revoked within reload_s
    assert store.tenant(bearer(new)).max_concurrent == 3


def test_keystore_rejects_missing_and_malformed_headers(tmp_path):
    path = tmp_path / "keys.json"
    key = add_key(path, "acme-corp", ["acme"])
    store = KeyStore(path)
    assert store.tenant(f"bearer  {key} ") is not None
    for header in (None, "", "Bearer", key, f"Basic {key}", "Bearer lf-wrong"):
        assert store.tenant(header) is None, header
    assert bearer_key("Bearer abc") == "abc"


def test_keystore_keeps_last_good_keys_when_the_file_breaks(tmp_path, caplog):
    path, clock = tmp_path / "keys.json", FakeClock()
    key = add_key(path, "acme-corp", ["acme"])
    store = KeyStore(path, reload_s=1.0, clock=clock)
    for breakage in ("{not json", json.dumps({"ab": {"tenant": "x"}}), None):
        if breakage is None:
            path.unlink()
        else:
            path.write_text(breakage)
        clock.advance(1.0)
        with caplog.at_level(logging.WARNING, logger="lorafleet.serve.tenancy"):
            assert store.tenant(bearer(key)).tenant == "acme-corp"  # neither open nor locked out
            assert store.tenant("Bearer lf-anything") is None
    assert sum("keeping the last good keys" in r.message for r in caplog.records) == 3
    fixed = add_key(path, "globex", ["globex"])
    clock.advance(1.0)
    assert store.tenant(bearer(fixed)).tenant == "globex" and store.tenant(bearer(key)) is None


def test_keystore_refuses_a_bad_file_at_start_and_warns_of_a_shared_one(tmp_path, caplog):
    path = tmp_path / "keys.json"
    path.write_text("[]")
    with pytest.raises(KeysFileError):
        KeyStore(path)
    add_key(path.with_name("ok.json"), "acme-corp", ["acme"])
    path.with_name("ok.json").chmod(0o644)
    with caplog.at_level(logging.WARNING, logger="lorafleet.serve.tenancy"):
        KeyStore(path.with_name("ok.json"))
    assert "readable by other users" in caplog.text


# ---- TenantLimiter ------------------------------------------------------------------------------


def test_concurrency_limit_and_release():
    limiter = TenantLimiter(clock=FakeClock())
    acme = tenant(max_concurrent=2)
    leases = [limiter.acquire(acme, 10), limiter.acquire(acme, 10)]
    with pytest.raises(TenantLimitError) as err:
        limiter.acquire(acme, 10)
    assert err.value.code == "concurrent_requests_exceeded" and err.value.retry_after_s > 0
    limiter.acquire(tenant("globex", max_concurrent=2), 10)  # another tenant is not affected
    leases[0].release(3)
    leases[0].release(3)  # a second release does nothing
    limiter.acquire(acme, 10)
    assert limiter.in_flight("acme-corp") == 2


def test_tokens_per_minute_sliding_window_with_retry_after():
    clock = FakeClock()
    limiter = TenantLimiter(clock=clock)
    acme = tenant(tokens_per_minute=100)
    limiter.acquire(acme, 60)
    clock.advance(20)
    limiter.acquire(acme, 40)
    with pytest.raises(TenantLimitError) as err:
        limiter.acquire(acme, 30)
    assert err.value.code == "tokens_per_minute_exceeded"
    assert err.value.retry_after_s == pytest.approx(40)  # when the first 60 leave the window
    assert retry_after_header(err.value) == "40"
    clock.advance(40)
    limiter.acquire(acme, 30)
    assert limiter.tokens_in_window("acme-corp") == 70


def test_release_corrects_the_reservation_to_tokens_used():
    limiter = TenantLimiter(clock=FakeClock())
    acme = tenant(tokens_per_minute=100)
    limiter.acquire(acme, 90).release(tokens_used=5)  # stopped early: 85 tokens back
    limiter.acquire(acme, 90)
    assert limiter.tokens_in_window("acme-corp") == 95


def test_a_request_over_the_whole_minute_is_refused_as_too_large():
    limiter = TenantLimiter(clock=FakeClock())
    with pytest.raises(TenantLimitError, match="lower max_tokens") as err:
        limiter.acquire(tenant(tokens_per_minute=100), 101)
    assert err.value.code == "request_too_large"


def test_limits_follow_the_tenant_record_and_quiet_tenants_are_forgotten():
    clock = FakeClock()
    limiter = TenantLimiter(clock=clock)
    lease = limiter.acquire(tenant(max_concurrent=1), 10)
    with pytest.raises(TenantLimitError):
        limiter.acquire(tenant(max_concurrent=1), 10)
    limiter.acquire(tenant(max_concurrent=2), 10).release(10)  # a reloaded file raised the limit
    lease.release(10)
    clock.advance(61)
    limiter.acquire(tenant(), 10).release(0)
    assert limiter._usage == {}


# ---- an open endpoint beyond loopback -----------------------------------------------------------


@pytest.mark.parametrize(
    "host,loopback",
    [("127.0.0.1", True), ("127.3.4.5", True), ("localhost", True), ("::1", True), ("[::1]", True)]
    + [("0.0.0.0", False), ("::", False), ("10.1.2.3", False), ("example.com", False)],
)
def test_is_loopback(host, loopback):
    assert is_loopback(host) is loopback


def test_non_loopback_without_keys_is_refused_unless_open_on_purpose():
    check_exposure("127.0.0.1", None, False)
    check_exposure("0.0.0.0", "keys.json", False)
    check_exposure("0.0.0.0", None, True)
    with pytest.raises(OpenEndpointError, match="--keys-file.*allow_unauthenticated: true"):
        check_exposure("0.0.0.0", None, False)


def test_serve_cli_refuses_an_open_public_endpoint(tmp_path, capsys):
    # refused before Ray starts: cheap, and nothing is left listening
    assert main(["serve", "--host", "0.0.0.0", "--port", "8999"]) == 2
    assert "refusing to listen on 0.0.0.0" in capsys.readouterr().err
    config = tmp_path / "public.yaml"  # the host of a Serve config counts too
    config.write_text(
        "http_options: {host: 0.0.0.0, port: 8999}\n"
        "applications: [{import_path: 'lorafleet.serve.app:build_app', args: {base_model: tiny-llama}}]\n"
    )
    assert main(["serve", "--config", str(config)]) == 2
    assert "refusing to listen on 0.0.0.0" in capsys.readouterr().err


# ---- the trust bench's request mix (the bench itself runs the endpoint: `lorafleet bench serve`) --


def test_hostile_mix_keeps_good_order_and_share():
    from lorafleet.bench.hostile import HOSTILE, good_call, mix_hostile
    from lorafleet.bench.trust_bench import parse_app_args

    good = [good_call(i, "tenant-0", "k", 8) for i in range(90)]
    mixed = mix_hostile(good, 0.1, ["tenant-0", "tenant-1"], "k", 8, seed=1)
    assert len(mixed) == 100 and [c for c in mixed if c.kind == "good"] == good
    one_each = mix_hostile([good[0]] * 9 * len(HOSTILE), 0.1, ["tenant-0"], "k", 8)
    kinds = [c.kind for c in one_each if c.kind != "good"]  # as many hostile as kinds: each once
    assert sorted(kinds) == sorted(f"hostile:{k}" for k in HOSTILE)
    assert parse_app_args(["max_queued_requests=32", "keys_reload_s=0.5"]) == {
        "max_queued_requests": 32,
        "keys_reload_s": 0.5,
    }


def test_a_rotated_key_keeps_the_tenants_limits_unless_new_ones_are_given(tmp_path):
    path = tmp_path / "keys.json"
    add_key(path, "acme-corp", ["acme"], max_concurrent=8, tokens_per_minute=20000, weight=2)
    add_key(path, "acme-corp", ["acme"])  # rotation: a second key, no limits named
    assert {(t.max_concurrent, t.tokens_per_minute, t.weight) for t in load_keys(path).values()} == {
        (8, 20000, 2)
    }
    add_key(path, "acme-corp", ["acme"], max_concurrent=2)
    assert {(t.max_concurrent, t.tokens_per_minute) for t in load_keys(path).values()} == {(2, 20000)}


@pytest.mark.parametrize(
    ("tenant", "adapters", "message"),
    [
        ("bad name/@", ["acme"], "tenant 'bad name/@' may use only"),
        ("t\n", ["acme"], "may use only"),
        ("t" * 200, ["acme"], "at most 128 characters"),
        ("t", [], "could call nothing"),
        ("t", ["acme@prod"], "adapter 'acme@prod' may use only"),
        ("t", ["a/b"], "may use only"),
    ],
)
def test_names_a_key_can_never_match_are_refused(tmp_path, tenant, adapters, message):
    path = tmp_path / "keys.json"
    with pytest.raises(KeysFileError, match=message):
        add_key(path, tenant, adapters, base=bool(adapters))
    assert not path.exists()


def test_keys_files_that_are_folders_or_hold_odd_entries_are_named(tmp_path):
    folder = tmp_path / "dir.json"
    folder.mkdir()
    for call in (lambda: add_key(folder, "t", ["acme"]), lambda: load_keys(folder)):
        with pytest.raises(KeysFileError, match="is a folder"):
            call()
    with pytest.raises(KeysFileError, match="does not exist"):
        add_key(tmp_path / "no" / "keys.json", "t", ["acme"])
    odd = tmp_path / "odd.json"
    odd.write_text('{"abc": "str"}')
    with pytest.raises(KeysFileError, match="key hash -> tenant object"):
        add_key(odd, "t", ["acme"])
    misspelt = tmp_path / "misspelt.json"
    misspelt.write_text('{"abc": {"tenant": "t", "adapters": ["acme"], "max_concurent": 3}}')
    before = misspelt.read_text()
    with pytest.raises(KeysFileError, match="max_concurent"):
        add_key(misspelt, "u", ["acme"])  # a file `list` refuses is not written to either
    assert misspelt.read_text() == before
