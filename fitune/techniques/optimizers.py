"""The optimizers a recipe can name, built the same way for training and for planning.

- ``adamw``: torch's AdamW with the fused kernel wherever torch has one for the parameters' device (CUDA,
  CPU, ...): one kernel per parameter group, no per-tensor temporaries, and faster than the default loop.
- ``adamw8bit`` / ``paged_adamw8bit``: bitsandbytes' block-wise 8-bit AdamW. Parameters under 4,096 elements
  keep fp32 state (bitsandbytes' ``min_8bit_size``). The paged variant keeps its state of tensors over 100k
  elements in CUDA managed memory, which the driver can evict to host under pressure; it is planned as
  resident on the device (the most it can take), and on a CPU it is the plain 8-bit optimizer
  (bitsandbytes says so with a warning).
- ``sgd``: torch's SGD with momentum 0.9.

Planning: bitsandbytes builds its quantization maps (``create_dynamic_map``) by reading values, which fake
tensors cannot do. The maps hold constants, so for a fake session they are computed on real tensors outside
every dispatch mode and copied into the fake run (``_real_quantization_maps``), as ``models/quantize.py`` does
for the 4-bit maps; the update itself is a bitsandbytes custom op with a registered fake kernel.
"""

from __future__ import annotations

import contextlib
import functools

import torch
from torch import nn

from fitune.errors import FituneError
from fitune.recipe import Recipe


def build_optimizer(
    recipe: Recipe, params: list[nn.Parameter], *, fake: bool = False
) -> torch.optim.Optimizer:
    t = recipe.train
    if not params:
        raise FituneError("no parameter is trainable; fix: check method.kind and method.targets")
    if t.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=t.lr, weight_decay=t.weight_decay, fused=fused_supported(params))
    if t.optimizer == "sgd":
        return torch.optim.SGD(params, lr=t.lr, momentum=0.9, weight_decay=t.weight_decay)
    try:
        import bitsandbytes as bnb
    except ImportError:
        raise FituneError(
            f"train.optimizer: {t.optimizer!r} needs bitsandbytes, which is not installed; fix: "
            "`pip install bitsandbytes`, or set train.optimizer: adamw"
        ) from None
    cls = bnb.optim.AdamW8bit if t.optimizer == "adamw8bit" else bnb.optim.PagedAdamW8bit
    with _real_quantization_maps() if fake else contextlib.nullcontext():
        return cls(params, lr=t.lr, weight_decay=t.weight_decay)


def fused_supported(params: list[nn.Parameter]) -> bool:
    """Whether torch has a fused AdamW kernel for every parameter (device and floating dtype)."""
    from torch.optim.optimizer import _get_fused_kernels_supported_devices

    devices = _get_fused_kernels_supported_devices()
    return all(p.device.type in devices and torch.is_floating_point(p) for p in params)


@functools.cache
def _quantization_map(signed: bool, max_exponent_bits: int, total_bits: int) -> torch.Tensor:
    from bitsandbytes import functional as F
    from torch.utils._python_dispatch import _disable_current_modes

    create = getattr(F.create_dynamic_map, "__wrapped__", F.create_dynamic_map)
    with _disable_current_modes():  # real values, unseen by the fake mode and the tracker
        return create(signed, max_exponent_bits, total_bits)


@contextlib.contextmanager
def _real_quantization_maps():
    """While a fake session builds its 8-bit optimizer, ``create_dynamic_map`` returns a copy (made in the
    fake run, so it is counted as the real map is) of the map computed once on real tensors."""
    from bitsandbytes import functional as F

    original = F.create_dynamic_map

    @functools.wraps(original)
    def create_dynamic_map(signed=True, max_exponent_bits=7, total_bits=8):
        return _quantization_map(signed, max_exponent_bits, total_bits).clone()

    F.create_dynamic_map = create_dynamic_map
    try:
        yield
    finally:
        F.create_dynamic_map = original
