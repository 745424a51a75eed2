"""QLoRA's base: replace a model's linear layers by bitsandbytes NF4 layers with double quantization.

Done layer by layer on an already built model, so the same code serves weights loaded from disk and random
architectures, and the transient peak is one layer's full-precision weight.
"""

from __future__ import annotations

import contextlib

import torch
from torch import nn
from torch._subclasses.fake_tensor import is_fake, unset_fake_temporarily

# the output head stays in full precision, as in the QLoRA paper and peft's defaults
SKIP = ("lm_head",)


def quantize_nf4(model: nn.Module, compute_dtype: torch.dtype, device: torch.device | str) -> int:
    """Swap every ``nn.Linear`` (but the head) for ``bnb.nn.Linear4bit``; returns how many were swapped."""
    import bitsandbytes as bnb

    if any(is_fake(p) for p in model.parameters()):
        # bitsandbytes builds its quantization maps lazily by reading values; build them on real tensors once
        with unset_fake_temporarily():
            bnb.functional.quantize_4bit(torch.ones(256), compress_statistics=True, quant_type="nf4")
    count = 0
    for parent_name, parent in list(model.named_modules()):
        for child_name, child in list(parent.named_children()):
            full = f"{parent_name}.{child_name}" if parent_name else child_name
            if not isinstance(child, nn.Linear) or full.split(".")[-1] in SKIP:
                continue
            # Linear4bit wraps its placeholder weight in Params4bit, which fake tensors refuse: build the
            # (meta, memoryless) module outside the fake mode; its weight is replaced below
            with unset_fake_temporarily() if is_fake(child.weight) else contextlib.nullcontext():
                q = bnb.nn.Linear4bit(
                    child.in_features,
                    child.out_features,
                    bias=child.bias is not None,
                    compute_dtype=compute_dtype,
                    compress_statistics=True,
                    quant_type="nf4",
                    quant_storage=torch.uint8,
                    device="meta",
                )
            if child.bias is not None:
                q.bias = nn.Parameter(child.bias.data.to(compute_dtype), requires_grad=False)
            # bitsandbytes repacks CPU weights for inference the first time a layer runs in eval mode and
            # never packs them back; training after an eval would then skip the input gradient through
            # this layer (gemv_4bit has no autograd kernel). Keep the trainable layout.
            q.support_avx512bf16_for_cpu = False
            if is_fake(child.weight):
                # Params4bit cannot wrap a fake tensor; the same packed bytes and quant state, made by the same
                # quantize op, sit in a plain frozen parameter that Linear4bit.forward reads identically
                packed, state = bnb.functional.quantize_4bit(
                    child.weight.data, compress_statistics=True, quant_type="nf4", quant_storage=torch.uint8
                )
                q.weight = nn.Parameter(packed, requires_grad=False)
                q.weight.quant_state = state
                q.to(device)
            else:
                q.weight = bnb.nn.Params4bit(
                    child.weight.data, requires_grad=False, compress_statistics=True, quant_type="nf4"
                )
                q = q.to(device)  # quantizes here
            setattr(parent, child_name, q)
            del child
            count += 1
    return count
