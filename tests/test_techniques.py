"""Each memory-saving technique on and off, on tiny models: training still converges, only the intended
weights change, the numbers match the plain path where they must, and the plan moves in the expected
direction and category."""

import contextlib

import pytest
import torch

import fitune
from fitune.data.batching import synthetic_batch
from fitune.errors import FituneError
from fitune.recipe import Recipe
from fitune.session import build_session
from fitune.step import micro_batch_loss, train_step
from fitune.techniques.offload import ActivationOffload

from .conftest import TINY_LLAMA


def _recipe(kind="lora", layers=2, model_dtype="fp32", device="cpu", **train):
    return Recipe.from_dict(
        {
            "model": {"config": dict(TINY_LLAMA, num_hidden_layers=layers), "dtype": model_dtype},
            "method": {"kind": kind, "r": 4},
            "train": {
                "seq_len": 16,
                "batch_size": 2,
                "lr": 1e-2,
                "precision": "fp32",
                "max_steps": 20,
                **train,
            },
            "hardware": {"device": device},
        }
    )


def _plan_recipe(kind="lora", layers=2, vocab=260, device="cpu", **train):
    return Recipe.from_dict(
        {
            "model": {
                "config": dict(TINY_LLAMA, num_hidden_layers=layers, vocab_size=vocab),
                "dtype": "bf16",
            },
            "method": {"kind": kind, "r": 4},
            "train": {"seq_len": 128, "batch_size": 2, "precision": "bf16", **train},
            "hardware": {"device": device},
        }
    )


def _learnable_batch(b=2, t=16):
    """Targets follow from the input token alone (next id = id + 1), so a few steps can learn them."""
    batch = synthetic_batch(b, t, TINY_LLAMA["vocab_size"])
    batch.targets_BT = (batch.input_ids_BT + 1) % TINY_LLAMA["vocab_size"]
    return batch


def _train(recipe, steps=12):
    """Train on one learnable batch; returns the session, the losses and the names of changed parameters."""
    s = build_session(recipe, with_tokenizer=False)
    before = {n: p.detach().clone() for n, p in s.model.named_parameters()}
    batch = _learnable_batch()
    losses = [float(train_step(s, [batch])) for _ in range(steps)]
    changed = {n for n, p in s.model.named_parameters() if not torch.equal(before[n], p.detach())}
    return s, losses, changed


def _assert_trains_only_trainable(recipe, steps=12, factor=0.8):
    s, losses, changed = _train(recipe, steps)
    assert losses[-1] < factor * losses[0], losses
    trainable = {n for n, p in s.model.named_parameters() if p.requires_grad}
    assert changed == trainable
    if recipe.method.kind != "full":
        assert trainable and all("lora_" in n for n in trainable)
    return s, losses


def _grads(recipe, batch):
    s = build_session(recipe, with_tokenizer=False)
    loss = micro_batch_loss(s, batch, torch.tensor(batch.targets_BT.numel()))
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in s.trainable_parameters}


def _checkpointed_layers(session):
    from transformers.modeling_layers import GradientCheckpointingLayer

    layers = [m for m in session.model.modules() if isinstance(m, GradientCheckpointingLayer)]
    return [i for i, layer in enumerate(layers) if layer.gradient_checkpointing]


# --- gradient checkpointing -------------------------------------------------------------------------------


def test_checkpointing_with_frozen_base_gives_the_same_gradients_down_to_the_first_layer():
    batch = _learnable_batch()
    plain_loss, plain = _grads(_recipe(layers=3), batch)
    for choice in ("all", "every_2", [1]):
        loss, grads = _grads(_recipe(layers=3, gradient_checkpointing=True, checkpoint_layers=choice), batch)
        assert torch.equal(loss, plain_loss)
        first = [n for n in grads if ".layers.0." in n and "lora_B" in n]
        assert first and all(grads[n].abs().sum() > 0 for n in first)  # reached the first layer's adapters
        for name, g in plain.items():
            assert torch.allclose(grads[name], g, rtol=1e-5, atol=1e-7), (choice, name)


def test_checkpointing_trains_only_the_adapters():
    s, _ = _assert_trains_only_trainable(_recipe(gradient_checkpointing=True))
    assert _checkpointed_layers(s) == [0, 1]


@pytest.mark.parametrize(
    ("choice", "expected"),
    [("all", [0, 1, 2, 3]), ("every_2", [0, 2]), ("every_3", [0, 3]), ([1, 3], [1, 3])],
)
def test_checkpoint_layers_chooses_the_layers(choice, expected):
    r = _recipe(layers=4, gradient_checkpointing=True, checkpoint_layers=choice)
    assert _checkpointed_layers(build_session(r, with_tokenizer=False)) == expected


def test_checkpoint_layers_bad_values_name_the_field_and_the_fix():
    from fitune.errors import RecipeError

    with pytest.raises(RecipeError, match=r"train.checkpoint_layers: 'every2'.*fix: use all, every_2"):
        _recipe(gradient_checkpointing=True, checkpoint_layers="every2")
    with pytest.raises(
        RecipeError, match=r"gradient_checkpointing is false; fix: set gradient_checkpointing"
    ):
        _recipe(checkpoint_layers="every_2")
    with pytest.raises(FituneError, match=r"train.checkpoint_layers: \[0, 5\] names layer 5.*0 to 1"):
        build_session(_recipe(gradient_checkpointing=True, checkpoint_layers=[0, 5]), with_tokenizer=False)


def test_plan_checkpointing_lowers_saved_activations_layer_by_layer():
    plans = {
        name: fitune.plan(_plan_recipe(layers=4, **train))
        for name, train in {
            "off": {},
            "one": {"gradient_checkpointing": True, "checkpoint_layers": [0]},
            "half": {"gradient_checkpointing": True, "checkpoint_layers": "every_2"},
            "all": {"gradient_checkpointing": True},
        }.items()
    }
    acts = [plans[n].breakdown["activations"] for n in ("off", "one", "half", "all")]
    firsts = [plans[n].phases["first_step"] for n in ("off", "one", "half", "all")]
    assert acts == sorted(acts, reverse=True) and len(set(acts)) == 4
    assert firsts == sorted(firsts, reverse=True) and len(set(firsts)) == 4
    for name in ("off", "all"):  # the weights are the same
        assert plans[name].breakdown["frozen_weights"] == plans["off"].breakdown["frozen_weights"]


def test_plan_every_n_checkpointing_extrapolates_exactly():
    r = _plan_recipe(layers=8, gradient_checkpointing=True, checkpoint_layers="every_2", seq_len=64)
    short, full = fitune.plan(r), fitune.plan(r, full_trace=True)
    assert short.traced_layers == [4, 6] and full.traced_layers == [8]
    assert short.phases == full.phases and short.breakdown == full.breakdown


# --- attention kernel -------------------------------------------------------------------------------------


def test_eager_and_sdpa_attention_give_the_same_loss_and_gradients():
    batch = _learnable_batch()
    l_sdpa, g_sdpa = _grads(_recipe(attention="sdpa"), batch)
    l_eager, g_eager = _grads(_recipe(attention="eager"), batch)
    assert torch.allclose(l_sdpa, l_eager, rtol=1e-5)
    for name, g in g_sdpa.items():
        assert torch.allclose(g_eager[name], g, rtol=1e-4, atol=1e-6), name
    _assert_trains_only_trainable(_recipe(attention="eager"))


@pytest.mark.parametrize(
    ("heads", "kv_heads", "t", "block"), [(4, 2, 37, 16), (4, 4, 16, 128), (6, 1, 64, 32)]
)
def test_blocked_causal_attention_equals_exact_attention(heads, kv_heads, t, block):
    import torch.nn.functional as F

    from fitune.techniques.attention import _BlockedCausalAttention

    gen = torch.Generator().manual_seed(0)
    q, k, v = (
        torch.randn(2, h, t, 8, generator=gen, requires_grad=True) for h in (heads, kv_heads, kv_heads)
    )
    dout = torch.randn(2, t, heads, 8, generator=gen)
    want = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True).transpose(1, 2)
    got = _BlockedCausalAttention.apply(q, k, v, 8**-0.5, block)
    assert torch.allclose(got, want, atol=1e-6)
    got_grads = torch.autograd.grad(got, (q, k, v), dout)
    want_grads = torch.autograd.grad(want, (q, k, v), dout)
    for g, w in zip(got_grads, want_grads, strict=True):
        assert torch.allclose(g, w, atol=1e-5)


def test_gpu_plans_keep_sdpa_and_cpu_plans_trace_the_blocked_attention(monkeypatch):
    import fitune.session

    installed = []
    real = fitune.session.attention.install
    monkeypatch.setattr(
        fitune.session.attention, "install", lambda *a: installed.append(real(*a)) or installed[-1]
    )
    fitune.plan(_plan_recipe(device="rtx-4090"))
    assert installed == []  # the GPU runs torch's SDPA, so its plan traces that
    fitune.plan(_plan_recipe())
    assert installed and all(installed)


def test_cpu_sdpa_trains_with_blocked_attention_and_padding_falls_back():
    from fitune.techniques.attention import NAME

    s = build_session(_recipe(), with_tokenizer=False)
    assert s.causal_lm.config._attn_implementation == NAME
    eager = build_session(_recipe(attention="eager"), with_tokenizer=False)
    assert eager.causal_lm.config._attn_implementation == "eager"
    batch = _learnable_batch()
    batch.attention_mask_BT = torch.ones_like(batch.input_ids_BT)
    batch.attention_mask_BT[1, 12:] = 0  # a padded row: the mask goes to torch's SDPA
    batch.targets_BT[1, 12:] = -100
    n = torch.tensor(int((batch.targets_BT != -100).sum()))
    assert torch.allclose(micro_batch_loss(s, batch, n), micro_batch_loss(eager, batch, n), rtol=1e-5)


def test_flash_attention_is_refused_with_the_fix():
    with pytest.raises(
        FituneError, match=r"train.attention: 'flash_attention_2'.*fix: .*train.attention: sdpa"
    ):
        build_session(_recipe(attention="flash_attention_2"), with_tokenizer=False)
    with pytest.raises(FituneError, match=r"flash-attn.*fix: "):  # planning it needs the package too
        fitune.plan(_plan_recipe(attention="flash_attention_2", device="rtx-4090"))


def test_plan_eager_attention_keeps_the_score_matrices():
    sdpa = fitune.plan(_plan_recipe(attention="sdpa"))
    eager = fitune.plan(_plan_recipe(attention="eager"))  # B*H*T*T probabilities saved per layer
    assert eager.breakdown["activations"] > sdpa.breakdown["activations"]


# --- chunked cross-entropy --------------------------------------------------------------------------------


def test_chunked_loss_trains_only_the_adapters():
    s, _ = _assert_trains_only_trainable(_recipe(loss_chunk=5))
    assert s.loss_chunk == 5


def test_plan_chunked_loss_drops_the_logits():
    plain = fitune.plan(_plan_recipe(vocab=32000, seq_len=256, loss_chunk=0))
    chunked = fitune.plan(_plan_recipe(vocab=32000, seq_len=256, loss_chunk=64))
    logits = 2 * 256 * 32000 * 4  # fp32 logits of the micro-batch
    assert plain.peak_bytes - chunked.peak_bytes > 2 * logits
    for category in ("activations", "temporaries"):
        assert chunked.breakdown[category] < plain.breakdown[category]
    assert chunked.breakdown["frozen_weights"] == plain.breakdown["frozen_weights"]


def _trained_grads(recipe, batch):
    """Gradients on ``batch`` with LoRA B moved off its zero init (A would get no gradient otherwise)."""
    s = build_session(recipe, with_tokenizer=False)
    gen = torch.Generator().manual_seed(0)
    for name, p in s.trainable_parameters:
        if "lora_B" in name:
            p.data = torch.randn(p.shape, generator=gen, dtype=p.dtype) * 0.1
    loss = micro_batch_loss(s, batch, torch.tensor(batch.targets_BT.numel()))
    loss.backward()
    grads = {n: p.grad.clone() for n, p in s.trainable_parameters}
    assert all(g.abs().max() > 0 for g in grads.values())
    return loss.detach(), grads


def _assert_close_grads(got, want, rtol):
    for name, g in want.items():
        scale = g.abs().max()
        assert (got[name] - g).abs().max() <= rtol * scale, name


@pytest.mark.parametrize(
    ("kind", "precision", "model_dtype", "cap"),
    [
        ("lora", "fp32", "fp32", None),
        ("lora", "bf16", "bf16", None),
        ("full", "fp32", "fp32", None),
        ("lora", "fp32", "fp32", 3.0),
    ],
)
def test_fused_chunked_loss_equals_the_plain_loss_and_gradients(kind, precision, model_dtype, cap):
    batch = _learnable_batch()
    batch.targets_BT[0, :5] = -100  # ignored targets add neither loss nor gradient
    config = dict(TINY_LLAMA, final_logit_softcapping=cap) if cap else dict(TINY_LLAMA)

    def recipe(**train):
        r = _recipe(kind=kind, precision=precision, model_dtype=model_dtype, **train)
        return r.updated({"model.config": config})

    plain_loss, plain = _trained_grads(recipe(), batch)
    fused_loss, fused = _trained_grads(recipe(loss_chunk=7), batch)  # 32 tokens: the last chunk is short
    assert torch.allclose(fused_loss, plain_loss, rtol=1e-5)
    _assert_close_grads(fused, plain, rtol=1e-5 if precision == "fp32" else 1e-2)
    if kind == "full":  # the tied head/embedding gets both gradients
        assert "model.embed_tokens.weight" in fused


def test_fused_chunked_loss_keeps_no_logits_and_recomputes_nothing():
    from torch.utils.flop_counter import FlopCounterMode

    batch = _learnable_batch()

    def flops_and_saved(chunk):
        s = build_session(_recipe(loss_chunk=chunk), with_tokenizer=False)
        saved = []

        def pack(t):
            saved.append(t.numel() * t.element_size())
            return t

        with FlopCounterMode(display=False) as counter:
            with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
                loss = micro_batch_loss(s, batch, torch.tensor(32))
            loss.backward()
        return counter.get_total_flops(), max(saved)

    plain_flops, plain_biggest = flops_and_saved(0)
    fused_flops, fused_biggest = flops_and_saved(8)
    assert fused_flops == plain_flops  # the gradients are computed once, in the forward pass
    logits = 32 * TINY_LLAMA["vocab_size"] * 4
    assert plain_biggest >= logits and fused_biggest < logits


@pytest.mark.parametrize("recompute_mlp", [False, True, "up"])
def test_lean_activations_give_the_same_losses_and_gradients(recompute_mlp):
    batch = _learnable_batch()
    for precision in ("fp32", "bf16"):
        plain_loss, plain = _trained_grads(
            _recipe(precision=precision, model_dtype=precision, lean_activations=False), batch
        )
        lean_loss, lean = _trained_grads(
            _recipe(precision=precision, model_dtype=precision, recompute_mlp=recompute_mlp), batch
        )
        assert torch.equal(lean_loss, plain_loss)
        _assert_close_grads(lean, plain, rtol=1e-6)
    s = build_session(_recipe(), with_tokenizer=False)
    assert s.derived is not None
    assert build_session(_recipe(lean_activations=False), with_tokenizer=False).derived is None
    _assert_trains_only_trainable(_recipe(precision="bf16", model_dtype="bf16"))


def test_lean_activations_work_under_checkpointing_and_offload_hooks():
    batch = _learnable_batch()
    plain_loss, plain = _grads(_recipe(lean_activations=False), batch)
    s = build_session(_recipe(gradient_checkpointing=True, checkpoint_layers=[1]), with_tokenizer=False)
    s.offload = ActivationOffload(s.model, lambda host_category: contextlib.nullcontext())
    loss = micro_batch_loss(s, batch, torch.tensor(batch.targets_BT.numel()))
    loss.backward()
    assert torch.equal(loss.detach(), plain_loss)
    _assert_close_grads({n: p.grad for n, p in s.trainable_parameters}, plain, rtol=1e-6)


def test_plan_lean_activations_keep_fewer_activations_in_bf16():
    plain = fitune.plan(_plan_recipe(lean_activations=False))
    lean = fitune.plan(_plan_recipe())
    leaner = fitune.plan(_plan_recipe(recompute_mlp=True))
    assert leaner.breakdown["activations"] < 0.8 * lean.breakdown["activations"]
    assert lean.breakdown["activations"] < 0.8 * plain.breakdown["activations"]
    assert (
        leaner.breakdown["frozen_weights"]
        == lean.breakdown["frozen_weights"]
        == plain.breakdown["frozen_weights"]
    )


def test_recompute_mlp_recomputes_each_projection_once():
    from torch.utils.flop_counter import FlopCounterMode

    batch = _learnable_batch()

    def flops(**train):
        s = build_session(_recipe(**train), with_tokenizer=False)
        with FlopCounterMode(display=False) as counter:
            micro_batch_loss(s, batch, torch.tensor(32)).backward()
        return counter.get_total_flops()

    plain = flops()
    d, inter, r, tokens, layers = 64, 128, 4, 32, 2  # a projection: base weight and adapter, forward only
    projection = layers * 2 * tokens * (d * inter + r * (d + inter))
    assert flops(recompute_mlp=True) - plain == 2 * projection  # gate and up
    assert flops(recompute_mlp="up") - plain == projection


def test_adapters_share_their_bf16_input_under_autocast():
    from peft.tuners.lora import LoraLayer

    s = build_session(_recipe(precision="bf16", model_dtype="bf16"), with_tokenizer=False)
    layers = [m for m in s.model.modules() if isinstance(m, LoraLayer)]
    assert layers and not any(m.cast_input_dtype_enabled for m in layers)
    fp32 = build_session(_recipe(), with_tokenizer=False)  # no autocast: peft's own casting stays
    assert all(m.cast_input_dtype_enabled for m in fp32.model.modules() if isinstance(m, LoraLayer))


def test_auto_chunk_bounds_the_logits_of_a_chunk():
    from fitune.session import AUTO_CHUNK_LOGITS, resolve_loss_chunk

    assert resolve_loss_chunk("auto", 151_936) * 151_936 <= AUTO_CHUNK_LOGITS
    assert resolve_loss_chunk(0, 151_936) == 0 and resolve_loss_chunk(128, 10) == 128


# --- optimizers -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("optimizer", ["adamw", "adamw8bit", "paged_adamw8bit", "sgd"])
@pytest.mark.parametrize("kind", ["lora", "full"])
def test_each_optimizer_trains_only_the_trainable_weights(optimizer, kind):
    lr = 0.5 if optimizer == "sgd" and kind == "lora" else 1e-2
    with (
        pytest.warns(UserWarning, match="Paged")
        if optimizer == "paged_adamw8bit"
        else contextlib.nullcontext()
    ):
        _assert_trains_only_trainable(_recipe(kind, optimizer=optimizer, lr=lr), steps=15)


def test_adamw_uses_the_fused_kernel_on_cpu():
    s = build_session(_recipe(), with_tokenizer=False)
    assert isinstance(s.optimizer, torch.optim.AdamW) and s.optimizer.defaults["fused"]
    pure = build_session(_recipe("full", model_dtype="bf16", precision="bf16-pure"), with_tokenizer=False)
    assert pure.optimizer.defaults["fused"]


def test_plan_optimizer_state_by_optimizer():
    """Full fine-tune of the tiny model: most tensors are over bitsandbytes' 4,096-element 8-bit threshold."""
    state = {}
    for opt in ("adamw", "adamw8bit", "paged_adamw8bit", "sgd"):
        plan = fitune.plan(_plan_recipe("full", optimizer=opt, precision="fp32", seq_len=32))
        state[opt] = plan.breakdown.get("optimizer_state", 0)
    params = sum(p.numel() for p in build_session(_recipe("full"), with_tokenizer=False).model.parameters())
    assert state["adamw"] >= 8 * params  # two fp32 moments
    assert state["sgd"] >= 4 * params and state["sgd"] < 0.6 * state["adamw"]  # one fp32 momentum
    assert 0 < state["adamw8bit"] < 0.45 * state["adamw"]  # two 8-bit moments + block scales
    assert state["paged_adamw8bit"] == state["adamw8bit"]  # planned resident on the device


@pytest.mark.parametrize("kind", ["lora", "full"])
def test_plan_matches_cpu_measurement_with_adamw8bit(kind):
    r = _plan_recipe(kind, layers=3, optimizer="adamw8bit", seq_len=96)
    predicted, measured = fitune.plan(r), fitune.measure(r)
    for phase in ("first_step", "steady_step"):
        assert predicted.phases[phase] == pytest.approx(measured.phases[phase], rel=0.02), phase
    assert predicted.peak_bytes == pytest.approx(measured.peak_bytes, rel=0.02)


# --- activation offload -----------------------------------------------------------------------------------


def test_offload_is_a_no_op_on_cpu():
    on = _recipe(offload_activations=True)
    s = build_session(on, with_tokenizer=False)
    assert s.offload is None and any("offload_activations" in note for note in s.notes)
    _, losses_on, _ = _train(on, steps=4)
    _, losses_off, _ = _train(_recipe(), steps=4)
    assert losses_on == losses_off


def test_offload_hooks_give_the_same_gradients_and_copy_each_activation_once():
    """The hooks the planner runs for a GPU target, on real CPU tensors: the host copy and the copy back
    must give exactly the plain gradients."""
    batch = _learnable_batch()
    plain_loss, plain = _grads(_recipe(), batch)
    r = _recipe()
    s = build_session(r, with_tokenizer=False)
    copies = []

    @contextlib.contextmanager
    def host_memory(host_category):
        copies.append(host_category)
        yield

    s.offload = ActivationOffload(s.model, host_memory)
    loss = micro_batch_loss(s, batch, torch.tensor(batch.targets_BT.numel()))
    loss.backward()
    assert torch.equal(loss.detach(), plain_loss)
    for name, p in s.trainable_parameters:
        assert torch.equal(p.grad, plain[name]), name
    assert copies and set(copies) == {"offloaded_activations"}
    big_saves = []

    def count(t):
        big_saves.append(t.numel() * t.element_size() >= 1024)
        return t

    with torch.autograd.graph.saved_tensors_hooks(count, lambda t: t):
        micro_batch_loss(build_session(r, with_tokenizer=False), batch, torch.tensor(32))
    # q/k/v and their adapters share one copy of their input, and weights are never copied
    assert len(copies) < 0.5 * sum(big_saves)


def test_offload_trains_only_the_adapters_under_the_planning_hooks():
    s = build_session(_recipe(), with_tokenizer=False)
    s.offload = ActivationOffload(s.model, lambda host_category: contextlib.nullcontext())
    before = {n: p.detach().clone() for n, p in s.model.named_parameters()}
    batch = _learnable_batch()
    losses = [float(train_step(s, [batch])) for _ in range(12)]
    assert losses[-1] < 0.8 * losses[0]
    changed = {n for n, p in s.model.named_parameters() if not torch.equal(before[n], p.detach())}
    assert changed == {n for n, _ in s.trainable_parameters}


def test_plan_offload_moves_activations_to_host_for_a_gpu_and_changes_nothing_on_cpu():
    off = fitune.plan(_plan_recipe(device="rtx-4090"))
    on = fitune.plan(_plan_recipe(device="rtx-4090", offload_activations=True))
    assert on.breakdown.get("activations", 0) < 0.05 * off.breakdown["activations"]
    assert on.host["offloaded_activations"] >= 0.9 * off.breakdown["activations"]
    assert on.phases["first_step"] < off.phases["first_step"]
    assert not off.host
    cpu_off, cpu_on = fitune.plan(_plan_recipe()), fitune.plan(_plan_recipe(offload_activations=True))
    assert cpu_on.phases == cpu_off.phases and not cpu_on.host


# --- mixed precision --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kind", "precision", "model_dtype", "trainable", "frozen"),
    [
        ("lora", "bf16", "bf16", torch.float32, torch.bfloat16),
        ("lora", "fp16", "fp16", torch.float32, torch.float16),
        ("lora", "bf16-pure", "bf16", torch.bfloat16, torch.bfloat16),
        ("full", "bf16", "bf16", torch.float32, None),
        ("full", "bf16-pure", "bf16", torch.bfloat16, None),
    ],
)
def test_precision_trains_with_the_documented_dtypes(kind, precision, model_dtype, trainable, frozen):
    r = _recipe(kind, model_dtype=model_dtype, precision=precision, lr=1e-2 if kind == "lora" else 3e-3)
    s, _ = _assert_trains_only_trainable(r, steps=15)
    assert {p.dtype for _, p in s.trainable_parameters} == {trainable}
    frozen_dtypes = {p.dtype for p in s.model.parameters() if not p.requires_grad}
    assert frozen_dtypes == ({frozen} if frozen is not None else set())
    assert (s.grad_scaler is not None) == (precision == "fp16")
    assert s.compute_dtype == {"bf16": torch.bfloat16, "fp16": torch.float16, "bf16-pure": None}[precision]


def test_plan_bf16_pure_halves_the_weights_of_a_full_fine_tune():
    mixed = fitune.plan(_plan_recipe("full", precision="bf16"))
    pure = fitune.plan(_plan_recipe("full", precision="bf16-pure"))
    assert pure.breakdown["trainable_weights"] * 2 == mixed.breakdown["trainable_weights"]
    assert pure.breakdown["optimizer_state"] < 0.51 * mixed.breakdown["optimizer_state"]  # bf16 moments
    assert pure.peak_bytes < mixed.peak_bytes
