"""``python -m convnext_keras.cli``: the ``convnext`` command."""

from convnext_keras.cli import main

main(prog_name="convnext")
