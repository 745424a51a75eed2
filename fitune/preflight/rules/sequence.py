"""Rules for the sequence and the loss: positions a model has, and the chunked loss."""

from __future__ import annotations

from fitune.preflight.readers import (
    LEARNED_POSITIONS,
    beyond_rotary_context,
    config_int,
    max_positions,
    model_type,
    rope_scaled,
)
from fitune.preflight.rule import Rule
from fitune.preflight.sources import CHUNKED_LOSS, POSITIONS, ROPE_CONTEXT

RULES: list[Rule] = [
    Rule(
        id="seq-len-beyond-learned-positions",
        severity="error",
        title="seq_len beyond a learned position table",
        applies=lambda c: (
            model_type(c) in LEARNED_POSITIONS
            and max_positions(c) is not None
            and c.recipe.train.seq_len > max_positions(c)
        ),
        message="train.seq_len {seq_len} exceeds the {max_pos} positions this {model_type} model has "
        "embeddings for; longer examples index past the table and crash",
        fix=lambda c: {"train.seq_len": max(8, max_positions(c))},
        fix_text="set train.seq_len: {max_pos}",
        source=POSITIONS,
    ),
    Rule(
        id="seq-len-beyond-max-positions",
        severity="error",
        title="seq_len beyond max_position_embeddings without rope scaling",
        applies=lambda c: beyond_rotary_context(c) and not rope_scaled(c),
        message="train.seq_len {seq_len} exceeds this model's max_position_embeddings {max_pos}, and its "
        "config scales no rotary positions (no rope_scaling): positions past {max_pos} were never trained, "
        "so quality degrades and memory is spent on a length the model cannot use",
        fix=lambda c: {"train.seq_len": max(8, max_positions(c))},
        fix_text="lower train.seq_len to {max_pos}, or use a long-context variant of the model",
        source=ROPE_CONTEXT + POSITIONS[:1],
    ),
    Rule(
        id="seq-len-beyond-context",
        severity="warning",
        title="seq_len beyond the model's trained context, with rope scaling",
        applies=lambda c: beyond_rotary_context(c) and rope_scaled(c),
        message="train.seq_len {seq_len} exceeds max_position_embeddings {max_pos}; the config's rope "
        "scaling stretches the positions, but quality past the trained context is untested",
        fix=lambda c: {"train.seq_len": max(8, max_positions(c))},
        fix_text="set train.seq_len: {max_pos}, or check the quality of long examples after training",
        source=ROPE_CONTEXT,
    ),
    Rule(
        id="chunked-loss-small-vocab",
        severity="warning",
        title="Chunked loss on a small vocabulary",
        applies=lambda c: (
            isinstance(c.recipe.train.loss_chunk, int)
            and c.recipe.train.loss_chunk > 0
            and (config_int(c, "vocab_size") or 32000) < 32000
        ),
        message="train.loss_chunk is {loss_chunk} but the vocabulary has only {vocab} entries: the full "
        "logits are small, so chunking adds steps and saves little memory",
        fix={"train.loss_chunk": 0},
        fix_text="set train.loss_chunk: 0 (chunking pays off for vocabularies of 32k and more)",
        source=CHUNKED_LOSS,
    ),
    Rule(
        id="loss-chunk-covers-batch",
        severity="warning",
        title="Loss chunk as large as the whole micro-batch",
        applies=lambda c: (
            isinstance(c.recipe.train.loss_chunk, int)
            and c.recipe.train.loss_chunk >= c.recipe.train.seq_len * c.recipe.train.batch_size
        ),
        message="train.loss_chunk {loss_chunk} is not smaller than the {tokens} tokens of a micro-batch, so "
        "there is a single chunk and the full logits are built anyway",
        fix={"train.loss_chunk": 0},
        fix_text="set train.loss_chunk: 0, or a chunk well below {tokens} (e.g. 1024)",
        source=CHUNKED_LOSS,
    ),
]
