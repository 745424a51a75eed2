"""The one training step: forward, loss, backward over the micro-batches, clip, optimizer step, zero-grad.

Training calls it on real tensors and planning calls it on fake ones, so it never reads tensor values:
no ``.item()``, no Python branch on tensor contents. Legend: B batch, T time, D hidden, V vocabulary.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from fitune.data.batching import Batch
from fitune.data.dataset import IGNORE


def forward_hidden(session, batch: Batch) -> torch.Tensor:
    """Run the decoder body (no output head): hidden_BTD."""
    lm = session.causal_lm
    body = getattr(lm, lm.base_model_prefix)
    out = body(input_ids=batch.input_ids_BT, attention_mask=batch.attention_mask_BT, use_cache=False)
    return out.last_hidden_state


def token_loss_sum(session, hidden_BTD: torch.Tensor, targets_BT: torch.Tensor) -> torch.Tensor:
    """Sum over target tokens of the cross-entropy, computed in fp32."""
    lm = session.causal_lm
    logits_BTV = lm.get_output_embeddings()(hidden_BTD)
    cap = getattr(lm.config, "final_logit_softcapping", None)
    logits_BTV = logits_BTV.float()
    if cap:
        logits_BTV = torch.tanh(logits_BTV / cap) * cap
    return F.cross_entropy(
        logits_BTV.view(-1, logits_BTV.shape[-1]),
        targets_BT.reshape(-1),
        ignore_index=IGNORE,
        reduction="sum",
    )


def count_targets(batches: list[Batch]) -> torch.Tensor:
    """Target tokens over all micro-batches of a step: the one loss normaliser (a tensor, never synced)."""
    return sum((b.targets_BT != IGNORE).sum() for b in batches).clamp(min=1)


def micro_batch_loss(session, batch: Batch, n_targets: torch.Tensor) -> torch.Tensor:
    with session.autocast():
        hidden_BTD = forward_hidden(session, batch)
        return token_loss_sum(session, hidden_BTD, batch.targets_BT) / n_targets


def train_step(session, batches: list[Batch]) -> torch.Tensor:
    """One optimizer step over ``batches`` (the gradient-accumulation group); returns the mean token loss."""
    n_targets = count_targets(batches)
    total = torch.zeros((), device=session.device)
    scaler = session.grad_scaler
    for batch in batches:
        loss = micro_batch_loss(session, batch, n_targets)
        (scaler.scale(loss) if scaler is not None else loss).backward()
        total = total + loss.detach()
    if scaler is not None:
        scaler.unscale_(session.optimizer)
    max_norm = session.recipe.train.max_grad_norm
    if max_norm is not None:
        torch.nn.utils.clip_grad_norm_([p for _, p in session.trainable_parameters], max_norm)
    if scaler is not None:
        scaler.step(session.optimizer)  # skips the step when gradients overflowed
        scaler.update()
    else:
        session.optimizer.step()
    session.scheduler.step()
    session.optimizer.zero_grad(set_to_none=True)
    return total


@torch.no_grad()
def eval_loss(session, batches: list[Batch]) -> torch.Tensor:
    """Mean token loss over ``batches`` without gradients."""
    was_training = session.model.training
    session.model.eval()
    n_targets = count_targets(batches)
    total = torch.zeros((), device=session.device)
    for batch in batches:
        total = total + micro_batch_loss(session, batch, n_targets)
    session.model.train(was_training)
    return total
