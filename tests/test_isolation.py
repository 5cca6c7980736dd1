"""A batch is shared, a request is alone: whatever one row carries (any parameter value, an
unknown or NaN-producing adapter, a fault at bind, prefill, forward, sampling or its callback, a
hang-up), every other row gets the tokens it gets alone, and the adapter binding always equals
the running rows' adapters. Plus malformed adapter folders, stop strings, penalties, logit_bias."""

from __future__ import annotations

import json
import random
from collections import Counter
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoConfig, AutoModelForCausalLM

from lorafleet.bench.engine_bench import synthetic_base
from lorafleet.models import load_tokenizer
from lorafleet.serve import sampling
from lorafleet.serve.decoder import Decoder
from lorafleet.serve.engine import AdapterInvalidError, GatheredLoraEngine, GenerationRequest
from lorafleet.serve.text import first_stop, stop_holdback

torch.set_num_threads(2)
VOCAB = 256
NAN, INF = float("nan"), float("inf")


# ---- builders ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    return synthetic_base(tmp_path_factory.mktemp("iso-base"), hidden=64, layers=2, vocab=VOCAB)


def random_model(base: Path):
    """The base's architecture with initializer_range 0.3: random weights at the default init
    give near-tied logits, and then a batch's rounding can flip a greedy token."""
    config = AutoConfig.from_pretrained(base)
    config.initializer_range = 0.3
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config).float()


def write_adapter(
    folder: Path, engine: GatheredLoraEngine, r: int = 4, seed: int = 0, targets: tuple = (), **config
) -> Path:
    """A random peft-format LoRA folder for the engine's wrapped layers (all, or those ending
    with one of targets): the files peft writes, without loading a model to write them."""
    gen = torch.Generator().manual_seed(seed)
    tensors = {}
    for name, layer in engine.layers.items():
        if targets and not name.endswith(targets):
            continue
        key = f"base_model.model.{name}"
        tensors[f"{key}.lora_A.weight"] = 0.3 * torch.randn(r, layer.base.in_features, generator=gen)
        tensors[f"{key}.lora_B.weight"] = 0.3 * torch.randn(layer.base.out_features, r, generator=gen)
    folder.mkdir(parents=True, exist_ok=True)
    save_file(tensors, folder / "adapter_model.safetensors")
    cfg = {"peft_type": "LORA", "r": r, "lora_alpha": 2 * r, "target_modules": list(targets) or "all-linear"}
    (folder / "adapter_config.json").write_text(json.dumps(cfg | config))
    return folder


class FaultyEngine(GatheredLoraEngine):
    """Faults on demand: for a marked request (marks[id(request)] = 'bind' | 'forward' | 'step' |
    'sample' | 'nan'), or at the n-th call of a hook (fail_at['bind' | 'forward'] = n)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.marks: dict[int, str] = {}
        self.fail_at: dict[str, int] = {}
        self.calls: Counter[str] = Counter()
        self.bound: list[GenerationRequest] = []

    def _fault(self, hook: str, requests: list[GenerationRequest]) -> None:
        self.calls[hook] += 1
        if self.calls[hook] == self.fail_at.get(hook) or any(self.marks.get(id(r)) == hook for r in requests):
            raise RuntimeError(f"injected {hook} fault")

    def _bind(self, requests):
        self._fault("bind", requests)
        super()._bind(requests)
        self.bound = list(requests)

    def _unbind(self):
        super()._unbind()
        self.bound = []

    def _forward(self, ids, batch):
        self._fault("forward", self.bound)
        if ids.shape[1] == 1 and any(self.marks.get(id(r)) == "step" for r in self.bound):
            raise RuntimeError("injected step fault")  # only at decode steps (prompts are >= 2 long)
        logits = super()._forward(ids, batch)  # (B, V)
        for k, r in enumerate(self.bound):
            if self.marks.get(id(r)) == "nan" and ids.shape[1] == 1:  # a decode step: NaN mid-run
                logits[k] = NAN
        return logits

    def decoder(self, on_token=None):
        return FaultyDecoder(self, on_token)


class FaultyDecoder(Decoder):
    def _next_token(self, row, logits, greedy):
        if self.engine.marks.get(id(row.request)) == "sample":
            raise RuntimeError("injected sampler fault")
        return super()._next_token(row, logits, greedy)


@pytest.fixture(scope="module")
def engine(base, tmp_path_factory) -> FaultyEngine:
    """Adapters a (rank 4, q and v), b (rank 8, every linear) and n (loaded, then NaN written
    into its slot: an adapter that produces NaN)."""
    eng = FaultyEngine(random_model(base), load_tokenizer(base), max_adapters=4)
    root = tmp_path_factory.mktemp("iso-adapters")
    eng.add_adapter("a", write_adapter(root / "a", eng, r=4, seed=1, targets=("q_proj", "v_proj")))
    eng.add_adapter("b", write_adapter(root / "b", eng, r=8, seed=2))
    eng.add_adapter("n", write_adapter(root / "n", eng, r=4, seed=3))
    layer = next(iter(eng.layers.values()))
    layer.B[eng.slots["n"], 0, 0] = NAN
    return eng


@pytest.fixture(autouse=True)
def no_faults(request):
    if "engine" in request.fixturenames:
        eng = request.getfixturevalue("engine")
        eng.marks, eng.fail_at = {}, {}
    yield


def bound_slots(engine: GatheredLoraEngine) -> list[int] | None:
    return None if engine.rows.idx is None else engine.rows.idx.tolist()


def expected_slots(engine: GatheredLoraEngine, decoder: Decoder) -> list[int] | None:
    slots = [engine.slots[row.request.adapter] if row.request.adapter else 0 for row in decoder.rows]
    return slots if any(slots) else None


def solo(engine, request: GenerationRequest):
    """The request alone through the same engine (no chosen-call faults)."""
    saved, engine.fail_at = engine.fail_at, {}
    try:
        return engine.generate([request], raise_errors=False)[0]
    finally:
        engine.fail_at = saved


def drive(engine, plan: list[dict], fail_keys: frozenset = frozenset()) -> tuple[dict, dict, set]:
    """The replica's loop on one decoder: drop hung-up callers, step, admit the newcomers of this
    step. plan[i] = {"request", "join" (step), "hangup" (step or None)}. After every call the
    binding must equal the running rows' adapters. Returns (rows by key, streamed, dropped)."""
    streamed: dict[int, list[int]] = {}

    def on_token(key, tok):
        if key in fail_keys:
            raise RuntimeError("injected callback fault")
        streamed.setdefault(key, []).append(tok)

    decoder = engine.decoder(on_token)
    out, dropped, step = {}, set(), 0

    def record(rows) -> None:
        for row in rows:
            assert row.key not in out
            out[row.key] = row
        assert bound_slots(engine) == expected_slots(engine, decoder)

    while step <= max(p["join"] for p in plan) or decoder:
        hung = {i for i, p in enumerate(plan) if p.get("hangup") == step}
        dropped |= {row.key for row in decoder.drop(lambda key: key in hung)}  # noqa: B023
        record([])
        record(decoder.step())
        record(decoder.admit([(i, p["request"]) for i, p in enumerate(plan) if p["join"] == step]))
        step += 1
    return out, streamed, dropped


# ---- the invariant ------------------------------------------------------------------------------


HOSTILE = [  # (request changes, or a fault mark; whether the row fails)
    ({"temperature": 1e-45}, False),  # below the floor: greedy, never NaN
    ({"temperature": 1e30, "seed": 3}, False),
    ({"temperature": NAN}, True),
    ({"temperature": INF}, True),
    ({"temperature": -1.0}, True),
    ({"temperature": 0.8, "seed": 2**64 + 5}, False),
    ({"temperature": 0.8, "seed": -(2**70)}, False),
    ({"temperature": 0.8, "top_p": 0.0}, True),
    ({"temperature": 0.8, "seed": 1, "top_p": 1e-300}, False),
    ({"top_p": NAN}, True),
    ({"logit_bias": {7: 100.0}}, False),
    ({"logit_bias": {7: 1e30}}, True),
    ({"logit_bias": {VOCAB + 5: 1.0}}, True),
    ({"logit_bias": {-1: 1.0}}, True),
    ({"frequency_penalty": 2.0, "presence_penalty": -2.0, "temperature": 0.9, "seed": 4}, False),
    ({"presence_penalty": NAN}, True),
    ({"adapter": "zz"}, True),
    ({"adapter": "n"}, True),  # NaN logits at its prefill
    ({"prompt_ids": []}, True),
    ({"prompt_ids": [3, VOCAB + 1]}, True),
    ({"stop": [""]}, True),
    ({"max_new_tokens": 0}, False),
    ({"stop": ["t1"], "temperature": 0.9, "seed": 9}, False),
    ("bind", True),
    ("forward", True),  # its prefill raises
    ("step", True),  # its decode steps raise: the running batch's forward fails
    ("sample", True),
    ("nan", True),  # NaN logits at a decode step
    ("callback", True),
]


def good_request(rng: random.Random) -> GenerationRequest:
    sampled = rng.random() < 0.5
    return GenerationRequest(
        [rng.randrange(2, VOCAB) for _ in range(rng.randint(2, 9))],
        rng.choice([None, "a", "b"]),
        max_new_tokens=rng.randint(3, 10),
        temperature=0.7 if sampled else 0.0,
        top_p=rng.choice([1.0, 0.9]),
        seed=rng.randrange(10**6) if sampled else None,
        stop_token_ids=[1],
        stop=[f"t{rng.randrange(2, 40)}"] if rng.random() < 0.3 else [],
    )


def hostile_request(rng: random.Random, engine, case) -> tuple[GenerationRequest, str | None]:
    change, _ = case
    r = GenerationRequest(
        [rng.randrange(2, VOCAB) for _ in range(rng.randint(2, 9))],
        rng.choice([None, "a", "b"]),
        max_new_tokens=rng.randint(3, 10),
    )
    if isinstance(change, str):
        if change != "callback":
            engine.marks[id(r)] = change
        return r, change
    for key, value in change.items():
        setattr(r, key, value)
    return r, None


def build_plan(rng: random.Random, engine) -> tuple[list[dict], list[bool | None], frozenset]:
    """Good rows beside hostile ones, joining at different steps; a few good callers hang up.
    fails[i]: True = must fail, False = must equal its solo run, None = hangs up."""
    plan, fails, callback_faults = [], [], set()
    for case in rng.sample(HOSTILE, 12):
        request, mark = hostile_request(rng, engine, case)
        if mark == "callback":
            callback_faults.add(len(plan))
        plan.append({"request": request, "join": rng.randint(0, 6)})
        fails.append(case[1])
    for _ in range(10):
        hangup = rng.random() < 0.15
        plan.append({"request": good_request(rng), "join": rng.randint(0, 6)})
        plan[-1]["hangup"] = plan[-1]["join"] + 1 if hangup else None
        fails.append(None if hangup else False)
    order = list(range(len(plan)))
    rng.shuffle(order)
    keys = {old: new for new, old in enumerate(order)}
    return [plan[k] for k in order], [fails[k] for k in order], frozenset(keys[k] for k in callback_faults)


@pytest.mark.parametrize("seed", range(4))
def test_every_good_row_gets_its_solo_tokens_whatever_its_batch_mates_do(engine, seed):
    rng = random.Random(seed)
    plan, fails, callback_faults = build_plan(rng, engine)
    out, streamed, dropped = drive(engine, plan, callback_faults)
    for i, (p, fail) in enumerate(zip(plan, fails, strict=True)):
        if fail is None:  # hung up: dropped, or finished before its hang-up
            assert i in dropped or out[i].error is None
            continue
        row = out[i]
        if fail:
            assert row.error and row.result.finish_reason == "error", (i, p["request"], row.result)
            continue
        alone = solo(engine, p["request"])
        assert row.error is None, (i, p["request"], row.error)
        assert (row.result.token_ids, row.result.finish_reason) == (alone.token_ids, alone.finish_reason)
        assert streamed.get(i, []) == row.result.token_ids
    assert len(out) + len(dropped) == len(plan)


@pytest.mark.parametrize("hook,call", [("forward", 3), ("forward", 6), ("bind", 2), ("bind", 5)])
def test_a_fault_at_any_call_fails_rows_loudly_never_silently(engine, hook, call):
    """A fault no row can be blamed for (the n-th bind or forward, wherever it lands): rows it
    hits fail with row.error (a forward retried row by row may save them all), every other row
    gets its solo tokens, and the binding stays right (drive checks it after every call)."""
    rng = random.Random(call)
    plan = [{"request": good_request(rng), "join": rng.randint(0, 4)} for _ in range(8)]
    engine.fail_at = {hook: call}
    engine.calls.clear()
    out, _, _ = drive(engine, plan)
    assert engine.calls[hook] >= call  # the fault fired
    for i, p in enumerate(plan):
        if out[i].error:
            assert "injected" in out[i].error
        else:
            assert out[i].result.token_ids == solo(engine, p["request"]).token_ids


def test_the_running_rows_keep_their_adapters_after_a_newcomer_fails(engine):
    """The issue's case: a newcomer that fails after its adapters were bound must not leave the
    running row decoding on them."""
    running = GenerationRequest([5, 17, 99, 3], "a", max_new_tokens=8)
    alone = solo(engine, running).token_ids
    decoder = engine.decoder()
    assert decoder.admit([("run", running)]) == []
    slot_a = [engine.slots["a"]]
    for stage in ("forward", "sample"):
        bad = GenerationRequest([40, 41, 42], "b", max_new_tokens=8)
        engine.marks[id(bad)] = stage
        (row,) = decoder.admit([("bad", bad)])
        assert f"injected {'sampler' if stage == 'sample' else stage} fault" in row.error
        assert bound_slots(engine) == slot_a
    tiny = GenerationRequest([40, 41], "b", 8, temperature=1e-45, seed=2**64)
    assert decoder.admit([("tiny", tiny)]) == []  # decodes greedily, joins the batch
    assert bound_slots(engine) == [engine.slots["a"], engine.slots["b"]]
    finished = []
    while decoder:
        finished += decoder.step()
    assert {row.key: row.result.token_ids for row in finished} == {
        "run": alone,
        "tiny": solo(engine, GenerationRequest([40, 41], "b", 8)).token_ids,
    }


def test_a_row_whose_decode_step_raises_leaves_the_running_batch_alone(engine):
    good = [GenerationRequest([5 + i, 17, 99, 3][: 2 + i], a, max_new_tokens=7) for i, a in enumerate("ab")]
    bad = GenerationRequest([40, 41, 42], "a", max_new_tokens=7)
    engine.marks[id(bad)] = "step"
    decoder = engine.decoder()
    assert decoder.admit([(0, good[0]), ("bad", bad), (1, good[1])]) == []
    (row,) = decoder.step()
    assert row.key == "bad" and row.error == "decode step failed: injected step fault"
    assert bound_slots(engine) == [engine.slots["a"], engine.slots["b"]]
    finished = []
    while decoder:
        finished += decoder.step()
    assert {row.key: row.result.token_ids for row in finished} == {
        i: solo(engine, r).token_ids for i, r in enumerate(good)
    }


def test_adapters_really_differ_so_a_misroute_would_show(engine):
    prompt = [5, 17, 99, 3, 250, 42]
    tokens = {a: tuple(solo(engine, GenerationRequest(prompt, a, 8)).token_ids) for a in (None, "a", "b")}
    assert len(set(tokens.values())) == 3


# ---- parameters ---------------------------------------------------------------------------------


def test_tiny_temperature_is_greedy_and_seeds_are_taken_mod_2_64(engine):
    prompt = [9, 8, 7, 6]
    greedy = solo(engine, GenerationRequest(prompt, "b", 8)).token_ids
    assert solo(engine, GenerationRequest(prompt, "b", 8, temperature=1e-45)).token_ids == greedy
    sampled = solo(engine, GenerationRequest(prompt, "b", 8, temperature=1.5, seed=5)).token_ids
    huge = solo(engine, GenerationRequest(prompt, "b", 8, temperature=1.5, seed=5 + 3 * 2**64)).token_ids
    assert huge == sampled != greedy
    assert solo(engine, GenerationRequest(prompt, "b", 8, temperature=1.5, seed=-(2**80))).error is None


def test_logit_bias_and_penalties_follow_openai():
    r = GenerationRequest([1], None, frequency_penalty=0.5, presence_penalty=1.0, logit_bias={7: 2.0})
    x = sampling.adjust(torch.zeros(10), r, generated=[3, 3, 5])
    expected = torch.zeros(10)
    expected[3], expected[5], expected[7] = -2.0, -1.5, 2.0  # -c*freq - (c>0)*presence + bias
    assert torch.equal(x, expected)


def test_logit_bias_steers_one_row_only(engine):
    prompt = [11, 12, 13]
    plain = solo(engine, GenerationRequest(prompt, "a", 6)).token_ids
    forced = GenerationRequest(prompt, "a", 6, logit_bias={42: 100.0})
    banned = GenerationRequest(prompt, "a", 6, logit_bias={plain[0]: -100.0})
    results = engine.generate([forced, banned, GenerationRequest(prompt, "a", 6)])
    assert results[0].token_ids == [42] * 6
    assert results[1].token_ids[0] != plain[0]
    assert results[2].token_ids == plain
    penalised = GenerationRequest(prompt, "a", 12, frequency_penalty=2.0, presence_penalty=2.0)
    plain12 = GenerationRequest(prompt, "a", 12)
    repeats = [max(Counter(solo(engine, r).token_ids).values()) for r in (penalised, plain12)]
    assert repeats[0] <= repeats[1]


@pytest.mark.parametrize(
    "change,message",
    [
        ({"temperature": NAN}, "temperature nan"),
        ({"top_p": 1.5}, "top_p 1.5"),
        ({"seed": 1.5}, "seed 1.5"),
        ({"logit_bias": {VOCAB: 1.0}}, f"token id {VOCAB} is not in the vocabulary"),
        ({"logit_bias": {3: -101}}, "logit_bias -101"),
        ({"frequency_penalty": 2.5}, "frequency_penalty 2.5"),
        ({"stop": [""]}, "non-empty strings"),
        ({"prompt_ids": [VOCAB]}, "prompt token ids"),
        ({"prompt_ids": [3, 4.5]}, "list of token ids"),
        ({"max_new_tokens": None}, "max_new_tokens None"),
        ({"stop_token_ids": None}, "stop_token_ids must be"),
    ],
)
def test_bad_values_are_named(engine, change, message):
    r = GenerationRequest([3, 4], None, 4)
    for key, value in change.items():
        setattr(r, key, value)
    with pytest.raises(ValueError, match=message):
        engine.check(r)
    assert message in solo(engine, r).error


# ---- stop strings -------------------------------------------------------------------------------


def test_a_stop_string_ends_its_row_and_its_batch_mates_go_on(engine):
    tok, prompt = engine.tokenizer, [21, 22, 23, 24]
    alone = solo(engine, GenerationRequest(prompt, "b", 10)).token_ids
    k = next(k for k in range(1, 10) if tok.decode([alone[k]]) not in tok.decode(alone[:k]))
    stop = tok.decode([alone[k]])
    mate = GenerationRequest([30, 31], "a", 10)
    stopped, other = engine.generate([GenerationRequest(prompt, "b", 10, stop=[stop, "never"]), mate])
    assert (stopped.token_ids, stopped.finish_reason, stopped.stop_text) == (alone[: k + 1], "stop", stop)
    assert other.token_ids == solo(engine, mate).token_ids and other.finish_reason == "length"


def test_a_stop_string_split_by_special_tokens_ends_its_row(engine):
    """Special tokens decode to nothing, so the stop window counts only tokens with text: 30 pads
    between a stop string's two words once pushed its first word out of the window, and the row
    decoded on to max_tokens with the stop string in its text."""
    script = [5] + [0] * 30 + [6] + [7] * 10  # t5, 30 x <pad>, t6, ...

    class Scripted(FaultyDecoder):
        def _next_token(self, row, logits, greedy):
            return (
                script[len(row.result.token_ids)]
                if row.request.stop
                else super()._next_token(row, logits, greedy)
            )

    prompt = [2, 3, 4]
    mate = GenerationRequest(prompt, "a", 6)
    decoder = Scripted(engine)
    done = decoder.admit([(0, GenerationRequest(prompt, None, 40, stop=["t5 t6"])), (1, mate)])
    while decoder:
        done += decoder.step()
    rows = {row.key: row.result for row in done}
    assert (rows[0].finish_reason, rows[0].stop_text, len(rows[0].token_ids)) == ("stop", "t5 t6", 32)
    assert rows[1].token_ids == engine.generate([mate])[0].token_ids  # its mate as alone


def test_stop_helpers():
    assert first_stop("abc STOP def END", ["END", "STOP"]) == "STOP"
    assert first_stop("abc", ["x"]) is None
    assert stop_holdback("hello wor", ["world", "xyz"]) == 3  # "wor" may become "world"
    assert stop_holdback("hello", ["world"]) == 0
    assert stop_holdback("ab", ["abc", "b!"]) == 2


# ---- malformed adapters -----------------------------------------------------------------------


def _break(folder: Path, how: str) -> None:
    config_path, weights_path = folder / "adapter_config.json", folder / "adapter_model.safetensors"
    config, tensors = json.loads(config_path.read_text()), load_file(weights_path)
    first_a = next(k for k in tensors if "lora_A" in k)
    first_b = first_a.replace("lora_A", "lora_B")
    if how == "no config":
        config_path.unlink()
    elif how == "no weights":
        weights_path.unlink()
    elif how == "config not JSON":
        config_path.write_text("{r: 4")
    elif how in ("no alpha", "alpha text", "r text", "r zero"):
        key, value = {"no alpha": ("lora_alpha", None), "alpha text": ("lora_alpha", "16"),
                      "r text": ("r", "four"), "r zero": ("r", 0)}[how]  # fmt: skip
        config[key] = value
        config_path.write_text(json.dumps(config))
    elif how == "rank mismatch":
        tensors[first_b] = tensors[first_b][:, :3].contiguous()
    elif how == "base mismatch":
        tensors[first_a] = tensors[first_a][:, :-1].contiguous()
    elif how in ("nan", "inf"):
        tensors[first_b][0, 0] = NAN if how == "nan" else INF
    elif how == "corrupt weights":
        weights_path.write_bytes(b"not safetensors")
    if how in ("rank mismatch", "base mismatch", "nan", "inf"):
        save_file(tensors, weights_path)


@pytest.mark.parametrize(
    "how,message",
    [
        ("no config", "no adapter_config.json"),
        ("no weights", "no adapter_model.safetensors"),
        ("config not JSON", "not valid JSON"),
        ("no alpha", "lora_alpha is None, not a number"),
        ("alpha text", "lora_alpha is '16', not a number"),
        ("r text", "r is 'four', not a number"),
        ("r zero", "r is 0"),
        ("rank mismatch", "do not share a rank"),
        ("base mismatch", "another base"),
        ("nan", "NaN or infinite"),
        ("inf", "NaN or infinite"),
        ("corrupt weights", "cannot be read"),
    ],
)
def test_a_malformed_adapter_is_refused_at_load_naming_the_problem(engine, tmp_path, how, message):
    folder = write_adapter(tmp_path / "folder", engine, r=4, seed=7)
    _break(folder, how)
    loaded, free = engine.adapters(), list(engine.free)
    with pytest.raises(AdapterInvalidError, match=message) as info:
        engine.add_adapter("cust-x", folder)
    assert str(info.value).startswith("cust-x: ") and isinstance(info.value, ValueError)
    assert engine.adapters() == loaded and engine.free == free


def test_openai_json_forms_are_normalised():
    r = GenerationRequest([1], None, stop="END", logit_bias={"12": 1.0, 3: -2.0})
    assert (r.stop, r.logit_bias) == (["END"], {12: 1.0, 3: -2.0})
    r = GenerationRequest([1], None, stop=None, logit_bias=None)
    assert (r.stop, r.logit_bias) == ([], {})


def test_an_unknown_adapter_error_names_no_other_adapter(engine):
    row = solo(engine, GenerationRequest([3, 4], "zz", 4))
    assert row.error == "adapter 'zz' is not loaded"
