"""The Hugging Face Hub, through ``huggingface_hub``: one file of a model repository, cached, with errors in
fitune's words.

The endpoint (``HF_ENDPOINT``), the cache (``HF_HUB_CACHE``, else ``HF_HOME``/hub) and offline mode
(``HF_HUB_OFFLINE``) are read from the environment at each call, not when ``huggingface_hub`` is imported, so
a setting made after the import still counts. A file already in the cache is used without a request.
"""

from __future__ import annotations

import os
import socket
from pathlib import Path
from urllib.parse import urlsplit

from fitune.errors import ModelSourceError

DEFAULT_ENDPOINT = "https://huggingface.co"


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


def _offline_error(repo_id: str, what: str, why: str) -> ModelSourceError:
    return ModelSourceError(
        f"model.source: {what} of hub id {repo_id!r} is not in the local Hugging Face cache ({cache_dir()}), "
        f"and {why}; fix: run online once (unset HF_HUB_OFFLINE), or on a machine with access run "
        f"`hf download {repo_id}` and copy the cache, or point model.source at a local folder or .gguf file"
    )


def fetch_file(repo_id: str, filename: str, revision: str | None = None) -> Path:
    """``filename`` of the model repository ``repo_id`` at ``revision`` (branch, tag or commit; None = main):
    from the cache when it is there, else downloaded into it. Failures raise ModelSourceError with the fix."""
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import (
        GatedRepoError,
        HfHubHTTPError,
        LocalEntryNotFoundError,
        RemoteEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    options = {
        "repo_id": repo_id,
        "filename": filename,
        "revision": revision,
        "cache_dir": str(cache_dir()),
        "endpoint": endpoint(),
    }
    try:
        return Path(hf_hub_download(**options, local_files_only=True))
    except LocalEntryNotFoundError:
        pass  # not cached
    if offline():
        raise _offline_error(repo_id, filename, "HF_HUB_OFFLINE is set") from None
    unreachable = _unreachable()
    if unreachable is not None:  # said at once, not after the client's retries
        raise _offline_error(repo_id, filename, f"the Hub at {endpoint()} cannot be reached ({unreachable})")
    from huggingface_hub import constants

    constants.HF_HUB_OFFLINE = False  # the environment now says online, whatever it said at the import
    page = f"{endpoint()}/{repo_id}"
    try:
        return Path(hf_hub_download(**options))
    except GatedRepoError:
        raise ModelSourceError(
            f"model.source: {repo_id} is a gated model and this machine has no access to it; fix: sign in at "
            f"{page}, accept its licence there, then set HF_TOKEN to an access token of that account "
            "(https://huggingface.co/settings/tokens)"
        ) from None
    except RevisionNotFoundError:
        raise ModelSourceError(
            f"model.revision: {revision!r} is not a branch, tag or commit of {repo_id}; fix: name one listed at "
            f"{page}, or remove model.revision for the main branch"
        ) from None
    except RepositoryNotFoundError:
        raise ModelSourceError(
            f"model.source: no model repository {repo_id!r} at {endpoint()} (or it is private); fix: check the "
            "id (owner/name, as in its address), and for a private model set HF_TOKEN to a token with access"
        ) from None
    except RemoteEntryNotFoundError:
        raise ModelSourceError(
            f"model.source: {repo_id} has no {filename}{f' at revision {revision}' if revision else ''}, so it "
            "is not a transformers model fitune can read; fix: name the repository of the model's "
            "transformers weights"
        ) from None
    except LocalEntryNotFoundError as exc:  # no connection, or the Hub unreachable
        why = f"the Hub at {endpoint()} cannot be reached ({str(exc).splitlines()[0][:160]})"
        raise _offline_error(repo_id, filename, why) from None
    except HfHubHTTPError as exc:
        status = exc.response.status_code if exc.response is not None else "no"
        raise ModelSourceError(
            f"model.source: the Hub answered {status} for {filename} of {repo_id}: "
            f"{str(exc).splitlines()[0][:200]}; fix: try again later, or check HF_TOKEN and HF_ENDPOINT"
        ) from None
    except OSError as exc:
        raise _offline_error(
            repo_id, filename, f"the Hub at {endpoint()} cannot be reached ({exc})"
        ) from None
