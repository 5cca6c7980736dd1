"""Customer datasets: read, validate with file:line errors, measure in tokens, hash.

Supported: OpenAI fine-tuning chat JSONL (`messages`), prompt/completion JSONL, plain text
(`.txt`, one example per blank-line-separated block), and CSV/Parquet read through `datasets`
(columns `messages`, `prompt`+`completion` or `text`).

A dataset is a local path or a URL (`s3://bucket/key.jsonl`, `gs://...`, any fsspec protocol):
a URL is read by whichever process needs it (the validating driver, the training worker), each
time into a private temporary copy, so hashing, validation and training see the same bytes.
"""

from __future__ import annotations

import hashlib
import json
import re
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
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


def is_url(path: str | Path) -> bool:
    return "://" in str(path) and not str(path).startswith("file://")


def redact(url: str) -> str:
    """A URL fit for logs and MLflow: credentials in it (pyarrow's s3://KEY:SECRET@bucket form)
    are replaced by '***'."""
    return re.sub(r"^([a-z0-9+.-]+://)[^/@]+@", r"\1***@", str(url))


def _remote_fs(url: str) -> tuple[Any, str]:
    """(fsspec filesystem, path) for a URL. fsspec's own implementation when installed (s3fs,
    gcsfs, adlfs, ...); otherwise pyarrow's, which Ray Train already uses for s3:// storage paths,
    so a dataset URL works wherever checkpoint storage does (AWS_ENDPOINT_URL and the AWS_*
    credentials from the environment). A URL with a query string is pyarrow's form too
    (`s3://bucket/key?endpoint_override=host:port&scheme=http`)."""
    import fsspec

    if "?" not in url:
        try:
            return fsspec.core.url_to_fs(url)
        except ImportError:  # "Install s3fs to access S3": pyarrow may speak it
            pass
        except ValueError as exc:  # "Protocol not known: foo"
            raise DataError(f"{redact(url)}: {exc}; give a local path or an s3://, gs://, ... URL") from None
    import pyarrow.fs
    from fsspec.implementations.arrow import ArrowFSWrapper

    try:
        arrow, path = pyarrow.fs.FileSystem.from_uri(url)
    except (pyarrow.ArrowInvalid, pyarrow.ArrowNotImplementedError, OSError) as exc:
        raise DataError(
            f"{redact(url)}: cannot open this URL ({exc}); install the fsspec package for its protocol "
            "(e.g. s3fs, gcsfs) or give a local path"
        ) from None
    return ArrowFSWrapper(arrow), path


@contextmanager
def local_copy(path: str | Path) -> Iterator[Path]:
    """The dataset as a local file: a path as it is, a URL downloaded into a temporary folder
    (under the object's own name, so errors read `acme.jsonl:3: ...` either way)."""
    if not is_url(path):
        yield Path(str(path).removeprefix("file://"))
        return
    url = str(path)
    fs, remote = _remote_fs(url)
    tmp = Path(tempfile.mkdtemp(prefix="lorafleet-data-"))
    local = tmp / (Path(remote.split("?")[0]).name or "dataset")
    try:
        try:
            with fs.open(remote, "rb") as src, open(local, "wb") as dst:
                shutil.copyfileobj(src, dst, 1 << 20)
        except FileNotFoundError:
            raise DataError(
                f"{redact(url)}: dataset object not found; check the bucket and key of the job's `dataset`"
            ) from None
        except OSError as exc:  # no such bucket, access denied, endpoint unreachable, ...
            raise DataError(f"{redact(url)}: cannot read the dataset: {exc}") from None
        yield local
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _file_hash(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def dataset_hash(path: str | Path) -> str:
    """sha256 of the dataset's bytes: its identity in lineage and resume decisions."""
    with local_copy(path) as local:
        return _file_hash(local)


def detect_format(path: Path, declared: str = "auto") -> str:
    if declared != "auto":
        return declared
    suffix = Path(str(path).split("?")[0]).suffix.lower()
    if suffix in (".csv", ".parquet"):
        return suffix[1:]
    if suffix in (".txt", ".md"):
        return "text"
    return "jsonl"


MESSAGE_KEYS = ("role", "content")


def _check_message(msg: Any, i: int) -> str | None:
    if not isinstance(msg, dict):
        return f"messages[{i}] must be an object with role and content"
    if "weight" in msg:  # OpenAI's weight 0 means "do not train on this turn": never ignore it
        return f"messages[{i}].weight is not supported (every assistant turn is trained on); remove it"
    if unknown := sorted(set(msg) - set(MESSAGE_KEYS)):
        return f"messages[{i}] has keys {unknown} this trainer does not read; keep role and content"
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
    if ("prompt" in rec or "completion" in rec) and "text" in rec:
        return None, "a record has prompt/completion or text, not both: keep one"
    if "prompt" in rec or "completion" in rec:
        for key in ("prompt", "completion"):
            if not isinstance(rec.get(key), str) or not rec[key]:
                return "prompt_completion", f"'{key}' must be a non-empty string"
        return "prompt_completion", None
    if "text" in rec:
        ok = isinstance(rec["text"], str) and rec["text"].strip()
        return "text", None if ok else "'text' must be a non-empty string"
    return None, f"unknown record with keys {sorted(rec)}; expected messages, prompt/completion or text"


def _lines(path: Path) -> Iterator[tuple[int, str | None, str | None]]:
    """(line number, text, error) per line: a line that is not UTF-8 is an error of its own."""
    for lineno, raw in enumerate(path.read_bytes().removeprefix(b"\xef\xbb\xbf").split(b"\n"), 1):
        try:
            yield lineno, raw.decode("utf-8").rstrip("\r"), None
        except UnicodeDecodeError as exc:
            yield lineno, None, f"not UTF-8 text (byte {raw[exc.start]:#04x} at column {exc.start + 1})"


def _json_record(line: str) -> tuple[Any, str | None]:
    try:
        rec = json.loads(line)
    except json.JSONDecodeError as exc:
        return None, f"malformed JSON: {exc.msg} (column {exc.colno})"
    except RecursionError:
        return None, "malformed JSON: nested too deeply"
    try:
        json.dumps(rec, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError:  # a \ud800 escape: no tokenizer can encode it
        return None, "holds an unpaired UTF-16 surrogate escape (\\ud800-\\udfff); send valid Unicode"
    return rec, None


def _read_jsonl(path: Path) -> tuple[list[dict], list[str]]:
    records, errors, kinds = [], [], set()
    for lineno, line, bad in _lines(path):
        if bad or not line.strip():
            errors += [f"{path.name}:{lineno}: {bad}"] if bad else []
            continue
        rec, err = _json_record(line)
        if err is None:
            kind, err = check_record(rec)
        if err:
            errors.append(f"{path.name}:{lineno}: {err}")
            continue
        kinds.add(kind)
        records.append(rec)
    if len(kinds) > 1:
        errors.append(f"{path.name}: mixes record kinds {sorted(kinds)}; use one per file")
    return records, errors


def _read_text(path: Path) -> tuple[list[dict], list[str]]:
    lines = list(_lines(path))  # one read: its decoding errors, and the text itself
    errors = [f"{path.name}:{lineno}: {bad}" for lineno, _, bad in lines if bad]
    if errors:
        return [], errors
    text = "\n".join(line for _, line, _ in lines)
    first = text.lstrip().split("\n", 1)[0]
    rec, err = _json_record(first) if first.startswith("{") else (None, "not JSON")
    if err is None and check_record(rec)[0]:
        return [], [f"{path.name}: declared format text, but its lines are JSON records; use format: auto"]
    blocks = [b.strip() for b in text.split("\n\n")]
    return [{"text": b} for b in blocks if b], []


def _read_table(path: Path, fmt: str) -> tuple[list[dict], list[str]]:
    import datasets

    try:
        table = datasets.load_dataset(fmt, data_files=str(path), split="train")
    except Exception as exc:  # datasets raises many types for unreadable files
        return [], [f"{path.name}: cannot read as {fmt}: {exc}"]
    records, errors = [], []
    for row_no, rec in enumerate(table, 1):
        if isinstance(rec.get("messages"), str):  # CSV stores the conversation as JSON text
            messages, err = _json_record(rec["messages"])
            if err:
                errors.append(f"{path.name}: row {row_no}: messages: {err}")
                continue
            rec = {**rec, "messages": messages}
        rec = {k: v for k, v in rec.items() if k in ("messages", "prompt", "completion", "text")}
        _, err = check_record(rec)
        if err:
            errors.append(f"{path.name}: row {row_no}: {err}")
        else:
            records.append(rec)
    return records, errors


def load_records(path: str | Path, fmt: str = "auto") -> list[dict]:
    """All examples of a dataset, or a DataError listing every problem with file and line."""
    return read_dataset(path, fmt)[0]


def read_dataset(path: str | Path, fmt: str = "auto") -> tuple[list[dict], str]:
    """(examples, sha256) from one read of the bytes, so the hash is that of what was read."""
    where = redact(str(path))
    with local_copy(path) as local:
        if local.is_dir():
            raise DataError(f"{where}: is a folder; `dataset` names one file (JSONL, CSV, Parquet or text)")
        if not local.is_file():
            raise DataError(f"{where}: dataset file not found; check the job's `dataset` path")
        if local.stat().st_size == 0:
            raise DataError(f"{where}: dataset file is empty")
        return _parse(local, detect_format(Path(where), fmt), where), _file_hash(local)


def _parse(path: Path, fmt: str, where: str) -> list[dict]:
    if fmt == "text":
        records, errors = _read_text(path)
    elif fmt in ("csv", "parquet"):
        records, errors = _read_table(path, fmt)
    else:
        records, errors = _read_jsonl(path)
    kind = record_kind(records) if records else fmt
    if not errors and fmt in ("chat", "prompt_completion") and kind != fmt:
        errors = [f"{where}: declared format {fmt}, but its records are {kind}; use format: auto"]
    if errors:
        more = len(errors) - MAX_REPORTED_ERRORS
        shown = errors[:MAX_REPORTED_ERRORS] + ([f"... and {more} more"] if more > 0 else [])
        raise DataError("\n".join(shown))
    if not records:
        raise DataError(f"{where}: no examples found")
    return records


def record_kind(records: list[dict]) -> str:
    return check_record(records[0])[0] or "text"


def token_ids(rec: dict, tokenizer: Any) -> list[int]:
    if "messages" in rec:
        return list(tokenizer.apply_chat_template(rec["messages"], tokenize=True, return_dict=False))
    if "prompt" in rec:
        return tokenizer(rec["prompt"] + rec["completion"])["input_ids"]
    return tokenizer(rec["text"])["input_ids"]


def first_loss_token(rec: dict, tokenizer: Any) -> int:
    """Where the tokens a record trains on begin: its first assistant turn, its completion, or
    (plain text) its first token."""
    if "messages" in rec:
        turns = rec["messages"]
        first = next(i for i, m in enumerate(turns) if m["role"] == "assistant")
        if first == 0:
            return 0
        prefix = tokenizer.apply_chat_template(
            turns[:first], add_generation_prompt=True, tokenize=True, return_dict=False
        )
        return len(prefix)
    if "prompt" in rec:
        return len(tokenizer(rec["prompt"])["input_ids"])
    return 0


def _measured(measure: Any, rec: dict, number: int, path: str | Path, tokenizer: Any) -> Any:
    """measure(rec, tokenizer) (token_ids, first_loss_token), with a refusal named: text the
    tokenizer cannot take (TypeError, ValueError), or a chat template that raises on these
    messages (jinja2's TemplateError: a base whose template wants roles alternating, or no system
    turn), is this example's error, not a traceback that stops the other jobs' checks."""
    from jinja2 import TemplateError

    try:
        return measure(rec, tokenizer)
    except (TypeError, ValueError, TemplateError) as exc:
        raise DataError(
            f"{redact(str(path))}: example {number}: the base's tokenizer or chat template refused it: {exc}"
        ) from None


def inspect_dataset(
    path: str | Path,
    fmt: str,
    tokenizer: Any,
    max_length: int,
    eval_fraction: float = 0.0,
    seed: int = 0,
    vocab_size: int | None = None,
) -> DatasetReport:
    """Validate a dataset and measure it in the base model's tokens. Errors here, not at
    training: a token id the base's embedding lacks (a tokenizer with tokens added and the model
    not resized), and no training example (of the split eval_fraction and seed leave) keeping a
    token to learn from within max_length."""
    records, sha256 = read_dataset(path, fmt)
    counts = []
    for number, rec in enumerate(records, 1):
        ids = _measured(token_ids, rec, number, path, tokenizer)
        if vocab_size is not None and ids and max(ids) >= vocab_size:
            raise DataError(
                f"{redact(str(path))}: example {number} has token id {max(ids)}, past the base's "
                f"embedding of {vocab_size} tokens: its tokenizer holds tokens the model was not "
                "resized for; resize the base's embeddings (and save it) or remove those tokens"
            )
        counts.append(len(ids))

    def learns(i: int) -> bool:  # keeps a token to learn from within max_length
        if counts[i] <= max_length:
            return True
        return _measured(first_loss_token, records[i], i + 1, path, tokenizer) < max_length

    train = train_indices(len(records), eval_fraction, seed)
    if not any(learns(i) for i in sorted(train, key=lambda i: counts[i] > max_length)):
        if not any(learns(i) for i in set(range(len(records))) - set(train)):
            raise DataError(
                f"{redact(str(path))}: every example's answer starts after max_length {max_length} tokens, "
                "so truncation leaves nothing to learn; raise training.max_length or shorten the prompts"
            )
        raise DataError(
            f"{redact(str(path))}: the examples whose answer starts within max_length {max_length} tokens "
            f"all fall in the eval split (eval_fraction {eval_fraction}, seed {seed}), so training has "
            "nothing to learn; lower training.eval_fraction, raise training.max_length or shorten the prompts"
        )
    return DatasetReport(
        path=redact(str(path)),
        format=record_kind(records),
        examples=len(records),
        tokens_total=sum(counts),
        tokens_max=max(counts),
        over_max_length=sum(c > max_length for c in counts),
        sha256=sha256,
    )


def split_records(records: list[dict], eval_fraction: float, seed: int) -> tuple[Any, Any]:
    """The train and eval splits a job trains on, whichever way it trains (trl or packed):
    datasets' seeded split; no eval split when eval_fraction leaves no example for it."""
    ds = to_hf_dataset(records)
    n_eval = int(len(ds) * eval_fraction)
    if n_eval == 0:
        return ds, None
    split = ds.train_test_split(test_size=n_eval, seed=seed)
    return split["train"], split["test"]


def job_splits(
    path: str | Path, fmt: str, eval_fraction: float, seed: int, expected_sha256: str = ""
) -> tuple[Any, Any]:
    """A job's splits, read from its dataset; a dataset that changed since validation (its hash
    is not `expected_sha256`) is refused: its lineage would name the data validated."""
    records, sha256 = read_dataset(path, fmt)
    if expected_sha256 and sha256 != expected_sha256:
        raise DataError(
            f"{redact(str(path))} changed since the fleet was validated (sha256 {sha256[:12]}..., "
            f"validated {expected_sha256[:12]}...); submit the fleet again to train on the new data"
        )
    return split_records(records, eval_fraction, seed)


def train_indices(n: int, eval_fraction: float, seed: int) -> list[int]:
    """Which of n examples split_records puts in the train split (datasets' split permutes
    positions by the seed alone, whatever the rows hold)."""
    import datasets

    n_eval = int(n * eval_fraction)
    if n_eval == 0:
        return list(range(n))
    split = datasets.Dataset.from_dict({"i": list(range(n))}).train_test_split(test_size=n_eval, seed=seed)
    return list(split["train"]["i"])


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
