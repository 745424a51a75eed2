"""MemoryTracker against torch's CPU memory profiler, and fake tensors against real ones.

Tiny models built here: an MLP and a 2-layer Llama. A "step" is forward, loss, backward, AdamW step,
zero_grad(set_to_none=True); runs are two steps (the first creates the optimizer state).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable

import pytest
import torch
from torch import nn
from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode

from fitune.memory.measure_cpu import measure_cpu_allocations, measure_cpu_peak, phase
from fitune.memory.tracker import NO_MODULE, Category, MemoryTracker

TOLERANCE = 0.02  # tracker vs profiler, relative


def _build(kind: str, frozen: bool) -> nn.Module:
    torch.manual_seed(0)
    if kind == "mlp":
        model = nn.Sequential(
            nn.Linear(64, 256), nn.GELU(), nn.Linear(256, 256), nn.GELU(), nn.Linear(256, 10)
        )
        trainable = ("4.",)  # the head
    else:
        from transformers import LlamaConfig, LlamaForCausalLM

        config = LlamaConfig(
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            vocab_size=256,
        )
        model = LlamaForCausalLM(config)
        trainable = ("model.layers.1.mlp.",)  # like an adapter: a small part of one layer
    if frozen:
        for name, p in model.named_parameters():
            p.requires_grad_(name.startswith(trainable))
    return model


def _setup(kind: str, frozen: bool = False) -> tuple[nn.Module, torch.optim.Optimizer, Callable[[], None]]:
    model = _build(kind, frozen)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)

    def step() -> None:
        if kind == "mlp":
            x_BD = torch.randn(32, 64)
            y_B = torch.randint(0, 10, (32,))
            loss = nn.functional.cross_entropy(model(x_BD), y_B)
        else:
            ids_BT = torch.randint(0, 256, (2, 32))
            loss = model(input_ids=ids_BT, labels=ids_BT).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return model, optimizer, step


def _tracked_run(kind: str, frozen: bool = False, fake: bool = False, **kwargs) -> MemoryTracker:
    with FakeTensorMode() if fake else contextlib.nullcontext():
        model, optimizer, step = _setup(kind, frozen)
        if fake:
            assert all(isinstance(p, FakeTensor) for p in model.parameters())
        tracker = MemoryTracker(**kwargs)
        tracker.register_model(model)
        tracker.register_optimizer(optimizer)
        with tracker:
            for i in (1, 2):
                with tracker.phase(f"step{i}"):
                    step()
    return tracker


def _nbytes(tensors) -> int:
    return sum(t.untyped_storage().nbytes() for t in tensors)


@pytest.mark.parametrize("frozen", [False, True], ids=["full", "frozen"])
@pytest.mark.parametrize("kind", ["mlp", "llama"])
def test_tracker_matches_cpu_profiler(kind: str, frozen: bool) -> None:
    tracker = _tracked_run(kind, frozen)
    _, _, step = _setup(kind, frozen)
    measured = measure_cpu_peak(lambda: (step(), step()))

    # Absolute: the profiler counts pre-existing storage that the steps touch (all parameters; not a
    # buffer the forward never reads, e.g. Llama's rotary `original_inv_freq`, 32 bytes here).
    assert abs(tracker.peak_bytes - measured.peak_bytes) <= TOLERANCE * measured.peak_bytes
    # Relative to the start. Measured gap: 0 B for Llama, 12 B of 1.55 MB for the MLP (a Python float
    # wrapped as a 0-dim tensor and a dtype cast inside `aten.div`, both allocated inside a kernel).
    start = tracker.phase_peaks()["default"]
    relative = tracker.peak_bytes - start
    assert abs(relative - measured.peak_bytes_relative) <= TOLERANCE * measured.peak_bytes_relative
    assert sum(measured.breakdown_at_peak.values()) == measured.peak_bytes


@pytest.mark.parametrize("kind", ["mlp", "llama"])
def test_allocation_events_give_the_profilers_peaks(kind: str) -> None:
    """The Python-tracer-free reading (what fitune.measure uses, model build included) equals the memory
    timeline's, overall and per phase."""

    def run():
        with phase("build"):
            holder = _setup(kind, frozen=True)
        for i in (1, 2):
            with phase(f"step{i}"):
                holder[2]()

    fast = measure_cpu_allocations(run)
    full = measure_cpu_peak(run)
    assert fast.peak_bytes_relative > 0
    assert fast.peak_bytes_relative == full.peak_bytes_relative
    assert fast.phase_peaks_relative == full.phase_peaks_relative
    assert set(fast.phase_peaks_relative) == {"build", "step1", "step2"}


@pytest.mark.parametrize("frozen", [False, True], ids=["full", "frozen"])
@pytest.mark.parametrize("kind", ["mlp", "llama"])
def test_fake_tensors_give_the_real_peak(kind: str, frozen: bool) -> None:
    real = _tracked_run(kind, frozen)
    fake = _tracked_run(kind, frozen, fake=True)
    assert fake.peak_bytes == real.peak_bytes
    assert fake.breakdown_at_peak() == real.breakdown_at_peak()
    assert (fake.peak_op, fake.peak_module, fake.peak_stage, fake.peak_phase) == (
        real.peak_op,
        real.peak_module,
        real.peak_stage,
        real.peak_phase,
    )
    assert fake.phase_peaks() == real.phase_peaks()


@pytest.mark.parametrize("fake", [False, True], ids=["real", "fake"])
@pytest.mark.parametrize("kind", ["mlp", "llama"])
def test_categories_sum_to_the_peak(kind: str, fake: bool) -> None:
    tracker = _tracked_run(kind, fake=fake)
    breakdown = tracker.breakdown_at_peak()
    assert sum(breakdown.values()) == tracker.peak_bytes
    assert all(v >= 0 for v in breakdown.values())
    assert max(tracker.phase_peaks().values()) == tracker.peak_bytes
    assert set(tracker.phase_peaks()) == {"default", "step1", "step2"}
    assert tracker.peak_op.startswith("aten.")
    assert tracker.peak_module != NO_MODULE


@pytest.mark.parametrize("fake", [False, True], ids=["real", "fake"])
@pytest.mark.parametrize("kind", ["mlp", "llama"])
def test_frozen_parameters_are_frozen_weights_without_gradients(kind: str, fake: bool) -> None:
    with FakeTensorMode() if fake else contextlib.nullcontext():
        model, optimizer, step = _setup(kind, frozen=True)
        frozen = [p for p in model.parameters() if not p.requires_grad]
        trainable = [p for p in model.parameters() if p.requires_grad]
        assert frozen and trainable
        tracker = MemoryTracker()
        tracker.register_model(model)
        tracker.register_optimizer(optimizer)
        with tracker:
            step()
            with tracker.phase("step2"):
                step()
        state = [t for s in optimizer.state.values() for t in s.values() if isinstance(t, torch.Tensor)]
    assert all(p.grad is None for p in frozen)
    live = tracker.live_breakdown()
    assert live[Category.FROZEN_WEIGHTS] == _nbytes(frozen) + _nbytes(model.buffers())
    assert live[Category.TRAINABLE_WEIGHTS] == _nbytes(trainable)
    assert live[Category.OPTIMIZER_STATE] == _nbytes(state)
    assert live[Category.GRADIENTS] == 0  # zero_grad(set_to_none=True)
    step2 = tracker.phase_peak_info("step2").breakdown
    assert step2[Category.FROZEN_WEIGHTS] == live[Category.FROZEN_WEIGHTS]
    assert step2[Category.OPTIMIZER_STATE] == _nbytes(state)
    assert 0 < step2[Category.GRADIENTS] + step2[Category.ACTIVATIONS]


def test_categories_follow_the_step() -> None:
    model, optimizer, _ = _setup("mlp")
    params = list(model.parameters())
    tracker = MemoryTracker()
    tracker.register_model(model)
    tracker.register_optimizer(optimizer)
    with tracker:
        x_BD = torch.randn(32, 64)
        loss = model(x_BD).square().mean()
        after_forward = tracker.live_breakdown()
        loss.backward()
        after_backward = tracker.live_breakdown()
        optimizer.step()
        after_step = tracker.live_breakdown()
        optimizer.zero_grad(set_to_none=True)
        after_zero = tracker.live_breakdown()
    assert after_forward[Category.ACTIVATIONS] > 0
    assert after_forward[Category.GRADIENTS] == 0
    assert after_backward[Category.GRADIENTS] == _nbytes(params)
    # The graph is freed by backward; only the input, saved by the first Linear, is still referenced.
    assert after_backward[Category.ACTIVATIONS] == _nbytes([x_BD])
    state = [t for s in optimizer.state.values() for t in s.values()]
    assert after_step[Category.OPTIMIZER_STATE] == _nbytes(state)
    assert after_zero[Category.GRADIENTS] == 0
    # Optimizer state created inside the step is OPTIMIZER_STATE at a peak inside that step.
    if tracker.peak_stage == "optimizer":
        assert tracker.breakdown_at_peak()[Category.OPTIMIZER_STATE] > 0


def test_backward_ops_are_attributed_to_modules() -> None:
    tracker = _tracked_run("llama", max_timeline_points=100_000)
    names = {p.module for p in tracker.timeline if p.stage == "backward"}
    assert any(n.startswith("model.layers.0.") for n in names)
    assert any(n.startswith("model.layers.1.") for n in names)
    assert {p.module for p in tracker.timeline if p.stage == "optimizer"} == {"AdamW"}


def test_timeline_is_bounded_and_keeps_the_peak() -> None:
    tracker = _tracked_run("llama", max_timeline_points=16)
    points = tracker.timeline
    assert len(points) <= 2 * 16 + 1
    assert max(p.live_bytes for p in points) == tracker.peak_bytes
    assert [p.event for p in points] == sorted(p.event for p in points)
    assert all(sum(p.by_category.values()) == p.live_bytes for p in points)


def test_round_bytes_models_the_allocator() -> None:
    exact = _tracked_run("mlp")
    rounded = _tracked_run("mlp", round_bytes=lambda n: -(-n // 512) * 512)
    assert rounded.peak_bytes >= exact.peak_bytes
    assert rounded.peak_bytes % 512 == 0


def test_bitsandbytes_quant_state_and_fake_matmul_4bit() -> None:
    bnb = pytest.importorskip("bitsandbytes")
    from bitsandbytes.functional import quantize_4bit

    lin = bnb.nn.Linear4bit(64, 128, bias=False, compute_dtype=torch.bfloat16, quant_type="nf4").to("cpu")
    tracker = MemoryTracker()
    tracker.register_model(lin)
    quant_state = tracker.live_breakdown()[Category.QUANT_STATE]
    assert quant_state > 0
    assert tracker.live_breakdown()[Category.FROZEN_WEIGHTS] == _nbytes([lin.weight])

    # Params4bit cannot wrap a FakeTensor; a plain frozen Parameter carrying `quant_state` runs the
    # same bnb.matmul_4bit. bnb's cached quantization code is a real tensor: allow_non_fake_inputs.
    peaks = []
    for fake in (False, True):
        with FakeTensorMode(allow_non_fake_inputs=True) if fake else contextlib.nullcontext():
            torch.manual_seed(0)
            w_OI = torch.randn(128, 64, dtype=torch.bfloat16)
            q, state = quantize_4bit(w_OI, blocksize=64, quant_type="nf4", compress_statistics=True)
            weight = nn.Parameter(q, requires_grad=False)
            weight.quant_state = state
            holder = nn.Module()
            holder.weight = weight
            x_BI = torch.randn(4, 64, dtype=torch.bfloat16, requires_grad=True)
            tracker = MemoryTracker()
            tracker.register_model(holder)
            with tracker:
                y_BO = bnb.matmul_4bit(x_BI, weight.t(), bias=None, quant_state=state)
                y_BO.float().sum().backward()
        assert tracker.breakdown_at_peak()[Category.QUANT_STATE] > 0
        peaks.append((tracker.peak_bytes, tracker.peak_op, tracker.breakdown_at_peak()))
    assert peaks[0] == peaks[1]


def test_a_phase_that_allocates_nothing_holds_what_it_started_with() -> None:
    import torch

    def run():
        with phase("make"):
            kept = torch.ones(1000)
        with phase("idle"):
            total = 0
            for i in range(10):
                total += i
        with phase("free"):
            del kept

    for reading in (measure_cpu_allocations, measure_cpu_peak):
        peaks = reading(run).phase_peaks_relative
        assert peaks == {"make": 4000, "idle": 4000, "free": 4000}, reading.__name__
