"""The processes that only orchestrate (the driver, the fleet's board, a slot's controller side)
import neither torch nor transformers: each would pay seconds of imports before a job's first
step. Checked in a fresh interpreter, as a Ray worker process starts."""

from __future__ import annotations

import subprocess
import sys

LIGHT = (
    "lorafleet.pipeline",
    "lorafleet.train.runner",
    "lorafleet.train.slot",
    "lorafleet.train.pool",
    "lorafleet.train.progress",
)


def test_orchestration_modules_stay_light() -> None:
    code = (
        "import sys\n"
        + "".join(f"import {m}\n" for m in LIGHT)
        + "print(sorted(m for m in ('torch', 'transformers', 'trl', 'peft') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out.stdout
