"""Build a training session from a recipe: model, adapters, quantized weights, optimizer, schedule.

The one builder serves training (real weights) and planning (``fake=True``: the caller runs it inside
``FakeTensorMode``, so the same code allocates shapes and dtypes only, and no weight file is read).
"""

from __future__ import annotations

import contextlib
import importlib.util
import math
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from fitune.distributed.shard import shard_model
from fitune.distributed.world import current as current_world
from fitune.errors import FituneError, ModelSourceError
from fitune.libraries import prepare_libraries
from fitune.models import sources
from fitune.recipe import Recipe
from fitune.techniques import attention, lean
from fitune.techniques.hub_kernels import FROM_PRETRAINED
from fitune.techniques.installed import Installed
from fitune.techniques.offload import ActivationOffload, offload_for
from fitune.techniques.optimizers import build_optimizer

prepare_libraries()

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
    loss_chunk: int = 0  # tokens per chunk of the chunked cross-entropy; 0 = plain loss
    offload: ActivationOffload | None = None  # saved-tensor hooks of train.offload_activations
    derived: lean.Derived | None = None  # saved-tensor hooks of train.lean_activations
    installed: Installed = field(default_factory=Installed)  # what the techniques changed on the model
    # the last step's total gradient norm before clipping: one fp32 scalar from the build on, written in place
    # each step, so no step holds a tensor of the one before (planned as the run holds it)
    grad_norm: torch.Tensor | None = None
    ranks: int = 1  # processes the model is sharded over (FSDP2); the step scales its loss by it

    @property
    def trainable_parameters(self) -> list[tuple[str, nn.Parameter]]:
        return [(n, p) for n, p in self.model.named_parameters() if p.requires_grad]

    def set_training(self, mode: bool = True) -> None:
        """``model.train(mode)``, then a check that every technique is still installed (see installed.py)."""
        self.model.train(mode)
        self.installed.verify(f"model.{'train' if mode else 'eval'}()")

    @contextlib.contextmanager
    def evaluating(self):
        """The model in eval mode for the block (``set_training(False)``), then back in the mode it was in.
        Not restored when the block raises: the run ends there, and a check that raised would hide the error."""
        was_training = self.model.training
        self.set_training(False)
        yield
        self.set_training(was_training)

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
    cpu_target: bool = True,
    notes: list[str] | None = None,
) -> nn.Module:
    """The causal LM of ``source`` on ``device``: its weights, or random ones (``fake`` or no weights).
    What the checkpoint lacks or holds beyond the architecture is added to ``notes``, in fitune's words."""
    from transformers import AutoModelForCausalLM

    dtype = storage_dtype(recipe)
    attn = attention_kernel(recipe, source.config, device)
    check_attention(attn, device, fake=fake)
    config = source.config
    config.use_cache = False
    if recipe.method.kind == "qlora" and streams_weights(recipe, config):
        # the linear layers are read (or initialized) one at a time as quantize_nf4 swaps them; the rest
        # stays on the host until apply_method moves it
        return build_streamed(recipe, source, dtype, attn, fake=fake, cpu_target=cpu_target)
    if source.weights_dir is not None and not fake:
        try:
            model, info = AutoModelForCausalLM.from_pretrained(
                str(source.weights_dir),
                dtype=dtype,
                attn_implementation=attn,
                local_files_only=True,
                use_safetensors=True,
                trust_remote_code=recipe.model.trust_remote_code,
                output_loading_info=True,
                **FROM_PRETRAINED,
            )
        except (ImportError, ValueError) as exc:
            raise FituneError(f"cannot load {source.description} with attention={attn}: {exc}") from None
        if notes is not None:
            notes.extend(loading_notes(info, type(model).__name__, source.description))
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


STAGED_MODEL = (
    "staged_model"  # host memory: a sharded run's model before it moves to the GPUs, group by group
)


def _adapt(recipe: Recipe, model: nn.Module, device: torch.device, cpu_target: bool, installed: Installed):
    """The training method and the techniques that change the model's modules, on ``device``: checkpointing,
    the adapters or 4-bit layers, and the CPU attention kernel. Returns the model (a PeftModel for adapters)."""
    if recipe.train.gradient_checkpointing:
        apply_checkpointing(recipe, model, installed)
    model = apply_method(recipe, model, device, installed)
    if cpu_target:
        # torch's fused attention kernels are built for GPUs; on a CPU the blocked one trains faster; a plan for
        # a GPU keeps the SDPA the GPU will run
        causal_lm = model.get_base_model() if hasattr(model, "get_base_model") else model
        attention.install(causal_lm, installed)
    return model


def streams_weights(recipe: Recipe, config) -> bool:
    """Whether QLoRA builds this model on the meta device and reads its tensors one at a time. Custom model
    code, and checkpoints that transformers converts while loading (merged expert tensors), load whole."""
    if recipe.model.trust_remote_code:
        return False
    try:
        from transformers.conversion_mapping import get_checkpoint_conversion_mapping
    except ImportError:
        return True
    return get_checkpoint_conversion_mapping(config.model_type) is None


def build_streamed(
    recipe: Recipe,
    source: sources.ResolvedSource,
    dtype: torch.dtype,
    attn: str | None,
    *,
    fake: bool,
    cpu_target: bool,
) -> nn.Module:
    """A model for QLoRA that never holds its full-precision weights at once.

    Built on the meta device; every tensor but the weights ``quantize_nf4`` quantizes is then read from the
    safetensors files (or, for random weights and planning, initialized as transformers does) on the host,
    one at a time. The quantized layers' weights stay on meta until ``quantize_nf4`` takes each from
    ``PENDING_WEIGHTS``. Planning allocates the same tensors in the same order, reading nothing.
    """
    from transformers import AutoModelForCausalLM

    from fitune.models.quantize import PENDING_WEIGHTS, PendingWeights, quantized_linears

    try:
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(source.config, dtype=dtype, attn_implementation=attn)
    except (ImportError, ValueError) as exc:
        raise FituneError(f"cannot build {source.description} with attention={attn}: {exc}") from None
    folder = None
    if source.weights_dir is not None and not fake:
        folder = sources.SafetensorsFolder(source.weights_dir)
        _folder_metadata(model, source.weights_dir)
    else:
        torch.manual_seed(recipe.train.seed)
    # every name of each tensor: a tied weight (lm_head and the embeddings) is one tensor, read once; ``named``
    # keeps the meta tensors, and so the ids that key ``aliases`` and ``done``, alive
    aliases: dict[int, list[str]] = {}
    named = [*model.named_parameters(remove_duplicate=False), *model.named_buffers(remove_duplicate=False)]
    for name, t in named:
        aliases.setdefault(id(t), []).append(name)
    key_for = _checkpoint_keys(model, folder, source) if folder is not None else None
    streamed = {f"{n}.weight" for n in quantized_linears(model)}
    done: dict[int, torch.Tensor] = {}  # id(meta tensor) -> its value
    with torch.no_grad():
        for module_name, module in model.named_modules():
            fresh = []  # initialized here rather than read
            for table in (module._parameters, module._buffers):
                for attr, t in list(table.items()):
                    if t is None or t.device.type != "meta":
                        continue
                    full = f"{module_name}.{attr}" if module_name else attr
                    if full in streamed and len(aliases[id(t)]) == 1:
                        continue  # quantize_nf4 takes it from PENDING_WEIGHTS
                    if id(t) not in done:
                        is_param = table is module._parameters
                        persistent = is_param or attr not in module._non_persistent_buffers_set
                        key = key_for(aliases[id(t)]) if key_for is not None and persistent else None
                        done[id(t)] = _materialize(t, folder, key, param=is_param)
                        if key is None:
                            fresh.append(done[id(t)])
                    table[attr] = done[id(t)]
            if fresh:
                # transformers' own per-module init: random weights, and the values of non-persistent buffers
                # (rotary inv_freq) that a normal load recomputes the same way
                model._init_weights(module)
                for value in fresh:
                    value._is_hf_initialized = True
    pending = PendingWeights(_pending_weights(folder, key_for), cpu_kernels=fake and cpu_target)
    setattr(model, PENDING_WEIGHTS, pending)
    return model


def _materialize(meta: torch.Tensor, folder, key: str | None, *, param: bool) -> torch.Tensor:
    """A meta tensor's value on the host: read from the checkpoint, or allocated for initialization."""
    value = folder.read(key, meta.dtype) if key is not None else torch.empty_like(meta, device="cpu")
    if param:
        value = nn.Parameter(value, requires_grad=meta.requires_grad)
    if key is not None:
        value._is_hf_initialized = True  # transformers' init leaves it as read
    return value


def _pending_weights(folder, key_for):
    """The source ``quantize_nf4`` takes each quantized layer's full-precision weight from."""

    def weight(model: nn.Module, name: str, linear: nn.Linear) -> torch.Tensor:
        meta = linear.weight
        if folder is not None:
            return folder.read(key_for([name]), meta.dtype)
        linear._parameters["weight"] = nn.Parameter(torch.empty_like(meta, device="cpu"), requires_grad=False)
        with torch.no_grad():
            model._init_weights(linear)
        value = linear.weight.data
        linear._parameters["weight"] = meta  # the caller drops the value once quantized
        return value

    return weight


def _checkpoint_keys(model: nn.Module, folder: sources.SafetensorsFolder, source: sources.ResolvedSource):
    """Maps a tensor's names in the model to its key in the checkpoint. Checkpoints of the bare decoder
    (``LlamaModel``) lack the ``model.`` prefix of the causal-LM class; other layouts name the missing key."""
    prefix = getattr(model, "base_model_prefix", "") or ""

    def key_for(names: list[str]) -> str:
        candidates = []
        for n in names:
            candidates.append(n)
            if prefix and n.startswith(prefix + "."):
                candidates.append(n[len(prefix) + 1 :])
            elif prefix:
                candidates.append(f"{prefix}.{n}")
        key = folder.find(candidates)
        if key is None:
            sample = ", ".join(list(folder.entries)[:4]) or "none"
            raise ModelSourceError(
                f"{source.description}: the safetensors files in {folder.folder} hold no tensor {names[0]} "
                f"(looked for {', '.join(candidates)}; the files' tensors are named like {sample}); fix: use a "
                f"checkpoint saved by transformers for model_type {model.config.model_type}, or method.kind: "
                "lora, which loads it through transformers' key conversions"
            )
        return key

    return key_for


def _folder_metadata(model: nn.Module, folder) -> None:
    """What from_pretrained also takes from the folder: its path (peft records it in a saved adapter) and its
    generation defaults (eos ids and the like)."""
    model.name_or_path = model.config.name_or_path = str(folder)
    if not (folder / "generation_config.json").is_file():
        return
    from transformers import GenerationConfig

    try:
        model.generation_config = GenerationConfig.from_pretrained(str(folder))
    except (OSError, ValueError):
        pass  # from_pretrained keeps the defaults derived from the config too


def _listed(names, limit: int = 4) -> str:
    names = sorted(names)
    more = f" and {len(names) - limit} more" if len(names) > limit else ""
    return ", ".join(names[:limit]) + more


def loading_notes(info: dict, architecture: str, description: str) -> list[str]:
    """What transformers logs (and fitune keeps quiet) about a checkpoint that does not match its architecture,
    as notes for the run: weights that start random, and tensors of the checkpoint left unused."""
    notes = []
    missing = list(info.get("missing_keys") or [])
    if missing:
        notes.append(
            f"warning: {len(missing)} weight(s) of {architecture} are not in {description} and start from random "
            f"values: {_listed(missing)}; fix: check that model.source is a checkpoint of this architecture "
            "(a head trained from scratch needs far more steps than an adapter)"
        )
    unexpected = list(info.get("unexpected_keys") or [])
    if unexpected:
        notes.append(
            f"note: {len(unexpected)} tensor(s) of {description} are not part of {architecture} and are not "
            f"loaded: {_listed(unexpected)}"
        )
    return notes


def attention_kernel(recipe: Recipe, config, device: torch.device) -> str | None:
    """The kernel ``train.attention`` means on ``device`` of this machine (``auto`` resolved; None lets
    transformers pick for custom model code). SDPA asked of an architecture without it is refused here."""
    choice = attention.choose(recipe, config, attention.here(device))
    if choice.kernel == "sdpa" and attention.has_sdpa(config) is False:
        raise FituneError(
            f"train.attention: 'sdpa', but transformers has no SDPA attention for {config.model_type}; fix: set "
            "train.attention: auto (fitune picks a kernel this model has) or eager"
        )
    return choice.kernel


def check_attention(attn: str | None, device: torch.device, *, fake: bool) -> None:
    """Refuse an attention kernel this machine cannot run, naming the fix (transformers' own errors do not)."""
    if attn != "flash_attention_2":
        return
    fix = "or set train.attention: sdpa (PyTorch's fused attention, which runs everywhere)"
    if not fake and device.type != "cuda":
        raise FituneError(
            f"train.attention: 'flash_attention_2' runs on NVIDIA GPUs (Ampere or newer) only, and this run's "
            f"device is {device.type}; fix: train on a CUDA GPU, {fix}"
        )
    if importlib.util.find_spec("flash_attn") is None:
        raise FituneError(
            "train.attention: 'flash_attention_2' needs the flash-attn package, which is not installed; fix: "
            f"`pip install flash-attn --no-build-isolation` on a machine with CUDA, {fix}"
        )
    if not torch.cuda.is_available():
        raise FituneError(
            "train.attention: 'flash_attention_2' is only built and planned where CUDA is available (its "
            f"kernels are CUDA-only), and this machine has no CUDA device; fix: plan on the GPU machine, {fix}"
        )


def checkpoint_period(recipe: Recipe, num_layers: int) -> int:
    """Length of the repeating pattern of checkpointed layers: 1 (all or none), N (every_N), the whole depth
    (a list of layers)."""
    t = recipe.train
    if not t.gradient_checkpointing or t.checkpoint_layers == "all":
        return 1
    if isinstance(t.checkpoint_layers, str):
        return int(t.checkpoint_layers.removeprefix("every_"))
    return num_layers


def _decoder_layers(model: nn.Module) -> list[nn.Module]:
    from transformers.modeling_layers import GradientCheckpointingLayer

    return [m for m in model.modules() if isinstance(m, GradientCheckpointingLayer)]


def _checkpointed(model: nn.Module) -> list[int]:
    return [i for i, layer in enumerate(_decoder_layers(model)) if layer.gradient_checkpointing]


def apply_checkpointing(recipe: Recipe, model: nn.Module, installed: Installed | None = None) -> list[int]:
    """Recompute the chosen decoder layers in backward (non-reentrant: correct with a frozen base, and no
    input needs ``requires_grad``). Returns the indices of the checkpointed layers, recorded in
    ``installed``."""
    t = recipe.train
    layers = _decoder_layers(model)
    choice = t.checkpoint_layers
    if isinstance(choice, list) and choice[-1] >= len(layers):
        raise FituneError(
            f"train.checkpoint_layers: {choice!r} names layer {choice[-1]}, and this model has {len(layers)} "
            f"decoder layers (0 to {len(layers) - 1}); fix: list indices below {len(layers)}"
        )
    every = 1 if choice == "all" or isinstance(choice, list) else int(choice.removeprefix("every_"))
    model.activation_checkpointing_enable(
        activation_checkpointing_kwargs={"use_reentrant": False}, every_n_layers=every
    )
    if isinstance(choice, list):
        for i, layer in enumerate(layers):
            layer.gradient_checkpointing = i in choice
    # transformers also makes the embeddings' output require grad, which only the reentrant variant needs;
    # without it the backward stops at the first layer instead of computing an unused input gradient
    model.disable_input_require_grads()
    chosen = _checkpointed(model)
    if installed is not None:
        installed.add(
            "train.gradient_checkpointing",
            "checkpointing",
            f"decoder layers {chosen}",
            lambda: _checkpointed(model) == chosen,
        )
    return chosen


AUTO_CHUNK_LOGITS = 1 << 24  # loss_chunk auto: chunks of at most 16M logits (64 MiB in fp32)


def resolve_loss_chunk(loss_chunk: int | str, vocab_size: int) -> int:
    """Tokens per chunk of the chunked cross-entropy (0 = plain loss); ``auto`` bounds a chunk's logits."""
    if loss_chunk == "auto":
        return max(16, AUTO_CHUNK_LOGITS // vocab_size)
    return int(loss_chunk)


def apply_method(
    recipe: Recipe, model: nn.Module, device: torch.device, installed: Installed | None = None
) -> nn.Module:
    method = recipe.method
    if method.kind == "full":
        for p in model.parameters():
            p.requires_grad_(True)
        return model
    from peft import LoraConfig, get_peft_model

    from fitune.memory.tracker import part
    from fitune.models.quantize import quantize_nf4

    for p in model.parameters():
        p.requires_grad_(False)
    if method.kind == "qlora":
        # the model was staged in host memory: each layer is quantized onto the device, then the rest moves.
        # Its peak, on top of the layers quantized before, grows with depth at its own rate: a part of its own
        # in a plan's trace, so that each part of the load extrapolates from two depths
        with part("quantize"):
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
    if compute_dtype(recipe) is not None:
        # peft casts each adapter's input to the adapter's fp32 and autocast casts it back: a new copy per
        # adapter, kept for backward (q, k and v keep three). Autocast alone computes the same product.
        from peft.tuners.lora import LoraLayer

        layers = [m for m in peft_model.modules() if isinstance(m, LoraLayer)]
        for module in layers:
            module.cast_input_dtype_enabled = False
        if installed is not None:
            installed.add(
                "train.precision",
                "the disabled input cast",
                f"{len(layers)} LoRA layers",
                lambda: not any(getattr(m, "cast_input_dtype_enabled", True) for m in layers),
            )
    return peft_model


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
    mesh=None,
) -> Session:
    """Build everything a training step needs. With ``fake=True`` no weights or tokenizer are read.

    ``mesh`` (a plan of a sharded run, under a fake process group): the device mesh to shard over, built
    before the fake tensor mode was entered (``fitune.memory.simulate``); a run on several ranks shards over
    its process group.

    ``host_staging`` (planning for a GPU) is a context factory that marks host-memory work: QLoRA stages the
    full-precision model on the host and only its quantized layers reach the device; with
    ``host_category="offloaded_activations"`` it holds the activations ``train.offload_activations`` moves
    to the host (``fitune/techniques/offload.py``), which the tracker counts as host memory.
    """
    device = torch.device(device) if device is not None else resolve_device(recipe.hardware.device)
    if source is None:
        source = sources.resolve(recipe, need_weights=not fake)
    tokenizer = None
    if with_tokenizer and not fake:
        from fitune.models.tokenizers import load_tokenizer

        tokenizer = load_tokenizer(source, source.config)
    notes: list[str] = []
    # training or planning for a CPU: a plan for a GPU runs fake tensors on the CPU with host_staging given
    cpu_target = device.type == "cpu" and host_staging is None
    world = current_world()
    sharded = world.distributed and (mesh is not None or not fake)
    # a sharded run on GPUs prepares its whole model in host memory, and each group moves to the GPU as it is
    # sharded: a GPU holds its shards and one group at a time (on CPUs, host memory is the device's)
    shard_from_host = sharded and not cpu_target
    stage = recipe.method.kind == "qlora" or shard_from_host  # weights wait in host memory
    installed = Installed()
    # a plan for GPUs counts the staged model as host memory each process needs while it loads
    staging = host_staging(STAGED_MODEL if shard_from_host else None) if host_staging is not None else None
    with staging if (stage and staging is not None) else contextlib.nullcontext():
        model = build_model(
            recipe, source, device, fake=fake, stage_on_host=stage, cpu_target=cpu_target, notes=notes
        )
        if shard_from_host:
            model = _adapt(recipe, model, torch.device("cpu"), cpu_target, installed)
    if not shard_from_host:
        model = _adapt(recipe, model, device, cpu_target, installed)
    causal_lm = model.get_base_model() if hasattr(model, "get_base_model") else model
    derived = None
    if recipe.train.lean_activations:
        derived = lean.Derived()
        if not lean.install(
            causal_lm, derived, recompute_mlp=recipe.train.recompute_mlp, installed=installed
        ):
            derived = None
    loss_chunk = resolve_loss_chunk(recipe.train.loss_chunk, causal_lm.config.vocab_size)
    if loss_chunk:
        head = causal_lm.get_output_embeddings()
        installed.add(
            "train.loss_chunk",
            f"the output head the chunked loss reads ({type(head).__name__})",
            type(causal_lm).__name__,
            lambda: causal_lm.get_output_embeddings() is head,
        )
    if sharded:
        shard_model(causal_lm, _decoder_layers(causal_lm), mesh=mesh, device=device)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = build_optimizer(recipe, params, fake=fake)
    steps = total_steps or recipe.train.max_steps or 1
    scheduler = cosine_schedule(optimizer, recipe.train.warmup_steps, steps, recipe.train.min_lr_ratio)
    offload = offload_for(
        recipe.train.offload_activations, model, device, fake=fake, host_memory=host_staging
    )
    if recipe.train.offload_activations and offload is None:
        notes.append(
            "train.offload_activations: activations already live in host memory on a CPU; nothing moves"
        )
    scaler = None
    if recipe.train.precision == "fp16" and not fake:
        scaler = torch.amp.GradScaler(device.type)
    session = Session(
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
        notes=notes,
        loss_chunk=loss_chunk,
        offload=offload,
        derived=derived,
        installed=installed,
        grad_norm=torch.zeros((), dtype=torch.float32, device=device),
        ranks=world.size if sharded else 1,
    )
    session.set_training(True)
    return session
