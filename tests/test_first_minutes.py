"""A newcomer's first minutes without internet: the offline error's ways out, `convnext fetch`,
a folder as CONVNEXT_BASE_URL, random weights that say so, errors in the interface's terms,
and the download progress bar on a real terminal."""

from __future__ import annotations

import hashlib
import json
import os
import pty
import select
import shutil
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from test_startup import run_python

import convnext_keras as ck
from convnext_keras import registry
from convnext_keras.cli import main
from convnext_keras.data import labels
from convnext_keras.weights import store

ROOT = Path(__file__).resolve().parents[1]
PHOTO = ROOT / "examples" / "images" / "cat.jpg"
TINY = registry.CHECKPOINTS["convnext_tiny_1k_224"]


def _invoke(args):
    return CliRunner().invoke(main, args, catch_exceptions=False)


def test_offline_error_names_every_way_out_in_the_interface_s_terms(loopback_server, monkeypatch):
    monkeypatch.setenv("CONVNEXT_BASE_URL", loopback_server.url)  # serves nothing: 404
    result = _invoke(["predict", str(PHOTO), "--model", "convnext_tiny_1k_224"])
    assert result.exit_code == 2 and result.stdout == ""
    cli = result.stderr
    assert cli.startswith(f"error: Could not download {loopback_server.url}{TINY.filename}")
    for way_out in (
        f"https://dl.fbaipublicfiles.com/convnext/{TINY.filename}",  # the official file
        "convnext fetch convnext_tiny_1k_224 --to DIR",
        "--weights FILE",
        "CONVNEXT_BASE_URL",
        "file:///",
        "--weights none",
    ):
        assert way_out in cli, way_out
    assert "weights=" not in cli and "weights='" not in cli

    with pytest.raises(ck.DownloadError) as info:
        store.official_weights(TINY)
    python = str(info.value)
    assert "weights='FILE'" in python and "weights=None" in python and "--weights" not in python


def test_fetch_into_a_folder_then_use_it_as_base_url_without_a_server(
    loopback_server, tiny_reference, tmp_path, monkeypatch
):
    _, checkpoint = tiny_reference
    shutil.copy(checkpoint, loopback_server.root / TINY.filename)
    monkeypatch.setenv("CONVNEXT_BASE_URL", loopback_server.url)
    carry = tmp_path / "carry"
    args = ["fetch", "convnext_tiny_1k_224", "convnext_tiny_1k_224_fe", "--to", str(carry)]
    result = _invoke(args)
    assert result.exit_code == 0, result.output
    # The _fe twin has the same file; its SHA-256 record travels with it (`sha256sum -c`).
    assert sorted(p.name for p in carry.iterdir()) == [TINY.filename, TINY.filename + ".sha256"]
    digest = hashlib.sha256(checkpoint.read_bytes()).hexdigest()
    assert (carry / (TINY.filename + ".sha256")).read_text().split() == [digest, TINY.filename]
    assert "downloaded" in result.stdout and f"CONVNEXT_BASE_URL=file://{carry}/" in result.stdout
    assert f"convnext predict IMAGES ... --model NAME, or --weights {carry / TINY.filename}." in (
        result.stdout
    )
    assert (carry / TINY.filename).read_bytes() == checkpoint.read_bytes()
    assert "present" in _invoke(args).stdout and len(loopback_server.requests) == 1

    # The offline machine: a fresh cache, the folder as the base URL, no server involved.
    monkeypatch.setenv("CONVNEXT_HOME", str(tmp_path / "offline_home"))
    monkeypatch.setenv("CONVNEXT_BASE_URL", carry.as_uri() + "/")
    weights = store.official_weights(TINY)
    expected = store.convert_official(TINY, checkpoint)
    np.testing.assert_array_equal(weights["head_fc"][0], expected["head_fc"][0])
    assert len(loopback_server.requests) == 1
    home = tmp_path / "offline_home"
    assert (home / "checkpoints" / TINY.filename).is_file()
    assert not [p for p in home.rglob("*.lock") if p.parent.name != "locks"]  # none beside files

    monkeypatch.setenv("CONVNEXT_BASE_URL", str(tmp_path / "empty"))  # a plain path works too
    small = registry.CHECKPOINTS["convnext_small_1k_224"]
    with pytest.raises(ck.DownloadError, match="no such file: .*convnext_small_1k_224_ema.pth"):
        store.official_weights(small)

    bad = _invoke(["fetch", "convnext_atto", "--to", str(carry)])
    assert bad.exit_code == 2 and bad.stderr.startswith("error: ") and "official" in bad.stderr
    assert len(bad.stderr.strip().splitlines()) == 1


def test_random_weights_say_so_on_every_result_and_are_the_same_every_run():
    """--weights none draws seeded weights (as embed does): two runs, the same answers."""
    args = ["predict", str(PHOTO), "--model", "convnext_atto", "--weights", "none", "--json"]
    result = _invoke(args)
    assert result.exit_code == 0, result.output
    rows = json.loads(result.stdout)
    assert [row["random_weights"] for row in rows] == [True]
    assert json.loads(_invoke(args).stdout) == rows


def test_errors_name_cli_flags_and_python_keywords(tmp_path):
    result = _invoke(["predict", str(PHOTO), "--model", "convnext_tiny"])
    assert result.exit_code == 2
    assert "--weights none" in result.stderr and "--weights FILE" in result.stderr
    assert "weights=None" not in result.stderr
    with pytest.raises(ValueError, match=r"pass weights=None .* or weights='FILE'"):
        ck.load_model("convnext_tiny")
    with pytest.raises(ValueError, match=r"labels=\[\.\.\.\]"):
        labels.for_num_classes(3)


def test_cli_start_on_a_real_process_is_quiet_and_random_weights_say_so():
    """The installed `convnext` in a real process: TensorFlow starts without its C++ notes, the
    banner and the per-image mark name the random weights."""
    env = {k: v for k, v in os.environ.items() if k != "TF_CPP_MIN_LOG_LEVEL"}
    env["KERAS_BACKEND"] = "tensorflow"
    args = ["predict", str(PHOTO), "--model", "convnext_atto", "--weights", "none", "--top", "1"]
    result = run_python("from convnext_keras.cli import main; main()", *args, env=env)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0].startswith("RANDOM WEIGHTS (--weights none)")
    assert lines[1] == f"{PHOTO}  [random weights]"
    for noise in ("absl::InitializeLog", "cpu_feature_guard", "I0000 ", "cudart_stub"):
        assert noise not in result.stderr, result.stderr


def test_download_progress_bar_draws_on_the_terminal_and_leaves_stdout_clean(
    loopback_server, tmp_path
):
    (loopback_server.root / "big.bin").write_bytes(os.urandom(4 << 20))
    code = f"""
        from pathlib import Path
        from convnext_keras.weights import download
        size = download.fetch({loopback_server.url + "big.bin"!r},
                              Path({str(tmp_path / "big.bin")!r}),
                              verify=lambda p: p.stat().st_size)
        print("fetched", size)
    """
    env = {k: v for k, v in os.environ.items() if k != "CONVNEXT_NO_PROGRESS"}
    master, slave = pty.openpty()
    proc = subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(code)],
        stdin=slave,
        stdout=subprocess.PIPE,
        stderr=slave,
        cwd=ROOT,
        env=env,
    )
    os.close(slave)
    terminal, deadline = b"", time.monotonic() + 120
    while time.monotonic() < deadline:
        ready, _, _ = select.select([master], [], [], 0.2)
        if ready:
            try:
                chunk = os.read(master, 1 << 16)
            except OSError:  # the other side closed
                break
            if not chunk:
                break
            terminal += chunk
        elif proc.poll() is not None:
            break
    os.close(master)
    stdout = proc.stdout.read().decode()
    assert proc.wait(timeout=30) == 0, terminal.decode(errors="replace")
    assert stdout == f"fetched {4 << 20}\n"  # nothing of the bar on stdout
    text = terminal.decode(errors="replace")
    assert "big.bin" in text and "4.2 MB" in text  # the bar, drawn on the terminal
    assert text.endswith("\x1b[2K")  # transient: erased when done
