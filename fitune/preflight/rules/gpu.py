"""Rules for the GPU generation and the attention kernels: what an older or newer part, FlashAttention or SDPA
cannot run.
"""

from __future__ import annotations

from fitune.preflight.readers import (
    FA2_FULL_BACKWARD_CC,
    adapters,
    at_least,
    below,
    capability,
    compute,
    fa2,
    head_dim,
    older,
    on_cuda,
    real,
    sdpa_missing,
    softcap,
)
from fitune.preflight.rule import Rule
from fitune.preflight.sources import (
    A1_FA2_PRE_AMPERE,
    A2_FA_HEAD_DIM,
    A3_BF16_PRE_AMPERE,
    B4_FA2_MISSING,
    BLACKWELL,
    C1_FA2_FP32,
    C2_FA2_OFF_GPU,
    C4_SOFTCAP,
    NO_SDPA_PATH,
)

RULES: list[Rule] = [
    Rule(
        id="bf16-on-pre-ampere",
        severity="error",
        title="bf16 compute on a GPU older than Ampere",
        applies=lambda c: compute(c) == "bf16" and below(c, (8, 0)),
        message="train.precision is {precision}, but {target} (compute capability {cc}) has no bf16 units; "
        "bf16 training needs compute capability 8.0 (Ampere) or newer",
        fix={"train.precision": "fp16"},
        fix_text="set train.precision: fp16 (autocast with fp32 trainable weights), or fp32 if fp16 overflows",
        source=A3_BF16_PRE_AMPERE,
    ),
    Rule(
        id="bf16-weights-on-pre-ampere",
        severity="warning",
        title="bf16 base weights on a GPU older than Ampere",
        applies=lambda c: adapters(c) and c.recipe.model.dtype == "bf16" and below(c, (8, 0)),
        message="model.dtype is bf16, so the frozen base is stored in bf16 on {target} (compute capability "
        "{cc}), which has no native bf16 math: its matmuls run emulated or get re-cast every step",
        fix={"model.dtype": "fp16"},
        fix_text="set model.dtype: fp16 to match fp16 compute on this GPU",
        source=A3_BF16_PRE_AMPERE,
    ),
    Rule(
        id="fa2-on-pre-ampere",
        severity="error",
        title="FlashAttention-2 on a GPU older than Ampere",
        applies=lambda c: fa2(c) and below(c, (8, 0)),
        message="train.attention is flash_attention_2, but FlashAttention-2 ships kernels only for compute "
        "capability 8.0 and newer; {target} is {cc}, so the first forward pass would fail",
        fix={"train.attention": "sdpa"},
        fix_text="set train.attention: sdpa (PyTorch's fused attention runs on every GPU)",
        source=A1_FA2_PRE_AMPERE,
    ),
    Rule(
        id="fa2-large-head-backward",
        severity="warning",
        title="FlashAttention-2 backward with head_dim > 192 off A100/H100",
        applies=lambda c: (
            fa2(c)
            and (head_dim(c) or 0) > 192
            and at_least(c, (8, 0))
            and capability(c) not in FA2_FULL_BACKWARD_CC
        ),
        message="head_dim is {head_dim}; the FlashAttention-2 backward kernel for heads over 192 needs the "
        "shared memory of an A100/H100-class GPU (8.0 or 9.0), and {target} is {cc}, so training (not "
        "inference) can fail in the first backward pass with flash-attn {flash_attn}",
        fix={"train.attention": "sdpa"},
        fix_text="set train.attention: sdpa, or check that your flash-attn release lifted this limit",
        source=A2_FA_HEAD_DIM,
    ),
    Rule(
        id="fa2-without-cuda",
        severity="error",
        title="FlashAttention-2 requested on a non-CUDA device",
        applies=lambda c: fa2(c) and c.env is not None and not on_cuda(c),
        message="train.attention is flash_attention_2, but the run uses {env_device}; FlashAttention-2 is "
        "a CUDA kernel library and cannot run there",
        fix={"train.attention": "sdpa"},
        fix_text="set train.attention: sdpa",
        source=C2_FA2_OFF_GPU + A1_FA2_PRE_AMPERE[1:2],
    ),
    Rule(
        id="fa2-not-installed",
        severity="error",
        title="FlashAttention-2 requested but flash-attn is not importable",
        applies=lambda c: fa2(c) and on_cuda(c) and not below(c, (8, 0)) and c.env.flash_attn_version is None,
        message="train.attention is flash_attention_2, but the flash_attn package is not installed (or "
        "fails to import) next to torch {torch}; transformers refuses to build the model without it",
        fix={"train.attention": "sdpa"},
        fix_text="set train.attention: sdpa, or `pip install flash-attn --no-build-isolation` built for "
        "this torch and CUDA",
        source=B4_FA2_MISSING,
    ),
    Rule(
        id="flash-attn-1x",
        severity="error",
        title="flash-attn 1.x installed where FlashAttention-2 is requested",
        applies=lambda c: fa2(c) and on_cuda(c) and older(c.env.flash_attn_version, (2,)),
        message="train.attention is flash_attention_2, but the installed flash-attn is {flash_attn}; "
        "transformers needs a 2.x release, and 1.x lacks the backward kernels for heads above 64 outside "
        "A100/H100",
        fix={"train.attention": "sdpa"},
        fix_text="set train.attention: sdpa, or install flash-attn 2.x",
        source=A2_FA_HEAD_DIM + B4_FA2_MISSING[:1],
    ),
    Rule(
        id="fa2-fp32-compute",
        severity="error",
        title="FlashAttention-2 with fp32 compute",
        applies=lambda c: fa2(c) and c.recipe.train.precision == "fp32",
        message="train.precision is fp32, so no autocast runs and the attention inputs reach "
        "FlashAttention-2 in fp32, a dtype it has no kernels for (only fp16 and bf16)",
        fix={"train.attention": "sdpa"},
        fix_text="set train.attention: sdpa, or train.precision: {half} to keep FlashAttention-2",
        source=C1_FA2_FP32,
    ),
    Rule(
        id="sdpa-not-in-architecture",
        severity="error",
        title="SDPA asked of an architecture transformers has no SDPA path for",
        applies=sdpa_missing,
        message="train.attention is sdpa, but transformers {transformers} has no SDPA attention for "
        "{model_type}, so the model cannot be built with it",
        fix={"train.attention": "auto"},
        fix_text="set train.attention: auto (fitune picks a kernel this model has) or eager",
        source=NO_SDPA_PATH,
    ),
    Rule(
        id="softcap-model-with-sdpa",
        severity="warning",
        title="Gemma-2-style attention soft-capping under SDPA",
        applies=lambda c: (
            softcap(c) is not None and c.recipe.train.attention == "sdpa" and not sdpa_missing(c)
        ),
        message="this {model_type} model caps attention logits (attn_logit_softcapping {softcap}), which "
        "SDPA cannot express: training with sdpa silently computes a different attention and loses quality",
        fix={"train.attention": "eager"},
        fix_text="set train.attention: eager (more memory), or flash_attention_2 with flash-attn >= 2.6.3 "
        "on Ampere+",
        source=C4_SOFTCAP,
    ),
    Rule(
        id="softcap-model-old-flash-attn",
        severity="warning",
        title="Attention soft-capping with a flash-attn older than 2.6.3",
        applies=lambda c: (
            softcap(c) is not None and fa2(c) and on_cuda(c) and older(c.env.flash_attn_version, (2, 6, 3))
        ),
        message="this {model_type} model caps attention logits (attn_logit_softcapping {softcap}), and "
        "flash-attn {flash_attn} predates soft-capping support (2.6.3), so attention would be computed "
        "without the cap",
        fix={"train.attention": "eager"},
        fix_text="set train.attention: eager, or upgrade flash-attn to 2.6.3 or newer",
        source=C4_SOFTCAP,
    ),
    Rule(
        id="blackwell-needs-cuda-12-8",
        severity="error",
        title="Blackwell GPU with a torch built for CUDA < 12.8",
        applies=lambda c: real(c) and at_least(c, (10, 0)) and older(c.env.cuda_version, (12, 8)),
        message="{target} has compute capability {cc}, but torch {torch} was built for CUDA {cuda}; "
        "kernels for this generation exist only in CUDA 12.8+ builds, so the first CUDA op would fail "
        "with 'no kernel image is available'",
        fix=None,
        fix_text="install a torch wheel built for CUDA 12.8 or newer (the cu128 index), then reinstall "
        "flash-attn and bitsandbytes for it",
        source=BLACKWELL,
    ),
]
