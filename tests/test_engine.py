"""The gathered multi-LoRA engine against peft, token for token."""

from __future__ import annotations

import json

import pytest
import torch
from peft import PeftModel

from lorafleet.bench.synthetic import make_adapter
from lorafleet.models import load_base, load_tokenizer
from lorafleet.serve.engine import (
    AdapterNotSupportedError,
    AdapterSlotsFullError,
    GatheredLoraEngine,
    GenerationRequest,
)
from lorafleet.spec import QuantizationSpec
from lorafleet.tinybase import tiny_base_path

PROMPTS = ["Tell me about the weather.", "How much is the red lamp?", "Where is my order?",
           "Can you describe a map?", "What do you know about tea?"]
SHAPES = {"a": (4, ["q_proj", "v_proj"]), "b": (8, "all-linear"), "c": (16, ["o_proj", "down_proj"])}


@pytest.fixture(scope="module")
def base():
    return tiny_base_path()


@pytest.fixture(scope="module")
def adapters(base, tmp_path_factory):
    root = tmp_path_factory.mktemp("adapters")
    return {name: make_adapter(base, root / name, seed=i, rank=r, targets=t)
            for i, (name, (r, t)) in enumerate(SHAPES.items())}


def prompt_ids(tok, text: str) -> list[int]:
    return tok.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True,
                                   tokenize=True, return_dict=False)


def peft_reference(base, adapters, quant, tok, jobs) -> list[list[int]]:
    """Each prompt alone through peft with its adapter set (or the adapters disabled)."""
    model = PeftModel.from_pretrained(load_base(base, quant, "cpu"), adapters["a"], adapter_name="a")
    for name in ("b", "c"):
        model.load_adapter(adapters[name], adapter_name=name)
    out = []
    for adapter, text in jobs:
        ids = torch.tensor([prompt_ids(tok, text)])
        with torch.no_grad():
            if adapter is None:
                with model.disable_adapter():
                    gen = model.generate(input_ids=ids, max_new_tokens=12, do_sample=False)
            else:
                model.set_adapter(adapter)
                gen = model.generate(input_ids=ids, max_new_tokens=12, do_sample=False)
        new = gen[0, ids.shape[1]:].tolist()
        out.append(new[: new.index(tok.eos_token_id)] if tok.eos_token_id in new else new)
    return out


@pytest.mark.parametrize("quantization", ["none", "nf4"])
def test_mixed_batch_matches_peft_token_for_token(base, adapters, quantization):
    tok = load_tokenizer(base)
    engine = GatheredLoraEngine.from_pretrained(base, quantization=quantization, max_adapters=4)
    for name, folder in adapters.items():
        engine.add_adapter(name, folder)
    jobs = [(["a", "b", None, "c", "b", "a"][i % 6], PROMPTS[i % len(PROMPTS)]) for i in range(9)]
    results = engine.generate([GenerationRequest(prompt_ids(tok, t), a, max_new_tokens=12,
                                                 stop_token_ids=[tok.eos_token_id]) for a, t in jobs])
    quant = QuantizationSpec(load_in_4bit=quantization == "nf4")
    assert [r.token_ids for r in results] == peft_reference(base, adapters, quant, tok, jobs)
    assert len({tuple(r.token_ids) for r in results[:3]}) == 3  # the adapters do differ


def test_slots_add_remove_and_full(base, adapters):
    tok = load_tokenizer(base)
    engine = GatheredLoraEngine.from_pretrained(base, quantization="none", max_adapters=2)
    req = lambda a: GenerationRequest(prompt_ids(tok, PROMPTS[0]), a, max_new_tokens=8)  # noqa: E731
    base_tokens = engine.generate([req(None)])[0].token_ids
    engine.add_adapter("b", adapters["b"])
    engine.add_adapter("c", adapters["c"])
    with pytest.raises(AdapterSlotsFullError):
        engine.add_adapter("a", adapters["a"])
    b_tokens = engine.generate([req("b")])[0].token_ids
    assert b_tokens != base_tokens
    engine.remove_adapter("b")
    assert engine.adapters() == ["c"]
    with pytest.raises(KeyError, match="'b' is not loaded"):
        engine.generate([req("b")])
    engine.add_adapter("a", adapters["a"])  # into b's freed slot: nothing of b may remain
    engine.remove_adapter("c")
    engine.add_adapter("b", adapters["b"])  # into c's old slot
    assert engine.generate([req("b")])[0].token_ids == b_tokens
    assert engine.generate([req(None)])[0].token_ids == base_tokens


def test_seeded_sampling_ignores_batch_mates_and_stream_matches(base, adapters):
    tok = load_tokenizer(base)
    engine = GatheredLoraEngine.from_pretrained(base, quantization="none", max_adapters=3)
    for name in ("a", "b"):
        engine.add_adapter(name, adapters[name])
    row = GenerationRequest(prompt_ids(tok, PROMPTS[1]), "a", max_new_tokens=10, temperature=0.9,
                            top_p=0.9, seed=7)
    alone = engine.generate([row])[0].token_ids
    streamed: dict[int, list[int]] = {}
    mates = [GenerationRequest(prompt_ids(tok, p), "b", max_new_tokens=10, temperature=1.0, seed=i)
             for i, p in enumerate(PROMPTS[2:])]
    results = engine.generate([*mates, row], on_token=lambda i, t: streamed.setdefault(i, []).append(t))
    assert results[-1].token_ids == alone
    assert all(streamed[i] == r.token_ids for i, r in enumerate(results))


def test_dora_is_refused_with_a_way_out(base, tmp_path):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = get_peft_model(AutoModelForCausalLM.from_pretrained(base),
                           LoraConfig(r=4, target_modules=["q_proj"], use_dora=True))
    model.save_pretrained(tmp_path / "dora")
    assert json.loads((tmp_path / "dora" / "adapter_config.json").read_text())["use_dora"]
    engine = GatheredLoraEngine.from_pretrained(base, quantization="none", max_adapters=2)
    with pytest.raises(AdapterNotSupportedError, match="DoRA .* `lorafleet adapters merge`"):
        engine.add_adapter("d", tmp_path / "dora")
