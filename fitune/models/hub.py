"""The Hugging Face Hub, through ``huggingface_hub``: files of a model (or dataset) repository, cached, with
errors in fitune's words.

The endpoint (``HF_ENDPOINT``), the cache (``HF_HUB_CACHE``, else ``HF_HOME``/hub) and offline mode
(``HF_HUB_OFFLINE``) are read from the environment at each call, not when ``huggingface_hub`` is imported, so
a setting made after the import still counts. A file already in the cache is used without a request.
"""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

from fitune.errors import ModelSourceError
from fitune.progress import byte_bar

DEFAULT_ENDPOINT = "https://huggingface.co"


@dataclass(frozen=True)
class RepoKind:
    """What differs between a model and a dataset repository: the recipe fields that name it, its type for
    the client, and its folder prefixes in the cache and on the Hub."""

    noun: str  # model | dataset
    field: str  # the recipe field naming the repository
    revision_field: str
    repo_type: str | None  # the client's repo_type (None: a model)
    folder_prefix: str  # the cache's folder for a repository: {prefix}--owner--name
    page_prefix: str  # the repository's page: {endpoint}/{prefix}owner/name

    def folder(self, repo_id: str) -> Path:
        """The repository's folder in the cache (the client's layout)."""
        return cache_dir() / f"{self.folder_prefix}--{repo_id.replace('/', '--')}"

    def page(self, repo_id: str) -> str:
        return f"{endpoint()}/{self.page_prefix}{repo_id}"


MODEL = RepoKind("model", "model.source", "model.revision", None, "models", "")
TOKENIZER = RepoKind("model", "model.tokenizer", "model.revision", None, "models", "")
DATASET = RepoKind("dataset", "data.hub", "data.revision", "dataset", "datasets", "datasets/")


def endpoint() -> str:
    return os.environ.get("HF_ENDPOINT", DEFAULT_ENDPOINT).rstrip("/")


def cache_dir() -> Path:
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"]).expanduser()
    home = os.environ.get("HF_HOME") or os.path.join(
        os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "huggingface"
    )
    return Path(home).expanduser() / "hub"


def offline() -> bool:
    value = os.environ.get("HF_HUB_OFFLINE") or os.environ.get("TRANSFORMERS_OFFLINE") or ""
    return value.strip().lower() in ("1", "on", "yes", "true")


def _unreachable(timeout: float = 5.0) -> str | None:
    """Why the endpoint's host cannot be reached (no name, nothing listening), or None when it can (or a
    proxy stands between, which only the client's request can test)."""
    if any(
        os.environ.get(name)
        for name in ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy", "ALL_PROXY")
    ):
        return None
    parts = urlsplit(endpoint())
    port = parts.port or (443 if parts.scheme == "https" else 80)
    try:
        socket.create_connection((parts.hostname, port), timeout=timeout).close()
    except OSError as exc:
        return f"{parts.hostname}:{port}: {exc.strerror or exc}"
    return None


def _offline_error(repo_id: str, what: str, why: str, kind: RepoKind = MODEL) -> ModelSourceError:
    if kind.repo_type is None:
        download, local = f"hf download {repo_id}", f"point {kind.field} at a local folder or .gguf file"
    else:
        download, local = f"hf download {repo_id} --repo-type dataset", "point data.path at a local file"
    return ModelSourceError(
        f"{kind.field}: {what} of hub id {repo_id!r}: not in the local Hugging Face cache ({cache_dir()}), "
        f"and {why}; fix: run online once (unset HF_HUB_OFFLINE), or on a machine with access run "
        f"`{download}` and copy the cache, or {local}"
    )


def go_online(repo_id: str, what: str, kind: RepoKind = MODEL) -> None:
    """Raise when offline or the endpoint cannot be reached (said at once, not after the client's retries);
    else tell the client it is online, whatever the environment said when it was imported."""
    if offline():
        raise _offline_error(repo_id, what, "HF_HUB_OFFLINE is set", kind)
    unreachable = _unreachable()
    if unreachable is not None:
        raise _offline_error(
            repo_id, what, f"the Hub at {endpoint()} cannot be reached ({unreachable})", kind
        )
    from huggingface_hub import constants

    constants.HF_HUB_OFFLINE = False


def fetch_file(repo_id: str, filename: str, revision: str | None = None) -> Path:
    """``filename`` of the model repository ``repo_id`` at ``revision`` (branch, tag or commit; None = main):
    from the cache when it is there, else downloaded into it. Failures raise ModelSourceError with the fix."""
    from huggingface_hub import hf_hub_download, try_to_load_from_cache
    from huggingface_hub.errors import LocalEntryNotFoundError, RemoteEntryNotFoundError

    options = {
        "repo_id": repo_id,
        "filename": filename,
        "revision": revision,
        "cache_dir": str(cache_dir()),
        "endpoint": endpoint(),
    }
    # a purely local lookup: the client's own local_files_only call still builds request headers, which
    # fetches a registry from the Hub (once a day) on a run that needs nothing from it
    cached = try_to_load_from_cache(repo_id, filename, cache_dir=cache_dir(), revision=revision)
    if isinstance(cached, str):
        return Path(cached)
    go_online(repo_id, filename)
    try:
        with _api_errors(repo_id, revision):
            return Path(hf_hub_download(**options))
    except RemoteEntryNotFoundError:
        raise ModelSourceError(
            f"model.source: {repo_id} has no {filename}{f' at revision {revision}' if revision else ''}, so it "
            "is not a transformers model fitune can read; fix: name the repository of the model's "
            "transformers weights"
        ) from None
    except LocalEntryNotFoundError as exc:  # no connection, or the Hub unreachable
        why = f"the Hub at {endpoint()} cannot be reached ({str(exc).splitlines()[0][:160]})"
        raise _offline_error(repo_id, filename, why) from None
    except OSError as exc:
        raise _offline_error(
            repo_id, filename, f"the Hub at {endpoint()} cannot be reached ({exc})"
        ) from None


# --- a model's files -----------------------------------------------------------------------------------------

# what training reads: weights (safetensors only), config, tokenizer and generation files
WANTED = (
    ".safetensors",
    ".safetensors.index.json",
    "config.json",
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
    "chat_template.jinja",
    "chat_template.json",
)
PICKLED = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
DISK_MARGIN = 2**30  # kept free beyond the download, for the run's own files
ATTEMPTS = 3  # per file; a dropped connection resumes where the partial file ends


def _wanted(path: str) -> bool:
    return "/" not in path and path.endswith(WANTED)


def _api_errors(repo_id: str, revision: str | None, kind: RepoKind = MODEL):
    """The context that turns the client's errors for ``repo_id`` into ModelSourceError."""
    import contextlib

    from huggingface_hub.errors import (
        GatedRepoError,
        HfHubHTTPError,
        RemoteEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    page, field = kind.page(repo_id), kind.field

    @contextlib.contextmanager
    def errors():
        try:
            yield
        except GatedRepoError:
            raise ModelSourceError(
                f"{field}: {repo_id} is a gated {kind.noun} and this machine has no access to it; fix: sign in "
                f"at {page}, accept its licence there, then set HF_TOKEN to an access token of that account "
                "(https://huggingface.co/settings/tokens)"
            ) from None
        except RevisionNotFoundError:
            raise ModelSourceError(
                f"{kind.revision_field}: {revision!r} is not a branch, tag or commit of {repo_id}; fix: name one "
                f"listed at {page}, or remove {kind.revision_field} for the main branch"
            ) from None
        except RepositoryNotFoundError:
            raise ModelSourceError(
                f"{field}: no {kind.noun} repository {repo_id!r} at {endpoint()} (or it is private); fix: check "
                f"the id (owner/name, as in its address), and for a private {kind.noun} set HF_TOKEN to a token "
                "with access"
            ) from None
        except RemoteEntryNotFoundError:
            raise  # the caller names the missing file
        except HfHubHTTPError as exc:
            status = exc.response.status_code if exc.response is not None else "no"
            raise ModelSourceError(
                f"{field}: the Hub answered {status} for {repo_id}: {str(exc).splitlines()[0][:200]}; fix: "
                "try again later, or check HF_TOKEN and HF_ENDPOINT"
            ) from None

    return errors()


def _forwarding_tqdm(advance):
    """A tqdm class that draws nothing and passes each update's byte count to ``advance``."""
    from tqdm.auto import tqdm

    counted: dict[str, int] = {}  # bytes passed on per file, so that a new attempt does not count them twice

    class Forward(tqdm):
        def __init__(self, *args, **kwargs):
            kwargs["disable"] = True
            super().__init__(*args, **kwargs)
            self.file = str(kwargs.get("desc"))
            initial = kwargs.get("initial") or 0  # the bytes a resumed file already has
            advance(max(0, initial - counted.get(self.file, 0)))
            counted[self.file] = max(initial, counted.get(self.file, 0))

        def update(self, n=1):
            counted[self.file] = counted.get(self.file, 0) + (n or 0)
            advance(n or 0)
            return super().update(n)

    return Forward


PARTIAL = ".fitune-partial"  # a blob's bytes received so far, kept across attempts and processes


def _blob_name(entry) -> str:
    """The name the client gives a file's content in the cache's blobs: its etag (sha256 for an LFS file, the
    git blob id otherwise)."""
    return entry.lfs.sha256 if entry.lfs else entry.blob_id


def _fetch_blob(repo_id: str, entry, commit: str, kind: RepoKind, tqdm_class) -> None:
    """Download ``entry`` (an entry of ``repo_files``) at ``commit`` into the cache's blobs, appending to the
    partial file an earlier attempt, or an earlier process, left (a ranged request).

    huggingface_hub deletes a cut download (each process writes a file of its own), so a run killed 90% into
    a 5 GB shard starts that shard again (huggingface/huggingface_hub#4196); fitune keeps the partial file
    under the client's own lock for that blob, then checks the size, and a resumed file's sha256 where the
    Hub lists one, before moving it in place."""
    import hashlib

    from filelock import FileLock
    from huggingface_hub import hf_hub_url
    from huggingface_hub.file_download import http_get
    from huggingface_hub.utils import build_hf_headers

    name = _blob_name(entry)
    repo_cache = kind.folder(repo_id)
    blob = repo_cache / "blobs" / name
    if blob.exists():
        return
    lock = cache_dir() / ".locks" / repo_cache.name / f"{name}.lock"  # the path the client locks too
    lock.parent.mkdir(parents=True, exist_ok=True)
    blob.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(lock)):
        if blob.exists():
            return
        partial = blob.with_name(name + PARTIAL)
        have = partial.stat().st_size if partial.is_file() else 0
        if have > entry.size:  # not a prefix of this file
            have = 0
        url = hf_hub_url(repo_id, entry.path, repo_type=kind.repo_type, revision=commit, endpoint=endpoint())
        with open(partial, "r+b" if have else "wb", buffering=0) as out:  # unbuffered: a kill loses no byte
            out.seek(have)
            out.truncate()
            http_get(
                url,
                out,
                resume_size=have,
                headers=build_hf_headers(),
                expected_size=entry.size,
                displayed_filename=entry.path,
                tqdm_class=tqdm_class,
            )
        size = partial.stat().st_size
        if size != entry.size:
            raise OSError(f"{entry.path}: received {size} of {entry.size} bytes")
        if have and entry.lfs:  # a resumed file: its bytes came from two requests, maybe two processes
            digest = hashlib.sha256()
            with open(partial, "rb") as f:
                for chunk in iter(lambda: f.read(2**20), b""):
                    digest.update(chunk)
            if digest.hexdigest() != entry.lfs.sha256:
                partial.unlink()
                raise OSError(f"{entry.path}: the resumed file does not match its sha256; it starts again")
        os.replace(partial, blob)


def _download_file(
    repo_id: str, entry, commit: str, revision: str | None, tqdm_class, kind: RepoKind = MODEL
) -> Path:
    """One file (an entry of ``repo_files``) of the snapshot at ``commit``, tried ATTEMPTS times, each
    resuming from the bytes already received (``_fetch_blob``); the client then links it into the snapshot."""
    from huggingface_hub import hf_hub_download

    for attempt in range(1, ATTEMPTS + 1):
        try:
            with _api_errors(repo_id, revision, kind):
                _fetch_blob(repo_id, entry, commit, kind, tqdm_class)
                return Path(
                    hf_hub_download(
                        repo_id,
                        entry.path,
                        repo_type=kind.repo_type,
                        revision=commit,
                        cache_dir=str(cache_dir()),
                        endpoint=endpoint(),
                        tqdm_class=tqdm_class,
                    )
                )
        except ModelSourceError:
            raise
        except Exception as exc:  # noqa: BLE001 - the connection failed past the client's own retries
            if attempt == ATTEMPTS:
                raise ModelSourceError(
                    f"{kind.field}: downloading {entry.path} of {repo_id} failed {ATTEMPTS} times "
                    f"({str(exc).splitlines()[0][:160]}); fix: run the same command again: it resumes from "
                    "the bytes already received"
                ) from None
    raise AssertionError("unreachable")


def download_model(
    repo_id: str, revision: str | None = None, *, show_progress: bool = True
) -> tuple[Path, str]:
    """Download what training reads of ``repo_id`` at ``revision`` into the Hugging Face cache; returns the
    snapshot folder and the commit. Pickle-only weights are refused, and the free disk is checked against
    the sizes the Hub reports before the first byte."""
    go_online(repo_id, "the weights")
    commit, files = repo_files(repo_id, revision)
    names = [f.path for f in files]
    if not any(n.endswith(".safetensors") for n in names):
        pickles = [n for n in names if n.endswith(PICKLED)]
        what = (
            f"its weights are pickle files only ({', '.join(pickles[:3])})"
            if pickles
            else "it holds no weights"
        )
        raise ModelSourceError(
            f"model.source: {repo_id} has no .safetensors weights{f' at {revision}' if revision else ''}: {what}, "
            "and fitune never unpickles model files (loading one can run any code); fix: use a repository of "
            "the model with safetensors weights, or convert these on a machine you trust and point "
            "model.source at the folder"
        )
    # weights last: a snapshot cut short then holds the shard index and lacks a shard, which reads as incomplete
    chosen = sorted(
        (f for f in files if _wanted(f.path)), key=lambda f: (f.path.endswith(".safetensors"), f.path)
    )
    paths = download_files(repo_id, revision, commit, chosen, MODEL, show_progress=show_progress)
    return paths[-1].parent, commit


TOKENIZER_FILES = tuple(name for name in WANTED if "safetensors" not in name)


def download_tokenizer(repo_id: str) -> Path:
    """Download the tokenizer files (and config.json) of ``repo_id``'s main branch into the Hugging Face cache,
    no weights; returns the snapshot folder."""
    go_online(repo_id, "the tokenizer", TOKENIZER)
    commit, files = repo_files(repo_id, None, TOKENIZER)
    chosen = sorted(
        (f for f in files if "/" not in f.path and f.path.endswith(TOKENIZER_FILES)), key=lambda f: f.path
    )
    if not any(f.path != "config.json" and not f.path.endswith("generation_config.json") for f in chosen):
        raise ModelSourceError(
            f"model.tokenizer: {repo_id} holds no tokenizer files (tokenizer.json, tokenizer_config.json, "
            "tokenizer.model, vocab.json); fix: name the repository of the model whose tokenizer you want"
        )
    paths = download_files(repo_id, None, commit, chosen, TOKENIZER, show_progress=False)
    return paths[0].parent


def repo_files(repo_id: str, revision: str | None, kind: RepoKind = MODEL) -> tuple[str, list]:
    """The commit ``revision`` (None: main) names, and the files of the repository there (with sizes)."""
    from huggingface_hub import HfApi

    api = HfApi(endpoint=endpoint())
    with _api_errors(repo_id, revision, kind):
        info = api.dataset_info if kind is DATASET else api.model_info
        commit = info(repo_id, revision=revision).sha
        tree = api.list_repo_tree(repo_id, repo_type=kind.repo_type, revision=commit, recursive=True)
        return commit, [f for f in tree if hasattr(f, "size")]


def download_files(
    repo_id: str,
    revision: str | None,
    commit: str,
    chosen: list,
    kind: RepoKind,
    *,
    show_progress: bool = True,
) -> list[Path]:
    """Download ``chosen`` (entries of ``repo_files``) at ``commit`` into the cache, in order, after a free-disk
    check against the sizes the Hub reports for the files not cached yet, with a byte progress bar; then
    record which commit ``revision`` named, for later offline runs. Returns the files' paths."""
    import shutil

    folder = cache_dir()
    repo_cache = kind.folder(repo_id)
    have = {p.name for p in (repo_cache / "blobs").iterdir()} if (repo_cache / "blobs").is_dir() else set()
    todo = [f for f in chosen if _blob_name(f) not in have]
    need = sum(f.size or 0 for f in todo)
    folder.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(folder).free
    if need and need + DISK_MARGIN > free:
        raise ModelSourceError(
            f"{kind.field}: {repo_id} needs {need / 2**30:.2f} GiB in {folder} (plus {DISK_MARGIN / 2**30:.0f} GiB "
            f"kept free) and the disk has {free / 2**30:.2f} GiB; fix: free space there, or set HF_HUB_CACHE to a "
            "folder on a larger disk"
        )
    with byte_bar(f"downloading {repo_id}", need, show=show_progress, speed=True) as update:
        tqdm_class = _forwarding_tqdm(
            (lambda n: update(advance=n)) if update is not None else (lambda n: None)
        )
        paths = [_download_file(repo_id, f, commit, revision, tqdm_class, kind) for f in chosen]
    name = revision or "main"
    if name != commit:  # a branch or tag: later offline runs find the commit through it
        ref = repo_cache / "refs" / name
        ref.parent.mkdir(parents=True, exist_ok=True)
        ref.write_text(commit)
    return paths


def cached_commit(repo_id: str, revision: str | None, kind: RepoKind = MODEL) -> str | None:
    """The commit ``revision`` names in the cache, without a request: a commit hash itself, or what the
    cache's ref for the branch or tag says; None when the cache does not know it."""
    import re

    if revision is not None and re.fullmatch(r"[0-9a-f]{40}", revision):
        return revision
    ref = kind.folder(repo_id) / "refs" / (revision or "main")
    try:
        return ref.read_text().strip() or None
    except OSError:
        return None


def snapshot_complete(folder: Path) -> bool:
    """A snapshot holds every weight file its shard index names (or, unsharded, a safetensors file)."""
    import json

    index = folder / "model.safetensors.index.json"
    if index.is_file():
        try:
            shards = set(json.loads(index.read_text())["weight_map"].values())
        except (ValueError, KeyError, TypeError, AttributeError):
            return False
        return all((folder / shard).is_file() for shard in shards)
    return any(folder.glob("*.safetensors"))
