"""The final save of a sharded run: every rank takes part in gathering the trained weights, rank 0 writes them.

LoRA and QLoRA gather only the trainable parameters (the adapter), so the frozen base is never assembled on
rank 0; a full fine-tune gathers the whole model, tensor by tensor into host memory. What is written is what
one process writes: a PEFT adapter folder (``PeftModel.from_pretrained`` reads it) or a transformers model
folder.
"""

from __future__ import annotations

from pathlib import Path

from fitune.distributed.world import barrier, current


def gathered_state(module, full: bool) -> dict:
    """The trained weights of ``module`` (all of them for a ``full`` fine-tune, else the trainable ones) as
    whole tensors in host memory on rank 0 (empty on the other ranks)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    options = StateDictOptions(full_state_dict=True, cpu_offload=True, ignore_frozen_params=not full)
    state = get_model_state_dict(module, options=options)
    # a tied weight (embeddings and head) is one parameter under two names, gathered into two copies: keep
    # the first name, as save_pretrained does for the one tensor of an unsharded model
    first: dict[int, str] = {}
    for name, param in module.named_parameters(remove_duplicate=False):
        if first.setdefault(id(param), name) != name:
            state.pop(name, None)
    return state


def save_sharded_result(session, out: Path) -> Path:
    """The final save of a run over several processes; returns the folder rank 0 wrote."""
    full = session.recipe.method.kind == "full"
    module = session.causal_lm if full else session.model
    state = gathered_state(module, full)  # a collective: every rank calls it
    target = out / ("model" if full else "adapter")
    if current().main:
        module.save_pretrained(str(target), state_dict=state, safe_serialization=True)
        if session.tokenizer is not None:
            session.tokenizer.save_pretrained(str(target))
    barrier()  # the folder is whole before any rank goes on
    return target
