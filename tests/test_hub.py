"""Hub ids through the real huggingface_hub client, against a stand-in Hub on 127.0.0.1 (tests/hubserver.py):
a model outside the catalog is planned from its config.json alone, cached, pinned to a revision, and every
failure (gated, private, unknown revision, offline) ends in fitune's message with the fix."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

import fitune
from fitune.cli import EXIT_ERROR, app
from fitune.errors import ModelSourceError
from fitune.recipe import Recipe

from .conftest import save_tiny_model, tiny_recipe
from .hubserver import FakeHub, serving

QWEN = {  # a Qwen2-style model no catalog entry describes
    "model_type": "qwen2",
    "hidden_size": 256,
    "intermediate_size": 768,
    "num_hidden_layers": 6,
    "num_attention_heads": 8,
    "num_key_value_heads": 2,
    "vocab_size": 4096,
    "max_position_embeddings": 4096,
    "tie_word_embeddings": True,
}
REPO = "someone/tiny-qwen"
WEIGHTS = b"\0" * 4096  # never fetched by a plan


@pytest.fixture
def hub(tmp_path, monkeypatch):
    fake = FakeHub()
    fake.add(REPO, {"config.json": json.dumps({**QWEN, "num_hidden_layers": 2}).encode()}, tag="v1")
    fake.add(REPO, {"config.json": json.dumps(QWEN).encode(), "model.safetensors": WEIGHTS})
    with serving(fake, tmp_path, monkeypatch):
        yield fake


def _recipe(source: str = REPO, **model) -> Recipe:
    return Recipe.from_dict(
        {
            "model": {"source": source, **model},
            "train": {"seq_len": 64, "batch_size": 2},
            "hardware": {"device": "t4"},
        }
    )


def _flat(text: str) -> str:
    return " ".join(text.split())


def test_plan_of_a_hub_model_outside_the_catalog_fetches_its_config_alone_once(hub):
    result = CliRunner().invoke(app, ["plan", REPO, "--gpu", "rtx-4090", "--top", "1"])
    assert result.exit_code == 0, result.output
    assert f"plan search {REPO} on" in _flat(result.output)
    assert "auto->" not in result.output  # train.attention: auto leaves the kernel to the search
    fetched = {path for _, path in hub.requests}
    assert fetched == {f"/{REPO}/resolve/main/config.json"}, hub.requests  # no weights, no tokenizer
    hub.requests.clear()
    again = CliRunner().invoke(app, ["plan", REPO, "--gpu", "rtx-4090", "--top", "1"])
    assert again.exit_code == 0, again.output
    assert hub.requests == []  # the cached config, no request


def test_a_plan_sees_the_real_architecture_at_the_pinned_revision(hub):
    main = fitune.plan(_recipe())
    pinned = fitune.plan(_recipe(revision="v1"))
    assert (main.num_layers, pinned.num_layers) == (6, 2)
    commit = hub.repos[REPO].refs["v1"]
    assert fitune.plan(_recipe(revision=commit)).peak_bytes == pinned.peak_bytes
    findings = fitune.doctor(_recipe().updated({"train.seq_len": 8192}))
    assert any(
        "max_position_embeddings 4096" in f.message for f in findings
    )  # the doctor read qwen2's config


def test_a_config_without_vocab_size_takes_it_from_the_tokenizer(hub):
    config = {k: v for k, v in QWEN.items() if k != "vocab_size"}
    tokenizer = {"model": {"type": "BPE", "vocab": {"a": 0, "b": 1, "ab": 2}}, "added_tokens": [{"id": 9000}]}
    files = {"config.json": json.dumps(config).encode(), "tokenizer.json": json.dumps(tokenizer).encode()}
    hub.add("someone/no-vocab", files)
    from fitune.models import sources

    assert sources.resolve(_recipe("someone/no-vocab"), need_weights=False).config.vocab_size == 9001


@pytest.mark.parametrize(
    ("flags", "source", "revision", "message"),
    [
        (
            {"gated": True},
            "meta/gated-lm",
            None,
            "model.source: meta/gated-lm is a gated model and this machine has no access to it; fix: sign in at "
            "{url}/meta/gated-lm, accept its licence there, then set HF_TOKEN to an access token of that account "
            "(https://huggingface.co/settings/tokens)",
        ),
        (
            {"private": True},
            "someone/private-lm",
            None,
            "model.source: no model repository 'someone/private-lm' at {url} (or it is private); fix: check the "
            "id (owner/name, as in its address), and for a private model set HF_TOKEN to a token with access",
        ),
        (
            {},
            REPO,
            "v9",
            "model.revision: 'v9' is not a branch, tag or commit of someone/tiny-qwen; fix: name one listed at "
            "{url}/someone/tiny-qwen, or remove model.revision for the main branch",
        ),
        (
            {},
            "someone/no-config",
            None,
            "model.source: someone/no-config has no config.json, so it is not a transformers model fitune can "
            "read; fix: name the repository of the model's transformers weights",
        ),
    ],
    ids=["gated", "private", "unknown-revision", "no-config"],
)
def test_hub_failures_end_in_fitunes_message_and_exit_1(hub, tmp_path, flags, source, revision, message):
    if source != REPO:
        hub.add(
            source, {"README.md": b"# a model"} if "no-config" in source else {"config.json": b"{}"}, **flags
        )
    recipe = tmp_path / "r.yaml"
    model = f"  source: {source}\n" + (f"  revision: {revision}\n" if revision else "")
    recipe.write_text(f"model:\n{model}hardware:\n  device: t4\n")
    result = CliRunner().invoke(app, ["plan", str(recipe)])
    assert result.exit_code == EXIT_ERROR, result.output
    assert _flat(result.output) == _flat("error: " + message.format(url=hub.url))


def test_offline_uses_the_cache_and_says_what_to_do_without_it(hub, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelSourceError) as raised:
        fitune.plan(_recipe())
    assert str(raised.value).startswith(
        f"model.source: config.json of hub id {REPO!r}: not in the local Hugging Face cache"
    )
    assert "and HF_HUB_OFFLINE is set; fix: run online once (unset HF_HUB_OFFLINE)" in str(raised.value)
    assert hub.requests == []
    monkeypatch.delenv("HF_HUB_OFFLINE")
    online = fitune.plan(_recipe())
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    hub.requests.clear()
    assert fitune.plan(_recipe()).peak_bytes == online.peak_bytes
    assert hub.requests == []


def test_an_unreachable_hub_is_named_with_the_fix(hub, monkeypatch):
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # the discard port: nothing listens
    with pytest.raises(
        ModelSourceError, match=r"the Hub at http://127.0.0.1:9 cannot be reached .*; fix: run online once"
    ):
        fitune.plan(_recipe())


# --- downloads: what training reads, once --------------------------------------------------------------------

TINY = "tiny-org/tiny-llama"


@pytest.fixture
def tiny_repo(hub, tmp_path):
    """A tiny Llama's files on the stand-in Hub, with a pickle copy and a README a download must skip."""
    folder = save_tiny_model(tmp_path / "tiny", dtype="fp32")
    files = {p.name: p.read_bytes() for p in folder.iterdir() if p.is_file()}
    files["pytorch_model.bin"] = b"pickle"
    files["README.md"] = b"# tiny"
    hub.add(TINY, files)
    return files


def _train_recipe(tmp_path, out: str = "run", **model) -> dict:
    recipe = tiny_recipe(tmp_path)
    recipe["model"] = {"source": TINY, "dtype": "fp32", **model}
    recipe["output"]["dir"] = str(tmp_path / out)
    return recipe


def _cli_train(tmp_path, source: str):
    recipe = _train_recipe(tmp_path)
    recipe["model"]["source"] = source
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return CliRunner().invoke(app, ["train", str(path), "--max-steps", "1", "--no-progress"])


def test_train_downloads_a_hub_model_once_and_the_second_run_asks_nothing(hub, tiny_repo, tmp_path):
    result = fitune.train(_train_recipe(tmp_path), max_steps=1, progress=False, echo=lambda *a: None)
    assert result.steps == 1
    got = {
        path.rsplit("/", 1)[-1] for method, path in hub.requests if method == "GET" and "/resolve/" in path
    }
    assert got == {"config.json", "generation_config.json", "model.safetensors"}  # no pickle, no README
    commit = hub.repos[TINY].refs["main"]
    marker = json.loads((tmp_path / "run" / "fitune-run.json").read_text())
    assert marker["model"] == {"hub_id": TINY, "revision": None, "commit": commit}
    hub.requests.clear()
    again = fitune.train(_train_recipe(tmp_path, "run2"), max_steps=1, progress=False, echo=lambda *a: None)
    assert again.steps == 1 and hub.requests == []


def test_a_dropped_connection_resumes_where_the_file_stopped(hub, tiny_repo, tmp_path, monkeypatch):
    import huggingface_hub.constants

    # the client writes what it received in chunks (10 MB by default): small ones, for a small file
    monkeypatch.setattr(huggingface_hub.constants, "DOWNLOAD_CHUNK_SIZE", 256)
    hub.repos[TINY].drop_after["model.safetensors"] = 1000
    result = fitune.train(_train_recipe(tmp_path), max_steps=1, progress=False, echo=lambda *a: None)
    assert result.steps == 1
    gets = [path for method, path in hub.requests if method == "GET" and path.endswith("model.safetensors")]
    assert len(gets) == 2  # cut once, then resumed from the bytes already on disk
    ((path, ranged),) = hub.ranges
    assert path == f"/{TINY}/resolve/{hub.repos[TINY].refs['main']}/model.safetensors"
    assert 0 < int(ranged.removeprefix("bytes=").rstrip("-")) <= 1000
    from fitune.models import hub as hub_module

    blob = hub_module.cache_dir() / "models--tiny-org--tiny-llama" / "blobs"
    assert sorted(p.read_bytes() for p in blob.iterdir() if p.stat().st_size > 1000) == [
        tiny_repo["model.safetensors"]
    ]


def test_a_pickle_only_repository_is_refused_before_any_byte(hub, tmp_path):
    hub.add("old-org/pickled", {"config.json": json.dumps(QWEN).encode(), "pytorch_model.bin": b"pickle"})
    result = _cli_train(tmp_path, "old-org/pickled")
    assert result.exit_code == EXIT_ERROR, result.output
    assert _flat(result.output).endswith(
        "error: model.source: old-org/pickled has no .safetensors weights: its weights are pickle files only "
        "(pytorch_model.bin), and fitune never unpickles model files (loading one can run any code); fix: use a "
        "repository of the model with safetensors weights, or convert these on a machine you trust and point "
        "model.source at the folder"
    )
    assert not any(path.endswith(".bin") for _, path in hub.requests)


def test_a_gated_model_ends_with_what_to_do_when_training(hub, tmp_path):
    hub.add("meta/gated-lm", {"config.json": json.dumps(QWEN).encode()}, gated=True)
    result = _cli_train(tmp_path, "meta/gated-lm")
    assert result.exit_code == EXIT_ERROR, result.output
    assert "accept its licence there, then set HF_TOKEN" in _flat(result.output)
    assert "Traceback" not in result.output


def test_the_disk_is_checked_against_the_hubs_sizes_before_the_first_byte(
    hub, tiny_repo, tmp_path, monkeypatch
):
    import shutil
    from collections import namedtuple

    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage(2**40, 2**40, 2**29))
    with pytest.raises(
        ModelSourceError, match=r"kept free\) and the disk has 0.50 GiB; fix: free space there"
    ):
        fitune.train(_train_recipe(tmp_path), max_steps=1, progress=False, echo=lambda *a: None)
    assert not any("/resolve/" in path for _, path in hub.requests)


def test_a_pinned_revision_is_downloaded_recorded_and_found_again_offline(
    hub, tiny_repo, tmp_path, monkeypatch
):
    commit = hub.add(TINY, tiny_repo, tag="v2")
    fitune.train(_train_recipe(tmp_path, revision="v2"), max_steps=1, progress=False, echo=lambda *a: None)
    marker = json.loads((tmp_path / "run" / "fitune-run.json").read_text())
    assert marker["model"] == {"hub_id": TINY, "revision": "v2", "commit": commit}
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    hub.requests.clear()
    again = fitune.train(
        _train_recipe(tmp_path, "run2", revision="v2"), max_steps=1, progress=False, echo=lambda *a: None
    )
    assert again.steps == 1 and hub.requests == []


def test_a_snapshot_missing_a_shard_is_completed_before_training(hub, tmp_path):
    import torch
    from transformers import AutoModelForCausalLM

    from fitune.models import hub as hub_module
    from fitune.models.sources import config_from_dict

    from .conftest import TINY_LLAMA

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(
        config_from_dict(dict(TINY_LLAMA), where="tiny"), dtype=torch.float32
    )
    model.save_pretrained(str(tmp_path / "sharded"), max_shard_size="100KB")
    files = {p.name: p.read_bytes() for p in (tmp_path / "sharded").iterdir()}
    shards = sorted(n for n in files if n.endswith(".safetensors"))
    assert len(shards) > 1 and "model.safetensors.index.json" in files
    hub.add(TINY, files)
    fitune.train(_train_recipe(tmp_path), max_steps=1, progress=False, echo=lambda *a: None)
    snapshot = next((hub_module.cache_dir() / "models--tiny-org--tiny-llama" / "snapshots").iterdir())
    assert hub_module.snapshot_complete(snapshot)
    (snapshot / shards[-1]).unlink()  # as a download cut short between two shards leaves it
    (next(snapshot.parent.parent.glob("blobs")) / hashlib.sha256(files[shards[-1]]).hexdigest()).unlink()
    assert not hub_module.snapshot_complete(snapshot)
    hub.requests.clear()
    again = fitune.train(_train_recipe(tmp_path, "run2"), max_steps=1, progress=False, echo=lambda *a: None)
    assert again.steps == 1
    fetched = [path for method, path in hub.requests if method == "GET" and "/resolve/" in path]
    assert [path.rsplit("/", 1)[-1] for path in fetched] == [shards[-1]]  # only what was missing


def test_a_fresh_process_finds_the_cached_model_without_a_request(hub, tiny_repo, tmp_path):
    """The client's own local_files_only lookup builds request headers, which fetch a registry from the Hub;
    a new process (the second `fitune` command) must find a cached config, and cached weights, with no request."""
    import subprocess
    import sys

    from fitune.models import sources

    sources.resolve(_recipe(), need_weights=False)  # a plan: config.json alone
    sources.resolve(Recipe.from_dict({"model": {"source": TINY}}))  # training: the weights
    hub.requests.clear()
    code = (
        "from fitune.recipe import Recipe; from fitune.models import sources; "
        f"plan = sources.resolve(Recipe.from_dict({{'model': {{'source': '{REPO}'}}}}), need_weights=False); "
        f"train = sources.resolve(Recipe.from_dict({{'model': {{'source': '{TINY}'}}}})); "
        "print(plan.config.num_hidden_layers, train.commit)"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == [str(QWEN["num_hidden_layers"]), hub.repos[TINY].refs["main"]]
    assert hub.requests == []


def test_a_hub_tokenizer_is_downloaded_alone_once(hub, tmp_path, monkeypatch):
    from fitune.models.byte_tokenizer import byte_tokenizer

    byte_tokenizer().save_pretrained(tmp_path / "tok")
    files = {p.name: p.read_bytes() for p in (tmp_path / "tok").iterdir()}
    hub.add("someone/tok", {**files, "config.json": b"{}", "model.safetensors": WEIGHTS, "README.md": b"#"})
    recipe = tiny_recipe(tmp_path)
    recipe["model"]["tokenizer"] = "someone/tok"
    quiet = {"progress": False, "echo": lambda *a: None}
    assert fitune.train(recipe, max_steps=1, **quiet).steps == 1
    got = {p.rsplit("/", 1)[-1] for method, p in hub.requests if method == "GET" and "/resolve/" in p}
    assert got == {*files, "config.json"}  # no weights, no README
    hub.requests.clear()
    recipe["output"]["dir"] = str(tmp_path / "run2")
    assert fitune.train(recipe, max_steps=1, **quiet).steps == 1 and hub.requests == []
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    recipe["model"]["tokenizer"] = "someone/other-tok"
    with pytest.raises(
        ModelSourceError, match="model.tokenizer: the tokenizer of hub id 'someone/other-tok': not in"
    ):
        fitune.plan(Recipe.from_dict(recipe))


def _partial(tiny_repo) -> Path:
    from fitune.models import hub as hub_module

    name = hashlib.sha256(tiny_repo["model.safetensors"]).hexdigest()
    return hub_module.cache_dir() / "models--tiny-org--tiny-llama" / "blobs" / f"{name}.fitune-partial"


def test_a_download_killed_midway_resumes_in_the_next_process(hub, tiny_repo, monkeypatch):
    import contextlib
    import os
    import subprocess
    import sys
    import time

    from fitune.models import hub as hub_module

    bar = {"total": 0, "done": 0}

    @contextlib.contextmanager
    def recording_bar(label, total, **kwargs):  # the progress bar a terminal would draw, as numbers
        bar["total"] = total
        yield lambda advance: bar.__setitem__("done", bar["done"] + advance)

    monkeypatch.setattr(hub_module, "byte_bar", recording_bar)

    hub.repos[TINY].stall_after["model.safetensors"] = 40960
    script = (
        "import huggingface_hub.constants as c; c.DOWNLOAD_CHUNK_SIZE = 4096\n"
        f"from fitune.models import hub; hub.download_model({TINY!r}, show_progress=False)"
    )
    partial = _partial(tiny_repo)
    process = subprocess.Popen([sys.executable, "-c", script], env=dict(os.environ))
    try:
        assert hub.stalled.wait(60), "the download did not start"
        deadline = time.monotonic() + 30
        while not (partial.is_file() and partial.stat().st_size == 40960) and time.monotonic() < deadline:
            time.sleep(0.05)
    finally:
        process.kill()  # SIGKILL mid-file: no handler, no cleanup
        process.wait()
        hub.release.set()
    assert partial.stat().st_size == 40960  # what the killed process received is kept
    hub.ranges.clear()
    folder, commit = hub_module.download_model(TINY, show_progress=False)
    assert hub.ranges == [(f"/{TINY}/resolve/{commit}/model.safetensors", "bytes=40960-")]
    assert (folder / "model.safetensors").read_bytes() == tiny_repo["model.safetensors"]
    assert not partial.exists()
    assert (
        bar["done"] == bar["total"] >= len(tiny_repo["model.safetensors"])
    )  # the bar ends full, not past it


def test_a_partial_file_that_does_not_match_the_hubs_hash_starts_again(hub, tiny_repo):
    from fitune.models import hub as hub_module

    partial = _partial(tiny_repo)
    partial.parent.mkdir(parents=True)
    partial.write_bytes(b"\xff" * 40960)  # not the file's first bytes
    folder, _ = hub_module.download_model(TINY, show_progress=False)
    assert (folder / "model.safetensors").read_bytes() == tiny_repo["model.safetensors"]
    gets = [p for method, p in hub.requests if method == "GET" and p.endswith("model.safetensors")]
    assert len(gets) == 2 and [r for _, r in hub.ranges] == ["bytes=40960-"]  # resumed, checked, again whole
