"""Rules for bitsandbytes: quantised weights and 8-bit or paged optimizers need the right build on the right
device.
"""

from __future__ import annotations

from fitune.preflight.readers import (
    bnb_optimizer,
    gpu,
    needs_bnb,
    older,
    on_cpu,
    on_cuda,
    qlora,
    settle,
    settled_precision,
)
from fitune.preflight.rule import Rule, gh
from fitune.preflight.sources import (
    B1_BNB_CUDA,
    E6_BNB_FP32_COMPUTE,
    F9_KBIT_UPCAST,
    G1_FSDP_QLORA,
    I1_BNB_CPU,
)

RULES: list[Rule] = [
    Rule(
        id="bitsandbytes-missing",
        severity="error",
        title="QLoRA or an 8-bit optimizer without bitsandbytes",
        applies=lambda c: needs_bnb(c) and c.env is not None and c.env.bitsandbytes_version is None,
        message="method.kind {kind} with optimizer {optimizer} needs bitsandbytes (NF4 weights or 8-bit "
        "optimizer states), and it is not installed",
        fix=None,
        fix_text="`pip install 'bitsandbytes>=0.48'`; or use method.kind: lora and train.optimizer: adamw",
        source=B1_BNB_CUDA,
    ),
    Rule(
        id="bitsandbytes-without-cuda",
        severity="error",
        title="bitsandbytes loaded without its CUDA library",
        applies=lambda c: (
            needs_bnb(c)
            and on_cuda(c)
            and c.env.bitsandbytes_version is not None
            and not c.env.bitsandbytes_cuda
        ),
        message="bitsandbytes {bnb} is installed but did not load its CUDA kernels (it fell back to the CPU "
        "library), so NF4 quantization and 8-bit optimizer steps on {target} would fail",
        fix=None,
        fix_text="reinstall bitsandbytes for this CUDA ({cuda}) and run `python -m bitsandbytes` to see "
        "why its CUDA library does not load",
        source=B1_BNB_CUDA,
    ),
    Rule(
        id="bitsandbytes-too-old",
        severity="error",
        title="bitsandbytes older than fitune supports",
        applies=lambda c: needs_bnb(c) and c.env is not None and older(c.env.bitsandbytes_version, (0, 48)),
        message="bitsandbytes {bnb} is older than 0.48, the oldest fitune supports for NF4 and 8-bit "
        "optimizers; old releases miss CUDA builds, CPU kernels and the float quant storage FSDP needs",
        fix=None,
        fix_text="`pip install -U 'bitsandbytes>=0.48'`",
        source=B1_BNB_CUDA[1:2] + G1_FSDP_QLORA[:2],
    ),
    Rule(
        id="8bit-optimizer-on-cpu-old-bitsandbytes",
        severity="error",
        title="8-bit optimizer on CPU with bitsandbytes < 0.50",
        applies=lambda c: bnb_optimizer(c) and on_cpu(c) and older(c.env.bitsandbytes_version, (0, 50)),
        message="train.optimizer is {optimizer} on the CPU, but bitsandbytes {bnb} runs its optimizers on "
        "CUDA only; CPU optimizer kernels arrived in 0.50.0",
        fix={"train.optimizer": "adamw"},
        fix_text="set train.optimizer: adamw, or upgrade to bitsandbytes >= 0.50",
        source=I1_BNB_CPU,
    ),
    Rule(
        id="paged-optimizer-without-cuda",
        severity="warning",
        title="Paged optimizer on a device without CUDA unified memory",
        applies=lambda c: (
            c.recipe.train.optimizer == "paged_adamw8bit" and c.env is not None and not on_cuda(c)
        ),
        message="train.optimizer is paged_adamw8bit on {env_device}; paging moves optimizer state through "
        "CUDA unified memory, which this device lacks, so bitsandbytes falls back to the unpaged optimizer",
        fix={"train.optimizer": "adamw8bit"},
        fix_text="set train.optimizer: adamw8bit (the same 8-bit state, without paging)",
        source=I1_BNB_CPU + gh("bitsandbytes-foundation/bitsandbytes#782"),
    ),
    Rule(
        id="qlora-fp32-compute",
        severity="warning",
        title="QLoRA computing in fp32",
        applies=lambda c: qlora(c) and c.recipe.train.precision == "fp32" and gpu(c) is not None,
        message="method.kind is qlora with train.precision fp32, so the NF4 layers dequantize to fp32 and "
        "miss the fast half-precision kernels: steps run several times slower",
        fix=settle,
        fix_text="set train.precision: {settled}, with model.dtype to match",
        source=E6_BNB_FP32_COMPUTE,
    ),
    Rule(
        id="qlora-fp32-weights",
        severity="warning",
        title="QLoRA keeping its unquantized weights in fp32",
        applies=lambda c: (
            qlora(c) and c.recipe.model.dtype == "fp32" and settled_precision(c) in ("fp16", "bf16")
        ),
        message="method.kind is qlora with model.dtype fp32: the layers NF4 leaves alone (embeddings, norms, "
        "head) stay in fp32, {embed_head_fp32}, eating much of what 4-bit saved",
        fix=settle,
        fix_text="set model.dtype: {settled}, the compute dtype",
        source=F9_KBIT_UPCAST + E6_BNB_FP32_COMPUTE[:1],
    ),
]
