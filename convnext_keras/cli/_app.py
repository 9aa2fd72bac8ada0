"""The root ``convnext`` command group and the error handling every command shares."""

from __future__ import annotations

import functools
import sys

import click

from .. import __version__


class ConvnextGroup(click.Group):
    """Turns the library's user errors into one readable line and exit status 2, not a trace."""

    def invoke(self, ctx):
        from ..checkpoints import CheckpointError
        from ..hub import DownloadError

        try:
            return super().invoke(ctx)
        except (
            CheckpointError,
            DownloadError,
            ValueError,
            FileNotFoundError,
            FileExistsError,
        ) as e:
            click.echo(f"error: {e}", err=True)
            sys.exit(2)


@click.group(cls=ConvnextGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="convnext")
def main():
    """ConvNeXt for Keras 3: official checkpoints, conversion, prediction, export, training."""


def echo_table(title: str, columns: list[str], rows: list[list], justify=None):
    """Print a table with rich (aligned on a terminal, plain when piped)."""
    from rich.console import Console
    from rich.table import Table

    table = Table(title=title, show_lines=False)
    for i, col in enumerate(columns):
        table.add_column(col, justify=(justify or {}).get(i, "left"))
    for row in rows:
        table.add_row(*[str(c) for c in row])
    Console(width=None if sys.stdout.isatty() else 200).print(table)


def backend_option(f):
    """``--backend tensorflow|jax|torch``: sets KERAS_BACKEND before Keras is imported."""

    @click.option(
        "--backend",
        type=click.Choice(["tensorflow", "jax", "torch"]),
        default=None,
        help="Keras backend (default: $KERAS_BACKEND, else tensorflow).",
    )
    @functools.wraps(f)
    def wrapper(*args, backend=None, **kwargs):
        import os

        if backend:
            if "keras" in sys.modules and os.environ.get("KERAS_BACKEND", "tensorflow") != backend:
                raise click.UsageError("--backend must be chosen before Keras is imported.")
            os.environ["KERAS_BACKEND"] = backend
        return f(*args, **kwargs)

    return wrapper


#: Inference engines (``runtime.ENGINES``, repeated here: the CLI imports Keras only after
#: ``--backend`` is read; a test keeps the two equal).
ENGINES = ("auto", "onnxruntime", "keras")


def engine_option(help_text: str):
    """``--engine auto|onnxruntime|keras`` (``runtime.inference_function``'s choice)."""
    return click.option(
        "--engine", type=click.Choice(ENGINES), default="auto", show_default=True, help=help_text
    )


#: ``--precision`` values (``model.PRECISIONS``' keys and ``runtime.INT8``, repeated for the
#: same reason; a test keeps them equal).
PRECISIONS = ("fp32", "bf16", "fp16", "int8")


def precision_option(help_text: str):
    """``--precision fp32|bf16|fp16|int8`` (float32, a Keras mixed-precision policy, or the
    onnxruntime engine's opt-in int8)."""
    return click.option(
        "--precision",
        type=click.Choice(PRECISIONS),
        default="fp32",
        show_default=True,
        help=help_text,
    )


#: Help text of every command's ``--weights`` option (parsed by :func:`parse_weights`).
WEIGHTS_HELP = (
    "'official' (download once, then cached), 'none' (random initialisation) or a local "
    "checkpoint file (.pth/.bin/.safetensors; official, timm or Hugging Face layout)."
)


def parse_weights(value: str | None):
    """``--weights`` -> ``load_model``'s ``weights=``: "official", None (random) or a path."""
    if value is None or value.lower() in ("none", "random"):
        return None
    if value.lower() == "official":
        return "official"
    return value


def calibration_option(f):
    """``--calibration PATH``: the photos that calibrate ``--precision int8``."""
    import pathlib

    return click.option(
        "--calibration",
        type=click.Path(exists=True, path_type=pathlib.Path),
        default=None,
        help="--precision int8 only: a folder (or file) of photos like the ones you will "
        "classify, to calibrate the quantization (default: scikit-image's and scikit-learn's "
        "sample photos).",
    )(f)
