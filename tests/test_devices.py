"""Device memory models: CUDA caching-allocator simulation, overheads, and the wiring with the tracker."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn
from torch._subclasses.fake_tensor import FakeTensorMode

from fitune.errors import FituneError
from fitune.hardware.catalog import get_gpu
from fitune.memory.devices import (
    CUBLAS_WORKSPACE_32MIB_BYTES,
    CUBLAS_WORKSPACE_BYTES,
    CUDA_CONTEXT_BYTES,
    LARGE_BUFFER,
    SMALL_BUFFER,
    SMALL_SIZE,
    CachingAllocatorSim,
    CpuModel,
    CudaModel,
    cuda_totals,
    device_model,
)
from fitune.memory.tracker import MemoryTracker

KIB = 1024
MIB = 1024 * 1024


def test_cuda_rounding_is_512_byte_blocks() -> None:
    m = CudaModel()
    assert [m.round_bytes(n) for n in (1, 511, 512, 513, 1024, 1025)] == [512, 512, 512, 1024, 1024, 1536]
    assert m.round_bytes(0) == 0  # torch allocates nothing for an empty tensor


def test_small_allocations_share_one_2mib_segment() -> None:
    sim = CachingAllocatorSim()
    for key in range(110):
        sim.malloc(key, 10 * KIB)
    assert sim.num_segments == 1
    assert sim.reserved_bytes == SMALL_BUFFER
    assert sim.allocated_bytes == 110 * 10 * KIB
    sim.malloc(110, 1 * MIB)  # the largest small request; the 948 KiB left cannot hold it
    assert sim.num_segments == 2 and sim.reserved_bytes == 2 * SMALL_BUFFER


def test_medium_requests_split_a_20mib_segment() -> None:
    sim = CachingAllocatorSim()
    sim.malloc(1, 5 * MIB)
    assert (sim.num_segments, sim.reserved_bytes, sim.allocated_bytes) == (1, LARGE_BUFFER, 5 * MIB)
    sim.malloc(2, 5 * MIB)  # the 15 MiB remainder was split off and cached: reused
    assert (sim.num_segments, sim.reserved_bytes, sim.allocated_bytes) == (1, LARGE_BUFFER, 10 * MIB)


def test_large_request_reserves_its_size_rounded_to_2mib() -> None:
    sim = CachingAllocatorSim()
    sim.malloc(1, 30 * MIB)
    assert sim.reserved_bytes == 30 * MIB and sim.allocated_bytes == 30 * MIB
    sim.malloc(2, 30 * MIB + 1)
    assert sim.reserved_bytes == 30 * MIB + 32 * MIB
    assert sim.num_segments == 2


def test_unsplit_large_block_counts_whole_in_allocated() -> None:
    # 11 MiB + 512 B gets a 12 MiB segment; the remainder (< 1 MiB + 1) is not split off, and torch's
    # allocated_bytes counts the whole block.
    sim = CachingAllocatorSim()
    sim.malloc(1, 11 * MIB + 512)
    assert sim.reserved_bytes == 12 * MIB
    assert sim.allocated_bytes == 12 * MIB


def test_free_then_same_size_reuses_the_cached_block() -> None:
    sim = CachingAllocatorSim()
    for size in (300 * KIB, 5 * MIB, 40 * MIB):
        sim.malloc(1, size)
        reserved = sim.reserved_bytes
        sim.free(1)
        assert sim.allocated_bytes == 0 and sim.reserved_bytes == reserved  # segments are kept
        sim.malloc(1, size)
        assert sim.reserved_bytes == reserved
        sim.free(1)


def test_best_fit_picks_the_smallest_cached_block() -> None:
    sim = CachingAllocatorSim()
    sim.malloc(1, 40 * MIB)
    sim.malloc(2, 12 * MIB)
    sim.free(1)
    sim.free(2)
    sim.malloc(3, 12 * MIB)  # fits both cached blocks; best fit takes the 12 MiB one
    sim.malloc(4, 40 * MIB)  # so the 40 MiB block is still whole
    assert sim.reserved_bytes == 52 * MIB


def test_freed_neighbours_merge_so_a_larger_request_fits() -> None:
    sim = CachingAllocatorSim()
    for key in range(4):
        sim.malloc(key, 4 * MIB)  # 4 blocks of one 20 MiB segment; 4 MiB left
    assert sim.num_segments == 1
    sim.free(1)
    sim.free(2)  # blocks 1 and 2 merge into 8 MiB
    sim.malloc(10, 8 * MIB)
    assert sim.num_segments == 1  # without merging this would need a new segment
    sim.free(10)
    sim.free(0)
    sim.free(3)  # everything free: one 20 MiB block again
    sim.malloc(11, 9 * MIB)
    sim.malloc(12, 9 * MIB)
    assert sim.num_segments == 1 and sim.reserved_bytes == LARGE_BUFFER


def test_pools_do_not_share_segments() -> None:
    sim = CachingAllocatorSim()
    sim.malloc(1, 5 * MIB)  # large pool, 15 MiB cached remainder
    sim.malloc(2, 512)  # small pool: a new 2 MiB segment, not a piece of the large one
    assert sim.num_segments == 2 and sim.reserved_bytes == LARGE_BUFFER + SMALL_BUFFER


def test_peaks_are_tracked() -> None:
    sim = CachingAllocatorSim()
    sim.malloc(1, 30 * MIB)
    sim.malloc(2, 30 * MIB)
    sim.free(1)
    sim.free(2)
    sim.malloc(3, 10 * MIB)  # fits a cached 30 MiB block, split (20 MiB > 1 MiB remains)
    assert sim.allocated_bytes == 10 * MIB
    assert sim.peak_allocated == 60 * MIB
    assert sim.peak_reserved == sim.reserved_bytes == 60 * MIB


def test_live_keys_are_checked() -> None:
    sim = CachingAllocatorSim()
    sim.malloc(1, 100)
    with pytest.raises(ValueError):
        sim.malloc(1, 100)
    sim.free(1)
    with pytest.raises(KeyError):
        sim.free(1)


def test_cpu_model_is_identity_without_overheads() -> None:
    m = device_model("cpu")
    assert isinstance(m, CpuModel) and m.kind == "cpu"
    assert [m.round_bytes(n) for n in (0, 1, 513, 10**9 + 7)] == [0, 1, 513, 10**9 + 7]
    assert m.new_allocator() is None
    assert m.overheads() == []


def test_device_model_dispatch() -> None:
    assert isinstance(device_model("cuda:1"), CudaModel)
    model = device_model("cuda", get_gpu("rtx-4090"))
    assert isinstance(model, CudaModel) and model.gpu is not None
    assert model.new_allocator() is not model.new_allocator()  # fresh per simulation
    with pytest.raises(FituneError):
        device_model("mps")


def _overheads(model: CudaModel) -> dict[str, tuple[int, str]]:
    return {o.name: (o.bytes, o.counted_in) for o in model.overheads()}


def test_cublas_workspace_depends_on_architecture() -> None:
    ada = _overheads(CudaModel(get_gpu("rtx-4090")))  # sm_89: the ":4096:2:16:8" default
    assert ada["cuBLAS workspaces"] == (2 * CUBLAS_WORKSPACE_BYTES, "allocated")
    # two 8,519,680 B workspaces fill one 20 MiB segment; the rest is reserved, not allocated
    assert ada["cuBLAS workspace segment remainder"] == (
        LARGE_BUFFER - 2 * CUBLAS_WORKSPACE_BYTES,
        "reserved",
    )
    hopper = _overheads(CudaModel(get_gpu("h100-80gb")))  # sm_90: 32 MiB, an exact segment each
    assert hopper["cuBLAS workspaces"] == (2 * CUBLAS_WORKSPACE_32MIB_BYTES, "allocated")
    assert "cuBLAS workspace segment remainder" not in hopper
    unknown = _overheads(CudaModel())
    assert unknown["cuBLAS workspaces"][0] == 2 * CUBLAS_WORKSPACE_32MIB_BYTES
    assert ada["CUDA context"] == (CUDA_CONTEXT_BYTES, "device")
    separate = _overheads(CudaModel(get_gpu("rtx-4090"), unified_cublaslt=False, cublas_handles=1))
    assert separate["cuBLAS workspaces"][0] == CUBLAS_WORKSPACE_BYTES + 1 * MIB


def test_every_overhead_cites_a_source() -> None:
    for gpu in (None, get_gpu("t4"), get_gpu("h200")):
        for overhead in CudaModel(gpu).overheads():
            assert overhead.bytes > 0
            assert overhead.counted_in in ("allocated", "reserved", "device")
            assert "http" in overhead.source or overhead.source.startswith("measured on")


def test_cuda_totals_adds_overheads_where_torch_counts_them() -> None:
    model = CudaModel(get_gpu("rtx-4090"), context_bytes=300 * MIB, context_source="measured on test")
    totals = cuda_totals(100 * MIB, 120 * MIB, model)
    workspaces = 2 * CUBLAS_WORKSPACE_BYTES
    assert totals["allocated"] == 100 * MIB + workspaces
    assert totals["reserved"] == 120 * MIB + LARGE_BUFFER
    assert totals["device_total"] == totals["reserved"] + 300 * MIB


def _fake_step(sizes: tuple[int, int, int], batch: int) -> tuple[MemoryTracker, CachingAllocatorSim]:
    model_cuda = CudaModel()
    sim = model_cuda.new_allocator()
    with FakeTensorMode():
        torch.manual_seed(0)
        d_in, d_hidden, d_out = sizes
        model = nn.Sequential(nn.Linear(d_in, d_hidden), nn.ReLU(), nn.Linear(d_hidden, d_out))
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
        tracker = MemoryTracker(round_bytes=model_cuda.round_bytes, allocator=sim)
        tracker.register_model(model)
        tracker.register_optimizer(optimizer)
        with tracker:
            for _ in range(2):
                x = torch.randn(batch, d_in)
                loss = model(x).square().mean()
                loss.backward()
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
            del x, loss
    return tracker, sim


def test_tracker_drives_the_allocator_sim() -> None:
    tracker, sim = _fake_step((64, 128, 16), batch=8)  # every storage is small: allocated == tracked
    assert tracker.peak_bytes > 0
    assert sim.peak_allocated == tracker.peak_bytes
    assert sim.peak_reserved >= sim.peak_allocated
    assert sim.peak_reserved % SMALL_BUFFER == 0
    assert sim.allocated_bytes == tracker.live_bytes == 0  # the model is gone: every free reached the sim


def test_tracker_drives_the_sim_through_the_large_pool() -> None:
    # Odd sizes of 1-12 MiB: 20 MiB segments split, and large blocks handed out unsplit with slack,
    # which torch's allocated counts, so the sim's peak is at or above the tracker's.
    tracker, sim = _fake_step((1000, 3000, 777), batch=333)
    assert sim.peak_allocated >= tracker.peak_bytes
    assert sim.peak_reserved >= sim.peak_allocated
    assert sim.num_segments > 1
    assert sim.allocated_bytes == tracker.live_bytes == 0


_OPS = st.lists(
    st.tuples(
        st.booleans(),  # free one live allocation (when any) instead of allocating
        st.one_of(st.integers(1, 2 * MIB), st.integers(1, 64 * MIB)),
        st.integers(0, 10**6),  # picks which allocation to free
    ),
    max_size=80,
)


@settings(max_examples=150, deadline=None)
@given(_OPS)
def test_allocator_invariants(ops: list[tuple[bool, int, int]]) -> None:
    sim = CachingAllocatorSim()
    live: dict[int, int] = {}  # key -> rounded request
    for key, (do_free, nbytes, pick) in enumerate(ops):
        if do_free and live:
            victim = sorted(live)[pick % len(live)]
            sim.free(victim)
            del live[victim]
        else:
            sim.malloc(key, nbytes)
            live[key] = CudaModel().round_bytes(nbytes)
        requested = sum(live.values())
        large = sum(1 for size in live.values() if size > SMALL_SIZE)
        # small blocks are exact; a large block is at most 1 MiB bigger than its request (should_split)
        assert requested <= sim.allocated_bytes <= requested + large * MIB
        assert sim.allocated_bytes <= sim.reserved_bytes == sim.peak_reserved
        assert sim.peak_allocated >= sim.allocated_bytes
    for key in list(live):
        sim.free(key)
    assert sim.allocated_bytes == 0


def test_cpu_bf16_bmm_copy_is_modelled_as_measured() -> None:
    """The CPU kernel scratch the model adds equals what the profiler sees beyond the op's output, for the
    layouts a linear layer hands to bmm (the generation step's sliced input among them)."""
    import torch
    import torch.nn.functional as F

    from fitune.memory.devices import CpuModel, cpu_bf16_matmul_in_onednn
    from fitune.memory.measure_cpu import measure_cpu_allocations
    from fitune.memory.tracker import MemoryTracker

    model = CpuModel()
    weight = torch.randn(3000, 64, dtype=torch.bfloat16)
    cases = {
        "sliced input, one sequence": torch.randn(1, 40, 64, dtype=torch.bfloat16)[:, -1:],
        "sliced input, two sequences": torch.randn(2, 40, 64, dtype=torch.bfloat16)[:, -1:],
        "contiguous input": torch.randn(2, 40, 64, dtype=torch.bfloat16),
        "fp32": torch.randn(2, 40, 64)[:, -1:],
    }
    # oneDNN (bf16 on an AVX-512 CPU) copies; torch's own kernel (AVX2, or oneDNN switched off) does not
    for onednn in (True, False):
        with torch.backends.mkldnn.flags(enabled=onednn):
            copies = cpu_bf16_matmul_in_onednn()
            assert not copies or onednn
            for name, x in cases.items():
                w = weight if x.dtype == torch.bfloat16 else weight.float()
                measured = measure_cpu_allocations(lambda x=x, w=w: F.linear(x, w)).peak_bytes_relative
                tracker = MemoryTracker(kernel_scratch=model.kernel_scratch)
                with tracker:
                    F.linear(x, w)
                # the kernels also take a few KiB of their own scratch that no model covers
                assert 0 <= measured - tracker.peak_bytes < 64 * 1024, (name, onednn)
                copied = tracker.peak_bytes - x.shape[0] * x.shape[1] * 3000 * x.element_size()
                assert (copied > 0) == (name.startswith("sliced") and copies), (name, onednn)


def test_flash_backward_scratch_follows_flash_api() -> None:
    """softmax_d and dq_accum (rounded to 128 rows and 32-wide heads), and the GQA expansions of dk/dv."""
    from fitune.memory.devices import cuda_round_size, flash_backward_scratch_bytes

    # Llama-3.1-8B shapes: 32 query heads, 8 key/value heads, head_dim 128, bf16, micro-batch 2 at 1000 tokens
    got = flash_backward_scratch_bytes(2, 32, 8, 1000, 1000, 128, 2)
    softmax_d = 2 * 32 * 1024 * 4
    dq_accum = 2 * 1024 * 32 * 128 * 4
    expanded = 2 * 1000 * 32 * 128 * 2
    assert got == cuda_round_size(softmax_d) + cuda_round_size(dq_accum) + 2 * cuda_round_size(expanded)
    # head_dim 80 rounds to 96; no expansion without GQA; above 192 the head rounds to 256
    assert flash_backward_scratch_bytes(1, 4, 4, 128, 128, 80, 2) == cuda_round_size(
        4 * 128 * 4
    ) + cuda_round_size(128 * 4 * 96 * 4)
    assert flash_backward_scratch_bytes(1, 1, 1, 128, 128, 200, 2) == cuda_round_size(512) + cuda_round_size(
        128 * 256 * 4
    )


def test_flash_scratch_is_counted_where_the_gpu_runs_the_flash_kernel(monkeypatch) -> None:
    import torch

    import fitune
    from fitune.hardware.catalog import get_gpu
    from fitune.memory.devices import CudaModel, flash_backward_scratch_bytes
    from fitune.recipe import Recipe

    op = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward.default
    q = torch.empty(2, 8, 300, 64, dtype=torch.bfloat16)
    kv = torch.empty(2, 2, 300, 64, dtype=torch.bfloat16)
    args = (q, q, kv, kv, q, torch.empty(2, 8, 300), 0.0, True)
    expected = flash_backward_scratch_bytes(2, 8, 2, 300, 300, 64, 2)
    assert CudaModel(get_gpu("rtx-4090")).kernel_scratch(op, args, {}) == expected
    assert CudaModel(get_gpu("t4")).kernel_scratch(op, args, {}) == 0  # sm_75: memory-efficient kernel
    assert CudaModel(get_gpu("rtx-4090")).kernel_scratch(op, args, {"attn_mask": q}) == 0  # a mask: efficient
    fp32 = (q.float(), q.float(), kv.float(), kv.float(), q.float(), args[5], 0.0, True)
    assert CudaModel(get_gpu("rtx-4090")).kernel_scratch(op, fp32, {}) == 0
    assert CudaModel(get_gpu("rtx-4090")).kernel_scratch(torch.ops.aten.mm.default, (q, q), {}) == 0

    # a plan for the GPU asks for it at every attention backward and counts what it answers
    seen = []
    original = CudaModel.kernel_scratch

    def spy(self, func, a, k):
        n = original(self, func, a, k)
        if n:
            seen.append(n)
        return n

    monkeypatch.setattr(CudaModel, "kernel_scratch", spy)
    config = {
        "model_type": "llama",
        "hidden_size": 256,
        "intermediate_size": 512,
        "num_hidden_layers": 2,
        "num_attention_heads": 8,
        "num_key_value_heads": 2,
        "vocab_size": 512,
    }
    r = Recipe.from_dict(
        {
            "model": {"config": config, "dtype": "bf16"},
            "method": {"kind": "lora"},
            "train": {"seq_len": 300, "batch_size": 2, "precision": "bf16"},
            "hardware": {"device": "rtx-4090"},
        }
    )
    fitune.plan(r, full_trace=True)
    assert seen and set(seen) == {flash_backward_scratch_bytes(2, 8, 2, 300, 300, 32, 2)}
