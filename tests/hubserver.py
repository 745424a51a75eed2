"""A small stand-in for the Hugging Face Hub on 127.0.0.1, for the real ``huggingface_hub`` client to talk to.

It answers what the client asks the way the Hub does: a file (``HEAD`` and ``GET /{repo}/resolve/{revision}/
{path}``, ``/datasets/{repo}/...`` for a dataset) with the commit in ``X-Repo-Commit``, the content's hash as
``ETag`` and byte ranges; a repository's commit (``/api/models/{repo}/revision/{revision}``, ``/api/datasets/...``
for a dataset) and file list with sizes (``/api/models/{repo}/tree/{revision}``); errors as an HTTP status with ``X-Error-Code`` (RepoNotFound for a private or unknown repository,
GatedRepo, RevisionNotFound, EntryNotFound). Every request is logged, so a test can tell that a second run made
none; ``drop_after`` cuts the first full download of a file after that many bytes, as a dropped connection;
``stall_after`` sends that many bytes of it and then nothing until ``release`` is set, for a test to kill the
downloading process midway.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import re
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


@dataclass
class Repo:
    files: dict[str, dict[str, bytes]]  # commit -> path -> content
    refs: dict[str, str]  # branch or tag -> commit
    gated: bool = False
    private: bool = False
    drop_after: dict[str, int] = field(default_factory=dict)  # path -> bytes sent before the first cut
    stall_after: dict[str, int] = field(default_factory=dict)  # path -> bytes sent before the first stall

    def commit(self, revision: str) -> str | None:
        if revision in self.files:
            return revision
        return self.refs.get(revision)


@dataclass
class FakeHub:
    repos: dict[str, Repo] = field(default_factory=dict)
    requests: list[tuple[str, str]] = field(default_factory=list)
    ranges: list[tuple[str, str]] = field(default_factory=list)  # (path, Range header) of ranged requests
    url: str = ""
    stalled: threading.Event = field(default_factory=threading.Event)  # set when a stalled file stops
    release: threading.Event = field(default_factory=threading.Event)  # set to end the stall (cut)

    def add(
        self, repo_id: str, files: dict[str, bytes], *, tag: str | None = None, dataset: bool = False, **flags
    ) -> str:
        """A new commit of ``repo_id`` (a model, or a dataset) holding ``files``, made the head of main (and
        ``tag``); its hash. A dataset is kept as ``datasets/owner/name``."""
        key = f"datasets/{repo_id}" if dataset else repo_id
        commit = hashlib.sha1(repr((key, sorted(files.items()))).encode()).hexdigest()
        repo = self.repos.setdefault(key, Repo({}, {}, **flags))
        repo.files[commit] = dict(files)
        repo.refs["main"] = commit
        if tag:
            repo.refs[tag] = commit
        return commit


RESOLVE = re.compile(r"^/(?P<repo>(?:datasets/)?[^/]+/[^/]+)/resolve/(?P<revision>[^/]+)/(?P<path>.+)$")
API = re.compile(
    r"^/api/(?P<type>models|datasets)/(?P<repo>[^/]+/[^/]+)(?:/(?P<kind>revision|tree)/(?P<revision>[^/]+))?$"
)


def lfs(path: str) -> bool:
    return path.endswith(".safetensors")


def _sha256(content: bytes) -> str:
    return hashlib.sha256(content).hexdigest()


def _handler(hub: FakeHub):
    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args) -> None:  # quiet
            pass

        def _error(self, status: int, code: str) -> None:
            self.send_response(status)
            self.send_header("X-Error-Code", code)
            self.send_header("X-Error-Message", code)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def _json(self, data) -> None:
            body = json.dumps(data).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def _serve(self, body: bool) -> None:
            hub.requests.append((self.command, self.path))
            path = self.path.split("?")[0]
            match = RESOLVE.match(path) or API.match(path)
            key = None
            if match:
                key = (
                    f"datasets/{match['repo']}"
                    if match.groupdict().get("type") == "datasets"
                    else match["repo"]
                )
            repo = hub.repos.get(key) if key else None
            if repo is None or repo.private:
                return self._error(401, "RepoNotFound")
            if repo.gated:
                return self._error(403, "GatedRepo")
            api = "kind" in match.groupdict()
            commit = repo.commit(match["revision"] or "main")
            if commit is None:
                return self._error(404, "RevisionNotFound")
            files = repo.files[commit]
            if api and match["kind"] != "tree":  # the repository's info, at a revision or at main
                return self._json(
                    {"id": match["repo"], "sha": commit, "siblings": [{"rfilename": p} for p in files]}
                )
            if api:
                return self._json(
                    [
                        {"type": "file", "path": p, "size": len(c), "oid": _sha256(c)}
                        # weights are LFS files on the Hub: the tree gives their sha256
                        | ({"lfs": {"oid": _sha256(c), "size": len(c), "pointerSize": 134}} if lfs(p) else {})
                        for p, c in sorted(files.items())
                    ]
                )
            content = files.get(match["path"])
            if content is None:
                return self._error(404, "EntryNotFound")
            start, end = 0, len(content)
            ranged = re.match(r"bytes=(\d+)-(\d*)", self.headers.get("Range", ""))
            if ranged:
                hub.ranges.append((path, self.headers["Range"]))
                start = int(ranged[1])
                end = int(ranged[2]) + 1 if ranged[2] else len(content)
            self.send_response(206 if ranged else 200)
            self.send_header("X-Repo-Commit", commit)
            self.send_header("ETag", f'"{_sha256(content)}"')
            self.send_header("Content-Length", str(end - start))
            if ranged:
                self.send_header("Content-Range", f"bytes {start}-{end - 1}/{len(content)}")
            self.end_headers()
            if body:
                cut = repo.drop_after.pop(match["path"], None) if not ranged else None
                stall = repo.stall_after.pop(match["path"], None) if not ranged else None
                if stall is not None:  # send part, then nothing until released: a download to kill midway
                    self.wfile.write(content[start : start + stall])
                    self.wfile.flush()
                    hub.stalled.set()
                    hub.release.wait(120)
                    self.close_connection = True
                    return
                self.wfile.write(content[start:end] if cut is None else content[start : start + cut])
                if cut is not None:
                    self.close_connection = True  # the rest never comes: the client sees the body cut short

        def do_HEAD(self) -> None:  # noqa: N802 - the http.server protocol
            self._serve(body=False)

        def do_GET(self) -> None:  # noqa: N802
            self._serve(body=True)

    return Handler


def start(hub: FakeHub) -> ThreadingHTTPServer:
    """Serve ``hub`` on a free port of 127.0.0.1 in a daemon thread; sets ``hub.url``."""
    server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(hub))
    hub.url = f"http://127.0.0.1:{server.server_address[1]}"
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


@contextlib.contextmanager
def serving(fake: FakeHub, tmp_path, monkeypatch):
    """``fake`` served, with the environment pointing the client at it and an empty Hugging Face cache."""
    server = start(fake)
    monkeypatch.setenv("HF_ENDPOINT", fake.url)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf-cache"))
    monkeypatch.setenv("NO_PROXY", "127.0.0.1")
    for name in ("HF_HUB_OFFLINE", "HF_TOKEN", "HF_HOME"):
        monkeypatch.delenv(name, raising=False)
    try:
        yield fake
    finally:
        fake.release.set()  # a stalled answer ends, so that closing the server does not wait for it
        server.shutdown()
        server.server_close()
