"""The one training step: forward, loss, backward over the micro-batches, clip, optimizer step, zero-grad.

Training calls it on real tensors and planning calls it on fake ones, so it never reads tensor values:
no ``.item()``, no Python branch on tensor contents. Legend: B batch, T time, D hidden, V vocabulary,
N tokens (B*T flattened), C tokens of one loss chunk.

Memory techniques applied here (the session builds them): the chunked cross-entropy (``session.loss_chunk``),
the activation offload (``session.offload``) and the lean activations (``session.derived``, innermost, so
tensors it does not recompute reach the offload); gradient checkpointing lives in the model's layers.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable

import torch
import torch.nn.functional as F
from torch.distributed.tensor import DTensor
from torch.utils.checkpoint import checkpoint

from fitune.data.batching import Batch
from fitune.data.dataset import IGNORE
from fitune.distributed.world import all_sum
from fitune.techniques.lean import chunk_loss_sum_, linear_cross_entropy


def forward_hidden(session, batch: Batch) -> torch.Tensor:
    """Run the decoder body (no output head): hidden_BTD."""
    lm = session.causal_lm
    body = getattr(lm, lm.base_model_prefix)
    out = body(input_ids=batch.input_ids_BT, attention_mask=batch.attention_mask_BT, use_cache=False)
    return out.last_hidden_state


def _loss_sum(head, cap: float | None, hidden_ND: torch.Tensor, targets_N: torch.Tensor) -> torch.Tensor:
    logits_NV = head(hidden_ND).float()
    if cap:
        logits_NV = torch.tanh(logits_NV / cap) * cap
    return F.cross_entropy(logits_NV, targets_N, ignore_index=IGNORE, reduction="sum")


def _no_grad_loss_sum(
    head, cap: float | None, hidden_ND: torch.Tensor, targets_N: torch.Tensor, chunk: int
) -> torch.Tensor:
    """The loss without gradients (eval): plain chunks, each chunk's fp32 logits worked on in place and freed
    before the next."""
    total = torch.zeros((), dtype=torch.float32, device=hidden_ND.device)
    for hidden_CD, targets_C in zip(hidden_ND.split(chunk), targets_N.split(chunk), strict=True):
        z_CV = head(hidden_CD).float()
        if cap:
            z_CV.div_(cap).tanh_().mul_(cap)
        total = total + chunk_loss_sum_(z_CV, targets_C)[0]
        del z_CV
    return total


def token_loss_sum(session, hidden_BTD: torch.Tensor, targets_BT: torch.Tensor) -> torch.Tensor:
    """Sum over target tokens of the cross-entropy, computed in fp32.

    With ``session.loss_chunk`` > 0 the tokens go through the output head in chunks of that many, so at most
    one chunk's logits exist at a time instead of all B*T*V of them. A plain linear head takes the fused
    loss (``fitune.techniques.lean.linear_cross_entropy``: gradients computed in the forward pass, nothing
    recomputed); any other head (an adapter on it, a bias) runs each chunk under non-reentrant
    checkpointing, its logits recomputed in backward. Without gradients (eval) every head runs plain chunks and keeps nothing.
    """
    lm = session.causal_lm
    head = lm.get_output_embeddings()
    cap = getattr(lm.config, "final_logit_softcapping", None)
    hidden_ND = hidden_BTD.reshape(-1, hidden_BTD.shape[-1])
    targets_N = targets_BT.reshape(-1)
    chunk = session.loss_chunk
    if chunk <= 0:
        return _loss_sum(head, cap, hidden_ND, targets_N)
    if not torch.is_grad_enabled():
        return _no_grad_loss_sum(head, cap, hidden_ND, targets_N, chunk)
    if type(head) is torch.nn.Linear and head.bias is None:
        return linear_cross_entropy(
            hidden_ND, head.weight, targets_N, chunk=chunk, cap=cap, compute_dtype=session.compute_dtype
        )
    if chunk >= targets_N.shape[0]:
        return _loss_sum(head, cap, hidden_ND, targets_N)
    total = None
    for hidden_CD, targets_C in zip(hidden_ND.split(chunk), targets_N.split(chunk), strict=True):
        # no randomness in the head and the loss: no RNG state to save for the recompute
        part = checkpoint(
            _loss_sum, head, cap, hidden_CD, targets_C, use_reentrant=False, preserve_rng_state=False
        )
        total = part if total is None else total + part
    return total


def _targets(batches: list[Batch]) -> torch.Tensor:
    return sum((b.targets_BT != IGNORE).sum() for b in batches)


def count_targets(batches: list[Batch]) -> torch.Tensor:
    """Target tokens over all micro-batches of a step: the one loss normaliser (a tensor, never synced)."""
    return _targets(batches).clamp(min=1)


def global_targets(batches: list[Batch], device: torch.device) -> torch.Tensor:
    """Target tokens of the step over every rank's micro-batches."""
    return all_sum(_targets(batches).to(device)).clamp(min=1)


def micro_batch_loss(session, batch: Batch, n_targets: torch.Tensor) -> torch.Tensor:
    offload = session.offload.hooks() if session.offload is not None else contextlib.nullcontext()
    derived = session.derived.hooks() if session.derived is not None else contextlib.nullcontext()
    with session.autocast(), offload, derived:
        hidden_BTD = forward_hidden(session, batch)
        return token_loss_sum(session, hidden_BTD, batch.targets_BT) / n_targets


def train_step(session, batches: list[Batch]) -> torch.Tensor:
    """One optimizer step over ``batches`` (the gradient-accumulation group); returns the mean token loss and
    leaves the gradients' total norm before clipping in ``session.grad_norm`` (both tensors, never synced).

    Micro-batches may wait in host memory: each moves to the device only for its own forward and backward.
    """
    # several ranks: each loss is this rank's share of the global token mean; the reduce-scatter averages the
    # ranks' gradients, so the loss that goes backward is scaled by their number
    ranks = session.ranks
    if ranks > 1:
        n_targets = global_targets(batches, session.device)
    else:
        n_targets = count_targets(batches).to(session.device)
    total = torch.zeros((), device=session.device)
    scaler = session.grad_scaler
    for batch in batches:
        loss = micro_batch_loss(session, batch.to(session.device), n_targets)
        scaled = loss * ranks if ranks > 1 else loss
        (scaler.scale(scaled) if scaler is not None else scaled).backward()
        total = total + loss.detach()
    if scaler is not None:
        scaler.unscale_(session.optimizer)
    max_norm = session.recipe.train.max_grad_norm
    params = [p for _, p in session.trainable_parameters]
    if max_norm is not None:  # the norm before clipping, as the metrics report it
        norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
    else:
        norm = torch.nn.utils.get_total_norm([p.grad for p in params if p.grad is not None])
    if isinstance(norm, DTensor):  # sharded gradients: the norm over every rank's shards
        norm = norm.full_tensor()
    session.grad_norm.copy_(norm.detach())
    if scaler is not None:
        scaler.step(session.optimizer)  # skips the step when gradients overflowed
        scaler.update()
    else:
        session.optimizer.step()
    session.scheduler.step()
    session.optimizer.zero_grad(set_to_none=True)
    return all_sum(total) if ranks > 1 else total


@torch.no_grad()
def eval_loss(session, batches: Iterable[Batch]) -> torch.Tensor | None:
    """Mean token loss over ``batches`` without gradients (None when there are none), through the same loss,
    attention, lean and offload settings as training; like training, each micro-batch moves to the device
    only for its own pass, so ``batches`` may collate lazily."""
    total, count = eval_sums(session, batches)
    return None if total is None else total / count.clamp(min=1)


@torch.no_grad()
def eval_sums(session, batches: Iterable[Batch]) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """The summed token loss over ``batches`` and the number of target tokens (None, None without any)."""
    total = count = None
    with session.evaluating():
        for batch in batches:
            batch = batch.to(session.device)
            loss_sum = micro_batch_loss(session, batch, 1)
            n = (batch.targets_BT != IGNORE).sum()
            total = loss_sum if total is None else total + loss_sum
            count = n if count is None else count + n
            del batch, loss_sum
    return total, count
