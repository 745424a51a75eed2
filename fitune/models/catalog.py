"""The architecture catalog: verbatim Hugging Face ``config.json`` copies of popular models under short names.

The files live in ``configs/`` with ``index.json`` (short name, model id, source) and ``SOURCES.md`` (how each
copy was found and checked). A catalog model is an architecture only: no weights, no tokenizer.
"""

from __future__ import annotations

import copy
import functools
import json
from dataclasses import dataclass
from importlib import resources
from typing import Any

from fitune.errors import ModelSourceError

# Decoders whose parameters are embeddings, identical (attention + gated MLP + 2 RMSNorm) layers, a final
# RMSNorm and an untied or tied lm_head. Biases and extra norms differ per family, handled below.
SUPPORTED_PARAM_COUNT_TYPES = ("llama", "mistral", "qwen2", "qwen3", "phi3")


@dataclass(frozen=True)
class CatalogModel:
    name: str
    hf_id: str
    config: dict
    source: str

    def param_count(self) -> int:
        """Parameters of the model ``AutoModelForCausalLM.from_config(config)`` builds, from config arithmetic."""
        return decoder_param_count(self.config)


def decoder_param_count(config: dict[str, Any]) -> int:
    """Parameter count of a llama/mistral/qwen2/qwen3/phi3 decoder described by a ``config.json`` dict."""
    model_type = config.get("model_type")
    if model_type not in SUPPORTED_PARAM_COUNT_TYPES:
        raise ModelSourceError(
            f"Cannot count parameters of model_type {model_type!r} from its config; supported: "
            f"{', '.join(SUPPORTED_PARAM_COUNT_TYPES)}. Build the model on the meta device and count instead."
        )
    hidden = config["hidden_size"]
    heads = config["num_attention_heads"]
    kv_heads = config.get("num_key_value_heads") or heads
    head_dim = config.get("head_dim") or hidden // heads
    vocab = config["vocab_size"]
    q_out, kv_out = heads * head_dim, kv_heads * head_dim

    attention = hidden * q_out + 2 * hidden * kv_out + q_out * hidden
    if model_type == "qwen2":  # q/k/v carry a bias, o_proj does not
        attention += q_out + 2 * kv_out
    elif model_type in ("llama", "qwen3") and config.get("attention_bias", False):
        attention += q_out + 2 * kv_out + hidden
    if model_type == "qwen3":  # RMSNorm over head_dim on queries and keys
        attention += 2 * head_dim

    inter = config["intermediate_size"]
    mlp = 3 * hidden * inter
    if model_type == "llama" and config.get("mlp_bias", False):
        mlp += 2 * inter + hidden

    layer = attention + mlp + 2 * hidden
    embeddings = vocab * hidden
    lm_head = 0 if config.get("tie_word_embeddings", False) else vocab * hidden
    return embeddings + config["num_hidden_layers"] * layer + hidden + lm_head


@functools.cache
def _entries() -> tuple[tuple[dict[str, Any], dict[str, Any]], ...]:
    folder = resources.files("fitune.models") / "configs"
    index = json.loads((folder / "index.json").read_text(encoding="utf-8"))
    return tuple(
        (entry, json.loads((folder / entry["file"]).read_text(encoding="utf-8"))) for entry in index["models"]
    )


def _model(entry: dict[str, Any], config: dict[str, Any]) -> CatalogModel:
    return CatalogModel(entry["name"], entry["hf_id"], copy.deepcopy(config), entry["source"])


def models() -> list[CatalogModel]:
    """Every catalog model; each call returns fresh config dicts, safe to modify."""
    return [_model(entry, config) for entry, config in _entries()]


def model_names() -> list[str]:
    """Short names of every catalog model."""
    return [entry["name"] for entry, _ in _entries()]


def get_model(name: str) -> CatalogModel | None:
    """The catalog model with this short name or Hugging Face id (any case), or None."""
    key = name.strip().lower()
    for entry, config in _entries():
        if key in {k.lower() for k in (entry["name"], entry["hf_id"], *entry["aliases"])}:
            return _model(entry, config)
    return None
