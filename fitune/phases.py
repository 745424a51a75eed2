"""What a run does on the device besides its steps: eval, samples, checkpoint, final save.

The run (``fitune/trainer/run.py``) calls these, each inside the out-of-memory guard of its phase, and the
planner (``fitune.memory.simulate``) traces the same code on fake tensors, so every phase of a run has a
planned peak. They sit below both, beside the one train step.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from pathlib import Path

import torch

from fitune.data.batching import Batch, collate
from fitune.data.dataset import IGNORE, Example
from fitune.distributed.save import gathered_state, save_sharded_result
from fitune.distributed.world import all_sum
from fitune.step import eval_loss, eval_sums

# a prompt's tokens beyond its UTF-8 bytes when no tokenizer is at hand: room for a chat template's wrapping
TEMPLATE_TOKENS_BOUND = 64


def eval_batches(examples: list[Example], batch_size: int, pad_id: int) -> Iterator[Batch]:
    """The eval split in micro-batches of ``batch_size``, each collated only when its pass comes."""
    for i in range(0, len(examples), batch_size):
        yield collate(examples[i : i + batch_size], pad_id)


def evaluate(session, batches) -> float | None:
    """The eval pass: mean token loss over ``batches`` (host batches, each moved for its own pass); None when
    there are none."""
    loss = eval_loss(session, batches)
    return None if loss is None else float(loss)


def evaluate_share(session, examples: list[Example], batch_size: int, pad_id: int, rank: int) -> float | None:
    """The eval pass of a run over ``session.ranks`` processes: each evaluates every ranks-th micro-batch and
    the sums are added up, so the loss is the one process's. Every rank makes as many passes (FSDP2 gathers
    the weights for each): one with fewer batches runs a batch whose tokens all count for nothing."""
    ranks = session.ranks
    starts = list(range(0, len(examples), batch_size))
    if not starts:
        return None
    mine = starts[rank::ranks]
    passes = -(-len(starts) // ranks)

    def batches() -> Iterator[Batch]:
        for i in mine:
            yield collate(examples[i : i + batch_size], pad_id)
        for _ in range(passes - len(mine)):
            filler = collate(examples[:batch_size], pad_id)
            yield dataclasses.replace(filler, targets_BT=torch.full_like(filler.targets_BT, IGNORE))

    total, count = eval_sums(session, batches())
    total, count = all_sum(total), all_sum(count)
    return float(total / count.clamp(min=1))


def prompt_ids(tok, prompt: str) -> torch.Tensor:
    """The token ids (1, P) ``generate`` feeds for ``prompt``: the chat template when the tokenizer has one."""
    if getattr(tok, "chat_template", None):
        enc = tok.apply_chat_template(
            [{"role": "user", "content": prompt}],
            add_generation_prompt=True,
            return_tensors="pt",
            return_dict=True,
        )
    else:
        enc = tok(prompt, return_tensors="pt")
    return enc["input_ids"]


def prompt_lengths(prompts: list[str], tok=None) -> tuple[list[int], str]:
    """Token counts of ``prompts`` and how they were found: tokenized, or bounded by UTF-8 bytes + template."""
    if tok is not None:
        return [int(prompt_ids(tok, p).shape[1]) for p in prompts], "tokenized"
    bound = [len(p.encode("utf-8")) + TEMPLATE_TOKENS_BOUND for p in prompts]
    return bound, f"bounded by UTF-8 bytes + {TEMPLATE_TOKENS_BOUND} template tokens (no tokenizer at hand)"


@torch.no_grad()
def generate(session, prompts: list[str], max_new_tokens: int) -> list[str]:
    """Greedy answers to ``prompts`` (KV cache on), one prompt at a time."""
    tok = session.tokenizer
    answers = []
    with session.evaluating():
        for prompt in prompts:
            ids = prompt_ids(tok, prompt).to(session.device)
            with session.autocast():
                out = session.model.generate(
                    input_ids=ids,
                    attention_mask=torch.ones_like(ids),
                    max_new_tokens=max_new_tokens,
                    do_sample=False,
                    use_cache=True,
                    pad_token_id=tok.pad_token_id,
                    eos_token_id=tok.eos_token_id,
                )
            answers.append(tok.decode(out[0, ids.shape[1] :], skip_special_tokens=True).strip())
    return answers


@torch.no_grad()
def generation_bound(session, prompt_len: int, max_new_tokens: int) -> None:
    """What the planner traces for ``generate`` (fake tensors cannot run its value-reading loop): one pass
    filling the KV cache to the last position greedy decoding reaches (prompt + new tokens - 1), keeping the
    last position's logits, then one decoding step on that cache. The cache and the last step are what
    decoding holds at its end; the long first pass bounds the real prompt pass from above."""
    lm = session.causal_lm
    length = prompt_len + max_new_tokens - 1
    ids_1L = torch.zeros((1, length), dtype=torch.long, device=session.device)
    with session.evaluating(), session.autocast():
        out = lm(input_ids=ids_1L, attention_mask=torch.ones_like(ids_1L), use_cache=True, logits_to_keep=1)
        next_11 = out.logits[:, -1:].float().argmax(-1)
        mask_1L = torch.ones((1, length + 1), dtype=torch.long, device=session.device)
        cache = out.cache if getattr(out, "cache", None) is not None else out.past_key_values
        step = lm(input_ids=next_11, attention_mask=mask_1L, cache=cache, use_cache=True, logits_to_keep=1)
        del out, step


def saved_state(session) -> dict[str, torch.Tensor]:
    """The tensors the final save writes, gathered as ``save_pretrained`` gathers them: the model's state dict
    for a full fine-tune, the adapter's weights (the trainable parameters peft's adapter state dict holds)
    otherwise. The planner traces this; the file writing reads values. Not traced: the few hundred bytes per
    quantized layer bitsandbytes packs its quantization state into when peft walks the whole state dict.
    Sharded: the whole trained weights gathered into host memory (``fitune.distributed.save``)."""
    full = session.recipe.method.kind == "full"
    if session.ranks > 1:
        return gathered_state(session.causal_lm if full else session.model, full)
    if full:
        return {k: v.contiguous() for k, v in session.causal_lm.state_dict().items()}
    return {n: p.detach().contiguous() for n, p in session.trainable_parameters}


def save_result(session, out: Path) -> Path:
    """The final save: the adapter (peft ``save_pretrained``) or, for a full fine-tune, the whole model;
    gathered to rank 0 when the model is sharded."""
    if session.ranks > 1:
        return save_sharded_result(session, out)
    recipe = session.recipe
    if recipe.method.kind == "full":
        target = out / "model"
        session.causal_lm.save_pretrained(str(target), safe_serialization=True)
    else:
        target = out / "adapter"
        session.model.save_pretrained(str(target), safe_serialization=True)
    if session.tokenizer is not None:
        session.tokenizer.save_pretrained(str(target))
    return target
