"""The QLoRA loop one Ray Train worker runs: NF4 base, peft LoRA, trl SFT, paged 8-bit AdamW.

`build_trainer` is shared by the Ray path (`train_loop_per_worker`) and the plain-process path
(`train_plain`, used by the overhead benchmark), so both train exactly the same way.
"""

from __future__ import annotations

import os
import tempfile
import time
from pathlib import Path
from typing import Any

import ray

from lorafleet.errors import BaseMismatchError
from lorafleet.fastimport import import_bitsandbytes
from lorafleet.spec import JobSpec, zero_stage
from lorafleet.train.plan import ADAPTER_FILES, JobPlan
from lorafleet.train.progress import InjectedFault, JobCancelled

import_bitsandbytes()  # first: transformers' trainer callbacks import peft, which imports it
from transformers import TrainerCallback  # noqa: E402


def lora_config(job: JobSpec) -> Any:
    from peft import LoraConfig

    lora = job.lora
    return LoraConfig(
        r=lora.rank,
        lora_alpha=lora.alpha,
        lora_dropout=lora.dropout,
        target_modules=lora.target_modules,
        use_dora=lora.use_dora,
        use_rslora=lora.use_rslora,
        task_type="CAUSAL_LM",
    )


def sft_config(
    job: JobSpec, output_dir: str, on_gpu: bool, has_eval: bool, deepspeed: dict[str, Any] | None = None
) -> Any:
    from trl import SFTConfig

    from lorafleet.models import compute_dtype

    t = job.training
    bf16 = str(compute_dtype(job.quantization.compute_dtype, on_gpu)) == "torch.bfloat16"
    return SFTConfig(
        output_dir=output_dir,
        max_steps=t.max_steps or -1,
        num_train_epochs=t.epochs,
        learning_rate=t.learning_rate,
        lr_scheduler_type=t.lr_scheduler,
        warmup_steps=t.warmup_ratio,
        per_device_train_batch_size=t.batch_size,
        per_device_eval_batch_size=t.batch_size,
        gradient_accumulation_steps=t.gradient_accumulation,
        max_length=t.max_length,
        optim=t.optimizer,
        seed=t.seed,
        data_seed=t.seed,
        gradient_checkpointing=t.gradient_checkpointing,
        gradient_checkpointing_kwargs={"use_reentrant": _reentrant_checkpointing(deepspeed)},
        save_strategy="steps",
        save_steps=t.save_steps,
        save_total_limit=2,
        eval_strategy="steps" if has_eval else "no",
        eval_steps=t.save_steps,
        logging_steps=t.logging_steps,
        report_to=[],
        use_cpu=not on_gpu,
        bf16=bf16,
        assistant_only_loss=False,
        dataset_num_proc=None,
        deepspeed=deepspeed,
        disable_tqdm=True,
    )


def _reentrant_checkpointing(deepspeed: dict[str, Any] | None) -> bool:
    """Non-reentrant is the default; trl forces reentrant checkpointing for PEFT under ZeRO-3 (and
    warns when told otherwise), so a ZeRO-3 job asks for it directly."""
    return deepspeed is not None and zero_stage(deepspeed) == 3


def _datasets(job: JobSpec, expected_sha256: str = "") -> tuple[Any, Any]:
    from lorafleet.data import job_splits

    t = job.training
    return job_splits(job.dataset, job.format, t.eval_fraction, t.seed, expected_sha256)


def check_base(path: Path, expected: str) -> None:
    from lorafleet.models import fingerprint

    actual = fingerprint(path)
    if actual != expected:
        raise BaseMismatchError(
            f"base model at {path} has fingerprint {actual}, but the fleet was validated against "
            f"{expected}; every node must see the same base weights"
        )


def build_trainer(plan: JobPlan, output_dir: str, device: str, callbacks: list[Any]) -> Any:
    """The trl SFTTrainer for one job, on `device`, with the base loaded NF4 (or full)."""
    from trl import SFTTrainer

    from lorafleet.models import load_base, load_tokenizer, resolve_base

    job = plan.job
    base_path = resolve_base(job.base_model)
    check_base(base_path, plan.base_fingerprint)
    tokenizer = load_tokenizer(base_path)
    if plan.deepspeed is not None and device == "cpu":
        _deepspeed_on_cpu()
    model = load_base(base_path, job.quantization, device)
    if device == "cpu":
        keep_4bit_layout(model)
    train_ds, eval_ds = _datasets(job, plan.dataset_sha256)
    args = sft_config(job, output_dir, device.startswith("cuda"), eval_ds is not None, plan.deepspeed)
    if "messages" in train_ds.column_names:
        # loss on assistant tokens only needs {% generation %} markers in the chat template
        args.assistant_only_loss = "{% generation %}" in (tokenizer.chat_template or "")
    trainer = SFTTrainer(
        model=model,
        args=args,
        train_dataset=train_ds,
        eval_dataset=eval_ds,
        processing_class=tokenizer,
        peft_config=lora_config(job),
        callbacks=callbacks,
    )
    if not args.bf16:
        _lora_to_fp32(trainer.model)
    if eval_ds is not None:
        trainer.add_callback(BaseEval(trainer))
    return trainer


class ProgressCallback(TrainerCallback):
    """Rank 0 reports steps and losses; every rank checks for cancellation each step."""

    def __init__(self, board: Any, customer: str, rank: int, fail_at_step: int | None = None):
        self.board, self.customer, self.rank = board, customer, rank
        self.fail_at_step = fail_at_step
        self.started = time.time()

    def on_train_begin(self, args, state, control, **kwargs):
        if self.rank == 0 and self.board is not None:
            # the node of rank 0 tells users (and tests) where the job ran; a restart after a lost
            # node begins a new attempt, usually elsewhere
            self.board.attempt_started.remote(
                self.customer,
                state="running",
                total_steps=state.max_steps,
                start_step=state.global_step,
                started=time.time(),
                node_id=ray.get_runtime_context().get_node_id(),
            )

    def on_train_end(self, args, state, control, **kwargs):
        if self.rank == 0 and self.board is not None:
            self.board.end_attempt.remote(self.customer, time.time())

    def on_step_end(self, args, state, control, **kwargs):
        if self.board is not None and ray.get(self.board.is_cancelled.remote(self.customer)):
            raise JobCancelled(f"job '{self.customer}' was cancelled at step {state.global_step}")
        if self.fail_at_step is not None and state.global_step == self.fail_at_step:
            raise InjectedFault(f"injected fault at step {state.global_step}")
        if self.rank == 0 and self.board is not None:
            self.board.update.remote(self.customer, step=state.global_step)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if self.rank == 0 and self.board is not None and logs:
            self.board.log.remote(self.customer, {"step": state.global_step, **logs})


class BaseEval(TrainerCallback):
    """The base model's loss on the job's eval split, logged as `base_eval_loss` before the first
    step: the yardstick an adapter must beat. peft starts every LoRA B matrix at zero, so the
    untrained peft model computes exactly the base's outputs. Evaluated at train begin (after
    DDP/DeepSpeed set the model up, as the periodic evals are), on every rank (the eval is a
    collective), and skipped on resume: the first attempt measured it, and its log history
    travels in the checkpoint."""

    def __init__(self, trainer: Any):
        self.trainer = trainer

    def on_train_begin(self, args, state, control, **kwargs):
        if state.global_step == 0:
            self.trainer.evaluate(metric_key_prefix="base_eval")


def _deepspeed_on_cpu() -> None:
    """Make DeepSpeed run a CPU job on the CPU, without building a C++ extension first.

    - DS_ACCELERATOR=cpu: on a node that has a GPU, DeepSpeed would pick CUDA for a CPU job. It is
      read when deepspeed is first imported; if something imported it already, set it directly.
      The CPU accelerator's collectives go through torch.distributed on the gloo group Ray Train
      made (oneccl is used only if oneccl_bindings_for_pytorch is installed).
    - DeepSpeed's TorchBackend JIT-builds its shared-memory comm op on a CPU (g++ and ninja on every
      worker; ~60 s on 2 cores the first time), yet only inference_all_reduce uses it: training
      goes through torch.distributed. Marked incompatible, the op is skipped.
    """
    os.environ["DS_ACCELERATOR"] = "cpu"
    import deepspeed.ops
    from deepspeed.accelerator import get_accelerator, set_accelerator
    from deepspeed.accelerator.cpu_accelerator import CPU_Accelerator

    if get_accelerator().device_name() != "cpu":
        set_accelerator(CPU_Accelerator())
    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False


def keep_4bit_layout(model: Any) -> None:
    """Training on a CPU: stop bitsandbytes repacking 4-bit weights for its AVX512-BF16 kernel.

    Found this stop: on a CPU with avx512_bf16, the base eval every job now runs before its first
    step (an eval forward) repacked the weights, and training went on through the repacked layout
    with wrong gradients: the demo's globex adapter reached eval loss 2.3 instead of 0.9 and
    answered gibberish, through trl and the packed trainer alike.

    ZeRO-3 on a CPU has a second reason:

    On a CPU with avx512_bf16, an eval forward of a Linear4bit replaces weight.data with a
    repacked uint8 layout. Under ZeRO-3 weight.data is DeepSpeed's gathered/partitioned buffer, so
    the repack is lost at the next partition while the quant state still says 'packed'; the
    checkpoint save then fails in bitsandbytes (`assert packed_weight.dtype == torch.uint8`).
    """
    import bitsandbytes as bnb

    for module in model.modules():
        if isinstance(module, bnb.nn.Linear4bit):
            module.support_avx512bf16_for_cpu = False


def _lora_to_fp32(model: Any) -> None:
    """trl casts QLoRA adapter weights to bf16; on a CPU without bf16 units that is 10-50x
    slower, so with fp32 compute the trainable weights go back to fp32 (before the optimizer
    is created, at train())."""
    import torch

    for param in model.parameters():
        if param.requires_grad and param.dtype != torch.float32:
            param.data = param.data.float()


def _resume_folder() -> str | None:
    import ray.train
    from ray.train.huggingface.transformers import RayTrainReportCallback

    ckpt = ray.train.get_checkpoint()
    if ckpt is None:
        return None
    # Ray hands the checkpoint over as a local copy; the HF checkpoint sits in its subfolder
    local = Path(tempfile.mkdtemp(prefix="lorafleet-resume-"))
    ckpt.to_directory(str(local))
    return str(local / RayTrainReportCallback.CHECKPOINT_NAME)


def train_loop_per_worker(config: dict[str, Any]) -> None:
    """Ray Train entry point: one worker of one job (several when data parallel)."""
    import ray
    import ray.train
    import torch
    from ray.train.huggingface.transformers import RayTrainReportCallback

    from lorafleet.train.progress import NAMESPACE

    plan = JobPlan.model_validate(config)
    ctx = ray.train.get_context()
    on_gpu = plan.job.resources.gpus_per_worker > 0 and torch.cuda.is_available()
    device = str(ray.train.torch.get_device()) if on_gpu else "cpu"
    torch.set_num_threads(max(1, int(plan.job.resources.cpus_per_worker)))
    board = ray.get_actor(plan.fleet_board, namespace=NAMESPACE) if plan.fleet_board else None
    progress = ProgressCallback(board, plan.job.customer, ctx.get_world_rank(), plan.fail_at_step)
    with tempfile.TemporaryDirectory(prefix="lorafleet-job-") as out:
        trainer = build_trainer(plan, out, device, [progress, RayTrainReportCallback()])
        resume = _resume_folder()
        if board is not None and ctx.get_world_rank() == 0:
            board.update.remote(plan.job.customer, resumed=resume is not None)
        trainer.train(resume_from_checkpoint=resume)


def train_plain(plan: JobPlan, output_dir: str) -> Path:
    """The same training in the calling process, no Ray: the benchmark's baseline."""
    import torch

    device = "cuda" if plan.job.resources.gpus_per_worker > 0 and torch.cuda.is_available() else "cpu"
    trainer = build_trainer(plan, output_dir, device, [])
    trainer.train()
    adapter = Path(output_dir) / "adapter"
    trainer.save_model(str(adapter))
    return adapter


def extract_adapter(hf_checkpoint: Path, dest: Path) -> Path:
    """Copy just the adapter (safetensors + config) out of a trainer checkpoint folder."""
    import shutil

    dest.mkdir(parents=True, exist_ok=True)
    for name in ADAPTER_FILES:
        src = hf_checkpoint / name
        if not src.is_file():
            raise FileNotFoundError(f"{hf_checkpoint} has no {name}; was the job a LoRA job?")
        shutil.copy2(src, dest / name)
    return dest


os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
