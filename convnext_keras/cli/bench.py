"""``convnext bench``: throughput and peak memory of inference or a training step."""

from __future__ import annotations

import click

from convnext_keras.cli import _checks as checks
from convnext_keras.cli._app import (
    backend_option,
    echo_table,
    engine_option,
    main,
    precision_option,
)


@main.command("bench")
@click.option(
    "--model",
    "model_name",
    default="convnext_tiny",
    show_default=True,
    help="Model or architecture name (random weights: speed does not depend on them).",
)
@click.option("--batch-size", default=8, show_default=True, type=click.IntRange(min=1))
@click.option(
    "--resolution",
    default=None,
    type=int,
    help=f"Input height and width, {checks.RESOLUTION_RULE} (default: the checkpoint's, 224 "
    "for architectures).",
)
@precision_option(
    "float32, mixed bfloat16 / float16 (Keras dtype policy), or int8 (inference only: "
    "onnxruntime with the model quantized to int8, calibrated on the sample photos)."
)
@click.option("--mode", type=click.Choice(["infer", "train"]), default="infer", show_default=True)
@engine_option("Inference engine: auto = the default predict/eval path.")
@click.option("--warmup", default=2, show_default=True, type=click.IntRange(min=0))
@click.option("--repeats", default=10, show_default=True, type=click.IntRange(min=1))
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@backend_option
def bench_command(
    model_name, batch_size, resolution, precision, mode, engine, warmup, repeats, as_json
):
    """Images/s (median of timed runs after warm-up, with spread) and peak memory."""
    checks.model_name(model_name)
    checks.resolution(model_name, resolution)
    checks.engine_flags(precision, engine)
    from convnext_keras.tasks import bench

    result = bench.benchmark(
        model_name,
        batch_size=batch_size,
        resolution=resolution,
        precision=precision,
        mode=mode,
        engine=engine,
        warmup=warmup,
        repeats=repeats,
    )
    if as_json:
        import json

        click.echo(json.dumps(result.as_dict(), indent=2))
        return
    t = result.timing
    low, high = t.spread
    echo_table(
        f"convnext bench: {result.model} {result.mode} {result.precision}, batch {batch_size} "
        f"@ {result.resolution}px on {result.backend} ({result.device})",
        ["engine", "img/s (median)", "range", "IQR", "repeats", f"peak {t.memory_kind} memory"],
        [
            [
                result.engine,
                f"{t.images_per_second:,.1f}",
                f"{low:,.1f}-{high:,.1f}",
                f"{t.iqr_percent:.0f}%",
                len(t.seconds),
                bench.format_bytes(t.peak_memory_bytes),
            ]
        ],
        justify={1: "right", 2: "right", 3: "right", 4: "right", 5: "right"},
    )
    if t.noise:
        click.echo(f"{t.noise[0].upper()}{t.noise[1:]}.")
