"""The gathered multi-LoRA engine against peft, token for token (fp32 and NF4), and its slots."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

from lorafleet.bench.engine_bench import synthetic_base
from lorafleet.models import load_base, load_tokenizer
from lorafleet.serve.engine import (
    AdapterNotSupportedError,
    AdapterSlotsFullError,
    GatheredLoraEngine,
    GenerationRequest,
    PeftEngine,
    UnknownAdapterError,
)
from lorafleet.spec import QuantizationSpec

torch.set_num_threads(2)
PROMPTS = [
    [5, 17, 99, 3, 250, 42, 7],
    [300, 12, 12, 8],
    [77, 150, 201, 9, 33, 64, 128, 11, 4],
    [480, 2],
    [19, 23, 29, 31, 37, 41],
]  # token ids: the base is a random model
ATTN_MLP = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj"]
CONFIGS = {  # different ranks, targets, scalings; "d" is DoRA
    "a": {"r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj"]},
    "b": {"r": 8, "lora_alpha": 16, "target_modules": "all-linear", "use_rslora": True},
    "c": {
        "r": 16,
        "lora_alpha": 32,
        "target_modules": "all-linear",
        "rank_pattern": {"down_proj": 6},
        "alpha_pattern": {"o_proj": 48},
    },
    "d": {"r": 8, "lora_alpha": 16, "target_modules": ATTN_MLP, "use_dora": True},
}
MIX = ["a", "b", None, "c", "d", "b", "a", "d", None, "c"]


def make_lora(base: Path, out: Path, seed: int, **config) -> Path:
    """A random peft adapter; DoRA magnitudes perturbed so DoRA differs from plain LoRA."""
    torch.manual_seed(seed)
    model = get_peft_model(
        AutoModelForCausalLM.from_pretrained(base), LoraConfig(init_lora_weights=False, **config)
    )
    for name, p in model.named_parameters():
        if "lora_magnitude_vector" in name:
            p.data *= 1 + 0.3 * torch.randn_like(p)
    model.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    """A random 2-layer Llama (hidden 128) and a word-level tokenizer: pad 0, eos 1."""
    return synthetic_base(tmp_path_factory.mktemp("base"), hidden=128, layers=2, vocab=512)


@pytest.fixture(scope="module")
def tok(base):
    return load_tokenizer(base)


@pytest.fixture(scope="module")
def adapters(base, tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("adapters")
    return {
        name: make_lora(base, root / name, seed=i, **cfg) for i, (name, cfg) in enumerate(CONFIGS.items())
    }


def no_cpu_repacking(model) -> None:
    """bitsandbytes repacks NF4 weights for a bf16 CPU kernel on the first forward where the CPU
    has avx512_bf16, and peft's DoRA then dequantises that layout as garbage. Both sides of an
    NF4 comparison use the plain kernel, so the test means the same on any CPU; the engine's
    side of repacking is test_dora_norm_reads_the_weights_the_layer_applies."""
    for module in model.modules():
        if hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False


def mixed_requests(tok, names=MIX) -> list[GenerationRequest]:
    """Rows on different adapters and the base, with different lengths (rows finish apart)."""
    return [
        GenerationRequest(
            PROMPTS[i % len(PROMPTS)], name, max_new_tokens=6 + i % 7, stop_token_ids=[tok.eos_token_id]
        )
        for i, name in enumerate(names)
    ]


def peft_alone(base, adapters, quantization, tok, requests) -> list[list[int]]:
    """Each request alone through peft with its adapter set (or the adapters disabled)."""
    quant = QuantizationSpec(load_in_4bit=quantization == "nf4")
    model = PeftModel.from_pretrained(load_base(base, quant, "cpu"), adapters["a"], adapter_name="a")
    for name in sorted(set(adapters) - {"a"}):
        model.load_adapter(adapters[name], adapter_name=name)
    no_cpu_repacking(model)
    return [_peft_one(model, tok, r) for r in requests]


@torch.no_grad()
def _peft_one(model, tok, r: GenerationRequest) -> list[int]:
    ids = torch.tensor([r.prompt_ids])
    kwargs = {"input_ids": ids, "max_new_tokens": r.max_new_tokens, "do_sample": False}
    if r.adapter is None:
        with model.disable_adapter():
            gen = model.generate(**kwargs)
    else:
        model.set_adapter(r.adapter)
        gen = model.generate(**kwargs)
    new = gen[0, ids.shape[1] :].tolist()
    return new[: new.index(tok.eos_token_id)] if tok.eos_token_id in new else new


def engine_with(base, adapters, names, quantization="none", max_adapters=4) -> GatheredLoraEngine:
    engine = GatheredLoraEngine.from_pretrained(base, quantization=quantization, max_adapters=max_adapters)
    for name in names:
        engine.add_adapter(name, adapters[name])
    return engine


@pytest.mark.parametrize("quantization", ["none", "nf4"])
def test_mixed_batch_matches_peft_token_for_token(base, tok, adapters, quantization):
    engine = GatheredLoraEngine.from_pretrained(base, quantization=quantization, max_adapters=4)
    no_cpu_repacking(engine.model)
    for name in "abcd":
        engine.add_adapter(name, adapters[name])
    requests = mixed_requests(tok)
    results = engine.generate(requests)
    assert [r.token_ids for r in results] == peft_alone(base, adapters, quantization, tok, requests)
    by_adapter = {r.adapter: tuple(res.token_ids) for r, res in zip(requests[:5], results[:5], strict=True)}
    assert len(set(by_adapter.values())) == 5  # a, b, base, c, d really differ on this prompt mix
    assert all(r.finish_reason in ("stop", "length") for r in results)


def test_dora_served_in_the_mixed_batch_and_differs_from_its_lora_part(base, tok, adapters, tmp_path):
    plain = tmp_path / "d-as-lora"  # the same A and B without DoRA's magnitude
    plain.mkdir()
    config = json.loads((adapters["d"] / "adapter_config.json").read_text()) | {"use_dora": False}
    (plain / "adapter_config.json").write_text(json.dumps(config))
    tensors = load_file(adapters["d"] / "adapter_model.safetensors")
    save_file({k: v for k, v in tensors.items() if "magnitude" not in k}, plain / "adapter_model.safetensors")
    engine = engine_with(base, adapters, "d")
    engine.add_adapter("plain", plain)
    req = lambda a: GenerationRequest(PROMPTS[3], a, max_new_tokens=10)  # noqa: E731
    dora, lora = (r.token_ids for r in engine.generate([req("d"), req("plain")]))
    assert dora != lora


def test_dora_norm_reads_the_weights_the_layer_applies(base):
    from bitsandbytes.functional import dequantize_4bit

    from lorafleet.serve.gathered_lora import dense_weight

    layer = load_base(base, QuantizationSpec(), "cpu").model.layers[0].self_attn.q_proj
    w = dequantize_4bit(layer.weight.data, layer.weight.quant_state).float()  # (out, in)
    repacks, layer.support_avx512bf16_for_cpu = layer.support_avx512bf16_for_cpu, False
    assert torch.equal(dense_weight(layer, torch.float32), w)
    layer.support_avx512bf16_for_cpu = repacks
    layer(torch.randn(3, 128))  # where the CPU has avx512_bf16, bnb repacks the weight here
    assert torch.allclose(dense_weight(layer, torch.float32), w, atol=2e-3)  # its kernel rounds to bf16
    if layer.weight.quant_state.packing_format_for_cpu:  # what peft's DoRA would read now
        late = dequantize_4bit(layer.weight.data, layer.weight.quant_state).float()
        assert not torch.allclose(late, w, atol=1e-2)


def test_peft_engine_mixed_path_matches_gathered(base, tok, adapters):
    """The benchmark's reference: peft's adapter_names= path under the same decode loop."""
    names = [n for n in MIX if n != "d"]  # peft refuses DoRA in adapter_names batches
    requests = mixed_requests(tok, names)
    peft_engine = PeftEngine.from_pretrained(base, quantization="none", max_adapters=3)
    for name in "abc":
        peft_engine.add_adapter(name, adapters[name])
    expected = [r.token_ids for r in engine_with(base, adapters, "abc").generate(requests)]
    assert [r.token_ids for r in peft_engine.generate(requests)] == expected
    peft_engine.remove_adapter("a")
    assert peft_engine.adapters() == ["b", "c"]


def test_slots_add_remove_and_full(base, tok, adapters):
    engine = engine_with(base, adapters, "", max_adapters=2)
    req = lambda a: GenerationRequest(PROMPTS[0], a, max_new_tokens=8)  # noqa: E731
    base_tokens = engine.generate([req(None)])[0].token_ids
    engine.add_adapter("c", adapters["c"])  # rank 16 first: b's later rank 8 must not see its columns
    engine.add_adapter("b", adapters["b"])
    with pytest.raises(AdapterSlotsFullError):
        engine.add_adapter("a", adapters["a"])
    b_tokens = engine.generate([req("b")])[0].token_ids
    assert b_tokens != base_tokens
    engine.remove_adapter("b")
    engine.remove_adapter("b")  # a second eviction call is harmless
    assert engine.adapters() == ["c"] and engine.free == [2]
    with pytest.raises(UnknownAdapterError, match="'b' is not loaded"):
        engine.generate([req("b")])
    engine.add_adapter("a", adapters["a"])  # into b's freed slot: nothing of b may remain
    engine.remove_adapter("c")
    assert all(not layer.A[1].any() and not layer.B[1].any() for layer in engine.layers.values())
    engine.add_adapter("b", adapters["b"])  # into c's old slot
    assert engine.generate([req("b")])[0].token_ids == b_tokens
    assert engine.generate([req(None)])[0].token_ids == base_tokens


def test_refused_adapters_leave_slots_untouched(base, adapters, tmp_path):
    engine = engine_with(base, adapters, "", max_adapters=2)
    bias = make_lora(base, tmp_path / "bias", 0, r=4, target_modules=["q_proj"], lora_bias=True)
    with pytest.raises(AdapterNotSupportedError, match="a bias on lora_B"):
        engine.add_adapter("bias", bias)
    small = synthetic_base(tmp_path / "small", hidden=64, layers=2, vocab=512)
    other_base = make_lora(small, tmp_path / "micro", 0, r=4, target_modules=["q_proj"])
    with pytest.raises(AdapterNotSupportedError, match="another base"):
        engine.add_adapter("micro", other_base)
    assert engine.adapters() == [] and len(engine.free) == 2


def test_seeded_sampling_ignores_batch_mates_and_stream_matches(base, tok, adapters):
    engine = engine_with(base, adapters, "ab", max_adapters=3)
    row = GenerationRequest(PROMPTS[1], "a", max_new_tokens=10, temperature=0.9, top_p=0.9, seed=7)
    alone = engine.generate([row])[0].token_ids
    streamed: dict[int, list[int]] = {}
    mates = [
        GenerationRequest(p, n, max_new_tokens=3 + i, temperature=1.0, seed=i)
        for i, (p, n) in enumerate(zip(PROMPTS[2:], ["b", None, "a"], strict=True))
    ]
    results = engine.generate([*mates, row], on_token=lambda i, t: streamed.setdefault(i, []).append(t))
    assert results[-1].token_ids == alone
    assert all(streamed[i] == r.token_ids for i, r in enumerate(results))
    other_seed = GenerationRequest(row.prompt_ids, "a", max_new_tokens=10, temperature=0.9, top_p=0.9, seed=8)
    assert engine.generate([other_seed])[0].token_ids != alone


def test_stop_token_ends_one_row_and_its_batch_mates_go_on(base, tok, adapters):
    engine = engine_with(base, adapters, "ab")
    alone = [
        engine.generate([GenerationRequest(p, n, max_new_tokens=8)])[0].token_ids
        for p, n in ((PROMPTS[0], "a"), (PROMPTS[1], "b"))
    ]
    k = next(k for k in range(1, 8) if alone[0][k] not in alone[0][:k])  # its first new token stops it
    first, second = engine.generate(
        [
            GenerationRequest(PROMPTS[0], "a", 8, stop_token_ids=[alone[0][k]]),
            GenerationRequest(PROMPTS[1], "b", 8),
        ]
    )
    assert (first.token_ids, first.finish_reason) == (alone[0][:k], "stop")
    assert (second.token_ids, second.finish_reason) == (alone[1], "length")


def test_edge_requests(base, tok, adapters):
    engine = engine_with(base, adapters, "")
    ids = PROMPTS[0]
    out = engine.generate([GenerationRequest(ids, None, max_new_tokens=0), GenerationRequest(ids, None, 3)])
    assert out[0].token_ids == [] and len(out[1].token_ids) == 3 and out[1].finish_reason == "length"
    assert engine.generate([]) == []
    with pytest.raises(ValueError, match="empty prompt"):
        engine.generate([GenerationRequest([], None)])


def run_staggered(engine, plan: list[tuple[int, GenerationRequest]]) -> dict[int, list[int]]:
    """Continuous batching: request i joins the running batch after plan[i][0] decode steps."""
    streamed: dict[int, list[int]] = {}
    decoder = engine.decoder(lambda key, tok: streamed.setdefault(key, []).append(tok))
    finished, step = {}, 0
    waiting = sorted(enumerate(plan), key=lambda item: item[1][0])
    while waiting or decoder:
        joining = [(i, r) for i, (at, r) in waiting if at <= step]
        waiting = [(i, p) for i, p in waiting if p[0] > step]
        rows = decoder.admit(joining) + decoder.step()
        finished |= {row.key: row.result.token_ids for row in rows}
        step += 1
    assert streamed == {k: v for k, v in finished.items() if v}
    return finished


@pytest.mark.parametrize("names", [("a", "d", None, "b", "c"), ("b", "b", "b", "b", "b")])
def test_requests_joining_a_running_batch_get_the_tokens_they_get_alone(base, adapters, names):
    """Rows join between decode steps (KV caches left-padded and stacked) and leave when done
    (all-padding columns trimmed): each row's tokens, greedy or seeded, are those it gets alone."""
    engine = engine_with(base, adapters, "abcd", max_adapters=4)
    requests = [
        GenerationRequest(
            PROMPTS[i], name, max_new_tokens=4 + 3 * i, temperature=0.8 if i % 2 else 0.0, seed=i
        )
        for i, name in enumerate(names)
    ]
    alone = [engine.generate([r])[0].token_ids for r in requests]
    joins = [0, 2, 3, 9, 9]  # the first rows finish before the last join: trim, then pad again
    got = run_staggered(engine, list(zip(joins, requests, strict=True)))
    assert [got[i] for i in range(len(requests))] == alone


def test_a_bad_newcomer_leaves_the_running_batch_intact(base, adapters):
    engine = engine_with(base, adapters, "ab")
    good = GenerationRequest(PROMPTS[2], "a", max_new_tokens=6)
    alone = engine.generate([good])[0].token_ids
    decoder = engine.decoder()
    assert decoder.admit([("good", good)]) == []
    (bad,) = decoder.admit([("bad", GenerationRequest(PROMPTS[0], "zz"))])  # fails alone, no raise
    assert "'zz' is not loaded" in bad.error and bad.result.finish_reason == "error"
    assert isinstance(bad.exception, UnknownAdapterError)
    with pytest.raises(UnknownAdapterError, match="'zz' is not loaded"):
        engine.check(GenerationRequest(PROMPTS[0], "zz"))
    engine.check(GenerationRequest(PROMPTS[1], "b"))  # a passing check leaves the running rows' adapters
    finished = []
    while decoder:
        finished += decoder.step()
    assert [(row.key, row.result.token_ids) for row in finished] == [("good", alone)]


def test_dropped_rows_leave_and_their_mates_go_on(base, adapters):
    """A caller that leaves (a closed stream) has its row dropped between steps."""
    engine = engine_with(base, adapters, "ab")
    stay = GenerationRequest(PROMPTS[2], "a", max_new_tokens=8)
    alone = engine.generate([stay])[0].token_ids
    decoder = engine.decoder()
    decoder.admit([("leaves", GenerationRequest(PROMPTS[0], "b", max_new_tokens=50)), ("stays", stay)])
    decoder.step()
    assert [row.key for row in decoder.drop(lambda key: key == "leaves")] == ["leaves"]
    finished = []
    while decoder:
        finished += decoder.step()
    assert [(row.key, row.result.token_ids) for row in finished] == [("stays", alone)]
