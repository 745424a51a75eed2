"""FSDP2 over a session's model: one function, called by the session builder when a run has several ranks.

The layout (as torchtitan and accelerate shard Llama-family models): every decoder layer is its own group,
all-gathered for its forward and backward and freed in between; the input embeddings another; the final norm
with the output head one more (with tied embeddings, embeddings, norm and head are one group, since they
share a weight); then the decoder body as the root, whose forward fitune's step calls first. The head's
group stays gathered from the norm's forward to the backward: the chunked loss reads the head's weight
outside the head's own forward.

Precision stays fitune's own: parameters are gathered in their storage dtype (no ``MixedPrecisionPolicy``),
and autocast computes in the recipe's precision, exactly as on one device; LoRA adapters (fp32 or bf16) and
the frozen base they adapt share their layer's group. Gradients are averaged over the ranks by the
reduce-scatter; the loss is scaled so that the average is the gradient of the global token mean
(``fitune.step``).

QLoRA's 4-bit weights are sharded like any other parameter, and so is the largest part of their
quantization state: the per-block scales (``absmax``, one byte per 64 weights with double quantization, 1 GiB
for a 70B model) become a frozen parameter of their layer, gathered with the packed weight and freed with
it. What stays whole on every rank is the second-level state (the scales' own scales, 1/64 of those bytes,
and two lookup tables).
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from fitune.memory.tracker import QUANT_STATE_PARAMETER


def _state_onto_gathered_weight(module: nn.Module, _args) -> None:
    """A 4-bit layer's forward reads its quantization state from its weight; the weight FSDP2 gathers is a
    new tensor without it, so it is given the state the layer keeps (``fitune.models.quantize``), with the
    block scales FSDP2 has just gathered beside it. bitsandbytes would otherwise wrap the gathered weight in a
    parameter subclass of its own at every forward. A new state object each forward: the one a previous
    forward saved for its backward keeps pointing at the same gathered scales, which FSDP2 gathers again
    before that backward."""
    state = copy.copy(module.quant_state)
    state.absmax = getattr(module, QUANT_STATE_PARAMETER)
    module.weight.quant_state = state


def _scales_as_parameter(module: nn.Module) -> None:
    """Move a 4-bit layer's block scales out of its quantization state into a frozen parameter, which
    ``fully_shard`` then shards; the state keeps none (a forward reads them through the hook above). The
    layer and its weight hold one state object (``fitune.models.quantize``), so neither keeps them whole."""
    state = module.quant_state
    scales = nn.Parameter(state.absmax, requires_grad=False)
    state.absmax = None
    module.register_parameter(QUANT_STATE_PARAMETER, scales)


def _state_to(state, device: torch.device) -> None:
    """Move the tensors a quantization state still holds (all but the sharded block scales), in place."""
    for obj in (state, getattr(state, "state2", None)):
        if obj is None:
            continue
        for name, value in vars(obj).items():
            if isinstance(value, torch.Tensor):
                setattr(obj, name, value.to(device))


def _body(causal_lm: nn.Module) -> nn.Module:
    return getattr(causal_lm, causal_lm.base_model_prefix)


def shard_model(causal_lm: nn.Module, layers: list[nn.Module], mesh=None, device=None) -> None:
    """Apply ``fully_shard`` to ``causal_lm`` (the transformers model inside a PeftModel, in place): each of
    ``layers``, the embeddings, [final norm, head], then the body as the root. A model in host memory moves
    to the mesh's device group by group as it is sharded; ``device`` is where the rest goes: the 4-bit
    layers' quantization state but their block scales, which is no parameter."""
    from torch.distributed.fsdp import fully_shard

    kwargs = {"mesh": mesh} if mesh is not None else {}
    for module in causal_lm.modules():
        if getattr(module, "quant_state", None) is not None and hasattr(module, "weight"):
            _scales_as_parameter(module)
            module.register_forward_pre_hook(_state_onto_gathered_weight)
    for layer in layers:
        fully_shard(layer, **kwargs)
    body = _body(causal_lm)
    embed = causal_lm.get_input_embeddings()
    head = causal_lm.get_output_embeddings()
    norm = getattr(body, "norm", None)
    if norm is None:
        norm = getattr(body, "final_layernorm", None)
    tied = head is not None and head.weight is embed.weight
    tail = [m for m in (norm, head) if m is not None]
    if tied:
        fully_shard([embed, *tail], reshard_after_forward=False, **kwargs)
    else:
        fully_shard(embed, **kwargs)
        if tail:
            fully_shard(tail, reshard_after_forward=False, **kwargs)
    fully_shard(body, **kwargs)
    if device is not None and device.type != "cpu":
        for module in causal_lm.modules():
            state = getattr(module, "quant_state", None)
            if state is not None:
                _state_to(state, device)
