"""Shared fixtures: tiny architectures and datasets built in the test, so each test runs in seconds."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

from fitune.libraries import prepare_libraries  # noqa: E402

prepare_libraries()

# every test runs under a memory cap and a time limit (tests/limits.py)
from .limits import (  # noqa: E402, F401
    pytest_configure,
    pytest_runtest_call,
    pytest_runtest_protocol,
    pytest_terminal_summary,
)

TINY_LLAMA = {
    "model_type": "llama",
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "vocab_size": 260,
    "max_position_embeddings": 256,
    "tie_word_embeddings": True,
    "initializer_range": 0.2,  # large enough that LoRA alone can move the logits of a 64-wide model
}


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path_factory, monkeypatch):
    """Each test session gets its own fitune cache, except the real model, which is shared when present."""
    if "FITUNE_CACHE" not in os.environ:
        monkeypatch.setenv("FITUNE_CACHE", str(tmp_path_factory.getbasetemp() / "fitune-cache"))


def write_chat_data(path: Path, n: int = 48) -> Path:
    """Conversations teaching a fixed mapping: 'say N' -> the word for N."""
    words = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
    with open(path, "w") as f:
        for i in range(n):
            k = i % 10
            msgs = [{"role": "user", "content": f"say {k}"}, {"role": "assistant", "content": words[k]}]
            f.write(json.dumps({"messages": msgs}) + "\n")
    return path


def tiny_recipe(tmp_path: Path, **sections) -> dict:
    tmp_path.mkdir(parents=True, exist_ok=True)
    data = write_chat_data(tmp_path / "train.jsonl")
    recipe = {
        "model": {"config": dict(TINY_LLAMA), "dtype": "fp32"},
        "method": {"kind": "lora", "r": 8, "alpha": 16},
        "data": {"path": str(data), "eval_fraction": 0.1},
        "train": {
            "seq_len": 32,
            "batch_size": 4,
            "max_steps": 20,
            "lr": 1e-2,
            "precision": "fp32",
            "seed": 0,
        },
        "hardware": {"device": "cpu"},
        "output": {"dir": str(tmp_path / "run")},
    }
    for key, value in sections.items():
        recipe[key] = {**recipe.get(key, {}), **value}
    return recipe


def save_tiny_model(folder: Path, dtype: str = "bf16", **config) -> Path:
    """A random tiny Llama saved as a Hugging Face folder (config.json + model.safetensors)."""
    import torch
    from transformers import AutoModelForCausalLM

    from fitune.models.sources import config_from_dict

    torch.manual_seed(0)
    cfg = config_from_dict(dict(TINY_LLAMA, **config), where="tiny")
    dtypes = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
    AutoModelForCausalLM.from_config(cfg, dtype=dtypes[dtype]).save_pretrained(str(folder))
    return folder


def fail_step_with_out_of_memory(monkeypatch, at_step: int) -> None:
    """Make the ``at_step``-th training step of the next runs raise the error the CUDA allocator raises."""
    import torch

    import fitune.trainer.run as run_module

    real = run_module.train_step
    calls = {"n": 0}

    def step(session, batches):
        calls["n"] += 1
        if calls["n"] == at_step:
            # a real allocation failure would come from the allocator; the guard sees the same exception type
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return real(session, batches)

    monkeypatch.setattr(run_module, "train_step", step)
