"""The root ``convnext`` command group and the error handling every command shares."""

from __future__ import annotations

import functools
import sys

import click

from convnext_keras import __version__
from convnext_keras.cli._quiet import quiet_backend_logs


class ConvnextGroup(click.Group):
    """The error boundary of every command: a user's error becomes one readable line on stderr
    and exit status 2, never a traceback.  (Exit status 1 is a command's own "some inputs
    failed"; 3 a diverged fine-tuning run.)

    A bad command line (an unknown option, a value out of range, a missing file argument)
    is Click's usage error, printed here as one line too, naming the command's ``--help``.

    User errors: the library's (``CheckpointError``, ``DownloadError``, and every
    ``ValueError``: bad names, options, data, files), any ``OSError`` (a missing file, a full
    disk, a read-only or forbidden folder - named with its errno and the fix), and a write
    failure another library reports in its own terms (TensorFlow's ``ResourceExhaustedError``
    for a full disk).  Anything else is a bug and keeps its traceback.
    """

    def make_context(self, info_name, args, parent=None, **extra):
        try:
            return super().make_context(info_name, args, parent=parent, **extra)
        except click.UsageError as e:  # the group's own options (`convnext --bogus`)
            _usage_exit(e, info_name or "convnext")

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except click.UsageError as e:
            _usage_exit(e, ctx.command_path)
        except (click.exceptions.ClickException, click.exceptions.Exit, click.exceptions.Abort):
            raise
        except Exception as e:
            message = user_error(e)
            if message is None:
                raise
            click.echo(f"error: {message}", err=True)
            sys.exit(2)


def _usage_exit(error: click.UsageError, command_path: str):
    """A bad command line as one line on stderr (Click prints four), exit status 2.  A bare
    ``convnext`` (Click >= 8.2's ``NoArgsIsHelpError``) still shows the help."""
    if isinstance(error, getattr(click.exceptions, "NoArgsIsHelpError", ())):
        raise error
    where = error.ctx.command_path if error.ctx is not None else command_path
    click.echo(f"error: {error.format_message()} (see `{where} --help`)", err=True)
    sys.exit(error.exit_code)


def user_error(error: Exception) -> str | None:
    """The one-line message of an error the user can fix, or None for anything else (a bug)."""
    from convnext_keras.errors import describe, write_errno
    from convnext_keras.weights.download import DownloadError
    from convnext_keras.weights.read import CheckpointError

    if isinstance(error, (CheckpointError, DownloadError, ValueError, OSError)):
        return describe(error)
    if write_errno(error) is not None:  # e.g. TensorFlow's ResourceExhaustedError (disk full)
        return describe(error).splitlines()[0]
    return None


@click.group(cls=ConvnextGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="convnext")
@click.pass_context
def main(ctx):
    """ConvNeXt for Keras 3: official checkpoints, conversion, prediction, export, training."""
    from convnext_keras.interface import command_line

    ctx.with_resource(command_line())  # errors name flags (--weights none), not weights=None


def table_width() -> int | None:
    """The width tables are drawn in: the terminal's (None: rich asks it, ``$COLUMNS`` first),
    or 200 when piped (one row per line in a log)."""
    return None if sys.stdout.isatty() else 200


def echo_table(title: str, columns: list[str], rows: list[list], justify=None, drop=()):
    """Print a table with rich (aligned on a terminal, plain when piped).

    The first column (the names) is never cut or wrapped: when the table is wider than the
    terminal, the columns of ``drop`` (indices, least needed first) are left out one by one
    until it fits, then any of them that fits again in the room left is put back (most needed
    first); the title says which are left out; what still does not fit wraps in the other
    columns.
    """
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

    console = Console(width=table_width())
    cells = [[str(c) for c in row] for row in rows]
    widths = [max([len(col), *(len(row[i]) for row in cells)]) for i, col in enumerate(columns)]
    shown = list(range(len(columns)))
    left_out = []
    fits = lambda cols: sum(widths[j] + 3 for j in cols) + 1 <= console.width  # noqa: E731
    for i in drop:  # a column takes its text, one space each side and one rule
        if fits(shown):
            break
        shown.remove(i)
        left_out.append(columns[i])
    for i in [i for i in reversed(drop) if columns[i] in left_out]:  # a narrow one fits again
        if fits([*shown, i]):
            shown = sorted([*shown, i])
            left_out.remove(columns[i])
    if left_out:
        title = f"{title} - left out for the terminal's width: {', '.join(left_out)}"
    table = Table(title=escape(title), show_lines=False)
    for i in shown:
        first = i == shown[0]
        table.add_column(
            escape(columns[i]),
            justify=(justify or {}).get(i, "left"),
            no_wrap=first,
            min_width=widths[i] if first else None,
        )
    for row in cells:
        table.add_row(*[escape(row[i]) for i in shown])
    console.print(table)


def backend_option(f):
    """``--backend tensorflow|jax|torch``: sets KERAS_BACKEND before Keras is imported, and
    quiets the backends' C++ start-up logging (``_quiet``): for every command that computes."""

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
        quiet_backend_logs()
        return f(*args, **kwargs)

    return wrapper


#: Inference engines (``engines.runners.ENGINES``, repeated here: the CLI imports Keras only after
#: ``--backend`` is read; a test keeps the two equal).
ENGINES = ("auto", "openvino", "onnxruntime", "keras")


def engine_option(help_text: str):
    """``--engine auto|openvino|onnxruntime|keras`` (the choice of
    ``engines.runners.inference_function``)."""
    return click.option(
        "--engine", type=click.Choice(ENGINES), default="auto", show_default=True, help=help_text
    )


#: ``--precision`` values (``nets.convnext.PRECISIONS``' keys and ``INT8``, repeated for the
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
    "'official' (the name's source - the official server or its Hugging Face Hub repository - "
    "downloaded once, then cached), 'none' (random initialisation), a local checkpoint file "
    "(.pth/.bin/.safetensors; official, timm or Hugging Face layout) or a Hub file: "
    "hf://ORG/REPO[@REVISION][/FILE] (HF_TOKEN for gated repositories)."
)


#: Printed with every human-readable result of a model with random weights (``--weights none``).
RANDOM_WEIGHTS_BANNER = (
    "RANDOM WEIGHTS (--weights none): the pipeline runs, but the answers mean nothing; "
    "--weights official or --weights FILE gives the trained model."
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


def exit_if_skipped(results, what: str) -> None:
    """After a per-image command: name each image that failed (``r.ok`` false, ``r.error``) on
    stderr, then exit with status 1 if any did (``what``: "classified", "segmented")."""
    failed = [r for r in results if not r.ok]
    for r in failed:
        click.echo(f"skipped: {r.error}", err=True)
    if failed:
        click.echo(f"{len(failed)} of {len(results)} images could not be {what}.", err=True)
        sys.exit(1)


def finish_evaluation(result, report, allow_unreadable: bool, noun: str) -> None:
    """An evaluation's tail: the unreadable files (10 at most), the JSON report, and exit
    status 1 when files could not be evaluated unless ``--allow-unreadable``."""
    for item in result.unreadable[:10]:
        click.echo(f"unreadable: {item['file']}: {item['error']}", err=True)
    if len(result.unreadable) > 10:
        click.echo(f"... and {len(result.unreadable) - 10} more (see --report)", err=True)
    if report:
        click.echo(f"report    {result.write(report)}")
    if result.unreadable and not allow_unreadable:
        click.echo(
            f"{len(result.unreadable)} {noun}(s) could not be evaluated (exit status 1; "
            "--allow-unreadable accepts that).",
            err=True,
        )
        sys.exit(1)


def evaluation_options(noun: str, report_help: str):
    """The options every evaluation command shares: ``--limit N``, ``--report FILE`` (JSON,
    ``report_help`` says what is in it) and ``--allow-unreadable`` (``noun``: "files",
    "images")."""
    import pathlib

    def decorate(f):
        f = click.option(
            "--allow-unreadable",
            is_flag=True,
            help=f"Exit with status 0 even when some {noun} could not be evaluated (default: 1).",
        )(f)
        f = click.option(
            "--report", type=click.Path(dir_okay=False, path_type=pathlib.Path), help=report_help
        )(f)
        return click.option(
            "--limit",
            type=click.IntRange(min=1),
            help="Evaluate a fixed random subset of N images.",
        )(f)

    return decorate
