"""What the run will execute on: the device, its memory, and the versions of the libraries that matter.

``detect_environment`` reads the real machine ("auto", "cpu", "cuda", "cuda:N"), or builds a simulated
environment for a catalog GPU ("t4", "a100-80gb") so that planning and the doctor work on a machine
without that GPU. torch and bitsandbytes are imported inside the functions that need them.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from fitune.errors import FituneError
from fitune.hardware.catalog import GPU, get_gpu, match_cuda_name

# A simulated environment stands for a current, standard install on the target machine.
SIMULATED_CUDA_VERSION = "12.4"
SIMULATED_CUDA_VERSION_BLACKWELL = "12.8"  # sm_100/sm_120 need CUDA >= 12.8 (torch and flash-attn builds)
SIMULATED_FLASH_ATTN_VERSION = "2.8.3"  # newest flash-attn 2.x release on PyPI when this was written
SIMULATED_BITSANDBYTES_VERSION = "0.50.2"  # used only when bitsandbytes is not installed here

_DEVICE_FORMS = "auto, cpu, cuda, cuda:N, or a catalog GPU name (planning for a GPU you don't have)"


class _DeviceProperties(Protocol):  # what torch.cuda.get_device_properties returns, as used here
    name: str
    major: int
    minor: int
    total_memory: int


@dataclass
class Environment:
    device_type: str  # "cpu" | "cuda"
    device_name: str  # "cpu" or GPU display name
    gpu: GPU | None  # catalog row (matched, or synthesized from CUDA properties)
    total_memory_bytes: int
    free_memory_bytes: int
    num_devices: int
    torch_version: str
    cuda_version: str | None  # torch.version.cuda
    bitsandbytes_version: str | None
    bitsandbytes_cuda: bool  # bnb importable with CUDA kernels usable
    flash_attn_version: str | None  # flash_attn importable
    simulated: bool  # True when built from a catalog name rather than detected
    # the vector instructions torch's CPU kernels use here (torch.backends.cpu.get_cpu_capability(): AVX512,
    # AVX2, ...) on an x86 CPU; None on other CPUs and for GPUs
    cpu_capability: str | None = None


def detect_environment(device: str = "auto") -> Environment:
    """Describe the device a run will use; ``device`` is auto, cpu, cuda, cuda:N or a catalog GPU name."""
    spec = device.strip().lower()
    if spec == "auto":
        import torch

        return _cuda_environment(0) if torch.cuda.is_available() else _cpu_environment()
    if spec == "cpu":
        return _cpu_environment()
    match = re.fullmatch(r"cuda(?::(\d+))?", spec)
    if match:
        return _cuda_environment(int(match.group(1) or 0))
    try:
        gpu = get_gpu(device)
    except FituneError as err:
        raise FituneError(f"Device {device!r} is not one of {_DEVICE_FORMS}. {err}") from None
    return simulated_environment(gpu)


def simulated_environment(gpu: GPU) -> Environment:
    """An environment for ``gpu`` as a standard install on that machine would report it, all memory free."""
    blackwell = gpu.compute_capability >= (10, 0)
    return Environment(
        device_type="cuda",
        device_name=gpu.display_name,
        gpu=gpu,
        total_memory_bytes=gpu.memory_bytes,
        free_memory_bytes=gpu.memory_bytes,
        num_devices=1,
        torch_version=_installed_version("torch") or "unknown",
        cuda_version=SIMULATED_CUDA_VERSION_BLACKWELL if blackwell else SIMULATED_CUDA_VERSION,
        bitsandbytes_version=_installed_version("bitsandbytes") or SIMULATED_BITSANDBYTES_VERSION,
        bitsandbytes_cuda=True,
        flash_attn_version=SIMULATED_FLASH_ATTN_VERSION if gpu.flash_attention_2 else None,
        simulated=True,
    )


def _cpu_environment() -> Environment:
    import torch

    total, free = host_memory()
    return Environment(
        device_type="cpu",
        device_name="cpu",
        gpu=None,
        total_memory_bytes=total,
        free_memory_bytes=free,
        num_devices=1,
        torch_version=torch.__version__,
        cuda_version=torch.version.cuda,
        bitsandbytes_version=_installed_version("bitsandbytes"),
        bitsandbytes_cuda=False,
        flash_attn_version=_flash_attn_version(),
        simulated=False,
        cpu_capability=_x86_cpu_capability(),
    )


def _x86_cpu_capability() -> str | None:
    import platform

    import torch

    if platform.machine().lower() not in ("x86_64", "amd64"):
        return None
    return torch.backends.cpu.get_cpu_capability()


def _cuda_environment(index: int) -> Environment:
    import torch

    if not torch.cuda.is_available():
        raise FituneError(
            f"CUDA was requested but torch {torch.__version__} sees no CUDA device "
            f"(torch.version.cuda={torch.version.cuda}). Use device: cpu, or a catalog GPU name such as "
            "'t4' or 'a100-80gb' to plan for a GPU you don't have."
        )
    count = torch.cuda.device_count()
    if index >= count:
        raise FituneError(f"Device 'cuda:{index}' does not exist: this machine has {count} CUDA device(s).")
    props = torch.cuda.get_device_properties(index)
    free, total = torch.cuda.mem_get_info(index)
    bnb_version = _installed_version("bitsandbytes")
    return Environment(
        device_type="cuda",
        device_name=props.name,
        gpu=match_cuda_name(props.name, props.total_memory) or _synthesized_gpu(props),
        total_memory_bytes=total,
        free_memory_bytes=free,
        num_devices=count,
        torch_version=torch.__version__,
        cuda_version=torch.version.cuda,
        bitsandbytes_version=bnb_version,
        bitsandbytes_cuda=bnb_version is not None and _bitsandbytes_has_cuda(),
        flash_attn_version=_flash_attn_version(),
        simulated=False,
    )


def _synthesized_gpu(props: _DeviceProperties) -> GPU:
    """A catalog-shaped row for a GPU the catalog lacks (or a MIG slice); throughput unknown, given as 0.0."""
    capability = (int(props.major), int(props.minor))
    ampere_or_later = capability >= (8, 0)
    name = str(props.name)
    return GPU(
        name="-".join(re.findall(r"[a-z0-9]+", name.lower())) or "cuda-device",
        display_name=name,
        memory_bytes=int(props.total_memory),
        compute_capability=capability,
        bf16=ampere_or_later,
        flash_attention_2=ampere_or_later,
        bf16_tflops=0.0 if ampere_or_later else None,
        fp16_tflops=0.0,
        bandwidth_gbps=0.0,
        source="torch.cuda.get_device_properties (not in the catalog: throughput and bandwidth unknown, 0.0)",
    )


def host_memory() -> tuple[int, int]:
    """(total, available) bytes of host RAM, capped by a cgroup v2 memory limit when one is set."""
    total, available = _meminfo() or _sysconf_memory()
    limit = _cgroup_limit()
    if limit is not None and limit < total:
        used = _read_int(Path("/sys/fs/cgroup/memory.current")) or 0
        total, available = limit, min(available, max(limit - used, 0))
    return total, available


def _meminfo() -> tuple[int, int] | None:
    try:
        text = Path("/proc/meminfo").read_text()
    except OSError:
        return None
    fields = dict(re.findall(r"^(\w+):\s+(\d+) kB", text, flags=re.MULTILINE))
    if "MemTotal" not in fields or "MemAvailable" not in fields:
        return None
    return int(fields["MemTotal"]) * 1024, int(fields["MemAvailable"]) * 1024


def _sysconf_memory() -> tuple[int, int]:
    page = os.sysconf("SC_PAGE_SIZE")
    total = page * os.sysconf("SC_PHYS_PAGES")
    try:
        available = page * os.sysconf("SC_AVPHYS_PAGES")
    except (ValueError, OSError):  # not on every platform (macOS)
        available = total
    return total, available


def _cgroup_limit() -> int | None:
    return _read_int(Path("/sys/fs/cgroup/memory.max"))  # "max" (no limit) reads as None


def _read_int(path: Path) -> int | None:
    try:
        return int(path.read_text().strip())
    except (OSError, ValueError):
        return None


def _installed_version(distribution: str) -> str | None:
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return None


def _flash_attn_version() -> str | None:
    if importlib.util.find_spec("flash_attn") is None:
        return None
    return _installed_version("flash-attn") or _installed_version("flash_attn") or "unknown"


def _bitsandbytes_has_cuda() -> bool:
    """Whether bitsandbytes loaded its CUDA (or ROCm) native library; it falls back to CPU kernels silently."""
    from fitune.techniques.hub_kernels import import_bitsandbytes

    import_bitsandbytes()
    try:
        from bitsandbytes import cextension
    except Exception:  # a broken install raises anything from ImportError to RuntimeError
        return False
    return isinstance(cextension.lib, getattr(cextension, "CudaBNBNativeLibrary", ()))
