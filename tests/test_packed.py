"""Packed training: a job trained beside others ends with the adapter it gets alone, and each job
keeps its own data, loss, optimizer, checkpoints and failures (fp32 on the CPU, micro base)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from lorafleet.data import job_splits
from lorafleet.models import fingerprint, load_tokenizer
from lorafleet.spec import JobSpec, LoraSpec, QuantizationSpec, ResourcesSpec, TrainingSpec
from lorafleet.train.packed import PackedTrainer, PackingError, jobs_that_fit
from lorafleet.train.packed_data import Row, tokenize
from lorafleet.train.worker import JobPlan, build_trainer
from tests.conftest import write_chat

# Packed against alone: the same fp32 arithmetic on the job's rows, but the batch is padded to
# the batch mates' longest row and the base's matmuls see more rows, which may change the order of
# float sums (measured: bitwise equal on this CPU). Normalising across jobs moves it by > 1e-2.
TOLERANCE = 1e-5
FP32 = QuantizationSpec(load_in_4bit=False, compute_dtype="float32")
NF4 = QuantizationSpec(compute_dtype="float32")


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """The micro base's matmuls are tiny: a second intra-op thread only adds waits (measured 15x
    slower CPU time with 2 threads on a busy 2-core machine)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def write_prompts(path: Path, n: int = 30) -> Path:
    with open(path, "w") as fh:
        for i in range(n):
            fh.write(
                json.dumps({"prompt": f"user asks about item {i}", "completion": f" number {i * 7}"}) + "\n"
            )
    return path


def make_plan(base: Path, dataset: Path, customer: str, quant=FP32, lora=None, fail_at_step=None, **training):
    """A job on the micro base; `training` overrides the TrainingSpec defaults below."""
    settings = {"max_steps": 4, "batch_size": 4, "save_steps": 4, "logging_steps": 1, "learning_rate": 1e-3}
    job = JobSpec(
        fleet="packed",
        customer=customer,
        base_model=str(base),
        dataset=str(dataset),
        format="auto",
        lora=LoraSpec(**{"rank": 4, "dropout": 0.0, **(lora or {})}),
        quantization=quant,
        training=TrainingSpec(**{**settings, **training}),
        resources=ResourcesSpec(),
    )
    return JobPlan(job=job, base_fingerprint=fingerprint(base), fail_at_step=fail_at_step)


class Events:
    """on_event sink: every event per customer."""

    def __init__(self) -> None:
        self.by_customer: dict[str, list[dict]] = {}

    def __call__(self, customer: str, event: dict) -> None:
        self.by_customer.setdefault(customer, []).append(event)

    def states(self, customer: str) -> list[str]:
        return [e["state"] for e in self.by_customer.get(customer, []) if e["event"] == "state"]

    def last(self, customer: str, kind: str) -> dict:
        return [e for e in self.by_customer[customer] if e["event"] == kind][-1]


def adapter(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(Path(folder) / "adapter_model.safetensors")


def max_relative_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k] - b[k]).norm() / a[k].norm()) for k in a)


# ---- the same tokens and files as a trl job ----------------------------------------------------


def test_tokens_match_trl_for_chat_and_prompt_completion(micro_base, tmp_path):
    chat = write_chat(tmp_path / "chat.jsonl", "acme", n=12)
    pc = write_prompts(tmp_path / "pc.jsonl", n=12)
    for dataset, max_length in ((chat, 16), (pc, 64)):  # 16 cuts into the answers
        plan = make_plan(micro_base, dataset, "tok", max_length=max_length)
        trl_ds = build_trainer(plan, str(tmp_path / "trl"), "cpu", []).train_dataset
        t = plan.job.training
        train = job_splits(plan.job.dataset, plan.job.format, t.eval_fraction, t.seed, plan.dataset_sha256)[0]
        ours = tokenize(train, load_tokenizer(micro_base), max_length)
        assert len(ours) == len(trl_ds) > 0
        assert [r.input_ids for r in ours] == trl_ds["input_ids"], dataset.name
        assert [r.labels for r in ours] == trl_ds["labels"], dataset.name
        assert all(-100 in r.labels and set(r.labels) != {-100} for r in ours)  # prompts masked, answers kept


def test_adapter_files_match_a_trl_job(micro_base, tmp_path):
    from lorafleet.train.worker import train_plain

    data = write_chat(tmp_path / "a.jsonl", "acme", n=12)
    plan = make_plan(micro_base, data, "acme", quant=NF4, max_steps=1, lora={"rank": 4, "dropout": 0.05})
    trl_folder = train_plain(plan, str(tmp_path / "trl"))
    trainer = PackedTrainer(str(micro_base), NF4, max_jobs=2)
    events = Events()
    trainer.add(plan, tmp_path / "packed", on_event=events)
    trainer.run()
    ours = Path(events.last("acme", "state")["adapter"])

    theirs_w, ours_w = adapter(trl_folder), adapter(ours)
    assert {k: (v.shape, v.dtype) for k, v in ours_w.items()} == {
        k: (v.shape, v.dtype) for k, v in theirs_w.items()
    }
    theirs_c, ours_c = (json.loads((f / "adapter_config.json").read_text()) for f in (trl_folder, ours))
    assert set(ours_c.pop("target_modules")) == set(theirs_c.pop("target_modules"))
    assert ours_c == theirs_c


# ---- packed == alone -------------------------------------------------------------------------


class AcrossJobs(PackedTrainer):
    """The bug the equivalence test must catch: one loss over the whole batch's tokens."""

    def job_losses(self, parts, segments, tokens):
        total = sum(job.window_tokens for job, _ in parts)
        return [tokens[s.start : s.stop].sum() / total for s in segments]


def focus_plan(base: Path, data: Path, **extra) -> JobPlan:
    """The job compared: dropout on (per-job masks), accumulation 2, 8 steps, checkpoint every 4."""
    return make_plan(
        base, data, "focus", lora={"rank": 4, "dropout": 0.1}, gradient_accumulation=2, max_steps=8, **extra
    )


def mate_plans(base: Path, folder: Path) -> list[JobPlan]:
    """Three batch mates: other ranks, target modules, lengths and step counts."""
    return [
        make_plan(
            base,
            write_chat(folder / "m1.jsonl", "m1"),
            "m1",
            lora={"rank": 8, "target_modules": ["q_proj", "v_proj"]},
            max_steps=6,
        ),
        make_plan(
            base, write_chat(folder / "m2.jsonl", "m2"), "m2", lora={"rank": 2}, max_length=18, max_steps=3
        ),
        make_plan(
            base,
            write_prompts(folder / "m3.jsonl"),
            "m3",
            lora={"rank": 16, "target_modules": ["down_proj"]},
            max_steps=10,
            batch_size=3,
        ),
    ]


def train(trainer: PackedTrainer, plans: list[JobPlan], folder: Path, events: Events | None = None) -> Events:
    events = events or Events()
    for plan in plans:
        assert trainer.add(plan, folder / plan.job.customer, on_event=events) == "pending"
    trainer.run()
    return events


@pytest.fixture(scope="module")
def focus_runs(micro_base, tmp_path_factory):
    """The focus job alone (K=1), packed beside three mates, and packed with across-job loss."""
    tmp = tmp_path_factory.mktemp("packed")
    data = write_chat(tmp / "focus.jsonl", "focus")
    alone = train(
        PackedTrainer(str(micro_base), FP32, max_jobs=1), [focus_plan(micro_base, data)], tmp / "alone"
    )
    packed = train(  # one forward for all rows: the mates' lengths pad the focus job's rows
        PackedTrainer(str(micro_base), FP32, max_jobs=4, max_padding=1.0),
        [focus_plan(micro_base, data), *mate_plans(micro_base, tmp)],
        tmp / "packed",
    )
    across = train(
        AcrossJobs(str(micro_base), FP32, max_jobs=4, gradient_checkpointing=False, max_padding=1.0),
        [focus_plan(micro_base, data), *mate_plans(micro_base, tmp)],
        tmp / "across",
    )
    return {"alone": alone, "packed": packed, "across": across, "data": data, "tmp": tmp}


def test_a_packed_job_ends_with_the_adapter_it_gets_alone(focus_runs):
    alone, packed = focus_runs["alone"], focus_runs["packed"]
    for customer in ("focus", "m1", "m2", "m3"):
        assert packed.states(customer) == ["running", "succeeded"], customer
    assert packed.last("m3", "state")["step"] == 10 and packed.last("m2", "state")["step"] == 3
    ref = adapter(alone.last("focus", "state")["adapter"])
    assert max_relative_diff(adapter(packed.last("focus", "state")["adapter"]), ref) < TOLERANCE
    assert any(float(v.norm()) > 0 for k, v in ref.items() if "lora_B" in k)  # it did train
    # the same losses along the way, and the base's eval loss before any update
    for kind, key in (("base_eval", "base_eval_loss"), ("eval", "eval_loss"), ("metrics", "loss")):
        assert packed.last("focus", kind)[key] == pytest.approx(alone.last("focus", kind)[key], rel=1e-5)


def test_normalising_the_loss_across_jobs_breaks_the_equivalence(focus_runs):
    ref = adapter(focus_runs["alone"].last("focus", "state")["adapter"])
    across = adapter(focus_runs["across"].last("focus", "state")["adapter"])
    assert max_relative_diff(across, ref) > 100 * TOLERANCE


# ---- resume, cancel, failure -------------------------------------------------------------------


def test_a_job_interrupted_at_step_6_resumes_from_step_4_to_the_same_adapter(micro_base, focus_runs):
    tmp = focus_runs["tmp"]
    trainer = PackedTrainer(str(micro_base), FP32, max_jobs=2, max_padding=0.0)  # a forward per job
    mate = make_plan(micro_base, write_chat(tmp / "r1.jsonl", "r1"), "r1", max_steps=3)
    crashed = train(
        trainer, [focus_plan(micro_base, focus_runs["data"], fail_at_step=6), mate], tmp / "crash"
    )
    failed = crashed.last("focus", "state")
    assert failed["state"] == "failed" and "injected fault at step 6" in failed["reason"]
    assert Path(failed["checkpoint"]).name == "checkpoint-4"
    assert crashed.states("r1") == ["running", "succeeded"]

    resumed = Events()
    trainer.add(
        focus_plan(micro_base, focus_runs["data"]), tmp / "crash" / "focus", failed["checkpoint"], resumed
    )
    trainer.run()
    assert resumed.by_customer["focus"][0]["resumed"] is True and "base_eval" not in str(resumed.by_customer)
    ref = adapter(focus_runs["alone"].last("focus", "state")["adapter"])
    assert max_relative_diff(adapter(resumed.last("focus", "state")["adapter"]), ref) < TOLERANCE


def test_cancel_and_a_failing_job_leave_the_others_training(micro_base, tmp_path):
    trainer = PackedTrainer(str(micro_base), FP32, max_jobs=4)
    plans = [make_plan(micro_base, write_chat(tmp_path / f"{c}.jsonl", c), c, max_steps=3) for c in "abc"]
    events = Events()
    for plan in plans:
        trainer.add(plan, tmp_path / plan.job.customer, on_event=events)
    bad = make_plan(micro_base, tmp_path / "missing.jsonl", "d")
    assert trainer.add(bad, tmp_path / "d", on_event=events) == "failed"
    assert "dataset file not found" in events.last("d", "state")["reason"]

    trainer.step()
    with torch.no_grad():  # poison b's adapter: its loss turns NaN at the next step
        next(iter(trainer.jobs["b"].pairs.values())).lora_A.fill_(float("nan"))
    assert trainer.cancel("c") and not trainer.cancel("nobody")
    trainer.run()

    assert events.states("a") == ["running", "succeeded"]
    assert (
        events.states("b") == ["running", "failed"]
        and "non-finite loss" in events.last("b", "state")["reason"]
    )
    assert events.states("c") == ["running", "cancelled"]
    assert trainer.active() == [] and all(not layer.adapters for layer in trainer.layers.values())
    with pytest.raises(PackingError, match="fingerprint"):
        trainer.add(plans[0].model_copy(update={"base_fingerprint": "sha256:other"}), tmp_path / "x")


def test_a_job_whose_rows_break_the_shared_forward_fails_alone(micro_base, focus_runs):
    """A row that raises inside the forward all jobs share (a token id past the embedding, as a
    tokenizer with a token the base never learnt gives) fails its job alone: the group runs again
    one job at a time, and the focus job ends with the adapter it gets alone. The error used to
    leave the step, and the slot failed every job it held."""
    tmp = focus_runs["tmp"]
    trainer = PackedTrainer(str(micro_base), FP32, max_jobs=4, max_padding=1.0)  # one forward for all
    bad = make_plan(micro_base, write_chat(tmp / "oov.jsonl", "oov"), "oov", max_steps=3, eval_fraction=0.0)
    events = Events()
    for plan in (focus_plan(micro_base, focus_runs["data"]), bad):
        trainer.add(plan, tmp / "oov-run" / plan.job.customer, on_event=events)
    job = next(j for j in trainer.pending if j.key == "oov")
    job.train_rows = [Row([*r.input_ids[:-1], 10**6], r.labels) for r in job.train_rows]
    trainer.run()
    assert events.states("oov") == ["running", "failed"], events.by_customer["oov"]
    assert "IndexError" in events.last("oov", "state")["reason"]
    assert events.states("focus") == ["running", "succeeded"]
    ref = adapter(focus_runs["alone"].last("focus", "state")["adapter"])
    assert max_relative_diff(adapter(events.last("focus", "state")["adapter"]), ref) < TOLERANCE


def test_a_job_failing_in_the_shared_backward_leaves_its_mates_gradients_whole(micro_base, tmp_path):
    """The error comes in the backward of the second micro-step of a two-micro-step window, when
    the mate's gradients of the first are in .grad and the shared backward has added part of the
    second's: they are put back before each job runs alone, so the mate ends as it does alone."""
    data = write_chat(tmp_path / "m.jsonl", "m")

    def plan(customer: str, dataset: Path) -> JobPlan:
        return make_plan(
            micro_base, dataset, customer, max_steps=3, gradient_accumulation=2, eval_fraction=0.0
        )

    alone = train(PackedTrainer(str(micro_base), FP32, max_jobs=1), [plan("m", data)], tmp_path / "alone")
    trainer = PackedTrainer(str(micro_base), FP32, max_jobs=2, max_padding=1.0)  # one forward for both
    events = Events()
    for p in (plan("m", data), plan("b", write_chat(tmp_path / "b.jsonl", "b"))):
        trainer.add(p, tmp_path / "packed" / p.job.customer, on_event=events)
    trainer.step()  # the first micro-step of both: their gradients wait in .grad

    def fault(grad: torch.Tensor) -> torch.Tensor:
        raise RuntimeError("injected backward fault")

    trainer.jobs["b"].params[0].register_hook(fault)  # the first layer's: late in the backward
    trainer.run()
    assert events.states("b") == ["running", "failed"] and "injected backward fault" in str(
        events.by_customer["b"]
    )
    assert events.states("m") == ["running", "succeeded"]
    ref = adapter(alone.last("m", "state")["adapter"])
    assert max_relative_diff(adapter(events.last("m", "state")["adapter"]), ref) < TOLERANCE


def test_jobs_that_fail_only_together_train_apart_and_end_as_alone(micro_base, focus_runs):
    """A forward that fails for the group while each job passes alone (out of memory together):
    both go on, trained apart from then on, instead of a failed shared forward at every step."""

    class TooBigTogether(PackedTrainer):
        shared_calls = 0

        def _train_group(self, parts):
            if len(parts) > 1:
                TooBigTogether.shared_calls += 1
                raise RuntimeError("out of memory (injected): the group is too big together")
            return super()._train_group(parts)

    tmp = focus_runs["tmp"]
    trainer = TooBigTogether(str(micro_base), FP32, max_jobs=2, max_padding=1.0)
    events = train(
        trainer, [focus_plan(micro_base, focus_runs["data"]), *mate_plans(micro_base, tmp)[:1]], tmp / "apart"
    )
    assert events.states("focus") == ["running", "succeeded"] and events.states("m1") == [
        "running",
        "succeeded",
    ]
    assert TooBigTogether.shared_calls == 1 and trainer.apart == set()  # they left: forgotten
    ref = adapter(focus_runs["alone"].last("focus", "state")["adapter"])
    assert max_relative_diff(adapter(events.last("focus", "state")["adapter"]), ref) < TOLERANCE


def test_a_target_packed_training_cannot_hold_fails_that_job_not_silently(micro_base, tmp_path):
    """Packed LoRA wraps linear layers: a job that also targets the embedding was trained with
    that target left out (another adapter than it gets alone); it now fails, saying how to train."""
    data = write_chat(tmp_path / "d.jsonl", "d")
    trainer = PackedTrainer(str(micro_base), FP32)
    for targets in (["q_proj", "embed_tokens"], ["lm_head"]):
        plan = make_plan(micro_base, data, "d", lora={"target_modules": targets})
        with pytest.raises(
            ValueError, match=r"\['(embed_tokens|lm_head)'\] match no linear layer.*packing: false"
        ):
            trainer.targets(plan)
    assert trainer.targets(make_plan(micro_base, data, "d", lora={"target_modules": ["q_proj"]}))


def test_a_dataset_changed_since_validation_fails_its_packed_job(micro_base, tmp_path):
    """As in a run of its own: the job would train on data its lineage does not name."""
    data = write_chat(tmp_path / "d.jsonl", "d")
    plan = make_plan(micro_base, data, "d").model_copy(update={"dataset_sha256": "0" * 64})
    events = Events()
    assert PackedTrainer(str(micro_base), FP32).add(plan, tmp_path / "d", on_event=events) == "failed"
    assert "changed since the fleet was validated" in events.last("d", "state")["reason"]


def test_jobs_that_fit_a_memory_budget(micro_base, tmp_path):
    trainer = PackedTrainer(str(micro_base), FP32, max_jobs=8)
    plan = make_plan(micro_base, tmp_path / "unused.jsonl", "a", max_length=128)
    one = trainer.estimate_bytes(plan)
    for lora, bigger in (({"rank": 64}, True), ({"target_modules": ["q_proj"]}, False)):
        other = plan.model_copy(update={"job": plan.job.model_copy(update={"lora": LoraSpec(**lora)})})
        assert (trainer.estimate_bytes(other) > one) is bigger
    assert jobs_that_fit(10 * one, [one] * 16, max_jobs=8) == 8
    assert jobs_that_fit(3 * one + 1, [one] * 16, max_jobs=8) == 3


def test_data_order_is_the_jobs_own_and_epochs_count_like_transformers(micro_base, tmp_path):
    from lorafleet.train.packed_job import Sampler, planned_steps

    sampler = Sampler(10, batch_size=4, seed=3)
    first = sampler.next_window(2) + sampler.next_window(2)  # 3 batches: the window stops at the epoch end
    assert [len(b) for b in first] == [4, 4, 2] and sorted(i for b in first for i in b) == list(range(10))
    assert Sampler(10, 4, seed=3).next_window(1) == first[:1] != Sampler(10, 4, seed=4).next_window(1)
    plan = make_plan(
        micro_base, tmp_path / "unused.jsonl", "a", max_steps=None, epochs=2, gradient_accumulation=2
    )
    assert planned_steps(plan, n_rows=36) == 10  # 9 micro-batches an epoch: 4 windows of 2 and one of 1


def test_length_groups_cut_where_padding_would_grow():
    from lorafleet.train.packed import length_groups
    from lorafleet.train.packed_data import Row

    def part(name: str, length: int, rows: int = 4):
        return name, [Row([0] * length, [0] * length)] * rows

    parts = [part("long", 200), part("short", 10), part("short2", 12), part("mid", 60)]
    names = [[name for name, _ in group] for group in length_groups(parts, max_padding=0.25)]
    assert names == [["short", "short2"], ["mid"], ["long"]]
    assert len(length_groups(parts, max_padding=1.0)) == 1
    assert len(length_groups(parts, max_padding=0.0)) == 4
