"""The recipe: one typed, strictly validated description of a run.

Unknown keys are errors, every problem is reported at once, and each message names the field (and the
YAML line when the recipe came from a file), the bad value, what is allowed and how to fix it.
"""

from __future__ import annotations

import difflib
import re
from pathlib import Path
from typing import Any, Literal, Union

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from fitune.errors import RecipeError

Dtype = Literal["fp32", "bf16", "fp16"]
Precision = Literal["fp32", "bf16", "fp16", "bf16-pure"]
MethodKind = Literal["full", "lora", "qlora"]
DataFormat = Literal["messages", "sharegpt", "alpaca", "text"]
Attention = Literal["auto", "eager", "sdpa", "flash_attention_2"]
Optimizer = Literal["adamw", "adamw8bit", "paged_adamw8bit", "sgd"]
Tracker = Literal["tensorboard", "mlflow", "wandb", "trackio"]
OnBadLine = Literal["error", "skip"]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class ModelSpec(_Strict):
    source: str | None = Field(
        None,
        description="Alias, HF model folder, config.json, .gguf file or hub id (owner/name).",
    )
    config: dict[str, Any] | None = Field(
        None, description="Inline architecture (a config.json mapping); random weights."
    )
    tokenizer: str | None = Field(
        None,
        description="Tokenizer source when it differs from the model's; none = the model's own, or the "
        "built-in byte-level tokenizer for architecture-only models.",
    )
    revision: str | None = Field(
        None, description="Branch, tag or commit of a hub id in model.source (default: its main branch)."
    )
    dtype: Dtype = Field("bf16", description="Storage dtype of non-quantized base weights.")
    trust_remote_code: bool = Field(False, description="Run model code shipped with a checkpoint.")

    @model_validator(mode="after")
    def _one_source(self) -> ModelSpec:
        if self.source is None and self.config is None:
            raise ValueError(
                "model needs `source` (alias, folder, config.json, .gguf or hub id) or an inline `config`; "
                "fix: add `source: smollm2-135m-instruct` under model"
            )
        if self.source is not None and self.config is not None:
            raise ValueError("model has both `source` and `config`; fix: keep one of them")
        return self


class MethodSpec(_Strict):
    kind: MethodKind = Field("lora", description="full | lora | qlora (NF4 base + LoRA).")
    r: int = Field(16, ge=1, le=4096, description="LoRA rank.")
    alpha: float = Field(32, gt=0, description="LoRA scaling numerator (scale = alpha / r).")
    dropout: float = Field(0.0, ge=0, lt=1, description="Dropout on the LoRA input.")
    targets: Union[Literal["all-linear"], list[str]] = Field(
        "all-linear", description="`all-linear` or a list of module names (q_proj, v_proj, ...)."
    )


HUB_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*/[A-Za-z0-9][A-Za-z0-9_.-]*")


class DataSpec(_Strict):
    path: str | None = Field(
        None, description="JSONL (one example per line), JSON-array or Parquet file; or set `hub`."
    )
    hub: str | None = Field(
        None,
        description="A Hugging Face Hub dataset (owner/name): its split's JSONL or Parquet files, cached.",
    )
    revision: str | None = Field(
        None, description="Branch, tag or commit of the dataset in data.hub (default: its main branch)."
    )
    subset: str | None = Field(
        None, description="A subset (config) of the dataset in data.hub, as its dataset card names it."
    )
    split: str = Field("train", description="The split of the dataset in data.hub that training reads.")
    format: DataFormat | None = Field(
        None, description="messages | sharegpt | alpaca | text; detected when omitted."
    )
    eval_fraction: float = Field(0.1, ge=0, lt=1, description="Share of examples held out for eval loss.")
    on_bad_line: OnBadLine = Field(
        "error", description="error: stop at a corrupt line; skip: count and skip it."
    )

    @model_validator(mode="after")
    def _one_place(self) -> DataSpec:
        if (self.path is None) == (self.hub is None):
            raise ValueError(
                "data needs `path` (a local JSONL or Parquet file) or `hub` (a Hugging Face dataset, owner/name), "
                f"not {'both' if self.path else 'neither'}; fix: keep one of them"
            )
        if self.hub is not None and not HUB_ID.fullmatch(self.hub):
            raise ValueError(
                f"data.hub: {self.hub!r} is not a dataset id; fix: write owner/name, as in the dataset's "
                "address on the Hub"
            )
        if self.path is not None:
            set_here = [k for k in ("revision", "subset") if getattr(self, k) is not None]
            set_here += ["split"] if self.split != "train" else []
            if set_here:
                raise ValueError(
                    f"data.{set_here[0]} applies to data.hub only, and this recipe reads data.path; fix: "
                    f"remove data.{set_here[0]}"
                )
        return self


class TrainSpec(_Strict):
    seq_len: int = Field(
        512, ge=8, le=1_048_576, description="Tokens per example; longer ones are truncated."
    )
    batch_size: int = Field(4, ge=1, le=65536, description="Micro-batch per device.")
    grad_accum: int = Field(1, ge=1, le=65536, description="Micro-batches per optimizer step.")
    max_steps: int | None = Field(None, ge=1, description="Optimizer steps; or set `epochs`.")
    epochs: float | None = Field(
        None, gt=0, description="Passes over the training split (when max_steps unset)."
    )
    lr: float = Field(2.0e-4, gt=0, lt=1, description="Peak learning rate.")
    weight_decay: float = Field(0.0, ge=0, description="Decoupled weight decay.")
    warmup_steps: int = Field(0, ge=0, description="Linear warm-up steps before the cosine decay.")
    min_lr_ratio: float = Field(
        0.0, ge=0, le=1, description="Floor of the cosine schedule, as a share of lr."
    )
    max_grad_norm: float | None = Field(1.0, gt=0, description="Gradient clipping norm; null disables it.")
    precision: Precision = Field(
        "bf16",
        description="Compute dtype: autocast in bf16/fp16 with fp32 trainable weights; fp32 disables "
        "autocast; bf16-pure stores and trains everything in bf16.",
    )
    gradient_checkpointing: bool = Field(False, description="Recompute activations in backward.")
    checkpoint_layers: Union[Literal["all"], str, list[int]] = Field(
        "all",
        description="Decoder layers that gradient checkpointing recomputes: all, every_N (layers 0, N, "
        "2N, ...), or a list of layer indices.",
    )
    offload_activations: bool = Field(
        False,
        description="Keep the activations saved for backward in host memory between forward and backward "
        "(GPU only; no effect on a CPU device).",
    )
    lean_activations: bool = Field(
        True,
        description="Keep fewer tensors for backward in Llama-family norms and SwiGLU MLPs (recomputed "
        "elementwise in backward; same values).",
    )
    recompute_mlp: Union[bool, Literal["up"]] = Field(
        False,
        description="With lean_activations, also recompute in backward the MLP's gate and up projections "
        "(true: two matrix multiplies per layer) or its up projection only (up: one), instead of keeping them.",
    )
    attention: Attention = Field(
        "auto",
        description="auto (flash_attention_2 where flash-attn runs, else sdpa where the architecture has it, "
        "else eager) | eager | sdpa | flash_attention_2.",
    )
    loss_chunk: Union[int, Literal["auto"]] = Field(
        "auto",
        description="auto = fused cross-entropy in chunks sized for the vocabulary (exact; gradients "
        "computed in the forward pass); N = chunks of N tokens; 0 = plain loss.",
    )
    optimizer: Optimizer = Field("adamw", description="adamw | adamw8bit | paged_adamw8bit | sgd.")
    seed: int = Field(0, ge=0, description="Seed for weights init, data order, dropout.")
    log_every: int = Field(1, ge=1, description="Steps between progress lines and metrics rows.")
    eval_every: int | None = Field(
        None, ge=1, description="Steps between eval losses (default: start and end)."
    )
    report_to: list[Tracker] = Field(
        default_factory=list,
        description="Trackers the run's figures go to, each in its local mode: tensorboard, mlflow, wandb, "
        'trackio (an optional extra each: pip install "fitune[tensorboard]").',
    )

    @field_validator("report_to", mode="before")
    @classmethod
    def _report_to(cls, value: Any) -> Any:
        if value is None or value == "none":
            return []
        value = [value] if isinstance(value, str) else value
        if isinstance(value, list):
            seen = [v for i, v in enumerate(value) if v in value[:i]]
            if seen:
                raise ValueError(f"{seen[0]!r} is listed twice; fix: list each tracker once")
        return value

    @field_validator("loss_chunk")
    @classmethod
    def _chunk(cls, value: int | str) -> int | str:
        if isinstance(value, int) and value < 0:
            raise ValueError(
                f"{value} is not allowed; allowed: 0 (plain loss), a positive chunk size, or auto; "
                "fix: set loss_chunk: 0"
            )
        return value

    @field_validator("checkpoint_layers", mode="before")
    @classmethod
    def _checkpoint_layers(cls, value: Any) -> Any:
        fix = "fix: use all, every_2 (or another every_N), or a list of layer indices such as [0, 1, 2]"
        if isinstance(value, str):
            if value == "all" or (re.fullmatch(r"every_[1-9][0-9]*", value) is not None):
                return value
            raise ValueError(f"{value!r} is not allowed; allowed: all, every_N with N >= 1, a list; {fix}")
        if isinstance(value, list) and value and all(type(i) is int and i >= 0 for i in value):
            if len(set(value)) != len(value):
                raise ValueError(f"{value!r} lists a layer twice; fix: list each layer index once")
            return sorted(value)
        raise ValueError(
            f"{value!r} is not allowed; allowed: all, every_N, a non-empty list of indices >= 0; {fix}"
        )

    @model_validator(mode="after")
    def _checkpoint_layers_need_checkpointing(self) -> TrainSpec:
        if self.checkpoint_layers != "all" and not self.gradient_checkpointing:
            raise ValueError(
                f"checkpoint_layers: {self.checkpoint_layers!r} chooses layers to recompute, and "
                "gradient_checkpointing is false; fix: set gradient_checkpointing: true, or remove checkpoint_layers"
            )
        return self

    @model_validator(mode="after")
    def _recompute_mlp_needs_lean_activations(self) -> TrainSpec:
        if self.recompute_mlp and not self.lean_activations:
            raise ValueError(
                f"recompute_mlp: {self.recompute_mlp!r} works through the lean activations, and "
                "lean_activations is false; fix: set lean_activations: true, or recompute_mlp: false"
            )
        return self


class HardwareSpec(_Strict):
    device: str = Field(
        "auto", description="auto | cpu | cuda | cuda:N | a catalog GPU name (planning only)."
    )
    num_devices: int = Field(1, ge=1, le=65536, description="> 1: FSDP2 through torchrun.")


class OutputSpec(_Strict):
    dir: str = Field("runs/run", description="Run folder: metrics, adapter or model, resolved recipe.")
    save_every: int | None = Field(
        None,
        ge=1,
        description="Steps between checkpoints (trainable weights + optimizer); none = only at the end.",
    )


class SamplesSpec(_Strict):
    prompts: list[str] = Field(
        default_factory=list, description="Prompts answered before and after training."
    )
    max_new_tokens: int = Field(48, ge=1, le=4096, description="Greedy tokens generated per prompt.")


class Recipe(_Strict):
    """A complete run description. Build with ``Recipe.from_yaml(path)`` or ``Recipe.from_dict(d)``."""

    model: ModelSpec
    method: MethodSpec = Field(default_factory=MethodSpec)
    data: DataSpec | None = None
    train: TrainSpec = Field(default_factory=TrainSpec)
    hardware: HardwareSpec = Field(default_factory=HardwareSpec)
    output: OutputSpec = Field(default_factory=OutputSpec)
    samples: SamplesSpec = Field(default_factory=SamplesSpec)

    # where the recipe came from; relative data/model paths resolve against its folder
    _base_dir: Path | None = None

    @classmethod
    def from_dict(
        cls, data: dict[str, Any], *, source: str | None = None, lines: dict | None = None
    ) -> Recipe:
        if not isinstance(data, dict):
            raise RecipeError(
                [f"the recipe must be a mapping of sections (model, method, ...), got {type(data).__name__}"],
                source,
            )
        try:
            recipe = cls.model_validate(data)
        except ValidationError as exc:
            raise RecipeError(_format_errors(exc, lines or {}, source), source) from None
        return recipe

    @classmethod
    def from_yaml(cls, path: str | Path) -> Recipe:
        path = Path(path)
        if not path.is_file():
            raise RecipeError([f"recipe file not found: {path}; fix: check the path"], str(path))
        text = path.read_text(encoding="utf-8")
        try:
            data = yaml.safe_load(text)
            lines, repeated = _line_numbers(text, path)
        except yaml.YAMLError as exc:
            mark = getattr(exc, "problem_mark", None)
            where = f"{path}:{mark.line + 1}" if mark else str(path)
            problem = getattr(exc, "problem", None) or str(exc)
            raise RecipeError([f"{where}: malformed YAML: {problem}"], str(path)) from None
        if data is None:
            raise RecipeError([f"{path} is empty; fix: add at least a `model:` section"], str(path))
        if repeated:
            raise RecipeError(repeated, str(path))
        recipe = cls.from_dict(data, source=str(path), lines=lines)
        recipe._base_dir = path.resolve().parent
        return recipe

    def resolve_path(self, p: str) -> Path:
        """A path from the recipe: absolute, or relative to the recipe file's folder (else the cwd)."""
        path = Path(p).expanduser()
        if path.is_absolute():
            return path
        if self._base_dir is not None and (self._base_dir / path).exists():
            return self._base_dir / path
        return Path.cwd() / path

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump(mode="json")

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    def updated(self, changes: dict[str, Any]) -> Recipe:
        """A copy with dotted-key changes applied ({"train.batch_size": 2}), validated again."""
        data = self.to_dict()
        for dotted, value in changes.items():
            node = data
            *parents, leaf = dotted.split(".")
            for key in parents:
                if not isinstance(node.get(key), dict):
                    node[key] = {}
                node = node[key]
            node[leaf] = value
        new = Recipe.from_dict(data)
        new._base_dir = self._base_dir
        return new


# --- error formatting -------------------------------------------------------------------------------------

_FIXES = {
    "greater_than_equal": "use a value >= {ge}",
    "greater_than": "use a value > {gt}",
    "less_than_equal": "use a value <= {le}",
    "less_than": "use a value < {lt}",
}


def _field_names(model: type[BaseModel]) -> list[str]:
    return list(model.model_fields)


def _section_model(loc: tuple) -> type[BaseModel] | None:
    model: type[BaseModel] = Recipe
    for part in loc:
        field = model.model_fields.get(str(part))
        if field is None:
            return None
        ann = field.annotation
        sub = next(
            (a for a in getattr(ann, "__args__", (ann,)) if isinstance(a, type) and issubclass(a, BaseModel)),
            None,
        )
        if sub is None:
            return None
        model = sub
    return model


def _format_errors(exc: ValidationError, lines: dict, source: str | None) -> list[str]:
    out: dict[str, str] = {}  # union types yield one error per branch: keep the first per field
    for err in exc.errors():
        loc = tuple(
            p for p in err["loc"] if not (isinstance(p, str) and p.startswith(("function-", "literal[")))
        )
        # pydantic reports union branches separately; keep the first, most useful one per location
        dotted = ".".join(str(p) for p in loc) or "(recipe)"
        line = lines.get(tuple(str(p) for p in loc)) or lines.get(tuple(str(p) for p in loc[:-1]))
        where = f"{source}:{line}: " if (source and line) else ""
        value = err.get("input")
        kind = err["type"]
        ctx = err.get("ctx") or {}
        if kind == "extra_forbidden":
            parent = _section_model(loc[:-1])
            allowed = _field_names(parent) if parent else []
            close = difflib.get_close_matches(str(loc[-1]), allowed, n=1)
            hint = f"did you mean `{close[0]}`? " if close else ""
            msg = (
                f"{dotted}: unknown key `{loc[-1]}`; allowed here: {', '.join(allowed)}; "
                f"fix: {hint}remove or rename it"
            )
        elif kind == "literal_error":
            expected = ctx.get("expected", "")
            close = difflib.get_close_matches(str(value), re.findall(r"'([^']*)'", expected), n=1)
            hint = f" (did you mean '{close[0]}'?)" if close else ""
            msg = f"{dotted}: {value!r} is not allowed; allowed: {expected}; fix: pick one of them{hint}"
        elif kind in _FIXES:
            fix = _FIXES[kind].format(**{k: ctx.get(k) for k in ("ge", "gt", "le", "lt")})
            msg = f"{dotted}: {value!r} is out of range ({err['msg'].lower()}); fix: {fix}"
        elif kind == "missing":
            msg = f"{dotted}: required field is missing; fix: add `{loc[-1]}:`"
        elif kind == "value_error":
            msg = f"{dotted}: {ctx.get('error', err['msg'])}"
        else:
            msg = f"{dotted}: {value!r} is invalid ({err['msg']}); fix: give a value of the right type"
        out.setdefault(dotted, where + msg)
    return list(out.values())


def _line_numbers(text: str, path: Path) -> tuple[dict[tuple[str, ...], int], list[str]]:
    """Each key path of a YAML document -> its 1-based line number, and every key given twice in one mapping:
    YAML loaders keep the later value and drop the earlier without a word, so a recipe edited in two places
    would train with whichever came last. Keys a ``<<`` merge brings in are meant to be overridden and are not
    counted."""
    lines: dict[tuple[str, ...], int] = {}
    repeated: list[str] = []

    def walk(node: Any, where: tuple[str, ...]) -> None:
        if isinstance(node, yaml.MappingNode):
            first: dict[str, int] = {}
            for key_node, value_node in node.value:
                key, line = str(key_node.value), key_node.start_mark.line + 1
                if key_node.tag != "tag:yaml.org,2002:merge":
                    if key in first:
                        repeated.append(
                            f"{path}:{line}: {'.'.join((*where, key))} is given twice (first at line "
                            f"{first[key]}); YAML would keep this later value and silently drop the first; "
                            f"fix: keep one `{key}:` in that section"
                        )
                    else:
                        first[key] = line
                lines[(*where, key)] = line
                walk(value_node, (*where, key))
        elif isinstance(node, yaml.SequenceNode):
            for i, item in enumerate(node.value):
                lines[(*where, str(i))] = item.start_mark.line + 1
                walk(item, (*where, str(i)))

    walk(yaml.compose(text, Loader=yaml.SafeLoader), ())
    return lines, repeated
