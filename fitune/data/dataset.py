"""Datasets: JSONL in `messages`, `alpaca` or `text` format, tokenized with loss masks.

Loss masks come from where text sits, never from token ids: padding is masked by position, so a tokenizer
whose pad token equals its eos token still teaches the model to emit eos at the end of an answer.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass, field
from pathlib import Path

from fitune.errors import DataError

IGNORE = -100


@dataclass
class Example:
    input_ids: list[int]
    loss_mask: list[bool]  # True where the token is a target (an assistant token, or any token for text)


@dataclass
class TokenizedData:
    train: list[Example]
    eval: list[Example]
    format: str
    truncated: int = 0  # examples longer than seq_len, cut
    skipped_lines: list[str] = field(default_factory=list)  # "file:line: reason" when on_bad_line=skip
    dropped_no_target: int = 0  # examples whose targets were all cut away by truncation


def read_jsonl(path: Path, on_bad_line: str = "error") -> tuple[list[tuple[int, dict]], list[str]]:
    """Rows with their 1-based line numbers; a corrupt line raises (or is listed, with on_bad_line=skip)."""
    if not path.is_file():
        raise DataError(
            f"data.path: file not found: {path}; fix: check the path (relative paths resolve "
            "against the recipe's folder)"
        )
    rows, skipped = [], []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                if not isinstance(row, dict):
                    raise ValueError(f"expected a JSON object, got {type(row).__name__}")
            except (json.JSONDecodeError, ValueError) as exc:
                problem = f"{path}:{lineno}: not a valid JSON object ({exc})"
                if on_bad_line == "skip":
                    skipped.append(problem)
                    continue
                raise DataError(
                    problem + "; fix: repair or remove the line, or set data.on_bad_line: skip"
                ) from None
            rows.append((lineno, row))
    if not rows:
        raise DataError(f"{path}: the dataset has no examples; fix: add JSONL lines")
    return rows, skipped


def detect_format(row: dict) -> str | None:
    if "messages" in row:
        return "messages"
    if "instruction" in row and "output" in row:
        return "alpaca"
    if "text" in row:
        return "text"
    return None


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


def _check_messages(messages, where: str) -> None:
    if not isinstance(messages, list) or not messages:
        raise DataError(f"{where}: `messages` must be a non-empty list of {{role, content}}")
    for j, m in enumerate(messages):
        if not isinstance(m, dict) or "role" not in m or "content" not in m:
            raise DataError(f"{where}: message {j + 1} needs `role` and `content`, got {m!r}")
    if not any(m["role"] == "assistant" for m in messages):
        raise DataError(
            f"{where}: the conversation has no assistant turn, so nothing would be learned from it; "
            "fix: add an assistant message or remove the line"
        )


def tokenize_text(tokenizer, text: str) -> Example:
    ids = list(tokenizer(text, add_special_tokens=False)["input_ids"])
    if tokenizer.bos_token_id is not None:
        ids = [tokenizer.bos_token_id, *ids]
    if tokenizer.eos_token_id is not None:
        ids.append(tokenizer.eos_token_id)
    return Example(ids, [True] * len(ids))


def load_dataset(recipe, tokenizer) -> TokenizedData:
    spec = recipe.data
    assert spec is not None
    path = recipe.resolve_path(spec.path)
    rows, skipped = read_jsonl(path, spec.on_bad_line)
    fmt = spec.format or detect_format(rows[0][1])
    if fmt is None:
        raise DataError(
            f"{path}:{rows[0][0]}: cannot tell the format (keys {sorted(rows[0][1])}); fix: set data.format to "
            "messages (a `messages` list), alpaca (`instruction`, `output`) or text (`text`)"
        )
    if fmt in ("messages", "alpaca") and not getattr(tokenizer, "chat_template", None):
        raise DataError(
            f"data.format {fmt} needs a chat template, and the tokenizer has none; fix: set model.tokenizer to "
            "an instruct model's tokenizer, or use data.format: text"
        )
    examples: list[Example] = []
    truncated = dropped = 0
    seq_len = recipe.train.seq_len + 1  # inputs and shifted targets both span seq_len
    for lineno, row in rows:
        where = f"{path}:{lineno}"
        try:
            if fmt == "messages":
                ex = tokenize_messages(tokenizer, row.get("messages"), where)
            elif fmt == "alpaca":
                if "instruction" not in row or "output" not in row:
                    raise DataError(
                        f"{where}: alpaca rows need `instruction` and `output`; got {sorted(row)}"
                    )
                ex = tokenize_messages(tokenizer, alpaca_to_messages(row), where)
            else:
                if not isinstance(row.get("text"), str):
                    raise DataError(f"{where}: text rows need a string `text`; got keys {sorted(row)}")
                ex = tokenize_text(tokenizer, row["text"])
        except DataError as exc:
            if spec.on_bad_line == "skip":
                skipped.append(str(exc))
                continue
            raise
        if len(ex.input_ids) > seq_len:
            truncated += 1
            ex = Example(ex.input_ids[:seq_len], ex.loss_mask[:seq_len])
        if not any(ex.loss_mask[1:]):
            dropped += 1
            continue
        examples.append(ex)
    if not examples:
        raise DataError(f"{path}: no usable examples (all skipped or without targets within seq_len)")
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
        truncated=truncated,
        skipped_lines=skipped,
        dropped_no_target=dropped,
    )
