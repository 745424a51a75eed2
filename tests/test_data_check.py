"""The preflight reads the data: bad lines as file:line before any weight, encodings, roles, token lengths."""

from __future__ import annotations

import json
import re
import tracemalloc
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

import fitune
from fitune.cli import EXIT_DOCTOR, app
from fitune.data.dataset import load_dataset
from fitune.data.scan import scan_dataset
from fitune.errors import DataError
from fitune.models.byte_tokenizer import byte_tokenizer
from fitune.recipe import Recipe

from .conftest import tiny_recipe

QUIET = {"progress": False, "echo": lambda *a: None}


def _write(tmp_path: Path, recipe: dict) -> Path:
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


def _flat(output: str) -> str:
    return " ".join(output.split())


def _replace_line(path: Path, lineno: int, text: str) -> str:
    good = path.read_text()
    lines = good.splitlines()
    lines[lineno - 1] = text
    path.write_text("\n".join(lines) + "\n")
    return good


def _data_findings(recipe: dict):
    return [f for f in fitune.doctor(Recipe.from_dict(recipe)) if f.rule_id.startswith("data-")]


@pytest.fixture
def no_weights(monkeypatch):
    """Fail the test if a model is built (no weight may load before the data is checked)."""
    import fitune.trainer.run as run_module

    def refuse(*args, **kwargs):
        raise AssertionError("a model was built before the data check finished")

    monkeypatch.setattr(run_module, "build_session", refuse)


def test_doctor_names_a_corrupt_line_7_and_the_fixed_file_passes(tmp_path, no_weights):
    recipe = tiny_recipe(tmp_path)
    data = Path(recipe["data"]["path"])
    good = _replace_line(data, 7, '{"messages": [oops')
    path = _write(tmp_path, recipe)
    result = CliRunner().invoke(app, ["doctor", str(path)])
    assert result.exit_code == EXIT_DOCTOR, result.output
    assert (
        f"error [data-bad-lines] 1 bad line(s) in train.jsonl: {data}:7: not a valid JSON object "
        "(Expecting value: line 1 column 15 (char 14)) fix: repair or remove those lines, or set "
        "data.on_bad_line: skip to drop them"
    ) in _flat(result.output)
    data.write_text(good)
    fixed = CliRunner().invoke(app, ["doctor", str(path)])
    assert fixed.exit_code == 0, fixed.output
    assert "error" not in fixed.output and "train.jsonl:" not in fixed.output
    assert (
        "note [data-token-lengths] messages data, tokens per example over 48 examples: min 29, median 30, "
        "p95 31, max 31: train.seq_len 32 covers every example"
    ) in _flat(fixed.output)


def test_train_stops_on_bad_data_before_any_weight_and_the_fixed_rerun_trains_without_a_flag(
    tmp_path, monkeypatch
):
    recipe = tiny_recipe(tmp_path)
    data = Path(recipe["data"]["path"])
    good = _replace_line(data, 7, '{"messages": [oops')
    path = _write(tmp_path, recipe)
    import fitune.trainer.run as run_module

    real = run_module.build_session
    monkeypatch.setattr(run_module, "build_session", lambda *a, **k: pytest.fail("model built on bad data"))
    result = CliRunner().invoke(app, ["train", str(path), "--max-steps", "1", "--no-progress"])
    assert result.exit_code == EXIT_DOCTOR, result.output
    assert f"{data}:7: not a valid JSON object" in _flat(result.output)
    assert "preflight found errors" in result.output
    assert not (tmp_path / "run").exists()  # nothing written: the re-run needs no --overwrite
    data.write_text(good)
    monkeypatch.setattr(run_module, "build_session", real)
    again = CliRunner().invoke(app, ["train", str(path), "--max-steps", "1", "--no-progress"])
    assert again.exit_code == 0, again.output
    assert "tokens per example over 48 examples: min 29, median 30, p95 31, max 31" in _flat(again.output)


@pytest.mark.parametrize(
    ("line", "message"),
    [
        (
            {"messages": [{"role": "user", "content": "say 1"}, {"role": "bot", "content": "one"}]},
            "message 2 has role 'bot', not one of system, user, assistant, tool; fix: use one of those "
            "roles, or set data.on_bad_line: skip",
        ),
        (
            {"messages": [{"role": "user", "content": "say 1"}, {"role": "assistant", "content": 1}]},
            "message 2 (assistant) has content 1 of type int, not a string; fix: write the content as a "
            "JSON string, or set data.on_bad_line: skip",
        ),
        (
            {"messages": [{"role": "user", "content": "say 1"}]},
            "the conversation has no assistant turn, so nothing would be learned from it; fix: add an "
            "assistant message or remove the line",
        ),
        (
            {"messages": [{"role": "user"}]},
            "message 1 needs `role` and `content`, got {'role': 'user'}; fix: give every message both, or "
            "set data.on_bad_line: skip",
        ),
    ],
    ids=["unknown-role", "number-content", "no-assistant", "no-content"],
)
def test_bad_rows_are_named_by_the_doctor_and_by_training_alike(tmp_path, line, message):
    recipe = tiny_recipe(tmp_path)
    data = Path(recipe["data"]["path"])
    good = _replace_line(data, 5, json.dumps(line))
    with pytest.raises(DataError) as raised:
        fitune.train(recipe, max_steps=1, **QUIET)
    assert str(raised.value).startswith(f"{data}:5: {message}")
    (finding,) = [f for f in _data_findings(recipe) if f.rule_id == "data-bad-lines"]
    assert finding.severity == "error" and f"{data}:5: {message.partition('; fix: ')[0]}" in finding.message
    data.write_text(good)
    result = fitune.train(recipe, max_steps=1, **QUIET)  # the same folder, no flag
    assert result.steps == 1


def test_bom_crlf_and_blank_lines_read_as_the_plain_file(tmp_path):
    recipe = tiny_recipe(tmp_path)
    data = Path(recipe["data"]["path"])
    plain = load_dataset(Recipe.from_dict(recipe), byte_tokenizer())
    lines = data.read_text().splitlines()
    data.write_bytes(
        b"\xef\xbb\xbf"
        + b"\r\n".join(line.encode() + (b"\r\n" if i % 5 == 0 else b"") for i, line in enumerate(lines))
        + b"\r\n\r\n"
    )
    windows = load_dataset(Recipe.from_dict(recipe), byte_tokenizer())
    assert [e.input_ids for e in windows.train] == [e.input_ids for e in plain.train]
    assert [e.input_ids for e in windows.eval] == [e.input_ids for e in plain.eval]
    assert windows.skipped_lines == [] and _data_findings(recipe)[0].severity == "note"


def test_invalid_utf8_is_named_by_line_and_byte_and_skip_is_honoured(tmp_path):
    recipe = tiny_recipe(tmp_path)
    data = Path(recipe["data"]["path"])
    raw = data.read_bytes().splitlines(keepends=True)
    bad = raw[2].replace(b"say", b"s\xffy")
    data.write_bytes(b"".join(raw[:2]) + bad + b"".join(raw[3:]))
    column = bad.index(b"\xff")
    offset = len(raw[0]) + len(raw[1]) + column
    expected = f"{data}:3: invalid UTF-8 at byte {offset} of the file (byte {column} of the line: b'\\xff')"
    with pytest.raises(DataError) as raised:
        fitune.train(recipe, max_steps=1, **QUIET)
    assert str(raised.value) == (
        expected
        + "; fix: repair the line (one JSON object, UTF-8) or remove it, or set data.on_bad_line: skip"
    )
    finding = _data_findings(recipe)[0]
    assert finding.rule_id == "data-bad-lines" and finding.severity == "error" and expected in finding.message
    recipe["data"]["on_bad_line"] = "skip"
    findings = _data_findings(recipe)
    assert [f.severity for f in findings] == ["warning", "note"]
    assert "(skipped: data.on_bad_line is skip)" in findings[0].message
    lines = []
    result = fitune.train(recipe, max_steps=1, progress=False, echo=lines.append)
    assert result.steps == 1
    assert f"  skipped {expected}" in lines


def test_token_lengths_truncation_and_lost_targets(tmp_path):
    recipe = tiny_recipe(tmp_path)
    data = Path(recipe["data"]["path"])
    long_prompt = {"messages": [{"role": "user", "content": "x" * 60}, {"role": "assistant", "content": "y"}]}
    with open(data, "a") as f:
        f.write(json.dumps(long_prompt) + "\n")
    (note,) = _data_findings(recipe)
    assert note.severity == "warning" and note.rule_id == "data-token-lengths"
    assert note.message == (
        "messages data, tokens per example over 49 examples: min 29, median 30, p95 31, max 82; 1 of 49 "
        "(2.0%) are longer than train.seq_len 32 and are cut; 1 of them lose all their targets and are dropped"
    )
    assert note.fix_text == (
        "train.seq_len: 128 covers every example; 32 covers 98.0% (check the memory with `fitune plan`)"
    )
    recipe["train"]["seq_len"] = 8
    findings = _data_findings(recipe)
    assert [f.rule_id for f in findings] == ["data-no-targets", "data-token-lengths"]
    assert findings[0].message == "every example of train.jsonl loses all its targets within train.seq_len 8"


def test_the_scan_streams_in_constant_memory_with_progress_by_bytes(tmp_path):
    path = tmp_path / "big.jsonl"
    row = json.dumps({"text": "a line of training text " * 4}) + "\n"
    with open(path, "w") as f:
        f.write(row * 100_000)
    size = path.stat().st_size
    seen = {"calls": 0, "last": 0, "ordered": True}

    def progress(done: int) -> None:
        seen["ordered"] &= done >= seen["last"]
        seen["calls"] += 1
        seen["last"] = done

    tracemalloc.start()
    scan = scan_dataset(path, None, 32, progress=progress)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert scan.examples == 100_000 and scan.bad_count == 0 and scan.format == "text"
    assert seen == {"calls": 100_000, "last": size, "ordered": True}
    assert peak < 2**18, f"{peak:,} B traced while reading {size:,} B"


def test_a_large_file_gets_a_progress_bar_on_a_terminal_only(tmp_path, monkeypatch):
    import io
    import sys

    import fitune.data.scan as scan

    path = tmp_path / "data.jsonl"
    path.write_text(json.dumps({"text": "x"}) + "\n")
    with scan.byte_progress(path, "checking") as progress:
        assert progress is None  # small file
    monkeypatch.setattr(scan, "PROGRESS_FROM_BYTES", 1)
    with scan.byte_progress(path, "checking") as progress:
        assert progress is None  # stderr is not a terminal under pytest
    monkeypatch.setattr(sys, "stderr", type("Tty", (io.StringIO,), {"isatty": lambda self: True})())
    with scan.byte_progress(path, "checking") as progress:
        assert progress is not None
        assert scan.scan_dataset(path, None, 8, progress=progress).examples == 1
    with scan.byte_progress(path, "checking", show=False) as progress:
        assert progress is None  # --no-progress


def _to_parquet(jsonl: Path, parquet: Path, replace: dict[int, dict] | None = None) -> Path:
    """The rows of ``jsonl`` (row N replaced by ``replace[N]``) as a Parquet file of several row groups."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = [json.loads(line) for line in jsonl.read_text().splitlines()]
    for number, row in (replace or {}).items():
        rows[number - 1] = row
    pq.write_table(pa.Table.from_pylist(rows), parquet, row_group_size=16)
    return parquet


def test_a_parquet_file_reads_as_its_jsonl_and_a_bad_row_is_named_by_number(tmp_path):
    recipe = tiny_recipe(tmp_path)
    jsonl = Path(recipe["data"]["path"])
    plain = load_dataset(Recipe.from_dict(recipe), byte_tokenizer())
    parquet = _to_parquet(jsonl, tmp_path / "train.parquet")
    recipe["data"]["path"] = str(parquet)
    table = load_dataset(Recipe.from_dict(recipe), byte_tokenizer())
    assert [e.input_ids for e in table.train] == [e.input_ids for e in plain.train]
    assert [e.loss_mask for e in table.eval] == [e.loss_mask for e in plain.eval]
    bot = {"messages": [{"role": "user", "content": "say 1"}, {"role": "bot", "content": "one"}]}
    _to_parquet(jsonl, parquet, {7: bot})
    message = f"{parquet}:row 7: message 2 has role 'bot', not one of system, user, assistant, tool"
    (finding,) = [f for f in _data_findings(recipe) if f.rule_id == "data-bad-lines"]
    assert finding.severity == "error" and message in finding.message
    with pytest.raises(DataError, match=re.escape(message)):
        fitune.train(recipe, max_steps=1, **QUIET)
    parquet.write_bytes(b'{"messages": []}\n')  # JSON under a .parquet name
    (unreadable,) = [f for f in _data_findings(recipe) if f.rule_id == "data-unreadable"]
    assert f"data.path: {parquet} is not a readable Parquet file" in unreadable.message
    _to_parquet(jsonl, parquet)
    assert fitune.train(recipe, max_steps=1, **QUIET).steps == 1  # the same folder, no flag


def test_a_json_array_file_reads_as_its_jsonl_and_names_a_bad_item(tmp_path):
    recipe = tiny_recipe(tmp_path)
    jsonl = Path(recipe["data"]["path"])
    plain = load_dataset(Recipe.from_dict(recipe), byte_tokenizer())
    rows = [json.loads(line) for line in jsonl.read_text().splitlines()]
    array = tmp_path / "train.json"
    array.write_text(json.dumps(rows, indent=2))  # one array over many lines, as alpaca_data.json is written
    recipe["data"]["path"] = str(array)
    read = load_dataset(Recipe.from_dict(recipe), byte_tokenizer())
    assert [e.input_ids for e in read.train] == [e.input_ids for e in plain.train]
    rows[2] = "say 2"
    array.write_text(json.dumps(rows, indent=2))
    (finding,) = [f for f in _data_findings(recipe) if f.rule_id == "data-bad-lines"]
    assert f"{array}:item 3: not a JSON object (a str)" in finding.message


def test_sharegpt_rows_train_as_their_messages_and_an_unknown_speaker_is_named(tmp_path):
    recipe = tiny_recipe(tmp_path)
    jsonl = Path(recipe["data"]["path"])
    plain = load_dataset(Recipe.from_dict(recipe), byte_tokenizer())
    speaker = {"user": "human", "assistant": "gpt"}
    rows = [
        {
            "conversations": [
                {"from": speaker[m["role"]], "value": m["content"]} for m in json.loads(line)["messages"]
            ]
        }
        for line in jsonl.read_text().splitlines()
    ]
    shared = tmp_path / "sharegpt.jsonl"
    shared.write_text("".join(json.dumps(row) + "\n" for row in rows))
    recipe["data"]["path"] = str(shared)
    read = load_dataset(Recipe.from_dict(recipe), byte_tokenizer())
    assert read.format == "sharegpt"
    assert [(e.input_ids, e.loss_mask) for e in read.train] == [
        (e.input_ids, e.loss_mask) for e in plain.train
    ]
    rows[3]["conversations"][1]["from"] = "bot"
    shared.write_text("".join(json.dumps(row) + "\n" for row in rows))
    (finding,) = [f for f in _data_findings(recipe) if f.rule_id == "data-bad-lines"]
    assert f"{shared}:4: turn 2 is from 'bot', not one of human, user, gpt, assistant" in finding.message
    recipe["data"]["format"] = "messages"  # a recipe written for another file
    (finding,) = [f for f in _data_findings(recipe) if f.rule_id == "data-bad-lines"]
    assert (
        f"{shared}:1: the row is in the sharegpt format (keys ['conversations']), and data.format is messages"
    ) in finding.message
    assert finding.fix == {"data.format": "sharegpt"}  # every bad line has that one fix: --fix writes it
    assert finding.fix_text == "set data.format: sharegpt, or remove data.format to detect it"
    with pytest.raises(DataError, match="fix: set data.format: sharegpt, or remove data.format to detect it"):
        fitune.train(recipe, max_steps=1, **QUIET)
    fixed = CliRunner().invoke(app, ["doctor", str(_write(tmp_path, recipe)), "--fix"])
    assert "1 error(s) remain in the corrected recipe" in fixed.output, fixed.output  # line 4's speaker
    assert yaml.safe_load((tmp_path / "r.fixed.yaml").read_text())["data"]["format"] == "sharegpt"
