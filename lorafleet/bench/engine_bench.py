"""Engine-level throughput: one batch spread over N distinct adapters against the same batch on
one adapter and on the bare base, for the gathered engine and for peft's `adapter_names=` path
(`PeftEngine`: the same decode loop, so only the LoRA path differs).

    python -m lorafleet.bench.engine_bench --hidden 768 --layers 12     # ~100M synthetic base
    python -m lorafleet.bench.engine_bench --threads 1 --clock cpu      # on a shared CPU
"""

from __future__ import annotations

import argparse
import gc
import json
import random
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch


def synthetic_base(folder: Path, hidden: int, layers: int, vocab: int = 1024) -> Path:
    """A random Llama (saved bf16) and a word-level tokenizer: no other base needs building
    (the weights are random, so prompts are random ids; pad 0, eos 1)."""
    from tokenizers import Tokenizer, models
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    words = {"<pad>": 0, "<eos>": 1} | {f"t{i}": i for i in range(2, vocab)}
    tok = PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer(models.WordLevel(words, unk_token="<pad>")),
        pad_token="<pad>",
        eos_token="<eos>",
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(
        LlamaConfig(
            vocab_size=vocab,
            hidden_size=hidden,
            intermediate_size=hidden * 3,
            num_hidden_layers=layers,
            num_attention_heads=hidden // 64,
            num_key_value_heads=hidden // 64,
            max_position_embeddings=1024,
            pad_token_id=0,
            eos_token_id=1,
            bos_token_id=1,
        )
    )
    model.to(torch.bfloat16).save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


def _synthetic_base(folder: Path, hidden: int, layers: int) -> Path:
    """A random Llama with the tiny base's chat tokenizer (lorafleet.bench.gpu trains on it)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from lorafleet.models import load_tokenizer
    from lorafleet.tinybase import tiny_base_path

    tok = load_tokenizer(tiny_base_path())
    torch.manual_seed(0)
    model = LlamaForCausalLM(
        LlamaConfig(
            vocab_size=len(tok),
            hidden_size=hidden,
            intermediate_size=hidden * 3,
            num_hidden_layers=layers,
            num_attention_heads=hidden // 64,
            num_key_value_heads=hidden // 64,
            max_position_embeddings=512,
            pad_token_id=tok.pad_token_id,
            eos_token_id=tok.eos_token_id,
        )
    )
    model.to(torch.bfloat16).save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


def random_adapters(base: Path, root: Path, n: int, rank: int = 16) -> list[Path]:
    """n random all-linear adapters of one rank, from one loaded model (loading a 100M+ base per
    adapter dominated the run). One rank: a batch pays its largest rank, so "distinct vs one
    adapter" then measures the distinct adapters alone."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = get_peft_model(
        AutoModelForCausalLM.from_pretrained(base, dtype=torch.bfloat16),
        LoraConfig(r=rank, lora_alpha=2 * rank, target_modules="all-linear", init_lora_weights=False),
    )
    out = []
    for i in range(n):
        torch.manual_seed(i)
        for key, param in model.named_parameters():
            if "lora_" in key:
                param.data.normal_(0, 0.02)
        model.save_pretrained(root / f"a{i}")
        out.append(root / f"a{i}")
    return out


def _best_times(runs: dict[str, Callable[[], Any]], repeats: int, clock: str) -> dict[str, float]:
    """Best time of each run over `repeats` rounds, the runs interleaved within a round so that
    load from other processes falls on all of them alike; one warm-up call each first.
    clock 'cpu' = this process's CPU time: on a shared CPU, with one thread, it does not count
    the time other processes hold the cores (wall time there measures the neighbours)."""
    now = time.process_time if clock == "cpu" else time.perf_counter
    for fn in runs.values():
        fn()
    best = dict.fromkeys(runs, float("inf"))
    for _ in range(repeats):
        for name, fn in runs.items():
            start = now()
            fn()
            best[name] = min(best[name], now() - start)
    return best


def _runs(
    engine: Any, prompts: list[list[int]], new_tokens: int, n: int, prefix: str
) -> dict[str, Callable[[], Any]]:
    from lorafleet.serve.engine import GenerationRequest

    def run(names: list[str | None]) -> Callable[[], Any]:
        reqs = [
            GenerationRequest(p, a, max_new_tokens=new_tokens) for p, a in zip(prompts, names, strict=True)
        ]
        return lambda: engine.generate(reqs)

    rows = len(prompts)
    return {
        f"{prefix}base": run([None] * rows),
        f"{prefix}one_adapter": run(["a0"] * rows),
        f"{prefix}distinct": run([f"a{i % n}" for i in range(rows)]),
    }


def _load_engine(kind: str, base: Path, adapters: list[Path], quantization: str) -> Any:
    from lorafleet.serve.engine import GatheredLoraEngine, PeftEngine

    cls = GatheredLoraEngine if kind == "gathered" else PeftEngine
    engine = cls.from_pretrained(base, quantization=quantization, max_adapters=len(adapters))
    for i, folder in enumerate(adapters):
        engine.add_adapter(f"a{i}", folder)
    return engine


def _no_bank_cache(engine: Any, run: Callable[[], Any]) -> Callable[[], Any]:
    """The same run gathering the slot banks at every step instead of once per batch."""

    def fn() -> Any:
        keep, engine.bank_cache_bytes = engine.bank_cache_bytes, 0
        try:
            return run()
        finally:
            engine.bank_cache_bytes = keep

    return fn


def _measure(
    base: Path,
    adapters: list[Path],
    prompts: list[list[int]],
    new_tokens: int,
    quantization: str,
    repeats: int,
    with_peft: bool,
    compare_bank_cache: bool,
    clock: str,
) -> dict[str, float]:
    gathered = _load_engine("gathered", base, adapters, quantization)
    runs = _runs(gathered, prompts, new_tokens, len(adapters), "")
    if compare_bank_cache:
        runs["distinct_no_bank_cache"] = _no_bank_cache(gathered, runs["distinct"])
    if with_peft:
        peft = _load_engine("peft", base, adapters, quantization)
        runs |= _runs(peft, prompts, new_tokens, len(adapters), "peft_")
    tokens = len(prompts) * new_tokens
    out = {f"{name}_tok_s": round(tokens / t, 1) for name, t in _best_times(runs, repeats, clock).items()}
    del gathered, runs
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return out


def run_engine_bench(
    base_path: Path | None = None,
    n_adapters: int = 16,
    batch_size: int = 16,
    new_tokens: int = 32,
    hidden: int = 256,
    layers: int = 4,
    quantization: str = "none",
    with_peft: bool = True,
    repeats: int = 3,
    compare_bank_cache: bool = False,
    rank: int = 16,
    clock: str = "wall",
) -> dict[str, Any]:
    """Tokens/s for base only, one adapter, n_adapters distinct (gathered and peft); JSON-able."""
    with tempfile.TemporaryDirectory() as tmp:
        base = Path(base_path) if base_path else synthetic_base(Path(tmp) / "base", hidden, layers)
        adapters = random_adapters(base, Path(tmp), n_adapters, rank)
        rng = random.Random(0)
        vocab = json.loads((base / "config.json").read_text())["vocab_size"]
        prompts = [[rng.randrange(2, vocab) for _ in range(rng.randint(16, 32))] for _ in range(batch_size)]
        out = _header(base, base_path, n_adapters, batch_size, new_tokens, quantization)
        out |= {"rank": rank, "clock": clock}
        out |= _measure(
            base, adapters, prompts, new_tokens, quantization, repeats, with_peft, compare_bank_cache, clock
        )
    return out | _ratios(out)


def _header(
    base: Path, base_path: Path | None, n: int, batch: int, new_tokens: int, quantization: str
) -> dict[str, Any]:
    cfg = json.loads((base / "config.json").read_text())
    name = str(base_path) if base_path else f"synthetic h{cfg['hidden_size']} x{cfg['num_hidden_layers']}"
    return {
        "base": name,
        "parameters": _params(cfg),
        "adapters": n,
        "batch": batch,
        "new_tokens": new_tokens,
        "quantization": quantization,
        "threads": torch.get_num_threads(),
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
    }


def _ratios(out: dict[str, Any]) -> dict[str, float]:
    r = {
        "distinct_vs_one_adapter": out["distinct_tok_s"] / out["one_adapter_tok_s"],
        "one_adapter_vs_base": out["one_adapter_tok_s"] / out["base_tok_s"],
        "distinct_vs_base": out["distinct_tok_s"] / out["base_tok_s"],
    }
    if "peft_distinct_tok_s" in out:
        r["peft_distinct_vs_one"] = out["peft_distinct_tok_s"] / out["peft_one_adapter_tok_s"]
        r["gathered_distinct_vs_peft_distinct"] = out["distinct_tok_s"] / out["peft_distinct_tok_s"]
    return {k: round(v, 3) for k, v in r.items()}


def _params(cfg: dict) -> int:
    h, i, n, v = cfg["hidden_size"], cfg["intermediate_size"], cfg["num_hidden_layers"], cfg["vocab_size"]
    return n * (4 * h * h + 3 * h * i) + v * h * (1 if cfg.get("tie_word_embeddings") else 2)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--base", type=Path, default=None)
    p.add_argument("--adapters", type=int, default=16)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--quantization", choices=["none", "nf4"], default="none")
    p.add_argument("--no-peft", action="store_true")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--compare-bank-cache", action="store_true")
    p.add_argument("--rank", type=int, default=16)
    p.add_argument(
        "--clock",
        choices=["wall", "cpu"],
        default="wall",
        help="cpu: process CPU time, for a shared CPU (use --threads 1)",
    )
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    out = run_engine_bench(
        a.base,
        a.adapters,
        a.batch,
        a.new_tokens,
        a.hidden,
        a.layers,
        a.quantization,
        not a.no_peft,
        a.repeats,
        a.compare_bank_cache,
        a.rank,
        a.clock,
    )
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
