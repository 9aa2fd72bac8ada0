"""Where each cached file came from, `convnext cache` (list, verify, remove), mirrors that lack
a file, and transformers' save_pretrained folders as --weights.

A test file served by a CONVNEXT_BASE_URL mirror once stayed in the cache under its official
name for good, silently: now its record says where it came from, every process that uses it
says so once, and `convnext cache` shows and removes it.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil

import numpy as np
import pytest
import torch_reference as ref
from click.testing import CliRunner

import convnext_keras as ck
from convnext_keras import registry
from convnext_keras.cli import main
from convnext_keras.registry import rows
from convnext_keras.weights import cache, graphs, provenance, store
from convnext_keras.weights.read import CheckpointError, folder_files

ATTO = registry.CHECKPOINTS["convnextv2_atto_1k_224"]  # a file two folders deep on the server


@pytest.fixture(scope="module")
def atto_model():
    return ref.reference(registry.VARIANTS["convnextv2_atto"], seed=4)


@pytest.fixture(scope="module")
def atto_file(atto_model, tmp_path_factory):
    return ref.save_official(atto_model, tmp_path_factory.mktemp("atto") / "atto.pt")


@pytest.fixture
def mirror(tmp_path, atto_file, monkeypatch):
    """A folder holding the file at its official path, as CONVNEXT_BASE_URL; every test is a
    fresh process as far as the notices go."""
    folder = tmp_path / "mirror"
    (folder / ATTO.source.path).parent.mkdir(parents=True)
    shutil.copy(atto_file, folder / ATTO.source.path)
    monkeypatch.setenv("CONVNEXT_BASE_URL", folder.as_uri() + "/")
    monkeypatch.setattr(provenance, "_announced", set())
    return folder


def _invoke(args):
    return CliRunner().invoke(main, args, catch_exceptions=False)


def _notices(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if "not its official source" in r.getMessage()]


def test_a_mirror_s_file_is_recorded_and_says_so_once_in_every_process(
    mirror, atto_file, monkeypatch, caplog
):
    url = mirror.as_uri() + "/" + ATTO.source.path
    with caplog.at_level(logging.WARNING, logger="convnext_keras"):
        store.official_weights(ATTO)
        store.official_weights(ATTO)  # the converted cache now: said once per process
    (notice,) = _notices(caplog)
    assert notice == (
        f"convnext_keras: convnextv2_atto_1k_224's weights come from {url} (CONVNEXT_BASE_URL) "
        f"on {notice.split(' on ')[1][:10]}, not its official source {ATTO.source.official_url} "
        f"(SHA-256 {hashlib.sha256(atto_file.read_bytes()).hexdigest()[:12]}...); `convnext "
        "cache list` shows where each cached file came from, `convnext cache remove "
        "convnextv2_atto_1k_224` removes it."
    )
    checkpoint = cache.checkpoint_cache_path(ATTO)
    record = provenance.read(checkpoint)
    digest = hashlib.sha256(atto_file.read_bytes()).hexdigest()
    assert record["url"] == url and record["official"] is False
    assert record["via"] == "CONVNEXT_BASE_URL" and record["official_url"] == ATTO.url.replace(
        mirror.as_uri() + "/", registry.OFFICIAL_BASE_URL
    )
    assert record["sha256"] == digest == cache.read_record(checkpoint)
    assert record["bytes"] == atto_file.stat().st_size and record["kind"] == "checkpoint"
    converted = provenance.read(cache.converted_cache_path(ATTO))
    assert converted["url"] == url and converted["checkpoint_sha256"] == digest
    assert converted["sha256"] == cache.read_record(cache.converted_cache_path(ATTO))

    # The next process, without the mirror: the official name, but still the mirror's file.
    monkeypatch.delenv("CONVNEXT_BASE_URL")
    monkeypatch.setattr(provenance, "_announced", set())
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="convnext_keras"):
        store.official_weights(ATTO)
    assert len(_notices(caplog)) == 1
    listed = json.loads(_invoke(["list", "convnextv2_atto_1k", "--json"]).stdout)
    assert [(r["cached"], r["cached_from"]) for r in listed] == [(True, url)]
    assert "yes (mirror)" in _invoke(["list", "convnextv2_atto_1k"]).stdout

    # A warm call (the cached graph, no Keras, no store) says so too, once in its process.
    monkeypatch.setattr(provenance, "_announced", set())
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="convnext_keras"):
        for _ in range(2):
            key = graphs.graph_key(ATTO, "classifier", 224, 224, "fp32", "onnxruntime", "1.0")
            assert key is not None
    assert _notices(caplog) == [notice]


def test_the_official_source_is_recorded_and_says_nothing(atto_file, tmp_path, monkeypatch, caplog):
    """A file from the official server (here: the official base URL pointed at a folder) is
    recorded as official and used without a word."""
    server = tmp_path / "official"
    (server / ATTO.source.path).parent.mkdir(parents=True)
    shutil.copy(atto_file, server / ATTO.source.path)
    monkeypatch.setattr(rows, "OFFICIAL_BASE_URL", server.as_uri() + "/")
    monkeypatch.setattr(provenance, "_announced", set())
    with caplog.at_level(logging.WARNING, logger="convnext_keras"):
        store.official_weights(ATTO)
        cache.converted_cache_path(ATTO).unlink()
        store.official_weights(ATTO)  # from the cached checkpoint
    assert _notices(caplog) == []
    assert provenance.read(cache.checkpoint_cache_path(ATTO))["official"] is True
    assert store.cached_from(ATTO) == "official"
    assert {e.source for e in provenance.scan()} == {"official"}


def test_a_cache_from_before_the_records_is_unknown_and_quiet(mirror, caplog, monkeypatch):
    store.official_weights(ATTO)
    for path in (cache.checkpoint_cache_path(ATTO), cache.converted_cache_path(ATTO)):
        provenance.source_path(path).unlink()
    monkeypatch.setattr(provenance, "_announced", set())
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="convnext_keras"):
        store.official_weights(ATTO)
    assert _notices(caplog) == []
    assert store.cached_from(ATTO) == "unknown"
    sources = {e.source for e in provenance.scan()}
    assert sources == {"unknown (cached before provenance records)"}


def test_cache_list_verify_and_remove(mirror, isolated_cache, atto_file):
    """`convnext cache list` shows every file with its size and source; `verify` finds a
    changed byte; `remove` by pattern, --not-official, --damaged (with --dry-run first) deletes
    the files with their records; an unknown pattern is one line, exit status 2."""
    store.official_weights(ATTO)
    url = mirror.as_uri() + "/" + ATTO.source.path
    # A file of an earlier version (no record) and a damaged file moved aside.
    femto = cache.cache_dir() / "keras" / "convnextv2_femto_1k_224.safetensors"
    shutil.copy(cache.converted_cache_path(ATTO), femto)
    aside = cache.checkpoint_cache_path(ATTO).with_name(ATTO.filename + ".corrupt-20261207-101010")
    aside.write_bytes(b"damaged")

    listed = json.loads(_invoke(["cache", "list", "--json"]).stdout)
    assert [(e["model"], e["kind"]) for e in listed] == [
        ("convnextv2_atto_1k_224", "checkpoint"),
        ("convnextv2_atto_1k_224", "converted"),
        ("convnextv2_atto_1k_224", "damaged"),
        ("convnextv2_femto_1k_224", "converted"),
    ]
    assert [e["source"] for e in listed] == [
        f"{url} (CONVNEXT_BASE_URL)",
        f"{url} (CONVNEXT_BASE_URL)",
        "damaged (moved aside)",
        "unknown (cached before provenance records)",
    ]
    assert listed[0]["bytes"] == atto_file.stat().st_size
    assert listed[0]["sha256"] == hashlib.sha256(atto_file.read_bytes()).hexdigest()
    table = _invoke(["cache", "list"])
    assert table.exit_code == 0 and str(isolated_cache) in table.stdout
    assert "2 file(s) did not come from their official source" in table.stdout
    assert len(json.loads(_invoke(["cache", "list", "convnextv2_femto*", "--json"]).stdout)) == 1

    ok = _invoke(["cache", "verify", "convnextv2_atto_1k_224"])
    assert ok.exit_code == 1 and "2 of 3 file(s) match their records" in ok.stdout
    checkpoint = cache.checkpoint_cache_path(ATTO)
    data = bytearray(checkpoint.read_bytes())
    data[len(data) // 2] ^= 1
    checkpoint.write_bytes(bytes(data))
    bad = _invoke(["cache", "verify"])
    assert bad.exit_code == 1 and f"{checkpoint}  DAMAGED: its SHA-256" in bad.stdout

    dry = _invoke(["cache", "remove", "--not-official", "--dry-run"])
    assert dry.exit_code == 0 and dry.stdout.count("would remove") == 2
    assert checkpoint.is_file()
    gone = _invoke(["cache", "remove", "--not-official"])
    assert gone.exit_code == 0 and "removed 2 file(s)" in gone.stdout
    left = sorted(
        p.name for p in isolated_cache.rglob("*") if p.is_file() and p.parent.name != "locks"
    )
    # The records went with their files (verify gave the old file one, as a load does).
    assert left == [aside.name, femto.name, femto.name + ".sha256"]
    assert _invoke(["cache", "remove", "--damaged"]).exit_code == 0 and not aside.exists()
    assert _invoke(["cache", "remove", "convnextv2_femto_1k_224_fe"]).exit_code == 0  # its twin
    assert provenance.scan() == []
    unknown = _invoke(["cache", "remove", "convnext_tiny*"])
    assert unknown.exit_code == 2 and "matches no file in the cache" in unknown.stderr
    assert len(unknown.stderr.strip().splitlines()) == 1
    nothing = _invoke(["cache", "remove"])
    assert nothing.exit_code == 2 and "--not-official" in nothing.stderr
    store.official_weights(ATTO)  # fetched again from the mirror
    assert store.cached_from(ATTO) == url


def test_a_mirror_without_the_file_says_the_exact_path_it_looked_for(
    tmp_path, atto_file, loopback_server, monkeypatch
):
    """The file flat in the folder (the URL path misread): the error names the path looked
    for, the layout, and the copy it found under the wrong path.  An HTTP mirror: the URL."""
    folder = tmp_path / "flat"
    folder.mkdir()
    shutil.copy(atto_file, folder / ATTO.filename)
    monkeypatch.setenv("CONVNEXT_BASE_URL", str(folder))
    with pytest.raises(ck.DownloadError) as info:
        store.official_weights(ATTO)
    text = str(info.value)
    wanted = folder / ATTO.source.path
    assert f"looked for {wanted}" in text
    assert f"must hold this file at {ATTO.source.path} below it" in text
    assert f"{folder / ATTO.filename} has that name: move it to {wanted}" in text
    assert f"FOLDER/{ATTO.source.path}, as `convnext fetch --to FOLDER` writes it" in text
    assert "docs/install.md#mirrors" in text

    monkeypatch.setenv("CONVNEXT_BASE_URL", loopback_server.url)
    with pytest.raises(ck.DownloadError) as info:
        store.official_weights(ATTO)
    text = str(info.value)
    assert f"asked for {loopback_server.url}{ATTO.source.path}" in text and "HTTP 404" in text


def test_a_save_pretrained_folder_is_a_checkpoint(atto_model, tmp_path):
    """--weights DIR of transformers' save_pretrained (one model.safetensors, or shards and
    their index) loads as the file does; a folder without one, or with several, says so."""
    images = np.random.default_rng(2).standard_normal((2, 64, 64, 3)).astype(np.float32)
    expected = ref.hf_outputs(atto_model, images)["logits"]
    folder = ref.save_hf(atto_model, tmp_path / "pretrained").parent
    assert folder_files(folder) == [folder / "model.safetensors"]
    model = ck.load_model("convnextv2_atto_1k_224", weights=folder)
    np.testing.assert_allclose(model.predict_on_batch(images), expected, atol=1e-4, rtol=0)

    sharded = tmp_path / "sharded"
    atto_model.save_pretrained(sharded, max_shard_size="4MB")
    shards = folder_files(sharded)
    assert len(shards) > 1 and all(p.suffix == ".safetensors" for p in shards)
    model = ck.load_model("convnextv2_atto_1k_224", weights=sharded)
    np.testing.assert_allclose(model.predict_on_batch(images), expected, atol=1e-4, rtol=0)

    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "config.json").write_text("{}")
    with pytest.raises(CheckpointError, match="folder without a checkpoint file: looked for"):
        ck.load_model("convnextv2_atto_1k_224", weights=empty)
    (empty / "a.pth").write_bytes(b"x")
    (empty / "b.pth").write_bytes(b"x")
    with pytest.raises(CheckpointError, match=r"several checkpoint files \(a.pth, b.pth\)"):
        folder_files(empty)
    with pytest.raises(FileNotFoundError, match="No such checkpoint file or folder"):
        ck.load_model("convnextv2_atto_1k_224", weights=tmp_path / "nope")


def test_a_full_disk_is_said_once_however_often_the_model_loads(mirror, monkeypatch, caplog):
    """The converted cache cannot be written (a full disk): the model still loads each time,
    and the warning is one line per process, not one per load (it was printed twice by one
    `convnext predict`)."""
    import errno
    import os

    def full(weights, path, meta):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))

    monkeypatch.setattr(store, "save_converted", full)
    monkeypatch.setattr(store, "_UNSAVED", set())
    with caplog.at_level(logging.WARNING, logger="convnext_keras"):
        first = store.official_weights(ATTO)
        second = store.official_weights(ATTO)  # converts again from the cached checkpoint
    assert not cache.converted_cache_path(ATTO).exists()
    assert first.keys() == second.keys()
    assert all(np.array_equal(a, b) for k in first for a, b in zip(first[k], second[k]))
    warnings = [r.getMessage() for r in caplog.records if "converts again" in r.getMessage()]
    assert len(warnings) == 1 and "No space left on device" in warnings[0], warnings
