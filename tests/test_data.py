"""Dataset validation: errors give file and line; reports count tokens and truncation."""

from __future__ import annotations

import json

import pytest

from lorafleet.data import dataset_hash, inspect_dataset, load_records, to_hf_dataset
from lorafleet.errors import DataError


def chat(*turns):
    return {"messages": [{"role": r, "content": c} for r, c in turns]}


def write_lines(path, lines):
    path.write_text("\n".join(x if isinstance(x, str) else json.dumps(x) for x in lines) + "\n")
    return path


@pytest.mark.parametrize(
    ("line", "expected"),
    [
        (
            chat(("user", "hi"), ("asistant", "yo")),
            "acme.jsonl:2: messages[1].role 'asistant' is not one of system, user, assistant",
        ),
        ("{not json", "acme.jsonl:2: malformed JSON"),
        ({"messages": []}, "acme.jsonl:2: messages is empty"),
        (chat(("system", "s"), ("user", "u")), "acme.jsonl:2: no assistant turn"),
        (
            {"messages": [{"role": "user", "content": 3}]},
            "acme.jsonl:2: messages[0].content must be a string",
        ),
        ({"foo": 1}, "acme.jsonl:2: unknown record with keys ['foo']"),
        ([1, 2], "acme.jsonl:2: each line must be a JSON object"),
    ],
)
def test_chat_errors_name_file_and_line(tmp_path, line, expected):
    path = write_lines(tmp_path / "acme.jsonl", [chat(("user", "a"), ("assistant", "b")), line])
    with pytest.raises(DataError) as err:
        load_records(path)
    assert expected in str(err.value)


def test_every_bad_line_reported(tmp_path):
    path = write_lines(tmp_path / "d.jsonl", ["{x", "{y", chat(("user", "a"), ("assistant", "b"))])
    with pytest.raises(DataError) as err:
        load_records(path)
    assert "d.jsonl:1:" in str(err.value) and "d.jsonl:2:" in str(err.value)


def test_missing_empty_and_mixed_files(tmp_path):
    with pytest.raises(DataError, match="dataset file not found"):
        load_records(tmp_path / "missing.jsonl")
    (tmp_path / "empty.jsonl").write_text("")
    with pytest.raises(DataError, match="is empty"):
        load_records(tmp_path / "empty.jsonl")
    mixed = write_lines(
        tmp_path / "mixed.jsonl",
        [chat(("user", "a"), ("assistant", "b")), {"prompt": "p", "completion": "c"}],
    )
    with pytest.raises(DataError, match="mixes record kinds"):
        load_records(mixed)


def test_prompt_completion_and_text(tmp_path):
    pc = write_lines(tmp_path / "pc.jsonl", [{"prompt": "2+2=", "completion": " 4"}])
    assert to_hf_dataset(load_records(pc)).column_names == ["prompt", "completion"]
    bad = write_lines(tmp_path / "pc2.jsonl", [{"prompt": "2+2=", "completion": ""}])
    with pytest.raises(DataError, match="pc2.jsonl:1: 'completion' must be a non-empty string"):
        load_records(bad)
    txt = tmp_path / "notes.txt"
    txt.write_text("first block\nstill first\n\nsecond block\n")
    assert [r["text"] for r in load_records(txt)] == ["first block\nstill first", "second block"]


def test_csv_and_parquet_through_datasets(tmp_path):
    import datasets

    rows = [{"prompt": f"q{i}", "completion": f"a{i}"} for i in range(3)]
    datasets.Dataset.from_list(rows).to_parquet(str(tmp_path / "d.parquet"))
    assert load_records(tmp_path / "d.parquet") == rows
    (tmp_path / "d.csv").write_text("prompt,completion\nq0,a0\nq1,\n")
    with pytest.raises(DataError, match="d.csv: row 2: 'completion' must be a non-empty string"):
        load_records(tmp_path / "d.csv")


def test_report_counts_tokens_and_truncation(tmp_path, micro_base):
    from lorafleet.models import load_tokenizer

    tok = load_tokenizer(micro_base)
    path = write_lines(
        tmp_path / "d.jsonl",
        [chat(("user", "hi"), ("assistant", "short")), chat(("user", "item " * 40), ("assistant", "long"))],
    )
    report = inspect_dataset(path, "auto", tok, max_length=30)
    assert (report.examples, report.format, report.over_max_length) == (2, "chat", 1)
    assert report.tokens_max > 30 and report.tokens_total > report.tokens_max
    assert report.sha256 == dataset_hash(path)
    path.write_text(path.read_text() + "\n")
    assert dataset_hash(path) != report.sha256


GOOD_LINE = json.dumps(chat(("user", "a"), ("assistant", "b"))).encode()


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        (b'{"prompt": "caf\xe9", "completion": "x"}', "d.jsonl:2: not UTF-8 text (byte 0xe9 at column 16)"),
        (b'{"prompt": "\\ud800", "completion": "x"}', "d.jsonl:2: holds an unpaired UTF-16 surrogate"),
        (b"[" * 100_000 + b"]" * 100_000, "d.jsonl:2: malformed JSON: nested too deeply"),
        (
            json.dumps(
                {
                    "messages": [
                        {"role": "user", "content": "q"},
                        {"role": "assistant", "content": "a", "weight": 0},
                    ]
                }
            ).encode(),
            "d.jsonl:2: messages[1].weight is not supported",
        ),
        (
            json.dumps(
                {
                    "messages": [
                        {"role": "user", "content": "q", "tool_calls": []},
                        {"role": "assistant", "content": "a"},
                    ]
                }
            ).encode(),
            "d.jsonl:2: messages[0] has keys ['tool_calls'] this trainer does not read",
        ),
        (
            json.dumps({"prompt": "p", "completion": "c", "text": "t"}).encode(),
            "prompt/completion or text, not both",
        ),
    ],
)
def test_unreadable_lines_are_errors_with_file_and_line_never_a_traceback(tmp_path, raw, expected):
    path = tmp_path / "d.jsonl"
    path.write_bytes(GOOD_LINE + b"\n" + raw + b"\n")
    with pytest.raises(DataError) as err:
        load_records(path)
    assert expected in str(err.value)


def test_a_byte_order_mark_and_crlf_are_read(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_bytes(b"\xef\xbb\xbf" + GOOD_LINE + b"\r\n" + GOOD_LINE + b"\r\n")
    assert len(load_records(path)) == 2


def test_a_declared_format_must_match_the_records(tmp_path):
    path = write_lines(tmp_path / "d.jsonl", [chat(("user", "a"), ("assistant", "b"))])
    with pytest.raises(DataError, match="declared format prompt_completion, but its records are chat"):
        load_records(path, "prompt_completion")
    with pytest.raises(DataError, match="declared format text, but its lines are JSON records"):
        load_records(path, "text")
    assert load_records(path, "chat")


def test_a_folder_a_bad_csv_cell_and_an_unknown_protocol_are_named(tmp_path):
    with pytest.raises(DataError, match="is a folder"):
        load_records(tmp_path)
    csv = tmp_path / "d.csv"
    csv.write_text(
        'messages\n"[{""role"": ""user"", ""content"": ""a""}, '
        '{""role"": ""assistant"", ""content"": ""b""}]"\n"not json"\n'
    )
    with pytest.raises(DataError, match="d.csv: row 2: messages: malformed JSON"):
        load_records(csv)
    with pytest.raises(DataError, match="Protocol not known"):
        load_records("foo://bucket/a.jsonl")


def test_answers_truncation_removes_entirely_are_an_error_at_validation(tmp_path, micro_base):
    """Every user turn longer than max_length: training found no loss token and failed; the
    check finds it first. One example whose answer survives is enough to train."""
    from lorafleet.models import load_tokenizer

    tok = load_tokenizer(micro_base)
    long = chat(("user", "word " * 40), ("assistant", "ok"))
    path = write_lines(tmp_path / "d.jsonl", [long, long])
    with pytest.raises(DataError, match="every example's answer starts after max_length 16"):
        inspect_dataset(path, "auto", tok, max_length=16)
    pc = write_lines(tmp_path / "p.jsonl", [{"prompt": "word " * 40, "completion": "ok"}])
    with pytest.raises(DataError, match="answer starts after max_length 16"):
        inspect_dataset(pc, "auto", tok, max_length=16)
    mixed = write_lines(tmp_path / "m.jsonl", [long, chat(("user", "hi"), ("assistant", "ok"))])
    assert inspect_dataset(mixed, "auto", tok, max_length=16).over_max_length == 1


def test_a_chat_template_that_raises_is_that_examples_error(tmp_path, micro_base):
    """A base whose chat template raises on some messages (roles that must alternate, as many
    real bases' do) makes that example a named error; it was a jinja2 traceback that stopped
    every other job's check."""
    from lorafleet.models import load_tokenizer

    tok = load_tokenizer(micro_base)
    tok.chat_template = (
        "{% for m in messages %}{% if loop.index0 > 0 and m.role == messages[loop.index0 - 1].role %}"
        "{{ raise_exception('roles must alternate') }}{% endif %}{{ m.content }}{% endfor %}"
    )
    good = chat(("user", "hi"), ("assistant", "ok"))
    bad = chat(("user", "hi"), ("user", "again"), ("assistant", "ok"))
    path = write_lines(tmp_path / "d.jsonl", [good, bad])
    with pytest.raises(DataError, match=r"d.jsonl: example 2: .*template refused it: roles must alternate"):
        inspect_dataset(path, "auto", tok, max_length=64)
    only_good = write_lines(tmp_path / "g.jsonl", [good])
    assert inspect_dataset(only_good, "auto", tok, max_length=64).examples == 1


def test_learnable_examples_all_in_the_eval_split_are_an_error_at_validation(tmp_path, micro_base):
    """The train split is what training learns from: when every example that keeps an answer
    token within max_length falls in the seeded eval split, training failed with no loss token;
    validation now says so, naming eval_fraction and the seed."""
    from lorafleet.data import job_splits, train_indices
    from lorafleet.models import load_tokenizer

    tok = load_tokenizer(micro_base)
    long = chat(("user", "word " * 40), ("assistant", "ok"))
    short = chat(("user", "hi"), ("assistant", "ok"))
    seed = next(s for s in range(100) if 0 not in train_indices(10, 0.5, s))  # row 0 goes to eval
    path = write_lines(tmp_path / "d.jsonl", [short] + [long] * 9)
    with pytest.raises(DataError, match=rf"all fall in the eval split \(eval_fraction 0.5, seed {seed}\)"):
        inspect_dataset(path, "auto", tok, max_length=16, eval_fraction=0.5, seed=seed)
    kept = next(s for s in range(100) if 0 in train_indices(10, 0.5, s))
    assert inspect_dataset(path, "auto", tok, max_length=16, eval_fraction=0.5, seed=kept).examples == 10
    for s in (seed, kept):  # train_indices is the split the jobs train on
        train, _ = job_splits(path, "auto", 0.5, s)
        assert [r["messages"][0]["content"] == "hi" for r in train] == [
            i == 0 for i in train_indices(10, 0.5, s)
        ]


def test_a_token_id_past_the_bases_embedding_is_an_error_at_validation(tmp_path, micro_base):
    """A tokenizer with tokens added and the model not resized: the example that uses one failed
    inside the forward every packed job shared; validation names it."""
    from lorafleet.models import load_tokenizer, vocab_size

    tok = load_tokenizer(micro_base)
    path = write_lines(tmp_path / "d.jsonl", [chat(("user", "hi"), ("assistant", "ok"))] * 2)
    messages = chat(("user", "hi"), ("assistant", "ok"))["messages"]
    top = max(tok.apply_chat_template(messages, tokenize=True, return_dict=False))
    with pytest.raises(DataError, match=rf"example 1 has token id {top}, past the base's embedding of {top}"):
        inspect_dataset(path, "auto", tok, max_length=64, vocab_size=top)
    assert inspect_dataset(path, "auto", tok, max_length=64, vocab_size=vocab_size(micro_base)).examples == 2
