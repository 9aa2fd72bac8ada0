"""The documents tell the truth about the things that can be checked mechanically: the model
tables are what the registry says now, and every relative link leads somewhere."""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

import pytest
from click.testing import CliRunner

from convnext_keras import registry
from convnext_keras.cli import main

ROOT = Path(__file__).resolve().parents[1]


def _generator():
    spec = importlib.util.spec_from_file_location("models_md", ROOT / "scripts" / "models_md.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


models_md = _generator()


def test_models_md_table_is_generated_from_the_registry():
    text = models_md.MODELS_MD.read_text()
    table = models_md.region(text, models_md.MODEL_MARKERS)
    assert table is not None, "docs/models.md lost its model-table markers"
    assert table == models_md.model_table(), "run `python scripts/models_md.py`"


def test_readme_family_table_is_generated_from_the_registry():
    table = models_md.region(models_md.README.read_text(), models_md.FAMILY_MARKERS)
    assert table is not None, "README.md lost its family-table markers"
    assert table == models_md.family_table(), "run `python scripts/models_md.py`"


def test_models_md_holds_every_registry_row_once():
    table = models_md.region(models_md.MODELS_MD.read_text(), models_md.MODEL_MARKERS)
    names = [line.split("|")[1].strip() for line in table.splitlines()[2:]]
    assert names == list(registry.CHECKPOINTS)


def test_models_md_agrees_with_convnext_list_markdown():
    """The generator and `convnext list --markdown` compute the same columns the same way."""
    result = CliRunner().invoke(main, ["list", "--markdown"])
    assert result.exit_code == 0, result.output
    listed = [
        [c.strip() for c in line.strip("|").split("|")] for line in result.output.splitlines()
    ]
    table = models_md.model_table().splitlines()
    ours = [[c.strip() for c in line.strip("|").split("|")] for line in table]
    # ours: name, family, params, res, classes, pre-training, reported, licence, source
    assert [[r[0], *r[2:8]] for r in ours[2:]] == listed[2:]


def test_check_mode_reports_a_stale_table(tmp_path, monkeypatch, capsys):
    stale = tmp_path / "models.md"
    stale.write_text(
        models_md.MODELS_MD.read_text().replace("| convnext_tiny_1k_224 |", "| convnext_tiny |")
    )
    readme = tmp_path / "README.md"
    readme.write_text(models_md.README.read_text())
    monkeypatch.setattr(models_md, "MODELS_MD", stale)
    monkeypatch.setattr(models_md, "README", readme)
    monkeypatch.setattr(models_md, "ROOT", tmp_path)
    assert models_md.main(["--check"]) == 1
    assert "models.md" in capsys.readouterr().out
    assert "| convnext_tiny |" in stale.read_text(), "--check must not write"


# ---------------------------------------------------------------------------------------------
# Links

DOCUMENTS = sorted(
    [
        ROOT / "README.md",
        ROOT / "BENCHMARKS.md",
        ROOT / "ARCHITECTURE.md",
        ROOT / "CHANGELOG.md",
        *(ROOT / "docs").glob("*.md"),
        *(ROOT / "benchmarks" / "results").glob("*/README.md"),
    ]
)
FENCE = re.compile(r"^(```|~~~).*?^\1[^\n]*$", re.S | re.M)
INLINE_CODE = re.compile(r"`[^`\n]*`")
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)")
HEADING = re.compile(r"^#{1,6}\s+(.*?)\s*#*\s*$", re.M)


def _prose(text: str) -> str:
    return FENCE.sub("", text)


def _anchors(path: Path) -> set[str]:
    """GitHub's heading anchors: lower case, punctuation dropped, spaces to hyphens, repeats
    numbered."""
    seen: dict[str, int] = {}
    anchors = set()
    for heading in HEADING.findall(_prose(path.read_text())):
        heading = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # a link's text only
        slug = re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")
        n = seen.get(slug, 0)
        seen[slug] = n + 1
        anchors.add(slug if n == 0 else f"{slug}-{n}")
    return anchors


def _links(path: Path) -> list[str]:
    return LINK.findall(INLINE_CODE.sub("", _prose(path.read_text())))


def test_documents_are_found():
    names = {p.relative_to(ROOT).as_posix() for p in DOCUMENTS}
    assert {"README.md", "BENCHMARKS.md", "docs/models.md", "docs/cli.md"} <= names


@pytest.mark.parametrize("doc", DOCUMENTS, ids=lambda p: p.relative_to(ROOT).as_posix())
def test_relative_links_point_at_existing_files_and_headings(doc):
    broken = []
    for target in _links(doc):
        if re.match(r"[a-z][a-z0-9+.-]*:", target):  # https:, mailto:, ...
            continue
        file, _, anchor = target.partition("#")
        dest = (doc.parent / file).resolve() if file else doc
        if not dest.exists():
            broken.append(f"{target}: no such file")
            continue
        if anchor and dest.suffix == ".md" and anchor not in _anchors(dest):
            broken.append(f"{target}: no heading #{anchor} in {dest.relative_to(ROOT)}")
    assert not broken, f"{doc.relative_to(ROOT)}: " + "; ".join(broken)


def test_the_docs_headings_that_messages_name_exist():
    """Messages point users at a page and heading by text (`docs/install.md#mirrors`, in a
    mirror's error): each one must be there."""
    named = []
    for source in sorted((ROOT / "convnext_keras").rglob("*.py")):
        for file, anchor in re.findall(r"(docs/\w+\.md)#([\w-]+)", source.read_text()):
            named.append((source.name, file, anchor))
            assert anchor in _anchors(ROOT / file), (source, file, anchor)
    assert ("download.py", "docs/install.md", "mirrors") in named


def _install_table() -> dict[str, tuple[int, str]]:
    """docs/install.md's measured set-ups: ``{"demo" | "test": (packages, size of .venv)}``."""
    text = (ROOT / "docs" / "install.md").read_text()
    found = {}
    for step, total, size in re.findall(
        r"^\| `make (demo|test)`'s set-up .*?\| (?:\+\d+ \()?(\d+)\)? \| ([\d.]+ GB)", text, re.M
    ):
        found[step] = (int(total), size)
    return found


def test_readme_install_figures_are_the_measured_ones_and_name_every_extra():
    """The README's install line gives the packages and sizes docs/install.md measured (one
    source of truth), the test command's duration and the quick loop, and its table names
    every extra pyproject.toml declares (the test tools aside)."""
    import tomllib

    readme = (ROOT / "README.md").read_text()
    table = _install_table()
    assert set(table) == {"demo", "test"}, table
    (demo,) = re.findall(r"`make demo` installs .*?\((\d+) packages, ([\d.]+ GB)\)", readme, re.S)
    (test,) = re.findall(r"`make test` adds .*?\((\d+), ([\d.]+ GB)\)", readme, re.S)
    assert (int(demo[0]), demo[1]) == table["demo"] and (int(test[0]), test[1]) == table["test"]
    words = " ".join(readme.split())
    assert re.search(r"`make test` takes about \d+ minutes on an idle 2-core machine", words)
    assert "`make test-fast`" in readme and "test-fast:" in (ROOT / "Makefile").read_text()
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"][
        "optional-dependencies"
    ]
    named = set(re.findall(r'"\.\[([\w-]+)\]"', readme))
    assert named == set(extras) - {"test"}, named ^ (set(extras) - {"test"})
