"""Fine-tuning on two hosts, proved with two processes talking over 127.0.0.1 only.

For each engine (JAX: ``jax.distributed`` + ``keras.distribution.DataParallel`` with gloo's CPU
collectives; TensorFlow: ``MultiWorkerMirroredStrategy`` from ``TF_CONFIG``):

1. one process trains the reference run (one device, the whole global batch);
2. two processes, launched as docs/finetune.md says (the environment variables, one command
   per host), train the same run - each on its half of every global batch - until a checkpoint
   in the middle of epoch 2 is written; then process 1 is killed with SIGKILL.  Process 0 must
   stop within a bounded time with the one-line error naming the checkpoint (exit status 4),
   never hang; every step it trained has the reference's loss;
3. ``convnext finetune DATA --resume OUT --multi-host`` on both hosts finishes the run: every
   epoch's metrics and the best weights equal the uninterrupted reference's.

Mixup, cutmix (partners on the other host: 3 rows per host), EMA and gradient accumulation are
on, so every piece of state a resume restores is in play; stochastic depth is off (its masks are
drawn per replica on TensorFlow).
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest
from test_finetune_data import MICRO_CLI, MICRO_SETUP, digits_folder

from convnext_keras.finetune import devices, loop, rundir, state

RECIPE = dict(
    model="convnext_micro", epochs=2, batch_size=6, accumulation=2, resolution=32, lr=2e-3,
    layer_decay=0.9, weight_decay=0.05, drop_path=0.0, ema=0.8, mixup=0.8, cutmix=1.0,
    val_fraction=0.25, seed=5,
)  # fmt: skip
RUNTIME = dict(checkpoint_every=1, export=False, workers=1)
COMPARED = ("train_loss", "train_acc", "val_loss", "val_acc1", "lr")
#: Seconds any one process may take (a hang fails the test instead of CI).
PROCESS_TIMEOUT = 300
#: Seconds the surviving host may take to stop after its peer is killed.
FAILURE_TIMEOUT = 60

# One host's process: what `convnext finetune --multi-host` does, plus a callback printing
# every step's loss (the trajectory compared with the one-process run).
SCRIPT = textwrap.dedent(
    """
    import json, os, sys
    import keras
    import convnext_keras as ck
    {micro}

    class Steps(keras.callbacks.Callback):
        def on_train_batch_end(self, batch, logs=None):
            print("STEP", json.dumps([batch, float(logs["loss"])]), flush=True)

    data, out, options = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
    if os.environ.get("KERAS_DISTRIBUTION_JOB_ADDRESSES") or os.environ.get("TF_CONFIG"):
        ck.finetune.connect_hosts()
    try:
        ck.finetune.run(data, out, callbacks=[Steps()], verbose=1, **options)
    except ck.finetune.HostLost as e:
        print("error:", e, file=sys.stderr, flush=True)
        sys.stdout.flush()
        os._exit(4)
    """
).replace("{micro}", MICRO_SETUP)


def _free_ports(n: int) -> list[int]:
    sockets = [socket.socket() for _ in range(n)]
    for s in sockets:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in sockets]
    for s in sockets:
        s.close()
    return ports


def one_host_environment(backend: str, cache) -> dict:
    env = {**os.environ, "KERAS_BACKEND": backend, "CONVNEXT_NO_PROGRESS": "1"}
    if backend == "jax":
        # XLA's own depthwise convolution: compiles in half the time of the CPU default
        # (shifted sums, tested equal in test_layers); this test is about the hosts.
        env["CONVNEXT_DEPTHWISE"] = "native"
        # JAX's persistent compilation cache: the resumed processes reuse the killed ones'
        # compiled steps (what a real cluster can do as well).
        env["JAX_COMPILATION_CACHE_DIR"] = str(cache)
        env["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
        env["JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES"] = "0"
    return env


def host_environments(backend: str, cache, hosts: int = 2) -> list[dict]:
    """Each host's environment, as docs/finetune.md gives it (all hosts on 127.0.0.1)."""
    ports = _free_ports(hosts)
    base = one_host_environment(backend, cache)
    if backend == "jax":
        addresses = ",".join(f"127.0.0.1:{p}" for p in ports)
        return [
            {
                **base,
                "KERAS_DISTRIBUTION_JOB_ADDRESSES": addresses,
                "KERAS_DISTRIBUTION_NUM_PROCESSES": str(hosts),
                "KERAS_DISTRIBUTION_PROCESS_ID": str(i),
            }
            for i in range(hosts)
        ]
    cluster = {"worker": [f"127.0.0.1:{p}" for p in ports]}
    return [
        {
            **base,
            "TF_CONFIG": json.dumps({"cluster": cluster, "task": {"type": "worker", "index": i}}),
        }
        for i in range(hosts)
    ]


def _script(data, out, options) -> list[str]:
    return [sys.executable, "-c", SCRIPT, str(data), str(out), json.dumps(options)]


def _steps(output: str) -> list[float]:
    return [json.loads(line[5:])[1] for line in output.splitlines() if line.startswith("STEP ")]


def _per_step(running: list[float], steps_per_epoch: int, first: int = 0) -> np.ndarray:
    """Per-step losses from fit's running means (restarting every epoch)."""
    losses, previous = [], 0.0
    for i, mean in enumerate(running):
        k = (first + i) % steps_per_epoch + 1
        losses.append(k * mean - (k - 1) * (previous if k > 1 else 0.0))
        previous = mean
    return np.array(losses)


@pytest.fixture(scope="module")
def digits(tmp_path_factory):
    """48 digit images of 4 classes: 36 train (6 steps of 6 per epoch), 12 validation."""
    return digits_folder(tmp_path_factory.mktemp("digits"), per_class=12, classes=4)


@pytest.fixture
def started():
    """``started(args, **popen)``: a subprocess that is killed if still running at teardown."""
    processes = []

    def start(args, **kwargs):
        processes.append(subprocess.Popen(args, **kwargs))
        return processes[-1]

    yield start
    for p in processes:
        if p.poll() is None:
            p.kill()
            p.wait()


def _metrics(out) -> list[dict]:
    return json.loads((out / "metrics.json").read_text())


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["tensorflow", "jax"])
def test_two_hosts_follow_one_host_survive_a_kill_and_resume_to_the_same_result(
    backend, digits, tmp_path, started
):
    # (TensorFlow: Keras' gradient accumulation fails under tf.distribute; refused, see
    # test_accumulation_under_tf_distribute_is_refused_with_the_reason.)
    options = {**RECIPE, **RUNTIME, "accumulation": 2 if backend == "jax" else 1}
    # The one-process reference runs beside the two hosts (they wait on each other at times).
    env_one = one_host_environment(backend, tmp_path / "jax_cache")
    reference = started(
        _script(digits, tmp_path / "one", options),
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env_one,
    )  # fmt: skip
    # Two hosts, until a checkpoint in the middle of epoch 2; then host 1 is killed.
    out = tmp_path / "two"
    envs = host_environments(backend, tmp_path / "jax_cache")
    logs = [open(tmp_path / f"host{i}.log", "w+") for i in range(2)]  # noqa: SIM115
    procs = [
        started(_script(digits, out, options), stdout=log, stderr=subprocess.STDOUT, env=env)
        for env, log in zip(envs, logs)
    ]
    checkpoint = out / rundir.STATE_FILE
    try:
        deadline = time.monotonic() + PROCESS_TIMEOUT
        while time.monotonic() < deadline and all(p.poll() is None for p in procs):
            meta = state.read_meta(checkpoint) if checkpoint.exists() else None
            if meta and (meta["epoch"], meta["step"]) >= (1, 2):
                break
            time.sleep(0.05)
        alive = [p.poll() is None for p in procs]
        procs[1].send_signal(signal.SIGKILL)
        killed_at = time.monotonic()
        assert all(alive), [open(tmp_path / f"host{i}.log").read()[-3000:] for i in range(2)]
        procs[1].wait()
        code = procs[0].wait(timeout=FAILURE_TIMEOUT)
        stopped_after = time.monotonic() - killed_at
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    reference_output = reference.communicate(timeout=PROCESS_TIMEOUT)[0]
    assert reference.returncode == 0, reference_output[-4000:]
    steps_per_epoch = 6
    one = _per_step(_steps(reference_output), steps_per_epoch)
    assert len(one) == 2 * steps_per_epoch and np.ptp(one) > 1e-3
    log0 = (tmp_path / "host0.log").read_text()
    assert code == 4, log0[-4000:]
    errors = [line for line in log0.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "Lost contact with another host" in errors[0], log0[-3000:]
    assert f"--resume {out} on every host" in errors[0]
    kept = state.read_meta(checkpoint)
    assert kept["epoch"] == 1 and 0 < kept["step"] < steps_per_epoch, kept
    assert f"(epoch 2, step {kept['step']}) is kept" in errors[0]
    print(f"{backend}: host 0 stopped {stopped_after:.1f} s after host 1 was killed")

    # Every step the two hosts trained has the one-host loss (same global batches).
    two = _per_step(_steps(log0), steps_per_epoch)
    assert len(two) > steps_per_epoch
    np.testing.assert_allclose(two, one[: len(two)], rtol=1e-4, atol=1e-5)
    gap = np.abs(two - one[: len(two)]).max()
    print(f"{backend}: {len(two)} steps, max |loss difference| {gap:.1e}")

    # Both hosts resume with the command line; the result is the uninterrupted run's.
    resumed = [
        started(
            [
                sys.executable,
                "-c",
                MICRO_CLI,
                "finetune",
                str(digits),
                "--resume",
                str(out),
                "--multi-host",
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env=env,
        )  # fmt: skip
        for env in envs
    ]
    try:
        outputs = [p.communicate(timeout=PROCESS_TIMEOUT)[0] for p in resumed]
    finally:
        for p in resumed:
            if p.poll() is None:
                p.kill()
    for p, output in zip(resumed, outputs):
        assert p.returncode == 0, output[-4000:]
    assert f"epoch {kept['epoch'] + 1}, step {kept['step']}" in outputs[0]
    assert "on 2 hosts" in outputs[1] or "2 workers" in outputs[1]
    got, want = _metrics(out), _metrics(tmp_path / "one")
    assert len(got) == len(want) == 2
    for a, b in zip(got, want):
        for key in COMPARED:
            assert a[key] == pytest.approx(b[key], rel=1e-4, abs=1e-5), (a["epoch"], key)
    a = loop.cache.load_converted(out / rundir.BEST_WEIGHTS)
    b = loop.cache.load_converted(tmp_path / "one" / rundir.BEST_WEIGHTS)
    for layer in b:
        for x, y in zip(a[layer], b[layer]):
            np.testing.assert_allclose(x, y, rtol=1e-3, atol=1e-5, err_msg=layer)
    worst = max(float(np.abs(x - y).max()) for k in b for x, y in zip(a[k], b[k]))
    print(f"{backend}: best weights after the resume, max |difference| {worst:.1e}")
    assert (out / "best.keras").is_file() and (out / "last.keras").is_file()


def test_tf_config_names_this_worker_and_bad_ones_are_refused(monkeypatch):
    from convnext_keras.finetune import hosts

    monkeypatch.delenv("TF_CONFIG", raising=False)
    assert hosts.tf_config() is None
    cluster = {"chief": ["a:1"], "worker": ["b:1", "c:1"]}
    for task, expected in ((("chief", 0), (0, 3)), (("worker", 1), (2, 3))):
        config = {"cluster": cluster, "task": {"type": task[0], "index": task[1]}}
        monkeypatch.setenv("TF_CONFIG", json.dumps(config))
        assert hosts.tf_config() == expected
    monkeypatch.setenv("TF_CONFIG", json.dumps({"cluster": cluster, "task": {"type": "ps"}}))
    with pytest.raises(ValueError, match="does not describe this task"):
        hosts.tf_config()


def test_multi_host_without_its_environment_is_a_one_line_error(monkeypatch, tmp_path):
    import keras
    from click.testing import CliRunner

    from convnext_keras.cli import main

    if keras.backend.backend() != "tensorflow":
        pytest.skip("the TensorFlow message (JAX's needs a fresh process)")
    monkeypatch.delenv("TF_CONFIG", raising=False)
    result = CliRunner().invoke(
        main, ["finetune", str(tmp_path), "--out", str(tmp_path / "o"), "--multi-host"]
    )
    assert result.exit_code == 2, result.output
    assert "reads its workers from TF_CONFIG, which is not set" in result.stderr


def test_engine_errors_of_a_lost_peer_are_recognised():
    import keras

    from convnext_keras.finetune import hosts

    if keras.backend.backend() == "tensorflow":
        import tensorflow as tf

        assert hosts.is_host_failure(tf.errors.UnavailableError(None, None, "peer gone"))
        assert not hosts.is_host_failure(tf.errors.InternalError(None, None, "a bug"))
    elif keras.backend.backend() == "jax":
        assert hosts.is_host_failure(ValueError("UNKNOWN: Gloo all-reduce failed: reset"))
    assert not hosts.is_host_failure(ValueError("batch_size 6 does not split over 4 hosts"))
    assert hosts.first_line(RuntimeError("\n  first\nsecond")) == "first"


ACCUMULATION_SCRIPT = textwrap.dedent(
    """
    import sys
    import tensorflow as tf
    cpu = tf.config.list_physical_devices("CPU")[0]
    tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
    import convnext_keras as ck
    try:
        ck.finetune.run(sys.argv[1], sys.argv[2], model="convnext_atto", batch_size=6,
                        accumulation=2, resolution=32, verbose=0)
    except ValueError as e:
        print("REFUSED", e)
    """
)


def test_accumulation_under_tf_distribute_is_refused_with_the_reason(digits, tmp_path):
    """Keras 3's gradient accumulation fails inside tf.distribute (merge_call in a cond):
    refused before anything is built, naming the ways out."""
    env = {**os.environ, "KERAS_BACKEND": "tensorflow"}
    proc = subprocess.run(
        [sys.executable, "-c", ACCUMULATION_SCRIPT, str(digits), str(tmp_path / "o")],
        capture_output=True, text=True, env=env, timeout=PROCESS_TIMEOUT,
    )  # fmt: skip
    assert "REFUSED Gradient accumulation (--accum-steps 2) fails under tf.distribute" in (
        proc.stdout
    ), proc.stderr[-3000:]
    assert "on 2 devices use --accum-steps 1" in proc.stdout
    assert not (tmp_path / "o").exists()


def test_distribution_off_on_several_workers_is_refused(monkeypatch):
    """Every worker would train alone and write the same files: refused, naming the way out."""
    import keras

    if keras.backend.backend() != "tensorflow":
        pytest.skip("TF_CONFIG is read on the TensorFlow backend")
    cluster = {"worker": ["127.0.0.1:1", "127.0.0.1:2"]}
    monkeypatch.setenv(
        "TF_CONFIG", json.dumps({"cluster": cluster, "task": {"type": "worker", "index": 1}})
    )
    with pytest.raises(ValueError, match="cannot train the 2 workers TF_CONFIG names"):
        devices._devices("off")
