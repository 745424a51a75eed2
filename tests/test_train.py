import json

import pytest
import torch

import fitune
from fitune.data.batching import synthetic_batch
from fitune.errors import RunFolderError
from fitune.recipe import Recipe
from fitune.session import build_session
from fitune.step import train_step

from .conftest import TINY_LLAMA, save_tiny_model, tiny_recipe


def _snapshot(model):
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def _changed(before, model):
    return {n for n, p in model.named_parameters() if not torch.equal(before[n], p.detach())}


def _learnable_batch(b: int = 2, t: int = 16):
    """Targets follow from the input token alone (next id = id + 1), so a few steps can learn them."""
    batch = synthetic_batch(b, t, TINY_LLAMA["vocab_size"])
    batch.targets_BT = (batch.input_ids_BT + 1) % TINY_LLAMA["vocab_size"]
    return batch


@pytest.mark.parametrize("kind", ["lora", "qlora", "full"])
def test_loss_falls_and_only_intended_weights_change(kind):
    lr = 1e-2
    r = Recipe.from_dict(
        {
            "model": {"config": TINY_LLAMA, "dtype": "fp32"},
            "method": {"kind": kind, "r": 4},
            "train": {"seq_len": 16, "batch_size": 2, "lr": lr, "precision": "fp32", "max_steps": 15},
            "hardware": {"device": "cpu"},
        }
    )
    s = build_session(r, with_tokenizer=False)
    batch = _learnable_batch()
    before = _snapshot(s.model)
    losses = [float(train_step(s, [batch])) for _ in range(15)]
    assert losses[-1] < 0.8 * losses[0]
    changed = _changed(before, s.model)
    trainable = {n for n, p in s.model.named_parameters() if p.requires_grad}
    assert changed == trainable
    if kind == "full":
        assert trainable == set(before)
    else:
        assert trainable and all("lora_" in n for n in trainable)
    if kind == "qlora":
        import bitsandbytes as bnb

        n4 = [m for m in s.model.modules() if isinstance(m, bnb.nn.Linear4bit)]
        assert len(n4) == 2 * 7  # every projection of both layers, the head excluded
        assert n4[0].weight.quant_state.nested  # double quantization


def test_grad_accumulation_equals_one_big_batch():
    r = Recipe.from_dict(
        {
            "model": {"config": TINY_LLAMA, "dtype": "fp32"},
            "method": {"kind": "full"},
            "train": {
                "seq_len": 16,
                "batch_size": 4,
                "precision": "fp32",
                "max_grad_norm": None,
                "optimizer": "sgd",
            },
            "hardware": {"device": "cpu"},
        }
    )
    big = synthetic_batch(4, 16, 260)
    halves = [type(big)(big.input_ids_BT[i : i + 2], None, big.targets_BT[i : i + 2]) for i in (0, 2)]
    s1, s2 = build_session(r, with_tokenizer=False), build_session(r, with_tokenizer=False)
    l1 = train_step(s1, [big])
    l2 = train_step(s2, halves)
    assert torch.allclose(l1, l2, atol=1e-5)
    for p1, p2 in zip(s1.model.parameters(), s2.model.parameters(), strict=True):
        assert torch.allclose(p1, p2, atol=1e-5)


def test_train_api_inline_config_losses_fall(tmp_path):
    result = fitune.train(tiny_recipe(tmp_path), max_steps=20, progress=False, echo=lambda *a: None)
    assert len(result.losses) == 20
    assert sum(result.losses[-5:]) / 5 < 0.7 * sum(result.losses[:5]) / 5
    assert result.tokens_per_second > 0
    out = result.output_dir
    assert (out / "adapter" / "adapter_model.safetensors").is_file()
    assert (out / "recipe.resolved.yaml").is_file()
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(1, 21))
    assert json.loads((out / "fitune-run.json").read_text())["fitune_version"] == fitune.__version__
    assert result.eval_losses[20] < result.eval_losses[0]


def test_train_api_qlora_losses_fall(tmp_path):
    recipe = tiny_recipe(tmp_path, method={"kind": "qlora"})
    result = fitune.train(recipe, max_steps=20, progress=False, echo=lambda *a: None)
    assert sum(result.losses[-5:]) / 5 < 0.7 * sum(result.losses[:5]) / 5


def test_same_seed_same_losses(tmp_path):
    a = fitune.train(
        tiny_recipe(tmp_path / "a", output={"dir": str(tmp_path / "ra")}),
        max_steps=6,
        progress=False,
        echo=lambda *a: None,
    )
    b = fitune.train(
        tiny_recipe(tmp_path / "b", output={"dir": str(tmp_path / "rb")}),
        max_steps=6,
        progress=False,
        echo=lambda *a: None,
    )
    assert a.losses == b.losses


def test_adapter_save_load_gives_identical_logits(tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    recipe = Recipe.from_dict(tiny_recipe(tmp_path))
    result = fitune.train(recipe, max_steps=5, progress=False, echo=lambda *a: None)
    session = build_session(recipe, with_tokenizer=False)  # same seed: same base weights
    base = session.causal_lm.get_base_model() if hasattr(session.causal_lm, "get_base_model") else None
    assert base is None
    torch.manual_seed(recipe.train.seed)
    from fitune.models import sources

    src = sources.resolve(recipe)
    torch.manual_seed(recipe.train.seed)
    fresh = AutoModelForCausalLM.from_config(src.config, dtype=torch.float32)
    from fitune.techniques import attention

    attention.install(fresh)  # the attention kernel fitune trains with on a CPU: bit-identical logits
    loaded = PeftModel.from_pretrained(fresh, str(result.output_dir / "adapter")).eval()
    # rebuild the trained model from the run: same base init + trained adapter state
    torch.manual_seed(recipe.train.seed)
    trained = build_session(recipe, with_tokenizer=False)
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    set_peft_model_state_dict(
        trained.model, load_file(str(result.output_dir / "adapter" / "adapter_model.safetensors"))
    )
    ids = torch.randint(0, 256, (2, 12))
    with torch.no_grad():
        a = loaded(input_ids=ids).logits
        b = trained.model.eval()(input_ids=ids).logits
    assert torch.equal(a, b)


def test_output_folder_with_another_run_is_refused(tmp_path):
    recipe = tiny_recipe(tmp_path)
    fitune.train(recipe, max_steps=1, progress=False, echo=lambda *a: None)
    with pytest.raises(RunFolderError, match="already holds a finished run; fix: .* --overwrite"):
        fitune.train(recipe, max_steps=1, progress=False, echo=lambda *a: None)
    fitune.train(recipe, max_steps=1, progress=False, echo=lambda *a: None, overwrite=True)


def test_qlora_gradients_unchanged_by_an_eval_pass():
    """An eval pass must not switch bitsandbytes to its inference layout, which has no backward."""
    from fitune.step import eval_loss, micro_batch_loss

    r = Recipe.from_dict(
        {
            "model": {"config": TINY_LLAMA, "dtype": "bf16"},
            "method": {"kind": "qlora", "r": 4},
            "train": {"seq_len": 16, "batch_size": 2, "precision": "bf16"},
            "hardware": {"device": "cpu"},
        }
    )
    batch = _learnable_batch()
    grads = []
    for with_eval in (False, True):
        s = build_session(r, with_tokenizer=False)
        if with_eval:
            eval_loss(s, [batch])
        micro_batch_loss(s, batch, torch.tensor(32)).backward()
        grads.append({n: p.grad.clone() for n, p in s.trainable_parameters})
    for name, g in grads[0].items():
        assert torch.equal(g, grads[1][name]), name


@pytest.mark.parametrize("chunk", [5, "auto"])
def test_chunked_loss_equals_plain_loss_and_gradients(chunk):
    from fitune.step import micro_batch_loss

    base = {
        "model": {"config": TINY_LLAMA, "dtype": "fp32"},
        "method": {"kind": "full"},
        "train": {"seq_len": 16, "batch_size": 2, "precision": "fp32"},
        "hardware": {"device": "cpu"},
    }
    batch = _learnable_batch()
    batch.targets_BT[0, :5] = -100  # masked positions are skipped in both
    results = []
    for loss_chunk in (0, chunk):
        r = Recipe.from_dict({**base, "train": {**base["train"], "loss_chunk": loss_chunk}})
        s = build_session(r, with_tokenizer=False)
        loss = micro_batch_loss(s, batch, torch.tensor(27))
        loss.backward()
        results.append((loss.detach(), {n: p.grad.clone() for n, p in s.trainable_parameters}))
    (l0, g0), (l1, g1) = results
    assert torch.allclose(l0, l1, rtol=1e-5)
    for name in g0:
        assert torch.allclose(g0[name], g1[name], rtol=1e-4, atol=1e-6), name


def test_fp16_autocast_with_grad_scaler_trains_fp32_adapters():
    r = Recipe.from_dict(
        {
            "model": {"config": TINY_LLAMA, "dtype": "fp16"},
            "method": {"kind": "lora", "r": 4},
            "train": {"seq_len": 16, "batch_size": 2, "lr": 1e-2, "precision": "fp16", "max_steps": 15},
            "hardware": {"device": "cpu"},
        }
    )
    s = build_session(r, with_tokenizer=False)
    assert s.grad_scaler is not None
    assert all(p.dtype == torch.float32 for _, p in s.trainable_parameters)
    batch = _learnable_batch()
    losses = [float(train_step(s, [batch])) for _ in range(15)]
    assert losses[-1] < 0.5 * losses[0]


def _folder_recipe(folder):
    return Recipe.from_dict(
        {
            "model": {"source": str(folder), "dtype": "bf16"},
            "method": {"kind": "qlora", "r": 4},
            "train": {"seq_len": 16, "batch_size": 2, "lr": 1e-2, "precision": "bf16"},
            "hardware": {"device": "cpu"},
        }
    )


@pytest.mark.parametrize(("tied", "saved_dtype"), [(True, "bf16"), (False, "fp32")])
def test_streamed_qlora_load_equals_quantizing_the_loaded_model(tmp_path, monkeypatch, tied, saved_dtype):
    """QLoRA reads the checkpoint one tensor at a time; that must give what quantizing the whole loaded model
    gives: the same packed bytes and quant states, other weights, buffers, tied head, and losses."""
    import fitune.session

    folder = save_tiny_model(tmp_path / "model", saved_dtype, tie_word_embeddings=tied)
    recipe = _folder_recipe(folder)
    sessions = []
    for streamed in (True, False):
        with monkeypatch.context() as m:
            if not streamed:  # from_pretrained, then quantize_nf4 layer by layer
                m.setattr(fitune.session, "streams_weights", lambda *a: False)
            torch.manual_seed(0)
            sessions.append(build_session(recipe, with_tokenizer=False))
    new, old = (s.causal_lm for s in sessions)
    a, b = new.state_dict(), old.state_dict()  # each Linear4bit's packed weight and quant state included
    assert a.keys() == b.keys()
    for key in a:
        assert a[key].dtype == b[key].dtype and torch.equal(a[key], b[key]), key
    buffers, reference = dict(new.named_buffers()), dict(old.named_buffers())
    assert buffers.keys() == reference.keys() and any("inv_freq" in k for k in buffers)  # not persistent
    for key, value in buffers.items():
        assert value.device.type == "cpu" and torch.equal(value, reference[key]), key
    assert not any(t.is_meta for t in [*new.parameters(), *new.buffers()])
    assert (new.lm_head.weight is new.model.embed_tokens.weight) == tied
    batch = _learnable_batch()
    losses = [[float(train_step(s, [batch])) for _ in range(3)] for s in sessions]
    assert losses[0] == losses[1]


def test_streamed_qlora_load_reads_bare_decoder_keys_and_names_a_missing_one(tmp_path):
    from safetensors.torch import load_file, save_file

    from fitune.errors import ModelSourceError

    folder = save_tiny_model(tmp_path / "model")
    tensors = load_file(folder / "model.safetensors")
    torch.manual_seed(0)
    reference = build_session(_folder_recipe(folder), with_tokenizer=False).causal_lm.state_dict()
    bare = tmp_path / "bare"  # saved from LlamaModel: no "model." prefix
    bare.mkdir()
    (bare / "config.json").write_text((folder / "config.json").read_text())
    save_file({k.removeprefix("model."): v for k, v in tensors.items()}, bare / "model.safetensors")
    torch.manual_seed(0)
    loaded = build_session(_folder_recipe(bare), with_tokenizer=False).causal_lm.state_dict()
    assert loaded.keys() == reference.keys()
    assert all(torch.equal(loaded[k], reference[k]) for k in reference)
    del tensors["model.layers.1.mlp.down_proj.weight"]
    save_file(tensors, bare / "model.safetensors")
    with pytest.raises(ModelSourceError, match=r"no tensor model\.layers\.1\.mlp\.down_proj\.weight"):
        build_session(_folder_recipe(bare), with_tokenizer=False)


@pytest.mark.parametrize("cap", [None, 30.0])
@pytest.mark.parametrize("chunk", [5, 7, 64])
def test_eval_loss_in_chunks_equals_the_plain_loss(chunk, cap):
    """Without gradients the loss runs in plain chunks (nothing kept); it must give the plain loss."""
    from fitune.step import _loss_sum, _no_grad_loss_sum

    torch.manual_seed(0)
    head = torch.nn.Linear(16, 50, bias=False)
    hidden, targets = torch.randn(40, 16), torch.randint(0, 50, (40,))
    targets[::3] = -100
    with torch.no_grad():
        plain = _loss_sum(head, cap, hidden, targets)
        chunked = _no_grad_loss_sum(head, cap, hidden, targets, chunk)
    assert torch.allclose(plain, chunked, rtol=1e-5), (plain, chunked)


def test_eval_loss_is_the_mean_over_target_tokens_of_all_batches():
    from fitune.step import eval_loss, micro_batch_loss

    r = Recipe.from_dict(
        {
            "model": {"config": TINY_LLAMA, "dtype": "fp32"},
            "method": {"kind": "lora", "r": 4},
            "train": {"seq_len": 16, "batch_size": 2, "precision": "fp32", "loss_chunk": 7},
            "hardware": {"device": "cpu"},
        }
    )
    s = build_session(r, with_tokenizer=False)
    a, b = _learnable_batch(), _learnable_batch()
    b.targets_BT[:, ::2] = -100
    n = (a.targets_BT != -100).sum() + (b.targets_BT != -100).sum()
    with torch.no_grad():
        expected = (micro_batch_loss(s, a, n) + micro_batch_loss(s, b, n)).item()
    assert eval_loss(s, iter([a, b])).item() == pytest.approx(expected, rel=1e-5)
    assert eval_loss(s, iter([])) is None
