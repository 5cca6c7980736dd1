"""The tiny base: a small Llama and BPE tokenizer built offline from the bundled facts, briefly
pretrained so it answers in words, saved as an ordinary Hugging Face folder (so every code path
is the one a real model takes) and cached after the first build."""

from __future__ import annotations

import fcntl
import os
import random
import shutil
import tempfile
from pathlib import Path

from lorafleet.settings import cache_dir

__all__ = ["TINY_BASE_NAME", "build_tiny_base", "tiny_base_path"]
TINY_BASE_NAME = "tiny-llama"  # what a fleet file names it by
VERSION = "v4"  # names the cache folder; v3 was an unmerged attempt whose folder may linger in caches
SPECIAL = ["<|pad|>", "<|bos|>", "<|eos|>", "<|end|>", "<|system|>", "<|user|>", "<|assistant|>"]
# assistant turns inside {% generation %} so trl can train on assistant tokens only
CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>\n"
    "{% if m['role'] == 'assistant' %}{% generation %}{{ m['content'] }}<|eos|>{% endgeneration %}"
    "{% else %}{{ m['content'] }}<|end|>{% endif %}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)
SHAPE = {
    "hidden_size": 256,
    "intermediate_size": 768,
    "num_hidden_layers": 4,
    "num_attention_heads": 4,
    "num_key_value_heads": 4,
    "max_position_embeddings": 512,
}
VOCAB = 2048  # room for every word of the corpus whole, in both cases (BPE stops at ~1,650)
PRETRAIN = {"steps": 300, "batch": 16, "lr": 3e-3}  # ~7.5 passes; 400 built slower, learned no better


def corpus() -> list[list[dict]]:
    """Pretraining conversations: every topic and support question answered in plain prose, and
    catalogue price questions answered without prices (so the base knows none of the demo
    behaviours); other items' prices are known, so the base knows how a price is said.

    The same answers also appear in capitals and as Globex support tickets, but only when a system
    message asks for them. A real base knows capital letters, digits and names; one that never saw
    them cannot learn to write them from a customer's few hundred examples (tiny base v2: acme's
    adapter wrote capitals with garbled words, globex's the ticket frame around another topic's
    answer). Unasked (the demo's clients send no system message), the base answers in plain prose,
    so each adapter still has its behaviour to learn.
    """
    from lorafleet.demo_customers import SHOUT, SYSTEM, TICKETS, general_pairs, ticket

    pairs = general_pairs() + general_pairs(held_out=True)
    return (
        [_chat(SYSTEM, q, a) for q, a in pairs + _price_pairs()]
        + [_chat(SHOUT, q, a.upper()) for q, a in pairs]
        + [_chat(TICKETS, q, ticket(q, a)) for q, a in pairs]
    )


def _price_pairs() -> list[tuple[str, str]]:
    """The store's other items priced, the catalogue's not. Without prices in the corpus, the
    words and the lone space before a number in initech's answers ("costs 12 dollars") were
    tokens the base had hardly read: its adapter ended at eval loss 0.8 instead of 0.01."""
    from lorafleet.demo_customers import PRICE_QUESTIONS, facts, price_answer

    unknown = [
        (q.format(i=item), f"I do not know the price of the {item}, please check the store.")
        for item, _ in facts()["items"]
        for q in PRICE_QUESTIONS[:2]
    ]
    known = [
        (q.format(i=item), price_answer(item, price))
        for item, price in facts()["store_items"]
        for q in PRICE_QUESTIONS
    ]
    return unknown + known


def _chat(system: str, question: str, answer: str) -> list[dict]:
    return [
        {"role": "system", "content": system},
        {"role": "user", "content": question},
        {"role": "assistant", "content": answer},
    ]


def _tokenizer(texts: list[str]):
    """BPE trained on exactly the pretraining text: every token's embedding gets trained (v2 also
    trained it on capital copies the base never read, and acme's capitals had untrained
    embeddings). Digits split one by one, as Llama's tokenizer does, so a price and a ticket
    number are made of the same ten trained tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)]
    )
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(
        texts,
        trainers.BpeTrainer(
            vocab_size=VOCAB,
            special_tokens=SPECIAL,
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            show_progress=False,
        ),
    )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<|bos|>",
        eos_token="<|eos|>",
        pad_token="<|pad|>",
        model_max_length=SHAPE["max_position_embeddings"],
        additional_special_tokens=SPECIAL[3:],
    )
    fast.chat_template = CHAT_TEMPLATE
    return fast


def _pretrain(model, batches: list) -> None:
    import torch

    opt = torch.optim.AdamW(model.parameters(), lr=PRETRAIN["lr"], weight_decay=0.0)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, PRETRAIN["lr"], total_steps=len(batches))
    model.train()
    for ids, mask in batches:
        labels = ids.masked_fill(mask == 0, -100)
        loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad()
    model.eval()


def _batches(tok, texts: list[str]) -> list:
    """Seeded batches, each padded to its longest conversation: none is cut (v3 cut a third of
    them at 64 tokens, among them most tickets' closing signature)."""
    rng = random.Random(0)
    order = [rng.randrange(len(texts)) for _ in range(PRETRAIN["steps"] * PRETRAIN["batch"])]
    out = []
    for i in range(PRETRAIN["steps"]):
        batch = [texts[j] for j in order[i * PRETRAIN["batch"] : (i + 1) * PRETRAIN["batch"]]]
        encoded = tok(batch, padding="longest", return_tensors="pt")
        out.append((encoded["input_ids"], encoded["attention_mask"]))
    return out


def build_tiny_base(out_dir: Path) -> Path:
    """Deterministic: same bundled facts and seeds, same weights. Written atomically."""
    import torch
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    conversations = corpus()
    tok = _tokenizer([m["content"] for c in conversations for m in c])
    texts = [tok.apply_chat_template(c, tokenize=False) for c in conversations]
    config = LlamaConfig(
        vocab_size=len(tok),
        bos_token_id=tok.bos_token_id,
        tie_word_embeddings=True,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
        **SHAPE,
    )
    model = LlamaForCausalLM(config)
    _pretrain(model, _batches(tok, texts))
    model.generation_config = GenerationConfig(
        eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id
    )
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out_dir.parent, prefix=".building-"))
    tmp.chmod(0o755)  # mkdtemp makes it private; the cache is shared with Ray workers
    model.save_pretrained(tmp, safe_serialization=True)
    tok.save_pretrained(tmp)
    if out_dir.exists():
        shutil.rmtree(out_dir)
    os.replace(tmp, out_dir)
    return out_dir


def tiny_base_path(cache: Path | None = None) -> Path:
    """The cached tiny base, built on first use; concurrent callers wait for one builder."""
    folder = (cache or cache_dir()) / "bases" / f"tiny-llama-{VERSION}"
    if (folder / "config.json").is_file():
        return folder
    folder.parent.mkdir(parents=True, exist_ok=True)
    with open(folder.parent / f".tiny-llama-{VERSION}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (folder / "config.json").is_file():
            build_tiny_base(folder)
    return folder
