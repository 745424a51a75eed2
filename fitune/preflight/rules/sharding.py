"""Rules for sharding a run with FSDP2 over hardware.num_devices."""

from __future__ import annotations

from fitune.preflight.readers import (
    bnb_optimizer,
    older,
    qlora,
    sharded,
)
from fitune.preflight.rule import Rule
from fitune.preflight.sources import (
    FSDP2_GRADIENT_SUM,
    FSDP2_PUBLIC,
    FSDP2_UINT8,
    G1_FSDP_QLORA,
    G6_FSDP_8BIT,
)

RULES: list[Rule] = [
    Rule(
        id="fsdp-torch-too-old",
        severity="error",
        title="torch older than 2.9 for a run over several devices (FSDP2)",
        applies=lambda c: sharded(c) and c.env is not None and older(c.env.torch_version, (2, 9)),
        message="hardware.num_devices is {num_devices}, which shards the model with FSDP2 (fully_shard), and "
        "this is torch {torch}: before 2.9 FSDP2 over gloo sums the ranks' gradients instead of averaging "
        "them (2.7 and 2.8, silently: the step is num_devices times too large), and torch 2.6 cannot run an "
        "FSDP2 forward on a CPU at all",
        fix=None,
        fix_text="upgrade torch to 2.9 or newer, or set hardware.num_devices: 1",
        source=FSDP2_GRADIENT_SUM + FSDP2_PUBLIC,
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
        title="QLoRA over several devices on torch older than 2.12",
        applies=lambda c: (
            qlora(c) and sharded(c) and c.env is not None and older(c.env.torch_version, (2, 12))
        ),
        message="QLoRA on {num_devices} devices shards the 4-bit weights with FSDP2; fitune stores them as "
        "uint8 (FSDP2 would cast a float storage to the compute dtype and destroy the packed values), and "
        "FSDP2 shards parameters that are not floats only from torch 2.12: on torch {torch} fully_shard "
        "fails ('only Tensors of floating point dtype can require gradients')",
        fix=None,
        fix_text="upgrade torch to 2.12 or newer, or train QLoRA on one device (hardware.num_devices: 1)",
        source=FSDP2_UINT8 + G1_FSDP_QLORA,
    ),
]
