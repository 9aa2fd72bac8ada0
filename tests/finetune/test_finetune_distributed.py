"""Data parallelism over two virtual CPU devices gives the one-device loss trajectory.

TensorFlow: two logical CPUs (``tf.config.set_logical_device_configuration``) and
``tf.distribute.MirroredStrategy``; JAX: ``--xla_force_host_platform_device_count=2`` and
``keras.distribution.DataParallel``.  Each backend runs in its own process (device setup must
come before the backend starts); there the same run is trained with ``distribution="off"`` and
``"auto"``, same global batch, and the per-step losses, epoch metrics and final weights are
compared.  Stochastic depth is off: its per-sample masks are drawn per replica.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
from test_finetune_data import MICRO_SETUP, digits_folder

SCRIPT = textwrap.dedent(
    """
    import json, os, sys
    if os.environ["KERAS_BACKEND"] == "tensorflow":
        import tensorflow as tf
        cpu = tf.config.list_physical_devices("CPU")[0]
        tf.config.set_logical_device_configuration(
            cpu, [tf.config.LogicalDeviceConfiguration()] * 2
        )
    import keras
    import convnext_keras as ck
    from convnext_keras.finetune import devices, loop
    {micro}

    class Losses(keras.callbacks.Callback):
        def __init__(self):
            super().__init__()
            self.running = []
        def on_train_batch_end(self, batch, logs=None):
            self.running.append((batch, float(logs["loss"])))

    data, out = sys.argv[1], sys.argv[2]
    results = {}
    for mode in ("off", "auto"):
        losses = Losses()
        result = ck.finetune.run(
            data, os.path.join(out, mode), distribution=mode, callbacks=[losses],
            model="convnext_micro", epochs=2, batch_size=8, accumulation=1, resolution=32,
            lr=2e-3, layer_decay=0.9, weight_decay=0.05, drop_path=0.0,
            val_fraction=0.25, seed=1, checkpoint_every=0, checkpoint_minutes=0,
            export=False, workers=1, verbose=0,
        )
        weights = loop.cache.load_converted(result.files["best_weights"])
        results[mode] = {
            "devices": devices._devices(mode).replicas,
            "running": losses.running,
            "history": result.history,
            "head": weights["head_fc"][0].tolist(),
            "stem": weights["stem_conv"][0].ravel().tolist(),
        }
    print("RESULT" + json.dumps(results))
    """
).replace("{micro}", MICRO_SETUP)


def _per_step(running):
    """Per-step losses from fit's running means (batch index restarts every epoch)."""
    losses, previous = [], 0.0
    for batch, mean in running:
        k = batch + 1
        losses.append(k * mean - (k - 1) * (previous if batch else 0.0))
        previous = mean
    return np.array(losses)


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["tensorflow", "jax"])
def test_two_devices_follow_the_one_device_loss_trajectory(backend, tmp_path):
    data = digits_folder(tmp_path / "digits", per_class=16, classes=4)
    env = {**os.environ, "KERAS_BACKEND": backend, "CONVNEXT_NO_PROGRESS": "1"}
    if backend == "jax":
        env["XLA_FLAGS"] = (
            env.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=2"
        ).strip()
        # XLA's own depthwise convolution: the CPU default (shifted sums, tested equal in
        # test_layers, gradients included) takes ~2x longer to compile; this test is about
        # data parallelism.
        env["CONVNEXT_DEPTHWISE"] = "native"
    proc = subprocess.run(
        [sys.executable, "-c", SCRIPT, str(data), str(tmp_path / "runs")],
        capture_output=True,
        text=True,
        env=env,
        timeout=900,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    line = next(x for x in proc.stdout.splitlines() if x.startswith("RESULT"))
    results = json.loads(line[len("RESULT") :])
    one, two = results["off"], results["auto"]
    assert (one["devices"], two["devices"]) == (1, 2)

    steps_one, steps_two = _per_step(one["running"]), _per_step(two["running"])
    assert len(steps_one) == len(steps_two) == 12  # 2 epochs x 6 steps of the same batches
    np.testing.assert_allclose(steps_two, steps_one, rtol=1e-4, atol=1e-5)
    assert np.ptp(steps_one) > 1e-3  # the losses move: the comparison is not of constants
    for a, b in zip(one["history"], two["history"]):
        for key in ("train_loss", "train_acc", "val_loss", "val_acc1"):
            assert b[key] == pytest.approx(a[key], rel=1e-4, abs=1e-5), key
    np.testing.assert_allclose(two["head"], one["head"], rtol=1e-3, atol=1e-5)
    np.testing.assert_allclose(two["stem"], one["stem"], rtol=1e-3, atol=1e-5)
