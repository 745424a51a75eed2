"""Datasets: JSONL, JSON-array or Parquet rows in `messages`, `sharegpt`, `alpaca` or `text` format, tokenized
with loss masks.

Loss masks come from where text sits, never from token ids: padding is masked by position, so a tokenizer
whose pad token equals its eos token still teaches the model to emit eos at the end of an answer.
"""

from __future__ import annotations

import codecs
import json
import math
import random
from array import array
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from fitune.errors import DataError

IGNORE = -100


@dataclass
class Example:
    input_ids: list[int]
    loss_mask: list[bool]  # True where the token is a target (an assistant token, or any token for text)


@dataclass
class Lengths:
    """Token lengths of a dataset's examples against ``train.seq_len``."""

    seq_len: int
    tokens: array = field(default_factory=lambda: array("I"))  # tokens per example, before truncation
    truncated: int = 0  # examples longer than seq_len + 1 tokens (inputs and shifted targets span seq_len)
    no_target: int = 0  # examples without a target within the kept tokens (load_dataset drops them)

    def keep(self, example: Example) -> tuple[Example, bool]:
        """Count ``example`` and cut it to what training keeps (inputs and shifted targets both span seq_len);
        returns the kept example and whether it still has a target."""
        n_tokens, keep = len(example.input_ids), self.seq_len + 1
        if n_tokens > keep:
            example = Example(example.input_ids[:keep], example.loss_mask[:keep])
        has_target = any(example.loss_mask[1:])
        self.tokens.append(n_tokens)
        self.truncated += n_tokens > keep
        self.no_target += not has_target
        return example, has_target

    def quantile(self, q: float) -> int:
        """The ``q`` quantile of the token lengths (nearest rank)."""
        ordered = sorted(self.tokens)
        return ordered[max(0, math.ceil(q * len(ordered)) - 1)]

    def summary(self) -> str:
        n = len(self.tokens)
        return (
            f"tokens per example over {n} examples: min {min(self.tokens)}, median {self.quantile(0.5)}, "
            f"p95 {self.quantile(0.95)}, max {max(self.tokens)}"
        )


@dataclass
class TokenizedData:
    train: list[Example]
    eval: list[Example]
    format: str
    truncated: int = 0  # examples longer than seq_len, cut
    skipped_lines: list[str] = field(default_factory=list)  # "file:line: reason" when on_bad_line=skip
    dropped_no_target: int = 0  # examples whose targets were all cut away by truncation
    lengths: Lengths | None = None  # token lengths before truncation


def check_data_path(path: Path) -> None:
    """A clear ``data.path`` error for a missing file or a folder."""
    if path.is_dir():
        raise DataError(
            f"data.path: {path} is a folder, not a file; fix: name the JSONL (one example per line) or Parquet "
            "file inside it"
        )
    if not path.is_file():
        raise DataError(
            f"data.path: file not found: {path}; fix: check the path (relative paths resolve "
            "against the recipe's folder)"
        )


def iter_jsonl(
    path: Path, progress: Callable[[int], None] | None = None, *, empty_ok: bool = False
) -> Iterator[tuple[int, dict | None, str | None]]:
    """Stream ``(line number, row, None)`` or ``(line number, None, problem)`` for each non-blank line.

    The file is read in binary and decoded per line, so a UTF-8 BOM, CRLF endings and blank lines are
    accepted and invalid UTF-8 is reported by line and by the bad byte's offset within the file (0-based).
    One line is in memory at a time; ``progress`` is called with the bytes read so far. Raises for a missing
    file, a folder, or a file without a single non-blank line (unless ``empty_ok``).
    """
    check_data_path(path)
    offset = 0  # bytes of the file before the current line
    seen = False
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, 1):
            start, offset = offset, offset + len(raw)
            if progress is not None:
                progress(offset)
            if lineno == 1 and raw.startswith(codecs.BOM_UTF8):
                raw, start = raw[len(codecs.BOM_UTF8) :], start + len(codecs.BOM_UTF8)
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                seen = True
                yield (
                    lineno,
                    None,
                    f"{path}:{lineno}: invalid UTF-8 at byte {start + exc.start} of the file "
                    f"(byte {exc.start} of the line: {raw[exc.start : exc.start + 1]!r})",
                )
                continue
            if not line.strip():
                continue
            seen = True
            try:
                row = json.loads(line)
                if not isinstance(row, dict):
                    raise ValueError(f"expected a JSON object, got {type(row).__name__}")
            except ValueError as exc:  # json.JSONDecodeError is a ValueError
                yield lineno, None, f"{path}:{lineno}: not a valid JSON object ({exc})"
                continue
            yield lineno, row, None
    if not seen and not empty_ok:
        raise DataError(
            f"data.path: {path} is empty (no JSONL lines); fix: add one example per line, or point "
            "data.path at the right file"
        )


PARQUET_BATCH = 512  # rows decoded at a time from a Parquet file


def iter_parquet(
    path: Path, progress: Callable[[int], None] | None = None, *, empty_ok: bool = False
) -> Iterator[tuple[int, dict]]:
    """Stream ``(row number, row)`` for each row of a Parquet file, PARQUET_BATCH rows decoded at a time;
    ``progress`` is called with the share of the file's bytes the rows read so far stand for. Raises for a
    missing file, a folder, a file that is not Parquet, or one without rows (unless ``empty_ok``)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    check_data_path(path)
    try:
        table = pq.ParquetFile(path)
    except (pa.ArrowException, OSError) as exc:
        raise DataError(
            f"data.path: {path} is not a readable Parquet file ({str(exc).splitlines()[0][:160]}); fix: write it "
            "again, or point data.path at the right file"
        ) from None
    rows, size = table.metadata.num_rows, path.stat().st_size
    if rows == 0 and not empty_ok:
        raise DataError(f"data.path: {path} has no rows; fix: point data.path at the right file")
    n = 0
    for batch in table.iter_batches(batch_size=PARQUET_BATCH):
        for row in batch.to_pylist():
            n += 1
            yield n, row
        if progress is not None:
            progress(size * n // rows)


def _is_json_array(path: Path) -> bool:
    """Whether a ``.json`` file holds one JSON array (its first character past a BOM and blanks is ``[``)."""
    if path.suffix.lower() != ".json" or not path.is_file():
        return False
    with open(path, "rb") as f:
        head = f.read(4096).removeprefix(codecs.BOM_UTF8).lstrip()
    return head.startswith(b"[")


def iter_json_array(path: Path, progress: Callable[[int], None] | None = None, *, empty_ok: bool = False):
    """``(where, row, problem)`` for each item of a file holding one JSON array (read whole: such a file
    cannot be streamed by lines), ``where`` being ``file:item N``."""
    try:
        items = json.loads(path.read_bytes().removeprefix(codecs.BOM_UTF8).decode("utf-8"))
    except (ValueError, UnicodeDecodeError) as exc:  # json.JSONDecodeError is a ValueError
        raise DataError(
            f"data.path: {path} starts as a JSON array but does not parse ({exc}); fix: repair it, or write one "
            "JSON object per line (JSONL)"
        ) from None
    if not items and not empty_ok:
        raise DataError(f"data.path: {path} is an empty JSON array; fix: point data.path at the right file")
    if progress is not None:
        progress(path.stat().st_size)
    for n, row in enumerate(items, 1):
        where = f"{path}:item {n}"
        if isinstance(row, dict):
            yield where, row, None
        else:
            yield where, None, f"{where}: not a JSON object (a {type(row).__name__})"


def iter_rows(
    path: Path, progress: Callable[[int], None] | None = None, *, empty_ok: bool = False
) -> Iterator[tuple[str, dict | None, str | None]]:
    """``(where, row, None)`` or ``(where, None, problem)`` for each example of a JSONL, JSON-array or Parquet
    file, ``where`` naming it as ``file:line`` (JSONL), ``file:item N`` (a JSON array) or ``file:row N``
    (Parquet)."""
    if path.suffix.lower() == ".parquet":
        for n, row in iter_parquet(path, progress, empty_ok=empty_ok):
            yield f"{path}:row {n}", row, None
        return
    if _is_json_array(path):
        yield from iter_json_array(path, progress, empty_ok=empty_ok)
        return
    for lineno, row, problem in iter_jsonl(path, progress, empty_ok=empty_ok):
        yield f"{path}:{lineno}", row, problem


BAD_LINE_FIX = "; fix: repair the line (one JSON object, UTF-8) or remove it, or set data.on_bad_line: skip"


FORMAT_KEYS = {"messages": "messages", "sharegpt": "conversations", "alpaca": "instruction", "text": "text"}


def detect_format(row: dict) -> str | None:
    if "messages" in row:
        return "messages"
    if "conversations" in row:
        return "sharegpt"
    if "instruction" in row and "output" in row:
        return "alpaca"
    if "text" in row:
        return "text"
    return None


# ShareGPT's speakers (`from`), as the chat template's roles
SHAREGPT_ROLES = {
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "assistant": "assistant",
    "model": "assistant",
    "chatgpt": "assistant",
    "system": "system",
    "tool": "tool",
    "function": "tool",
    "observation": "tool",
}


def sharegpt_to_messages(turns, where: str) -> list[dict]:
    """ShareGPT's ``conversations`` (``from``/``value`` turns) as messages; an unknown speaker raises."""
    if not isinstance(turns, list) or not turns:
        raise DataError(
            f"{where}: `conversations` must be a non-empty list of {{from, value}}, got {_shown(turns)}; fix: "
            "write the conversation as a list of turns, or set data.on_bad_line: skip"
        )
    messages = []
    for j, turn in enumerate(turns, 1):
        if not isinstance(turn, dict) or "from" not in turn or "value" not in turn:
            raise DataError(
                f"{where}: turn {j} needs `from` and `value`, got {_shown(turn)}; fix: give every turn both, or "
                "set data.on_bad_line: skip"
            )
        role = SHAREGPT_ROLES.get(str(turn["from"]).lower())
        if role is None:
            raise DataError(
                f"{where}: turn {j} is from {_shown(turn['from'])}, not one of {', '.join(SHAREGPT_ROLES)}; "
                "fix: use one of those speakers, or set data.on_bad_line: skip"
            )
        messages.append({"role": role, "content": turn["value"]})
    return messages


def alpaca_to_messages(row: dict) -> list[dict]:
    prompt = row["instruction"] if not row.get("input") else f"{row['instruction']}\n\n{row['input']}"
    return [{"role": "user", "content": prompt}, {"role": "assistant", "content": row["output"]}]


def tokenize_messages(tokenizer, messages: list[dict], where: str) -> Example:
    """Render with the model's chat template; only assistant turns (incl. their end token) carry loss."""
    _check_messages(messages, where)
    text = tokenizer.apply_chat_template(messages, tokenize=False)
    spans = []
    for i, msg in enumerate(messages):
        if msg["role"] != "assistant":
            continue
        before = (
            tokenizer.apply_chat_template(messages[:i], tokenize=False, add_generation_prompt=True)
            if i
            else ""
        )
        upto = tokenizer.apply_chat_template(messages[: i + 1], tokenize=False)
        if not text.startswith(upto) or not upto.startswith(before):
            raise DataError(
                f"{where}: the chat template does not render conversations incrementally, so assistant tokens "
                "cannot be located; fix: use a template whose prefix of a conversation renders as a prefix"
            )
        turn = upto[len(before) :]
        if msg["content"] and msg["content"].strip() not in turn:
            raise DataError(
                f"{where}: the chat template drops the assistant content of message {i + 1}; "
                "fix: use a template that renders assistant messages (check tokenizer_config.json)"
            )
        spans.append((len(before), len(upto)))
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    mask = [
        any(s <= start and end <= e and end > start for s, e in spans) for start, end in enc["offset_mapping"]
    ]
    return Example(list(enc["input_ids"]), mask)


ROLES = ("system", "user", "assistant", "tool")


def _shown(value, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _check_messages(messages, where: str) -> None:
    if not isinstance(messages, list) or not messages:
        raise DataError(
            f"{where}: `messages` must be a non-empty list of {{role, content}}, got {_shown(messages)}; "
            "fix: write the conversation as a list of messages"
        )
    for j, m in enumerate(messages, 1):
        if not isinstance(m, dict) or "role" not in m or "content" not in m:
            raise DataError(
                f"{where}: message {j} needs `role` and `content`, got {_shown(m)}; fix: give every message "
                "both, or set data.on_bad_line: skip"
            )
        if m["role"] not in ROLES:
            raise DataError(
                f"{where}: message {j} has role {_shown(m['role'])}, not one of {', '.join(ROLES)}; "
                "fix: use one of those roles, or set data.on_bad_line: skip"
            )
        if not isinstance(m["content"], str):
            raise DataError(
                f"{where}: message {j} ({m['role']}) has content {_shown(m['content'])} of type "
                f"{type(m['content']).__name__}, not a string; fix: write the content as a JSON string, "
                "or set data.on_bad_line: skip"
            )
    if not any(m["role"] == "assistant" for m in messages):
        raise DataError(
            f"{where}: the conversation has no assistant turn, so nothing would be learned from it; "
            "fix: add an assistant message or remove the line"
        )


def row_content(row: dict, fmt: str, where: str) -> list[dict] | str:
    """What a row trains on: its conversation (messages, sharegpt, alpaca) or its text; a bad row raises, naming
    ``where``.

    The one row check: the doctor's data scan and ``load_dataset`` both call it, so they cannot disagree.
    """
    shown = detect_format(row)
    if FORMAT_KEYS[fmt] not in row and shown not in (None, fmt):  # data.format names another format
        raise DataError(
            f"{where}: the row is in the {shown} format (keys {sorted(row)}), and data.format is {fmt}; fix: set "
            f"data.format: {shown}, or remove data.format to detect it",
            change={"data.format": shown},
        )
    if fmt == "messages":
        _check_messages(row.get("messages"), where)
        return row["messages"]
    if fmt == "sharegpt":
        messages = sharegpt_to_messages(row.get("conversations"), where)
        _check_messages(messages, where)
        return messages
    if fmt == "alpaca":
        missing = [key for key in ("instruction", "output") if key not in row]
        if missing:
            raise DataError(
                f"{where}: alpaca rows need `instruction` and `output`; missing {', '.join(missing)} "
                f"(keys {sorted(row)}); fix: add them, or set data.format to the format of this file"
            )
        for key in ("instruction", "input", "output"):
            value = row.get(key)
            if value is not None and not isinstance(value, str):
                raise DataError(
                    f"{where}: alpaca `{key}` is {_shown(value)} of type {type(value).__name__}, not a "
                    "string; fix: write it as a JSON string, or set data.on_bad_line: skip"
                )
        messages = alpaca_to_messages(row)
        _check_messages(messages, where)
        return messages
    if not isinstance(row.get("text"), str):
        raise DataError(
            f"{where}: text rows need a string `text`; got {_shown(row.get('text'))} (keys {sorted(row)}); "
            "fix: add a `text` string, or set data.format to the format of this file"
        )
    return row["text"]


def format_of(where: str, row: dict, fmt: str | None) -> str:
    """The set format, or the one the first row shows; a row that shows none raises."""
    fmt = fmt or detect_format(row)
    if fmt is None:
        raise DataError(
            f"{where}: cannot tell the format (keys {sorted(row)}); fix: set data.format to "
            "messages (a `messages` list), sharegpt (a `conversations` list), alpaca (`instruction`, `output`) "
            "or text (`text`)"
        )
    return fmt


def check_template(fmt: str, tokenizer) -> None:
    if fmt in ("messages", "sharegpt", "alpaca") and not getattr(tokenizer, "chat_template", None):
        raise DataError(
            f"data.format {fmt} needs a chat template, and the tokenizer has none; fix: set model.tokenizer to "
            "an instruct model's tokenizer, or use data.format: text"
        )


def tokenize_row(tokenizer, content: list[dict] | str, where: str) -> Example:
    """Tokenize what ``row_content`` returned."""
    if isinstance(content, str):
        return tokenize_text(tokenizer, content)
    return tokenize_messages(tokenizer, content, where)


def tokenize_text(tokenizer, text: str) -> Example:
    ids = list(tokenizer(text, add_special_tokens=False)["input_ids"])
    if tokenizer.bos_token_id is not None:
        ids = [tokenizer.bos_token_id, *ids]
    if tokenizer.eos_token_id is not None:
        ids.append(tokenizer.eos_token_id)
    return Example(ids, [True] * len(ids))


@dataclass(frozen=True)
class DataFiles:
    """Where ``recipe.data`` is: the local file of ``data.path``, or the cached files of ``data.hub``'s split."""

    paths: tuple[Path, ...]
    label: str  # the file's path, or "owner/name (split)"
    hub: object | None = None  # the HubSplit of data.hub

    @staticmethod
    def of(files: Path | DataFiles) -> DataFiles:
        """``files`` as DataFiles: a single path becomes a one-file local dataset."""
        return files if isinstance(files, DataFiles) else DataFiles((files,), str(files))

    @property
    def name(self) -> str:
        """What messages call it: the file's name, or "owner/name (split)"."""
        return self.paths[0].name if self.hub is None else self.label

    @property
    def size(self) -> int:
        total = 0
        for path in self.paths:
            try:
                total += path.stat().st_size
            except OSError:
                pass
        return total


def data_files(recipe, *, show_progress: bool = True) -> DataFiles:
    """The files ``recipe.data`` names; a hub dataset's split comes from the cache, else it is downloaded
    (raising ModelSourceError or DataError with the fix when it cannot be)."""
    spec = recipe.data
    if spec.hub is None:
        path = recipe.resolve_path(spec.path)
        return DataFiles((path,), str(path))
    from fitune.data.hub import resolve_split

    split = resolve_split(spec.hub, spec.revision, spec.subset, spec.split, show_progress=show_progress)
    return DataFiles(split.files, split.label, split)


def read_examples(
    files: Path | DataFiles, fmt: str | None, tokenizer=None, progress: Callable[[int], None] | None = None
) -> Iterator[tuple[str, Example | DataError | None]]:
    """Every non-blank line of ``files`` (one file, or a split's files in turn), checked (and, with a tokenizer,
    tokenized) as training reads it: ``(format, result)``, the result being the line's Example (None without a
    tokenizer) or its DataError. A problem with the whole data (missing, empty, unknown format, no chat
    template) raises. The doctor's data check and ``load_dataset`` both read through here, so they cannot
    disagree about a line. ``progress`` is called with the bytes read so far, over all the files."""
    files = DataFiles.of(files)
    paths = files.paths
    found, done = None, 0
    for path in paths:
        step = None if progress is None else (lambda n, base=done: progress(base + n))
        for where, row, problem in iter_rows(path, step, empty_ok=len(paths) > 1):
            if problem is None and found is None:
                found = format_of(where, row, fmt)
                if tokenizer is not None:
                    check_template(found, tokenizer)
            try:
                if problem is not None:
                    raise DataError(problem + BAD_LINE_FIX)
                content = row_content(row, found, where)
                example = tokenize_row(tokenizer, content, where) if tokenizer is not None else None
            except DataError as exc:
                yield found, exc
                continue
            yield found, example
        done += path.stat().st_size
    if found is None and len(paths) > 1:
        raise DataError(
            f"data.hub: {files.label}: its {len(paths)} files hold no example; fix: check data.split and "
            "data.subset"
        )


def load_dataset(
    recipe, tokenizer, progress: Callable[[int], None] | None = None, files: DataFiles | None = None
) -> TokenizedData:
    """Read, check and tokenize ``recipe.data`` (at ``files``, resolved here when not given); ``progress`` is
    called with the bytes read so far."""
    spec = recipe.data
    assert spec is not None
    files = files or data_files(recipe)
    skipped: list[str] = []
    fmt: str | None = None
    examples: list[Example] = []
    lengths = Lengths(recipe.train.seq_len)
    for found, result in read_examples(files, spec.format, tokenizer, progress):
        fmt = found
        if isinstance(result, DataError):
            if spec.on_bad_line == "skip":
                skipped.append(str(result).partition("; fix: ")[0])
                continue
            raise result
        example, has_target = lengths.keep(result)
        if has_target:
            examples.append(example)
    if not examples:
        raise DataError(
            f"{files.label}: no usable examples (all skipped, or without targets within train.seq_len "
            f"{recipe.train.seq_len}); fix: repair the data, or raise train.seq_len"
        )
    rng = random.Random(recipe.train.seed)
    order = list(range(len(examples)))
    rng.shuffle(order)
    n_eval = int(round(len(examples) * spec.eval_fraction))
    if spec.eval_fraction > 0 and len(examples) >= 2:
        n_eval = max(1, n_eval)
    eval_ids, train_ids = order[:n_eval], order[n_eval:]
    return TokenizedData(
        train=[examples[i] for i in train_ids],
        eval=[examples[i] for i in eval_ids],
        format=fmt,
        truncated=lengths.truncated,
        skipped_lines=skipped,
        dropped_no_target=lengths.no_target,
        lengths=lengths,
    )
