"""Engine-level throughput: one batch spread over N distinct adapters against the same batch on
one adapter and on the bare base, for the gathered engine and for peft's `adapter_names=` path."""

from __future__ import annotations

import tempfile
import time
from pathlib import Path
from typing import Any

import torch


def _synthetic_base(folder: Path, hidden: int, layers: int) -> Path:
    from transformers import LlamaConfig, LlamaForCausalLM

    from lorafleet.models import load_tokenizer
    from lorafleet.tinybase import tiny_base_path

    tok = load_tokenizer(tiny_base_path())  # any tokenizer will do: weights are random
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(
        vocab_size=len(tok), hidden_size=hidden, intermediate_size=hidden * 3, num_hidden_layers=layers,
        num_attention_heads=hidden // 64, num_key_value_heads=hidden // 64, max_position_embeddings=512,
        pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id))
    model.to(torch.bfloat16).save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


def _adapters(base: Path, folder: Path, n: int) -> list[Path]:
    """n random all-linear adapters, ranks 8 and 16 alternating, from one loaded model."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    def config(r: int) -> LoraConfig:
        return LoraConfig(r=r, lora_alpha=2 * r, target_modules="all-linear", init_lora_weights=False)

    model = get_peft_model(AutoModelForCausalLM.from_pretrained(base, dtype=torch.bfloat16), config(8),
                           adapter_name="r8")
    model.add_adapter("r16", config(16))
    out = []
    for i in range(n):
        name = ("r8", "r16")[i % 2]
        torch.manual_seed(i)
        for key, param in model.named_parameters():
            if "lora_" in key and f".{name}." in key:
                param.data.normal_(0, 0.02)
        model.save_pretrained(folder / f"a{i}", selected_adapters=[name])
        out.append(folder / f"a{i}" / name)  # peft nests a non-default adapter by its name
    return out


def _timed(fn) -> float:
    fn()  # warm-up: first calls allocate caches
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def _gathered(base: Path, adapters: list[Path], prompts: list[list[int]], new_tokens: int,
              quantization: str) -> dict[str, float]:
    from lorafleet.serve.engine import GatheredLoraEngine, GenerationRequest

    engine = GatheredLoraEngine.from_pretrained(base, quantization=quantization, max_adapters=len(adapters),
                                                max_rank=16)
    for i, folder in enumerate(adapters):
        engine.add_adapter(f"a{i}", folder)

    def run(names: list[str | None]) -> None:
        engine.generate([GenerationRequest(p, n, max_new_tokens=new_tokens)
                         for p, n in zip(prompts, names, strict=True)])

    n, tokens = len(adapters), len(prompts) * new_tokens
    return {
        "base_tok_s": tokens / _timed(lambda: run([None] * len(prompts))),
        "one_adapter_tok_s": tokens / _timed(lambda: run(["a0"] * len(prompts))),
        "distinct_tok_s": tokens / _timed(lambda: run([f"a{i % n}" for i in range(len(prompts))])),
    }


def _peft(base: Path, adapters: list[Path], prompts: list[list[int]], new_tokens: int,
          quantization: str) -> dict[str, float]:
    from peft import PeftModel

    from lorafleet.models import load_base
    from lorafleet.spec import QuantizationSpec

    model = PeftModel.from_pretrained(load_base(base, QuantizationSpec(load_in_4bit=quantization == "nf4"),
                                                "cpu" if not torch.cuda.is_available() else "cuda:0"),
                                      adapters[0], adapter_name="a0")
    for i, folder in enumerate(adapters[1:], 1):
        model.load_adapter(folder, adapter_name=f"a{i}")
    width = max(map(len, prompts))
    ids = torch.tensor([[0] * (width - len(p)) + p for p in prompts], device=model.device)
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=model.device)

    def run(names: list[str]) -> None:
        with torch.no_grad():
            model.generate(input_ids=ids, attention_mask=mask, adapter_names=names, do_sample=False,
                           max_new_tokens=new_tokens, min_new_tokens=new_tokens)

    n, tokens = len(adapters), len(prompts) * new_tokens
    return {"peft_one_adapter_tok_s": tokens / _timed(lambda: run(["a0"] * len(prompts))),
            "peft_distinct_tok_s": tokens / _timed(lambda: run([f"a{i % n}" for i in range(len(prompts))]))}


def run_engine_bench(base_path: Path | None = None, n_adapters: int = 16, batch_size: int = 16,
                     new_tokens: int = 32, hidden: int = 256, layers: int = 4,
                     quantization: str = "none", with_peft: bool = True) -> dict[str, Any]:
    from lorafleet.models import load_tokenizer

    with tempfile.TemporaryDirectory() as tmp:
        base = Path(base_path) if base_path else _synthetic_base(Path(tmp) / "base", hidden, layers)
        adapters = _adapters(base, Path(tmp), n_adapters)
        tok = load_tokenizer(base)
        prompts = [tok(f"request {i}: tell me about the weather")["input_ids"] for i in range(batch_size)]
        out: dict[str, Any] = {"base": str(base_path or f"synthetic h{hidden} x{layers}"),
                               "parameters": _params(base), "adapters": n_adapters,
                               "batch": batch_size, "new_tokens": new_tokens, "quantization": quantization}
        out |= _gathered(base, adapters, prompts, new_tokens, quantization)
        if with_peft:
            out |= _peft(base, adapters, prompts, new_tokens, quantization)
    out["distinct_vs_one_adapter"] = out["distinct_tok_s"] / out["one_adapter_tok_s"]
    out["one_adapter_vs_base"] = out["one_adapter_tok_s"] / out["base_tok_s"]
    if with_peft:
        out["peft_distinct_vs_one"] = out["peft_distinct_tok_s"] / out["peft_one_adapter_tok_s"]
        out["gathered_distinct_vs_peft_distinct"] = out["distinct_tok_s"] / out["peft_distinct_tok_s"]
    return out


def _params(base: Path) -> int:
    import json

    cfg = json.loads((base / "config.json").read_text())
    h, i, n, v = cfg["hidden_size"], cfg["intermediate_size"], cfg["num_hidden_layers"], cfg["vocab_size"]
    return n * (4 * h * h + 3 * h * i) + v * h * (1 if cfg.get("tie_word_embeddings") else 2)
