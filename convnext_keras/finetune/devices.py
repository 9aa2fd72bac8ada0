"""Where a run trains: the data-parallel engine of the backend (``tf.distribute`` strategies on
TensorFlow, ``keras.distribution.DataParallel`` on JAX) or one device, and a forward pass on
this process's own device outside it."""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Callable

import keras

from convnext_keras.finetune import hosts


@dataclasses.dataclass
class _Devices:
    scope: contextlib.AbstractContextManager
    replicas: int
    description: str
    chief: bool = True
    #: Processes (hosts) of the run, and this one's index: it trains on rows
    #: ``data.shard_rows(batch, (index, processes))`` of every global batch.
    processes: int = 1
    index: int = 0
    #: ``gather(local) -> (processes, *local.shape)``, a collective (multi-host runs).
    gather: Callable | None = None
    #: ``fit`` keywords for a TrainBatches (``x=`` it, or the engine's per-worker dataset).
    fit_input: Callable = lambda batches: {"x": batches}
    #: Adjusts the compiled model for the engine (TF multi-worker: Keras 3 workarounds).
    prepare: Callable = lambda model: None


def _tf_devices(mode: str) -> _Devices:
    import tensorflow as tf

    config = hosts.tf_config()
    if mode == "off" and config is not None and config[1] > 1:
        raise ValueError(
            f"distribution 'off' (one device) cannot train the {config[1]} workers TF_CONFIG "
            "names; use --distribution auto, or unset TF_CONFIG for a single process."
        )
    if mode != "off" and config is not None:
        index, workers = config
        strategy = tf.distribute.MultiWorkerMirroredStrategy()
        return _Devices(
            strategy.scope(),
            strategy.num_replicas_in_sync,
            f"MultiWorkerMirroredStrategy over {workers} workers "
            f"({strategy.num_replicas_in_sync} replicas; this is worker {index})",
            chief=index == 0,
            processes=workers,
            index=index,
            gather=lambda local: hosts.tf_gather(strategy, local),
            fit_input=lambda batches: {
                "x": hosts.tf_worker_dataset(strategy, batches, index, workers),
                "steps_per_epoch": len(batches),
            },
            prepare=hosts.tf_multi_worker_model,
        )
    devices = tf.config.list_logical_devices("GPU") or tf.config.list_logical_devices("CPU")
    if mode == "off" or len(devices) < 2:
        return _Devices(contextlib.nullcontext(), 1, f"one device ({devices[0].name})")
    strategy = tf.distribute.MirroredStrategy([d.name for d in devices])
    return _Devices(
        strategy.scope(),
        len(devices),
        f"MirroredStrategy over {len(devices)} devices ({', '.join(d.name for d in devices)})",
    )


@contextlib.contextmanager
def _global(get, set_, value):
    """Set a Keras global (dtype policy, distribution) for the block, then restore it."""
    previous = get()
    set_(value)
    try:
        yield
    finally:
        set_(previous)


def _jax_distribution(distribution):
    return _global(
        keras.distribution.distribution, keras.distribution.set_distribution, distribution
    )


def _jax_devices(mode: str) -> _Devices:
    import jax

    devices = keras.distribution.list_devices()
    processes = jax.process_count()
    if processes > 1 and mode == "off":
        raise ValueError(
            f"distribution 'off' (one device) cannot train a run of {processes} hosts; use "
            "--distribution auto, or start a single process without --multi-host."
        )
    if mode == "off" or len(devices) < 2:
        return _Devices(contextlib.nullcontext(), 1, f"one device ({devices[0]})")
    # Each process hands Keras its own rows of the global batch (auto_shard_dataset is for
    # tf.data inputs, which Keras would shard itself).
    distribution = keras.distribution.DataParallel(
        devices=devices, auto_shard_dataset=processes == 1
    )
    index = jax.process_index()
    return _Devices(
        _jax_distribution(distribution),
        len(devices),
        f"keras.distribution.DataParallel over {len(devices)} devices"
        + (f" on {processes} hosts (this is process {index})" if processes > 1 else ""),
        index == 0,
        processes=processes,
        index=index,
        gather=hosts.jax_gather,
    )


def _nothing():
    return contextlib.nullcontext()


def _local_forward(model: keras.Model) -> Callable:
    """``f(images) -> logits`` running ``model`` on this process's own device, outside any
    distribution (its current weights at every call): a jitted ``stateless_call`` on JAX, a
    ``tf.function`` on TensorFlow."""
    if keras.backend.backend() == "jax":
        import jax

        @jax.jit
        def forward(trainable, non_trainable, x):
            return model.stateless_call(trainable, non_trainable, x, training=False)[0]

        return lambda x: forward(
            [v.value for v in model.trainable_variables],
            [v.value for v in model.non_trainable_variables],
            x,
        )
    if keras.backend.backend() == "tensorflow":
        import tensorflow as tf

        forward = tf.function(lambda x: model(x, training=False), reduce_retracing=True)
        return lambda x: forward(x).numpy()
    return lambda x: keras.ops.convert_to_numpy(model(x, training=False))


def _devices(mode: str) -> _Devices:
    if mode not in ("auto", "off"):
        raise ValueError(
            f"distribution must be 'auto' (every local device) or 'off', got {mode!r}."
        )
    backend = keras.backend.backend()
    if backend == "tensorflow":
        return _tf_devices(mode)
    if backend == "jax":
        return _jax_devices(mode)
    return _Devices(contextlib.nullcontext(), 1, f"one device ({backend} backend)")
