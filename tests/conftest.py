"""Shared fixtures: one local Ray per session, a fresh MLflow home per test, small bases."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest
import yaml

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("RAY_TRAIN_ENABLE_PRINT_PATCH", "0")


def has_gpu() -> bool:
    import torch

    return torch.cuda.is_available()


def pytest_configure(config):
    config.addinivalue_line("markers", "multinode: runs its own simulated multi-node Ray cluster")


def pytest_collection_modifyitems(config, items):
    if has_gpu():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


def start_local_ray() -> None:
    """The session's plain local Ray; also restarted by modules that run their own cluster."""
    from lorafleet.raystart import init_ray

    # address="local": always a fresh cluster, never one a `ray start` or another run left
    init_ray("local", num_cpus=2)


@pytest.fixture(scope="session")
def ray_session():
    """One local Ray for the whole session (starting Ray costs ~4 s and ~1 GB)."""
    import ray

    start_local_ray()
    yield ray
    ray.shutdown()


@pytest.fixture
def lf_home(tmp_path, monkeypatch):
    """An empty embedded store (SQLite + artefacts + checkpoints) for one test."""
    monkeypatch.setenv("LORAFLEET_HOME", str(tmp_path))
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.chdir(tmp_path)
    return tmp_path


def build_micro_base(out: Path) -> Path:
    """A random 2-layer Llama and BPE tokenizer with a chat template: fast fleet mechanics tests."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    texts = [f"user asks about item {i} and the assistant answers number {i * 7}" for i in range(300)]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(
        texts,
        trainers.BpeTrainer(
            vocab_size=500,
            special_tokens=["<s>", "</s>", "<pad>"],
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        ),
    )
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>")
    fast.chat_template = (
        "{% for m in messages %}{% if m['role'] == 'assistant' %}<s>assistant\n{% generation %}"
        "{{ m['content'] }}</s>{% endgeneration %}\n{% else %}<s>{{ m['role'] }}\n{{ m['content'] }}"
        "</s>\n{% endif %}{% endfor %}{% if add_generation_prompt %}<s>assistant\n{% endif %}"
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(
        LlamaConfig(
            vocab_size=len(fast),
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=4,
            max_position_embeddings=256,
            bos_token_id=0,
            eos_token_id=1,
            pad_token_id=2,
        )
    )
    model.save_pretrained(out)
    fast.save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def micro_base(tmp_path_factory) -> Path:
    return build_micro_base(tmp_path_factory.mktemp("micro-base"))


def write_chat(path: Path, tag: str, n: int = 40) -> Path:
    with open(path, "w") as fh:
        for i in range(n):
            msgs = [
                {"role": "user", "content": f"item {i}"},
                {"role": "assistant", "content": f"answer {tag} {i}"},
            ]
            fh.write(json.dumps({"messages": msgs}) + "\n")
    return path


# A few steps of the micro base: what a fleet file of the tests trains unless it says otherwise.
TRAINING = {
    "max_steps": 4,
    "save_steps": 2,
    "batch_size": 4,
    "max_length": 64,
    "logging_steps": 2,
    "eval_fraction": 0.0,
}


def fleet_file(
    folder: Path,
    name: str,
    jobs: dict[str, str | dict[str, Any]],
    *,
    base: Path | str,
    training: dict[str, Any] | None = None,
    resources: dict[str, Any] | None = None,
    packing: dict[str, Any] | None = None,
    **fields: Any,
) -> Path:
    """The fleet file `<folder>/<name>.yaml` of fleet `name` on `base` (rank-4 LoRA).

    jobs: customer -> its dataset (a path beside the file, or a URL) or its entry's other fields;
    a job without a dataset gets a chat dataset of its own (write_chat, tagged with its name).
    training: defaults over TRAINING; resources: the defaults' resources; packing: the packing
    section; fields: other top-level fields (registry, ...)."""
    entries = []
    for customer, job in jobs.items():
        entry = {"dataset": job} if isinstance(job, str) else dict(job)
        if "dataset" not in entry:
            write_chat(folder / f"{customer}.jsonl", customer)
            entry["dataset"] = f"{customer}.jsonl"
        entries.append({"customer": customer, **entry})
    defaults: dict[str, Any] = {"training": TRAINING | (training or {}), "lora": {"rank": 4}}
    if resources is not None:
        defaults["resources"] = resources
    spec = {"name": name, "base_model": str(base), "defaults": defaults, "jobs": entries, **fields}
    if packing is not None:
        spec["packing"] = packing
    path = folder / f"{name}.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


@pytest.fixture(scope="session")
def demo_home(tmp_path_factory, ray_session):
    """The demo fleet trained once per session (real Ray Train + NF4 + trl) into its own store."""
    import shutil

    from lorafleet.demo import DEMO_FLEET
    from lorafleet.pipeline import submit
    from lorafleet.settings import environ

    home = tmp_path_factory.mktemp("demo-home")
    with environ({"LORAFLEET_HOME": str(home), "MLFLOW_TRACKING_URI": None}):
        fleet = home / "jobs"
        shutil.copytree(DEMO_FLEET.parent, fleet)
        result = submit(fleet / DEMO_FLEET.name)
    assert all(o.state == "succeeded" for o in result.jobs.values()), result.jobs
    return home, result


@pytest.fixture
def in_demo_home(demo_home, monkeypatch):
    home, result = demo_home
    monkeypatch.setenv("LORAFLEET_HOME", str(home))
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.chdir(home)
    return home, result
