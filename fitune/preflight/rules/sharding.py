"""Rules for sharding a run with FSDP2 over hardware.num_devices."""

from __future__ import annotations

from fitune.preflight.readers import (
    COMPUTE,
    bnb_optimizer,
    older,
    qlora,
    settled_precision,
    sharded,
    storage_like_compute,
)
from fitune.preflight.rule import Rule
from fitune.preflight.sources import FSDP2_PUBLIC, G1_FSDP_QLORA, G6_FSDP_8BIT

RULES: list[Rule] = [
    Rule(
        id="fsdp-torch-too-old",
        severity="error",
        title="torch without public FSDP2 for a multi-device run",
        applies=lambda c: sharded(c) and c.env is not None and older(c.env.torch_version, (2, 6)),
        message="hardware.num_devices is {num_devices}, which shards with FSDP2 (fully_shard), public in "
        "torch.distributed.fsdp only since torch 2.6; this is torch {torch}",
        fix=None,
        fix_text="upgrade torch to 2.6 or newer, or set hardware.num_devices: 1",
        source=FSDP2_PUBLIC,
    ),
    Rule(
        id="fsdp-8bit-optimizer",
        severity="error",
        title="8-bit or paged optimizer under FSDP",
        applies=lambda c: sharded(c) and bnb_optimizer(c),
        message="train.optimizer is {optimizer} with hardware.num_devices {num_devices}: FSDP cannot shard "
        "or gather the quantized optimizer state, so the step or the first checkpoint save fails",
        fix={"train.optimizer": "adamw"},
        fix_text="set train.optimizer: adamw (FSDP already spreads its state over the devices)",
        source=G6_FSDP_8BIT,
    ),
    Rule(
        id="qlora-fsdp-storage-dtype",
        severity="error",
        title="QLoRA under FSDP with weights and compute in different dtypes",
        applies=lambda c: (
            qlora(c)
            and sharded(c)
            and c.recipe.train.precision != "bf16-pure"
            and c.recipe.model.dtype != COMPUTE[settled_precision(c)]
        ),
        message="QLoRA on {num_devices} devices shards the 4-bit weights with FSDP, which needs their "
        "storage to be one float dtype shared by every weight in a unit; model.dtype {dtype} differs from "
        "the compute dtype {compute}, so units would mix dtypes and fail to flatten",
        fix=storage_like_compute,
        fix_text="store and compute in one type: model.dtype and train.precision {settled}",
        source=G1_FSDP_QLORA,
    ),
]
