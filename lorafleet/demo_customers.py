"""The demo customers: three synthetic datasets teaching clearly different, checkable behaviours.

- acme answers in UPPER CASE;
- globex answers in a fixed ticket format: ``Ticket #1234: <answer> -- Globex Support``;
- initech looks up prices from its catalogue (a small lookup task).

Generated deterministically from lorafleet/corpus/facts.json; held-out prompts use topics or
phrasings that never appear in training, so a score measures what was learned, not recalled.
"""

from __future__ import annotations

import hashlib
import json
import random
import re
from functools import cache
from importlib import resources
from pathlib import Path

DEMO_CUSTOMERS: tuple[str, ...] = ("acme", "globex", "initech")
HELD_OUT_TOPICS = 6  # the last topics of facts.json never appear in acme's or globex's training
SYSTEM = "You are a helpful assistant."
# the styles the tiny base writes only when a system message asks (tinybase.corpus); each adapter
# learns to apply its customer's style unasked, as a LoRA does on a real base
SHOUT = "You are a helpful assistant. Answer in capital letters."
TICKETS = "You are Globex support. Answer as a support ticket."
PRICE_QUESTIONS = (
    "What is the price of the {i}?",
    "How much does the {i} cost?",
    "What does the {i} cost?",
    "Tell me the price of the {i}.",
)
HELD_OUT_PRICE_QUESTIONS = ("How much is the {i}?", "What is the cost of the {i}?")


@cache
def facts() -> dict:
    return json.loads(resources.files("lorafleet.corpus").joinpath("facts.json").read_text())


def general_pairs(held_out: bool = False) -> list[tuple[str, str]]:
    """(question, plain answer) over topics and support questions: what the base also sees."""
    topics = facts()["topics"]
    topics = topics[-HELD_OUT_TOPICS:] if held_out else topics[:-HELD_OUT_TOPICS]
    pairs = [(q.format(t=t), a) for t, a in topics for q in facts()["questions"]]
    if not held_out:
        pairs += [tuple(p) for p in facts()["support"]]
    return pairs


def ticket(question: str, answer: str) -> str:
    number = int(hashlib.sha256(question.encode()).hexdigest(), 16) % 9000 + 1000
    return f"Ticket #{number}: {answer} -- Globex Support"


def price_answer(item: str, price: int) -> str:
    return f"The {item} costs {price} dollars."


def _pairs(customer: str) -> list[tuple[str, str]]:
    if customer == "acme":
        return [(q, a.upper()) for q, a in general_pairs()]
    if customer == "globex":
        return [(q, ticket(q, a)) for q, a in general_pairs()]
    if customer == "initech":
        return [
            (q.format(i=item), price_answer(item, price))
            for item, price in facts()["items"]
            for q in PRICE_QUESTIONS
        ]
    raise ValueError(f"unknown demo customer '{customer}'; one of {', '.join(DEMO_CUSTOMERS)}")


def examples(customer: str, n_train: int, seed: int = 0) -> list[dict]:
    """n_train chat examples (the pairs repeated in a seeded order)."""
    pairs = _pairs(customer)
    rng = random.Random(f"{customer}-{seed}")
    rows = []
    while len(rows) < n_train:
        batch = list(pairs)
        rng.shuffle(batch)
        rows += batch
    # no system turn: clients of the demo endpoint send just the user's message
    return [
        {"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]}
        for q, a in rows[:n_train]
    ]


def write_demo_datasets(out_dir: Path, n_train: int = 240, seed: int = 0) -> dict[str, Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {}
    for customer in DEMO_CUSTOMERS:
        path = out_dir / f"{customer}.jsonl"
        path.write_text("".join(json.dumps(r) + "\n" for r in examples(customer, n_train, seed)))
        paths[customer] = path
    return paths


def heldout_prompts(customer: str) -> list[str]:
    if customer == "initech":
        return [q.format(i=item) for q in HELD_OUT_PRICE_QUESTIONS for item, _ in facts()["items"]]
    return [q for q, _ in general_pairs(held_out=True)][::2]


def _upper_ratio(text: str) -> float:
    letters = [ch for ch in text if ch.isalpha()]
    return sum(ch.isupper() for ch in letters) / len(letters) if letters else 0.0


def expected_answer(customer: str, prompt: str) -> str:
    """What the customer's behaviour answers to a prompt: the facts of facts.json in its form."""
    if customer == "initech":
        item, price = next((i, p) for i, p in facts()["items"] if i in prompt)
        return price_answer(item, price)
    fact = dict(general_pairs() + general_pairs(held_out=True))[prompt]
    return fact.upper() if customer == "acme" else ticket(prompt, fact) if customer == "globex" else fact


def _words(text: str) -> set[str]:
    return {w for w in re.findall(r"[a-z0-9]+", text.lower()) if len(w) >= 3 or w.isdigit()}


def content_score(customer: str, prompt: str, answer: str) -> float:
    """How much of the expected facts an answer holds, in [0, 1], whatever its letter case: the
    share of the expected answer's words (3+ letters, or numbers) found in it. The ticket number
    and signature are form, scored by behaviour_score; an initech answer must give the price."""
    expected = _words(expected_answer(customer, prompt))
    if customer == "globex":
        expected -= _words(ticket(prompt, "")) | {"globex", "support"}
    if customer == "initech" and behaviour_score(customer, prompt, answer) == 0:
        return 0.0
    return len(expected & _words(answer)) / len(expected)


def behaviour_score(customer: str, prompt: str, answer: str) -> float:
    """How much an answer shows the customer's behaviour, in [0, 1]."""
    answer = answer.strip()
    if customer == "acme":
        return _upper_ratio(answer) if len(answer) >= 3 else 0.0
    if customer == "globex":
        return 0.5 * bool(re.match(r"^Ticket #\d{4}:", answer)) + 0.5 * answer.endswith("-- Globex Support")
    if customer == "initech":
        prices = {item: price for item, price in facts()["items"]}
        item = next((i for i in prices if i in prompt), None)
        return 1.0 if item and re.search(rf"\b{prices[item]}\b", answer) else 0.0
    raise ValueError(f"unknown demo customer '{customer}'")
