"""Base models: resolve a name to a local folder, fingerprint it, load it (NF4 or full precision)."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

from lorafleet.errors import LorafleetError
from lorafleet.fastimport import import_bitsandbytes
from lorafleet.settings import cache_dir
from lorafleet.tinybase import TINY_BASE_NAME, tiny_base_path

FINGERPRINT_FILES = ("config.json",)
WEIGHT_SUFFIXES = (".safetensors", ".bin")


def resolve_base(name: str) -> Path:
    """'tiny-llama' (built offline and cached), a local HF folder, or a hub id (needs network)."""
    if name == TINY_BASE_NAME:
        return tiny_base_path()
    path = Path(name).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise LorafleetError(f"{path}: not a Hugging Face model folder (no config.json)")
        return path.resolve()
    if "/" in name and not name.startswith((".", "/")):
        return _download_from_hub(name)
    raise LorafleetError(
        f"base model '{name}' is neither '{TINY_BASE_NAME}', a local model folder, nor a hub id"
    )


def _download_from_hub(repo_id: str) -> Path:
    from huggingface_hub import snapshot_download

    try:
        return Path(
            snapshot_download(
                repo_id, allow_patterns=["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja"]
            )
        )
    except Exception as exc:  # offline, gated, or not found: all mean "give me a local folder"
        raise LorafleetError(
            f"cannot fetch base model '{repo_id}' from the hub ({type(exc).__name__}); "
            "download it where a network exists and pass the local folder instead"
        ) from exc


def weight_files(path: Path) -> list[Path]:
    return sorted(p for p in path.iterdir() if p.suffix in WEIGHT_SUFFIXES)


def _cache_file() -> Path:
    return cache_dir() / "fingerprints.json"


def fingerprint(path: str | Path) -> str:
    """sha256 over config.json and every weight file: identifies the exact base weights.

    Hashing gigabytes takes seconds, so the result is cached by (path, sizes, mtimes).
    """
    path = Path(path).resolve()
    files = [path / f for f in FINGERPRINT_FILES] + weight_files(path)
    key = json.dumps([[str(f), f.stat().st_size, f.stat().st_mtime_ns] for f in files])
    cache = _cache_file()
    known = json.loads(cache.read_text()) if cache.is_file() else {}
    if key in known:
        return known[key]
    digest = hashlib.sha256()
    for f in files:
        digest.update(f.name.encode())
        with open(f, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 22), b""):
                digest.update(chunk)
    value = "sha256:" + digest.hexdigest()
    known[key] = value
    cache.parent.mkdir(parents=True, exist_ok=True)
    tmp = cache.with_suffix(f".{os.getpid()}.tmp")
    tmp.write_text(json.dumps(known))
    tmp.replace(cache)
    return value


def compute_dtype(name: str, on_gpu: bool) -> Any:
    """'auto' = bf16 on a GPU, fp32 on a CPU (bf16 matmuls are 10-50x slower without avx512_bf16)."""
    import torch

    if name == "auto":
        return torch.bfloat16 if on_gpu else torch.float32
    return getattr(torch, name)


def quantization_config(quant: Any, dtype: Any) -> Any:
    """bitsandbytes config for a QuantizationSpec, or None for a full-precision base."""
    from transformers import BitsAndBytesConfig

    if not quant.load_in_4bit:
        return None
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=quant.quant_type,
        bnb_4bit_use_double_quant=quant.double_quant,
        bnb_4bit_compute_dtype=dtype,
        bnb_4bit_quant_storage=dtype,  # lets DeepSpeed/FSDP shard the 4-bit weights as this dtype
    )


def load_base(path: Path, quant: Any, device: str) -> Any:
    """The base causal LM, 4-bit or full precision, on `device` ('cpu' or 'cuda:N')."""
    import_bitsandbytes()  # before transformers' model classes, which import it through peft
    from transformers import AutoModelForCausalLM

    dtype = compute_dtype(quant.compute_dtype, device.startswith("cuda"))
    return AutoModelForCausalLM.from_pretrained(
        path,
        quantization_config=quantization_config(quant, dtype),
        dtype=dtype,
        device_map={"": device},
    )


# Where AutoTokenizer would load the generic fast tokenizer anyway (a Llama-type model whose
# tokenizer_config names the generic class, no custom code: the tiny base, Llama 3), it is loaded
# directly, without AutoTokenizer's read of the model config, whose class imports torch (about
# 4 s of every `lorafleet validate` / `submit` process, which need no torch). Any other model goes
# through AutoTokenizer, which maps some model types to their own classes.
GENERIC_TOKENIZERS = ("TokenizersBackend", "PreTrainedTokenizerFast")


def load_tokenizer(path: Path) -> Any:
    if _generic_tokenizer(Path(path)):
        from transformers import PreTrainedTokenizerFast as Tokenizer
    else:
        from transformers import AutoTokenizer as Tokenizer

    tok = Tokenizer.from_pretrained(path)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


def _generic_tokenizer(path: Path) -> bool:
    try:
        tokenizer = json.loads((path / "tokenizer_config.json").read_text())
        model = json.loads((path / "config.json").read_text())
    except (OSError, ValueError):
        return False  # AutoTokenizer reads them again and says what is wrong
    return (
        tokenizer.get("tokenizer_class") in GENERIC_TOKENIZERS
        and "auto_map" not in tokenizer
        and "auto_map" not in model
        and model.get("model_type") == "llama"
    )


def merge_adapter(base_path: Path, adapter_path: Path, out: Path) -> Path:
    """A standalone model: the adapter merged into the full-precision base (never the 4-bit
    weights, whose rounding would change the result), saved as safetensors."""
    import_bitsandbytes()
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(base_path, dtype=torch.float32)
    merged = PeftModel.from_pretrained(base, adapter_path).merge_and_unload()
    merged.save_pretrained(out, safe_serialization=True)
    load_tokenizer(base_path).save_pretrained(out)
    return out


def target_matches(module: str, target: str) -> bool:
    """peft's rule for a listed target module: the whole name, or its last dotted parts."""
    return module == target or module.endswith(f".{target}")


def matrix_modules(path: Path) -> dict[str, tuple[int, int]]:
    """The base's modules that hold a weight matrix (model.layers.0.self_attn.q_proj, ...) and
    its shape, read from its safetensors headers without loading a tensor or torch. Empty when
    the base has no safetensors files (nothing to check against)."""
    shapes: dict[str, tuple[int, int]] = {}
    for file in sorted(Path(path).glob("*.safetensors")):
        with open(file, "rb") as fh:
            header = json.loads(fh.read(int.from_bytes(fh.read(8), "little")))
        for key, info in header.items():
            if key.endswith(".weight") and len(info.get("shape", ())) == 2:
                shapes[key.removesuffix(".weight")] = tuple(info["shape"])
    return shapes


def context_length(path: Path) -> int | None:
    """The base's context in tokens (config.json max_position_embeddings), None if not stated."""
    return _config_count(path, "max_position_embeddings")


def vocab_size(path: Path) -> int | None:
    """The rows of the base's embedding (config.json vocab_size), None if not stated."""
    return _config_count(path, "vocab_size")


def _config_count(path: Path, key: str) -> int | None:
    """A positive whole number from config.json (a multimodal base keeps it in text_config)."""
    try:
        config = json.loads((Path(path) / "config.json").read_text())
    except (OSError, ValueError):
        return None
    value = config.get(key, (config.get("text_config") or {}).get(key))
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else None
