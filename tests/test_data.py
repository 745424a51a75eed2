import json

import pytest

from fitune.data.batching import collate
from fitune.data.dataset import IGNORE, load_dataset, tokenize_messages
from fitune.errors import DataError
from fitune.models.byte_tokenizer import byte_tokenizer
from fitune.recipe import Recipe

from .conftest import TINY_LLAMA, write_chat_data


@pytest.fixture(scope="module")
def tok():
    return byte_tokenizer()


def _recipe(path, **data):
    return Recipe.from_dict(
        {"model": {"config": TINY_LLAMA}, "data": {"path": str(path), **data}, "train": {"seq_len": 64}}
    )


def test_only_assistant_tokens_and_their_end_token_carry_loss(tok):
    msgs = [
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "yo"},
        {"role": "user", "content": "again"},
        {"role": "assistant", "content": "ok"},
    ]
    ex = tokenize_messages(tok, msgs, "t:1")
    target_text = tok.decode([i for i, m in zip(ex.input_ids, ex.loss_mask, strict=True) if m])
    assert target_text == "yo<|eos|>\nok<|eos|>\n"
    # the end-of-turn token equals the pad token's role here: it must still be a target
    assert tok.eos_token_id in [i for i, m in zip(ex.input_ids, ex.loss_mask, strict=True) if m]


def test_pad_equal_to_eos_still_teaches_stopping(tok):
    tok.pad_token = tok.eos_token  # the classic trap
    ex = tokenize_messages(
        tok, [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}], "t:1"
    )
    short = tokenize_messages(
        tok, [{"role": "user", "content": "a"}, {"role": "assistant", "content": ""}], "t:2"
    )
    batch = collate([ex, short], pad_id=tok.pad_token_id, pad_to=40)
    targets = batch.targets_BT[0].tolist()
    assert tok.eos_token_id in targets  # eos of the answer is learned
    n = int(batch.attention_mask_BT[0].sum())
    assert all(t == IGNORE for t in targets[n:])  # padding (same id as eos) is not
    assert batch.input_ids_BT.shape == (2, 40)


def test_targets_are_shifted_inputs(tok):
    ex = tokenize_messages(
        tok, [{"role": "user", "content": "q"}, {"role": "assistant", "content": "answer"}], "x"
    )
    b = collate([ex], pad_id=0)
    ids, tg = b.input_ids_BT[0].tolist(), b.targets_BT[0].tolist()
    for t in range(len(tg) - 1):
        if tg[t] != IGNORE:
            assert tg[t] == ids[t + 1]


def test_corrupt_line_reported_as_file_and_line(tmp_path, tok):
    path = write_chat_data(tmp_path / "d.jsonl", n=10)
    lines = path.read_text().splitlines()
    lines[6] = '{"messages": [ broken'
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(DataError, match=rf"{path}:7: not a valid JSON object"):
        load_dataset(_recipe(path), tok)
    data = load_dataset(_recipe(path, on_bad_line="skip"), tok)
    assert len(data.train) + len(data.eval) == 9
    assert data.skipped_lines and f"{path}:7" in data.skipped_lines[0]


def test_no_assistant_turn_is_an_error(tmp_path, tok):
    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps({"messages": [{"role": "user", "content": "hello"}]}) + "\n")
    with pytest.raises(DataError, match=r"d.jsonl:1: the conversation has no assistant turn"):
        load_dataset(_recipe(path), tok)


def test_empty_dataset_and_missing_file(tmp_path, tok):
    empty = tmp_path / "e.jsonl"
    empty.write_text("\n")
    with pytest.raises(DataError, match=rf"data.path: {empty} is empty"):
        load_dataset(_recipe(empty), tok)
    with pytest.raises(DataError, match="file not found"):
        load_dataset(_recipe(tmp_path / "missing.jsonl"), tok)


def test_long_examples_truncated_and_counted(tmp_path, tok):
    path = tmp_path / "d.jsonl"
    rows = [{"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": "y" * 200}]}] * 3
    rows.append({"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": "short"}]})
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    data = load_dataset(_recipe(path, eval_fraction=0.0), tok)
    assert data.truncated == 3
    assert all(len(e.input_ids) <= 65 for e in data.train)


def test_alpaca_and_text_formats_detected(tmp_path, tok):
    a = tmp_path / "a.jsonl"
    a.write_text(json.dumps({"instruction": "add", "input": "1 2", "output": "3"}) + "\n")
    da = load_dataset(_recipe(a, eval_fraction=0.0), tok)
    assert da.format == "alpaca"
    ex = da.train[0]
    assert tok.decode([i for i, m in zip(ex.input_ids, ex.loss_mask, strict=True) if m]) == "3<|eos|>\n"
    t = tmp_path / "t.jsonl"
    t.write_text(json.dumps({"text": "plain words"}) + "\n")
    dt = load_dataset(_recipe(t, eval_fraction=0.0), tok)
    assert dt.format == "text" and all(dt.train[0].loss_mask)


def test_template_that_drops_assistant_content_is_refused(tmp_path, tok):
    tok2 = byte_tokenizer()
    tok2.chat_template = (
        "{% for m in messages %}{% if m['role'] == 'user' %}{{ m['content'] }}{% endif %}{% endfor %}"
    )
    with pytest.raises(DataError, match="drops the assistant content"):
        tokenize_messages(
            tok2, [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}], "f:3"
        )
