"""When nothing fits: the smallest change that would make a configuration fit, checked by a direct plan.

Three changes are tried on the configuration that needs the least memory (QLoRA where searched, gradient
checkpointing, the smallest rank, an 8-bit optimizer, micro-batch 1, chunked loss), smallest change first:

1. a shorter sequence (halving ``train.seq_len`` while the weights alone fit);
2. QLoRA, when the search was kept to other methods;
3. the catalog GPU with the least memory that holds it under the same margin.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from fitune.errors import FituneError
from fitune.planner.candidates import describe, weights_floor

if TYPE_CHECKING:
    from fitune.planner.candidates import Candidate, SearchResult

_GIB = 2**30
MIN_SEQ_LEN = 64
MAX_HALVINGS = 4
_METHOD_ORDER = {"qlora": 0, "lora": 1, "full": 2}


def smallest(result: SearchResult) -> Candidate | None:
    """The runnable configuration with every memory-saving setting the search offered."""
    runnable = [c for c in result.candidates if c.status not in ("ruled_out", "pruned")]
    if not runnable:
        return None

    def key(c: Candidate) -> tuple:
        s = c.settings
        return (
            _METHOD_ORDER[s["method.kind"]],
            not s["train.gradient_checkpointing"],
            s["method.r"],
            s["train.optimizer"] != "adamw8bit",
            s["train.batch_size"],
            s["train.loss_chunk"] == 0,
            s["train.attention"] != "sdpa",
        )

    return min(runnable, key=key)


def suggestions(result: SearchResult, *, shape, source, progress: Callable[[str], None]) -> list[str]:
    from fitune.planner.plan import plan

    c = smallest(result)
    if c is None:
        reasons = sorted({x.reason.split(":")[0] for x in result.candidates})
        return [f"every configuration is ruled out on this target ({', '.join(reasons)}); see ruled_out"]
    base, usable = result.base, result.usable_bytes
    settings = dict(c.settings)
    out: list[str] = []
    progress(f"nothing fits: planning the smallest configuration ({describe(settings)})")
    peak = plan(base.updated(settings)).peak_bytes
    gib = f"{peak / _GIB:,.2f} GiB"
    out.append(
        f"the smallest configuration, {describe(settings)}, needs {gib} (plan) and {usable / _GIB:,.2f} GiB "
        "are usable"
    )

    if weights_floor(settings, shape) < usable:
        seq = result.seq_len
        for _ in range(MAX_HALVINGS):
            seq //= 2
            if seq < MIN_SEQ_LEN:
                break
            progress(f"planning it at train.seq_len {seq}")
            shorter = plan(base.updated({**settings, "train.seq_len": seq})).peak_bytes
            if shorter <= usable:
                out.append(
                    f"shorter sequences: train.seq_len: {seq} (from {result.seq_len}) fits with "
                    f"{describe(settings)}"
                    f", peak {shorter / _GIB:,.2f} GiB"
                )
                break

    if settings["method.kind"] != "qlora" and base.method.kind != "qlora":
        q = {**settings, "method.kind": "qlora", "model.dtype": settings["train.precision"]}
        try:
            quantized = plan(base.updated(q)).peak_bytes
        except FituneError:
            quantized = None
        if quantized is not None and quantized <= usable:
            out.append(
                f"QLoRA: method.kind: qlora fits with {describe(q)}, peak {quantized / _GIB:,.2f} GiB "
                "(the search was kept to other methods)"
            )

    gpu = _gpu_that_fits(result, settings, peak)
    if gpu is not None:
        name, mem, need, same = gpu
        also = f" (as much memory: {', '.join(same)})" if same else ""
        out.append(
            f"a GPU with more memory: {name} ({mem / _GIB:,.0f} GiB) is the smallest catalog GPU that holds "
            f"{describe(settings)} ({need / _GIB:,.2f} GiB of {mem * (1 - result.margin) / _GIB:,.2f} "
            f"usable){also}; plan it with --gpu {name}"
        )
    elif result.target.kind == "cuda":
        out.append("no catalog GPU holds it: shard it over several GPUs (hardware.num_devices)")
    return out


def _gpu_that_fits(
    result: SearchResult, settings: dict[str, Any], peak: int
) -> tuple[str, int, int, list[str]] | None:
    """Smallest-memory catalog GPU (then the fastest) that holds ``peak`` under the margin and runs the
    configuration's precision and attention kernel; the peak is moved by the difference in cuBLAS workspaces."""
    from fitune.hardware.catalog import gpus
    from fitune.memory.devices import device_model

    if result.target.kind != "cuda":
        return None

    def workspaces(gpu) -> int:
        return sum(o.bytes for o in device_model("cuda", gpu).overheads() if o.counted_in == "allocated")

    here = workspaces(result.target.gpu)
    fitting = []
    for gpu in gpus():
        if settings["train.attention"] == "flash_attention_2" and not gpu.flash_attention_2:
            continue
        if settings["train.precision"] == "bf16" and not gpu.bf16:
            continue
        need = peak - here + workspaces(gpu)
        if need <= gpu.memory_bytes * (1 - result.margin) and gpu.memory_bytes > result.target.memory_bytes:
            fitting.append((gpu.memory_bytes, -(gpu.bf16_tflops or gpu.fp16_tflops), gpu.name, need))
    if not fitting:
        return None
    mem, _, name, need = min(fitting)
    same = [n for m, _, n, _ in sorted(fitting) if m == mem and n != name]
    return name, mem, need, same
