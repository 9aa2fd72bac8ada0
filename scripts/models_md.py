"""Write the model tables of docs/models.md and README.md from the registry.

    python scripts/models_md.py            # rewrite the tables in place
    python scripts/models_md.py --check    # exit 1 (and say which file) when a table is stale

Two generated regions, each between HTML-comment markers that the rest of the file leaves alone:

* docs/models.md, ``<!-- model-table:start -->`` ... ``<!-- model-table:end -->``: one row per
  registry checkpoint (name, family, parameters, resolution, classes, pre-training, what the
  original reports: acc@1, mIoU or box / mask AP, licence, source);
* README.md, ``<!-- family-table:start -->`` ... ``<!-- family-table:end -->``: one row per
  family (checkpoints, licence, where the weights come from), linking docs/models.md.

Only the public API is used (``convnext_keras.registry``, ``convnext_keras.api.count_params``,
``count_segmentation_params``, ``count_detection_params`` and ``reported_score``); none of it
imports Keras or a backend, so this runs in a second.
tests/test_docs.py checks that both files equal what this script writes now.
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from convnext_keras import api, registry  # noqa: E402

MODELS_MD = ROOT / "docs" / "models.md"
README = ROOT / "README.md"
MODEL_MARKERS = ("<!-- model-table:start -->", "<!-- model-table:end -->")
FAMILY_MARKERS = ("<!-- family-table:start -->", "<!-- family-table:end -->")

#: The README's rows: (label, section of docs/models.md, which checkpoints). ConvNeXt's family
#: holds the hierarchical and the isotropic models; the README shows them apart.
FAMILY_ROWS = (
    ("ConvNeXt", "convnext", lambda c: c.family == "convnext" and not c.spec.isotropic),
    (
        "ConvNeXt, isotropic",
        "isotropic-convnext",
        lambda c: c.family == "convnext" and c.spec.isotropic,
    ),
    ("ConvNeXt V2", "convnext-v2", lambda c: c.family == "convnextv2"),
    ("DINOv3 ConvNeXt", "dinov3-convnext", lambda c: c.family == "dinov3"),
    ("timm's small ConvNeXts", "timms-small-convnexts", lambda c: c.family == "timm"),
    (
        "UperNet-ConvNeXt (ADE20K)",
        "upernet-convnext-semantic-segmentation",
        lambda c: c.family == "upernet_convnext",
    ),
    (
        "Mask R-CNN / Cascade Mask R-CNN ConvNeXt (COCO)",
        "mask-r-cnn--cascade-mask-r-cnn-convnext-object-detection",
        lambda c: c.family == "mask_rcnn_convnext",
    ),
)


def params(c: registry.Checkpoint) -> int:
    if c.detection is not None:
        return api.count_detection_params(c.variant, c.detection.head, c.num_classes)
    if c.segmentation is None:
        return api.count_params(c.variant, c.num_classes)
    return api.count_segmentation_params(c.variant, c.segmentation.head, c.num_classes)


def source(c: registry.Checkpoint) -> str:
    text = f"hf://{c.source.repo}" if c.source.is_hub else "official"
    return f"[{text}]({c.source.page})"


def model_table() -> str:
    """docs/models.md's table: every registry row, in registry order."""
    lines = [
        "| name | family | params | res | classes | pre-training | reported | licence | source |",
        "|---|---|---:|---:|---:|---|---:|---|---|",
    ]
    for c in registry.CHECKPOINTS.values():
        cells = [
            c.name,
            c.family,
            f"{params(c) / 1e6:.1f}M",
            c.resolution,
            "-" if c.num_classes is None else c.num_classes,
            c.dataset,
            api.reported_score(c),
            c.licence,
            source(c),
        ]
        lines.append("| " + " | ".join(str(x) for x in cells) + " |")
    return "\n".join(lines) + "\n"


def family_table() -> str:
    """The README's summary: one row per family, the counts from the registry."""
    lines = [
        "| family | checkpoints | weights licence | weights from | details |",
        "|---|---:|---|---|---|",
    ]
    rows = list(registry.CHECKPOINTS.values())
    counted = 0
    for label, anchor, belongs in FAMILY_ROWS:
        members = [c for c in rows if belongs(c)]
        counted += len(members)
        licences = ", ".join(sorted({c.licence for c in members}))
        hub = {c.source.is_hub for c in members}
        where = {frozenset({False}): "official server", frozenset({True}): "Hugging Face Hub"}.get(
            frozenset(hub), "official server, Hugging Face Hub"
        )
        if any(c.family == "dinov3" for c in members):
            where += " (gated: `HF_TOKEN`)"
        link = f"[models](docs/models.md#{anchor})"
        lines.append(f"| {label} | {len(members)} | {licences} | {where} | {link} |")
    if counted != len(rows):
        raise SystemExit(f"FAMILY_ROWS covers {counted} of {len(rows)} registry rows: add a row.")
    lines.append(
        f"| **all** | **{len(rows)}** | | | [every row](docs/models.md#every-checkpoint) |"
    )
    return "\n".join(lines) + "\n"


def replace(text: str, markers: tuple[str, str], body: str, path: Path) -> str:
    start, end = markers
    pattern = re.compile(re.escape(start) + r"\n.*?" + re.escape(end), re.S)
    if not pattern.search(text):
        raise SystemExit(f"{path.relative_to(ROOT)} lost its markers {start} ... {end}.")
    return pattern.sub(lambda _: f"{start}\n{body}{end}", text, count=1)


def region(text: str, markers: tuple[str, str]) -> str | None:
    """What a file holds between the markers now (None: markers missing)."""
    start, end = markers
    m = re.search(re.escape(start) + r"\n(.*?)" + re.escape(end), text, re.S)
    return m.group(1) if m else None


def targets() -> list[tuple[Path, tuple[str, str], str]]:
    return [(MODELS_MD, MODEL_MARKERS, model_table()), (README, FAMILY_MARKERS, family_table())]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--check", action="store_true", help="exit 1 when a table is stale")
    args = parser.parse_args(argv)
    stale = []
    for path, markers, body in targets():
        text = path.read_text()
        new = replace(text, markers, body, path)
        if new != text:
            stale.append(path.relative_to(ROOT))
            if not args.check:
                path.write_text(new)
    if args.check and stale:
        print(f"stale: {', '.join(map(str, stale))}; run `python scripts/models_md.py`")
        return 1
    for name in stale:
        print(f"wrote {name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
