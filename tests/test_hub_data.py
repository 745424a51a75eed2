"""Datasets from the Hub (``data.hub``) through the real huggingface_hub client, against the stand-in Hub on
127.0.0.1 (tests/hubserver.py): a split is downloaded into the Hugging Face cache, trained on, recorded, found
again without a request (pinned revisions too), completed when a file is missing, and every failure ends in
fitune's message with the fix."""

from __future__ import annotations

import json

import pytest
import yaml
from typer.testing import CliRunner

from fitune.cli import EXIT_DOCTOR, app
from fitune.data.hub import split_files
from fitune.errors import DataError
from fitune.recipe import Recipe

from .conftest import tiny_recipe
from .hubserver import FakeHub, serving

DATA = "someone/chat-data"
WORDS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]


def _lines(start: int, n: int) -> bytes:
    rows = []
    for i in range(start, start + n):
        k = i % 10
        msgs = [{"role": "user", "content": f"say {k}"}, {"role": "assistant", "content": WORDS[k]}]
        rows.append(json.dumps({"messages": msgs}))
    return ("\n".join(rows) + "\n").encode()


CARD = b"""---
license: apache-2.0
configs:
- config_name: default
  data_files:
  - split: train
    path: data/train-*
  - split: test
    path: data/test-*
---
# chat data
"""
FILES = {
    "README.md": CARD,
    "data/train-00000-of-00002.jsonl": _lines(0, 24),
    "data/train-00001-of-00002.jsonl": _lines(24, 24),
    "data/test-00000-of-00001.jsonl": _lines(0, 6),
    ".gitattributes": b"*.jsonl filter=lfs\n",
}


@pytest.fixture
def hub(tmp_path, monkeypatch):
    fake = FakeHub()
    fake.add(DATA, {**FILES, "data/train-00000-of-00002.jsonl": _lines(0, 10)}, tag="v1", dataset=True)
    fake.add(DATA, FILES, dataset=True)
    with serving(fake, tmp_path, monkeypatch):
        yield fake


def _write(tmp_path, **data) -> str:
    recipe = tiny_recipe(tmp_path)
    recipe["data"] = {"hub": DATA, "eval_fraction": 0.1, **data}
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return str(path)


def _flat(text: str) -> str:
    return " ".join(text.split())


def _train(path: str, *extra: str):
    return CliRunner().invoke(app, ["train", path, "--max-steps", "2", "--no-progress", *extra])


def test_train_on_a_hub_dataset_downloads_its_split_once_and_records_it(hub, tmp_path):
    path = _write(tmp_path)
    result = _train(path)
    assert result.exit_code == 0, result.output
    fetched = sorted(p for method, p in hub.requests if method == "GET" and "/resolve/" in p)
    assert fetched == [
        f"/datasets/{DATA}/resolve/{hub.repos[f'datasets/{DATA}'].refs['main']}/{name}"
        for name in ("README.md", "data/train-00000-of-00002.jsonl", "data/train-00001-of-00002.jsonl")
    ]  # the train split and the card only: not the test split, not .gitattributes
    assert "43 train / 5 eval examples (messages)" in _flat(result.output)  # 48 rows, both files
    marker = json.loads((tmp_path / "run" / "fitune-run.json").read_text())
    assert marker["status"] == "done"
    assert marker["data"] == {
        "hub_id": DATA,
        "revision": None,
        "commit": hub.repos[f"datasets/{DATA}"].refs["main"],
        "subset": None,
        "split": "train",
    }
    hub.requests.clear()
    again = _train(path, "--overwrite")
    assert again.exit_code == 0, again.output
    assert hub.requests == []  # the whole split from the cache: no request


def test_a_pinned_revision_is_read_and_found_again_offline(hub, tmp_path, monkeypatch):
    path = _write(tmp_path, revision="v1", split="test")
    result = _train(path)
    assert result.exit_code == 0, result.output
    marker = json.loads((tmp_path / "run" / "fitune-run.json").read_text())
    assert marker["data"]["commit"] == hub.repos[f"datasets/{DATA}"].refs["v1"]
    assert "5 train / 1 eval examples" in _flat(result.output)  # the test split: 6 rows
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    hub.requests.clear()
    again = _train(path, "--overwrite")
    assert again.exit_code == 0, again.output
    assert hub.requests == []
    train = _write(tmp_path, revision="v1")  # its train split was never downloaded: said, with the fix
    missing = CliRunner().invoke(app, ["doctor", train])
    assert missing.exit_code == EXIT_DOCTOR
    assert (
        f"error [data-unreadable] data.hub: the train split of hub id '{DATA}': not in the local Hugging Face "
        "cache"
    ) in _flat(missing.output)
    assert "HF_HUB_OFFLINE is set" in missing.output and "Traceback" not in missing.output


def test_a_file_missing_from_the_cached_split_is_fetched_alone(hub, tmp_path):
    path = _write(tmp_path)
    assert CliRunner().invoke(app, ["doctor", path]).exit_code == 0
    commit = hub.repos[f"datasets/{DATA}"].refs["main"]
    snapshot = tmp_path / "hf-cache" / f"datasets--{DATA.replace('/', '--')}" / "snapshots" / commit
    cut = snapshot / "data/train-00001-of-00002.jsonl"
    cut.resolve().unlink()  # the file's content, as if its download never finished
    cut.unlink()
    hub.requests.clear()
    result = _train(path)
    assert result.exit_code == 0, result.output
    fetched = [p for method, p in hub.requests if method == "GET" and p.endswith(".jsonl")]
    assert fetched == [f"/datasets/{DATA}/resolve/{commit}/data/train-00001-of-00002.jsonl"]
    assert "43 train / 5 eval examples" in _flat(result.output)


def test_the_doctor_names_a_bad_line_of_a_hub_file_by_its_cached_path(hub, tmp_path):
    bad = _lines(0, 24).split(b"\n")
    bad[6] = b'{"messages": [oops'
    hub.add(DATA, {**FILES, "data/train-00001-of-00002.jsonl": b"\n".join(bad)}, dataset=True)
    result = CliRunner().invoke(app, ["doctor", _write(tmp_path)])
    assert result.exit_code == EXIT_DOCTOR, result.output
    commit = hub.repos[f"datasets/{DATA}"].refs["main"]
    cached = tmp_path / "hf-cache" / f"datasets--{DATA.replace('/', '--')}" / "snapshots" / commit
    assert (
        f"error [data-bad-lines] 1 bad line(s) in {DATA} (train): {cached}/data/train-00001-of-00002.jsonl:7: "
        "not a valid JSON object"
    ) in _flat(result.output)


@pytest.mark.parametrize(
    ("flags", "data", "message"),
    [
        (
            {"gated": True},
            {},
            "error: data.hub: {repo} is a gated dataset and this machine has no access to it; fix: sign in at "
            "{url}/datasets/{repo}, accept its licence there, then set HF_TOKEN to an access token of that "
            "account (https://huggingface.co/settings/tokens)",
        ),
        (
            {"private": True},
            {},
            "error: data.hub: no dataset repository '{repo}' at {url} (or it is private); fix: check the id "
            "(owner/name, as in its address), and for a private dataset set HF_TOKEN to a token with access",
        ),
        (
            {},
            {"revision": "v9"},
            "error: data.revision: 'v9' is not a branch, tag or commit of {repo}; fix: name one listed at "
            "{url}/datasets/{repo}, or remove data.revision for the main branch",
        ),
        (
            {},
            {"split": "validation"},
            "error: data.split: 'validation' is not a split of subset 'default' of {repo} (it has test, train); "
            "fix: set data.split to one of them",
        ),
    ],
    ids=["gated", "private", "revision", "split"],
)
def test_hub_dataset_failures_end_in_fitunes_words(tmp_path, monkeypatch, flags, data, message):
    fake = FakeHub()
    repo = "someone/other-data"
    fake.add(repo, FILES, dataset=True, **flags)
    with serving(fake, tmp_path, monkeypatch):
        recipe = tiny_recipe(tmp_path)
        recipe["data"] = {"hub": repo, **data}
        path = tmp_path / "r.yaml"
        path.write_text(yaml.safe_dump(recipe))
        result = CliRunner().invoke(app, ["train", str(path), "--no-progress"])
        assert result.exit_code == EXIT_DOCTOR, result.output
        error = message.format(repo=repo, url=fake.url).replace("error: ", "error [data-unreadable] ")
        error = error.replace("; fix: ", " fix: ")  # the doctor prints the fix on its own line
        assert _flat(error) in _flat(result.output)
        assert "Traceback" not in result.output
        assert not (tmp_path / "run").exists()  # stopped in the preflight: nothing to clean before a re-run


def test_split_files_follows_the_hubs_conventions():
    paths = ["README.md", "train.jsonl", "dev.jsonl", "test/part-0.jsonl", "extra/notes.txt", "_hidden.jsonl"]
    assert split_files("o/n", paths, None, None, "train") == ["train.jsonl"]
    assert split_files("o/n", paths, None, None, "validation") == ["dev.jsonl"]
    assert split_files("o/n", paths, None, None, "test") == ["test/part-0.jsonl"]
    # no split named anywhere: every data file is training data (metadata files are not)
    listing = ["a.jsonl", "b/c.jsonl", "dataset_info.json"]
    assert split_files("o/n", listing, None, None, "train") == ["a.jsonl", "b/c.jsonl"]
    card = "---\nconfigs:\n- config_name: en\n  data_files: en/*.jsonl\n- config_name: fr\n  default: true\n  data_files:\n    train: fr/train.jsonl\n---\n"  # noqa: E501
    listed = ["en/a.jsonl", "en/b.jsonl", "fr/train.jsonl"]
    assert split_files("o/n", listed, card, None, "train") == ["fr/train.jsonl"]  # the default subset
    assert split_files("o/n", listed, card, "en", "train") == ["en/a.jsonl", "en/b.jsonl"]
    folders = "---\nconfigs:\n- config_name: de\n  data_dir: de\n---\n"
    listed += ["de/train.jsonl", "de/test.jsonl"]
    assert split_files("o/n", listed, folders, None, "test") == ["de/test.jsonl"]  # the only subset
    with pytest.raises(DataError, match=r"data.subset: 'de' is not a subset of o/n .* en, fr"):
        split_files("o/n", listed, card, "de", "train")
    with pytest.raises(DataError, match="data.subset: o/n has no subsets"):
        split_files("o/n", paths, None, "en", "train")
    with pytest.raises(DataError, match=r"data.split: 'eval2' is not a split of o/n \(it has test, train"):
        split_files("o/n", paths, None, None, "eval2")
    with pytest.raises(DataError, match=r"in files fitune does not read yet \(train-0.csv\)"):
        split_files("o/n", ["train-0.csv"], None, None, "train")


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"path": "x.jsonl", "hub": DATA}, "data needs `path` (a local JSONL or Parquet file) or `hub`"),
        ({"eval_fraction": 0.1}, "not neither"),
        ({"hub": "just-a-name"}, "data.hub: 'just-a-name' is not a dataset id; fix: write owner/name"),
        ({"path": "x.jsonl", "split": "test"}, "data.split applies to data.hub only"),
    ],
)
def test_the_recipe_names_a_data_place_once(tmp_path, data, message):
    recipe = tiny_recipe(tmp_path)
    recipe["data"] = data
    with pytest.raises(Exception, match=message.replace("(", r"\(").replace(")", r"\)")):
        Recipe.from_dict(recipe)


def test_a_parquet_dataset_without_a_card_trains(tmp_path, monkeypatch):
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = [json.loads(line) for line in _lines(0, 48).decode().splitlines()]
    buffer = pa.BufferOutputStream()
    pq.write_table(pa.Table.from_pylist(rows), buffer, row_group_size=20)
    fake = FakeHub()
    files = {"data/train-00000-of-00001.parquet": buffer.getvalue().to_pybytes(), "README.md": b"# no card"}
    fake.add(DATA, files, dataset=True)
    with serving(fake, tmp_path, monkeypatch):
        result = _train(_write(tmp_path))
    assert result.exit_code == 0, result.output
    assert "43 train / 5 eval examples (messages)" in _flat(result.output)


def test_doctor_fix_names_the_one_split_named_for_train(tmp_path, monkeypatch):
    card = CARD.replace(b"split: train\n", b"split: train_sft\n").replace(
        b"split: test\n", b"split: test_sft\n"
    )
    fake = FakeHub()
    fake.add(DATA, {**FILES, "README.md": card}, dataset=True)
    with serving(fake, tmp_path, monkeypatch):
        path = _write(tmp_path)
        result = CliRunner().invoke(app, ["doctor", path, "--fix"])
        assert result.exit_code == 0, result.output
        assert (
            f"error [data-unreadable] data.split: 'train' is not a split of subset 'default' of {DATA} (it has "
            "test_sft, train_sft) fix: set data.split: train_sft (the one named for train), or another of them"
        ) in _flat(result.output)
        fixed = yaml.safe_load((tmp_path / "r.fixed.yaml").read_text())
        assert fixed["data"]["split"] == "train_sft"
        assert "0 error(s) remain in the corrected recipe" in result.output
