"""Download -> verify -> convert -> cache, end to end against a loopback HTTP server."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch_reference as ref

import convnext_keras as ck
from convnext_keras import hub, registry

TINY = registry.CHECKPOINTS["convnext_tiny_1k_224"]


@pytest.fixture
def mirror(loopback_server, tiny_reference, monkeypatch):
    """The loopback server serving the reference ConvNeXt-T under its official file name."""
    _, path = tiny_reference
    shutil.copy(path, loopback_server.root / TINY.filename)
    monkeypatch.setenv("CONVNEXT_BASE_URL", loopback_server.url)
    return loopback_server


def _cache_files(home):
    return sorted(str(p.relative_to(home)) for p in home.rglob("*") if p.is_file())


def test_download_convert_cache_then_offline(mirror, tiny_reference, isolated_cache):
    _, local = tiny_reference
    x = np.random.default_rng(0).standard_normal((1, 96, 96, 3)).astype("float32")
    expected = ck.load_model("convnext_tiny_1k_224", weights=local).predict_on_batch(x)

    model = ck.load_model("convnext_tiny_1k_224")
    np.testing.assert_array_equal(model.predict_on_batch(x), expected)
    assert mirror.requests == [f"/{TINY.filename}"]
    files = _cache_files(isolated_cache)
    assert f"checkpoints/{TINY.filename}" in files
    assert "keras/convnext_tiny_1k_224.safetensors" in files
    assert not [f for f in files if f.endswith(".part")]
    assert hub.is_cached(TINY)

    # Offline now: the converted cache alone serves the model, its _fe twin and a pyramid.
    mirror.mode = "html"
    (isolated_cache / "checkpoints" / TINY.filename).unlink()
    again = ck.load_model("convnext_tiny_1k_224")
    np.testing.assert_array_equal(again.predict_on_batch(x), expected)
    assert ck.load_model("convnext_tiny_1k_224_fe").output.shape[-1] == 768
    assert len(mirror.requests) == 1


def test_stale_converted_cache_is_rebuilt(mirror, isolated_cache):
    dest = hub.converted_cache_path(TINY)
    dest.parent.mkdir(parents=True)
    dest.write_bytes(b"garbage from an older version")
    weights = hub.official_weights(TINY)
    assert weights["head_fc"][0].shape == (768, 1000)
    assert hub.load_converted(dest) is not None


@pytest.mark.parametrize(
    "mode, message",
    [
        ("truncate", "incomplete"),
        ("html", "HTML"),
    ],
)
def test_broken_mirror_caches_nothing(mirror, isolated_cache, mode, message):
    mirror.mode = mode
    with pytest.raises(ck.DownloadError, match=message) as info:
        ck.load_model("convnext_tiny_1k_224")
    assert TINY.url in str(info.value)
    assert not [f for f in _cache_files(isolated_cache) if not f.endswith(".lock")]


def test_wrong_file_behind_the_url_caches_nothing(loopback_server, isolated_cache, monkeypatch):
    atto = registry.VARIANTS["atto"]
    torch_model = ref.hf_model(atto.depths, atto.dims, 1000)
    ref.save_official(torch_model, loopback_server.root / TINY.filename)
    monkeypatch.setenv("CONVNEXT_BASE_URL", loopback_server.url)
    with pytest.raises(
        ck.DownloadError, match="(?s)did not deliver a usable checkpoint.*ConvNeXt-atto"
    ):
        ck.load_model("convnext_tiny_1k_224")
    assert not [f for f in _cache_files(isolated_cache) if not f.endswith(".lock")]


def test_missing_file_names_the_url_and_the_ways_out(loopback_server, monkeypatch):
    monkeypatch.setenv("CONVNEXT_BASE_URL", loopback_server.url)
    with pytest.raises(ck.DownloadError) as info:
        ck.load_model("convnext_base_21k_1k_384")
    text = str(info.value)
    assert "HTTP 404" in text
    assert f"{loopback_server.url}convnext_base_22k_1k_384.pth" in text
    assert "weights='FILE'" in text and "weights=None" in text and "CONVNEXT_BASE_URL" in text
    assert "--weights" not in text  # Python callers get Python keywords (the CLI: flags)


def test_offline_machine(monkeypatch):
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.setenv("CONVNEXT_BASE_URL", f"http://127.0.0.1:{port}/convnext")
    with pytest.raises(ck.DownloadError, match="Could not download .*ConnectionError"):
        hub.official_weights(TINY)


def test_base_url_default_is_official():
    assert TINY.url == "https://dl.fbaipublicfiles.com/convnext/convnext_tiny_1k_224_ema.pth"


def test_two_processes_share_one_download(mirror, isolated_cache):
    script = textwrap.dedent(
        """
        from convnext_keras import hub, registry
        w = hub.official_weights(registry.CHECKPOINTS["convnext_tiny_1k_224"])
        print("OK", w["head_fc"][0].shape)
        """
    )
    env = {**os.environ, "KERAS_BACKEND": "jax", "CONVNEXT_HOME": str(isolated_cache)}
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", script],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(2)
    ]
    outputs = [p.communicate(timeout=600) for p in procs]
    for p, (out, err) in zip(procs, outputs, strict=True):
        assert p.returncode == 0, err[-2000:]
        assert "OK (768, 1000)" in out
    assert mirror.requests == [f"/{TINY.filename}"]
    files = [f for f in _cache_files(isolated_cache) if not f.endswith(".lock")]
    assert files == [f"checkpoints/{TINY.filename}", "keras/convnext_tiny_1k_224.safetensors"]
    assert hub.load_converted(isolated_cache / files[1]) is not None
