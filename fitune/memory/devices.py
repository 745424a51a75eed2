"""Device memory models: what a device adds to the tensor bytes the tracker records.

The tracker (``tracker.py``) sees every storage a training step allocates. A device adds three things
fake tensors cannot show, and this module models them from torch's own sources:

- rounding: the size each allocation really takes (``DeviceModel.round_bytes``, applied by the tracker);
- caching: memory the allocator holds beyond the live blocks (``DeviceModel.new_allocator``, an allocator
  simulation the tracker drives with every malloc and free, in order);
- overheads: memory outside the tensors the tracker sees (``DeviceModel.overheads``): library workspaces,
  the CUDA context.

CPU: tensor bytes as the CPU allocator reports them to torch's profiler (``nbytes``), with no caching and
no overheads.

CUDA: torch's caching allocator (``c10/cuda/CUDACachingAllocator.cpp``), in its default configuration
(``PYTORCH_CUDA_ALLOC_CONF`` unset). ``CachingAllocatorSim`` reproduces its block rounding, its two pools,
segment sizes, best-fit search, splitting and merging. Simplified (each is named where it matters below):

- one stream and one device; no cross-stream use (``record_stream``), no CUDA graph pools;
- segments are never returned to the driver: the retry paths that free cached segments on an
  out-of-memory error (``release_cached_blocks``, ``empty_cache``) and garbage collection are left out,
  so the simulation answers "how much must be free", not "what happens on an OOM";
- segment addresses are handed out in allocation order. Torch breaks best-fit ties by address, and
  cudaMalloc addresses need not follow that order;
- the non-default options are not modelled: ``expandable_segments``, ``max_split_size_mb``,
  ``roundup_power2_divisions``, ``garbage_collection_threshold``.

The constants come from the torch sources that match the torch 2.13 wheel's headers. The allocator
constants also appear in the wheel's ``torch/include/c10/core/AllocatorConfig.h``.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal, Protocol

from fitune.errors import FituneError

if TYPE_CHECKING:
    from fitune.hardware.catalog import GPU

_KIB = 1024
_MIB = 1024 * 1024

# --------------------------------------------------------------------------- sources

ALLOCATOR_SOURCE = "https://github.com/pytorch/pytorch/blob/main/c10/cuda/CUDACachingAllocator.cpp"
ALLOCATOR_CONFIG_SOURCE = "https://github.com/pytorch/pytorch/blob/main/c10/core/AllocatorConfig.h"
CUBLAS_SOURCE = "https://github.com/pytorch/pytorch/blob/main/aten/src/ATen/cuda/CublasHandlePool.cpp"
HANDLE_POOL_SOURCE = (
    "https://github.com/pytorch/pytorch/blob/main/aten/src/ATen/cuda/detail/DeviceThreadHandles.h"
)

# --------------------------------------------------------------------------- caching allocator constants
# All from CUDACachingAllocator.cpp / AllocatorConfig.h (ALLOCATOR_SOURCE, ALLOCATOR_CONFIG_SOURCE).

MIN_BLOCK_SIZE = 512  # kMinBlockSize: "all sizes are rounded to at least 512 bytes" (round_size)
SMALL_SIZE = 1 * _MIB  # kSmallSize: "largest 'small' allocation is 1 MiB" (get_pool: size <= kSmallSize)
SMALL_BUFFER = 2 * _MIB  # kSmallBuffer: "'small' allocations are packed in 2 MiB blocks"
# kLargeBuffer, 20 MiB: "'large' allocations may be packed in 20 MiB blocks". It is now
# AcceleratorAllocatorConfig::large_segment_size(), whose default is 20971520.
LARGE_BUFFER = 20 * _MIB
MIN_LARGE_ALLOC = 10 * _MIB  # kMinLargeAlloc: "allocations between 1 and 10 MiB may use kLargeBuffer"
ROUND_LARGE = 2 * _MIB  # kRoundLarge: "round up large allocations to 2 MiB"

# --------------------------------------------------------------------------- overhead constants

# cuBLAS workspace, CublasHandlePool.cpp parseChosenWorkspaceSize(). Without CUBLAS_WORKSPACE_CONFIG the
# default is ":4096:2:16:8", i.e. 2 x 4096 KiB + 8 x 16 KiB = 8,519,680 B. Issue pytorch#95668 and a
# discuss.pytorch.org memory_snapshot show exactly 8,519,680 B left allocated after a Linear, inside a
# 20 MiB large-pool segment. Hopper and Blackwell default to 4096 KiB x 8 = 32 MiB instead
# ("32MiB for Hopper and Blackwell": compute-capability major 9, 10 or 12). pytorch PR #175344 re-enabled
# 32 MiB on Blackwell; the revert PR #182669 was closed unmerged. Later sources add major 11 (Thor).
CUBLAS_WORKSPACE_BYTES = 4096 * _KIB * 2 + 16 * _KIB * 8
CUBLAS_WORKSPACE_32MIB_BYTES = 4096 * _KIB * 8
CUBLAS_WORKSPACE_32MIB_MAJORS = frozenset({9, 10, 12})

# cuBLASLt workspace, CublasHandlePool.cpp parseCUDABlasLtWorkspaceSize(): "1024 KiB, default size
# according to #73328". Unless TORCH_CUBLASLT_UNIFIED_WORKSPACE=0 (outside fbcode), the workspaces are
# unified: cuBLASLt uses the cuBLAS workspace of the same (handle, stream) and allocates nothing of its own.
CUBLASLT_WORKSPACE_BYTES = 1024 * _KIB

# Each workspace is allocated through the caching allocator, once per (cuBLAS handle, stream), and is
# kept in a map until clearCublasWorkspaces() (CUBLAS_SOURCE: setWorkspaceForHandle, getNewWorkspace). Handles are per host thread (HANDLE_POOL_SOURCE). The forward
# and the optimizer run on the caller's thread and the backward on autograd's device thread, so one
# training step on one stream uses 2 handles. This count is read from the sources; it was not measured.
CUBLAS_HANDLES_PER_STEP = 2

# CUDA context: driver state, and the kernels loaded into device memory. nvidia-smi counts it;
# torch.cuda.memory_* do not. With lazy module loading (torch has defaulted CUDA_MODULE_LOADING=LAZY
# since 1.13, pytorch PR #86509) ptrblck gives "around 400MB" for the first CUDA op (pytorch issue
# #109888), and "~300MB" in #107667. PR #86509 measured 287,047,680 B lazy and 666,632,192 B eager.
# The size varies with the GPU, the driver, the CUDA version and the kernels the run loads. A bare
# context measured 107 MiB on an RTX 4060 Ti and 555 MiB on an RTX PRO 6000 Blackwell
# (ggml-org/llama.cpp PR #23604), which suggests it grows with the SM count. No source gives the size
# per GPU for torch, so this is one constant, taken from the upper end of the torch figures.
CUDA_CONTEXT_BYTES = 400 * _MIB
CUDA_CONTEXT_SOURCE = (
    "https://github.com/pytorch/pytorch/issues/109888 ('around 400MB if CUDA >= 11.7 is used and lazy "
    "module loading enabled'); https://github.com/pytorch/pytorch/pull/86509 (287,047,680 B lazy vs "
    "666,632,192 B eager); varies with GPU, driver, CUDA version and the kernels loaded"
)

# --------------------------------------------------------------------------- SDPA on CUDA
# A plan for a GPU traces torch's SDPA on fake CPU tensors: _scaled_dot_product_flash_attention_for_cpu. Its
# forward saves what CUDA's flash kernel saves (the output, and a B x H x T fp32 logsumexp); its backward
# allocates grad_q/k/v only. CUDA's flash backward allocates more, and frees it when it returns.
SDPA_KERNEL_CHOICE_SOURCE = (
    "https://github.com/pytorch/pytorch/blob/main/aten/src/ATen/native/transformers/cuda/sdp_utils.cpp"
)
FLASH_BACKWARD_SOURCE = (
    "https://github.com/pytorch/pytorch/blob/main/aten/src/ATen/native/transformers/cuda/flash_attn/flash_api.cpp"
    " (mha_bwd), the same allocations as Dao-AILab/flash-attention csrc/flash_attn/flash_api.cpp"
)
# sdp_utils.cpp: the flash kernel needs sm_80 or newer, fp16/bf16 inputs, no attn_mask and head_dim <= 256;
# otherwise the memory-efficient kernel runs (its backward workspace depends on the tile configuration chosen
# at run time, and is not modelled). cuDNN attention comes after both in the default order.
FLASH_MIN_MAJOR = 8
FLASH_MAX_HEAD_DIM = 256
# flash_api.cpp mha_bwd: seqlen_q_rounded = round_multiple(seqlen_q, 128); head_size_rounded = head_size <= 192 ?
# round_multiple(head_size, 32) : 256. It allocates softmax_d {B, H, seqlen_q_rounded} fp32, dq_accum {B,
# seqlen_q_rounded, H, head_size_rounded} fp32 (torch runs it non-deterministic unless deterministic
# algorithms are on) and, with fewer key/value heads than query heads, dk_expanded and dv_expanded {B,
# seqlen_k, H, head_size} in the input dtype, summed into dk/dv before it returns.
FLASH_SEQ_ROUND = 128
FLASH_HEAD_ROUND = 32
FLASH_HEAD_ROUND_ABOVE = 192  # head sizes above this round to 256
FLASH_CPU_BACKWARD_OP = "aten._scaled_dot_product_flash_attention_for_cpu_backward.default"


def _round_up(n: int, m: int) -> int:
    return -(-n // m) * m


def cuda_sdpa_kernel(
    compute_capability: tuple[int, int] | None, *, half: bool, has_mask: bool, head_dim: int
) -> str:
    """ "flash" or "efficient": the fused kernel torch's SDPA picks on CUDA (sdp_utils.cpp, default order).
    Unknown architecture: assumed sm_80 or newer."""
    major = compute_capability[0] if compute_capability is not None else FLASH_MIN_MAJOR
    if major >= FLASH_MIN_MAJOR and half and not has_mask and head_dim <= FLASH_MAX_HEAD_DIM:
        return "flash"
    return "efficient"


def flash_backward_scratch_bytes(
    batch: int, heads: int, kv_heads: int, seq_q: int, seq_k: int, head_dim: int, itemsize: int
) -> int:
    """Bytes CUDA's flash backward allocates beyond grad_q/k/v (``FLASH_BACKWARD_SOURCE``), each buffer in the
    caching allocator's 512-byte blocks."""
    seq_rounded = _round_up(seq_q, FLASH_SEQ_ROUND)
    head_rounded = _round_up(head_dim, FLASH_HEAD_ROUND) if head_dim <= FLASH_HEAD_ROUND_ABOVE else 256
    sizes = [batch * heads * seq_rounded * 4, batch * seq_rounded * heads * head_rounded * 4]
    if kv_heads != heads:
        sizes += [batch * seq_k * heads * head_dim * itemsize] * 2
    return sum(cuda_round_size(n) for n in sizes)


CountedIn = Literal["allocated", "reserved", "device"]


@dataclass(frozen=True)
class Overhead:
    """Memory outside the tensors the tracker sees.

    ``counted_in`` says which figure includes it:

    - "allocated": inside ``torch.cuda.max_memory_allocated``;
    - "reserved": inside ``max_memory_reserved`` only;
    - "device": outside torch's stats (the CUDA context), seen only by nvidia-smi.
    """

    name: str
    bytes: int
    counted_in: CountedIn
    source: str  # where the figure comes from: a URL, or "measured on ... with ..."


class Allocator(Protocol):
    """What the tracker drives: one ``malloc`` per allocation and one ``free`` per release, in order."""

    def malloc(self, key: int, nbytes: int) -> None: ...

    def free(self, key: int) -> None: ...


class DeviceModel:
    """How a device turns tracked tensor bytes into the memory the run needs. Subclasses fill it in."""

    kind: str = ""  # "cpu" | "cuda"

    def round_bytes(self, n: int) -> int:
        """Bytes one allocation of ``n`` bytes takes (what the device's allocated statistic counts)."""
        raise NotImplementedError

    def new_allocator(self) -> Allocator | None:
        """A fresh allocator simulation for one run, or None when the device caches nothing."""
        raise NotImplementedError

    def overheads(self) -> list[Overhead]:
        raise NotImplementedError

    def kernel_scratch(self, func, args: tuple, kwargs: dict) -> int:
        """Bytes the device's kernel for ``func`` (an aten overload) on ``args`` / ``kwargs`` allocates and
        frees inside itself, which a trace at the dispatcher cannot see; the tracker adds them for that op
        alone, beside its output."""
        return 0


# CPU bf16 batched matmul through oneDNN: aten.bmm on bfloat16 copies its second operand into a contiguous
# batch x rows x cols buffer, freed on return, unless that operand's batch stride is exactly rows x cols; fp32
# and fp16 do not. torch.nn.functional.linear reaches it with a 3-d input that is not contiguous, as the last
# position transformers keeps for generation (``logits_to_keep``) is: the weight view then has a batch stride
# of one row, and the output head's weight is copied once per sequence. torch hands bf16 matmuls to oneDNN
# only on CPUs with bf16 support there (AVX-512 on x86); on an AVX2 CPU its own kernel reads the strided
# operand in place and copies nothing. Measured with torch 2.13 on an AVX-512 and on an AVX2 machine;
# tests/test_devices.py holds the model to the real allocations of the machine it runs on.
CPU_BMM_COPY_DTYPES = ("torch.bfloat16",)


def cpu_bf16_matmul_in_onednn() -> bool:
    """Whether this machine's torch runs bf16 matmuls through oneDNN (which copies strided operands)."""
    import torch

    if not (torch.backends.mkldnn.is_available() and torch.backends.mkldnn.enabled):
        return False
    return torch.backends.cpu.get_cpu_capability() == "AVX512"


class CpuModel(DeviceModel):
    """CPU tensors as the CPU allocator reports them to torch's profiler: ``nbytes``. No rounding is
    added, nothing is cached and there are no overheads. ``measure_cpu.py`` measures the same quantity."""

    kind = "cpu"

    def round_bytes(self, n: int) -> int:
        return n

    def new_allocator(self) -> None:
        return None

    def overheads(self) -> list[Overhead]:
        return []

    def kernel_scratch(self, func, args: tuple, kwargs: dict) -> int:
        if str(func) != "aten.bmm.default":
            return 0
        other = args[1]
        batch, rows, cols = other.shape
        if str(other.dtype) not in CPU_BMM_COPY_DTYPES or other.stride(0) == rows * cols:
            return 0
        if not cpu_bf16_matmul_in_onednn():
            return 0
        return other.numel() * other.element_size()


def cuda_round_size(n: int) -> int:
    """CUDACachingAllocator round_size(): a multiple of kMinBlockSize, at least kMinBlockSize. Torch
    allocates nothing for a 0-byte request, so 0 stays 0."""
    if n <= 0:
        return 0
    return max(MIN_BLOCK_SIZE, -(-n // MIN_BLOCK_SIZE) * MIN_BLOCK_SIZE)


def cuda_segment_size(size: int) -> int:
    """CUDACachingAllocator get_allocation_size(): the cudaMalloc size for a rounded request that no
    cached block can hold."""
    if size <= SMALL_SIZE:
        return SMALL_BUFFER
    if size < MIN_LARGE_ALLOC:
        return LARGE_BUFFER
    return -(-size // ROUND_LARGE) * ROUND_LARGE


def cublas_workspace_bytes(compute_capability: tuple[int, int] | None) -> int:
    """Default cuBLAS workspace for an architecture. Unknown architecture: the larger, 32 MiB."""
    if compute_capability is None or compute_capability[0] in CUBLAS_WORKSPACE_32MIB_MAJORS:
        return CUBLAS_WORKSPACE_32MIB_BYTES
    return CUBLAS_WORKSPACE_BYTES


@dataclass(eq=False, slots=True)
class _Block:
    addr: int
    size: int
    small: bool  # which pool: small (<= 1 MiB requests) or large
    prev: _Block | None = None  # neighbours inside the same segment
    next: _Block | None = None
    allocated: bool = False


class CachingAllocatorSim:
    """torch's CUDA caching allocator, default configuration, one stream (see the module docstring).

    - A request is rounded by ``cuda_round_size``. Requests of up to 1 MiB use the small pool, larger
      ones the large pool (get_pool).
    - The pool's smallest cached free block that fits is used (get_free_block). Ties go to the lower
      address (BlockComparatorSize).
    - If none fits, a new segment of ``cuda_segment_size`` bytes is reserved (alloc_block).
    - The block is split when the remainder is >= 512 B in the small pool, or > 1 MiB in the large pool
      (should_split). An unsplit block is handed out whole, and ``allocated_bytes`` counts the whole
      block, as torch's stats do. A large-pool request can therefore count up to 1 MiB more than its
      rounded size.
    - A freed block goes back to its pool, merged with free neighbours in the same segment
      (free_block, try_merge_blocks). Segments are never released.
    """

    def __init__(self) -> None:
        self._free: dict[bool, list[tuple[int, int, _Block]]] = {True: [], False: []}  # (size, addr, b)
        self._live: dict[int, _Block | None] = {}  # key -> block (None for a 0-byte request)
        self._next_addr = 0
        self.allocated_bytes = 0
        self.reserved_bytes = 0
        self.peak_allocated = 0
        self.peak_reserved = 0
        self.num_segments = 0

    def malloc(self, key: int, nbytes: int) -> None:
        if key in self._live:
            raise ValueError(f"allocation key {key} is already live")
        size = cuda_round_size(nbytes)
        if size == 0:
            self._live[key] = None
            return
        small = size <= SMALL_SIZE
        block = self._take_free(small, size)
        if block is None:
            block = self._new_segment(small, size)
        remaining = block.size - size
        if (remaining >= MIN_BLOCK_SIZE) if small else (remaining > SMALL_SIZE):
            rest = _Block(block.addr + size, remaining, small, prev=block, next=block.next)
            if block.next is not None:
                block.next.prev = rest
            block.next = rest
            block.size = size
            self._insert_free(rest)
        block.allocated = True
        self._live[key] = block
        self.allocated_bytes += block.size
        self.peak_allocated = max(self.peak_allocated, self.allocated_bytes)

    def free(self, key: int) -> None:
        block = self._live.pop(key)
        if block is None:
            return
        block.allocated = False
        self.allocated_bytes -= block.size
        prev, nxt = block.prev, block.next
        if prev is not None and not prev.allocated:
            self._remove_free(prev)
            block.addr, block.size, block.prev = prev.addr, prev.size + block.size, prev.prev
            if block.prev is not None:
                block.prev.next = block
        if nxt is not None and not nxt.allocated:
            self._remove_free(nxt)
            block.size, block.next = block.size + nxt.size, nxt.next
            if block.next is not None:
                block.next.prev = block
        self._insert_free(block)

    def _take_free(self, small: bool, size: int) -> _Block | None:
        pool = self._free[small]
        i = bisect.bisect_left(pool, (size, -1))
        if i == len(pool):
            return None
        return pool.pop(i)[2]

    def _new_segment(self, small: bool, size: int) -> _Block:
        nbytes = cuda_segment_size(size)
        block = _Block(self._next_addr, nbytes, small)
        self._next_addr += nbytes
        self.num_segments += 1
        self.reserved_bytes += nbytes
        self.peak_reserved = max(self.peak_reserved, self.reserved_bytes)
        return block

    def _insert_free(self, block: _Block) -> None:
        bisect.insort(self._free[block.small], (block.size, block.addr, block))

    def _remove_free(self, block: _Block) -> None:
        pool = self._free[block.small]
        i = bisect.bisect_left(pool, (block.size, block.addr))
        assert pool[i][2] is block, "free list out of order"
        del pool[i]


class CudaModel(DeviceModel):
    """A CUDA device under torch's caching allocator: 512-byte blocks, cached segments, the cuBLAS
    workspaces and the CUDA context.

    ``gpu`` (a catalog row) picks the cuBLAS workspace size by compute capability. None means unknown,
    and the larger size is used. ``cublas_handles`` is the number of cuBLAS workspaces a step creates
    (see CUBLAS_HANDLES_PER_STEP). ``unified_cublaslt=False`` models TORCH_CUBLASLT_UNIFIED_WORKSPACE=0.
    ``context_bytes`` replaces the documented context size with a measured one.
    """

    kind = "cuda"

    def __init__(
        self,
        gpu: GPU | None = None,
        *,
        cublas_handles: int = CUBLAS_HANDLES_PER_STEP,
        unified_cublaslt: bool = True,
        context_bytes: int | None = None,
        context_source: str | None = None,
    ) -> None:
        self.gpu = gpu
        self.cublas_handles = cublas_handles
        self.unified_cublaslt = unified_cublaslt
        self.context_bytes = CUDA_CONTEXT_BYTES if context_bytes is None else context_bytes
        self.context_source = context_source or CUDA_CONTEXT_SOURCE

    def round_bytes(self, n: int) -> int:
        return cuda_round_size(n)

    def new_allocator(self) -> CachingAllocatorSim:
        return CachingAllocatorSim()

    def kernel_scratch(self, func, args: tuple, kwargs: dict) -> int:
        """The SDPA flash backward's workspace (``flash_backward_scratch_bytes``) where this GPU's SDPA runs
        the flash kernel; nothing for other ops."""
        if str(func) != FLASH_CPU_BACKWARD_OP:
            return 0
        query, key = args[1], args[2]
        batch, heads, seq_q, head_dim = query.shape
        cc = self.gpu.compute_capability if self.gpu is not None else None
        half = query.is_floating_point() and query.element_size() == 2
        has_mask = kwargs.get("attn_mask") is not None
        if cuda_sdpa_kernel(cc, half=half, has_mask=has_mask, head_dim=head_dim) != "flash":
            return 0
        return flash_backward_scratch_bytes(
            batch, heads, key.shape[1], seq_q, key.shape[2], head_dim, query.element_size()
        )

    def overheads(self) -> list[Overhead]:
        cc = self.gpu.compute_capability if self.gpu is not None else None
        arch = f"sm_{cc[0]}{cc[1]}" if cc is not None else "unknown architecture"
        workspace = cublas_workspace_bytes(cc)
        sizes = [workspace] * self.cublas_handles
        if not self.unified_cublaslt:
            sizes += [CUBLASLT_WORKSPACE_BYTES] * self.cublas_handles
        # Simplification: the workspaces' reserved cost is their segments when packed alone. That is
        # the usual case: the first matmul runs after the weights are loaded, when the large pool rarely
        # holds a free block of their size.
        sim = CachingAllocatorSim()
        for key, size in enumerate(sizes):
            sim.malloc(key, size)
        source = (
            f"{CUBLAS_SOURCE} (parseChosenWorkspaceSize: {workspace:,} B for {arch}; "
            f"{'unified' if self.unified_cublaslt else 'separate'} cuBLASLt workspace, "
            f"parseCUDABlasLtWorkspaceSize); {self.cublas_handles} handle(s): {HANDLE_POOL_SOURCE}"
        )
        result = [Overhead("cuBLAS workspaces", sim.allocated_bytes, "allocated", source)]
        if sim.reserved_bytes > sim.allocated_bytes:
            result.append(
                Overhead(
                    "cuBLAS workspace segment remainder",
                    sim.reserved_bytes - sim.allocated_bytes,
                    "reserved",
                    f"{ALLOCATOR_SOURCE} (get_allocation_size, should_split) applied to the workspaces",
                )
            )
        result.append(Overhead("CUDA context", self.context_bytes, "device", self.context_source))
        return result


def cuda_totals(peak_allocated: int, peak_reserved: int, model: CudaModel) -> dict[str, int]:
    """Add the overheads to a simulated peak.

    Pass ``sim.peak_allocated``, which counts unsplit large blocks whole as torch does; the tracker's
    peak with 512-B rounding can be slightly lower. Pass ``sim.peak_reserved`` as well.

    Returns three figures:

    - ``allocated``: compare with ``torch.cuda.max_memory_allocated``;
    - ``reserved``: compare with ``max_memory_reserved``;
    - ``device_total``: reserved plus the CUDA context; compare with nvidia-smi.
    """
    by_kind = {"allocated": 0, "reserved": 0, "device": 0}
    for overhead in model.overheads():
        by_kind[overhead.counted_in] += overhead.bytes
    allocated = peak_allocated + by_kind["allocated"]
    reserved = peak_reserved + by_kind["allocated"] + by_kind["reserved"]
    return {
        "allocated": allocated,
        "reserved": reserved,
        "device_total": reserved + by_kind["device"],
    }


def device_model(device_type: str, gpu: GPU | None = None) -> DeviceModel:
    """The model for a torch device type ("cpu", "cuda", "cuda:1"). ``gpu`` applies to CUDA only."""
    kind = device_type.split(":", 1)[0].strip().lower()
    if kind == "cpu":
        return CpuModel()
    if kind == "cuda":
        return CudaModel(gpu)
    raise FituneError(f"No memory model for device type {device_type!r}: fitune plans for 'cpu' and 'cuda'.")
