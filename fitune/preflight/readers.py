"""What the rules read from a ``DoctorContext``: versions, the GPU, precision, model config and data."""

from __future__ import annotations

import functools
import math
import re
from typing import TYPE_CHECKING, Any

from fitune.preflight.rule import Changes

if TYPE_CHECKING:
    from fitune.preflight.context import DoctorContext


def version(text: str | None) -> tuple[int, ...] | None:
    """Leading numeric part of a version string: '2.5.1+cu121' -> (2, 5, 1); None when there is none."""
    match = re.match(r"\d+(?:\.\d+)*", text or "")
    return tuple(int(p) for p in match.group().split(".")) if match else None


def older(text: str | None, minimum: tuple[int, ...]) -> bool:
    """True only for a known version below ``minimum`` (an unknown version is not flagged)."""
    v = version(text)
    return v is not None and v < minimum


def on_cuda(ctx: DoctorContext) -> bool:
    return ctx.env is not None and ctx.env.device_type == "cuda"


def on_cpu(ctx: DoctorContext) -> bool:
    return ctx.env is not None and ctx.env.device_type == "cpu"


def gpu(ctx: DoctorContext):
    return ctx.env.gpu if on_cuda(ctx) else None


def capability(ctx: DoctorContext) -> tuple[int, int] | None:
    g = gpu(ctx)
    return tuple(g.compute_capability) if g is not None else None


def below(ctx: DoctorContext, cc: tuple[int, int]) -> bool:
    c = capability(ctx)
    return c is not None and c < cc


def at_least(ctx: DoctorContext, cc: tuple[int, int]) -> bool:
    c = capability(ctx)
    return c is not None and c >= cc


def slow_cpu_bf16(ctx: DoctorContext) -> bool:
    """The run is on an x86 CPU whose torch kernels stop short of AVX-512: bf16 matmuls there convert to
    fp32 and back, many times slower than fp32 ones (the rule ``bf16-on-cpu-without-avx512``)."""
    return on_cpu(ctx) and ctx.env.cpu_capability not in (None, "AVX512")


def real(ctx: DoctorContext) -> bool:
    """The environment was detected on this machine (not simulated from a catalog GPU)."""
    return ctx.env is not None and not ctx.env.simulated


def bf16_ok(ctx: DoctorContext) -> bool:
    if on_cuda(ctx):
        return gpu(ctx) is not None and gpu(ctx).bf16
    return True  # CPU autocast supports bf16; with no environment bf16 is the recipe default


def half(ctx: DoctorContext) -> str:
    """The half-precision type this target should compute in."""
    return "bf16" if bf16_ok(ctx) else "fp16"


COMPUTE = {"fp32": "fp32", "bf16": "bf16", "fp16": "fp16", "bf16-pure": "bf16"}


def compute(ctx: DoctorContext) -> str:
    return COMPUTE[ctx.recipe.train.precision]


def adapters(ctx: DoctorContext) -> bool:
    """LoRA or QLoRA: a frozen base stored in ``model.dtype`` (a full fine-tune keeps fp32 weights)."""
    return ctx.recipe.method.kind in ("lora", "qlora")


def qlora(ctx: DoctorContext) -> bool:
    return ctx.recipe.method.kind == "qlora"


def bnb_optimizer(ctx: DoctorContext) -> bool:
    return ctx.recipe.train.optimizer in ("adamw8bit", "paged_adamw8bit")


def needs_bnb(ctx: DoctorContext) -> bool:
    return qlora(ctx) or bnb_optimizer(ctx)


def sharded(ctx: DoctorContext) -> bool:
    return ctx.recipe.hardware.num_devices > 1


def fa2(ctx: DoctorContext) -> bool:
    return ctx.recipe.train.attention == "flash_attention_2"


def settled_precision(ctx: DoctorContext) -> str:
    """The precision every precision fix steers to, so that fixes applied together agree.

    fp16 on a CPU, or bf16 on an x86 CPU without AVX-512 -> fp32; a half type on a known GPU -> the GPU's
    half type (bf16 on Ampere+, else fp16); QLoRA in fp32 on a GPU -> its half type; bf16-pure without bf16
    support -> fp16; anything else stays.
    """
    precision = ctx.recipe.train.precision
    if precision == "fp16" and on_cpu(ctx):
        return "fp32"
    if precision in ("bf16", "bf16-pure") and slow_cpu_bf16(ctx):
        return "fp32"
    if gpu(ctx) is not None and (precision in ("fp16", "bf16") or (precision == "fp32" and qlora(ctx))):
        return half(ctx)
    if precision == "bf16-pure" and not bf16_ok(ctx):
        return "fp16"
    return precision


def settle(ctx: DoctorContext) -> Changes:
    """Move train.precision to the settled one, and a LoRA base stored in a half type (any type for
    QLoRA, whose fp32 leftovers waste memory) to the same half type."""
    target = settled_precision(ctx)
    changes: Changes = {"train.precision": target} if target != ctx.recipe.train.precision else {}
    dtype = ctx.recipe.model.dtype
    if adapters(ctx) and target in ("fp16", "bf16") and dtype != target and (dtype != "fp32" or qlora(ctx)):
        changes["model.dtype"] = target
    return changes


def storage_like_compute(ctx: DoctorContext) -> Changes:
    """``settle``, and base weights stored in the settled compute dtype."""
    changes = settle(ctx)
    changes.setdefault("model.dtype", COMPUTE[settled_precision(ctx)])
    return changes


def config(ctx: DoctorContext) -> dict[str, Any]:
    """The model's config.json (given, or the recipe's inline one); a multimodal text_config is merged in."""
    cfg = ctx.model_config if ctx.model_config is not None else ctx.recipe.model.config
    cfg = dict(cfg or {})
    text = cfg.get("text_config")
    return {**cfg, **text} if isinstance(text, dict) else cfg


def config_int(ctx: DoctorContext, *keys: str) -> int | None:
    cfg = config(ctx)
    for key in keys:
        value = cfg.get(key)
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return value
    return None


def model_type(ctx: DoctorContext) -> str:
    return str(config(ctx).get("model_type") or "")


def head_dim(ctx: DoctorContext) -> int | None:
    explicit = config_int(ctx, "head_dim")
    hidden, heads = config_int(ctx, "hidden_size", "n_embd"), config_int(ctx, "num_attention_heads", "n_head")
    return explicit or (hidden // heads if hidden and heads else None)


def max_positions(ctx: DoctorContext) -> int | None:
    return config_int(ctx, "max_position_embeddings", "n_positions")


def rope_scaled(ctx: DoctorContext) -> bool:
    """The config scales rotary positions (``rope_scaling``, or transformers 5's ``rope_parameters`` with a
    type other than the default)."""
    cfg = config(ctx)
    if cfg.get("rope_scaling"):
        return True
    params = cfg.get("rope_parameters")
    return isinstance(params, dict) and params.get("rope_type", "default") != "default"


def beyond_rotary_context(ctx: DoctorContext) -> bool:
    """seq_len past max_position_embeddings on a model with rotary (not learned) positions."""
    return (
        model_type(ctx) not in LEARNED_POSITIONS
        and max_positions(ctx) is not None
        and ctx.recipe.train.seq_len > max_positions(ctx)
    )


def narrowest(ctx: DoctorContext) -> int | None:
    """Smallest input/output width among the attention projections (k/v are narrow under GQA)."""
    hidden, dim = config_int(ctx, "hidden_size", "n_embd"), head_dim(ctx)
    kv_heads = config_int(ctx, "num_key_value_heads")
    widths = [w for w in (hidden, kv_heads * dim if kv_heads and dim else None) if w]
    return min(widths) if widths else None


def softcap(ctx: DoctorContext) -> float | None:
    """Attention-logit soft-capping of the model (Gemma 2 defaults to 50; Gemma 3 has none)."""
    from fitune.techniques.attention import softcap as of_config

    return of_config(config(ctx))


def sdpa_missing(ctx: DoctorContext) -> bool:
    """train.attention asks for SDPA, and transformers has no SDPA path for the architecture."""
    from fitune.techniques.attention import has_sdpa

    return ctx.recipe.train.attention == "sdpa" and bool(model_type(ctx)) and has_sdpa(config(ctx)) is False


def pretrained_dtype(ctx: DoctorContext) -> str | None:
    cfg = config(ctx)
    value = cfg.get("torch_dtype") or cfg.get("dtype")
    return str(value).removeprefix("torch.") if value else None


_LLAMA_LIKE = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "embed_tokens")
_NEOX_LIKE = ("query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h", "word_embeddings", "embed_in")
# Leaf names of the layers LoRA can adapt, per model_type (peft matches a target against the name's end).
LAYER_NAMES: dict[str, tuple[str, ...]] = {
    **dict.fromkeys(
        (
            "llama",
            "mistral",
            "qwen2",
            "qwen3",
            "gemma",
            "gemma2",
            "gemma3",
            "gemma3_text",
            "olmo2",
            "granite",
        ),
        _LLAMA_LIKE,
    ),
    "phi3": ("qkv_proj", "o_proj", "gate_up_proj", "down_proj", "embed_tokens"),
    "phi": ("q_proj", "k_proj", "v_proj", "dense", "fc1", "fc2", "embed_tokens"),
    "gpt2": ("c_attn", "c_proj", "c_fc", "wte"),
    "gpt_neox": _NEOX_LIKE,
    "falcon": _NEOX_LIKE,
}
_REGEX_CHARS = set("*?[]()|^$\\+{}")


def target_split(ctx: DoctorContext) -> tuple[list[str], list[str]] | None:
    """(known, unknown) entries of a target list, for architectures whose layer names are known."""
    targets = ctx.recipe.method.targets
    names = LAYER_NAMES.get(model_type(ctx))
    if not adapters(ctx) or not isinstance(targets, list) or not targets or names is None:
        return None
    if any(_REGEX_CHARS & set(t) for t in targets):
        return None
    allowed = (*names, "lm_head")
    known = [t for t in targets if t.rsplit(".", 1)[-1] in allowed]
    return known, [t for t in targets if t not in known]


@functools.lru_cache(maxsize=32)
def _count_lines(path: str, size: int, mtime_ns: int) -> int:
    with open(path, "rb") as handle:
        return sum(1 for line in handle if line.strip())


def examples(ctx: DoctorContext) -> int | None:
    """Usable examples (from the data check), else non-blank lines of the data file; None if unreadable."""
    data = ctx.recipe.data
    if data is None:
        return None
    if ctx.data_examples is not None:
        return ctx.data_examples
    if data.path is None:  # a hub dataset: counted by the data check only
        return None
    path = ctx.recipe.resolve_path(data.path)
    try:
        stat = path.stat()
        return _count_lines(str(path), stat.st_size, stat.st_mtime_ns) if path.is_file() else None
    except OSError:
        return None


def eval_count(n: int, fraction: float) -> int:
    """Held-out examples the dataset split takes (fitune/data/dataset.py: rounded, at least one)."""
    count = int(round(n * fraction))
    return max(1, count) if fraction > 0 and n >= 2 else count


MIN_EVAL_EXAMPLES = 5
SMALL_DATA = 1000


def eval_fraction_for(n: int) -> float:
    """The smallest share (in hundredths, at least 0.1) that holds out MIN_EVAL_EXAMPLES of n examples."""
    return min(0.5, max(0.1, math.ceil(100 * MIN_EVAL_EXAMPLES / n) / 100))


def gib(n: int | float | None) -> str:
    return "unknown" if n is None else f"{n / 2**30:.2f} GiB"


# Models whose positions are a learned table: a longer sequence indexes past its end.
LEARNED_POSITIONS = ("gpt2", "opt", "gpt_bigcode", "biogpt")
FA2_FULL_BACKWARD_CC = ((8, 0), (9, 0))  # A100/A800, H100/H800: the only parts with the large-head backward
