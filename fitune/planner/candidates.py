"""The configurations a search weighs: enumeration from a base recipe, what each changes, its predicted
speed and score, and what rules it out before any trace (the doctor's errors, dominated precisions, weights
that cannot fit)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from fitune.errors import FituneError
from fitune.planner import anchors as anc
from fitune.planner import speed as spd

METHODS = ("full", "lora", "qlora")
RANKS = (8, 16, 64)
PRECISIONS = ("bf16", "fp16", "fp32")
CHECKPOINTING = (False, True)
ATTENTIONS = ("sdpa", "flash_attention_2")
LOSS_CHUNKS = (0, "auto")
OPTIMIZERS = ("adamw", "adamw8bit", "paged_adamw8bit")
EIGHT_BIT = ("adamw8bit", "paged_adamw8bit")
DEFAULT_EFFECTIVE_BATCH = 8
CHANGE_PENALTY = 0.01  # score = tokens/s x (1 - 1% per searched setting changed from the base recipe)
METHOD_LR = {"full": 2e-5, "lora": 2e-4, "qlora": 2e-4}  # applied when a candidate changes the method
_GIB = 2**30

# the searched settings, as (name in the table, recipe keys it sets)
KNOBS = {
    "method": ("method.kind",),
    "rank": ("method.r",),
    "precision": ("train.precision",),
    "checkpointing": ("train.gradient_checkpointing",),
    "attention": ("train.attention",),
    "loss_chunk": ("train.loss_chunk",),
    "optimizer": ("train.optimizer",),
    "split": ("train.batch_size", "train.grad_accum"),
    "devices": ("hardware.num_devices",),
}
DEVICE_COUNTS = (2, 4, 8)  # GPUs a search shards over (FSDP2) when one does not hold any configuration


@dataclass
class Target:
    """What the search plans for: a device, the memory it may use (before the margin) and its environment."""

    label: str
    device: str  # hardware.device of every candidate
    kind: str  # cuda | cpu
    gpu: Any  # fitune.hardware.catalog.GPU or None
    memory_bytes: int
    env: Any  # fitune.hardware.detect.Environment


def resolve_target(base, gpu: str | None = None, budget_gib: float | None = None) -> Target:
    """The target of a search: ``gpu`` (a catalog name) or the recipe's device, ``budget_gib`` overriding
    its memory."""
    from fitune.hardware.detect import detect_environment

    device = gpu or base.hardware.device
    env = detect_environment(device)
    if budget_gib is not None and budget_gib <= 0:
        raise FituneError(f"--budget {budget_gib:g} GiB is not positive; fix: give the memory to plan for")
    memory = int(budget_gib * _GIB) if budget_gib is not None else env.free_memory_bytes
    name = env.gpu.display_name if env.gpu is not None else env.device_name
    label = f"{name} ({memory / _GIB:,.2f} GiB{' budget' if budget_gib is not None else ''})"
    hardware = env.gpu.name if (gpu and env.gpu is not None) else device
    return Target(label, hardware, env.device_type, env.gpu, memory, env)


@dataclass
class Candidate:
    settings: dict[str, Any]  # dotted recipe key -> value, for every searched setting
    changes: list[str]  # "method.kind: lora -> qlora", relative to the base recipe
    n_changes: int
    structure: tuple
    speed: spd.Speed
    score: float
    status: str = "pending"  # fits | too_big | ruled_out | pruned | not_evaluated
    reason: str = ""
    peak_bytes: int | None = None
    breakdown: dict[str, int] = field(default_factory=dict)
    peak_region: str = ""
    traced: bool = False  # the configuration is an anchor (traced, not derived)
    twins: list[str] = field(default_factory=list)  # equal configurations folded into this one's table row

    @property
    def point(self) -> anc.Point:
        s = self.settings
        return anc.Point(
            s["method.r"], s["train.batch_size"], s["train.grad_accum"], s["train.optimizer"] in EIGHT_BIT
        )

    def knob(self, name: str) -> Any:
        keys = KNOBS[name]
        return tuple(self.settings[k] for k in keys) if len(keys) > 1 else self.settings[keys[0]]


def splits(effective_batch: int) -> list[tuple[int, int]]:
    """(micro-batch, accumulation) pairs whose product is ``effective_batch``, largest micro-batch first."""
    return [(b, effective_batch // b) for b in range(effective_batch, 0, -1) if effective_batch % b == 0]


def structure_of(s: dict[str, Any]) -> tuple:
    """What changes the ops a step runs: the settings traced together (see ``anchors.py``)."""
    return (s["method.kind"], s["train.precision"], s["train.gradient_checkpointing"], s["train.loss_chunk"])


def step_batch(base) -> int:
    """Examples an optimizer step of ``base`` takes over all its processes."""
    return base.train.batch_size * base.train.grad_accum * base.hardware.num_devices


def per_process_batch(base, ranks: int) -> int:
    """Examples each of ``ranks`` processes takes per optimizer step so that the step sees the batch of
    ``base`` (``train.batch_size x grad_accum`` on each of its ``hardware.num_devices`` processes), or the
    nearest larger one when that batch does not divide."""
    return max(1, -(-step_batch(base) // ranks))


def enumerate_settings(
    base, target: Target, methods: tuple[str, ...] = METHODS, ranks: int | None = None
) -> list[dict[str, Any]]:
    """Every searched configuration of ``base`` on ``target`` as dotted recipe settings, on ``ranks``
    processes (default the recipe's), holding the batch of an optimizer step."""
    t = base.train
    processes = ranks or base.hardware.num_devices
    effective = per_process_batch(base, processes)
    chunks = tuple(dict.fromkeys((*LOSS_CHUNKS, t.loss_chunk)))
    out = []
    for kind in methods:
        ranks = sorted({*RANKS, base.method.r}) if kind != "full" else [base.method.r]
        for r in ranks:
            for precision in PRECISIONS:
                for ckpt in CHECKPOINTING:
                    for attention in ATTENTIONS:
                        for chunk in chunks:
                            for optimizer in OPTIMIZERS:
                                for b, g in splits(effective):
                                    s = {
                                        "method.kind": kind,
                                        "method.r": r,
                                        "train.precision": precision,
                                        "train.gradient_checkpointing": ckpt,
                                        "train.attention": attention,
                                        "train.loss_chunk": chunk,
                                        "train.optimizer": optimizer,
                                        "train.batch_size": b,
                                        "train.grad_accum": g,
                                        "hardware.device": target.device,
                                        "hardware.num_devices": processes,
                                    }
                                    out.append(_consequences(base, s))
    return out


def _consequences(base, s: dict[str, Any]) -> dict[str, Any]:
    """Settings that follow from the searched ones: adapters store the base in the compute dtype, a method
    change brings that method's usual learning rate, checkpointing off drops a layer choice."""
    if s["method.kind"] != "full":
        s["model.dtype"] = s["train.precision"]
    if s["method.kind"] != base.method.kind:
        s["train.lr"] = METHOD_LR[s["method.kind"]]
    if not s["train.gradient_checkpointing"] and getattr(base.train, "checkpoint_layers", "all") != "all":
        s["train.checkpoint_layers"] = "all"
    return s


def setting(recipe, dotted: str) -> Any:
    """A recipe's value at a dotted key (``train.batch_size``)."""
    node: Any = recipe
    for part in dotted.split("."):
        node = getattr(node, part)
    return node


def unchanged(base, key: str, value: Any) -> bool:
    """A candidate keeps the recipe's setting: the same value, or any kernel where the recipe says
    ``train.attention: auto`` (auto leaves the kernel to fitune)."""
    old = setting(base, key)
    return old == value or (key == "train.attention" and old == "auto")


def _changes(base, s: dict[str, Any]) -> tuple[list[str], int]:
    changed = [k for k, v in s.items() if k != "hardware.device" and not unchanged(base, k, v)]
    counted = {name for name, keys in KNOBS.items() if any(k in changed for k in keys)}
    if base.method.kind == "full" == s["method.kind"]:
        counted.discard("rank")
    return [f"{k}: {setting(base, k)} -> {s[k]}" for k in changed], len(counted)


def _doctor_errors(base, target: Target, settings: list[dict[str, Any]], config: dict) -> list[str | None]:
    """The first doctor error of each configuration (None when it can run). Errors do not depend on the
    micro-batch split, so the doctor runs once per configuration without it."""
    from fitune.preflight import DoctorContext, run_rules

    cache: dict[tuple, str | None] = {}
    out = []
    for s in settings:
        key = tuple((k, v) for k, v in s.items() if k not in KNOBS["split"])
        if key not in cache:
            ctx = DoctorContext(recipe=base.updated(s), env=target.env, model_config=config)
            errors = [f for f in run_rules(ctx) if f.severity == "error"]
            cache[key] = f"{errors[0].rule_id}: {errors[0].message}" if errors else None
        out.append(cache[key])
    return out


def _prune_precision(s: dict[str, Any], target: Target) -> str | None:
    bf16 = target.gpu.bf16 if target.gpu is not None else target.kind == "cpu"
    if s["train.precision"] == "fp32":
        return (
            "fp32 needs twice the bytes of bf16/fp16 for weights and activations and runs without "
            "half-precision tensor cores; the same configuration in half precision dominates it"
        )
    if s["train.precision"] == "fp16" and bf16:
        return "same memory and speed as bf16 on this target, which avoids fp16's overflow risk"
    return None


def stored_weight_bytes(s: dict[str, Any], shape: spd.ModelShape) -> int:
    """Every weight of ``s`` in its stored dtype: fp32 for a full fine-tune, the compute dtype for adapters'
    base, half a byte for a 4-bit decoder linear (adapters themselves left out)."""
    total, linear = shape.total_weights, shape.layer_weights
    half = 4 if s["train.precision"] == "fp32" else 2
    if s["method.kind"] == "full":
        return total * 4
    if s["method.kind"] == "qlora":
        return linear // 2 + (total - linear) * half
    return total * half


def weights_floor(s: dict[str, Any], shape: spd.ModelShape) -> int:
    """Bytes every optimizer step of ``s`` holds at least on each process: its share of the weights, and for
    a full fine-tune of their fp32 gradients and optimizer moments (2 x 4 bytes for adamw, 2 x 1 for 8-bit).
    A bound, not a prediction."""
    held = stored_weight_bytes(s, shape)
    if s["method.kind"] == "full":
        held += shape.total_weights * (4 + (2 if s["train.optimizer"] in EIGHT_BIT else 8))
    return held // s.get("hardware.num_devices", 1)


def build_candidates(
    base, target: Target, shape: spd.ModelShape, config: dict, methods, ranks: int | None = None
) -> list[Candidate]:
    """Every configuration with its changes, speed and score; the doctor's errors and pruned precisions
    marked (``status``), the others ``pending``."""
    t = base.train
    all_settings = enumerate_settings(base, target, methods, ranks)
    errors = _doctor_errors(base, target, all_settings, config)
    tflops = _tflops(target)
    candidates = []
    for s, error in zip(all_settings, errors, strict=True):
        changes, n = _changes(base, s)
        sp = spd.estimate(
            shape,
            kind=s["method.kind"],
            r=s["method.r"],
            targets=base.method.targets,
            seq_len=t.seq_len,
            batch_size=s["train.batch_size"],
            grad_accum=s["train.grad_accum"],
            checkpointing=s["train.gradient_checkpointing"],
            optimizer=s["train.optimizer"],
            tflops=tflops.get(s["train.precision"]),
            bandwidth_gbps=target.gpu.bandwidth_gbps if target.gpu is not None else None,
            ranks=s["hardware.num_devices"],
            link_gbps=target.gpu.link_gbps if target.gpu is not None else None,
            stored_bytes=stored_weight_bytes(s, shape),
        )
        raw = sp.tokens_per_s if sp.tokens_per_s is not None else 1e15 / sp.flops_per_token
        c = Candidate(s, changes, n, structure_of(s), sp, raw * (1 - CHANGE_PENALTY * n))
        if error is not None:
            c.status, c.reason = "ruled_out", error
        elif (pruned := _prune_precision(s, target)) is not None:
            c.status, c.reason = "pruned", pruned
        candidates.append(c)

    return candidates


def _tflops(target: Target) -> dict[str, float | None]:
    gpu = target.gpu
    if gpu is None:
        return {}
    return {"bf16": gpu.bf16_tflops, "fp16": gpu.fp16_tflops}


def describe(settings: dict[str, Any]) -> str:
    """A configuration in one line: ``qlora r16 fp16, ckpt, sdpa, chunk auto, adamw8bit, 2x4``."""
    s = settings
    kind = s["method.kind"] + ("" if s["method.kind"] == "full" else f" r{s['method.r']}")
    parts = [f"{kind} {s['train.precision']}"]
    if s["train.gradient_checkpointing"]:
        parts.append("ckpt")
    parts.append("fa2" if s["train.attention"] == "flash_attention_2" else s["train.attention"])
    if s["train.loss_chunk"] != 0:
        parts.append(f"chunk {s['train.loss_chunk']}")
    parts += [s["train.optimizer"], f"{s['train.batch_size']}x{s['train.grad_accum']}"]
    if s.get("hardware.num_devices", 1) > 1:
        parts.append(f"on each of {s['hardware.num_devices']} GPUs")
    return ", ".join(parts)


@dataclass
class SearchResult:
    base: Any  # Recipe
    target: Target
    margin: float
    usable_bytes: int
    seq_len: int
    effective_batch: int  # examples per optimizer step on each process
    ranked: list[Candidate]  # configurations that fit, best first, twins folded
    candidates: list[Candidate]  # every configuration considered
    suggestions: list[str]
    assumptions: list[str]
    notes: list[str]
    structures_traced: int
    fake_runs: int
    seconds: float
    ranks: int = 1  # processes (GPUs) every configuration is sharded over
    one_device: SearchResult | None = None  # the search on one GPU, when it found nothing and this one shards

    @property
    def where(self) -> str:
        """What the search planned for: the target, or N of it sharded."""
        if self.ranks > 1:
            return f"{self.ranks} x {self.target.label}, sharded with FSDP2"
        return self.target.label

    def recipe_of(self, candidate: Candidate):
        return self.base.updated(candidate.settings)

    def counts(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for c in self.candidates:
            out[c.status] = out.get(c.status, 0) + 1
        return out
