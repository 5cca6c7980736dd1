"""The tiny base's tokenizer and corpus: every token the demo customers' data and held-out prompts
use is one the base read in pretraining (tiny base v2 failed this: its tokenizer knew capital
words the base never read, and acme's adapter wrote gibberish in capitals)."""

from __future__ import annotations

from collections import Counter

from lorafleet.demo_customers import DEMO_CUSTOMERS, examples, heldout_prompts
from lorafleet.models import load_tokenizer
from lorafleet.tinybase import corpus, tiny_base_path


def test_demo_data_uses_only_tokens_the_base_read():
    tok = load_tokenizer(tiny_base_path())
    read = Counter(i for c in corpus() for i in tok.apply_chat_template(c, tokenize=True, return_dict=False))
    for customer in DEMO_CUSTOMERS:
        texts = [m["content"] for row in examples(customer, 240) for m in row["messages"]]
        used = {i for text in texts + heldout_prompts(customer) for i in tok(text)["input_ids"]}
        unread = sorted(tok.convert_ids_to_tokens([i for i in used if not read[i]]))
        assert not unread, (customer, unread)
