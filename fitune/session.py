"""Build a training session from a recipe: model, adapters, quantized weights, optimizer, schedule.

The one builder serves training (real weights) and planning (``fake=True``: the caller runs it inside
``FakeTensorMode``, so the same code allocates shapes and dtypes only, and no weight file is read).
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from fitune.errors import FituneError
from fitune.logs import quiet_libraries
from fitune.models import sources
from fitune.recipe import Recipe

quiet_libraries()

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass
class Session:
    recipe: Recipe
    model: nn.Module  # what is trained (a PeftModel for LoRA/QLoRA)
    causal_lm: nn.Module  # the transformers *ForCausalLM inside it
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    device: torch.device
    compute_dtype: torch.dtype | None  # autocast dtype; None = no autocast
    tokenizer: Any = None
    # fp16 autocast scales the loss against gradient underflow; the scaler reads an overflow flag on the host,
    # so planning (fake tensors) runs without it and counts its few scalar tensors as nothing
    grad_scaler: Any = None
    source: sources.ResolvedSource | None = None
    notes: list[str] = field(default_factory=list)

    @property
    def trainable_parameters(self) -> list[tuple[str, nn.Parameter]]:
        return [(n, p) for n, p in self.model.named_parameters() if p.requires_grad]

    def autocast(self):
        if self.compute_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.compute_dtype)


def resolve_device(spec: str) -> torch.device:
    """The device training runs on. A catalog GPU name means "the CUDA device of this machine"."""
    if spec == "cpu":
        return torch.device("cpu")
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if not torch.cuda.is_available():
        raise FituneError(
            f"hardware.device: {spec!r} asks for a CUDA GPU, and this machine has none; fix: set "
            "hardware.device: cpu (or auto) to train here, or keep it and use `fitune plan` to plan for that GPU"
        )
    return torch.device(spec if spec.startswith("cuda") else "cuda")


def storage_dtype(recipe: Recipe) -> torch.dtype:
    """Dtype of non-quantized base weights. Trainable weights of a full fine-tune stay fp32 under autocast."""
    if recipe.train.precision == "bf16-pure":
        return torch.bfloat16
    if recipe.method.kind == "full":
        return torch.float32
    return DTYPES[recipe.model.dtype]


def compute_dtype(recipe: Recipe) -> torch.dtype | None:
    return {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16, "bf16-pure": None}[
        recipe.train.precision
    ]


def build_model(
    recipe: Recipe,
    source: sources.ResolvedSource,
    device: torch.device,
    *,
    fake: bool,
    stage_on_host: bool = False,
) -> nn.Module:
    from transformers import AutoModelForCausalLM

    dtype = storage_dtype(recipe)
    attn = recipe.train.attention
    config = source.config
    config.use_cache = False
    if source.weights_dir is not None and not fake:
        try:
            model = AutoModelForCausalLM.from_pretrained(
                str(source.weights_dir),
                dtype=dtype,
                attn_implementation=attn,
                local_files_only=True,
                use_safetensors=True,
                trust_remote_code=recipe.model.trust_remote_code,
            )
        except (ImportError, ValueError) as exc:
            raise FituneError(f"cannot load {source.description} with attention={attn}: {exc}") from None
        model.config.use_cache = False
    else:
        torch.manual_seed(recipe.train.seed)
        try:
            model = AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation=attn)
        except (ImportError, ValueError) as exc:
            raise FituneError(f"cannot build {source.description} with attention={attn}: {exc}") from None
    if device.type != "cpu" and not stage_on_host:  # built on the CPU; fake tensors stay there
        model = model.to(device)
    return model


def apply_method(recipe: Recipe, model: nn.Module, device: torch.device) -> nn.Module:
    method = recipe.method
    if method.kind == "full":
        for p in model.parameters():
            p.requires_grad_(True)
        return model
    from peft import LoraConfig, get_peft_model

    from fitune.models.quantize import quantize_nf4

    for p in model.parameters():
        p.requires_grad_(False)
    if method.kind == "qlora":
        # the model was staged in host memory: each layer is quantized onto the device, then the rest moves
        quantize_nf4(model, compute_dtype(recipe) or torch.float32, device)
        if device.type != "cpu":
            model = model.to(device)
    targets = method.targets if isinstance(method.targets, list) else "all-linear"
    config = LoraConfig(
        r=method.r,
        lora_alpha=method.alpha,
        lora_dropout=method.dropout,
        target_modules=targets,
        bias="none",
        task_type="CAUSAL_LM",
    )
    try:
        peft_model = get_peft_model(model, config, autocast_adapter_dtype=True)
    except ValueError as exc:
        names = sorted({n.split(".")[-1] for n, m in model.named_modules() if isinstance(m, nn.Linear)})
        raise FituneError(
            f"method.targets: {method.targets!r} matched no layer ({exc}); linear layers in this model: "
            f"{', '.join(names)}; fix: use names from that list or `all-linear`"
        ) from None
    # adapters train in fp32 under autocast (bf16-pure keeps them in bf16)
    want = torch.bfloat16 if recipe.train.precision == "bf16-pure" else torch.float32
    for p in peft_model.parameters():
        if p.requires_grad and p.dtype != want:
            p.data = p.data.to(want)
    return peft_model


def build_optimizer(recipe: Recipe, params: list[nn.Parameter]) -> torch.optim.Optimizer:
    t = recipe.train
    if not params:
        raise FituneError("no parameter is trainable; fix: check method.kind and method.targets")
    if t.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=t.lr, weight_decay=t.weight_decay)
    if t.optimizer == "sgd":
        return torch.optim.SGD(params, lr=t.lr, momentum=0.9, weight_decay=t.weight_decay)
    import bitsandbytes as bnb

    cls = bnb.optim.AdamW8bit if t.optimizer == "adamw8bit" else bnb.optim.PagedAdamW8bit
    return cls(params, lr=t.lr, weight_decay=t.weight_decay)


def cosine_schedule(optimizer, warmup_steps: int, total_steps: int, min_ratio: float):
    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / (warmup_steps + 1)
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        progress = min(1.0, progress)
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def build_session(
    recipe: Recipe,
    *,
    fake: bool = False,
    device: torch.device | str | None = None,
    total_steps: int | None = None,
    source: sources.ResolvedSource | None = None,
    with_tokenizer: bool = True,
    host_staging=None,
) -> Session:
    """Build everything a training step needs. With ``fake=True`` no weights or tokenizer are read.

    ``host_staging`` (planning for a GPU) is a context factory that marks host-memory work: QLoRA stages the
    full-precision model on the host and only its quantized layers reach the device.
    """
    device = torch.device(device) if device is not None else resolve_device(recipe.hardware.device)
    if source is None:
        source = sources.resolve(recipe, need_weights=not fake)
    tokenizer = None
    if with_tokenizer and not fake:
        from fitune.models.tokenizers import load_tokenizer

        tokenizer = load_tokenizer(source, source.config)
    stage = recipe.method.kind == "qlora"  # full-precision weights wait in host memory until quantized
    with host_staging() if (stage and host_staging is not None) else contextlib.nullcontext():
        model = build_model(recipe, source, device, fake=fake, stage_on_host=stage)
    if recipe.train.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model = apply_method(recipe, model, device)
    causal_lm = model.get_base_model() if hasattr(model, "get_base_model") else model
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = build_optimizer(recipe, params)
    steps = total_steps or recipe.train.max_steps or 1
    scheduler = cosine_schedule(optimizer, recipe.train.warmup_steps, steps, recipe.train.min_lr_ratio)
    scaler = None
    if recipe.train.precision == "fp16" and not fake:
        scaler = torch.amp.GradScaler(device.type)
    return Session(
        recipe=recipe,
        grad_scaler=scaler,
        model=model,
        causal_lm=causal_lm,
        optimizer=optimizer,
        scheduler=scheduler,
        device=device,
        compute_dtype=compute_dtype(recipe),
        tokenizer=tokenizer,
        source=source,
    )
