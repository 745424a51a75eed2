"""Rules for the fine-tuning method: LoRA targets, scale and rank, and a learning rate for the method."""

from __future__ import annotations

from fitune.preflight.readers import adapters, narrowest, target_split
from fitune.preflight.rule import Rule
from fitune.preflight.sources import (
    E2_FP16_OVERFLOW,
    E5_HIGH_LR,
    F7_NO_TRAINABLE,
    F8_TARGETS,
    LORA_RANK,
    LORA_SCALE,
)

RULES: list[Rule] = [
    Rule(
        id="lora-empty-targets",
        severity="error",
        title="LoRA with an empty target list",
        applies=lambda c: adapters(c) and c.recipe.method.targets == [],
        message="method.targets is an empty list, so no adapter is attached: nothing is trainable, and a "
        "quantized base cannot be fine-tuned without adapters",
        fix={"method.targets": "all-linear"},
        fix_text="set method.targets: all-linear, or list layer names",
        source=F7_NO_TRAINABLE,
    ),
    Rule(
        id="lora-targets-not-found",
        severity="error",
        title="No LoRA target names a layer of this architecture",
        applies=lambda c: (split := target_split(c)) is not None and not split[0],
        message="method.targets {targets} name no layer of a {model_type} model, whose adaptable layers are "
        "{layer_names}; peft would stop with 'Target modules not found'",
        fix={"method.targets": "all-linear"},
        fix_text="set method.targets: all-linear, or pick from: {layer_names}",
        source=F8_TARGETS,
    ),
    Rule(
        id="lora-targets-partly-unknown",
        severity="warning",
        title="Some LoRA targets name no layer of this architecture",
        applies=lambda c: (split := target_split(c)) is not None and bool(split[0]) and bool(split[1]),
        message="the method.targets entries {unknown_targets} match no layer of a {model_type} model; peft "
        "ignores them without a word and adapts only {known_targets}",
        fix=lambda c: {"method.targets": target_split(c)[0]},
        fix_text="drop {unknown_targets}, or replace with names from: {layer_names}",
        source=F8_TARGETS,
    ),
    Rule(
        id="lora-scale-tiny",
        severity="warning",
        title="LoRA alpha / r far below 1",
        applies=lambda c: adapters(c) and c.recipe.method.alpha / c.recipe.method.r < 0.25,
        message="method.alpha {alpha} over method.r {r} scales the adapter output by {scale}, so updates "
        "barely move the model at this learning rate",
        fix=lambda c: {"method.alpha": 2 * c.recipe.method.r},
        fix_text="set method.alpha to 2 x r ({r} -> alpha {alpha_2r}), the usual choice",
        source=LORA_SCALE,
    ),
    Rule(
        id="lora-scale-huge",
        severity="warning",
        title="LoRA alpha / r far above 1",
        applies=lambda c: adapters(c) and c.recipe.method.alpha / c.recipe.method.r > 8,
        message="method.alpha {alpha} over method.r {r} multiplies the adapter output by {scale}, which acts "
        "like a much higher learning rate: loss spikes, divergence or fast overfitting",
        fix=lambda c: {"method.alpha": 2 * c.recipe.method.r},
        fix_text="set method.alpha to 2 x r ({r} -> alpha {alpha_2r}), the usual choice",
        source=LORA_SCALE,
    ),
    Rule(
        id="lora-rank-exceeds-width",
        severity="warning",
        title="LoRA rank not below the width of the layers it adapts",
        applies=lambda c: adapters(c) and narrowest(c) is not None and c.recipe.method.r >= narrowest(c),
        message="method.r {r} is at least {width}, the narrowest side of this model's attention "
        "projections: the adapter is no longer low-rank and has more weights than the layer it adapts",
        fix=None,
        fix_text="use a rank well below {width} (8 to 64 is typical), or method.kind: full",
        source=LORA_RANK,
    ),
    # optimisation
    Rule(
        id="lr-high-for-full-finetune",
        severity="warning",
        title="Learning rate too high for a full fine-tune",
        applies=lambda c: c.recipe.method.kind == "full" and c.recipe.train.lr > 1e-4,
        message="train.lr {lr} with method.kind full: updating every weight at a LoRA-sized learning rate "
        "tends to overflow in half precision and to erase what the model knew",
        fix={"train.lr": 2e-5},
        fix_text="set train.lr: 2.0e-5 (full fine-tunes typically use 1e-5 to 5e-5)",
        source=E5_HIGH_LR + E2_FP16_OVERFLOW[:1],
    ),
    Rule(
        id="lr-high-for-lora",
        severity="warning",
        title="Learning rate too high for LoRA",
        applies=lambda c: adapters(c) and c.recipe.train.lr > 1e-3,
        message="train.lr {lr} with method.kind {kind}: above 1e-3 adapters tend to diverge or overfit "
        "within a few steps",
        fix={"train.lr": 2e-4},
        fix_text="set train.lr: 2.0e-4",
        source=LORA_SCALE[2:] + E5_HIGH_LR,
    ),
]
