"""The GPU machines have Keras + JAX and no TensorFlow: the package must work there."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import torch_reference as ref

from convnext_keras import registry

BLOCK_TENSORFLOW = textwrap.dedent(
    """
    import sys

    class NoTensorFlow:
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in ("tensorflow", "tf_keras", "tensorflow_hub", "tf2onnx"):
                raise ImportError(f"{name} is blocked: this test simulates a machine without it")

    sys.meta_path.insert(0, NoTensorFlow())
    """
)


def _run(code: str) -> str:
    result = subprocess.run(
        [sys.executable, "-c", BLOCK_TENSORFLOW + textwrap.dedent(code)],
        capture_output=True,
        text=True,
        env={**os.environ, "KERAS_BACKEND": "jax"},
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout


def test_every_module_imports_without_tensorflow():
    out = _run(
        """
        import importlib, pkgutil
        import convnext_keras
        names = [m.name for m in pkgutil.walk_packages(convnext_keras.__path__, "convnext_keras.")]
        names = [n for n in names if not n.endswith(".__main__")]  # `python -m` entry points
        for name in names:
            importlib.import_module(name)
        print(len(names), "tensorflow" in sys.modules)
        """
    )
    count, tf_loaded = out.split()[-2:]
    assert int(count) >= 8 and tf_loaded == "False"


def test_load_and_run_a_model_without_tensorflow(tmp_path):
    atto = registry.VARIANTS["atto"]
    path = ref.save_timm(ref.hf_model(atto.depths, atto.dims, 10), tmp_path / "m.safetensors")
    out = _run(
        f"""
        import numpy as np
        import convnext_keras as ck
        model = ck.load_model("convnext_atto", weights={str(path)!r}, num_classes=10)
        print(model.predict_on_batch(np.zeros((1, 64, 64, 3), "float32")).shape)
        """
    )
    assert out.strip().endswith("(1, 10)")
