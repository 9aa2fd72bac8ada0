"""``run()``: fine-tune a ConvNeXt on an image folder with the original's recipe.

The loop is Keras' own ``model.fit``, called once per epoch on a :class:`TrainBatches` that
can start mid-epoch, with one callback that shows progress, stops on a non-finite loss and
writes the training state every few steps.  Data parallelism uses the engines the backends
provide: ``tf.distribute.MirroredStrategy`` (``MultiWorkerMirroredStrategy`` when ``TF_CONFIG``
is set) on TensorFlow and ``keras.distribution.DataParallel`` on JAX.

The run directory's files are described in :mod:`convnext_keras.finetune.rundir`; the recipe in
:mod:`~convnext_keras.finetune.recipe`, the devices in :mod:`~convnext_keras.finetune.devices`, the
training itself in :mod:`~convnext_keras.finetune.trainer`.
"""

from __future__ import annotations

import dataclasses
import gzip
import json
import os
from pathlib import Path

import keras

from convnext_keras import registry
from convnext_keras.api import OFFICIAL
from convnext_keras.finetune import data as data_lib
from convnext_keras.finetune import devices as devices_lib
from convnext_keras.finetune import recipe as recipe_lib
from convnext_keras.finetune import rundir
from convnext_keras.finetune import state as state_lib
from convnext_keras.finetune import trainer as trainer_lib
from convnext_keras.interface import fix
from convnext_keras.nets.convnext import dtype_policy
from convnext_keras.weights import cache, convert

#: run() settings outside the recipe, and their defaults: kept in run.json, so a resumed run
#: keeps them unless given again (``--no-export`` stays off).
RUN_SETTINGS = {
    "export": True,
    "checkpoint_every": 200,
    "checkpoint_minutes": 10.0,
    "distribution": "auto",
    "jit_compile": "auto",
}


@dataclasses.dataclass
class RunResult:
    """What :func:`run` produced."""

    out: Path
    classes: list[str]
    history: list[dict]
    best_epoch: int | None
    best_val_acc1: float | None
    files: dict[str, Path]
    #: Path of the SavedModel export, or None (``export_note`` says why).
    export: Path | None
    export_note: str
    data: dict
    skipped: list[tuple[str, str]]


def _read_gzip_lines(path: Path) -> list[str]:
    return data_lib.decode_lines(gzip.decompress(path.read_bytes()))


def _check_resume(out: Path, recipe_options: dict) -> tuple[dict, dict | None]:
    """The saved run info and state header of ``out``; errors for what cannot be resumed."""
    info_path = out / rundir.RUN_FILE
    if not info_path.is_file():
        raise FileNotFoundError(
            f"Nothing to resume in {out}: no {rundir.RUN_FILE} (start the run without --resume)."
        )
    info = json.loads(info_path.read_text())
    saved = info["recipe"]
    explicit = {
        k: v for k, v in recipe_options.items() if v is not None or k in recipe_lib._NONE_IS_A_VALUE
    }
    if "model" in explicit:
        explicit["model"] = registry.resolve(explicit["model"]).name
    if "weights" in explicit and explicit["weights"] not in (None, OFFICIAL):
        explicit["weights"] = recipe_lib._weights_option(explicit["weights"])
    if "crop_scale" in explicit:
        explicit["crop_scale"] = [float(s) for s in explicit["crop_scale"]]
    differ = {k: (saved.get(k), v) for k, v in explicit.items() if saved.get(k) != v}
    if differ:
        listed = ", ".join(f"{k}: run has {a!r}, asked {b!r}" for k, (a, b) in differ.items())
        raise ValueError(
            f"--resume continues {out} with its own settings, which differ from the ones given "
            f"({listed}). Drop those options, or start a new run with another --out."
        )
    state_path = out / rundir.STATE_FILE
    meta = state_lib.read_meta(state_path) if state_path.is_file() else None
    if state_path.is_file() and meta is None:
        state_lib.load(state_path)  # raises the explanatory StateError
    return info, meta


def _finished(out: Path, info: dict, meta: dict, export: bool | None, say) -> RunResult:
    """What :func:`run` returns for a run that is already complete: its files as they are,
    nothing trained, written or exported again (``export``: the one given now; a run made
    without an export is not exported by resuming it)."""
    recipe = recipe_lib.Recipe.from_json(info["recipe"])
    say(f"{out} is already complete ({recipe.epochs} epochs); nothing to do, nothing changed.")
    files = {
        "run": out / rundir.RUN_FILE,
        "state": out / rundir.STATE_FILE,
        "metrics_csv": out / "metrics.csv",
        "metrics_json": out / "metrics.json",
        "curves": out / "curves.png",
        "best_weights": out / rundir.BEST_WEIGHTS,
        "best": out / "best.keras",
        "last": out / "last.keras",
    }
    try:
        history = json.loads(files["metrics_json"].read_text())
    except (OSError, ValueError):
        history = []
    saved = out / "savedmodel"
    if saved.is_dir():
        exported, note = saved, f"SavedModel {saved} (exported when the run finished)."
    elif export is False or not info.get("settings", {}).get("export", True):
        exported, note = None, "not exported (export=False)."
    else:
        exported, note = (
            None,
            f"no SavedModel in {out}; export {files['best']} with convnext export.",
        )
    say(f"{files['best']} and {files['last']} are the run's; {note}")
    best = meta.get("best") or {}
    return RunResult(
        out=out,
        classes=list(info["classes"]),
        history=history,
        best_epoch=best.get("epoch"),
        best_val_acc1=best.get("val_acc1"),
        files={k: p for k, p in files.items() if p.exists()},
        export=exported,
        export_note=note,
        data=info.get("data", {}),
        skipped=[tuple(s) for s in info.get("skipped", [])],
    )


def run(
    data_dir: str | os.PathLike,
    out: str | os.PathLike,
    *,
    resume: bool = False,
    distribution: str | None = None,
    workers: int | None = None,
    checkpoint_every: int | None = None,
    checkpoint_minutes: float | None = None,
    export: bool | None = None,
    jit_compile: bool | str | None = None,
    callbacks: list | None = None,
    verbose: int = 1,
    **options,
) -> RunResult:
    """Fine-tune a ConvNeXt on ``data_dir`` (one folder per class) into the run directory ``out``.

    Args:
        data_dir: ``<class>/<images>`` folders, optionally under ``train/`` and ``val/``.
        out: the run directory (created). An existing run is only continued with ``resume``.
        resume: continue the run in ``out`` from its last complete checkpoint, with its own
            settings (options given here must agree with them) on the same files (a data
            directory whose files changed is refused, naming the difference).  A run already
            complete is left exactly as it is: nothing is trained, written or exported.
        distribution, checkpoint_every, checkpoint_minutes, export, jit_compile: None means
            the run's own value when resuming (kept in run.json), else the default
            (:data:`RUN_SETTINGS`); a value given explicitly is used and kept.
        distribution: ``"auto"`` trains data-parallel over every local device
            (MirroredStrategy / keras.distribution.DataParallel); ``"off"`` uses one.
        workers: loader threads (default: up to 8, one per CPU).
        checkpoint_every / checkpoint_minutes: write the training state after this many steps
            or minutes, whichever comes first (and at the end of every epoch).
        export: write a SavedModel of the best classifier with ``convnext_keras.export.exporter``.
        jit_compile: XLA compilation of the train step (Keras' ``compile(jit_compile=)``).
            ``"auto"``: on with JAX and on TensorFlow with a GPU/TPU; off for TensorFlow on CPU
            only, where XLA made ConvNeXt training steps 3-5x slower here.
        callbacks: more ``keras.callbacks.Callback`` objects for ``fit`` (TensorBoard...); they
            see every training step (``fit`` runs once per epoch).
        verbose: 0 silent, 1 a line per epoch (and a progress bar on a terminal).
        options: the recipe, see :class:`Recipe` (``model``, ``weights``, ``epochs``,
            ``batch_size``, ``lr``, ``layer_decay``, ``ema``, ``precision``...).

    Returns:
        A :class:`RunResult` with the history, the best epoch and the files written.

    Raises:
        DataError: unusable data (no/one class, empty class folder, classes differing from the
            run being resumed). TrainingDiverged: NaN/inf loss (the last good state is kept).
    """
    out = Path(out).expanduser()
    say = print if verbose > 0 else (lambda *a, **k: None)
    state_path = out / rundir.STATE_FILE
    if resume:
        info, meta = _check_resume(out, options)
        # What a killed run left (its temporaries, and safetensors' own of older versions):
        # removed also when the run is complete (none of its files changes).
        cache.clean_stale(out, legacy=True)
        if meta is not None and meta.get("complete"):
            return _finished(out, info, meta, export, say)
        recipe = recipe_lib.Recipe.from_json(info["recipe"])
    else:
        # A run that never saved a training step (its start failed: no weights, bad data) is
        # no run: a new one may take its place.  Nothing is written before that point anyway.
        if state_path.exists() or any((out / f).exists() for f in rundir._TRAINED_FILES):
            raise FileExistsError(
                f"{out} already holds a fine-tuning run; continue it with "
                f"{fix('resume=True', '--resume')} or choose another "
                f"{fix('out directory', '--out')}."
            )
        recipe = recipe_lib.resolve_recipe(**options)
        info, meta = None, None
    if recipe.remat and keras.backend.backend() == "tensorflow":
        raise ValueError(
            "remat (--remat) does not work on the TensorFlow backend: Keras' rematerialisation "
            "fails in graph mode (keras-team/keras#21207). Use the JAX backend (--backend jax), "
            "or save memory with a smaller --batch-size and --accum-steps."
        )
    given = {
        "export": export,
        "checkpoint_every": checkpoint_every,
        "checkpoint_minutes": checkpoint_minutes,
        "distribution": distribution,
        "jit_compile": jit_compile,
    }
    saved = (info or {}).get("settings", {})
    settings = {k: v if v is not None else saved.get(k, RUN_SETTINGS[k]) for k, v in given.items()}
    checkpoint_every, export = settings["checkpoint_every"], settings["export"]
    workers = workers or max(1, min(8, os.cpu_count() or 1))
    if checkpoint_every is not None and checkpoint_every < 0:
        raise ValueError(f"checkpoint_every must be >= 0 steps, got {checkpoint_every}.")

    folder = data_lib.scan(
        data_dir, val_fraction=recipe.val_fraction, seed=recipe.seed, workers=workers
    )
    if info is not None and folder.classes != info["classes"]:
        missing = sorted(set(info["classes"]) - set(folder.classes))
        extra = sorted(set(folder.classes) - set(info["classes"]))
        raise data_lib.DataError(
            f"The classes in {data_dir} do not match the run being resumed "
            f"({len(info['classes'])} classes): missing {missing or 'none'}, new "
            f"{extra or 'none'}. Resume with the same data, or start a new run."
        )
    if info is not None and info["data"].get("fingerprint") not in (None, folder.fingerprint()):
        saved_list = out / rundir.DATA_FILES
        before = _read_gzip_lines(saved_list) if saved_list.is_file() else None
        raise data_lib.DataError(
            f"The files in {data_dir} changed since the run in {out} started"
            + (f": {data_lib.describe_change(before, folder.file_list())}" if before else "")
            + ". --resume continues only on the same files (the split, the data order and the "
            "steps per epoch depend on them): restore them, or start a new run with another "
            "--out."
        )
    if folder.skipped:
        shown = "; ".join(f"{p} ({why})" for p, why in folder.skipped[:5])
        more = f" and {len(folder.skipped) - 5} more" if len(folder.skipped) > 5 else ""
        say(f"skipped {len(folder.skipped)} unreadable file(s): {shown}{more}")
    if len(folder.train) < recipe.batch_size:
        raise data_lib.DataError(
            f"The training split has {len(folder.train)} images, fewer than one batch "
            f"({recipe.batch_size}); lower --batch-size or add images."
        )

    trainer = trainer_lib._Trainer(
        recipe,
        folder,
        out,
        {
            "workers": workers,
            "checkpoint_every": checkpoint_every,
            "checkpoint_minutes": settings["checkpoint_minutes"],
            "verbose": verbose,
            "jit_compile": settings["jit_compile"],
            "callbacks": list(callbacks or []),
            "say": say,
        },
        meta,
    )
    trainer.augment = data_lib.Augment(
        resolution=recipe.resolution,
        interpolation=recipe.interpolation,
        crop_scale=recipe.crop_scale,
        hflip=recipe.hflip,
        randaugment=recipe.randaugment,
        randaugment_magnitude=recipe.randaugment_magnitude,
        mixup=recipe.mixup,
        cutmix=recipe.cutmix,
    )
    devices = devices_lib._devices(settings["distribution"])
    trainer.devices = devices
    if settings["jit_compile"] == "auto" and keras.backend.backend() == "tensorflow":
        import tensorflow as tf

        trainer.options["jit_compile"] = bool(
            tf.config.list_logical_devices("GPU") or tf.config.list_logical_devices("TPU")
        )
    if keras.backend.backend() == "tensorflow" and devices.replicas > 1 and recipe.accumulation > 1:
        raise ValueError(
            f"Gradient accumulation (--accum-steps {recipe.accumulation}) fails under "
            f"tf.distribute with Keras 3 (its conditional update synchronises replicas inside a "
            f"cond); on {devices.replicas} devices use --accum-steps 1 with a larger "
            "--batch-size, or the JAX backend"
            + (", or --distribution off." if devices.processes == 1 else ".")
        )
    if recipe.batch_size % devices.replicas:
        raise ValueError(
            f"batch_size {recipe.batch_size} does not split over {devices.replicas} devices; "
            f"use a multiple of {devices.replicas}."
        )
    try:
        if devices.processes > 1:
            with dtype_policy(recipe.precision):  # outside the engine's scope: one host's model
                trainer.build_eval_model()
        with dtype_policy(recipe.precision), devices.scope:
            trainer.build()  # the weights are in hand (downloaded, read) from here on
            if info is None and devices.chief:
                # The run's first files: only now that the model and the data are ready.
                out.mkdir(parents=True, exist_ok=True)
                info = {
                    "out": str(out),
                    "recipe": recipe.to_json(),
                    "classes": folder.classes,
                    "data": folder.summary(),
                    "skipped": [list(s) for s in folder.skipped],
                    "backend": keras.backend.backend(),
                    "keras": keras.__version__,
                    "settings": settings,
                }
                rundir._write_json(out / rundir.RUN_FILE, info)
                rundir._write_text(out / "labels.txt", "\n".join(folder.classes) + "\n")
                with cache.atomic_path(out / rundir.DATA_FILES) as tmp:
                    listed = data_lib.encode_lines(folder.file_list())
                    tmp.write_bytes(gzip.compress(listed + b"\n"))
            elif devices.chief and info.get("settings") != settings:  # given again: kept
                info = {**info, "settings": settings}
                rundir._write_json(out / rundir.RUN_FILE, info)
            say(
                f"fine-tuning {recipe.model} on {len(folder.train)} images / "
                f"{len(folder.classes)} classes ({len(folder.val)} for validation), "
                f"{trainer.steps} steps per epoch, {devices.description}"
            )
            restored_metrics = None
            if meta is not None:
                arrays, meta = state_lib.load(state_path)
                restored_metrics = state_lib.restore(
                    trainer.model, trainer.model.optimizer, arrays, meta, state_path
                )
                say(f"resumed from {state_path}: epoch {meta['epoch'] + 1}, step {meta['step']}")
            trainer.train(restored_metrics)
            final = trainer.evaluated_weights()
    finally:
        trainer.progress.close()

    files = {
        "run": out / rundir.RUN_FILE,
        "state": state_path,
        "metrics_csv": out / "metrics.csv",
        "metrics_json": out / "metrics.json",
        "curves": out / "curves.png",
        "best_weights": out / rundir.BEST_WEIGHTS,
        "best": out / "best.keras",
        "last": out / "last.keras",
    }
    export_path, note = None, "not exported (export=False)."
    if devices.chief:
        classifier = rundir._inference_model(info, final)
        rundir._save_keras(classifier, files["last"])
        convert.assign_weights(classifier, cache.read_converted(out / rundir.BEST_WEIGHTS))
        rundir._save_keras(classifier, files["best"])
        if export:
            export_path, note = rundir._export(files["best"], out, recipe.resolution)
        say(f"wrote {files['best']} and {files['last']}; {note}")
    best = trainer.best or {}
    return RunResult(
        out=out,
        classes=folder.classes,
        history=trainer.history,
        best_epoch=best.get("epoch"),
        best_val_acc1=best.get("val_acc1"),
        files={k: p for k, p in files.items() if p.exists()},
        export=export_path,
        export_note=note,
        data=folder.summary(),
        skipped=folder.skipped + list(trainer.failed.items()),
    )
