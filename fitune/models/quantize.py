"""QLoRA's base: replace a model's linear layers by bitsandbytes NF4 layers with double quantization.

Done layer by layer on an already built model, so the same code serves weights loaded from disk and random
architectures, and the transient peak is one layer's full-precision weight. A model built on the meta device
(``fitune.session.build_model`` for QLoRA) leaves these layers' weights unread; they are taken one at a time
from the model's ``PENDING_WEIGHTS`` source, quantized and dropped, so no full-precision copy of the model
is ever whole in memory.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn
from torch._subclasses.fake_tensor import is_fake, unset_fake_temporarily
from torch.overrides import TorchFunctionMode

# the output head stays in full precision, as in the QLoRA paper and peft's defaults
SKIP = ("lm_head",)

# attribute of a model whose quantized layers' weights are still on the meta device (a PendingWeights)
PENDING_WEIGHTS = "_fitune_pending_weights"


@dataclass
class PendingWeights:
    # (model, weight name, linear) -> that weight in full precision, on the host; dropped once quantized
    read: Callable[[nn.Module, str, nn.Linear], torch.Tensor]
    # planning a CPU run: the fake quantize runs bitsandbytes' CPU kernel, plain torch ops whose temporaries
    # (fp32 copies of the weight) the real run allocates too; on CUDA the kernel allocates its outputs only
    cpu_kernels: bool = False


class _CpuKernels(TorchFunctionMode):
    """Runs ``bitsandbytes::quantize_4bit`` as its CPU kernel (the composite one, which CPU tensors reach)
    rather than its fake implementation, so each op inside reaches the fake mode and the memory tracker as
    it would from Python."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.bitsandbytes.quantize_4bit.default:
            return func._op_dk(torch._C.DispatchKey.CompositeExplicitAutograd, *args, **(kwargs or {}))
        return func(*args, **(kwargs or {}))


def quantized_linears(model: nn.Module) -> list[str]:
    """Names of the ``nn.Linear`` modules ``quantize_nf4`` swaps."""
    return [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and n.split(".")[-1] not in SKIP]


def quantize_nf4(model: nn.Module, compute_dtype: torch.dtype, device: torch.device | str) -> int:
    """Swap every ``nn.Linear`` (but the head) for ``bnb.nn.Linear4bit``; returns how many were swapped."""
    import bitsandbytes as bnb

    if any(is_fake(p) for p in model.parameters()):
        # bitsandbytes builds its quantization maps lazily by reading values; build them on real tensors once
        with unset_fake_temporarily():
            bnb.functional.quantize_4bit(torch.ones(256), compress_statistics=True, quant_type="nf4")
    pending = getattr(model, PENDING_WEIGHTS, None)
    count = 0
    # hold the parents only: a listed linear would keep its full-precision weight alive until the end
    parents = [(n, m) for n, m in model.named_modules() if not isinstance(m, nn.Linear)]
    for parent_name, parent in parents:
        for child_name in [n for n, _ in parent.named_children()]:
            child = getattr(parent, child_name)
            full = f"{parent_name}.{child_name}" if parent_name else child_name
            if not isinstance(child, nn.Linear) or full.split(".")[-1] in SKIP:
                continue
            weight = child.weight
            if weight.device.type == "meta":
                if pending is None:
                    raise RuntimeError(f"{full}.weight was never loaded (meta device)")
                weight = pending.read(model, f"{full}.weight", child)
            # Linear4bit wraps its placeholder weight in Params4bit, which fake tensors refuse: build the
            # (meta, memoryless) module outside the fake mode; its weight is replaced below
            with unset_fake_temporarily() if is_fake(weight) else contextlib.nullcontext():
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
            if is_fake(weight):
                # Params4bit cannot wrap a fake tensor; the same packed bytes and quant state, made by the same
                # quantize op, sit in a plain frozen parameter that Linear4bit.forward reads identically
                cpu = pending is not None and pending.cpu_kernels
                with _CpuKernels() if cpu else contextlib.nullcontext():
                    packed, state = bnb.functional.quantize_4bit(
                        weight.data, compress_statistics=True, quant_type="nf4", quant_storage=torch.uint8
                    )
                q.weight = nn.Parameter(packed, requires_grad=False)
                q.weight.quant_state = state
                q.to(device)
            else:
                q.weight = bnb.nn.Params4bit(
                    weight.data, requires_grad=False, compress_statistics=True, quant_type="nf4"
                )
                q = q.to(device)  # quantizes here
            # the module keeps the state too: sharding (FSDP2) swaps the weight for plain tensors, and
            # Linear4bit.forward takes the state back from the module
            q.quant_state = q.weight.quant_state
            setattr(parent, child_name, q)
            del child, weight
            count += 1
    if pending is not None:
        delattr(model, PENDING_WEIGHTS)
    return count
