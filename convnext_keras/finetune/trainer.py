"""Training a run's model: :class:`_Trainer` (the model and optimizer, one ``fit`` per epoch,
validation, the training state and the best weights), the callback inside ``fit`` and the
progress display."""

from __future__ import annotations

import contextlib
import math
import os
import sys
import time
from pathlib import Path

import keras
import numpy as np

from convnext_keras import registry
from convnext_keras.api import load_model
from convnext_keras.finetune import data as data_lib
from convnext_keras.finetune import devices as devices_lib
from convnext_keras.finetune import hosts, optim, rundir
from convnext_keras.finetune import recipe as recipe_lib
from convnext_keras.finetune import state as state_lib
from convnext_keras.nets.convnext import build_model, layer_names
from convnext_keras.weights import cache, convert


class TrainingDiverged(RuntimeError):
    """The loss became NaN or infinite; the message names the step and the kept checkpoint."""


# ---------------------------------------------------------------------------------------------
# Progress


class _Progress:
    """A rich progress bar on a terminal (loss, accuracy, lr, img/s); silent otherwise."""

    def __init__(self, enabled: bool):
        self.bar = None
        if enabled and sys.stderr.isatty() and not os.environ.get("CONVNEXT_NO_PROGRESS"):
            from rich.console import Console
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeRemainingColumn

            self.bar = Progress(
                "[progress.description]{task.description}",
                BarColumn(),
                MofNCompleteColumn(),
                TimeRemainingColumn(),
                "{task.fields[stats]}",
                transient=True,
                console=Console(stderr=True),  # on the terminal checked above, not stdout
            )
            self.bar.start()
            self.task = None

    def epoch(self, epoch: int, epochs: int, done: int, total: int):
        if self.bar is not None:
            if self.task is not None:
                self.bar.remove_task(self.task)
            self.task = self.bar.add_task(
                f"epoch {epoch + 1}/{epochs}", total=total, completed=done, stats=""
            )

    def update(self, done: int, stats: str):
        if self.bar is not None:
            self.bar.update(self.task, completed=done, stats=stats)

    def close(self):
        if self.bar is not None:
            self.bar.stop()


class _StepCallback(keras.callbacks.Callback):
    """Per-step work inside fit(): progress, the NaN guard, step checkpoints, metric restore."""

    def __init__(self, trainer: _Trainer, epoch: int, start: int, restore_metrics: list | None):
        super().__init__()
        self.trainer, self.epoch, self.start = trainer, epoch, start
        self.restore_metrics = restore_metrics
        self.diverged = None
        #: Steps of the epoch done so far.
        self.done = start
        self.logs: dict = {}
        self.began = time.perf_counter()

    def on_epoch_begin(self, epoch, logs=None):
        # fit() has just reset the metrics; continue the interrupted epoch's running means.
        if self.restore_metrics is not None:
            variables = self.model.metrics_variables
            if len(variables) != len(self.restore_metrics):
                raise state_lib.StateError(
                    f"The checkpoint holds {len(self.restore_metrics)} metric variables, the run "
                    f"has {len(variables)}; it was written by another version of this library."
                )
            for v, value in zip(variables, self.restore_metrics):
                v.assign(value)
        self.began = time.perf_counter()

    def on_train_batch_end(self, batch, logs=None):
        t = self.trainer
        done = self.done = self.start + batch + 1
        logs = {k: float(v) for k, v in (logs or {}).items()}
        self.logs = logs
        loss = logs.get("loss", float("nan"))
        if not math.isfinite(loss):
            self.diverged = (done, loss)
            self.model.stop_training = True
            return
        if t.progress.bar is not None:
            elapsed = time.perf_counter() - self.began
            rate = (batch + 1) * t.recipe.batch_size / max(elapsed, 1e-9)
            t.progress.update(
                done,
                f"loss {loss:.4f}  acc {logs.get('accuracy', 0):.3f}  "
                f"lr {t.lr_at(self.epoch, done - 1):.2e}  {rate:.1f} img/s",
            )
        if done < t.steps and t.checkpoint_due():
            # Non-finite weights are not saved; alone the run stops here, on several hosts
            # at the next step's loss (the same on every host, so all of them stop together).
            if not t.save_state(self.epoch, done) and t.devices.processes == 1:
                self.diverged = (done, float("nan"))
                self.model.stop_training = True


# ---------------------------------------------------------------------------------------------
# The trainer


class _Trainer:
    def __init__(
        self, recipe: recipe_lib.Recipe, folder, out: Path, options: dict, meta: dict | None
    ):
        self.recipe, self.folder, self.out = recipe, folder, out
        self.options = options
        self.meta = meta or {}
        self.state_path = out / rundir.STATE_FILE
        self.history: list[dict] = list(self.meta.get("history", []))
        self.best = self.meta.get("best")
        self.devices: devices_lib._Devices | None = None
        self.progress = _Progress(options["verbose"] > 0)
        self.last_save = time.monotonic()
        self.steps = len(folder.train) // recipe.batch_size
        self.warned = False
        #: Files that stopped decoding during the run: {path: reason}.
        self.failed: dict[str, str] = {}

    # -- schedule -----------------------------------------------------------------------------
    def lr_at(self, epoch: int, done: int) -> float:
        micro = epoch * self.steps + done
        return float(keras.ops.convert_to_numpy(self.schedule(micro)))

    def checkpoint_due(self) -> bool:
        every, minutes = self.options["checkpoint_every"], self.options["checkpoint_minutes"]
        if self.devices.processes > 1:
            minutes = 0  # hosts' clocks would not agree on the step; every host must save
        self.since_save = getattr(self, "since_save", 0) + 1
        return (every and self.since_save >= every) or (
            minutes and time.monotonic() - self.last_save >= 60 * minutes
        )

    # -- state --------------------------------------------------------------------------------
    def save_state(self, epoch: int, step: int) -> bool:
        """Write the state (the chief only); False, writing nothing, if the weights are not
        finite.  Every host reads the state at the same steps: on TensorFlow reading a variable
        synchronised on read (the metrics' sums) is a collective."""
        arrays = state_lib.collect(self.model, self.model.optimizer)
        bad = state_lib.non_finite({k: a for k, a in arrays.items() if k.startswith("model/")})
        if bad:
            return False
        if self.devices.chief:
            meta = {
                "epoch": epoch,
                "step": step,
                "history": self.history,
                "best": self.best,
                "recipe": self.recipe.to_json(),
                "classes": self.folder.classes,
                "model_paths": state_lib.variable_paths(self.model),
                "complete": epoch >= self.recipe.epochs,
            }
            state_lib.save(self.state_path, arrays, meta)
        self.last_save, self.since_save = time.monotonic(), 0
        return True

    # -- build --------------------------------------------------------------------------------
    def build(self):
        r = self.recipe
        num_classes = len(self.folder.classes)
        keras.utils.set_random_seed(r.seed)
        # Rematerialise the layers that compute (convolutions, norms, MLPs), not stochastic
        # depth: jax.checkpoint would trace its Python `training` flag.
        remat = (
            keras.RematScope(
                mode="list_of_layers",
                layer_names=[
                    n
                    for group in layer_names(registry.resolve(r.model).variant).values()
                    for n in group
                ],
            )
            if r.remat
            else contextlib.nullcontext()
        )
        with remat:
            self.model = load_model(
                r.model,
                weights=r.weights,
                num_classes=num_classes,
                input_shape=(r.resolution, r.resolution, 3),
                drop_path_rate=r.drop_path,
                head_init_scale=r.head_init_scale,
            )
        updates_per_epoch = max(1, self.steps // r.accumulation)
        total = max(1, r.epochs * self.steps // r.accumulation)
        warmup = min(round(r.warmup_epochs * updates_per_epoch), total - 1)
        self.schedule = optim.schedule(
            r.lr, total, warmup_steps=warmup, min_lr=r.min_lr, accumulation=r.accumulation
        )
        opt = optim.optimizer(
            self.model,
            lr=self.schedule,
            layer_decay=r.layer_decay,
            layer_decay_type=r.layer_decay_type,
            weight_decay=r.weight_decay,
            ema=r.ema,
            accumulation=r.accumulation,
            global_clipnorm=r.clip_grad,
        )
        self.model.compile(
            optimizer=opt,
            loss=keras.losses.CategoricalCrossentropy(
                from_logits=True, label_smoothing=r.label_smoothing
            ),
            metrics=[keras.metrics.CategoricalAccuracy(name="accuracy")],
            jit_compile=self.options["jit_compile"],
        )
        self.devices.prepare(self.model)
        self.model.optimizer.build(self.model.trainable_variables)
        # Create the metric variables now (Keras builds them lazily, inside the first traced
        # step on TensorFlow), so that a resumed epoch can restore their running sums.
        res = r.resolution
        self.model._symbolic_build(
            data_batch=(
                np.zeros((r.batch_size, res, res, 3), np.float32),
                np.zeros((r.batch_size, num_classes), np.float32),
            )
        )
        self.inner_opt = getattr(self.model.optimizer, "inner_optimizer", self.model.optimizer)

    def note_failures(self, failures, what: str) -> None:
        """Report files that stopped decoding after the scan (once each) and keep them."""
        new = {p: why for p, why in failures.files.items() if p not in self.failed}
        if new:
            self.failed.update(new)
            shown = "; ".join(f"{p} ({why})" for p, why in list(new.items())[:3])
            self.options["say"](
                f"{len(new)} file(s) no longer decode ({what}): {shown}"
                + (f" and {len(new) - 3} more" if len(new) > 3 else "")
            )

    # -- evaluation ---------------------------------------------------------------------------
    def build_eval_model(self) -> None:
        """A second copy of the network, outside the multi-host distribution, that each host
        runs on its share of the validation images (:meth:`evaluate`)."""
        r = self.recipe
        with (
            devices_lib._jax_distribution(None)
            if keras.backend.backend() == "jax"
            else devices_lib._nothing()
        ):
            self.eval_model = build_model(
                registry.resolve(r.model).variant,
                num_classes=len(self.folder.classes),
                input_shape=(r.resolution, r.resolution, 3),
                name="convnext_validation",
            )
        self.eval_forward = devices_lib._local_forward(self.eval_model)

    def _sharded_logits(self, batches: data_lib.EvalBatches) -> np.ndarray:
        """Validation logits of every host, in batch order: each host runs the evaluated
        weights on its rows of each batch, then the rows are gathered (a collective)."""
        convert.assign_weights(self.eval_model, self.evaluated_weights())
        local = []
        with (
            devices_lib._jax_distribution(None)
            if keras.backend.backend() == "jax"
            else devices_lib._nothing()
        ):
            for i in range(len(batches)):
                logits = np.array(self.eval_forward(batches[i][0]), dtype=np.float32)
                first = i * batches.batch_size
                for row, r in enumerate(batches.rows):  # rows that no longer decode: NaN
                    if r < batches.sizes[i] and first + r in batches.failed:
                        logits[row] = np.nan
                local.append(logits)
        gathered = self.devices.gather(np.stack(local))  # (hosts, batches, rows, classes)
        logits = gathered.transpose(1, 0, 2, 3).reshape(len(batches) * batches.batch_size, -1)
        batches.failed.update(
            int(i) for i in np.flatnonzero(np.isnan(logits).any(axis=1)) if i < len(batches.labels)
        )
        return logits

    def evaluate(self) -> dict:
        r = self.recipe
        if not self.folder.val:
            return {"val_loss": None, "val_acc1": None, "val_acc5": None}
        batches = data_lib.EvalBatches(
            self.folder.val,
            resolution=r.resolution,
            crop_pct=r.crop_pct,
            interpolation=r.interpolation,
            batch_size=r.batch_size,
            workers=self.options["workers"],
            shard=(self.devices.index, self.devices.processes),
        )
        if self.devices.processes > 1:
            logits = self._sharded_logits(batches)
        else:
            with self.ema_weights():
                logits = self.model.predict(batches, verbose=0)
        keep = np.concatenate(
            [np.arange(n) + i * r.batch_size for i, n in enumerate(batches.sizes)]
        )
        logits = np.asarray(logits, dtype=np.float64)[keep]
        labels = batches.labels
        self.note_failures(batches.failures, "validation: left out")
        if batches.failed:  # files that stopped decoding: not counted either way
            good = np.setdiff1d(np.arange(len(labels)), sorted(batches.failed))
            if not good.size:
                return {"val_loss": None, "val_acc1": None, "val_acc5": None}
            logits, labels = logits[good], labels[good]
        shifted = logits - logits.max(axis=1, keepdims=True)
        log_probs = shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))
        top5 = np.argsort(-logits, axis=1)[:, :5]
        return {
            "val_loss": float(-log_probs[np.arange(len(labels)), labels].mean()),
            "val_acc1": float((top5[:, 0] == labels).mean()),
            "val_acc5": float((top5 == labels[:, None]).any(axis=1).mean())
            if logits.shape[1] > 5
            else None,
        }

    @contextlib.contextmanager
    def ema_weights(self):
        """The EMA weights in the model for the block (when EMA is on), then the raw ones."""
        ema = self.inner_opt.ema_values()
        if ema is None:
            yield
            return
        variables = self.model.trainable_variables
        raw = [np.array(keras.ops.convert_to_numpy(v)) for v in variables]
        for v, value in zip(variables, ema):
            v.assign(value)
        try:
            yield
        finally:
            for v, value in zip(variables, raw):
                v.assign(value)

    def evaluated_weights(self) -> dict:
        """``{layer: [arrays]}`` of the weights validation uses (EMA when on)."""
        ema = self.inner_opt.ema_values()
        values = None
        if ema is not None:
            values = {v.path: a for v, a in zip(self.model.trainable_variables, ema)}
        return rundir._layer_weights(self.model, values)

    @contextlib.contextmanager
    def host_failures(self, epoch: int, callback: _StepCallback, during: str = "training"):
        """On several hosts: an engine error that reports a lost peer becomes
        :class:`hosts.HostLost`, naming the checkpoint every host resumes from."""
        try:
            yield
        except Exception as e:
            if self.devices.processes == 1 or not hosts.is_host_failure(e):
                raise
            kept = state_lib.read_meta(self.state_path)
            where = (
                f"The last complete checkpoint {self.state_path} (epoch {kept['epoch'] + 1}, "
                f"step {kept['step']}) is kept"
                if kept
                else "No checkpoint had been written yet"
            )
            raise hosts.HostLost(
                f"Lost contact with another host during {during} (epoch {epoch + 1}, after step "
                f"{callback.done} of {self.steps}; this is host {self.devices.index} of "
                f"{self.devices.processes}): {hosts.first_line(e).rstrip('.')}. {where}; start "
                f"the same command with --resume {self.out} on every host."
            ) from None

    # -- the loop -----------------------------------------------------------------------------
    def train(self, restored_metrics: list | None):
        r = self.recipe
        epoch, start = self.meta.get("epoch", 0), self.meta.get("step", 0)
        say = self.options["say"]
        while epoch < r.epochs:
            batches = data_lib.TrainBatches(
                self.folder.train,
                len(self.folder.classes),
                self.augment,
                batch_size=r.batch_size,
                epoch=epoch,
                seed=r.seed,
                start=start,
                workers=self.options["workers"],
                shard=(self.devices.index, self.devices.processes),
            )
            callback = _StepCallback(self, epoch, start, restored_metrics if start else None)
            self.progress.epoch(epoch, r.epochs, start, self.steps)
            began = time.perf_counter()
            with self.host_failures(epoch, callback):
                self.model.fit(
                    **self.devices.fit_input(batches),
                    epochs=epoch + 1,
                    initial_epoch=epoch,
                    verbose=0,
                    callbacks=[callback, *self.options["callbacks"]],
                    shuffle=False,
                )
            self.note_failures(batches.failures, "training: each replaced by the next image")
            if callback.diverged:
                step, loss = callback.diverged
                kept = state_lib.read_meta(self.state_path)
                where = (
                    f"the last good checkpoint {self.state_path} (epoch {kept['epoch'] + 1}, "
                    f"step {kept['step']}) is kept"
                    if kept
                    else "no checkpoint had been written yet"
                )
                raise TrainingDiverged(
                    f"Training diverged: the loss became {loss} at epoch {epoch + 1}, step "
                    f"{step} (of {self.steps}); {where}. Lower --lr, raise --warmup-epochs, "
                    "set --clip-grad, or train in --precision fp32."
                )
            seconds = time.perf_counter() - began
            with self.host_failures(epoch, callback, "validation"):
                validation = self.evaluate()
            row = {
                "epoch": epoch + 1,
                "train_loss": callback.logs.get("loss"),
                "train_acc": callback.logs.get("accuracy"),
                **validation,
                "lr": self.lr_at(epoch, self.steps - 1),
                "images_per_s": round((self.steps - start) * r.batch_size / seconds, 2),
                "epoch_time_s": round(seconds, 2),
            }
            self.history.append(row)
            improved = row["val_acc1"] is not None and (
                self.best is None or row["val_acc1"] > self.best["val_acc1"]
            )
            if improved or (row["val_acc1"] is None):
                self.best = {"epoch": epoch + 1, "val_acc1": row["val_acc1"]}
                if self.devices.chief:
                    cache.save_converted(
                        self.evaluated_weights(),
                        self.out / rundir.BEST_WEIGHTS,
                        {"epoch": str(epoch + 1), "val_acc1": str(row["val_acc1"])},
                    )
            epoch, start, restored_metrics = epoch + 1, 0, None
            if not self.save_state(epoch, 0):
                raise TrainingDiverged(
                    f"The weights became NaN/inf during epoch {epoch}; the checkpoint of the "
                    "previous epoch is kept. Lower --lr or train in --precision fp32."
                )
            if self.devices.chief:
                rundir._write_metrics(self.out, self.history)
                if (
                    rundir.plot_curves(self.history, self.out / "curves.png") is None
                    and not self.warned
                ):
                    say(
                        "no curves.png: matplotlib is not installed "
                        '(pip install "convnext-keras[viz]")'
                    )
                    self.warned = True
            say(_epoch_line(row, r.epochs))


def _epoch_line(row: dict, epochs: int) -> str:
    def f(key, fmt):
        return "-" if row.get(key) is None else format(row[key], fmt)

    return (
        f"epoch {row['epoch']}/{epochs}  train loss {f('train_loss', '.4f')} "
        f"acc {f('train_acc', '.4f')}  val loss {f('val_loss', '.4f')} "
        f"acc@1 {f('val_acc1', '.4f')} acc@5 {f('val_acc5', '.4f')}  "
        f"lr {f('lr', '.2e')}  {f('images_per_s', '.1f')} img/s"
    )
