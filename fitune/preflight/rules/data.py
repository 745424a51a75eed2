"""Rules for the data and the training schedule: an eval split that can say something, and gradient
checkpointing over custom code.
"""

from __future__ import annotations

from fitune.preflight.readers import (
    MIN_EVAL_EXAMPLES,
    SMALL_DATA,
    adapters,
    eval_count,
    eval_fraction_for,
    examples,
)
from fitune.preflight.rule import Rule
from fitune.preflight.sources import D1_GC_INPUT_GRADS, EVAL_SPLIT

RULES: list[Rule] = [
    Rule(
        id="no-eval-on-small-data",
        severity="warning",
        title="No held-out data on a small dataset",
        applies=lambda c: (
            c.recipe.data is not None
            and c.recipe.data.eval_fraction == 0
            and (examples(c) or SMALL_DATA) < SMALL_DATA
        ),
        message="data.eval_fraction is 0 on a dataset of {examples} lines: with this little data the model "
        "overfits quickly, and without an eval loss nothing shows when it starts",
        fix=lambda c: {"data.eval_fraction": eval_fraction_for(examples(c))},
        fix_text="hold out a share for the eval loss: data.eval_fraction: {eval_needed}",
        source=EVAL_SPLIT,
    ),
    Rule(
        id="eval-split-tiny",
        severity="warning",
        title="Eval split of only a few examples",
        applies=lambda c: (
            c.recipe.data is not None
            and c.recipe.data.eval_fraction > 0
            and (n := examples(c)) is not None
            and n >= 4 * MIN_EVAL_EXAMPLES
            and eval_count(n, c.recipe.data.eval_fraction) < MIN_EVAL_EXAMPLES
        ),
        message="data.eval_fraction {eval_fraction} of {examples} lines holds out {eval_examples} "
        "example(s): an eval loss over so few is noise and cannot show overfitting",
        fix=lambda c: {"data.eval_fraction": eval_fraction_for(examples(c))},
        fix_text="set data.eval_fraction: {eval_needed} to hold out at least {min_eval} examples",
        source=EVAL_SPLIT,
    ),
    # gradient checkpointing
    Rule(
        id="checkpointing-remote-code-adapters",
        severity="warning",
        title="Gradient checkpointing + frozen base in custom model code",
        applies=lambda c: (
            adapters(c) and c.recipe.train.gradient_checkpointing and c.recipe.model.trust_remote_code
        ),
        message="gradient checkpointing over a frozen base needs gradients to flow into each checkpointed "
        "block; fitune uses non-reentrant checkpointing, but custom model code (trust_remote_code) may run "
        "its own reentrant checkpoint, leaving the adapters without gradients and unchanged",
        fix=None,
        fix_text="run a few steps (`fitune train --max-steps 2`) and check that the loss moves, or set "
        "train.gradient_checkpointing: false",
        source=D1_GC_INPUT_GRADS,
    ),
]
