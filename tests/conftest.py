"""Shared fixtures: an isolated cache, a loopback HTTP server, reference checkpoints."""

from __future__ import annotations

import http.server
import os
import socketserver
import sys
import threading
import time
from pathlib import Path

import pytest

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ["CONVNEXT_NO_PROGRESS"] = "1"
# The tests mirror the package's rooms (tests/weights/, tests/nets/, ...) and share helpers by
# module name (the PyTorch references in tests/references/, test_finetune_data's folders, ...).
_TESTS = Path(__file__).parent
for _folder in [_TESTS, _TESTS / "references", *sorted(p for p in _TESTS.iterdir() if p.is_dir())]:
    if _folder.name != "__pycache__":
        sys.path.insert(0, str(_folder))


@pytest.fixture(autouse=True)
def isolated_cache(tmp_path, monkeypatch):
    """Every test gets its own empty CONVNEXT_HOME and the official base URL."""
    home = tmp_path / "convnext_home"
    monkeypatch.setenv("CONVNEXT_HOME", str(home))
    monkeypatch.delenv("CONVNEXT_BASE_URL", raising=False)
    return home


class _Handler(http.server.BaseHTTPRequestHandler):
    """Serves files from ``server.root`` (with HTTP Range); ``server.mode`` simulates faults:

    ``html`` an error page; ``truncate`` half the file then hang up, every time, ignoring
    Range; ``drop`` hang up after 40 % on the first request, then serve the Range asked for;
    ``corrupt`` one byte flipped mid-file; ``trickle`` one byte every 0.1 s (at most
    ``server.trickle_seconds``); ``silent`` the headers, then nothing for
    ``server.trickle_seconds``.  Every request's path and Range header land in
    ``server.requests`` / ``server.ranges``.
    """

    def log_message(self, *args):
        pass

    def do_GET(self):  # noqa: N802 (http.server API)
        server = self.server
        server.requests.append(self.path)
        server.ranges.append(self.headers.get("Range"))
        path = server.root / self.path.lstrip("/")
        if server.mode == "html":
            body = b"<!DOCTYPE html><html><body>Access denied</body></html>"
            self.send_response(200)
            self.send_header("Content-Type", "text/html")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)
            return
        if not path.is_file():
            self.send_error(404, "Not Found")
            return
        data = path.read_bytes()
        if server.mode == "corrupt":
            middle = len(data) // 2
            data = data[:middle] + bytes([data[middle] ^ 0x40]) + data[middle + 1 :]
        etag = f'"{len(data)}-{hash(data[:4096]) & 0xFFFFFFFF:x}"'
        start = 0
        wanted = self.headers.get("Range", "")
        if_range = self.headers.get("If-Range")
        if wanted.startswith("bytes=") and server.mode != "truncate" and if_range in (None, etag):
            start = int(wanted[len("bytes=") :].split("-")[0])
        self.send_response(206 if start else 200)
        self.send_header("Content-Length", str(len(data) - start))
        self.send_header("ETag", etag)
        self.send_header("Accept-Ranges", "bytes")
        if start:
            self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        self.end_headers()
        try:
            if server.mode == "truncate" or (server.mode == "drop" and len(server.requests) == 1):
                # Announce the full length, send part of it, hang up.
                cut = len(data) // 2 if server.mode == "truncate" else len(data) * 2 // 5
                self.wfile.write(data[start:cut])
                self.wfile.flush()
                self.close_connection = True
                return
            if server.mode == "silent":
                self.wfile.flush()
                time.sleep(server.trickle_seconds)
                self.close_connection = True
                return
            if server.mode == "trickle":
                deadline = time.monotonic() + server.trickle_seconds
                for i in range(start, len(data)):
                    if time.monotonic() > deadline:
                        break
                    self.wfile.write(data[i : i + 1])
                    self.wfile.flush()
                    time.sleep(0.1)
                self.close_connection = True
                return
            self.wfile.write(data[start:])
        except (BrokenPipeError, ConnectionResetError):  # the client gave up
            self.close_connection = True


class _Server(socketserver.ThreadingMixIn, http.server.HTTPServer):
    daemon_threads = True


@pytest.fixture
def loopback_server(tmp_path):
    """An HTTP server on 127.0.0.1 serving ``server.root``; set ``server.mode`` to break it."""
    root = tmp_path / "served"
    root.mkdir()
    server = _Server(("127.0.0.1", 0), _Handler)
    server.root, server.mode, server.requests, server.ranges = root, "ok", [], []
    server.trickle_seconds = 20.0
    server.url = f"http://127.0.0.1:{server.server_address[1]}/"
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()


class _HubHandler(http.server.BaseHTTPRequestHandler):
    """The part of the Hugging Face Hub's HTTP interface ``hf_hub_download`` uses.

    ``HEAD`` / ``GET /{org}/{repo}/resolve/{revision}/{file}`` answers as the Hub does for a
    large (LFS) file: ``302`` to the file's content on a second server (the "CDN", another
    origin, so the client stops there and drops its token) with ``X-Repo-Commit``,
    ``X-Linked-Etag`` (the SHA-256), ``X-Linked-Size`` and ``ETag``; errors carry the Hub's
    ``X-Error-Code`` (``RepoNotFound``, ``RevisionNotFound``, ``EntryNotFound``, ``GatedRepo``:
    401 without token, 403 with a token that has no access); only resolve requests are
    recorded in ``hub.requests`` (method, path, authorization).  Files live in
    ``hub.root/{org}/{repo}/``; repositories in ``hub.gated`` need ``Bearer {hub.token}``.
    """

    def log_message(self, *args):
        pass

    def _error(self, status, code, message, commit=None):
        self.send_response(status)
        self.send_header("X-Error-Code", code)
        self.send_header("X-Error-Message", message)
        if commit:
            self.send_header("X-Repo-Commit", commit)
        body = message.encode()
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _resolve(self):
        import hashlib
        import re

        hub = self.server.hub
        m = re.match(r"^/(?P<repo>[^/]+/[^/]+)/resolve/(?P<rev>[^/]+)/(?P<file>.+)$", self.path)
        if not m:  # the library's other calls (e.g. /api/...): not part of a download
            return self._error(404, "RepoNotFound", "Not a resolve URL")
        hub.requests.append((self.command, self.path, self.headers.get("authorization")))
        if hub.status != 200:  # the Hub is down (HTTP 500, 503...)
            self.send_response(hub.status)
            self.send_header("Content-Length", "0")
            self.end_headers()
            return None
        repo, rev, name = m.group("repo"), m.group("rev"), m.group("file")
        folder = hub.root / repo
        if not folder.is_dir():
            return self._error(404, "RepoNotFound", f"Repository {repo} not found")
        if repo in hub.gated:
            auth = self.headers.get("authorization")
            if auth is None:
                return self._error(
                    401,
                    "GatedRepo",
                    f"Access to model {repo} is restricted. You must have access to it and be "
                    "authenticated to access it. Please log in.",
                )
            if auth != f"Bearer {hub.token}":
                return self._error(
                    403,
                    "GatedRepo",
                    f"Access to model {repo} is restricted and you are not in the authorized list.",
                )
        commit = hashlib.sha1(repo.encode()).hexdigest()
        if rev not in ("main", commit):
            return self._error(404, "RevisionNotFound", f"Invalid rev id: {rev}")
        path = folder / name
        if not path.is_file():
            return self._error(404, "EntryNotFound", f"{name} does not exist", commit)
        data = path.read_bytes()
        digest = hashlib.sha256(data).hexdigest()
        hub.blobs[digest] = data
        self.send_response(302)
        self.send_header("Location", f"{hub.cdn_url}lfs/{digest}")
        self.send_header("X-Repo-Commit", commit)
        self.send_header("X-Linked-Etag", f'"{digest}"')
        self.send_header("X-Linked-Size", str(len(data)))
        self.send_header("ETag", f'"{hashlib.sha1(data).hexdigest()}"')
        self.send_header("Content-Length", "0")
        self.end_headers()

    do_HEAD = _resolve  # noqa: N815 (http.server API)
    do_GET = _resolve  # noqa: N815

    def _json(self, status, payload):
        import json

        body = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_POST(self):  # noqa: N802 (http.server API)
        """The uploading part of the Hub's API (``create_repo``, ``upload_file`` /
        ``upload_folder`` through ``create_commit``): files come in the commit's body as
        base64 ("regular" upload mode, which the preupload answer asks for) and land in
        ``hub.root/{org}/{repo}/``, served by the resolve endpoint from then on; each write
        is recorded in ``hub.uploads`` (repo, path)."""
        import base64
        import hashlib
        import json
        import re

        hub = self.server.hub
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        path = self.path.split("?", 1)[0]
        if path == "/api/validate-yaml":
            return self._json(200, {"errors": [], "warnings": []})
        if path == "/api/repos/create":
            payload = json.loads(body)
            repo = f"{payload.get('organization') or 'user'}/{payload['name']}"
            folder = hub.root / repo
            existed = folder.is_dir()
            folder.mkdir(parents=True, exist_ok=True)
            status = 409 if existed else 200
            return self._json(status, {"url": f"{hub.url}/{repo}", "error": "exists" * existed})
        m = re.match(r"^/api/models/(?P<repo>[^/]+/[^/]+)/(?P<op>preupload|commit)/[^/]+$", path)
        if not m or not (hub.root / m.group("repo")).is_dir():
            return self._error(404, "RepoNotFound", f"No such repository or endpoint: {path}")
        repo, folder = m.group("repo"), hub.root / m.group("repo")
        if m.group("op") == "preupload":
            files = json.loads(body)["files"]
            answer = [
                {"path": f["path"], "uploadMode": "regular", "shouldIgnore": False} for f in files
            ]
            return self._json(200, {"files": answer})
        for line in body.decode().splitlines():
            item = json.loads(line)
            if item["key"] == "file":
                target = folder / item["value"]["path"]
                target.parent.mkdir(parents=True, exist_ok=True)
                target.write_bytes(base64.b64decode(item["value"]["content"]))
                hub.uploads.append((repo, item["value"]["path"]))
            elif item["key"] == "deletedFile":
                (folder / item["value"]["path"]).unlink(missing_ok=True)
            elif item["key"] != "header":
                return self._error(400, "BadRequest", f"Unsupported commit operation {item['key']}")
        commit = hashlib.sha1(repo.encode()).hexdigest()
        return self._json(
            200, {"commitUrl": f"{hub.url}/{repo}/commit/{commit}", "commitOid": commit}
        )


class _CdnHandler(http.server.BaseHTTPRequestHandler):
    """Serves ``/lfs/{sha256}`` of the Hub's files, with HTTP Range.  ``hub.mode``: ``ok``;
    ``short`` the file cut to half (a consistent, shorter response: the size the Hub announced
    is not met); ``drop`` the first response hangs up after 80 % (the client resumes from what
    it wrote: ``huggingface_hub`` writes in 10 MB pieces); ``silent`` the headers, then nothing
    (for ``hub.slow_seconds``); ``trickle`` one byte every 0.1 s (for ``hub.slow_seconds``)."""

    def log_message(self, *args):
        pass

    def do_GET(self):  # noqa: N802 (http.server API)
        hub = self.server.hub
        hub.cdn_requests.append(
            (self.path, self.headers.get("Range"), self.headers.get("authorization"))
        )
        data = hub.blobs.get(self.path.rsplit("/", 1)[-1])
        if data is None:
            self.send_error(404)
            return
        if hub.mode == "short":
            data = data[: len(data) // 2]
        start = 0
        wanted = self.headers.get("Range", "")
        if wanted.startswith("bytes="):
            start = int(wanted[len("bytes=") :].split("-")[0])
        self.send_response(206 if start else 200)
        self.send_header("Content-Length", str(len(data) - start))
        self.send_header("Accept-Ranges", "bytes")
        if start:
            self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        self.end_headers()
        try:
            if hub.mode == "drop" and len(hub.cdn_requests) == 1:
                self.wfile.write(data[start : len(data) * 4 // 5])
                self.wfile.flush()
                self.close_connection = True
                return
            if hub.mode in ("silent", "trickle"):
                self.wfile.flush()
                deadline = time.monotonic() + hub.slow_seconds
                for i in range(start, len(data)):
                    if time.monotonic() > deadline:
                        break
                    if hub.mode == "trickle":
                        self.wfile.write(data[i : i + 1])
                        self.wfile.flush()
                    time.sleep(0.1)
                self.close_connection = True
                return
            self.wfile.write(data[start:])
        except (BrokenPipeError, ConnectionResetError):
            self.close_connection = True


@pytest.fixture
def hub_server(tmp_path, monkeypatch):
    """A loopback Hugging Face Hub (and its "CDN") that ``huggingface_hub`` downloads from and
    uploads to (``create_repo``, ``upload_folder``): ``HF_ENDPOINT``, a fresh Hugging Face
    cache and no token.  Put files under
    ``hub.root / "org/repo"``; add a repository to ``hub.gated`` to gate it behind
    ``hub.token``; set ``hub.mode`` to break the downloads, ``hub.status`` to another HTTP
    status than 200 for a Hub that is down."""
    import types

    import huggingface_hub.constants  # the submodule: a package attribute only once imported
    import huggingface_hub.hf_api

    hub = types.SimpleNamespace(
        root=tmp_path / "hub",
        gated=set(),
        token="hf_loopbacktoken0123456789",
        mode="ok",
        status=200,
        slow_seconds=20.0,
        blobs={},
        requests=[],
        cdn_requests=[],
        uploads=[],
    )
    hub.root.mkdir()
    servers = []
    for handler in (_HubHandler, _CdnHandler):
        server = _Server(("127.0.0.1", 0), handler)
        server.hub = hub
        threading.Thread(target=server.serve_forever, daemon=True).start()
        servers.append(server)
    hub.url = f"http://127.0.0.1:{servers[0].server_address[1]}"
    hub.cdn_url = f"http://127.0.0.1:{servers[1].server_address[1]}/"
    hub.cache = tmp_path / "hf_home" / "hub"
    monkeypatch.setattr(huggingface_hub.constants, "ENDPOINT", hub.url)
    # The module-level HfApi behind huggingface_hub.create_repo, upload_folder...: its endpoint
    # was read at import.
    monkeypatch.setattr(huggingface_hub.hf_api.api, "endpoint", hub.url)
    template = hub.url + "/{repo_id}/resolve/{revision}/{filename}"
    monkeypatch.setattr(huggingface_hub.constants, "HUGGINGFACE_CO_URL_TEMPLATE", template)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(hub.cache))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_TOKEN_PATH", str(tmp_path / "no_token"))
    # The same settings for child processes (the command line).
    monkeypatch.setenv("HF_ENDPOINT", hub.url)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf_home"))
    monkeypatch.setenv("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    for name in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_HUB_OFFLINE", "HF_HUB_CACHE"):
        monkeypatch.delenv(name, raising=False)
    yield hub
    for server in servers:
        server.shutdown()
        server.server_close()


@pytest.fixture
def fifo():
    """``fifo(path)`` makes a named pipe at ``path``.  Opening one for reading waits for a
    writer forever; so that a regression that opens it fails instead of hanging the suite, a
    guard opens the writing end after ``FIFO_GUARD_SECONDS`` when a reader waits (the reader
    then sees an empty file), and the test fails at its end."""
    made, unblocked, stop = [], [], threading.Event()

    def guard():
        deadline = time.monotonic() + FIFO_GUARD_SECONDS
        while not stop.wait(0.2):
            if time.monotonic() < deadline:
                continue
            for path in made:
                try:  # succeeds only while a reader waits
                    fd = os.open(path, os.O_WRONLY | os.O_NONBLOCK)
                except OSError:
                    continue
                os.close(fd)
                unblocked.append(path)

    thread = threading.Thread(target=guard, daemon=True)
    thread.start()

    def make(path):
        os.mkfifo(path)
        made.append(Path(path))
        return Path(path)

    yield make
    stop.set()
    thread.join()
    assert not unblocked, f"a FIFO was opened (the guard had to unblock it): {unblocked}"


#: How long the ``fifo`` guard lets a reader of a named pipe wait before unblocking it.
FIFO_GUARD_SECONDS = 60


@pytest.fixture(scope="session")
def reference_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("reference")


@pytest.fixture(scope="session")
def tiny_reference(reference_dir):
    """A transformers ConvNext-T (1000 classes, random weights) and its official checkpoint."""
    import torch_reference as ref

    from convnext_keras import registry

    spec = registry.VARIANTS["tiny"]
    model = ref.hf_model(spec.depths, spec.dims, 1000, seed=1)
    path = ref.save_official(model, reference_dir / "convnext_tiny_1k_224_ema.pth")
    return model, path
