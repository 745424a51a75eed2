"""The doctor's rules: known failures of LLM fine-tuning, each as data plus one small predicate.

A rule is caught before launch from what a ``DoctorContext`` holds: the recipe, the environment, the
model's ``config.json`` when known and the planned peak memory. Each one names the public reports it was
distilled from (shared/error-catalog.md), says in plain words what would fail and why, and gives the recipe
change that avoids it when exactly one exists. Message and fix texts are templates filled from ``facts``.

To add a rule: append a ``Rule`` to ``RULES`` and a trigger/clear case to ``tests/test_doctor.py``.
"""

from __future__ import annotations

import functools
import math
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

if TYPE_CHECKING:
    from fitune.preflight.context import DoctorContext

Severity = Literal["error", "warning"]
Changes = dict[str, Any]


@dataclass(frozen=True)
class Rule:
    id: str  # kebab-case, stable: users silence and search by it
    severity: Severity  # error: training refuses to start unless --force
    title: str  # one line for `fitune doctor --list`
    applies: Callable[[DoctorContext], bool]
    message: str  # template over `facts`: what would fail, why, and the offending value
    fix: Changes | Callable[[DoctorContext], Changes | None] | None  # dotted recipe keys -> value
    fix_text: str  # template: the fix in words (also when `fix` is None)
    source: tuple[str, ...]  # public issue URLs

    def fix_for(self, ctx: DoctorContext) -> Changes | None:
        changes = self.fix(ctx) if callable(self.fix) else self.fix
        return dict(changes) if changes else None


def gh(*refs: str) -> tuple[str, ...]:
    """'owner/repo#123' -> its GitHub URL (GitHub redirects /issues/N to /pull/N for pull requests)."""
    urls = []
    for ref in refs:
        repo, number = ref.split("#")
        urls.append(f"https://github.com/{repo}/issues/{number}")
    return tuple(urls)


# --- reading the context ----------------------------------------------------------------------------------


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

    fp16 on a CPU -> fp32; a half type on a known GPU -> the GPU's half type (bf16 on Ampere+, else fp16);
    QLoRA in fp32 on a GPU -> its half type; bf16-pure without bf16 support -> fp16; anything else stays.
    """
    precision = ctx.recipe.train.precision
    if precision == "fp16" and on_cpu(ctx):
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


# --- facts: the named values message templates use ----------------------------------------------------------


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


# --- sources (shared/error-catalog.md entries, plus a few public threads for recipe sanity rules) -----------

A1_FA2_PRE_AMPERE = gh(
    "Dao-AILab/flash-attention#762",
    "Dao-AILab/flash-attention#579",
    "microsoft/MInference#51",
    "modelscope/ms-swift#1603",
)
A2_FA_HEAD_DIM = gh(
    "Dao-AILab/flash-attention#276", "Dao-AILab/flash-attention#328", "hiyouga/LlamaFactory#371"
)
A3_BF16_PRE_AMPERE = gh(
    "tatsu-lab/stanford_alpaca#133", "lm-sys/FastChat#399", "lm-sys/FastChat#1191", "OptimalScale/LMFlow#251"
)
A6_HALF_ON_CPU = gh("yandex-research/DeDLOC#3", "huggingface/transformers#27769", "hiyouga/LlamaFactory#875")
B1_BNB_CUDA = gh(
    "bitsandbytes-foundation/bitsandbytes#156",
    "bitsandbytes-foundation/bitsandbytes#492",
    "bitsandbytes-foundation/bitsandbytes#940",
)
B4_FA2_MISSING = gh("hiyouga/EasyR1#384", "kijai/ComfyUI-Florence2#17")
C1_FA2_FP32 = gh(
    "huggingface/transformers#28052",
    "huggingface/transformers#26066",
    "Dao-AILab/flash-attention#622",
    "QwenLM/Qwen3#406",
)
C2_FA2_OFF_GPU = gh("NousResearch/finetuning-subnet#13", "multimodal-art-projection/YuE#75")
NO_SDPA_PATH = gh(
    "md-mohaiminul/VideoRecap#14", "chflame163/ComfyUI_OmniGen_Wrapper#11", "huggingface/transformers#34282"
)
C4_SOFTCAP = gh(
    "huggingface/transformers#32865", "huggingface/transformers#32309", "hiyouga/LlamaFactory#7387"
)
D1_GC_INPUT_GRADS = gh(
    "huggingface/peft#137", "huggingface/transformers#26377", "locuslab/open-unlearning#178"
)
E2_FP16_OVERFLOW = gh(
    "huggingface/transformers#25065",
    "huggingface/transformers#27212",
    "arielnlee/Platypus#14",
    "huggingface/trl#1173",
)
E4_DTYPE_MIX = gh("huggingface/peft#1515", "tloen/alpaca-lora#203", "hiyouga/LlamaFactory#1303")
E5_HIGH_LR = gh("deepspeedai/DeepSpeedExamples#418", "hiyouga/LlamaFactory#315")
E6_BNB_FP32_COMPUTE = gh("h2oai/h2ogpt#682", "bitsandbytes-foundation/bitsandbytes#2077")
F7_NO_TRAINABLE = gh("huggingface/peft#282", "tloen/alpaca-lora#299", "unslothai/unsloth#241")
F8_TARGETS = gh("hiyouga/LlamaFactory#181", "hiyouga/LlamaFactory#1785", "OptimalScale/LMFlow#125")
F9_KBIT_UPCAST = gh(
    "huggingface/peft#1149", "bitsandbytes-foundation/bitsandbytes#1569", "unslothai/unsloth#633"
)
G1_FSDP_QLORA = gh(
    "huggingface/peft#1432",
    "bitsandbytes-foundation/bitsandbytes#1232",
    "MakazhanAlpamys/Soup#350",
    "axolotl-ai-cloud/axolotl#1482",
)
G6_FSDP_8BIT = gh("oumi-ai/oumi#835", "hiyouga/LlamaFactory#5619", "huggingface/accelerate#1362")
I1_BNB_CPU = gh(
    "bitsandbytes-foundation/bitsandbytes#1226",
    "bitsandbytes-foundation/bitsandbytes#1402",
    "bitsandbytes-foundation/bitsandbytes#1901",
)
FSDP2_PUBLIC = gh("pytorch/pytorch#141868")
BLACKWELL = gh("pytorch/pytorch#150733", "HybridRobotics/berkeley-humanoid-lite#49")
DEVICE_ORDINAL = gh("HRNet/HRNet-Semantic-Segmentation#171", "yunqing-me/WatermarkDM#8")
LORA_SCALE = gh("microsoft/LoRA#101", "unslothai/unsloth#1304", "QwenLM/Qwen#785")
LORA_RANK = gh("huggingface/diffusers#4593")
POSITIONS = gh("huggingface/transformers#1726", "Pan-ML/panml#59")
ROPE_CONTEXT = gh("unslothai/unsloth#406", "unslothai/unsloth#25")
CHUNKED_LOSS = gh("huggingface/trl#5575", "meta-pytorch/torchtune#1390", "huggingface/transformers#15466")
EVAL_SPLIT = gh("ml-explore/mlx-examples#236", "huggingface/transformers#22934")

# Models whose positions are a learned table: a longer sequence indexes past its end.
LEARNED_POSITIONS = ("gpt2", "opt", "gpt_bigcode", "biogpt")
FA2_FULL_BACKWARD_CC = ((8, 0), (9, 0))  # A100/A800, H100/H800: the only parts with the large-head backward

# --- the rules -------------------------------------------------------------------------------------------------

RULES: list[Rule] = [
    # GPU generation
    Rule(
        id="bf16-on-pre-ampere",
        severity="error",
        title="bf16 compute on a GPU older than Ampere",
        applies=lambda c: compute(c) == "bf16" and below(c, (8, 0)),
        message="train.precision is {precision}, but {target} (compute capability {cc}) has no bf16 units; "
        "bf16 training needs compute capability 8.0 (Ampere) or newer",
        fix={"train.precision": "fp16"},
        fix_text="set train.precision: fp16 (autocast with fp32 trainable weights), or fp32 if fp16 overflows",
        source=A3_BF16_PRE_AMPERE,
    ),
    Rule(
        id="bf16-weights-on-pre-ampere",
        severity="warning",
        title="bf16 base weights on a GPU older than Ampere",
        applies=lambda c: adapters(c) and c.recipe.model.dtype == "bf16" and below(c, (8, 0)),
        message="model.dtype is bf16, so the frozen base is stored in bf16 on {target} (compute capability "
        "{cc}), which has no native bf16 math: its matmuls run emulated or get re-cast every step",
        fix={"model.dtype": "fp16"},
        fix_text="set model.dtype: fp16 to match fp16 compute on this GPU",
        source=A3_BF16_PRE_AMPERE,
    ),
    Rule(
        id="fa2-on-pre-ampere",
        severity="error",
        title="FlashAttention-2 on a GPU older than Ampere",
        applies=lambda c: fa2(c) and below(c, (8, 0)),
        message="train.attention is flash_attention_2, but FlashAttention-2 ships kernels only for compute "
        "capability 8.0 and newer; {target} is {cc}, so the first forward pass would fail",
        fix={"train.attention": "sdpa"},
        fix_text="set train.attention: sdpa (PyTorch's fused attention runs on every GPU)",
        source=A1_FA2_PRE_AMPERE,
    ),
    Rule(
        id="fa2-large-head-backward",
        severity="warning",
        title="FlashAttention-2 backward with head_dim > 192 off A100/H100",
        applies=lambda c: (
            fa2(c)
            and (head_dim(c) or 0) > 192
            and at_least(c, (8, 0))
            and capability(c) not in FA2_FULL_BACKWARD_CC
        ),
        message="head_dim is {head_dim}; the FlashAttention-2 backward kernel for heads over 192 needs the "
        "shared memory of an A100/H100-class GPU (8.0 or 9.0), and {target} is {cc}, so training (not "
        "inference) can fail in the first backward pass with flash-attn {flash_attn}",
        fix={"train.attention": "sdpa"},
        fix_text="set train.attention: sdpa, or check that your flash-attn release lifted this limit",
        source=A2_FA_HEAD_DIM,
    ),
    Rule(
        id="fa2-without-cuda",
        severity="error",
        title="FlashAttention-2 requested on a non-CUDA device",
        applies=lambda c: fa2(c) and c.env is not None and not on_cuda(c),
        message="train.attention is flash_attention_2, but the run uses {env_device}; FlashAttention-2 is "
        "a CUDA kernel library and cannot run there",
        fix={"train.attention": "sdpa"},
        fix_text="set train.attention: sdpa",
        source=C2_FA2_OFF_GPU + A1_FA2_PRE_AMPERE[1:2],
    ),
    Rule(
        id="fa2-not-installed",
        severity="error",
        title="FlashAttention-2 requested but flash-attn is not importable",
        applies=lambda c: fa2(c) and on_cuda(c) and not below(c, (8, 0)) and c.env.flash_attn_version is None,
        message="train.attention is flash_attention_2, but the flash_attn package is not installed (or "
        "fails to import) next to torch {torch}; transformers refuses to build the model without it",
        fix={"train.attention": "sdpa"},
        fix_text="set train.attention: sdpa, or `pip install flash-attn --no-build-isolation` built for "
        "this torch and CUDA",
        source=B4_FA2_MISSING,
    ),
    Rule(
        id="flash-attn-1x",
        severity="error",
        title="flash-attn 1.x installed where FlashAttention-2 is requested",
        applies=lambda c: fa2(c) and on_cuda(c) and older(c.env.flash_attn_version, (2,)),
        message="train.attention is flash_attention_2, but the installed flash-attn is {flash_attn}; "
        "transformers needs a 2.x release, and 1.x lacks the backward kernels for heads above 64 outside "
        "A100/H100",
        fix={"train.attention": "sdpa"},
        fix_text="set train.attention: sdpa, or install flash-attn 2.x",
        source=A2_FA_HEAD_DIM + B4_FA2_MISSING[:1],
    ),
    Rule(
        id="fa2-fp32-compute",
        severity="error",
        title="FlashAttention-2 with fp32 compute",
        applies=lambda c: fa2(c) and c.recipe.train.precision == "fp32",
        message="train.precision is fp32, so no autocast runs and the attention inputs reach "
        "FlashAttention-2 in fp32, a dtype it has no kernels for (only fp16 and bf16)",
        fix={"train.attention": "sdpa"},
        fix_text="set train.attention: sdpa, or train.precision: {half} to keep FlashAttention-2",
        source=C1_FA2_FP32,
    ),
    Rule(
        id="sdpa-not-in-architecture",
        severity="error",
        title="SDPA asked of an architecture transformers has no SDPA path for",
        applies=sdpa_missing,
        message="train.attention is sdpa, but transformers {transformers} has no SDPA attention for "
        "{model_type}, so the model cannot be built with it",
        fix={"train.attention": "auto"},
        fix_text="set train.attention: auto (fitune picks a kernel this model has) or eager",
        source=NO_SDPA_PATH,
    ),
    Rule(
        id="softcap-model-with-sdpa",
        severity="warning",
        title="Gemma-2-style attention soft-capping under SDPA",
        applies=lambda c: (
            softcap(c) is not None and c.recipe.train.attention == "sdpa" and not sdpa_missing(c)
        ),
        message="this {model_type} model caps attention logits (attn_logit_softcapping {softcap}), which "
        "SDPA cannot express: training with sdpa silently computes a different attention and loses quality",
        fix={"train.attention": "eager"},
        fix_text="set train.attention: eager (more memory), or flash_attention_2 with flash-attn >= 2.6.3 "
        "on Ampere+",
        source=C4_SOFTCAP,
    ),
    Rule(
        id="softcap-model-old-flash-attn",
        severity="warning",
        title="Attention soft-capping with a flash-attn older than 2.6.3",
        applies=lambda c: (
            softcap(c) is not None and fa2(c) and on_cuda(c) and older(c.env.flash_attn_version, (2, 6, 3))
        ),
        message="this {model_type} model caps attention logits (attn_logit_softcapping {softcap}), and "
        "flash-attn {flash_attn} predates soft-capping support (2.6.3), so attention would be computed "
        "without the cap",
        fix={"train.attention": "eager"},
        fix_text="set train.attention: eager, or upgrade flash-attn to 2.6.3 or newer",
        source=C4_SOFTCAP,
    ),
    Rule(
        id="blackwell-needs-cuda-12-8",
        severity="error",
        title="Blackwell GPU with a torch built for CUDA < 12.8",
        applies=lambda c: real(c) and at_least(c, (10, 0)) and older(c.env.cuda_version, (12, 8)),
        message="{target} has compute capability {cc}, but torch {torch} was built for CUDA {cuda}; "
        "kernels for this generation exist only in CUDA 12.8+ builds, so the first CUDA op would fail "
        "with 'no kernel image is available'",
        fix=None,
        fix_text="install a torch wheel built for CUDA 12.8 or newer (the cu128 index), then reinstall "
        "flash-attn and bitsandbytes for it",
        source=BLACKWELL,
    ),
    # device and precision
    Rule(
        id="fp16-on-cpu",
        severity="error",
        title="fp16 autocast on CPU",
        applies=lambda c: c.recipe.train.precision == "fp16" and on_cpu(c),
        message="train.precision is fp16, but the run is on the CPU: fp16 mixed precision is a CUDA "
        "feature, and many CPU kernels have no fp16 implementation",
        fix={"train.precision": "fp32"},
        fix_text="set train.precision: fp32 (or bf16 on a CPU with bf16 support)",
        source=A6_HALF_ON_CPU,
    ),
    Rule(
        id="fp16-weights-on-cpu",
        severity="warning",
        title="fp16 base weights on CPU",
        applies=lambda c: adapters(c) and c.recipe.model.dtype == "fp16" and on_cpu(c),
        message="model.dtype is fp16 and the run is on the CPU, where fp16 matmuls are slow or missing "
        "('not implemented for Half')",
        fix=lambda c: {"model.dtype": "bf16" if settled_precision(c) == "bf16" else "fp32"},
        fix_text="set model.dtype: fp32, or bf16 when training in bf16",
        source=A6_HALF_ON_CPU,
    ),
    Rule(
        id="cuda-requested-without-gpu",
        severity="error",
        title="CUDA device requested on a machine where torch sees none",
        applies=lambda c: (
            re.fullmatch(r"cuda(:\d+)?", c.recipe.hardware.device) is not None
            and c.env is not None
            and not on_cuda(c)
        ),
        message="hardware.device is {device}, but torch {torch} ({torch_build}) sees no CUDA device here: "
        "a CPU-only torch build, a machine or runtime without a GPU, or a driver that failed to load",
        fix=None,
        fix_text="install a CUDA build of torch and check `nvidia-smi`; or set hardware.device: cpu to train "
        "here, or a catalog GPU name (t4, a100-80gb) to plan only",
        source=A6_HALF_ON_CPU[:1] + gh("gensyn-ai/rl-swarm#252"),
    ),
    Rule(
        id="more-devices-than-visible",
        severity="error",
        title="hardware.num_devices exceeds the GPUs this machine has",
        applies=lambda c: real(c) and on_cuda(c) and c.recipe.hardware.num_devices > c.env.num_devices,
        message="hardware.num_devices is {num_devices}, but only {visible} CUDA device(s) are visible; the "
        "extra ranks would fail with 'invalid device ordinal'",
        fix=lambda c: {"hardware.num_devices": c.env.num_devices},
        fix_text="set hardware.num_devices: {visible} (or check CUDA_VISIBLE_DEVICES)",
        source=DEVICE_ORDINAL,
    ),
    Rule(
        id="fp16-where-bf16-works",
        severity="warning",
        title="fp16 chosen on a GPU that supports bf16",
        applies=lambda c: c.recipe.train.precision == "fp16" and gpu(c) is not None and gpu(c).bf16,
        message="train.precision is fp16 on {target}, which supports bf16; fp16's narrow range (max about "
        "65504) lets activations overflow into NaN or a zero loss, which bf16 avoids at the same memory",
        fix=settle,
        fix_text="set train.precision: bf16 (and model.dtype: bf16 for a LoRA base stored in fp16)",
        source=E2_FP16_OVERFLOW,
    ),
    Rule(
        id="fp16-on-bf16-pretrained-model",
        severity="warning",
        title="fp16 training of a model pretrained in bf16",
        applies=lambda c: (
            c.recipe.train.precision == "fp16"
            and pretrained_dtype(c) == "bfloat16"
            and not on_cpu(c)
            and not (gpu(c) is not None and gpu(c).bf16)
        ),
        message="the model was trained in bfloat16 (config dtype {pretrained_dtype}) and train.precision "
        "is fp16: its activations can exceed fp16's range, giving NaN or zero losses, often only after "
        "some steps",
        fix=None,
        fix_text="keep fp16 but lower train.lr and watch the first steps for NaN; use train.precision: "
        "fp32 if it overflows, or a GPU with bf16",
        source=E2_FP16_OVERFLOW,
    ),
    Rule(
        id="precision-weights-mismatch",
        severity="warning",
        title="Base weights in one half type, compute in the other",
        applies=lambda c: (
            adapters(c)
            and c.recipe.train.precision in ("fp16", "bf16")
            and c.recipe.model.dtype in ("fp16", "bf16")
            and c.recipe.model.dtype != c.recipe.train.precision
        ),
        message="model.dtype is {dtype} but train.precision is {precision}: every matmul re-casts the "
        "frozen weights, and code outside autocast (eval, sampling) meets mixed half types",
        fix=settle,
        fix_text="use one type for both: model.dtype and train.precision: {settled}",
        source=E4_DTYPE_MIX,
    ),
    # bitsandbytes
    Rule(
        id="bitsandbytes-missing",
        severity="error",
        title="QLoRA or an 8-bit optimizer without bitsandbytes",
        applies=lambda c: needs_bnb(c) and c.env is not None and c.env.bitsandbytes_version is None,
        message="method.kind {kind} with optimizer {optimizer} needs bitsandbytes (NF4 weights or 8-bit "
        "optimizer states), and it is not installed",
        fix=None,
        fix_text="`pip install 'bitsandbytes>=0.48'`; or use method.kind: lora and train.optimizer: adamw",
        source=B1_BNB_CUDA,
    ),
    Rule(
        id="bitsandbytes-without-cuda",
        severity="error",
        title="bitsandbytes loaded without its CUDA library",
        applies=lambda c: (
            needs_bnb(c)
            and on_cuda(c)
            and c.env.bitsandbytes_version is not None
            and not c.env.bitsandbytes_cuda
        ),
        message="bitsandbytes {bnb} is installed but did not load its CUDA kernels (it fell back to the CPU "
        "library), so NF4 quantization and 8-bit optimizer steps on {target} would fail",
        fix=None,
        fix_text="reinstall bitsandbytes for this CUDA ({cuda}) and run `python -m bitsandbytes` to see "
        "why its CUDA library does not load",
        source=B1_BNB_CUDA,
    ),
    Rule(
        id="bitsandbytes-too-old",
        severity="error",
        title="bitsandbytes older than fitune supports",
        applies=lambda c: needs_bnb(c) and c.env is not None and older(c.env.bitsandbytes_version, (0, 48)),
        message="bitsandbytes {bnb} is older than 0.48, the oldest fitune supports for NF4 and 8-bit "
        "optimizers; old releases miss CUDA builds, CPU kernels and the float quant storage FSDP needs",
        fix=None,
        fix_text="`pip install -U 'bitsandbytes>=0.48'`",
        source=B1_BNB_CUDA[1:2] + G1_FSDP_QLORA[:2],
    ),
    Rule(
        id="8bit-optimizer-on-cpu-old-bitsandbytes",
        severity="error",
        title="8-bit optimizer on CPU with bitsandbytes < 0.50",
        applies=lambda c: bnb_optimizer(c) and on_cpu(c) and older(c.env.bitsandbytes_version, (0, 50)),
        message="train.optimizer is {optimizer} on the CPU, but bitsandbytes {bnb} runs its optimizers on "
        "CUDA only; CPU optimizer kernels arrived in 0.50.0",
        fix={"train.optimizer": "adamw"},
        fix_text="set train.optimizer: adamw, or upgrade to bitsandbytes >= 0.50",
        source=I1_BNB_CPU,
    ),
    Rule(
        id="paged-optimizer-without-cuda",
        severity="warning",
        title="Paged optimizer on a device without CUDA unified memory",
        applies=lambda c: (
            c.recipe.train.optimizer == "paged_adamw8bit" and c.env is not None and not on_cuda(c)
        ),
        message="train.optimizer is paged_adamw8bit on {env_device}; paging moves optimizer state through "
        "CUDA unified memory, which this device lacks, so bitsandbytes falls back to the unpaged optimizer",
        fix={"train.optimizer": "adamw8bit"},
        fix_text="set train.optimizer: adamw8bit (the same 8-bit state, without paging)",
        source=I1_BNB_CPU + gh("bitsandbytes-foundation/bitsandbytes#782"),
    ),
    Rule(
        id="qlora-fp32-compute",
        severity="warning",
        title="QLoRA computing in fp32",
        applies=lambda c: qlora(c) and c.recipe.train.precision == "fp32" and gpu(c) is not None,
        message="method.kind is qlora with train.precision fp32, so the NF4 layers dequantize to fp32 and "
        "miss the fast half-precision kernels: steps run several times slower",
        fix=settle,
        fix_text="set train.precision: {settled}, with model.dtype to match",
        source=E6_BNB_FP32_COMPUTE,
    ),
    Rule(
        id="qlora-fp32-weights",
        severity="warning",
        title="QLoRA keeping its unquantized weights in fp32",
        applies=lambda c: (
            qlora(c) and c.recipe.model.dtype == "fp32" and settled_precision(c) in ("fp16", "bf16")
        ),
        message="method.kind is qlora with model.dtype fp32: the layers NF4 leaves alone (embeddings, norms, "
        "head) stay in fp32, {embed_head_fp32}, eating much of what 4-bit saved",
        fix=settle,
        fix_text="set model.dtype: {settled}, the compute dtype",
        source=F9_KBIT_UPCAST + E6_BNB_FP32_COMPUTE[:1],
    ),
    # sharding (FSDP2 over hardware.num_devices)
    Rule(
        id="fsdp-torch-too-old",
        severity="error",
        title="torch without public FSDP2 for a multi-device run",
        applies=lambda c: sharded(c) and c.env is not None and older(c.env.torch_version, (2, 6)),
        message="hardware.num_devices is {num_devices}, which shards with FSDP2 (fully_shard), public in "
        "torch.distributed.fsdp only since torch 2.6; this is torch {torch}",
        fix=None,
        fix_text="upgrade torch to 2.6 or newer, or set hardware.num_devices: 1",
        source=FSDP2_PUBLIC,
    ),
    Rule(
        id="fsdp-8bit-optimizer",
        severity="error",
        title="8-bit or paged optimizer under FSDP",
        applies=lambda c: sharded(c) and bnb_optimizer(c),
        message="train.optimizer is {optimizer} with hardware.num_devices {num_devices}: FSDP cannot shard "
        "or gather the quantized optimizer state, so the step or the first checkpoint save fails",
        fix={"train.optimizer": "adamw"},
        fix_text="set train.optimizer: adamw (FSDP already spreads its state over the devices)",
        source=G6_FSDP_8BIT,
    ),
    Rule(
        id="qlora-fsdp-storage-dtype",
        severity="error",
        title="QLoRA under FSDP with weights and compute in different dtypes",
        applies=lambda c: (
            qlora(c)
            and sharded(c)
            and c.recipe.train.precision != "bf16-pure"
            and c.recipe.model.dtype != COMPUTE[settled_precision(c)]
        ),
        message="QLoRA on {num_devices} devices shards the 4-bit weights with FSDP, which needs their "
        "storage to be one float dtype shared by every weight in a unit; model.dtype {dtype} differs from "
        "the compute dtype {compute}, so units would mix dtypes and fail to flatten",
        fix=storage_like_compute,
        fix_text="store and compute in one type: model.dtype and train.precision {settled}",
        source=G1_FSDP_QLORA,
    ),
    # LoRA settings
    Rule(
        id="lora-empty-targets",
        severity="error",
        title="LoRA with an empty target list",
        applies=lambda c: adapters(c) and c.recipe.method.targets == [],
        message="method.targets is an empty list, so no adapter is attached: nothing is trainable, and a "
        "quantized base cannot be fine-tuned without adapters",
        fix={"method.targets": "all-linear"},
        fix_text="set method.targets: all-linear, or list layer names",
        source=F7_NO_TRAINABLE,
    ),
    Rule(
        id="lora-targets-not-found",
        severity="error",
        title="No LoRA target names a layer of this architecture",
        applies=lambda c: (split := target_split(c)) is not None and not split[0],
        message="method.targets {targets} name no layer of a {model_type} model, whose adaptable layers are "
        "{layer_names}; peft would stop with 'Target modules not found'",
        fix={"method.targets": "all-linear"},
        fix_text="set method.targets: all-linear, or pick from: {layer_names}",
        source=F8_TARGETS,
    ),
    Rule(
        id="lora-targets-partly-unknown",
        severity="warning",
        title="Some LoRA targets name no layer of this architecture",
        applies=lambda c: (split := target_split(c)) is not None and bool(split[0]) and bool(split[1]),
        message="the method.targets entries {unknown_targets} match no layer of a {model_type} model; peft "
        "ignores them without a word and adapts only {known_targets}",
        fix=lambda c: {"method.targets": target_split(c)[0]},
        fix_text="drop {unknown_targets}, or replace with names from: {layer_names}",
        source=F8_TARGETS,
    ),
    Rule(
        id="lora-scale-tiny",
        severity="warning",
        title="LoRA alpha / r far below 1",
        applies=lambda c: adapters(c) and c.recipe.method.alpha / c.recipe.method.r < 0.25,
        message="method.alpha {alpha} over method.r {r} scales the adapter output by {scale}, so updates "
        "barely move the model at this learning rate",
        fix=lambda c: {"method.alpha": 2 * c.recipe.method.r},
        fix_text="set method.alpha to 2 x r ({r} -> alpha {alpha_2r}), the usual choice",
        source=LORA_SCALE,
    ),
    Rule(
        id="lora-scale-huge",
        severity="warning",
        title="LoRA alpha / r far above 1",
        applies=lambda c: adapters(c) and c.recipe.method.alpha / c.recipe.method.r > 8,
        message="method.alpha {alpha} over method.r {r} multiplies the adapter output by {scale}, which acts "
        "like a much higher learning rate: loss spikes, divergence or fast overfitting",
        fix=lambda c: {"method.alpha": 2 * c.recipe.method.r},
        fix_text="set method.alpha to 2 x r ({r} -> alpha {alpha_2r}), the usual choice",
        source=LORA_SCALE,
    ),
    Rule(
        id="lora-rank-exceeds-width",
        severity="warning",
        title="LoRA rank not below the width of the layers it adapts",
        applies=lambda c: adapters(c) and narrowest(c) is not None and c.recipe.method.r >= narrowest(c),
        message="method.r {r} is at least {width}, the narrowest side of this model's attention "
        "projections: the adapter is no longer low-rank and has more weights than the layer it adapts",
        fix=None,
        fix_text="use a rank well below {width} (8 to 64 is typical), or method.kind: full",
        source=LORA_RANK,
    ),
    # optimisation
    Rule(
        id="lr-high-for-full-finetune",
        severity="warning",
        title="Learning rate too high for a full fine-tune",
        applies=lambda c: c.recipe.method.kind == "full" and c.recipe.train.lr > 1e-4,
        message="train.lr {lr} with method.kind full: updating every weight at a LoRA-sized learning rate "
        "tends to overflow in half precision and to erase what the model knew",
        fix={"train.lr": 2e-5},
        fix_text="set train.lr: 2.0e-5 (full fine-tunes typically use 1e-5 to 5e-5)",
        source=E5_HIGH_LR + E2_FP16_OVERFLOW[:1],
    ),
    Rule(
        id="lr-high-for-lora",
        severity="warning",
        title="Learning rate too high for LoRA",
        applies=lambda c: adapters(c) and c.recipe.train.lr > 1e-3,
        message="train.lr {lr} with method.kind {kind}: above 1e-3 adapters tend to diverge or overfit "
        "within a few steps",
        fix={"train.lr": 2e-4},
        fix_text="set train.lr: 2.0e-4",
        source=LORA_SCALE[2:] + E5_HIGH_LR,
    ),
    # sequence and loss
    Rule(
        id="seq-len-beyond-learned-positions",
        severity="error",
        title="seq_len beyond a learned position table",
        applies=lambda c: (
            model_type(c) in LEARNED_POSITIONS
            and max_positions(c) is not None
            and c.recipe.train.seq_len > max_positions(c)
        ),
        message="train.seq_len {seq_len} exceeds the {max_pos} positions this {model_type} model has "
        "embeddings for; longer examples index past the table and crash",
        fix=lambda c: {"train.seq_len": max(8, max_positions(c))},
        fix_text="set train.seq_len: {max_pos}",
        source=POSITIONS,
    ),
    Rule(
        id="seq-len-beyond-max-positions",
        severity="error",
        title="seq_len beyond max_position_embeddings without rope scaling",
        applies=lambda c: beyond_rotary_context(c) and not rope_scaled(c),
        message="train.seq_len {seq_len} exceeds this model's max_position_embeddings {max_pos}, and its "
        "config scales no rotary positions (no rope_scaling): positions past {max_pos} were never trained, "
        "so quality degrades and memory is spent on a length the model cannot use",
        fix=lambda c: {"train.seq_len": max(8, max_positions(c))},
        fix_text="lower train.seq_len to {max_pos}, or use a long-context variant of the model",
        source=ROPE_CONTEXT + POSITIONS[:1],
    ),
    Rule(
        id="seq-len-beyond-context",
        severity="warning",
        title="seq_len beyond the model's trained context, with rope scaling",
        applies=lambda c: beyond_rotary_context(c) and rope_scaled(c),
        message="train.seq_len {seq_len} exceeds max_position_embeddings {max_pos}; the config's rope "
        "scaling stretches the positions, but quality past the trained context is untested",
        fix=lambda c: {"train.seq_len": max(8, max_positions(c))},
        fix_text="set train.seq_len: {max_pos}, or check the quality of long examples after training",
        source=ROPE_CONTEXT,
    ),
    Rule(
        id="chunked-loss-small-vocab",
        severity="warning",
        title="Chunked loss on a small vocabulary",
        applies=lambda c: (
            isinstance(c.recipe.train.loss_chunk, int)
            and c.recipe.train.loss_chunk > 0
            and (config_int(c, "vocab_size") or 32000) < 32000
        ),
        message="train.loss_chunk is {loss_chunk} but the vocabulary has only {vocab} entries: the full "
        "logits are small, so chunking adds steps and saves little memory",
        fix={"train.loss_chunk": 0},
        fix_text="set train.loss_chunk: 0 (chunking pays off for vocabularies of 32k and more)",
        source=CHUNKED_LOSS,
    ),
    Rule(
        id="loss-chunk-covers-batch",
        severity="warning",
        title="Loss chunk as large as the whole micro-batch",
        applies=lambda c: (
            isinstance(c.recipe.train.loss_chunk, int)
            and c.recipe.train.loss_chunk >= c.recipe.train.seq_len * c.recipe.train.batch_size
        ),
        message="train.loss_chunk {loss_chunk} is not smaller than the {tokens} tokens of a micro-batch, so "
        "there is a single chunk and the full logits are built anyway",
        fix={"train.loss_chunk": 0},
        fix_text="set train.loss_chunk: 0, or a chunk well below {tokens} (e.g. 1024)",
        source=CHUNKED_LOSS,
    ),
    # data
    Rule(
        id="no-eval-on-small-data",
        severity="warning",
        title="No held-out data on a small dataset",
        applies=lambda c: (
            c.recipe.data is not None
            and c.recipe.data.eval_fraction == 0
            and (examples(c) or SMALL_DATA) < SMALL_DATA
        ),
        message="data.eval_fraction is 0 on a dataset of {examples} lines: with this little data the model "
        "overfits quickly, and without an eval loss nothing shows when it starts",
        fix=lambda c: {"data.eval_fraction": eval_fraction_for(examples(c))},
        fix_text="hold out a share for the eval loss: data.eval_fraction: {eval_needed}",
        source=EVAL_SPLIT,
    ),
    Rule(
        id="eval-split-tiny",
        severity="warning",
        title="Eval split of only a few examples",
        applies=lambda c: (
            c.recipe.data is not None
            and c.recipe.data.eval_fraction > 0
            and (n := examples(c)) is not None
            and n >= 4 * MIN_EVAL_EXAMPLES
            and eval_count(n, c.recipe.data.eval_fraction) < MIN_EVAL_EXAMPLES
        ),
        message="data.eval_fraction {eval_fraction} of {examples} lines holds out {eval_examples} "
        "example(s): an eval loss over so few is noise and cannot show overfitting",
        fix=lambda c: {"data.eval_fraction": eval_fraction_for(examples(c))},
        fix_text="set data.eval_fraction: {eval_needed} to hold out at least {min_eval} examples",
        source=EVAL_SPLIT,
    ),
    # gradient checkpointing
    Rule(
        id="checkpointing-remote-code-adapters",
        severity="warning",
        title="Gradient checkpointing + frozen base in custom model code",
        applies=lambda c: (
            adapters(c) and c.recipe.train.gradient_checkpointing and c.recipe.model.trust_remote_code
        ),
        message="gradient checkpointing over a frozen base needs gradients to flow into each checkpointed "
        "block; fitune uses non-reentrant checkpointing, but custom model code (trust_remote_code) may run "
        "its own reentrant checkpoint, leaving the adapters without gradients and unchanged",
        fix=None,
        fix_text="run a few steps (`fitune train --max-steps 2`) and check that the loss moves, or set "
        "train.gradient_checkpointing: false",
        source=D1_GC_INPUT_GRADS,
    ),
]
