"""The named values the rules' message and fix templates use, computed lazily from a ``DoctorContext``."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from fitune.preflight.readers import (
    LAYER_NAMES,
    MIN_EVAL_EXAMPLES,
    SMALL_DATA,
    capability,
    compute,
    config_int,
    eval_count,
    eval_fraction_for,
    examples,
    gib,
    gpu,
    half,
    head_dim,
    max_positions,
    model_type,
    narrowest,
    pretrained_dtype,
    settled_precision,
    softcap,
    target_split,
)

if TYPE_CHECKING:
    from fitune.preflight.context import DoctorContext


def _target_name(ctx: DoctorContext) -> str:
    if gpu(ctx) is not None:
        return gpu(ctx).display_name
    return ctx.env.device_name if ctx.env is not None else "the target device"


def _cc_text(ctx: DoctorContext) -> str:
    c = capability(ctx)
    return f"{c[0]}.{c[1]}" if c else "unknown"


def _embed_head_fp32(ctx: DoctorContext) -> str:
    vocab, hidden = config_int(ctx, "vocab_size"), config_int(ctx, "hidden_size", "n_embd")
    if not (vocab and hidden):
        return "twice the size of the half-precision copy"
    return gib(2 * vocab * hidden * 4) + f" for the {vocab} x {hidden} embedding and head"


def _names(targets: str | list[str]) -> str:
    return ", ".join(targets) if isinstance(targets, list) else targets


def _torch_build(ctx: DoctorContext) -> str:
    cuda = ctx.env.cuda_version if ctx.env else None
    return f"built for CUDA {cuda}" if cuda else "built without CUDA"


def _transformers_version() -> str:
    from importlib.metadata import version

    return version("transformers")


def _known_or(value: Any) -> str:
    return "unknown" if value is None else str(value)


FACTS: dict[str, Callable[[DoctorContext], Any]] = {
    "precision": lambda c: c.recipe.train.precision,
    "dtype": lambda c: c.recipe.model.dtype,
    "kind": lambda c: c.recipe.method.kind,
    "attention": lambda c: c.recipe.train.attention,
    "transformers": lambda c: _transformers_version(),
    "optimizer": lambda c: c.recipe.train.optimizer,
    "r": lambda c: c.recipe.method.r,
    "alpha": lambda c: f"{c.recipe.method.alpha:g}",
    "scale": lambda c: f"{c.recipe.method.alpha / c.recipe.method.r:g}",
    "alpha_2r": lambda c: 2 * c.recipe.method.r,
    "lr": lambda c: f"{c.recipe.train.lr:g}",
    "seq_len": lambda c: c.recipe.train.seq_len,
    "batch_size": lambda c: c.recipe.train.batch_size,
    "tokens": lambda c: c.recipe.train.seq_len * c.recipe.train.batch_size,
    "loss_chunk": lambda c: c.recipe.train.loss_chunk,
    "num_devices": lambda c: c.recipe.hardware.num_devices,
    "device": lambda c: c.recipe.hardware.device,
    "targets": lambda c: _names(c.recipe.method.targets),
    "known_targets": lambda c: ", ".join((target_split(c) or ([], []))[0]),
    "unknown_targets": lambda c: ", ".join((target_split(c) or ([], []))[1]),
    "layer_names": lambda c: ", ".join(LAYER_NAMES.get(model_type(c), ())) + ", lm_head",
    "eval_fraction": lambda c: f"{c.recipe.data.eval_fraction:g}" if c.recipe.data else "unset",
    "examples": lambda c: _known_or(examples(c)),
    "eval_examples": lambda c: eval_count(
        examples(c) or 0, c.recipe.data.eval_fraction if c.recipe.data else 0
    ),
    "min_eval": lambda c: MIN_EVAL_EXAMPLES,
    "eval_needed": lambda c: f"{eval_fraction_for(examples(c) or SMALL_DATA):g}",
    "target": _target_name,
    "cc": _cc_text,
    "env_device": lambda c: c.env.device_type if c.env else "unknown",
    "visible": lambda c: c.env.num_devices if c.env else "unknown",
    "cpu_isa": lambda c: _known_or(c.env.cpu_capability if c.env else None),
    "torch": lambda c: c.env.torch_version if c.env else "unknown",
    "cuda": lambda c: _known_or(c.env.cuda_version if c.env else None),
    "torch_build": _torch_build,
    "bnb": lambda c: _known_or(c.env.bitsandbytes_version if c.env else None),
    "flash_attn": lambda c: _known_or(c.env.flash_attn_version if c.env else None),
    "head_dim": lambda c: _known_or(head_dim(c)),
    "max_pos": lambda c: _known_or(max_positions(c)),
    "vocab": lambda c: _known_or(config_int(c, "vocab_size")),
    "width": lambda c: _known_or(narrowest(c)),
    "model_type": lambda c: model_type(c) or "unknown",
    "pretrained_dtype": lambda c: _known_or(pretrained_dtype(c)),
    "softcap": lambda c: f"{softcap(c):g}" if softcap(c) else "none",
    "compute": compute,
    "half": half,
    "settled": settled_precision,
    "embed_head_fp32": _embed_head_fp32,
    "peak": lambda c: gib(c.planned_peak_bytes),
    "free": lambda c: gib(c.env.free_memory_bytes if c.env else None),
    "headroom": lambda c: gib((c.env.free_memory_bytes - (c.planned_peak_bytes or 0)) if c.env else None),
    "margin_pct": lambda c: f"{c.margin:.0%}",
}


class Facts(dict):
    """Lazily computed facts for ``str.format_map``; an unknown name raises KeyError (a template typo)."""

    def __init__(self, ctx: DoctorContext):
        super().__init__()
        self.ctx = ctx

    def __missing__(self, key: str) -> Any:
        value = FACTS[key](self.ctx)
        self[key] = value
        return value
