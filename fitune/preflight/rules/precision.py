"""Rules for the device and the precision: half precision where it cannot run or overflows, devices asked for
and not there.
"""

from __future__ import annotations

import re

from fitune.preflight.readers import (
    adapters,
    gpu,
    on_cpu,
    on_cuda,
    pretrained_dtype,
    real,
    settle,
    settled_precision,
    slow_cpu_bf16,
)
from fitune.preflight.rule import Rule, gh
from fitune.preflight.sources import (
    A6_HALF_ON_CPU,
    CPU_BF16_WITHOUT_AVX512,
    DEVICE_ORDINAL,
    E2_FP16_OVERFLOW,
    E4_DTYPE_MIX,
)

RULES: list[Rule] = [
    Rule(
        id="fp16-on-cpu",
        severity="error",
        title="fp16 autocast on CPU",
        applies=lambda c: c.recipe.train.precision == "fp16" and on_cpu(c),
        message="train.precision is fp16, but the run is on the CPU: fp16 mixed precision is a CUDA "
        "feature, and many CPU kernels have no fp16 implementation",
        fix={"train.precision": "fp32"},
        fix_text="set train.precision: fp32 (or bf16 on a CPU with bf16 support)",
        source=A6_HALF_ON_CPU,
    ),
    Rule(
        id="bf16-on-cpu-without-avx512",
        severity="warning",
        title="bf16 on a CPU without AVX-512",
        applies=lambda c: (
            slow_cpu_bf16(c)
            and (c.recipe.train.precision in ("bf16", "bf16-pure") or c.recipe.model.dtype == "bf16")
        ),
        message="train.precision is {precision} and model.dtype {dtype} on a CPU whose torch kernels use "
        "{cpu_isa}, not AVX-512: torch computes bf16 matmuls there by converting to fp32 and back, many "
        "times slower than in fp32 (the demo recipe trained at 5 tokens/s in bf16 on an AVX2 machine, "
        "155 in fp32); fp32 takes twice the bytes for weights and activations",
        fix={"train.precision": "fp32", "model.dtype": "fp32"},
        fix_text="set train.precision: fp32 and model.dtype: fp32 (`fitune plan` shows the memory it takes)",
        source=CPU_BF16_WITHOUT_AVX512,
    ),
    Rule(
        id="fp16-weights-on-cpu",
        severity="warning",
        title="fp16 base weights on CPU",
        applies=lambda c: adapters(c) and c.recipe.model.dtype == "fp16" and on_cpu(c),
        message="model.dtype is fp16 and the run is on the CPU, where fp16 matmuls are slow or missing "
        "('not implemented for Half')",
        fix=lambda c: {"model.dtype": "bf16" if settled_precision(c) == "bf16" else "fp32"},
        fix_text="set model.dtype: fp32, or bf16 when training in bf16",
        source=A6_HALF_ON_CPU,
    ),
    Rule(
        id="cuda-requested-without-gpu",
        severity="error",
        title="CUDA device requested on a machine where torch sees none",
        applies=lambda c: (
            re.fullmatch(r"cuda(:\d+)?", c.recipe.hardware.device) is not None
            and c.env is not None
            and not on_cuda(c)
        ),
        message="hardware.device is {device}, but torch {torch} ({torch_build}) sees no CUDA device here: "
        "a CPU-only torch build, a machine or runtime without a GPU, or a driver that failed to load",
        fix=None,
        fix_text="install a CUDA build of torch and check `nvidia-smi`; or set hardware.device: cpu to train "
        "here, or a catalog GPU name (t4, a100-80gb) to plan only",
        source=A6_HALF_ON_CPU[:1] + gh("gensyn-ai/rl-swarm#252"),
    ),
    Rule(
        id="more-devices-than-visible",
        severity="error",
        title="hardware.num_devices exceeds the GPUs this machine has",
        applies=lambda c: real(c) and on_cuda(c) and c.recipe.hardware.num_devices > c.env.num_devices,
        message="hardware.num_devices is {num_devices}, but only {visible} CUDA device(s) are visible; the "
        "extra ranks would fail with 'invalid device ordinal'",
        fix=lambda c: {"hardware.num_devices": c.env.num_devices},
        fix_text="set hardware.num_devices: {visible} (or check CUDA_VISIBLE_DEVICES)",
        source=DEVICE_ORDINAL,
    ),
    Rule(
        id="fp16-where-bf16-works",
        severity="warning",
        title="fp16 chosen on a GPU that supports bf16",
        applies=lambda c: c.recipe.train.precision == "fp16" and gpu(c) is not None and gpu(c).bf16,
        message="train.precision is fp16 on {target}, which supports bf16; fp16's narrow range (max about "
        "65504) lets activations overflow into NaN or a zero loss, which bf16 avoids at the same memory",
        fix=settle,
        fix_text="set train.precision: bf16 (and model.dtype: bf16 for a LoRA base stored in fp16)",
        source=E2_FP16_OVERFLOW,
    ),
    Rule(
        id="fp16-on-bf16-pretrained-model",
        severity="warning",
        title="fp16 training of a model pretrained in bf16",
        applies=lambda c: (
            c.recipe.train.precision == "fp16"
            and pretrained_dtype(c) == "bfloat16"
            and not on_cpu(c)
            and not (gpu(c) is not None and gpu(c).bf16)
        ),
        message="the model was trained in bfloat16 (config dtype {pretrained_dtype}) and train.precision "
        "is fp16: its activations can exceed fp16's range, giving NaN or zero losses, often only after "
        "some steps",
        fix=None,
        fix_text="keep fp16 but lower train.lr and watch the first steps for NaN; use train.precision: "
        "fp32 if it overflows, or a GPU with bf16",
        source=E2_FP16_OVERFLOW,
    ),
    Rule(
        id="precision-weights-mismatch",
        severity="warning",
        title="Base weights in one half type, compute in the other",
        applies=lambda c: (
            adapters(c)
            and c.recipe.train.precision in ("fp16", "bf16")
            and c.recipe.model.dtype in ("fp16", "bf16")
            and c.recipe.model.dtype != c.recipe.train.precision
        ),
        message="model.dtype is {dtype} but train.precision is {precision}: every matmul re-casts the "
        "frozen weights, and code outside autocast (eval, sampling) meets mixed half types",
        fix=settle,
        fix_text="use one type for both: model.dtype and train.precision: {settled}",
        source=E4_DTYPE_MIX,
    ),
]
