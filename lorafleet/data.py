"""Customer datasets: read, validate with file:line errors, measure in tokens, hash.

Supported: OpenAI fine-tuning chat JSONL (`messages`), prompt/completion JSONL, plain text
(`.txt`, one example per blank-line-separated block), and CSV/Parquet read through `datasets`
(columns `messages`, `prompt`+`completion` or `text`).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from lorafleet.errors import DataError

ROLES = ("system", "user", "assistant")
MAX_REPORTED_ERRORS = 20


@dataclass(frozen=True)
class DatasetReport:
    path: str
    format: str
    examples: int
    tokens_total: int
    tokens_max: int
    over_max_length: int
    sha256: str

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def dataset_hash(path: str | Path) -> str:
    """sha256 of the file's bytes: the dataset's identity in lineage and resume decisions."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def detect_format(path: Path, declared: str = "auto") -> str:
    if declared != "auto":
        return declared
    suffix = path.suffix.lower()
    if suffix in (".csv", ".parquet"):
        return suffix[1:]
    if suffix in (".txt", ".md"):
        return "text"
    return "jsonl"


def _check_message(msg: Any, i: int) -> str | None:
    if not isinstance(msg, dict):
        return f"messages[{i}] must be an object with role and content"
    role = msg.get("role")
    if role not in ROLES:
        return f"messages[{i}].role {role!r} is not one of {', '.join(ROLES)}"
    if not isinstance(msg.get("content"), str):
        return f"messages[{i}].content must be a string"
    return None


def check_record(rec: Any) -> tuple[str | None, str | None]:
    """Return (kind, error) for one record: kind is 'chat', 'prompt_completion' or 'text'."""
    if not isinstance(rec, dict):
        return None, "each line must be a JSON object"
    if "messages" in rec:
        msgs = rec["messages"]
        if not isinstance(msgs, list) or not msgs:
            return "chat", "messages is empty; a conversation needs at least one turn"
        for i, msg in enumerate(msgs):
            if err := _check_message(msg, i):
                return "chat", err
        if not any(m["role"] == "assistant" for m in msgs):
            return "chat", "no assistant turn: there is nothing to learn from this conversation"
        return "chat", None
    if "prompt" in rec or "completion" in rec:
        for key in ("prompt", "completion"):
            if not isinstance(rec.get(key), str) or not rec[key]:
                return "prompt_completion", f"'{key}' must be a non-empty string"
        return "prompt_completion", None
    if "text" in rec:
        ok = isinstance(rec["text"], str) and rec["text"].strip()
        return "text", None if ok else "'text' must be a non-empty string"
    return None, f"unknown record with keys {sorted(rec)}; expected messages, prompt/completion or text"


def _read_jsonl(path: Path) -> tuple[list[dict], list[str]]:
    records, errors, kinds = [], [], set()
    for lineno, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as exc:
            errors.append(f"{path.name}:{lineno}: malformed JSON: {exc.msg} (column {exc.colno})")
            continue
        kind, err = check_record(rec)
        if err:
            errors.append(f"{path.name}:{lineno}: {err}")
            continue
        kinds.add(kind)
        records.append(rec)
    if len(kinds) > 1:
        errors.append(f"{path.name}: mixes record kinds {sorted(kinds)}; use one per file")
    return records, errors


def _read_text(path: Path) -> list[dict]:
    blocks = [b.strip() for b in path.read_text(encoding="utf-8").split("\n\n")]
    return [{"text": b} for b in blocks if b]


def _read_table(path: Path, fmt: str) -> tuple[list[dict], list[str]]:
    import datasets

    try:
        table = datasets.load_dataset(fmt, data_files=str(path), split="train")
    except Exception as exc:  # datasets raises many types for unreadable files
        return [], [f"{path.name}: cannot read as {fmt}: {exc}"]
    records, errors = [], []
    for row_no, rec in enumerate(table, 1):
        if isinstance(rec.get("messages"), str):  # CSV stores the conversation as JSON text
            rec = {**rec, "messages": json.loads(rec["messages"])}
        rec = {k: v for k, v in rec.items() if k in ("messages", "prompt", "completion", "text")}
        _, err = check_record(rec)
        if err:
            errors.append(f"{path.name}: row {row_no}: {err}")
        else:
            records.append(rec)
    return records, errors


def load_records(path: str | Path, fmt: str = "auto") -> list[dict]:
    """All examples of a dataset, or a DataError listing every problem with file and line."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: dataset file not found; check the job's `dataset` path")
    if path.stat().st_size == 0:
        raise DataError(f"{path}: dataset file is empty")
    fmt = detect_format(path, fmt)
    if fmt == "text":
        records, errors = _read_text(path), []
    elif fmt in ("csv", "parquet"):
        records, errors = _read_table(path, fmt)
    else:
        records, errors = _read_jsonl(path)
    if errors:
        more = len(errors) - MAX_REPORTED_ERRORS
        shown = errors[:MAX_REPORTED_ERRORS] + ([f"... and {more} more"] if more > 0 else [])
        raise DataError("\n".join(shown))
    if not records:
        raise DataError(f"{path}: no examples found")
    return records


def record_kind(records: list[dict]) -> str:
    return check_record(records[0])[0] or "text"


def token_count(rec: dict, tokenizer: Any) -> int:
    if "messages" in rec:
        return len(tokenizer.apply_chat_template(rec["messages"], tokenize=True, return_dict=False))
    if "prompt" in rec:
        return len(tokenizer(rec["prompt"] + rec["completion"])["input_ids"])
    return len(tokenizer(rec["text"])["input_ids"])


def inspect_dataset(path: str | Path, fmt: str, tokenizer: Any, max_length: int) -> DatasetReport:
    """Validate a dataset and measure it in the base model's tokens."""
    records = load_records(path, fmt)
    counts = [token_count(r, tokenizer) for r in records]
    return DatasetReport(
        path=str(path),
        format=record_kind(records),
        examples=len(records),
        tokens_total=sum(counts),
        tokens_max=max(counts),
        over_max_length=sum(c > max_length for c in counts),
        sha256=dataset_hash(path),
    )


def to_hf_dataset(records: list[dict]) -> Any:
    """A `datasets.Dataset` in the shape trl's SFTTrainer expects for this record kind."""
    import datasets

    kind = record_kind(records)
    if kind == "chat":
        rows = [
            {"messages": [{"role": m["role"], "content": m["content"]} for m in r["messages"]]}
            for r in records
        ]
    elif kind == "prompt_completion":
        rows = [{"prompt": r["prompt"], "completion": r["completion"]} for r in records]
    else:
        rows = [{"text": r["text"]} for r in records]
    return datasets.Dataset.from_list(rows)
