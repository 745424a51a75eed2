"""The GPU catalog: memory, compute capability, precision support and peak throughput of the GPUs people
fine-tune on, one row per model in ``gpus.csv`` with the document each figure comes from.

Conventions (the caveats behind them are in shared/gpus-NOTES.md):

- ``memory_bytes`` is the marketed capacity read as GiB (NVIDIA's "24 GB" cards report 24576 MiB). What a
  process can allocate is lower: ECC, driver reservations and the CUDA context take their share.
- TFLOPS are dense (no 2:4 sparsity) tensor-core peaks for FP16/BF16 inputs with FP32 accumulate, the
  mode mixed-precision training uses. A row whose ``source`` says ESTIMATE has no vendor figure.
- ``link`` / ``link_gbps``: how two of the cards exchange data in the usual build (NVLink for SXM parts, else
  the card's PCIe interface) and that link's rate in one direction, GB/s (NVIDIA prints both directions
  together: 900 GB/s NVLink 4 is 450 each way; PCIe 4.0 x16, 64 GB/s, is 32). Optional NVLink bridges of PCIe
  cards are not assumed.
- Names: a name without a form factor means the SXM part (``h100-80gb`` is the SXM5 card, ``h100-80gb-pcie``
  the PCIe one). A name that leaves out something the catalog needs to tell rows apart (``a100``:
  40 or 80 GB?) is refused with the candidates.
"""

from __future__ import annotations

import csv
import difflib
import functools
import io
import re
from dataclasses import dataclass
from importlib import resources

from fitune.errors import FituneError

_GIB = 1 << 30
_VENDOR_WORDS = {"nvidia", "geforce", "tesla"}
_FORM_FACTOR_RE = re.compile(r"^(sxm\d*|pcie)$")
_DROPPED_RE = re.compile(r"^(\d+gb|hbm\d*e?)$")
# A device whose reported memory falls outside this fraction of a row's nominal memory is another SKU or a
# MIG slice: the A10G reports 22.35 GiB of 24 (0.93), an 8 GB RTX 3060 would report 0.66 of the 12 GB row.
_MEMORY_MATCH_RANGE = (0.85, 1.05)


@dataclass(frozen=True)
class GPU:
    name: str  # canonical key, e.g. "rtx-4090"
    display_name: str  # "NVIDIA GeForce RTX 4090"
    memory_bytes: int
    compute_capability: tuple[int, int]
    bf16: bool
    flash_attention_2: bool
    bf16_tflops: float | None  # dense tensor-core throughput (None when not supported)
    fp16_tflops: float  # dense
    bandwidth_gbps: float  # GB/s
    source: str
    link: str = ""  # "NVLink 4", "PCIe 4.0 x16"
    link_gbps: float | None = None  # GB/s in one direction between two cards


@dataclass(frozen=True)
class _Row:
    gpu: GPU
    aliases: tuple[str, ...]
    cuda_model: tuple[str, ...]
    form_factor: str


def _yes(value: str) -> bool:
    return value.strip().lower() == "yes"


def _parse_row(fields: dict[str, str]) -> _Row:
    major, minor = fields["compute_capability"].split(".")
    bf16 = _yes(fields["bf16"])
    tflops = float(fields["fp16_bf16_dense_tflops"])
    source = fields["source"] + (f"; {fields['notes']}" if fields["notes"] else "")
    gpu = GPU(
        name=fields["name"],
        display_name=fields["display_name"],
        memory_bytes=int(float(fields["memory_gb"]) * _GIB),
        compute_capability=(int(major), int(minor)),
        bf16=bf16,
        flash_attention_2=_yes(fields["flash_attention_2"]),
        bf16_tflops=tflops if bf16 else None,
        fp16_tflops=tflops,
        bandwidth_gbps=float(fields["bandwidth_gbs"]),
        source=source,
        link=fields["link"],
        link_gbps=float(fields["link_gbs"]) if fields["link_gbs"] else None,
    )
    aliases = tuple(a for a in fields["aliases"].split("|") if a)
    return _Row(gpu, aliases, tuple(fields["cuda_model"].split()), fields["form_factor"])


@functools.cache
def _rows() -> tuple[_Row, ...]:
    text = (resources.files("fitune.hardware") / "gpus.csv").read_text(encoding="utf-8")
    return tuple(_parse_row(fields) for fields in csv.DictReader(io.StringIO(text)))


@functools.cache
def _index() -> dict[str, GPU]:
    index: dict[str, GPU] = {}
    for row in _rows():
        for key in (row.gpu.name, *row.aliases):
            assert key == _normalize(key) and key not in index, (
                f"bad or duplicate GPU key {key!r} in gpus.csv"
            )
            index[key] = row.gpu
    return index


def _tokens(text: str) -> list[str]:
    return [t for t in re.split(r"[^a-z0-9]+", text.lower()) if t and t not in _VENDOR_WORDS]


def _normalize(name: str) -> str:
    """Lowercase dash-joined words without vendor words: "NVIDIA GeForce RTX 4090" -> "rtx-4090"."""
    return "-".join(_tokens(name))


def gpus() -> list[GPU]:
    """Every catalog row, in catalog order."""
    return [row.gpu for row in _rows()]


def gpu_names() -> list[str]:
    """Canonical names of every catalog row."""
    return [row.gpu.name for row in _rows()]


def closest_gpu_names(name: str, n: int = 3) -> list[str]:
    """The ``n`` canonical names closest in spelling to ``name`` (aliases count toward their row)."""
    index = _index()
    ranked = difflib.get_close_matches(_normalize(name), list(index), n=len(index), cutoff=0.0)
    closest: list[str] = []
    for key in ranked:
        if index[key].name not in closest:
            closest.append(index[key].name)
    return closest[:n]


def get_gpu(name: str) -> GPU:
    """Look up a GPU by canonical name, alias or device name, ignoring case, spaces and vendor words."""
    key = _normalize(name)
    index = _index()
    if key in index:
        return index[key]
    # A name that starts one or more catalog names ("a100", "rtx-4060-ti") leaves out a size or form factor.
    prefixed = sorted({gpu.name for k, gpu in index.items() if k.startswith(key + "-")}) if key else []
    if len(prefixed) == 1:
        raise FituneError(
            f"GPU {name!r} is not in the catalog, which has only the variant {prefixed[0]}. "
            "If that is your card, name it in full."
        )
    if prefixed:
        raise FituneError(
            f"GPU name {name!r} is ambiguous: it could be {', '.join(prefixed)}. Name one of them."
        )
    raise FituneError(
        f"Unknown GPU {name!r}. Closest catalog names: {', '.join(closest_gpu_names(name))}. "
        "Every name is listed in fitune/hardware/gpus.csv."
    )


def match_cuda_name(device_name: str, total_memory_bytes: int) -> GPU | None:
    """Map ``torch.cuda.get_device_properties(i).name`` and its ``total_memory`` to a catalog row.

    The model words must match exactly ("RTX 4080 SUPER" is not the "RTX 4080" row), a stated form factor
    picks SXM or PCIe (none stated means SXM, as in "NVIDIA H100 80GB HBM3"), and the memory must be near
    the row's, so an 8 GB variant or a MIG slice is not mistaken for the full card. None when nothing fits.
    """
    tokens = _tokens(device_name)
    form_factors = {("pcie" if t == "pcie" else "sxm") for t in tokens if _FORM_FACTOR_RE.match(t)}
    model = tuple(t for t in tokens if not _FORM_FACTOR_RE.match(t) and not _DROPPED_RE.match(t))
    low, high = _MEMORY_MATCH_RANGE
    candidates = [
        row.gpu
        for row in _rows()
        if row.cuda_model == model
        and (row.form_factor in form_factors if form_factors else row.form_factor in ("", "sxm"))
        and low <= total_memory_bytes / row.gpu.memory_bytes <= high
    ]
    if not candidates:
        return None
    return min(candidates, key=lambda gpu: abs(gpu.memory_bytes - total_memory_bytes))
