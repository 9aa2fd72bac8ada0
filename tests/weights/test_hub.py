"""Download -> verify -> convert -> cache, end to end against a loopback HTTP server."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest
import torch_reference as ref

import convnext_keras as ck
from convnext_keras import registry
from convnext_keras.weights import cache, download, store

TINY = registry.CHECKPOINTS["convnext_tiny_1k_224"]


@pytest.fixture
def mirror(loopback_server, tiny_reference, monkeypatch):
    """The loopback server serving the reference ConvNeXt-T under its official file name."""
    _, path = tiny_reference
    shutil.copy(path, loopback_server.root / TINY.filename)
    monkeypatch.setenv("CONVNEXT_BASE_URL", loopback_server.url)
    monkeypatch.setattr(download, "RESUME_PAUSE_SECONDS", 0.0)
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
    assert store.is_cached(TINY)

    # Offline now: the converted cache alone serves the model, its _fe twin and a pyramid.
    mirror.mode = "html"
    (isolated_cache / "checkpoints" / TINY.filename).unlink()
    again = ck.load_model("convnext_tiny_1k_224")
    np.testing.assert_array_equal(again.predict_on_batch(x), expected)
    assert ck.load_model("convnext_tiny_1k_224_fe").output.shape[-1] == 768
    assert len(mirror.requests) == 1


def test_stale_converted_cache_is_rebuilt(mirror, isolated_cache):
    dest = cache.converted_cache_path(TINY)
    dest.parent.mkdir(parents=True)
    dest.write_bytes(b"garbage from an older version")
    weights = store.official_weights(TINY)
    assert weights["head_fc"][0].shape == (768, 1000)
    assert cache.load_converted(dest) is not None


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
    with pytest.raises(ck.DownloadError, match="Could not download .*ConnectionError") as info:
        store.official_weights(TINY)
    # one line, the cause in a few words (not urllib3's nested HTTPConnectionPool reprs)
    text = str(info.value)
    assert "\n" not in text and "(ConnectionError: 127.0.0.1 refused the connection)" in text
    assert "HTTPConnectionPool" not in text


def test_a_name_that_does_not_resolve_says_so_in_a_few_words():
    import requests

    error = requests.ConnectionError(
        "HTTPSConnectionPool(host='dl.fbaipublicfiles.com', port=443): Max retries exceeded "
        "(Caused by NameResolutionError(\"Failed to resolve 'dl.fbaipublicfiles.com' ([Errno "
        '-2] Name or service not known)"))'
    )
    assert download._network_reason(TINY.url, error) == (
        "ConnectionError: dl.fbaipublicfiles.com could not be resolved: no network, or no DNS"
    )
    other = requests.ConnectionError("something else")
    assert download._network_reason(TINY.url, other) == "ConnectionError: something else"


def test_base_url_default_is_official():
    assert TINY.url == "https://dl.fbaipublicfiles.com/convnext/convnext_tiny_1k_224_ema.pth"


def test_two_processes_share_one_download(mirror, isolated_cache):
    script = textwrap.dedent(
        """
        from convnext_keras import registry
        from convnext_keras.weights import store
        w = store.official_weights(registry.CHECKPOINTS["convnext_tiny_1k_224"])
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
    cached = [f"checkpoints/{TINY.filename}", "keras/convnext_tiny_1k_224.safetensors"]
    # Each with its SHA-256 record and where it came from (weights.provenance).
    assert files == sorted(cached + [f + s for f in cached for s in (".sha256", ".source.json")])
    assert cache.load_converted(isolated_cache / cached[1]) is not None


def test_v2_checkpoints_in_every_layout_download_and_load(
    loopback_server, isolated_cache, monkeypatch
):
    """ConvNeXt V2 files served under their official paths (convnextv2/im1k/..., .../pt_only/...)
    in each layout the loader reads - official, timm, Hugging Face, FCMAE - load by name and
    compute what transformers' ConvNextV2 computes; the FCMAE encoder as pyramid, ``_fe`` and
    with a new head."""
    import keras

    spec = registry.VARIANTS["convnextv2_atto"]
    torch_model = ref.hf_v2_model(spec.depths, spec.dims, 1000, seed=4)
    x = np.random.default_rng(1).standard_normal((1, 64, 64, 3)).astype("float32")
    want = ref.hf_outputs(torch_model, x)
    monkeypatch.setenv("CONVNEXT_BASE_URL", loopback_server.url)
    classifier = registry.CHECKPOINTS["convnextv2_atto_1k_224"]
    encoder = registry.CHECKPOINTS["convnextv2_atto_fcmae"]
    served = loopback_server.root / classifier.source.path
    served.parent.mkdir(parents=True)
    writers = {
        "official": lambda p: ref.save_official(torch_model, p),
        "timm": lambda p: ref.save_timm(torch_model, p, conv_mlp=True),
        "huggingface": lambda p: shutil.copy(ref.save_hf(torch_model, p.parent / "hf"), p),
    }
    for layout, write in writers.items():
        write(served)
        shutil.rmtree(isolated_cache, ignore_errors=True)
        got = ck.load_model(classifier.name).predict_on_batch(x)
        assert np.abs(got - want["logits"]).max() <= 1e-4, layout
    assert loopback_server.requests == [f"/{classifier.source.path}"] * 3
    assert (isolated_cache / "checkpoints" / classifier.source.path).is_file()

    encoder_file = loopback_server.root / encoder.source.path
    encoder_file.parent.mkdir(parents=True)
    ref.save_fcmae(torch_model, encoder_file)
    pyramid = ck.load_model("convnextv2_atto_1k_224_fcmae")  # the file name's spelling
    got = {k: keras.ops.convert_to_numpy(v) for k, v in pyramid(x).items()}
    for key in ("stage1", "stage2", "stage3", "stage4"):
        assert np.abs(got[key] - want[key]).max() <= 1e-4, key
    assert ck.load_model("convnextv2_atto_fcmae_fe").output.shape[-1] == 320
    assert ck.load_model("convnextv2_atto_fcmae", num_classes=4).output.shape[-1] == 4
    assert loopback_server.requests[-1] == f"/{encoder.source.path}"
    assert len(loopback_server.requests) == 4  # then from the converted cache


@pytest.mark.parametrize("name", registry.families("convnextv2"))
def test_every_v2_name_resolves_to_its_model(name):
    """load_model(name, weights=None) builds what the row says (built here for atto; the
    other sizes are built with weights by tests/nets/test_equality.py)."""
    ckpt = registry.CHECKPOINTS[name]
    resolved, fe = registry.resolve(name), registry.resolve(name + "_fe")
    assert resolved.variant is fe.variant is ckpt.spec and fe.head == "pooled"
    assert resolved.head == ("classifier" if ckpt.has_head else "pyramid")
    if ckpt.spec.size == "atto":
        model = ck.load_model(name, weights=None)
        outputs = model.output if ckpt.has_head else model.output["stage4"]
        assert outputs.shape[-1] == (1000 if ckpt.has_head else 320)
        assert ck.load_model(name + "_fe", weights=None).output.shape[-1] == 320


# --- trust under faults: integrity records, pins, stalls, resumes, leftovers (issue 17) -------

#: A registry-style row for an atto checkpoint: the hub's code paths at a fraction of the size.
_ATTO_ROW = {
    "name": "convnext_atto_test",
    "variant": "atto",
    "num_classes": 1000,
    "resolution": 224,
    "dataset": "imagenet-1k",
    "reported_acc1": None,
    "crop_pct": 0.875,
}
_ATTO_FILE = "convnext_atto_test.pth"
ATTO = registry.Checkpoint(**_ATTO_ROW, source=registry.Source(_ATTO_FILE))


@pytest.fixture(scope="module")
def atto_file(tmp_path_factory):
    spec = registry.VARIANTS["atto"]
    model = ref.hf_model(spec.depths, spec.dims, 1000, seed=5)
    return ref.save_official(model, tmp_path_factory.mktemp("atto") / ATTO.filename)


@pytest.fixture
def atto_mirror(loopback_server, atto_file, monkeypatch):
    shutil.copy(atto_file, loopback_server.root / ATTO.filename)
    monkeypatch.setenv("CONVNEXT_BASE_URL", loopback_server.url)
    monkeypatch.setattr(download, "RESUME_PAUSE_SECONDS", 0.0)
    return loopback_server


def _flip_byte(path, offset=None):
    data = bytearray(path.read_bytes())
    offset = len(data) // 2 if offset is None else offset
    data[offset] ^= 0x01
    path.write_bytes(bytes(data))


def _same(a, b):
    assert a.keys() == b.keys()
    for k in a:
        for x, y in zip(a[k], b[k], strict=True):
            np.testing.assert_array_equal(x, y)


def test_damaged_cache_files_are_moved_aside_and_rebuilt(atto_mirror, isolated_cache, caplog):
    source, converted = cache.checkpoint_cache_path(ATTO), cache.converted_cache_path(ATTO)
    first = store.official_weights(ATTO)
    for path in (source, converted):  # a record of every cached file, written with it
        assert cache.read_record(path) == cache.file_sha256(path)
    assert atto_mirror.requests == [f"/{ATTO.filename}"]

    # Bit rot in the converted weights (one mantissa bit): re-converted from the checkpoint.
    _flip_byte(converted)
    with caplog.at_level("WARNING", logger="convnext_keras"):
        _same(store.official_weights(ATTO), first)
    assert f"{converted} is damaged" in caplog.text and "SHA-256" in caplog.text
    assert len(list(converted.parent.glob("*.corrupt-*"))) == 1
    assert len(atto_mirror.requests) == 1

    # Bit rot in the checkpoint too: downloaded again, once.
    _flip_byte(source)
    converted.unlink()
    _same(store.official_weights(ATTO), first)
    assert len(atto_mirror.requests) == 2 and len(list(source.parent.glob("*.corrupt-*"))) == 1

    # An empty checkpoint without a record (an older version's cache, or a crash): replaced.
    source.write_bytes(b"")
    cache.record_path(source).unlink()
    converted.unlink()
    _same(store.official_weights(ATTO), first)
    assert len(atto_mirror.requests) == 3 and "empty" in caplog.text

    # Weights with NaN behind a matching record (e.g. written by a buggy version): refused.
    bad = {k: [a.copy() for a in v] for k, v in first.items()}
    bad["stage3_block1_pwconv2"][0][-1, -64:] = np.nan
    cache.save_converted(bad, converted, {"format": cache.CONVERTED_FORMAT})
    caplog.clear()
    with caplog.at_level("WARNING", logger="convnext_keras"):
        _same(store.official_weights(ATTO), first)
    assert "NaN or inf" in caplog.text
    assert len(atto_mirror.requests) == 3  # rebuilt from the (good) checkpoint


def test_a_changed_byte_in_a_download_is_refused(atto_mirror, atto_file, isolated_cache, tmp_path):
    atto_mirror.mode = "corrupt"  # a bad mirror or proxy: one byte of a tensor flipped
    with pytest.raises(ck.DownloadError, match="CRC-32") as info:
        store.official_weights(ATTO)
    text = str(info.value)
    assert ATTO.url in text and str(cache.checkpoint_cache_path(ATTO)) in text
    assert ".part" not in text  # the temporary file is gone: never named
    assert not [f for f in _cache_files(isolated_cache) if not f.endswith(".lock")]

    # A pinned SHA-256 is checked too (env per model, or a sha256sum-style file).
    digest = cache.file_sha256(atto_file)
    sums = tmp_path / "SHA256SUMS"
    sums.write_text(f"{'0' * 64}  {ATTO.filename}\n")
    atto_mirror.mode = "ok"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("CONVNEXT_SHA256SUMS", str(sums))
        with pytest.raises(ck.DownloadError, match="not 0000.* as pinned by CONVNEXT_SHA256SUMS"):
            store.official_weights(ATTO)
        mp.setenv("CONVNEXT_SHA256_CONVNEXT_ATTO_TEST", digest)  # the variable wins
        store.official_weights(ATTO)
        assert cache.read_record(cache.checkpoint_cache_path(ATTO)) == digest
        mp.setenv("CONVNEXT_SHA256_CONVNEXT_ATTO_TEST", "abc")
        with pytest.raises(ValueError, match="not a SHA-256"):
            cache.expected_sha256(ATTO)


def test_a_dropped_connection_resumes_with_a_range_request(atto_mirror, atto_file):
    atto_mirror.mode = "drop"  # hangs up after 40 % of the file, then honours Range
    weights = store.official_weights(ATTO)
    assert weights["head_fc"][0].shape == (320, 1000)
    size = atto_file.stat().st_size
    assert atto_mirror.ranges == [None, f"bytes={size * 2 // 5}-"]
    cached = cache.checkpoint_cache_path(ATTO)
    assert cached.read_bytes() == atto_file.read_bytes()
    assert cache.read_record(cached) == cache.file_sha256(atto_file)


def test_a_trickling_server_is_abandoned_naming_the_url(atto_mirror, isolated_cache):
    atto_mirror.mode = "trickle"  # one byte every 0.1 s: each read succeeds, nothing moves
    start = time.monotonic()
    with pytest.raises(ck.DownloadError, match="stalled") as info:
        download.fetch(ATTO.url, cache.checkpoint_cache_path(ATTO), verify=lambda p: p, stall=1.0)
    assert time.monotonic() - start < 10
    assert ATTO.url in str(info.value) and "CONVNEXT_BASE_URL" in str(info.value)
    assert not [f for f in _cache_files(isolated_cache) if not f.endswith(".lock")]


def test_kill_9_mid_download_leaves_a_temp_file_a_later_load_removes(atto_mirror, isolated_cache):
    atto_mirror.mode = "trickle"
    script = textwrap.dedent(
        f"""
        from convnext_keras import registry
        from convnext_keras.weights import store
        ckpt = registry.Checkpoint(**{_ATTO_ROW!r}, source=registry.Source({_ATTO_FILE!r}))
        store.official_weights(ckpt)
        """
    )
    env = {**os.environ, "CONVNEXT_HOME": str(isolated_cache), "KERAS_BACKEND": "jax"}
    proc = subprocess.Popen([sys.executable, "-c", script], env=env)
    folder = isolated_cache / "checkpoints"
    deadline = time.monotonic() + 60
    while not (atto_mirror.requests and list(folder.glob(".*.part"))):  # mid-download
        assert time.monotonic() < deadline and proc.poll() is None, "no download started"
        time.sleep(0.1)
    proc.kill()  # SIGKILL: no clean-up runs
    proc.wait(timeout=30)
    (leftover,) = folder.glob(".*.part")
    cache.clean_stale(folder)
    assert leftover.exists()  # fresh: it could belong to a running download
    old = time.time() - cache.STALE_SECONDS - 60
    os.utime(leftover, (old, old))
    with cache.locked(folder / ATTO.filename):  # a writer holds the lock: kept
        cache.clean_stale(folder)
        assert leftover.exists()
    atto_mirror.mode = "ok"
    store.official_weights(ATTO)  # the next load clears it
    assert not leftover.exists()
    assert not list(folder.glob(".*.part")) and not list((isolated_cache / "keras").glob(".*"))


def test_headers_then_silence_is_one_stall_not_four(atto_mirror, isolated_cache):
    """A server that sends its headers and then nothing: one stall window (it took four, each
    silence taken for a dropped connection and resumed), one request, nothing cached."""
    atto_mirror.mode, atto_mirror.trickle_seconds = "silent", 10.0
    start = time.monotonic()
    with pytest.raises(ck.DownloadError, match="stalled: the server sent nothing for 1 s"):
        download.fetch(ATTO.url, cache.checkpoint_cache_path(ATTO), verify=lambda p: p, stall=1.0)
    assert time.monotonic() - start < 5 and len(atto_mirror.requests) == 1
    assert not [f for f in _cache_files(isolated_cache) if not f.endswith(".lock")]


def _stale(path, data=b""):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    old = time.time() - cache.STALE_SECONDS - 60
    os.utime(path, (old, old))
    return path


def test_every_cache_folder_is_cleaned_on_every_load(atto_mirror, isolated_cache):
    """Once the model is cached, a load reads only keras/ - and still removes what killed runs
    left anywhere in the cache: a half download in checkpoints/ (and its sub-folders), a 0-byte
    placeholder, safetensors' own ``.tmpXXXXXX`` of older versions.  A fresh temporary, and an
    old one whose writer is alive (it holds the file), stay."""
    store.official_weights(ATTO)
    checkpoints, keras_dir = isolated_cache / "checkpoints", isolated_cache / "keras"
    stale = [
        _stale(checkpoints / f".{ATTO.filename}.k1ll3d.part", b"x" * 5000),
        _stale(checkpoints / "convnextv2" / "im1k" / ".v2.pt.abc123.part"),
        _stale(keras_dir / f".{ATTO.name}.safetensors.zz9.part"),
        _stale(keras_dir / ".tmpAb3dE9", b"y" * 100),
    ]
    fresh = keras_dir / ".other.safetensors.fresh1.part"
    fresh.write_bytes(b"")
    with cache.atomic_path(keras_dir / "live.safetensors") as held:
        _stale(held, b"being written")
        store.official_weights(ATTO)
        assert held.exists()  # its writer holds it
    assert not [p for p in stale if p.exists()] and fresh.exists()
    assert not (checkpoints / "convnextv2").exists()  # only the leftover filled it
    assert len(atto_mirror.requests) == 1


def test_a_pin_set_after_caching_is_checked_on_every_load(atto_mirror, atto_file, isolated_cache):
    """The converted weights record the SHA-256 of the checkpoint they were made from: a pin
    set later is checked against it on the warm path too (it was never checked there)."""
    first = store.official_weights(ATTO)
    digest = cache.file_sha256(atto_file)
    meta = cache.read_converted_metadata(cache.converted_cache_path(ATTO))[1]
    assert meta["source_sha256"] == digest and meta["format"] == cache.CONVERTED_FORMAT
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("CONVNEXT_SHA256_CONVNEXT_ATTO_TEST", digest)  # the right pin: warm, offline
        atto_mirror.mode = "html"
        _same(store.official_weights(ATTO), first)
        assert len(atto_mirror.requests) == 1
        mp.setenv("CONVNEXT_SHA256_CONVNEXT_ATTO_TEST", "a" * 64)  # another file pinned
        atto_mirror.mode = "ok"
        with pytest.raises(ck.DownloadError, match="not a{64} as pinned by CONVNEXT_SHA256_"):
            store.official_weights(ATTO)
        assert len(list(cache.converted_cache_path(ATTO).parent.glob("*.corrupt-*"))) == 1


def test_converted_weights_without_a_record_are_rebuilt_not_trusted(
    atto_mirror, isolated_cache, caplog
):
    """A converted file whose record is gone is unverified: rebuilt from the checkpoint (its
    CRC-32s and record checked), never re-recorded as it is - here it was damaged too."""
    first = store.official_weights(ATTO)
    converted = cache.converted_cache_path(ATTO)
    _flip_byte(converted)
    cache.record_path(converted).unlink()
    with caplog.at_level("WARNING", logger="convnext_keras"):
        _same(store.official_weights(ATTO), first)
    assert "no SHA-256 record" in caplog.text and "unverified" in caplog.text
    assert cache.read_record(converted) == cache.file_sha256(converted)
    assert len(atto_mirror.requests) == 1  # from the cached checkpoint


def _read_only(folder, script, env):
    """Run ``script`` with ``folder`` mounted read-only (a mount namespace of an unprivileged
    user namespace: ``unshare -rm``); None where the machine does not allow it."""
    import shutil as sh

    if not sh.which("unshare"):
        return None
    probe = subprocess.run(
        ["unshare", "-rm", "sh", "-c", f"mount --bind -o ro {folder} {folder}"],
        capture_output=True,
        timeout=30,
    )
    if probe.returncode != 0:
        return None
    command = f'mount --bind -o ro {folder} {folder} && exec {sys.executable} -c "$SCRIPT"'
    return subprocess.run(
        ["unshare", "-rm", "sh", "-c", command],
        env={**env, "SCRIPT": script},
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_a_complete_read_only_cache_loads_without_a_lock(atto_mirror, isolated_cache):
    """A shared read-only cache (an NFS mount, as docs/embed.md suggests for Ray nodes): the
    complete, verified entry loads without the lock file (EROFS, exit 2 before), stale
    leftovers there are left alone, and an entry with only its checkpoint converts in memory.
    On a read-only mount where the machine allows one (``unshare``), else simulated."""
    first = store.official_weights(ATTO)
    _stale(isolated_cache / "checkpoints" / ".leftover.pth.abc.part")
    shutil.rmtree(isolated_cache / "locks")
    script = textwrap.dedent(
        f"""
        import hashlib, os
        from convnext_keras import registry
        from convnext_keras.weights import cache, store
        ckpt = registry.Checkpoint(**{_ATTO_ROW!r}, source=registry.Source({_ATTO_FILE!r}))
        def digest(weights):
            return hashlib.sha256(b"".join(a.tobytes() for k in sorted(weights)
                                           for a in weights[k])).hexdigest()
        print(digest(store.official_weights(ckpt)))
        """
    )
    env = {**os.environ, "CONVNEXT_HOME": str(isolated_cache), "CONVNEXT_BASE_URL": "file:///x"}
    done = _read_only(isolated_cache, script, env)
    if done is None:  # simulated: creating the lock file fails as on a read-only mount
        import errno

        import filelock

        def read_only(self, *args, **kwargs):
            raise OSError(errno.EROFS, "Read-only file system", self.lock_file)

        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(filelock.FileLock, "acquire", read_only)
            _same(store.official_weights(ATTO), first)
        return
    assert done.returncode == 0, done.stderr[-3000:]
    import hashlib

    expected = hashlib.sha256(
        b"".join(a.tobytes() for k in sorted(first) for a in first[k])
    ).hexdigest()
    assert done.stdout.split()[-1] == expected
    assert (isolated_cache / "checkpoints" / ".leftover.pth.abc.part").exists()
    assert not (isolated_cache / "locks").exists()
    cache.converted_cache_path(ATTO).unlink()  # only the checkpoint: converted in memory
    again = _read_only(isolated_cache, script, env)
    assert again.returncode == 0, again.stderr[-3000:]
    assert again.stdout.split()[-1] == expected and "next load converts again" in again.stderr


def test_fetch_into_a_folder_removes_what_a_killed_fetch_left(atto_mirror, tmp_path):
    """``convnext fetch --to DIR`` killed mid-download left a partial file and the folders made
    for a file of a sub-folder; the next fetch into DIR removes them (once stale)."""
    folder = tmp_path / "carry"
    partial = _stale(folder / f".{ATTO.filename}.k1ll3d.part", b"x" * 5000)
    deep = _stale(folder / "convnextv2" / "im1k" / ".convnextv2_atto.pt.abc123.part")
    mine = folder / "notes" / "keep.txt"  # the user's own files and folders stay
    mine.parent.mkdir(parents=True)
    mine.write_text("mine")
    (folder / "empty").mkdir()
    path, how = store.fetch_official(ATTO, folder)
    assert how == "downloaded" and path.read_bytes()
    assert not partial.exists() and not deep.exists() and not (folder / "convnextv2").exists()
    assert mine.exists() and (folder / "empty").is_dir()
