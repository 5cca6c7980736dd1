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


def test_the_tokenizer_is_the_one_autotokenizer_gives(micro_base):
    """load_tokenizer skips AutoTokenizer (and its torch import) for the generic fast tokenizer:
    same class, same ids and the same chat template as AutoTokenizer's."""
    from transformers import AutoTokenizer

    for path in (tiny_base_path(), micro_base):
        ours, auto = load_tokenizer(path), AutoTokenizer.from_pretrained(path)
        assert type(ours) is type(auto)
        for row in examples("acme", 20):
            chat = ours.apply_chat_template(row["messages"], tokenize=True, return_dict=False)
            assert chat == auto.apply_chat_template(row["messages"], tokenize=True, return_dict=False)
            text = row["messages"][-1]["content"]
            assert ours(text)["input_ids"] == auto(text)["input_ids"]
        assert (ours.pad_token, ours.eos_token, ours.bos_token) == (
            auto.pad_token or auto.eos_token,
            auto.eos_token,
            auto.bos_token,
        )
