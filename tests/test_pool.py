"""The warm-slot pool's bookkeeping on a real Ray actor: a submission takes only idle slots of its
key whose restart budget covers its jobs; whatever it does not take can be released; a restarted
worker reads its current assignment and spends one restart."""

from __future__ import annotations

import time

import pytest

from lorafleet.train.pool import SlotPool, slot_key


def _work(submission: str, keep_warm_s: float = 60) -> dict:
    board = f"board-{submission}"
    return {"fleet_board": board, "submission": submission, "storage": "/tmp/x", "keep_warm_s": keep_warm_s}


def _config(**changes) -> dict:
    config = {
        "base_model": "tiny-llama",
        "base_fingerprint": "fp",
        "quantization": {"load_in_4bit": True},
        "resources": {"cpus_per_worker": 1, "gpus_per_worker": 0, "workers": 1, "max_failures": 0},
        "max_jobs": 8,
        "k_from_memory": True,
        "slot": "slot0",
        "work": _work("s1"),
    }
    return config | changes


def test_the_slot_key_is_what_a_warm_slot_holds():
    assert slot_key(_config()) == slot_key(_config(slot="slot7", work=_work("s2")))  # not which slot or fleet
    resources = _config()["resources"] | {"max_failures": 3}
    assert slot_key(_config()) == slot_key(_config(resources=resources))  # not a job's retries
    assert slot_key(_config()) != slot_key(_config(base_fingerprint="other"))
    assert slot_key(_config()) != slot_key(_config(max_jobs=2))
    assert slot_key(_config()) != slot_key(_config(work=_work("s1") | {"storage": "/elsewhere"}))
    other_size = _config()["resources"] | {"cpus_per_worker": 2}
    assert slot_key(_config()) != slot_key(_config(resources=other_size))


@pytest.mark.integration
def test_claims_respect_key_and_restart_budget_and_the_rest_is_released(ray_session):
    ray = ray_session
    pool = SlotPool.remote()
    for slot, key, restarts in (("a", "k", 16), ("b", "k", 2), ("c", "k2", 16)):
        ray.get(pool.add.remote(slot, key, _work("s1"), restarts))
        assert ray.get(pool.begin.remote(slot)) == _work("s1")
    waits = {slot: pool.wait_for_work.remote(slot, 60) for slot in "abc"}
    while len(ray.get(pool.idle_slots.remote())) < 3:
        time.sleep(0.01)

    # b's run has 2 restarts left: a submission whose jobs may crash it 5 times cannot have it
    assert ray.get(pool.claim.remote("k", 4, _work("s2"), 5)) == ["a"]
    assert ray.get(waits["a"]) == _work("s2")
    assert sorted(ray.get(pool.release.remote())) == ["b", "c"]
    assert ray.get(waits["b"]) is None and ray.get(waits["c"]) is None
    assert ray.get(pool.idle_slots.remote()) == []

    # a restarted worker of a reads the submission it now works for
    assert ray.get(pool.begin.remote("a")) == _work("s2")


@pytest.mark.integration
def test_an_unclaimed_slot_ends_when_its_wait_runs_out(ray_session):
    ray = ray_session
    pool = SlotPool.remote()
    ray.get(pool.add.remote("a", "k", _work("s1", keep_warm_s=0.2), 4))
    assert ray.get(pool.wait_for_work.remote("a", 0.2)) is None
    assert ray.get(pool.claim.remote("k", 1, _work("s2"), 1)) == []


@pytest.mark.integration
def test_a_slot_whose_submission_ended_is_handed_on_before_it_waits(ray_session):
    """The driver returns as soon as the last job ends; its slot reaches its wait a moment later.
    The next submission takes it anyway (it went unused before), or releases it."""
    ray = ray_session
    pool = SlotPool.remote()
    for slot in "ab":
        ray.get(pool.add.remote(slot, "k", _work(f"s-{slot}", keep_warm_s=60), 4))
    ray.get(pool.finished.remote("s-a"))
    ray.get(pool.finished.remote("s-b"))
    assert ray.get(pool.claim.remote("k", 1, _work("s2"), 1)) == ["a"]
    assert ray.get(pool.release.remote()) == ["b"]
    assert ray.get(pool.wait_for_work.remote("a", 60)) == _work("s2")  # at once
    assert ray.get(pool.wait_for_work.remote("b", 60)) is None  # at once


@pytest.mark.integration
def test_a_restarted_worker_spends_a_restart_and_ends_the_wait_its_dead_process_left(ray_session):
    ray = ray_session
    pool = SlotPool.remote()
    ray.get(pool.add.remote("a", "k", _work("s1"), 3))
    ray.get(pool.begin.remote("a"))
    ray.get(pool.finished.remote("s1"))
    dead_wait = pool.wait_for_work.remote("a", 60)  # its process then dies while it waits
    while ray.get(pool.idle_slots.remote()) != ["a"]:
        time.sleep(0.01)

    assert ray.get(pool.begin.remote("a")) == _work("s1")  # Ray Train restarted it
    assert ray.get(pool.restarts.remote("a")) == 2
    assert ray.get(dead_wait) is None  # over at once; the restarted worker waits on its own
    live_wait = pool.wait_for_work.remote("a", 60)
    while ray.get(pool.idle_slots.remote()) != ["a"]:
        time.sleep(0.01)
    assert ray.get(pool.claim.remote("k", 1, _work("s2"), 1)) == ["a"]
    assert ray.get(live_wait) == _work("s2")


@pytest.mark.integration
def test_a_slot_that_left_is_never_claimed_and_an_aborted_ones_end_at_their_wait(ray_session):
    ray = ray_session
    pool = SlotPool.remote()
    for slot in "ab":
        ray.get(pool.add.remote(slot, "k", _work("s1"), 4))
    ray.get(pool.leave.remote("a"))  # it broke and returned
    assert ray.get(pool.release.remote(["b"])) == ["b"]  # its submission stopped early
    ray.get(pool.finished.remote("s1"))
    assert ray.get(pool.claim.remote("k", 2, _work("s2"), 1)) == []
    assert ray.get(pool.wait_for_work.remote("b", 60)) is None  # at once


@pytest.mark.integration
def test_a_slot_whose_run_ended_ends_its_wait_and_is_never_claimed(ray_session):
    """Its host reports the end of the Ray Train run (restarts spent, released, wait over): the
    pool records how it ended for whoever watches the slot."""
    ray = ray_session
    pool = SlotPool.remote()
    for slot in "ab":
        ray.get(pool.add.remote(slot, "k", _work("s1", keep_warm_s=60), 4))
    ray.get(pool.finished.remote("s1"))
    wait = pool.wait_for_work.remote("a", 60)
    while ray.get(pool.idle_slots.remote()) != ["a"]:
        time.sleep(0.01)

    ray.get(pool.run_ended.remote("a", "TrainingFailedError: restarts spent"))
    ray.get(pool.run_ended.remote("b", None))
    assert ray.get(wait) is None
    assert ray.get(pool.claim.remote("k", 2, _work("s2"), 1)) == []
    assert ray.get(pool.ended_runs.remote()) == {"a": "TrainingFailedError: restarts spent", "b": None}


@pytest.mark.integration
def test_a_slot_whose_wait_ended_is_never_claimed_and_available_claims_nothing(ray_session):
    """A wait that ran out (or was released) ends the slot in the pool at once: a claim made
    before its worker says it left would hand a submission a slot that is ending."""
    ray = ray_session
    pool = SlotPool.remote()
    for slot in "ab":
        ray.get(pool.add.remote(slot, "k", _work("s1", keep_warm_s=60), 4))
    ray.get(pool.finished.remote("s1"))
    assert ray.get(pool.available.remote("k", 1)) == 2
    assert ray.get(pool.available.remote("k", 5)) == 0  # 4 restarts left cover no 5
    assert ray.get(pool.available.remote("k", 1)) == 2  # counting claimed nothing

    assert ray.get(pool.wait_for_work.remote("a", 0.1)) is None  # ran out; its worker has not left yet
    assert ray.get(pool.claim.remote("k", 2, _work("s2"), 1)) == ["b"]


@pytest.mark.integration
def test_the_slot_hosts_tell_watchers_and_the_pool_how_each_run_ended(ray_session):
    """One hosts process drives every slot run of a cluster: a run that fails (here at once, on
    a config no slot accepts) returns why, the pool learns it, and a later watcher gets the same
    answer; a slot this process never ran is gone, and the pool hears that too."""
    from lorafleet.train.pool import POOL_NAME, pool
    from lorafleet.train.slot import GONE, SlotHosts

    ray = ray_session
    hosts = SlotHosts.remote()
    config = {"slot": "broken", "pool": POOL_NAME, "work": _work("s9")}
    error = ray.get(hosts.run.remote(config, "run", "/tmp/x", 0, "k"))
    assert "SlotConfig" in error
    assert ray.get(hosts.ended.remote("broken")) == error
    assert ray.get(hosts.ended.remote("never-ran")) == GONE
    assert ray.get(hosts.running.remote()) == []
    ends = ray.get(pool().ended_runs.remote())
    assert ends["broken"] == error and ends["never-ran"] == GONE
    ray.kill(hosts)
