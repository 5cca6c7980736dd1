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
    "lorafleet.train.raytrain",
    "lorafleet.train.cluster_actors",
)


def test_orchestration_modules_stay_light() -> None:
    code = (
        "import sys\n"
        + "".join(f"import {m}\n" for m in LIGHT)
        + "print(sorted(m for m in ('torch', 'transformers', 'trl', 'peft') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out.stdout


def test_validating_a_fleet_imports_no_torch(tmp_path) -> None:
    """`lorafleet validate` and the start of `submit` tokenise every dataset with the base's
    tokenizer; for the generic fast tokenizer that needs no torch (about 4 s a process)."""
    from lorafleet.demo_customers import write_demo_datasets
    from lorafleet.tinybase import tiny_base_path

    tiny_base_path()  # built here on a fresh machine (building it needs torch; validating does not)
    data = write_demo_datasets(tmp_path)["acme"]
    fleet = tmp_path / "f.yaml"
    fleet.write_text(f"name: f\nbase_model: tiny-llama\njobs:\n  - customer: acme\n    dataset: {data}\n")
    code = (
        "import sys\nfrom lorafleet.validate import check_fleet\n"
        f"check = check_fleet({str(fleet)!r})\nassert not check.errors, check.errors\n"
        "print(sorted(m for m in ('torch', 'trl', 'peft') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.strip().splitlines()[-1] == "[]", out.stdout


def test_the_pipeline_loads_mlflow_only_with_its_first_run() -> None:
    """A submission asks Ray for its slots before it writes its first MLflow run: MLflow's imports
    (about a second) then overlap the slots' start-up instead of preceding it."""
    code = "import sys\nimport lorafleet.pipeline\nprint('mlflow' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False", out.stdout


_NF4_RUN = """
import sys, hashlib, torch
{first}
from lorafleet.models import load_base
from lorafleet.spec import QuantizationSpec
from lorafleet.tinybase import tiny_base_path

torch.manual_seed(0)
model = load_base(tiny_base_path(), QuantizationSpec(compute_dtype="float32"), "cpu")
import bitsandbytes as bnb
logits = model(torch.arange(1, 17).unsqueeze(0)).logits
param = torch.nn.Parameter(torch.randn(64, 64))
optimizer = bnb.optim.PagedAdamW8bit([param], lr=1e-2)
(model(torch.arange(1, 17).unsqueeze(0)).logits.sum() * param.sum()).backward()
optimizer.step()
digest = hashlib.sha256(logits.detach().numpy().tobytes() + param.detach().numpy().tobytes()).hexdigest()
print(digest, "torch._inductor.lowering" in sys.modules, torch.compile.__module__)
"""


def test_bitsandbytes_loads_without_inductor_and_computes_the_same() -> None:
    """`import_bitsandbytes` (through `load_base`, as workers and replicas load) keeps
    TorchInductor out of the process, leaves torch.compile as it was, and the NF4 forward and a
    paged 8-bit AdamW step give the same bits as after a plain `import bitsandbytes`."""
    from lorafleet.tinybase import tiny_base_path

    tiny_base_path()  # built once here, not inside both runs
    runs = {}
    for how, first in {"fast": "", "plain": "import bitsandbytes"}.items():
        out = subprocess.run(
            [sys.executable, "-c", _NF4_RUN.format(first=first)], capture_output=True, text=True
        )
        assert out.returncode == 0, out.stderr[-3000:]
        runs[how] = out.stdout.split()
    assert runs["fast"][1:] == ["False", "torch"], runs
    assert runs["plain"][1] == "True", "bitsandbytes no longer imports TorchInductor: drop fastimport"
    assert runs["fast"][0] == runs["plain"][0]
