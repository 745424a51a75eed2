"""Attention: which kernel a run uses (``train.attention: auto``), and causal attention in query blocks for
CPU training with ``sdpa``.

``choose`` resolves ``auto`` for the session builder, the plan and the doctor alike: FlashAttention-2 where
flash-attn is installed, the GPU is Ampere or newer and transformers has a FlashAttention path for the
architecture; else SDPA where transformers has an SDPA path for it (and the model caps no attention logits,
which SDPA cannot); else eager.

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

import functools
import importlib.util
import math
import re
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from fitune.techniques.installed import Installed

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


# --- which kernel a run uses (train.attention: auto) ------------------------------------------------------------

FA2_MAX_HEAD_DIM = 256  # flash-attn 2 has kernels for head dims up to 256
FA2_LARGE_HEAD_DIM = (
    192  # its backward above this needs A100/H100 shared memory (Dao-AILab/flash-attention#276)
)
FA2_FULL_BACKWARD_CC = ((8, 0), (9, 0))
FA2_SOFTCAP = (2, 6, 3)  # first flash-attn release that caps logits (huggingface/transformers#32309)


@dataclass(frozen=True)
class Where:
    """What the choice of kernel depends on about the machine a run meets."""

    device_type: str  # cpu | cuda
    capability: tuple[int, int] | None  # CUDA compute capability
    flash_attn: str | None  # installed flash-attn version; None when not installed


@dataclass(frozen=True)
class Choice:
    kernel: str | None  # eager | sdpa | flash_attention_2; None: transformers' own pick (custom model code)
    reason: str

    @property
    def label(self) -> str:
        return self.kernel or "transformers' default"

    def line(self) -> str:
        """``attention: sdpa (auto: ...)``, as `fitune plan` and `fitune doctor` print it."""
        return f"attention: {self.label} ({self.reason})"


def here(device) -> Where:
    """This machine, for a run on ``device``."""
    kind = torch.device(device).type
    capability = None
    if kind == "cuda" and torch.cuda.is_available():
        capability = tuple(torch.cuda.get_device_capability(torch.device(device)))
    return Where(kind, capability, _flash_attn_version())


def of_environment(env) -> Where:
    """A detected or simulated ``fitune.hardware.detect.Environment``."""
    gpu = env.gpu if env.device_type == "cuda" else None
    return Where(env.device_type, tuple(gpu.compute_capability) if gpu else None, env.flash_attn_version)


def _flash_attn_version() -> str | None:
    if importlib.util.find_spec("flash_attn") is None:
        return None
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("flash-attn")
    except PackageNotFoundError:
        return "unknown"


def _version(text: str | None) -> tuple[int, ...] | None:
    match = re.match(r"\d+(?:\.\d+)*", text or "")
    return tuple(int(p) for p in match.group().split(".")) if match else None


def _value(config: Any, key: str) -> Any:
    """A config entry, from a config object or a config.json dict (a text_config's entries included)."""
    if isinstance(config, dict):
        text = config.get("text_config")
        return {**config, **text}.get(key) if isinstance(text, dict) else config.get(key)
    text = getattr(config, "text_config", None)
    return getattr(config, key, getattr(text, key, None) if text is not None else None)


@functools.lru_cache(maxsize=64)
def _model_class(model_type: str):
    """transformers' causal-LM class for ``model_type``; None when it has none (custom model code)."""
    from transformers import AutoModelForCausalLM
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    try:
        return AutoModelForCausalLM._model_mapping[CONFIG_MAPPING[model_type]]
    except (KeyError, ValueError, ImportError, AttributeError):
        return None


def has_sdpa(config: Any) -> bool | None:
    """Whether transformers has an SDPA path for the architecture; None when unknown (custom model code)."""
    cls = _model_class(str(_value(config, "model_type") or ""))
    return None if cls is None else bool(cls._supports_sdpa)


def softcap(config: Any) -> float | None:
    """Attention-logit soft-capping (Gemma 2 caps at 50 when its config.json leaves the key out)."""
    if isinstance(config, dict) and "attn_logit_softcapping" not in config:
        return 50.0 if config.get("model_type") == "gemma2" else None
    return _value(config, "attn_logit_softcapping") or None


def _head_dim(config: Any) -> int:
    explicit = _value(config, "head_dim")
    if isinstance(explicit, int) and explicit > 0:
        return explicit
    hidden, heads = _value(config, "hidden_size"), _value(config, "num_attention_heads")
    return hidden // heads if isinstance(hidden, int) and isinstance(heads, int) and heads else 0


def _why_not_fa2(cls, config: Any, where: Where, precision: str) -> str | None:
    """The first reason FlashAttention-2 cannot run this model there; None when it can."""
    if not cls._supports_flash_attn:
        return f"{_value(config, 'model_type')} has no FlashAttention-2 path in transformers"
    if where.device_type != "cuda":
        return f"the run is on {where.device_type}, and FlashAttention-2 runs on CUDA GPUs only"
    if where.capability is None or where.capability < (8, 0):
        cc = ".".join(map(str, where.capability)) if where.capability else "unknown"
        return f"FlashAttention-2 needs an Ampere-or-newer GPU, and this one's compute capability is {cc}"
    if where.flash_attn is None:
        return "flash-attn is not installed"
    version = _version(where.flash_attn)
    if version is not None and version < (2,):
        return f"flash-attn {where.flash_attn} is not 2.x"
    if precision == "fp32":
        return "train.precision fp32 gives FlashAttention-2 fp32 inputs, which it has no kernels for"
    dim = _head_dim(config)
    if dim > FA2_MAX_HEAD_DIM or (dim > FA2_LARGE_HEAD_DIM and where.capability not in FA2_FULL_BACKWARD_CC):
        return f"head_dim {dim} has no FlashAttention-2 backward on this GPU"
    if softcap(config) is not None and version is not None and version < FA2_SOFTCAP:
        return f"flash-attn {where.flash_attn} cannot cap attention logits (2.6.3 can)"
    return None


def choose(recipe, config: Any, where: Where) -> Choice:
    """The kernel ``recipe.train.attention`` means for ``config`` there (``auto`` resolved), and why."""
    requested = recipe.train.attention
    if requested != "auto":
        return Choice(requested, "train.attention")
    model_type = _value(config, "model_type") or "this model"
    cls = _model_class(str(model_type))
    if cls is None:
        return Choice(None, f"auto: {model_type} is custom model code; transformers picks sdpa if it has it")
    why = _why_not_fa2(cls, config, where, recipe.train.precision)
    if why is None:
        return Choice("flash_attention_2", "auto: flash-attn on an Ampere-or-newer GPU")
    if not cls._supports_sdpa:
        return Choice("eager", f"auto: {why}; {model_type} has no SDPA path in transformers")
    if softcap(config) is not None:
        return Choice("eager", f"auto: {why}; SDPA cannot cap attention logits as {model_type} does")
    return Choice("sdpa", f"auto: {why}")


def plan_line(recipe, config: Any, env) -> str:
    """What `fitune plan` and `fitune doctor` say about attention: the kernel training picks on ``env``
    and why, and the kernel a plan traces when it differs (a plan traces on this machine, without CUDA)."""
    target = choose(recipe, config, of_environment(env))
    traced = choose(recipe, config, here("cuda" if env.device_type == "cuda" else "cpu"))
    line = target.line()
    if traced.kernel != target.kernel:
        same = traced.kernel == "sdpa" and target.kernel == "flash_attention_2"
        line += f"; the plan traces {traced.label}" + (
            " (it saves the same tensors)" if same else " (it keeps more, so the plan is an upper bound)"
        )
    return line
