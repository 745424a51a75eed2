"""Micro-batches: right-padded token ids, attention mask, and targets already shifted by one position.

Legend for tensor names: B = micro-batch size, T = sequence length.
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from dataclasses import dataclass

import torch

from fitune.data.dataset import IGNORE, Example


@dataclass
class Batch:
    input_ids_BT: torch.Tensor
    attention_mask_BT: torch.Tensor | None  # None when no row is padded: attention then needs no mask tensor
    targets_BT: torch.Tensor  # next-token ids where the loss applies, IGNORE elsewhere (incl. padding)

    @property
    def num_tokens(self) -> int:
        """Non-padding tokens (a host-side count for throughput; not used inside the step)."""
        if self.attention_mask_BT is None:
            return self.input_ids_BT.numel()
        return int(self.attention_mask_BT.sum())

    def to(self, device) -> Batch:
        mask = self.attention_mask_BT
        return Batch(
            self.input_ids_BT.to(device, non_blocking=True),
            None if mask is None else mask.to(device, non_blocking=True),
            self.targets_BT.to(device, non_blocking=True),
        )


def collate(examples: list[Example], pad_id: int, pad_to: int | None = None) -> Batch:
    """Right-pad to the longest example (or ``pad_to``). Each example holds seq_len + 1 tokens at most."""
    width = max(len(e.input_ids) for e in examples) - 1
    if pad_to is not None:
        width = max(width, pad_to)
    ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(examples), width), dtype=torch.long)
    targets = torch.full((len(examples), width), IGNORE, dtype=torch.long)
    for i, ex in enumerate(examples):
        n = len(ex.input_ids) - 1
        ids[i, :n] = torch.tensor(ex.input_ids[:-1])
        mask[i, :n] = 1
        nxt = torch.tensor(ex.input_ids[1:])
        keep = torch.tensor(ex.loss_mask[1:], dtype=torch.bool)
        targets[i, :n] = torch.where(keep, nxt, torch.full_like(nxt, IGNORE))
    padded = any(len(ex.input_ids) - 1 < width for ex in examples)
    return Batch(ids, mask if padded else None, targets)


def synthetic_batch(batch_size: int, seq_len: int, vocab_size: int, device="cpu") -> Batch:
    """A full-length batch where every position carries loss: the shapes planning and measurement use."""
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, vocab_size, (batch_size, seq_len), generator=gen)
    targets = torch.randint(0, vocab_size, (batch_size, seq_len), generator=gen)
    return Batch(ids, None, targets).to(device)


class MicroBatches:
    """Endless seeded iteration over shuffled training examples, one epoch after another."""

    def __init__(self, examples: list[Example], batch_size: int, pad_id: int, seed: int):
        self.examples = examples
        self.batch_size = batch_size
        self.pad_id = pad_id
        self.rng = random.Random(seed)
        self.epoch = 0

    def __iter__(self) -> Iterator[Batch]:
        while True:
            order = list(range(len(self.examples)))
            self.rng.shuffle(order)
            for start in range(0, len(order), self.batch_size):
                chunk = [self.examples[i] for i in order[start : start + self.batch_size]]
                yield collate(chunk, self.pad_id)
            self.epoch += 1


def batches_per_epoch(n_examples: int, batch_size: int) -> int:
    return max(1, -(-n_examples // batch_size))
