"""``convnext finetune``: the original's fine-tuning recipe on an image folder."""

from __future__ import annotations

import os
import sys

import click

from convnext_keras.cli import _checks as checks
from convnext_keras.cli._app import backend_option, main, parse_weights

# Recipe options: every default is None ("the recipe's default", or the saved value when
# resuming), so only what the user typed reaches convnext_keras.finetune.run.
_RECIPE_OPTIONS = [
    (
        "--model",
        "model",
        str,
        "Model name (convnext_tiny_1k_224, convnext_atto, convnextv2_atto_fcmae, ...). "
        "[default: convnext_tiny_1k_224]",
    ),
    (
        "--weights",
        "weights",
        str,
        "'official', 'none' (random init), a checkpoint file or hf://ORG/REPO[/FILE]. "
        "[default: official for checkpoint names, none for architecture names]",
    ),
    ("--epochs", "epochs", click.IntRange(min=1), "Epochs. [default: 30]"),
    (
        "--batch-size",
        "batch_size",
        click.IntRange(min=1),
        "Global batch per step, split over the devices. [default: 32]",
    ),
    (
        "--accum-steps",
        "accumulation",
        click.IntRange(min=1),
        "Batches whose gradients are averaged per update (effective batch = batch x steps). "
        "[default: 1]",
    ),
    (
        "--lr",
        "lr",
        float,
        "Peak learning rate. [default: 5e-5; ConvNeXt V2: its base lr x batch x accum / 256]",
    ),
    ("--min-lr", "min_lr", float, "Final learning rate of the cosine. [default: 1e-6]"),
    ("--warmup-epochs", "warmup_epochs", float, "Linear warmup. [default: 0]"),
    (
        "--layer-decay",
        "layer_decay",
        float,
        "Layer-wise lr decay; 1 = off. [default: 0.8; ConvNeXt V2: 0.9 atto..tiny, 0.6 base+]",
    ),
    (
        "--layer-decay-type",
        "layer_decay_type",
        click.Choice(["group", "single"]),
        "'group': 12 groups of blocks; 'single': one group per block. "
        "[default: group; ConvNeXt V2 atto..tiny: single]",
    ),
    (
        "--weight-decay",
        "weight_decay",
        float,
        "AdamW decoupled weight decay of kernels. [default: 1e-8; ConvNeXt V2: 0.3 atto..nano, "
        "0.05 tiny+]",
    ),
    (
        "--drop-path",
        "drop_path",
        float,
        "Stochastic depth rate. [default: the original's per model: base 0.2, large 0.3, "
        "xlarge 0.4; others 0.1; ConvNeXt V2: atto..nano 0.1, tiny 0.2, base+ 0.1]",
    ),
    ("--smoothing", "label_smoothing", float, "Label smoothing. [default: 0.1]"),
    ("--mixup", "mixup", float, "Mixup alpha; 0 = off. [default: 0]"),
    ("--cutmix", "cutmix", float, "CutMix alpha; 0 = off. [default: 0]"),
    (
        "--ema",
        "ema",
        float,
        "EMA decay of the weights, e.g. 0.9999 (validation then uses the EMA). [default: off]",
    ),
    (
        "--head-init-scale",
        "head_init_scale",
        float,
        "Scale of the new head's initial weights. [default: 0.001]",
    ),
    (
        "--resolution",
        "resolution",
        int,
        f"Training/validation image size, {checks.RESOLUTION_RULE}. [default: the model's, 224 "
        "or 384]",
    ),
    ("--crop-pct", "crop_pct", float, "Validation centre-crop fraction. [default: the model's]"),
    (
        "--interpolation",
        "interpolation",
        click.Choice(["bicubic", "bilinear", "lanczos", "nearest", "box", "hamming"]),
        "Resize filter. [default: bicubic]",
    ),
    (
        "--crop-scale",
        "crop_scale",
        (float, float),
        "Random-resized-crop area range MIN MAX. [default: 0.08 1.0]",
    ),
    ("--hflip", "hflip", float, "Horizontal flip probability. [default: 0.5]"),
    (
        "--randaugment",
        "randaugment",
        click.IntRange(min=0),
        "RandAugment ops per image (Keras' RandAugment); 0 = off. [default: 0]",
    ),
    (
        "--randaugment-magnitude",
        "randaugment_magnitude",
        float,
        "RandAugment magnitude in [0, 1]. [default: 0.9]",
    ),
    (
        "--precision",
        "precision",
        click.Choice(["fp32", "bf16", "fp16"]),
        "Mixed precision. [default: fp32]",
    ),
    ("--clip-grad", "clip_grad", float, "Global gradient-norm clipping. [default: off]"),
    (
        "--val-fraction",
        "val_fraction",
        float,
        "Validation share drawn per class when DATA_DIR has no val/ folder. [default: 0.1]",
    ),
    ("--seed", "seed", int, "Seed of data order, augmentation and head init. [default: 0]"),
]


def _recipe_options(f):
    f = click.option(
        "--remat/--no-remat",
        "remat",
        default=None,
        help="Recompute activations in the backward pass to save memory. [default: off]",
    )(f)
    for flag, dest, kind, help_text in reversed(_RECIPE_OPTIONS):
        nargs = len(kind) if isinstance(kind, tuple) else 1
        f = click.option(flag, dest, type=kind, nargs=nargs, default=None, help=help_text)(f)
    return f


def _check_finetune(data_dir, resume_dir, given: dict) -> None:
    """What ``finetune`` checks before a backend loads: DATA_DIR and --resume's folder exist,
    --model is a name, --resolution fits it, a --weights path exists (the official file is
    fetched as the run starts: its default depends on the model and on the run resumed)."""
    checks.folder(data_dir, "data folder")
    if resume_dir:
        checks.folder(resume_dir, "run folder to resume")
    model = given.get("model")
    if model is not None:
        checks.model_name(model)
    checks.resolution(model, given.get("resolution"))
    weights = given.get("weights")
    if model is not None and weights not in (None, "official"):
        checks.weights(model, weights)


@main.command("finetune")
@click.argument("data_dir", type=click.Path(file_okay=False))
@click.option("--out", type=click.Path(file_okay=False), help="New run directory.")
@click.option(
    "--resume",
    "resume_dir",
    type=click.Path(file_okay=False),
    help="Continue the run in this directory from its last complete checkpoint.",
)
@_recipe_options
@click.option(
    "--distribution",
    type=click.Choice(["auto", "off"]),
    default=None,
    help="auto: data-parallel over every local device; off: one device. [default: auto]",
)
@click.option(
    "--multi-host",
    is_flag=True,
    help="One process per host: JAX joins the coordinator named by "
    "KERAS_DISTRIBUTION_JOB_ADDRESSES / _NUM_PROCESSES / _PROCESS_ID, TensorFlow the workers "
    "of TF_CONFIG (see docs/finetune.md). Exit status 4 when another host is lost.",
)
@click.option("--workers", type=click.IntRange(min=1), help="Image loader threads.")
@click.option(
    "--checkpoint-every",
    default=None,
    type=click.IntRange(min=0),
    help="Write the training state every N steps (0: only at epoch ends and by time). "
    "[default: 200]",
)
@click.option(
    "--checkpoint-minutes",
    default=None,
    type=click.FloatRange(min=0),
    help="... or every M minutes, whichever comes first. [default: 10]",
)
@click.option(
    "--export/--no-export",
    default=None,
    help="Export the best classifier as a verified SavedModel at the end. [default: export]",
)
@click.option(
    "--jit/--no-jit",
    default=None,
    help="XLA-compile the train step. [default: on with JAX or a GPU; off for TF on CPU]",
)
@click.option("--quiet", is_flag=True, help="No per-epoch lines.")
@backend_option
def finetune_command(
    data_dir,
    out,
    resume_dir,
    distribution,
    multi_host,
    workers,
    checkpoint_every,
    checkpoint_minutes,
    export,
    jit,
    quiet,
    **recipe,
):
    """Fine-tune a ConvNeXt on DATA_DIR (one folder per class, optionally in train/ and val/).

    The recipe is the original's ImageNet-22k -> 1k fine-tuning (facebookresearch/ConvNeXt
    TRAINING.md): AdamW, layer-wise lr decay 0.8, warmup + cosine per step, label smoothing
    0.1, a freshly initialised head scaled by 0.001. Writes checkpoints atomically; after a
    crash or Ctrl-C, run again with --resume OUT: it keeps every setting of the run (options
    after it override --distribution, --checkpoint-*, --export, --jit) and refuses a data
    directory whose files changed.
    """
    if resume_dir and out and resume_dir != out:
        raise click.UsageError("--resume names the run directory; drop --out or make them equal.")
    if not (resume_dir or out):
        raise click.UsageError("Give --out DIR for a new run, or --resume DIR to continue one.")
    given = {k: v for k, v in recipe.items() if v is not None}
    if "weights" in given:
        given["weights"] = parse_weights(given["weights"])
    _check_finetune(data_dir, resume_dir, given)
    if multi_host:
        from convnext_keras.finetune import connect_hosts

        connect_hosts()
    from convnext_keras.finetune import HostLost, TrainingDiverged, run

    try:
        result = run(
            data_dir,
            resume_dir or out,
            resume=bool(resume_dir),
            distribution=distribution,
            workers=workers,
            checkpoint_every=checkpoint_every,
            checkpoint_minutes=checkpoint_minutes,
            export=export,
            jit_compile=jit,
            verbose=0 if quiet else 1,
            **given,
        )
    except TrainingDiverged as e:
        click.echo(f"error: {e}", err=True)
        sys.exit(3)
    except HostLost as e:
        click.echo(f"error: {e}", err=True)
        sys.stdout.flush()
        sys.stderr.flush()
        # Now, not through the interpreter's exit: JAX's exit handler would wait for the lost
        # host at a shutdown barrier, then abort with a page of C++ logs.
        os._exit(4)
    if result.best_epoch is not None and result.best_val_acc1 is not None:
        click.echo(
            f"best: epoch {result.best_epoch}, val acc@1 {result.best_val_acc1:.4f} "
            f"-> {result.files.get('best', result.out)}"
        )
