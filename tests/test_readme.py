"""The README tells the truth about the things that can be checked mechanically."""

from __future__ import annotations

import re
from pathlib import Path

from click.testing import CliRunner

from convnext_keras.cli import main

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def test_model_table_is_generated_from_the_registry():
    table = re.search(r"<!-- model-table:start -->\n(.*?)<!-- model-table:end -->", README, re.S)
    assert table, "README lost its model-table markers"
    result = CliRunner().invoke(main, ["list", "--markdown"])
    assert result.exit_code == 0
    assert table.group(1) == result.output, "run `convnext list --markdown` and paste it"


def test_readme_opens_with_the_two_commands():
    first_block = re.search(r"```bash\n(.*?)```", README, re.S).group(1)
    assert first_block.splitlines()[0].startswith("make demo")
    assert first_block.splitlines()[1].startswith("make test")
    ci = (ROOT / ".ci" / "run").read_text()
    assert "make test" in ci
