"""The first seconds: the CLI starts without a backend, the package imports no Keras (and Keras
still finds its layers), and the backends' C++ start-up logging is quieted."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BACKENDS = ("keras", "tensorflow", "jax", "torch")


def run_python(code: str, *args: str, env=None, timeout=300) -> subprocess.CompletedProcess:
    """``python -c code args...`` in the repository root; ``env``: the whole environment."""
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code), *args],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env=os.environ if env is None else env,
        timeout=timeout,
    )


def test_cli_help_version_and_list_import_no_backend():
    """--help, --version, list (table, --json) and every subcommand's --help, in one process."""
    result = run_python(
        """
        import contextlib, io, json, sys
        from convnext_keras.cli import main

        runs = [["--help"], ["--version"], ["list"], ["list", "--json"], ["list", "tiny"]]
        runs += [[name, "--help"] for name in sorted(main.commands)]
        report = []
        for args in runs:
            out = io.StringIO()
            with contextlib.redirect_stdout(out):
                try:
                    main.main(args, prog_name="convnext", standalone_mode=False)
                    code = 0
                except SystemExit as e:
                    code = e.code
            report.append([args, code, len(out.getvalue())])
        loaded = [m for m in ("keras", "tensorflow", "jax", "torch") if m in sys.modules]
        print(json.dumps({"runs": report, "loaded": loaded}))
        """
    )
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout.splitlines()[-1])
    assert report["loaded"] == []
    commands = {args[0] for args, _, _ in report["runs"]}
    assert {"predict", "eval", "export", "finetune", "fetch", "list", "bench"} <= commands
    for args, code, size in report["runs"]:
        assert code in (0, None) and size > 0, (args, code)


@pytest.fixture(scope="module")
def saved_objects(tmp_path_factory):
    """A .keras file with the network's registered layers (LayerScale, StochasticDepth,
    DepthwiseConv2D, gelu) and preprocess.Normalize, and the serialized fine-tuning optimizer
    and schedule (what a compiled model's file records)."""
    import keras

    import convnext_keras as ck
    from convnext_keras import preprocess

    model = preprocess.with_normalization(
        ck.build_model("atto", num_classes=3, drop_path_rate=0.1), resolution=32
    )
    schedule = ck.finetune.schedule(1e-3, 10)
    optimizer = ck.finetune.optimizer(model, lr=schedule)
    path = tmp_path_factory.mktemp("registration") / "m.keras"
    model.save(path)
    keras.backend.clear_session()
    return path, json.dumps(keras.saving.serialize_keras_object(optimizer))


def test_keras_finds_the_classes_without_the_package_importing_keras(saved_objects):
    """``import convnext_keras`` imports no Keras, yet ``keras.saving`` needs no custom_objects,
    whichever of the package's modules is imported first (the Keras import may then come from
    inside the package, while that module is still being imported)."""
    path, optimizer = saved_objects
    code = """
        import json, sys
        import {first}
        if "{first}" == "convnext_keras":
            assert not [m for m in {backends!r} if m in sys.modules], sorted(sys.modules)
        import keras
        model = keras.saving.load_model({path!r})
        optimizer = keras.saving.deserialize_keras_object(json.loads({optimizer!r}))
        print(type(optimizer).__name__, type(optimizer._learning_rate).__name__,
              sorted({{type(layer).__name__ for layer in model._flatten_layers()}}))
    """
    runs = {
        first: subprocess.Popen(
            [
                sys.executable,
                "-c",
                textwrap.dedent(code).format(
                    first=first, backends=BACKENDS, path=str(path), optimizer=optimizer
                ),
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            cwd=ROOT,
        )  # fmt: skip
        for first in ("convnext_keras", "convnext_keras.nets.convnext")
    }
    for first, run in runs.items():
        out, err = run.communicate(timeout=300)
        assert run.returncode == 0, (first, err[-3000:])
        last = out.splitlines()[-1]
        assert last.startswith("LayerDecayAdamW WarmupCosine"), (first, last)
        for name in ("LayerScale", "StochasticDepth", "DepthwiseConv2D", "Normalize"):
            assert name in last, (first, last)


NOISE = (
    "WARNING: All log messages before absl::InitializeLog() is called are written to STDERR\n"
    "I0000 00:00:1796016963.249529    5246 cpu_feature_guard.cc:227] This TensorFlow binary is "
    "optimized to use available CPU instructions in performance-critical operations.\n"
    "To enable the following instructions: AVX2 FMA, in other operations, rebuild TensorFlow.\n"
    "I0000 00:00:1796016963.249864    5246 cudart_stub.cc:31] Could not find cuda drivers on "
    "your machine, GPU will not be used.\n"
    # A TFLite export and its verification (captured from `convnext export --format tflite`).
    "W0000 00:00:1796676677.481145   16041 tf_tfl_flatbuffer_helpers.cc:364] Ignored "
    "output_format.\n"
    "W0000 00:00:1796676677.481188   16041 tf_tfl_flatbuffer_helpers.cc:367] Ignored "
    "drop_control_dependency.\n"
    "INFO: Created TensorFlow Lite XNNPACK delegate for CPU.\n"
    # Ray's core worker on a successful `convnext embed --ray` run.
    "[2026-12-07 20:51:43,228 E 16629 16629] core_worker.cc:2465: Actor with class name: "
    "'MapWorker(MapBatches(_RayEmbedder))' and ID: '7b4deb0dbb8a42eda725b5cf01000000' has "
    "constructor arguments in the object store and max_restarts > 0. If the arguments in the "
    "object store go out of scope or are lost, the actor restart will fail.\n"
)
REAL = (
    "W0000 00:00:1796016964.000000    5246 some_op.cc:12] a real warning\n"
    "W0000 00:00:1796676677.481188   16041 tf_tfl_flatbuffer_helpers.cc:367] Ignored other.\n"
    "[2026-12-07 20:51:43,228 E 16629 16629] core_worker.cc:2465: a real Ray error\n"
    "E0000 00:00:1796016964.000001    5246 other.cc:34] a real error\n"
    "To enable the following instructions: (not a continuation: kept)\n"
)


@pytest.mark.parametrize("user_level", [None, "0"])
def test_quiet_backend_logs_drops_start_up_noise_and_keeps_warnings(user_level):
    """What the libraries write to fd 2 goes through the filter; Python's stderr does not.
    A TF_CPP_MIN_LOG_LEVEL set by the user turns the filter off."""
    env = dict(os.environ)
    env.pop("TF_CPP_MIN_LOG_LEVEL", None)
    if user_level is not None:
        env["TF_CPP_MIN_LOG_LEVEL"] = user_level
    code = f"""
        import os, sys
        from convnext_keras.cli._quiet import quiet_backend_logs
        on = quiet_backend_logs()
        os.write(2, {(NOISE + REAL).encode()!r})
        print("python: error: one line", file=sys.stderr)
        print(on, os.environ["TF_CPP_MIN_LOG_LEVEL"])
    """
    result = run_python(code, env=env, timeout=60)
    assert result.returncode == 0, result.stderr
    if user_level is None:
        assert result.stdout.split() == ["True", "1"]
        for line in NOISE.splitlines():
            assert line not in result.stderr
        for line in REAL.splitlines():
            assert line in result.stderr
    else:
        assert result.stdout.split() == ["False", "0"]
        assert NOISE + REAL in result.stderr
    assert "python: error: one line" in result.stderr
