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
sys.path.insert(0, str(Path(__file__).parent))


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
    ``server.trickle_seconds``).  Every request's path and Range header land in
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
