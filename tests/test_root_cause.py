"""A failed job's reason is the user's error (or the worker's death), not Ray's wrapper lines."""

from __future__ import annotations

import pytest

from lorafleet.errors import root_cause

WRAP = "Training failed due to worker errors:\n[Rank 0 Error Snippet]:\n"


class WorkerGroupError(Exception):
    pass


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (
            WRAP + "Traceback (most recent call last):\n  File x\nValueError: bad row 3",
            "ValueError: bad row 3",
        ),
        (
            WRAP + "A worker health check failed.\nThe actor died unexpectedly before finishing this task.\n"
            "\tclass_name: RayTrainWorker\nThe actor is dead because its worker process has died.",
            "The actor is dead because its worker process has died.",
        ),
        ("plain message", "test_root_cause.WorkerGroupError: plain message"),
    ],
)
def test_root_cause_names_what_went_wrong(text: str, expected: str) -> None:
    assert root_cause(WorkerGroupError(text)) == expected
