"""The Hugging Face Hub as a weight source, end to end against a loopback Hub (``hub_server`` in
``conftest.py``: the resolve endpoint ``hf_hub_download`` calls, its redirect to a second
"CDN" server, the Hub's error codes).  ``huggingface_hub`` does the downloading (its cache,
tokens, resumes); this library checks the file, converts it and caches the Keras weights.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pytest
import torch_reference as ref
from click.testing import CliRunner

import convnext_keras as ck
from convnext_keras import registry
from convnext_keras.cli import main
from convnext_keras.weights import cache, download, hfhub, store

ATTO = registry.CHECKPOINTS["convnext_atto_1k_224"]
DINO = registry.CHECKPOINTS["dinov3_convnext_tiny_lvd1689m"]


@pytest.fixture(scope="module")
def atto_file(tmp_path_factory):
    """timm's layout (1x1-convolution MLPs) of a random ConvNeXt-atto with a 1000-class head."""
    spec = ATTO.spec
    model = ref.hf_model(spec.depths, spec.dims, 1000, seed=11)
    return ref.save_timm(model, tmp_path_factory.mktemp("atto") / "model.safetensors", True)


def _serve(hub_server, repo, path, name="model.safetensors"):
    folder = hub_server.root / repo
    folder.mkdir(parents=True, exist_ok=True)
    (folder / name).write_bytes(path.read_bytes())
    return folder / name


def _blobs(hub_server):
    return [p for p in hub_server.cache.rglob("blobs/*") if p.is_file()]


def test_hub_row_downloads_once_converts_caches_and_loads_offline(
    hub_server, atto_file, isolated_cache, monkeypatch
):
    import huggingface_hub

    _serve(hub_server, ATTO.source.repo, atto_file)
    x = np.random.default_rng(0).standard_normal((1, 64, 64, 3)).astype("float32")
    expected = ck.load_model(ATTO.name, weights=atto_file).predict_on_batch(x)
    assert not store.is_cached(ATTO)

    model = ck.load_model(ATTO.name)
    np.testing.assert_array_equal(model.predict_on_batch(x), expected)
    # One HEAD on the resolve endpoint, one GET of the content on the "CDN"; the blob is named
    # by its SHA-256 in the Hugging Face cache; the Keras weights are in this library's cache.
    assert [(m, p) for m, p, _ in hub_server.requests] == [
        ("HEAD", f"/{ATTO.source.repo}/resolve/main/model.safetensors")
    ]
    assert len(hub_server.cdn_requests) == 1
    (blob,) = _blobs(hub_server)
    assert blob.name == cache.file_sha256(atto_file)
    assert (isolated_cache / "keras" / f"{ATTO.name}.safetensors").is_file()
    assert not (isolated_cache / "checkpoints").exists()
    assert store.is_cached(ATTO)
    rows = json.loads(CliRunner().invoke(main, ["list", "convnext_atto_1k*", "--json"]).output)
    assert (rows[0]["cached"], rows[0]["licence"], rows[0]["family"]) == (
        True,
        "Apache-2.0",
        "timm",
    )

    # The converted cache serves the next load without a request; without it, offline mode
    # reads the Hugging Face cache.
    first = store.official_weights(ATTO)
    assert len(hub_server.requests) == 1
    cache.converted_cache_path(ATTO).unlink()
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    again = store.official_weights(ATTO)
    assert again.keys() == first.keys()
    for layer, arrays in again.items():
        for a, b in zip(arrays, first[layer], strict=True):
            np.testing.assert_array_equal(a, b)
    assert len(hub_server.requests) == 1 and len(hub_server.cdn_requests) == 1
    cache.converted_cache_path(ATTO).unlink()
    for blob in _blobs(hub_server):
        blob.unlink()  # offline, and the Hugging Face cache lost it: the ways out
    with pytest.raises(
        download.DownloadError, match="HF_HUB_OFFLINE is set and timm.convnext_atto"
    ):
        store.official_weights(ATTO)


def test_gated_repository_needs_an_accepted_licence_and_a_token(
    hub_server, atto_file, isolated_cache, monkeypatch
):
    repo = DINO.source.repo
    _serve(hub_server, repo, atto_file)  # an atto behind the DINOv3 name: refused at the end
    hub_server.gated.add(repo)
    page = f"{hub_server.url}/{repo}"

    with pytest.raises(download.DownloadError) as without:
        ck.load_model(DINO.name)
    message = str(without.value)
    assert f"{repo} is gated: accept its licence at {page}" in message
    assert "HF_TOKEN" in message and "hf auth login" in message
    result = CliRunner().invoke(main, ["fetch", DINO.name, "--to", "folder"])
    assert result.exit_code == 2 and result.output.startswith("error: ")
    assert f"is gated: accept its licence at {page}" in result.output
    assert result.output.count("\n") == 1 and "Traceback" not in result.output

    monkeypatch.setenv("HF_TOKEN", "hf_someoneelse")
    with pytest.raises(
        download.DownloadError, match="the Hugging Face token given .* has no access"
    ):
        ck.load_model(DINO.name)

    monkeypatch.setenv("HF_TOKEN", hub_server.token)
    with pytest.raises(
        download.DownloadError, match="did not deliver a usable checkpoint"
    ) as wrong:
        ck.load_model(DINO.name)
    assert "ConvNeXt-atto" in str(wrong.value)
    assert not cache.converted_cache_path(DINO).exists()
    # The token goes to the Hub, never to the content server it redirects to.
    assert hub_server.requests[-1][2] == f"Bearer {hub_server.token}"
    assert {auth for *_, auth in hub_server.cdn_requests} == {None}


def test_missing_files_repositories_revisions_and_bad_addresses(hub_server, atto_file):
    _serve(hub_server, "org/weights", atto_file)
    with pytest.raises(download.DownloadError, match="org/weights has no file 'nope.pth'"):
        ck.load_model("convnext_atto", weights="hf://org/weights/nope.pth")
    with pytest.raises(download.DownloadError, match="no repository nobody/nothing"):
        ck.load_model("convnext_atto", weights="hf://nobody/nothing")
    with pytest.raises(download.DownloadError, match="has no revision 'v9'"):
        ck.load_model("convnext_atto", weights="hf://org/weights@v9/model.safetensors")
    with pytest.raises(ValueError, match="not a Hub address: write hf://ORG/REPO"):
        ck.load_model("convnext_atto", weights="hf://just-one-part")


def test_hub_addresses_name_a_file_a_revision_or_just_the_repository(hub_server, atto_file):
    import hashlib

    import torch

    x = np.random.default_rng(1).standard_normal((1, 32, 32, 3)).astype("float32")
    expected = ck.load_model(ATTO.name, weights=atto_file).predict_on_batch(x)
    _serve(hub_server, "org/st", atto_file)
    model = ck.load_model(ATTO.name, weights="hf://org/st")  # its model.safetensors
    np.testing.assert_array_equal(model.predict_on_batch(x), expected)

    commit = hashlib.sha1(b"org/st").hexdigest()  # what the loopback Hub calls the commit
    pinned = hfhub.resolve_hub_address(f"hf://org/st@{commit}/model.safetensors")
    assert pinned.read_bytes() == atto_file.read_bytes() and commit in str(pinned)
    state = ck.read_state_dict(atto_file)
    (hub_server.root / "org/bin").mkdir(parents=True)
    torch.save(
        {k: torch.from_numpy(v) for k, v in state.items()},
        hub_server.root / "org/bin/pytorch_model.bin",
    )
    found = hfhub.resolve_hub_address("hf://org/bin")  # no model.safetensors: pytorch_model.bin
    assert found.name == "pytorch_model.bin"
    assert ck.read_state_dict(found).keys() == state.keys()
    (hub_server.root / "org/empty").mkdir()
    with pytest.raises(download.DownloadError, match="holds neither model.safetensors nor"):
        hfhub.resolve_hub_address("hf://org/empty")


def test_a_cut_short_file_is_refused_then_a_dropped_connection_resumes(
    hub_server, atto_file, isolated_cache, monkeypatch
):
    import huggingface_hub.file_download as fd

    monkeypatch.setattr(fd.time, "sleep", lambda seconds: None)  # its pause between resumes
    _serve(hub_server, ATTO.source.repo, atto_file)
    hub_server.mode = "short"  # the content server sends half the announced size
    with pytest.raises(download.DownloadError, match="Consistency check failed") as short:
        ck.load_model(ATTO.name)
    assert "nothing was cached" in str(short.value)
    assert not cache.converted_cache_path(ATTO).exists()

    hub_server.mode, hub_server.cdn_requests[:] = "drop", []
    model = ck.load_model(ATTO.name, features="pooled")
    assert model.output.shape == (None, 320)
    assert [r for _, r, _ in hub_server.cdn_requests][0] is None
    assert any(r and r.startswith("bytes=") for _, r, _ in hub_server.cdn_requests[1:])
    (blob,) = _blobs(hub_server)
    assert cache.file_sha256(blob) == blob.name


def test_a_damaged_blob_in_the_hugging_face_cache_is_downloaded_again(
    hub_server, atto_file, caplog, monkeypatch
):
    _serve(hub_server, "org/weights", atto_file)
    path = hfhub.resolve_hub_address("hf://org/weights/model.safetensors")
    blob = path.resolve()
    data = bytearray(blob.read_bytes())
    data[len(data) // 2] ^= 0x40
    blob.write_bytes(bytes(data))
    with caplog.at_level(logging.WARNING, logger="convnext_keras"):
        again = hfhub.resolve_hub_address("hf://org/weights/model.safetensors")
    assert "is damaged" in caplog.text and "downloading it again" in caplog.text
    assert cache.file_sha256(again) == blob.name == cache.file_sha256(atto_file)
    # A pinned SHA-256 (CONVNEXT_SHA256_<NAME>) that the file does not have is refused.
    _serve(hub_server, ATTO.source.repo, atto_file)
    monkeypatch.setenv("CONVNEXT_SHA256_CONVNEXT_ATTO_1K_224", "0" * 64)
    with pytest.raises(
        download.DownloadError, match="pinned by CONVNEXT_SHA256_CONVNEXT_ATTO_1K_224"
    ):
        ck.load_model(ATTO.name)


def test_fetch_puts_a_hub_row_file_into_a_folder(hub_server, atto_file, tmp_path):
    """``convnext fetch`` of a Hub row: the file, and a recipe that works for a Hub row
    (``--weights FILE``, or the copied Hugging Face cache with ``HF_HUB_OFFLINE``) - not
    ``CONVNEXT_BASE_URL``, which Hub rows never read.  Followed, the recipe classifies a photo
    with the Hub unreachable; an encoder row's recipe names a command that takes it (embed)."""
    from convnext_keras.cli.core import _offline_recipe

    _serve(hub_server, ATTO.source.repo, atto_file)
    result = CliRunner().invoke(main, ["fetch", ATTO.name, "--to", str(tmp_path / "carry")])
    assert result.exit_code == 0, result.output
    dest = tmp_path / "carry" / "hf" / ATTO.source.repo / "main" / "model.safetensors"
    assert dest.read_bytes() == atto_file.read_bytes()
    assert "copied from the Hugging Face cache" in result.output
    assert "CONVNEXT_BASE_URL=" not in result.output
    recipe = f"convnext predict IMAGES --model {ATTO.name} --weights {dest}"
    assert recipe in result.output and "HF_HUB_OFFLINE=1" in result.output
    hub_server.status = 503  # the machine without internet
    photo = Path(__file__).parents[2] / "examples" / "images"
    photo = sorted(photo.glob("*.jpg"))[0]
    followed = CliRunner().invoke(main, recipe.replace("IMAGES", str(photo)).split()[1:])
    assert followed.exit_code == 0, followed.output
    (line,) = _offline_recipe([(DINO, tmp_path / "dino.safetensors")], tmp_path)
    assert f"convnext embed IMAGES_DIR --out FEATURES --model {DINO.name} --weights" in line
    assert "CONVNEXT_BASE_URL=" not in line


# --- the official path's rules on the Hub path: bounded time, one line, no retry storm -------


def _gave_up_quickly(call, seconds, *match):
    """``call()`` raises a one-line DownloadError containing ``match`` within ``seconds``."""
    import time

    start = time.monotonic()
    with pytest.raises(download.DownloadError) as info:
        call()
    took = time.monotonic() - start
    text = str(info.value)
    assert took < seconds, f"took {took:.1f} s: {text}"
    assert "\n" not in text and all(m in text for m in match), text
    return text, took


def test_a_hub_that_never_answers_or_is_down_or_offline_fails_in_one_line_at_once(
    hub_server, atto_file, monkeypatch, caplog
):
    """A Hub that accepts and never answers (394 s of huggingface_hub's retries before), one
    that answers HTTP 500, and none at all (offline: 23 s and 11 retry lines): each one line
    within the client's timeout, with the ways out, and no retry."""
    import socket

    import huggingface_hub

    _serve(hub_server, ATTO.source.repo, atto_file)
    monkeypatch.setenv("CONVNEXT_STALL_SECONDS", "2")  # the metadata request's timeout too
    mute = socket.socket()  # accepts connections (the backlog), never answers
    mute.bind(("127.0.0.1", 0))
    mute.listen(8)
    closed = socket.socket()
    closed.bind(("127.0.0.1", 0))  # bound, not listening: connections are refused
    ports = {"mute": mute.getsockname()[1], "closed": closed.getsockname()[1]}
    try:
        for kind, limit in (("mute", 8), ("closed", 4)):
            url = f"http://127.0.0.1:{ports[kind]}"
            monkeypatch.setattr(huggingface_hub.constants, "ENDPOINT", url)
            template = url + "/{repo_id}/resolve/{revision}/{filename}"
            monkeypatch.setattr(huggingface_hub.constants, "HUGGINGFACE_CO_URL_TEMPLATE", template)
            with caplog.at_level(logging.WARNING):
                text, _ = _gave_up_quickly(
                    lambda: hfhub.resolve_hub_address("hf://org/x/model.safetensors"),
                    limit,
                    "did not answer",
                    "HF_HUB_OFFLINE=1",
                    "weights=FILE",
                )
            assert "Retrying" not in caplog.text, caplog.text
    finally:
        mute.close()
        closed.close()
    monkeypatch.setattr(huggingface_hub.constants, "ENDPOINT", hub_server.url)  # the loopback
    template = hub_server.url + "/{repo_id}/resolve/{revision}/{filename}"  # Hub again, down
    monkeypatch.setattr(huggingface_hub.constants, "HUGGINGFACE_CO_URL_TEMPLATE", template)
    hub_server.status = 500
    text, _ = _gave_up_quickly(lambda: store.official_weights(ATTO), 4, "HTTP 500")
    assert len(hub_server.requests) == 1  # asked once, not 6 times


def test_a_silent_or_trickling_file_server_is_a_stall_in_one_line(
    hub_server, atto_file, isolated_cache, monkeypatch
):
    """The Hub answers, its file server sends the headers and then nothing (a 160-line
    ``ReadTimeout`` traceback, exit 1, before) or one byte every 0.1 s (never abandoned
    before): one line within the stall window, exit 2 on the command line, nothing cached."""
    import huggingface_hub

    _serve(hub_server, ATTO.source.repo, atto_file)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_DOWNLOAD_TIMEOUT", 1)
    monkeypatch.setenv("CONVNEXT_STALL_SECONDS", "1.5")
    hub_server.mode = "silent"
    _gave_up_quickly(lambda: store.official_weights(ATTO), 8, "stalled", "nothing arrived")
    assert len(hub_server.cdn_requests) == 1  # no resume of a connection that sent nothing
    hub_server.mode, hub_server.cdn_requests[:] = "trickle", []
    _gave_up_quickly(lambda: store.official_weights(ATTO), 8, "stalled", "bytes/s over 1.5 s")
    assert not cache.converted_cache_path(ATTO).exists() and not _blobs(hub_server)
    result = CliRunner().invoke(main, ["fetch", ATTO.name, "--to", "carry"])
    assert result.exit_code == 2 and result.output.count("\n") == 1, result.output
    assert "stalled" in result.output and "Traceback" not in result.output


def test_list_does_not_import_huggingface_hub_without_a_downloaded_repository(tmp_path):
    """`convnext list` asks huggingface_hub about a Hub row (0.2-0.4 s to import) only when the
    Hugging Face cache has a folder of its repository."""
    import os
    import subprocess
    import sys

    code = (
        "import sys\n"
        "from convnext_keras import api\n"
        "rows = api.model_table()\n"
        "print(len(rows), 'huggingface_hub' in sys.modules)\n"
    )
    env = {**os.environ, "HF_HOME": str(tmp_path / "hf"), "CONVNEXT_HOME": str(tmp_path / "c")}
    env.pop("HF_HUB_CACHE", None)
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True
    )
    assert out.stdout.split() == [str(len(registry.CHECKPOINTS)), "False"]
