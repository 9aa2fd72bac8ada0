"""The TF-Hub-style ConvNeXt collection: SavedModels, ``.keras`` files, model cards and an index.

    convnext collection --out collection/ [--models PATTERN] [--weights-dir DIR]

For every checkpoint of the registry (or those ``PATTERN`` selects) the build writes::

    collection/
      index.md, index.json                 the collection as a table
      convnext_tiny_1k_224/
        README.md                          the model card (generated from the registry)
        convnext_tiny_1k_224/              classifier SavedModel  (serving output "logits")
        convnext_tiny_1k_224_fe/           feature-extractor SavedModel (output "features")
        convnext_tiny_1k_224.keras         the classifier as a Keras 3 file
        manifest.json                      weights used, every verification, versions

An encoder without classification head (ConvNeXt V2's FCMAE rows, DINOv3's backbones) has no
classifier: its directory holds the feature extractor (SavedModel and ``<name>_fe.keras``).
Model cards name each family's paper, code and weights licence (ConvNeXt: MIT; ConvNeXt V2:
CC BY-NC 4.0; DINOv3: the DINOv3 License; timm's: Apache-2.0).

Each model directory is built in a temporary directory beside it and renamed into place only
when every export is verified (see :mod:`convnext_keras.export.exporter`), so a directory that
exists is complete; the build skips those unless ``overwrite``.  A model whose weights are not
available, or whose build fails, is reported and the build goes on with the next.  Nothing is
built from weights other than the official ones.

This module finds the weights, builds each model directory and writes the manifests and the
index; the Markdown of the model cards and of the index page is
:mod:`convnext_keras.export.cards`'s.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path

from convnext_keras import registry
from convnext_keras.export.cards import CARD, CollectionError, index_markdown, model_card

MANIFEST = "manifest.json"
#: Version of the manifest layout; a different one is rebuilt, not skipped.
MANIFEST_FORMAT = 1


def _artifacts(name: str) -> dict[str, tuple[str, str]]:
    """{key: (file name inside the model directory, export format)} of one model (an encoder
    without head: the feature extractor's SavedModel and .keras file)."""
    from convnext_keras.export.exporter import default_path

    fe = name + registry.FEATURE_EXTRACTOR_SUFFIX
    if not registry.CHECKPOINTS[name].has_head:
        return {
            "feature_extractor_savedmodel": (
                default_path(fe, ".", "savedmodel").name,
                "savedmodel",
            ),
            "feature_extractor_keras": (default_path(fe, ".", "keras").name, "keras"),
        }
    return {
        "classifier_savedmodel": (default_path(name, ".", "savedmodel").name, "savedmodel"),
        "feature_extractor_savedmodel": (default_path(fe, ".", "savedmodel").name, "savedmodel"),
        "classifier_keras": (default_path(name, ".", "keras").name, "keras"),
    }


# ----------------------------------------------------------------------------------------------
# Finding weights


@dataclasses.dataclass
class _Weights:
    """Where a model's official weights come from."""

    load_as: str  # what load_model(weights=...) gets: a file path or "official"
    description: str
    file: Path | None  # the checkpoint file, when one is on disk (for its sha256)


def _find_weights(ckpt: registry.Checkpoint, weights_dir: Path | None) -> _Weights | str:
    """The weights to build ``ckpt`` from, or why there are none (a string)."""
    from convnext_keras.weights import cache, hfhub, store

    # A Hub row's file sits at hf/<repo>/<revision>/<file> (as `convnext fetch` puts it) and in
    # the Hugging Face cache.
    src = ckpt.source
    filename = src.cache_name if src.is_hub else ckpt.filename

    def cached_file():
        return hfhub.hub_cached_path(ckpt) if src.is_hub else cache.checkpoint_cache_path(ckpt)

    if weights_dir is not None:
        local = weights_dir / filename
        if local.is_file():
            return _Weights(str(local), f"`{filename}` from {weights_dir}", local)
        if store.is_cached(ckpt):
            cached = cached_file()
            return _Weights(
                "official",
                f"`{ckpt.filename}` from the cache ({cache.cache_dir()})",
                cached if cached is not None and cached.is_file() else None,
            )
        return (
            f"no {filename} in {weights_dir} and not in the cache ({cache.cache_dir()}); "
            f"download it from {ckpt.url} into {weights_dir}, or run without --weights-dir "
            "to download it"
        )
    cached = cached_file()
    return _Weights(
        "official",
        f"`{ckpt.filename}` ({ckpt.url})",
        cached,  # present after load_model downloads it (or already cached)
    )


# ----------------------------------------------------------------------------------------------
# The build


@dataclasses.dataclass
class CollectionReport:
    """What a collection build did, by model name."""

    out: Path
    built: list[str] = dataclasses.field(default_factory=list)
    skipped: list[str] = dataclasses.field(default_factory=list)
    #: Models without available weights, and why.
    missing: dict[str, str] = dataclasses.field(default_factory=dict)
    #: Models whose build failed, and the error.
    failed: dict[str, str] = dataclasses.field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return not self.missing and not self.failed


def read_manifest(model_dir: Path) -> dict | None:
    """The manifest of a complete model directory, or None (absent, unreadable, other format)."""
    try:
        manifest = json.loads((Path(model_dir) / MANIFEST).read_text())
    except (OSError, ValueError):
        return None
    if (
        manifest.get("format") != MANIFEST_FORMAT
        or manifest.get("model") not in registry.CHECKPOINTS
    ):
        return None
    files = [a["file"] for a in manifest.get("artifacts", {}).values()]
    if set(manifest.get("artifacts", {})) != set(_artifacts(manifest["model"])):
        return None
    if not all((Path(model_dir) / f).exists() for f in files):
        return None
    return manifest


def _versions() -> dict:
    import keras

    from convnext_keras import __version__

    versions = {"convnext_keras": __version__, "keras": keras.__version__}
    try:
        import tensorflow as tf

        versions["tensorflow"] = tf.__version__
    except ImportError:
        pass
    return versions


def _build_one(ckpt: registry.Checkpoint, weights: _Weights, model_dir: Path, overwrite: bool):
    """Export one checkpoint's four artifacts + card + manifest into ``model_dir`` atomically."""
    import keras

    from convnext_keras.api import load_model
    from convnext_keras.export.exporter import export, staged
    from convnext_keras.weights import cache, hfhub

    start = time.time()
    fe_name = ckpt.name + registry.FEATURE_EXTRACTOR_SUFFIX
    if ckpt.has_head:
        classifier = load_model(ckpt.name, weights=weights.load_as)
        features = keras.Model(
            classifier.input, classifier.get_layer("head_norm").output, name=fe_name
        )
        models = {"classifier": classifier, "feature_extractor": features}
    else:  # an encoder: its feature extractor only
        models = {"feature_extractor": load_model(fe_name, weights=weights.load_as)}
    with staged(model_dir, overwrite=overwrite) as tmp:
        tmp.mkdir()
        artifacts = {}
        for key, (file, fmt) in _artifacts(ckpt.name).items():
            result = export(models[key.rsplit("_", 1)[0]], tmp / file, fmt)
            artifacts[key] = {
                "file": file,
                "format": fmt,
                "outputs": result.outputs,
                "input_shape": list(result.input_shape),
                "max_abs_diff": result.max_abs_diff,
                "checks": result.checks,
            }
        source = weights.file if weights.file and weights.file.is_file() else None
        if source is None and ckpt.source.is_hub:
            source = hfhub.hub_cached_path(ckpt)  # downloaded by load_model just now
        manifest = {
            "format": MANIFEST_FORMAT,
            "model": ckpt.name,
            "weights": {
                "description": weights.description,
                "file": ckpt.filename,
                "sha256": cache.file_sha256(source) if source else None,
            },
            "artifacts": artifacts,
            "versions": _versions(),
            "seconds": round(time.time() - start, 1),
        }
        (tmp / CARD).write_text(model_card(ckpt.name, manifest))
        # Written last: a manifest only ever describes a complete directory.
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    return manifest


def select_models(pattern: str | None = None) -> list[str]:
    """Checkpoint names the collection builds for ``pattern`` (all when None)."""
    from convnext_keras.api import list_models

    # The collection is of image classifiers and encoders (segmentation models: export them).
    names = [
        n
        for n in list_models(pattern, include_fe=False)
        if registry.CHECKPOINTS[n].segmentation is None
    ]
    if not names:
        raise CollectionError(
            f"No checkpoint matches {pattern!r}. Choices: {', '.join(registry.CHECKPOINTS)} "
            "(shell patterns such as 'convnext_tiny_*' work)."
        )
    return names


def _stderr(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def _progress(total: int):
    """A rich progress bar on a terminal, nothing otherwise."""
    if not sys.stderr.isatty() or os.environ.get("CONVNEXT_NO_PROGRESS"):
        return None
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeElapsedColumn

    bar = Progress(
        "[progress.description]{task.description}",
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=Console(stderr=True),
        transient=True,
    )
    bar.start()
    return bar, bar.add_task("collection", total=total)


def build_collection(
    out: str | os.PathLike,
    models: str | list[str] | None = None,
    *,
    weights_dir: str | os.PathLike | None = None,
    overwrite: bool = False,
    log: Callable[[str], None] | None = _stderr,
) -> CollectionReport:
    """Build (or complete) the collection in ``out``.

    Args:
        out: collection directory (created if needed).
        models: a shell pattern over the checkpoint names (``"convnext_tiny_*"``,
            ``"convnextv2*"``), a list of names, or None for all.
        weights_dir: a directory holding official checkpoint files under their official names
            (``convnext_tiny_1k_224_ema.pth``, ``convnextv2_tiny_1k_224_ema.pt``...); only these
            and the cache are used.  Without
            it, weights come from the cache or are downloaded (``CONVNEXT_BASE_URL``).
        overwrite: rebuild models that are already built.
        log: called with one line per event (None: silent).

    Returns:
        A :class:`CollectionReport`; ``report.ok`` is False when a model is missing or failed.
    """
    from convnext_keras.weights.download import DownloadError

    out = Path(out)
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"{out} exists and is not a directory; choose another --out.")
    if weights_dir is not None:
        weights_dir = Path(weights_dir).expanduser()
        if not weights_dir.is_dir():
            raise FileNotFoundError(f"--weights-dir {weights_dir} is not a directory.")
    if isinstance(models, (list, tuple)):
        names = [registry.resolve(n).checkpoint and registry.canonical_name(n) for n in models]
        bad = [
            n
            for n, c in zip(models, names)
            if not c or c not in registry.CHECKPOINTS or registry.CHECKPOINTS[c].segmentation
        ]
        if bad:
            raise CollectionError(
                f"Not checkpoints of the collection: {', '.join(bad)}. Choices: "
                f"{', '.join(registry.CHECKPOINTS)}."
            )
    else:
        names = select_models(models)
    log = log or (lambda message: None)
    out.mkdir(parents=True, exist_ok=True)
    report = CollectionReport(out)
    bar = _progress(len(names))
    try:
        for i, name in enumerate(names, 1):
            ckpt, model_dir = registry.CHECKPOINTS[name], out / name
            prefix = f"[{i}/{len(names)}] {name}:"
            if bar:
                bar[0].update(bar[1], description=name)
            if not overwrite and read_manifest(model_dir) is not None:
                report.skipped.append(name)
                log(f"{prefix} already built and verified, skipped")
            else:
                weights = _find_weights(ckpt, weights_dir)
                if isinstance(weights, str):
                    report.missing[name] = weights
                    log(f"{prefix} missing weights: {weights}")
                else:
                    try:
                        manifest = _build_one(ckpt, weights, model_dir, overwrite=True)
                    except DownloadError as e:
                        report.missing[name] = str(e).replace("\n", " ")
                        log(f"{prefix} missing weights: {report.missing[name]}")
                    except Exception as e:  # one model's failure must not stop the rest
                        report.failed[name] = f"{type(e).__name__}: {e}".replace("\n", " ")
                        log(f"{prefix} FAILED: {report.failed[name]}")
                    else:
                        report.built.append(name)
                        worst = max(a["max_abs_diff"] for a in manifest["artifacts"].values())
                        log(f"{prefix} built in {manifest['seconds']}s (max abs diff {worst:.2g})")
            if bar:
                bar[0].update(bar[1], completed=i)
    finally:
        if bar:
            bar[0].stop()
    write_index(out, {**report.missing, **report.failed})
    return report


def write_index(out: str | os.PathLike, problems: dict[str, str] | None = None) -> Path:
    """(Re)write ``index.md`` and ``index.json`` from the complete model directories in ``out``."""
    from convnext_keras.weights.cache import atomic_path

    out = Path(out)
    manifests = [m for d in sorted(out.iterdir()) if d.is_dir() and (m := read_manifest(d))]
    with atomic_path(out / "index.md") as tmp:
        tmp.write_text(index_markdown(manifests, problems))
    with atomic_path(out / "index.json") as tmp:
        tmp.write_text(
            json.dumps({"models": manifests, "not_built": problems or {}}, indent=2) + "\n"
        )
    return out / "index.md"
