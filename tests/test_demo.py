"""The demo fleet, trained for real: each adapter learned its customer's behaviour (measured on
held-out prompts against the base and against the other adapters) and is registered with
lineage back to its job run."""

from __future__ import annotations

import pytest
import torch

from lorafleet import registry, tracking
from lorafleet.demo_customers import DEMO_CUSTOMERS, behaviour_score, heldout_prompts

pytestmark = pytest.mark.integration


def answers(model, tokenizer, prompts: list[str]) -> list[str]:
    out = []
    for prompt in prompts:
        ids = tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt}],
            add_generation_prompt=True,
            return_tensors="pt",
            return_dict=True,
        )
        with torch.no_grad():
            gen = model.generate(
                **ids, max_new_tokens=64, do_sample=False, pad_token_id=tokenizer.pad_token_id
            )
        out.append(tokenizer.decode(gen[0, ids["input_ids"].shape[1] :], skip_special_tokens=True))
    return out


def mean_score(customer: str, prompts: list[str], replies: list[str]) -> float:
    return sum(behaviour_score(customer, p, a) for p, a in zip(prompts, replies, strict=True)) / len(prompts)


def test_each_adapter_learned_its_behaviour(in_demo_home):
    from peft import PeftModel

    from lorafleet.models import load_base, load_tokenizer, resolve_base
    from lorafleet.spec import QuantizationSpec

    base_path = resolve_base("tiny-llama")
    tok = load_tokenizer(base_path)
    base = load_base(base_path, QuantizationSpec(), "cpu")
    c = tracking.client()
    prompts = {cust: heldout_prompts(cust)[:8] for cust in DEMO_CUSTOMERS}
    base_scores = {
        cust: mean_score(cust, prompts[cust], answers(base, tok, prompts[cust])) for cust in DEMO_CUSTOMERS
    }
    model = None
    for cust in DEMO_CUSTOMERS:
        folder = registry.fetch(c, f"{cust}@candidate").path
        if model is None:
            model = PeftModel.from_pretrained(base, folder, adapter_name=cust)
        else:
            model.load_adapter(folder, adapter_name=cust)
    scores = {}
    for cust in DEMO_CUSTOMERS:
        model.set_adapter(cust)
        replies = answers(model, tok, prompts[cust])
        scores[cust] = {other: mean_score(other, prompts[cust], replies) for other in DEMO_CUSTOMERS}
    print("base", base_scores, "adapters", scores)
    for cust in DEMO_CUSTOMERS:
        own = scores[cust][cust]
        assert own >= 0.6 and own >= base_scores[cust] + 0.4, (cust, own, base_scores[cust])
        for other in DEMO_CUSTOMERS:  # distinct from each other, not one shared trick
            if other != cust:
                assert scores[cust][other] < own, (cust, other, scores[cust])


def test_demo_adapters_registered_with_lineage(in_demo_home):
    _, result = in_demo_home
    c = tracking.client()
    rows = {r["adapter"]: r for r in registry.list_rows(c)}
    assert set(rows) == set(DEMO_CUSTOMERS)
    for cust in DEMO_CUSTOMERS:
        mv = registry.resolve_version(c, registry.parse_ref(cust))  # production: auto-promoted
        run = c.get_run(mv.run_id)
        assert run.info.run_id == result.jobs[cust].run_id
        assert run.data.tags["lorafleet.customer"] == cust
        assert run.data.tags["mlflow.parentRunId"] == result.fleet_run_id
        assert mv.tags["dataset_sha256"] == run.data.tags["lorafleet.dataset_sha256"]
        assert mv.tags["base_fingerprint"] == run.data.tags["lorafleet.base_fingerprint"]
        assert float(mv.tags["eval_loss"]) > 0
        # the base measured on the job's eval split before training, copied into MLflow
        metrics = run.data.metrics
        assert metrics["base_eval_loss"] > metrics["eval_loss"], (cust, metrics)
        assert mv.tags["lorafleet.beats_base"] == run.data.tags["lorafleet.beats_base"] == "true"
        assert mv.tags["base_eval_loss"] == repr(metrics["base_eval_loss"])
