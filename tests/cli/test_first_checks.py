"""What a new user trips on first: errors that used to wait for TensorFlow, optional extras
that were tracebacks, and `convnext list` in an 80-column terminal.

The command line checks names, paths, flags, extras and the weights source before any backend
loads: proved by running it with Keras and every backend made unimportable (an import of one
would fail the command with another error), and with the optional extras hidden as in a venv
made by `make demo` (package, TensorFlow, PyTorch only).
"""

from __future__ import annotations

import fcntl
import json
import os
import pty
import re
import select
import struct
import subprocess
import sys
import termios
import textwrap
import time
from pathlib import Path

import pytest

from convnext_keras import registry
from convnext_keras.errors import MissingDependencyError, require

ROOT = Path(__file__).resolve().parents[2]
PHOTO = ROOT / "examples" / "images" / "cat.jpg"

#: Makes the named top-level modules unimportable in a child process (as if not installed).
HIDE = textwrap.dedent(
    """
    import sys

    class Hidden:
        def __init__(self, names):
            self.names = set(names)

        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in self.names:
                raise ModuleNotFoundError(f"No module named {name!r}", name=name)

    sys.meta_path.insert(0, Hidden(HIDDEN))
    """
)
_RUNS = textwrap.dedent(
    """
    import contextlib, io, json, time
    from convnext_keras.cli import main

    report = []
    for args in json.loads(sys.argv[1]):
        err = io.StringIO()
        start = time.perf_counter()
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
            try:
                main.main(args, prog_name="convnext", standalone_mode=False)
                code = 0
            except SystemExit as e:
                code = e.code
            except Exception as e:  # a traceback would have been printed
                code, err = "traceback", io.StringIO(f"{type(e).__name__}: {e}")
        report.append([code, err.getvalue(), time.perf_counter() - start])
    loaded = [m for m in ("keras", "tensorflow", "jax", "torch") if m in sys.modules]
    print(json.dumps({"report": report, "loaded": loaded}))
    """
)
BACKENDS = ["keras", "tensorflow", "jax", "torch", "tf_keras"]
#: What `make demo` does not install (the extras' modules).
EXTRAS = ["onnx", "onnxruntime", "openvino", "pyarrow", "ray", "matplotlib", "skimage", "sklearn"]


def _run_cli(runs: list[list[str]], hidden: list[str], env=None) -> list[tuple]:
    """Each command line of ``runs`` in one child process with ``hidden`` modules made
    unimportable: ``[(exit status, stderr, seconds)]``; checks that no backend loaded."""
    code = HIDE.replace("HIDDEN", repr(hidden)) + _RUNS
    result = subprocess.run(
        [sys.executable, "-c", code, json.dumps(runs)],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env={**os.environ, **(env or {})},
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    out = json.loads(result.stdout.splitlines()[-1])
    assert out["loaded"] == []
    return [tuple(r) for r in out["report"]]


def _one_line(code, err) -> str:
    """The error line of a command that failed as a user's error: exit 2, one line."""
    assert code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    return lines[0]


def test_bad_names_paths_flags_and_weights_fail_before_a_backend_loads(tmp_path):
    """Keras, TensorFlow, JAX and PyTorch cannot be imported in the child: every one of these
    mistakes is still a one-line error with exit status 2, so each was found before a backend
    would have loaded (5-30 s earlier than before)."""
    images = tmp_path / "images"
    images.mkdir()
    (images / "a.jpg").write_bytes(PHOTO.read_bytes())
    (tmp_path / "empty").mkdir()
    out = str(tmp_path / "out")
    runs = {
        # predict's hint: classifiers and architecture names alone (no encoder, no detector)
        "Unknown classifier 'convnext_tinny'. Did you mean convnext_tiny_1k_224, "
        "convnext_tiny_21k_224, convnext_tiny?": [
            *["predict", str(PHOTO), "--model", "convnext_tinny"],
        ],
        "(mask_rcnn_convnext_tiny_coco is an object-detection model: convnext detect)": [
            *["predict", str(PHOTO), "--model", "mask_rcnn_convnext_tiny_coc"],
        ],
        "No such image file: missing.jpg": ["predict", "missing.jpg", "--model", "convnext_atto"],
        "is a feature extractor": ["predict", str(PHOTO), "--model", "convnext_tiny_1k_224_fe"],
        "semantic-segmentation model": [
            "eval",
            str(images),
            "--model",
            "upernet_convnext_tiny_ade20k_512",
        ],
        "architecture without an official checkpoint": [
            "predict",
            str(PHOTO),
            "--model",
            "convnext_tiny",
        ],
        "No such checkpoint file or folder": [
            "predict",
            str(PHOTO),
            "--model",
            "convnext_atto",
            "--weights",
            "missing.pth",
        ],
        "is not a Hub address": [
            *["predict", str(PHOTO), "--model", "convnext_atto", "--weights", "hf://nope"],
        ],
        "--calibration is for --precision int8": [
            *["predict", str(PHOTO), "--model", "convnext_atto", "--weights", "none"],
            *["--calibration", str(images)],
        ],
        "int8 runs on the onnxruntime engine only": [
            *["eval", str(images), "--model", "convnext_atto", "--weights", "none"],
            *["--precision", "int8", "--engine", "keras"],
        ],
        "not a segmentation model": ["segment", str(PHOTO), "--model", "convnext_tiny_1k_224"],
        # A typo's hint names the task's models alone (no classifier, no architecture name).
        "Unknown object-detection model 'mask_rcnn_convnext_tinyy_coco'. Did you mean "
        "mask_rcnn_convnext_tiny_coco,": [
            *["detect", str(PHOTO), "--model", "mask_rcnn_convnext_tinyy_coco"],
        ],
        # a checkpoint file given as the name keeps the registry's words, not a typo's hint
        "is a file, not a model name": [
            *["detect", str(PHOTO), "--model", "weights/mask_rcnn.pth"],
        ],
        "not an object-detection model": [
            *["eval-det", str(images), "--model", "convnext_tiny_1k_224"],
        ],
        "Unknown segmentation model 'upernet_convnext_tinny_ade20k_512'. Did you mean "
        "upernet_convnext_tiny_ade20k_512,": [
            *["segment", str(PHOTO), "--model", "upernet_convnext_tinny_ade20k_512"],
        ],
        "No such model file": ["predict", str(PHOTO), "--model", "nope.keras"],
        "image folder": ["embed", str(tmp_path / "nope"), "--model", "convnext_atto", "--out", out],
        "resolution must be at least 32": [
            *["embed", str(images), "--model", "convnext_atto", "--weights", "none"],
            *["--out", out, "--resolution", "16"],
        ],
        "--resolution 16 is below convnext_atto's smallest input, 32": [
            *["bench", "--model", "convnext_atto", "--resolution", "16"],
        ],
        "Unknown model name 'convnext_tinny_fe'": [
            *["export", "convnext_tinny_fe", "--out", out],
        ],
        "The data folder": ["finetune", str(tmp_path / "nope"), "--out", out],
        # The weights source: a mirror folder without the file (the offline `make demo`).
        "Could not download file://": ["predict", str(PHOTO), "--model", "convnext_tiny_1k_224"],
    }
    env = {"CONVNEXT_BASE_URL": (tmp_path / "empty").as_uri() + "/"}
    results = _run_cli(list(runs.values()), BACKENDS, env)
    for (expected, args), (code, err, seconds) in zip(runs.items(), results):
        if expected.startswith("Could not download"):
            assert code == 2 and err.startswith("error: Could not download"), err
            continue
        assert expected in _one_line(code, err), (args, err)
        if expected.startswith("Unknown") and args[0] in ("detect", "segment"):
            assert "convnext_atto" not in err and "convnext_tiny_1k_224" not in err, err
        if "classifier" in err:
            assert "fcmae" not in err, err
        assert seconds < 10, (args, seconds)  # the registry and a few stat calls, no backend
    assert not Path(out).exists()


def test_every_missing_extra_is_one_line_naming_it_as_in_a_demo_venv(tmp_path):
    """In a venv made by `make demo` (no onnx, onnxruntime, pyarrow, matplotlib, OpenVINO,
    Ray, scikit-image), each command that needs an extra says which, in one line, exit status
    2 - before a backend loads (the backends are hidden too)."""
    images = tmp_path / "images"
    images.mkdir()
    (images / "a.jpg").write_bytes(PHOTO.read_bytes())
    out = str(tmp_path / "out")
    atto = ["--model", "convnext_atto", "--weights", "none"]
    runs = {
        "ONNX export needs onnx": ["export", "convnext_atto", "--weights", "none"]
        + ["--format", "onnx", "--out", out],
        "Parquet features (convnext embed's default format) needs pyarrow": [
            *["embed", str(images), *atto, "--out", out],
        ],
        "--ray needs ray[data]": ["embed", str(images), *atto, "--out", out, "--format", "npy"]
        + ["--ray"],
        "--precision int8 needs onnxruntime": ["predict", str(PHOTO), *atto]
        + ["--precision", "int8"],
        "--cam (Grad-CAM pictures) needs matplotlib": ["predict", str(PHOTO), *atto]
        + ["--cam", out],
        "--engine openvino needs openvino": ["bench", "--model", "convnext_atto"]
        + ["--engine", "openvino"],
        "--engine onnxruntime needs onnxruntime": ["eval", str(images), *atto]
        + ["--engine", "onnxruntime"],
    }
    extras = {
        "ONNX export": "export",
        "Parquet": "embed",
        "--ray": "ray",
        "--precision int8": "int8",
        "--cam": "viz",
        "--engine openvino": "openvino",
        "--engine onnxruntime": "export",
    }
    results = _run_cli(list(runs.values()), BACKENDS + EXTRAS)
    for (expected, args), (code, err, _) in zip(runs.items(), results):
        line = _one_line(code, err)
        assert expected in line, (args, line)
        extra = next(v for k, v in extras.items() if expected.startswith(k))
        assert f'pip install "convnext-keras[{extra}]"' in line, line
        assert "Traceback" not in err
    assert "or --format npy" in results[1][1]
    assert not Path(out).exists()


def test_the_optional_import_rule(monkeypatch):
    """One helper for every optional import: an ImportError (what Python callers catch) and a
    ValueError (what the command line prints as one line), naming the extra; a module that is
    installed but fails to import says why instead of "not installed"."""
    monkeypatch.setitem(sys.modules, "pyarrow", None)
    with pytest.raises(MissingDependencyError) as info:
        require("pyarrow", extra="embed", purpose="Parquet features", alternative="or npy")
    error = info.value
    assert isinstance(error, ImportError) and isinstance(error, ValueError)
    assert str(error) == (
        "Parquet features needs pyarrow, which is not installed: pip install "
        '"convnext-keras[embed]" (or npy).'
    )
    assert (error.module, error.extra, error.name) == ("pyarrow", "embed", "pyarrow")
    import pickle

    assert str(pickle.loads(pickle.dumps(error))) == str(error)  # across processes (Ray)

    class Broken:
        def find_spec(self, name, path=None, target=None):
            if name == "broken_extra":
                raise ModuleNotFoundError("No module named 'its_dependency'", name="its_dependency")

    monkeypatch.setattr(sys, "meta_path", [Broken(), *sys.meta_path])
    with pytest.raises(MissingDependencyError, match=r"could not be imported \(ModuleNotFound"):
        require("broken_extra", extra="viz", purpose="X")


def _pty_run(args: list[str], columns: int) -> str:
    """``convnext ARGS`` on a pseudo-terminal ``columns`` wide: what it drew, escapes removed."""
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 40, columns, 0, 0))
    env = {k: v for k, v in os.environ.items() if k not in ("COLUMNS", "LINES")}
    proc = subprocess.Popen(
        [sys.executable, "-m", "convnext_keras.cli", *args],
        stdin=slave,
        stdout=slave,
        stderr=slave,
        cwd=ROOT,
        env=env,
    )
    os.close(slave)
    data, deadline = b"", time.monotonic() + 120
    while time.monotonic() < deadline:
        ready, _, _ = select.select([master], [], [], 0.2)
        if ready:
            try:
                chunk = os.read(master, 1 << 16)
            except OSError:
                break
            if not chunk:
                break
            data += chunk
        elif proc.poll() is not None:
            break
    os.close(master)
    assert proc.wait(timeout=30) == 0, data.decode(errors="replace")
    return re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", data.decode()).replace("\r", "")


@pytest.mark.parametrize("columns", [80, 60])
def test_list_never_cuts_a_name_in_a_narrow_terminal(columns):
    """In an 80-column terminal (and a 60-column one) every name is whole on its row and no
    line is wider than the terminal: other columns are left out first, and the title says
    which."""
    text = _pty_run(["list"], columns)
    lines = text.splitlines()
    assert max(len(line) for line in lines) <= columns
    rows = [line.split("│")[1].strip() for line in lines if line.startswith("│")]
    assert rows == list(registry.CHECKPOINTS)
    assert "left out for the terminal's width: source" in " ".join(text.split())
    header = next(line for line in lines if line.startswith("┃"))
    shown = [cell.strip() for cell in header.strip("┃").split("┃")]
    assert shown[0] == "name"
    if columns == 80:
        assert "licence" in shown  # what matters most stays (the README promises it)
        # nothing left out would have fitted in the room left (params: 6 characters + 3)
        assert "params" in shown or max(len(line) for line in lines) + 9 > columns
