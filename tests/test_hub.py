"""Hub ids through the real huggingface_hub client, against a stand-in Hub on 127.0.0.1 (tests/hubserver.py):
a model outside the catalog is planned from its config.json alone, cached, pinned to a revision, and every
failure (gated, private, unknown revision, offline) ends in fitune's message with the fix."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

import fitune
from fitune.cli import EXIT_ERROR, app
from fitune.errors import ModelSourceError
from fitune.recipe import Recipe

from .hubserver import FakeHub, start

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
    server = start(fake)
    monkeypatch.setenv("HF_ENDPOINT", fake.url)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf-cache"))
    monkeypatch.setenv("NO_PROXY", "127.0.0.1")
    for name in ("HF_HUB_OFFLINE", "HF_TOKEN", "HF_HOME"):
        monkeypatch.delenv(name, raising=False)
    yield fake
    server.shutdown()
    server.server_close()


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
    fetched = {path for _, path in hub.requests}
    assert fetched == {f"/{REPO}/resolve/main/config.json"}, hub.requests  # no weights, no tokenizer
    hub.requests.clear()
    again = CliRunner().invoke(app, ["plan", REPO, "--gpu", "rtx-4090", "--top", "1"])
    assert again.exit_code == 0, again.output
    assert hub.requests == []  # the cached config, no request
    from fitune.models import sources

    with pytest.raises(ModelSourceError, match=f"the weights of hub id '{REPO}' are not in the local"):
        sources.resolve(_recipe())  # training needs the weights, which a plan never fetched


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
        f"model.source: config.json of hub id {REPO!r} is not in the local Hugging Face cache"
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
