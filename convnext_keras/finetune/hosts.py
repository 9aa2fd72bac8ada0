"""Fine-tuning on several hosts: connecting the processes, the engines' multi-host pieces, and
what happens when a host is lost.

One process per host runs the same command; the engines the backends provide do the rest:

* JAX: :func:`connect_hosts` calls ``jax.distributed.initialize`` with the coordinator (process
  0's address) and the process count and id, read from Keras' own variables
  ``KERAS_DISTRIBUTION_JOB_ADDRESSES`` (``host0:port,host1:port,...``; the first is the
  coordinator), ``KERAS_DISTRIBUTION_NUM_PROCESSES`` and ``KERAS_DISTRIBUTION_PROCESS_ID`` (or
  from the cluster JAX detects itself: Cloud TPU, SLURM, ...).  The run then trains with
  ``keras.distribution.DataParallel`` over the devices of every process; on CPUs the
  cross-process collectives are gloo's (``jax_cpu_collectives_implementation``).
* TensorFlow: ``TF_CONFIG`` names the workers; the run uses
  ``tf.distribute.MultiWorkerMirroredStrategy`` (:func:`tf_multi_worker`).

Each process feeds only its rows of every global batch (``data.shard_rows``), validation is
split the same way and the logits gathered (:func:`gather`), and only process 0 (TensorFlow: the
chief) writes files.  A host that dies makes the collective of the next step fail on the
others: gloo / gRPC report the closed connection at once, and the engines' heartbeats (JAX's
coordination service, 100 s; TensorFlow's peer health checks) bound the wait when no
connection is closed.  :func:`is_host_failure` recognises those errors so that the run stops
with :class:`HostLost`, naming the checkpoint every host resumes from.
"""

from __future__ import annotations

import json
import os
import re

#: Keras' variables for the JAX coordinator (``keras.distribution.initialize`` reads them too).
JOB_ADDRESSES = "KERAS_DISTRIBUTION_JOB_ADDRESSES"
NUM_PROCESSES = "KERAS_DISTRIBUTION_NUM_PROCESSES"
PROCESS_ID = "KERAS_DISTRIBUTION_PROCESS_ID"
#: Seconds ``connect_hosts`` waits for every process to join (JAX's default).
CONNECT_TIMEOUT_S = 300


class HostLost(RuntimeError):
    """Another host of a multi-host run stopped answering; the message says how to resume."""


def _env_int(name: str) -> int | None:
    value = os.environ.get(name)
    if value in (None, ""):
        return None
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"{name} must be an integer, got {value!r}.") from None


def connect_hosts(
    coordinator: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
    *,
    timeout: int = CONNECT_TIMEOUT_S,
) -> tuple[int, int]:
    """Join this process to a multi-host run; returns ``(process index, process count)``.

    JAX backend: ``jax.distributed.initialize`` with the coordinator ``host:port`` (process
    0's; the first of ``KERAS_DISTRIBUTION_JOB_ADDRESSES`` when not given), the process count
    and this process's id (``KERAS_DISTRIBUTION_NUM_PROCESSES`` / ``_PROCESS_ID``); anything
    not given or set is left to JAX's cluster detection.  Call it before anything computes
    (the CLI's ``--multi-host`` does).  A second call returns the existing connection.
    TensorFlow backend: the hosts come from ``TF_CONFIG``; this only checks that it is set.

    Raises:
        ValueError: another backend, a malformed variable, TF_CONFIG missing, or no
            coordinator given or detected.
        ConnectionError: the processes did not all join within ``timeout`` seconds.
    """
    import keras

    backend = keras.backend.backend()
    if backend == "tensorflow":
        config = tf_config()
        if config is None:
            raise ValueError(
                "Multi-host training on TensorFlow reads its workers from TF_CONFIG, which is "
                'not set: TF_CONFIG=\'{"cluster": {"worker": ["host0:2222", "host1:2222"]}, '
                '"task": {"type": "worker", "index": 0}}\' on the first host (index 1 on the '
                "second), see docs/finetune.md."
            )
        return config
    if backend != "jax":
        raise ValueError(
            f"Multi-host training needs the JAX or the TensorFlow backend, not {backend}."
        )
    import jax

    if _jax_connected():
        return jax.process_index(), jax.process_count()
    addresses = coordinator or os.environ.get(JOB_ADDRESSES) or None
    if addresses:
        coordinator = addresses.split(",")[0].strip()
    num_processes = num_processes if num_processes is not None else _env_int(NUM_PROCESSES)
    process_id = process_id if process_id is not None else _env_int(PROCESS_ID)
    if addresses and num_processes is None:
        num_processes = len(addresses.split(","))
    # gloo is JAX's default for cross-process CPU collectives from 0.5 on; older versions
    # have none unless asked.
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    try:
        jax.distributed.initialize(
            coordinator_address=coordinator,
            num_processes=num_processes,
            process_id=process_id,
            initialization_timeout=int(timeout),
        )
    except ValueError as e:
        if "coordinator_address" in str(e) or "must be defined" in str(e):
            raise ValueError(
                f"--multi-host needs the coordinator: set {JOB_ADDRESSES}=host0:port (process "
                f"0's address), {NUM_PROCESSES}=N and {PROCESS_ID}=i on every host, see "
                "docs/finetune.md."
            ) from None
        raise
    except Exception as e:  # jaxlib's runtime errors: the coordinator did not answer in time
        raise ConnectionError(
            f"Process {process_id} could not join the run at {coordinator} within {timeout} s "
            f"({first_line(e)}). Start the same command on every host, process 0 on "
            f"{coordinator}."
        ) from None
    return jax.process_index(), jax.process_count()


def _jax_connected() -> bool:
    """Whether ``jax.distributed`` is initialised (without starting JAX's backend)."""
    import jax

    if hasattr(jax.distributed, "is_initialized"):  # JAX >= 0.4.34
        return jax.distributed.is_initialized()
    from jax._src import distributed

    return distributed.global_state.client is not None


def tf_config() -> tuple[int, int] | None:
    """``(this worker's index, worker count)`` from ``TF_CONFIG`` (a chief counts first), or
    None when it is not set.

    Raises:
        ValueError: TF_CONFIG is not JSON or does not name this task in its cluster.
    """
    raw = os.environ.get("TF_CONFIG")
    if not raw:
        return None
    try:
        config = json.loads(raw)
        cluster, task = config["cluster"], config["task"]
        members = [("chief", i) for i in range(len(cluster.get("chief", [])))]
        members += [("worker", i) for i in range(len(cluster.get("worker", [])))]
        return members.index((task["type"], int(task["index"]))), len(members)
    except (ValueError, KeyError, TypeError):
        raise ValueError(
            f"TF_CONFIG does not describe this task in its cluster: {raw!r}; expected "
            '{"cluster": {"worker": ["host0:2222", "host1:2222"]}, "task": {"type": "worker", '
            '"index": 0}}.'
        ) from None


def first_line(error: BaseException) -> str:
    """The first non-empty line of an error's message (engines' messages run long)."""
    text = str(error).strip()
    return next((line.strip() for line in text.splitlines() if line.strip()), type(error).__name__)


# Status names the engines put first in a failed collective's message.
_STATUS = re.compile(r"^(UNKNOWN|UNAVAILABLE|INTERNAL|DEADLINE_EXCEEDED|ABORTED|CANCELLED)\b")


def is_host_failure(error: BaseException) -> bool:
    """Whether an error raised by a multi-host step is the engine reporting a lost peer.

    TensorFlow: the errors of an aborted collective (``UnavailableError`` - a closed
    connection or a peer's missed heartbeats -, ``DeadlineExceededError``, ``CancelledError``,
    ``AbortedError``).  JAX: jaxlib's runtime errors whose message starts with a status such as
    ``UNKNOWN: Gloo all-reduce failed`` or ``UNAVAILABLE``.
    """
    import keras

    if keras.backend.backend() == "tensorflow":
        import tensorflow as tf

        lost = (
            tf.errors.UnavailableError,
            tf.errors.DeadlineExceededError,
            tf.errors.CancelledError,
            tf.errors.AbortedError,
        )
        return isinstance(error, lost)
    if keras.backend.backend() == "jax":
        import jax

        if isinstance(error, jax.errors.JaxRuntimeError):
            return True
        return isinstance(error, (ValueError, RuntimeError)) and bool(
            _STATUS.match(str(error).strip())
        )
    return False


# ---------------------------------------------------------------------------------------------
# Gathering validation logits


def jax_gather(local):
    """``(processes, *local.shape)``: every JAX process's ``local`` array, in process order
    (a collective: every process calls it)."""
    import numpy as np
    from jax.experimental import multihost_utils

    return np.asarray(multihost_utils.process_allgather(local, tiled=False))


def tf_gather(strategy, local):
    """``(workers, *local.shape)``: every worker's ``local`` array, in worker order, with
    ``MultiWorkerMirroredStrategy.gather`` (a collective: every worker calls it)."""
    import numpy as np
    import tensorflow as tf

    per_worker = len(strategy.extended.worker_devices)
    chunks = np.split(np.asarray(local), per_worker)
    value = strategy.experimental_distribute_values_from_function(
        lambda context: tf.constant(chunks[context.replica_id_in_sync_group % per_worker])
    )
    gathered = strategy.gather(value, axis=0).numpy()
    return gathered.reshape((-1, *np.shape(local)))


# ---------------------------------------------------------------------------------------------
# TensorFlow: MultiWorkerMirroredStrategy with Keras 3


def tf_worker_dataset(strategy, batches, index: int, workers: int):
    """Keras ``fit`` input for ``MultiWorkerMirroredStrategy``: each worker's own rows.

    ``strategy.distribute_datasets_from_function`` builds one input pipeline per worker; this
    one yields, for every step, the rows of the global batch this worker trains on (``batches``
    made with ``shard=(index, workers)``), split over the worker's replicas.  Keras would
    otherwise hand the whole PyDataset to every worker and let tf.data shard whole batches.
    """
    import tensorflow as tf

    per_worker = len(strategy.extended.worker_devices)
    rows = len(batches.rows)
    res, classes = batches.aug.resolution, batches.num_classes

    def produce(i):
        return batches[int(i)]

    def pipeline(context):
        if context.input_pipeline_id != index:
            raise RuntimeError(
                f"TensorFlow made input pipeline {context.input_pipeline_id} on the worker "
                f"TF_CONFIG names as {index}; check TF_CONFIG."
            )
        ds = tf.data.Dataset.range(len(batches)).map(
            lambda i: tf.numpy_function(produce, [i], (tf.float32, tf.float32), stateful=False),
            num_parallel_calls=max(1, batches.workers),
            deterministic=True,
        )
        ds = ds.map(
            lambda x, y: (
                tf.ensure_shape(x, (rows, res, res, 3)),
                tf.ensure_shape(y, (rows, classes)),
            )
        )
        if per_worker > 1:
            ds = ds.unbatch().batch(rows // per_worker)
        return ds.prefetch(2)

    return strategy.distribute_datasets_from_function(pipeline)


def tf_multi_worker_model(model) -> None:
    """Let Keras 3's TensorFlow trainer run ``fit`` under ``MultiWorkerMirroredStrategy``.

    Two Keras 3 defects (tensorflow/tensorflow#72388): ``fit`` reduces the per-replica logs
    with ``strategy.reduce("MEAN", value, axis=0)``, which fails on scalars, so the train step
    returns its logs as 1-element vectors (the mean over axis 0 is the mean over replicas, the
    global value); and ``fit`` peeks at a batch to build the model symbolically, reducing it the
    same way, so the model is treated as built outside a strategy (it is: the caller built it
    with ``_symbolic_build`` already, and ``fit`` runs inside the strategy's scope).
    """
    import tensorflow as tf

    step = model.train_step

    def train_step(data):
        return {k: tf.reshape(v, [1]) for k, v in step(data).items()}

    model.train_step = train_step
    model._distribute_strategy = None
