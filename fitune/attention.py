"""Causal attention in query blocks, for CPU training with ``train.attention: sdpa``.

PyTorch's fused attention on a CPU spends most of a training step's attention time in its backward
kernel. This one computes the same exact attention with batched matrix multiplies over blocks of queries:
a block only meets the keys at or before it (the causal upper triangle is never computed), the
probabilities are not kept (backward recomputes them, as fused kernels do), and grouped-query heads share
their key/value head without copies. It keeps q, k and v only; the output it returns is already in the
layout the output projection reads. Legend: B batch, H query heads, K key/value heads,
G = H/K queries per key/value head, T time, D head dim, C queries of one block.

It serves the common training case (causal, no padding mask, no dropout/softcap/sliding window); anything
else goes to transformers' own SDPA path unchanged.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from fitune.installed import Installed

NAME = "fitune_blocked_causal"
BLOCK = 128  # queries per block: scores of one block are B*H*C*T fp32


class _BlockedCausalAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q_BHTD, k_BKTD, v_BKTD, scale, block):
        B, H, T, D = q_BHTD.shape
        K = k_BKTD.shape[1]
        G = H // K
        dt = q_BHTD.dtype
        q_BKGTD = q_BHTD.reshape(B, K, G, T, D)
        out_BTHD = q_BHTD.new_empty(B, T, H, D)  # the layout o_proj reads: no transpose copy afterwards
        out_BKGTD = out_BTHD.view(B, T, K, G, D).permute(0, 2, 3, 1, 4)
        with torch.autocast(q_BHTD.device.type, enabled=False):
            for start in range(0, T, block):
                end = min(start + block, T)
                p_BKMS = _probs(q_BKGTD, k_BKTD, start, end, scale)  # M = G*C query rows, S = end keys
                o_BKMD = torch.matmul(p_BKMS.to(dt), v_BKTD[:, :, :end])
                out_BKGTD[:, :, :, start:end] = o_BKMD.view(B, K, G, end - start, D)
        ctx.save_for_backward(q_BHTD, k_BKTD, v_BKTD)
        ctx.scale, ctx.block = scale, block
        return out_BTHD

    @staticmethod
    def backward(ctx, dout_BTHD):
        q_BHTD, k_BKTD, v_BKTD = ctx.saved_tensors
        scale, block = ctx.scale, ctx.block
        B, H, T, D = q_BHTD.shape
        K = k_BKTD.shape[1]
        G = H // K
        dt = q_BHTD.dtype
        q_BKGTD = q_BHTD.reshape(B, K, G, T, D)
        dout_BKGTD = dout_BTHD.contiguous().view(B, T, K, G, D).permute(0, 2, 3, 1, 4)
        dq_BKGTD = torch.empty_like(q_BKGTD)
        dk_BKTD = torch.zeros(k_BKTD.shape, dtype=torch.float32, device=k_BKTD.device)
        dv_BKTD = torch.zeros(v_BKTD.shape, dtype=torch.float32, device=v_BKTD.device)
        with torch.autocast(q_BHTD.device.type, enabled=False):
            for start in range(0, T, block):
                end = min(start + block, T)
                c = end - start
                p_BKMS = _probs(q_BKGTD, k_BKTD, start, end, scale)  # recomputed, as fused kernels do
                do_BKMD = dout_BKGTD[:, :, :, start:end].reshape(B, K, G * c, D)
                dv_BKTD[:, :, :end] += torch.matmul(p_BKMS.to(dt).transpose(-1, -2), do_BKMD).float()
                dp_BKMS = torch.matmul(do_BKMD, v_BKTD[:, :, :end].transpose(-1, -2)).float()
                ds_BKMS = torch._softmax_backward_data(dp_BKMS, p_BKMS, -1, torch.float32)
                del dp_BKMS, p_BKMS
                ds_BKMS = ds_BKMS.mul_(scale).to(dt)
                q_BKMD = q_BKGTD[:, :, :, start:end].reshape(B, K, G * c, D)
                dq_BKMD = torch.matmul(ds_BKMS, k_BKTD[:, :, :end])
                dq_BKGTD[:, :, :, start:end] = dq_BKMD.view(B, K, G, c, D)
                dk_BKTD[:, :, :end] += torch.matmul(ds_BKMS.transpose(-1, -2), q_BKMD).float()
        return dq_BKGTD.view(B, H, T, D), dk_BKTD.to(dt), dv_BKTD.to(dt), None, None


def _probs(q_BKGTD, k_BKTD, start: int, end: int, scale: float) -> torch.Tensor:
    """fp32 softmax of the scaled scores of queries [start, end) over keys [0, end), the future masked."""
    B, K, G, _, D = q_BKGTD.shape
    c = end - start
    q_BKMD = q_BKGTD[:, :, :, start:end].reshape(B, K, G * c, D)
    s_BKMS = torch.matmul(q_BKMD, k_BKTD[:, :, :end].transpose(-1, -2)).float().mul_(scale)
    future_CC = torch.ones(c, c, dtype=torch.bool, device=q_BKGTD.device).triu_(1)
    s_BKMS.view(B, K, G, c, end)[..., start:].masked_fill_(future_CC, -math.inf)  # only the diagonal block
    return torch.softmax(s_BKMS, dim=-1)


def blocked_causal_attention(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    is_causal: bool | None = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """transformers' attention-function interface; returns (B, T, H, D) like its SDPA path."""
    T = query.shape[2]
    causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
    window = getattr(module, "sliding_window", None)
    supported = (
        attention_mask is None
        and causal
        and T > 1
        and key.shape[2] == T
        and not dropout
        and kwargs.get("softcap") is None
        and kwargs.get("position_bias") is None
        and kwargs.get("s_aux") is None
        and (window is None or window >= T)
        and query.dtype == key.dtype == value.dtype
        and query.shape[-1] == key.shape[-1] == value.shape[-1]
        and query.shape[1] % key.shape[1] == 0
    )
    if not supported:
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        return sdpa_attention_forward(
            module,
            query,
            key,
            value,
            attention_mask,
            dropout=dropout,
            scaling=scaling,
            is_causal=is_causal,
            **kwargs,
        )
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    return _BlockedCausalAttention.apply(query, key, value, scale, BLOCK), None


def install(model: nn.Module, installed: Installed | None = None) -> bool:
    """Route ``model``'s SDPA attention through ``blocked_causal_attention``; False if it does not use SDPA.
    The change is recorded in ``installed``, to be checked later."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    config = model.config
    if getattr(config, "_attn_implementation", None) != "sdpa":
        return False
    AttentionInterface.register(NAME, blocked_causal_attention)
    AttentionMaskInterface.register(NAME, sdpa_mask)  # the same masks as SDPA: none when causal suffices
    config._attn_implementation = NAME
    if installed is not None:

        def holds() -> bool:
            registered = AttentionInterface().get(NAME)
            return config._attn_implementation == NAME and registered is blocked_causal_attention

        installed.add("train.attention", "the blocked causal attention for CPUs", type(model).__name__, holds)
    return True
