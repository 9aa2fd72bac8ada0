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

MANIFEST = "manifest.json"
CARD = "README.md"
#: Version of the manifest layout; a different one is rebuilt, not skipped.
MANIFEST_FORMAT = 1
#: Registry dataset -> (short phrase, what the model card's table says).
_DATASETS = {
    "imagenet-1k": (
        "on ImageNet-1k",
        f"ImageNet-1k (1.28M images, {registry.NUM_CLASSES_1K} classes)",
    ),
    "imagenet-21k": (
        "on ImageNet-21k",
        f"ImageNet-21k (about 14M images, {registry.NUM_CLASSES_21K} classes); no ImageNet-1k head",
    ),
    "imagenet-21k -> imagenet-1k": (
        "on ImageNet-21k and fine-tuned on ImageNet-1k",
        "ImageNet-21k pre-training, then ImageNet-1k fine-tuning",
    ),
    "imagenet-12k -> imagenet-1k": (
        "on ImageNet-12k (timm's 11821-class subset of ImageNet-21k) and fine-tuned on ImageNet-1k",
        "ImageNet-12k pre-training, then ImageNet-1k fine-tuning",
    ),
    "dinov3 lvd-1689m": (
        "by distillation from DINOv3 ViT-7B on LVD-1689M (1.7B web images, self-supervised)",
        "LVD-1689M web images without labels (DINOv3 distillation); no head",
    ),
    "fcmae imagenet-1k": (
        "self-supervised on ImageNet-1k (FCMAE masked-image pre-training, no labels)",
        "ImageNet-1k images without labels (FCMAE pre-training); no head",
    ),
    "fcmae -> imagenet-1k": (
        "with FCMAE on ImageNet-1k and fine-tuned on ImageNet-1k",
        "FCMAE pre-training on ImageNet-1k, then ImageNet-1k fine-tuning",
    ),
    "fcmae -> imagenet-21k -> imagenet-1k": (
        "with FCMAE on ImageNet-1k, fine-tuned on ImageNet-21k, then on ImageNet-1k",
        "FCMAE pre-training on ImageNet-1k, ImageNet-21k fine-tuning, then ImageNet-1k fine-tuning",
    ),
}


class CollectionError(ValueError):
    """A collection request that cannot be carried out (e.g. no model matches)."""


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
# Model cards and the index (pure functions of the registry and a manifest)


def _params(ckpt: registry.Checkpoint) -> tuple[int, int]:
    from convnext_keras.api import count_params

    return count_params(ckpt.variant, ckpt.num_classes), count_params(ckpt.variant)


def _eval_transform_text(ckpt: registry.Checkpoint) -> str:
    from convnext_keras.preprocess import config_for

    config = config_for(ckpt.name)
    if config.squash:
        return f"resize to {ckpt.resolution}x{ckpt.resolution} ({ckpt.interpolation}, no crop)"
    return (
        f"resize the shorter side to {config.resize_size} ({ckpt.interpolation}), centre-crop "
        f"{ckpt.resolution}x{ckpt.resolution}"
    )


def _licence_text(ckpt: registry.Checkpoint) -> str:
    family = registry.FAMILIES[ckpt.family]
    terms = " (non-commercial use only)" if "-NC" in ckpt.licence else ""
    return f"{ckpt.licence}{terms}, {family.licence_url}"


def model_card(name: str, manifest: dict | None = None) -> str:
    """The model card (Markdown) of a collection model, in the style of TF-Hub's model pages.

    Everything comes from the registry (the family's paper, code and weights licence included);
    ``manifest`` (what a build recorded) adds the weights' provenance and the measured
    verification.  An encoder without head (FCMAE) gets a feature-extractor card.
    """
    from convnext_keras.export.exporter import INPUT_CONTRACT, TOLERANCE

    resolved = registry.resolve(name)
    ckpt = resolved.checkpoint
    if ckpt is None or resolved.head == "pooled":
        raise CollectionError(
            f"{name!r} is not a checkpoint of the collection; model cards exist for "
            f"{', '.join(registry.CHECKPOINTS)}."
        )
    family = registry.FAMILIES[ckpt.family]
    repo = family.original.removeprefix("https://github.com/")
    spec, name, res = ckpt.spec, ckpt.name, ckpt.resolution
    fe = name + registry.FEATURE_EXTRACTOR_SUFFIX
    cls_params, fe_params = _params(ckpt)
    title = f"{family.title}-{spec.size.removeprefix('iso_').capitalize()}"
    title += " (isotropic)" if spec.isotropic else ""
    phrase, data = _DATASETS[ckpt.dataset]
    contract = INPUT_CONTRACT.format(mean=registry.IMAGENET_MEAN, std=registry.IMAGENET_STD)
    mean, std = list(registry.IMAGENET_MEAN), list(registry.IMAGENET_STD)
    src = ckpt.source
    where = f"the Hugging Face Hub's [{src.repo}]({src.page})" if src.is_hub else "the official"
    converted = (
        f"converted from {where} PyTorch checkpoint of [{repo}]({family.original}) to "
        "Keras 3 and exported as TensorFlow SavedModels in the style of the TF-Hub ConvNeXt "
        "collection: callable with `tf.saved_model.load`, servable with TF Serving and "
        "fine-tunable with `hub.KerasLayer(..., trainable=True)`."
    )
    features = f"`features`: {spec.num_features}-d pooled, layer-normalised features (`{fe}`)"
    if ckpt.has_head:
        reporter = "timm" if ckpt.family == "timm" else "the original"
        acc = (
            f"{ckpt.reported_acc1:.1f}% (reported by {reporter})"
            if ckpt.reported_acc1 is not None
            else "not reported (ImageNet-21k head)"
        )
        intro = (
            f"{title} image classifier trained {phrase} at {res}x{res}, and its feature "
            f"extractor `{fe}`, {converted}"
        )
        params = f"{cls_params:,} (classifier), {fe_params:,} (feature extractor)"
        outputs = f"`logits`: {ckpt.num_classes} classes (`{name}`); {features}"
        files = [
            f"- `{name}/`: classifier SavedModel; `serving_default`: `images` -> `logits`.",
            f"- `{fe}/`: feature-extractor SavedModel; `serving_default`: `images` -> `features`.",
            f"- `{name}.keras`: the classifier as a Keras 3 file (`import convnext_keras` "
            "before `keras.saving.load_model`; its `head_norm` layer's output is the feature "
            "vector).",
        ]
    else:
        acc = "not reported (a self-supervised encoder without head)"
        intro = (
            f"{title} encoder pre-trained {phrase} at {res}x{res}, as the feature extractor "
            f"`{fe}` (no classification head: fine-tune it, or use its features), {converted}"
        )
        params = f"{fe_params:,} (feature extractor)"
        if ckpt.dataset.startswith("fcmae"):
            outputs = (
                f"{features}; the encoder has no final LayerNorm of its own: this one starts at "
                "scale 1 and shift 0, as the original fine-tuning does"
            )
        else:
            outputs = (
                f"{features}: the global descriptor (DINOv3's normalised [CLS] token); "
                f"`convnext_keras.load_model('{name}', features='dense')` gives the "
                "normalised patch features at stride 32"
            )
        files = [
            f"- `{fe}/`: feature-extractor SavedModel; `serving_default`: `images` -> `features`.",
            f"- `{fe}.keras`: the feature extractor as a Keras 3 file (`import "
            "convnext_keras` before `keras.saving.load_model`).",
        ]
    lines = [
        f"# {name}",
        "",
        intro,
        "",
        "## Overview",
        "",
        "| | |",
        "|---|---|",
        f"| Architecture | {title}: depths {'-'.join(map(str, spec.depths))}, "
        f"widths {'-'.join(map(str, spec.dims))}"
        + (f", {spec.patch_size}x{spec.patch_size} patch stem, one stage" if spec.isotropic else "")
        + " |",
        f"| Training data | {data} |",
        f"| Resolution | {res}x{res} |",
        f"| Parameters | {params} |",
        f"| ImageNet-1k top-1 | {acc} |",
        f"| Outputs | {outputs} |",
        (
            f"| Published checkpoint | [`{src.repo}/{src.path}`]({src.page})"
            + (
                " (gated: accept the licence there; HF_TOKEN to download)"
                if ckpt.family == "dinov3"
                else ""
            )
            + " |"
            if src.is_hub
            else f"| Official checkpoint | [`{ckpt.filename}`]({src.official_url}) |"
        ),
        f"| Weights licence | {_licence_text(ckpt)} |",
        "",
        "## Files",
        "",
        *files,
        "- `manifest.json`: the weights used, every verification and the versions.",
        "",
        "## Input contract",
        "",
        f"{contract} Batch size is free; height and width are {res}.",
        "",
        f"The original evaluation pipeline: {_eval_transform_text(ckpt)}, scale to [0, 1], "
        "normalise. `convnext export ... --include-preprocessing` writes a SavedModel that "
        "takes uint8 images of any size and does this itself.",
        "",
        "## Usage",
        "",
    ]
    # The same preprocessing feeds both usages: the classifier's, or the encoder's features.
    saved = name if ckpt.has_head else fe
    prelude = [
        "```python",
        "import numpy as np",
        "import tensorflow as tf",
        "from PIL import Image",
        "",
        f'model = tf.saved_model.load("{saved}")',
        'image = Image.open("photo.jpg").convert("RGB")',
        *_preprocess_snippet(ckpt),
        f"x = (np.asarray(image, np.float32) / 255.0 - {mean}) / {std}",
    ]
    if ckpt.has_head:
        lines += [
            "### Classification",
            "",
            *prelude,
            "logits = model(x[None].astype(np.float32))      # or:",
            'logits = model.signatures["serving_default"](images=x[None].astype(np.float32))'
            '["logits"]',
            "top5 = tf.math.top_k(logits, k=5)",
            "```",
            "",
            "With Keras 3 (any backend that has TensorFlow installed):",
            "",
            "```python",
            "import keras",
            f'layer = keras.layers.TFSMLayer("{name}", call_endpoint="serving_default")',
            'logits = layer(x[None])["logits"]',
            "```",
            "",
        ]
    else:
        lines += [
            "### Features",
            "",
            *prelude,
            'features = model.signatures["serving_default"](images=x[None].astype(np.float32))'
            '["features"]',
            "```",
            "",
        ]
    lines += [
        "### Fine-tuning (TF-Hub workflow, tf-keras)",
        "",
        "```python",
        "import tensorflow_hub as hub",
        "import tf_keras  # TF_USE_LEGACY_KERAS=1; TF-Hub layers are tf-keras layers",
        "",
        "model = tf_keras.Sequential([",
        f"    tf_keras.Input(({res}, {res}, 3)),",
        f'    hub.KerasLayer("{fe}", trainable=True),',
        "    tf_keras.layers.Dense(NUM_CLASSES),",
        "])",
        "model.compile(optimizer=tf_keras.optimizers.AdamW(1e-4), loss=tf_keras.losses."
        'SparseCategoricalCrossentropy(from_logits=True), metrics=["accuracy"])',
        "model.fit(train_ds, validation_data=val_ds, epochs=10)",
        "```",
        "",
        "The SavedModel carries no regularisation losses: use the optimiser's weight decay. "
        f"`convnext finetune DATA --model {name} --out RUN` fine-tunes with the original's "
        "recipe instead.",
    ]
    if manifest:
        lines += _verification_section(manifest, TOLERANCE)
    lines += [
        "",
        "## References",
        "",
        f"- {family.citation}. {family.paper}",
        f"- Original code: {family.original}; the weights' licence: {_licence_text(ckpt)}.",
        "- This conversion: convnext_keras (Keras 3; equality with a PyTorch reference is "
        "tested for every checkpoint architecture).",
        "",
    ]
    return "\n".join(lines)


def _preprocess_snippet(ckpt: registry.Checkpoint) -> list[str]:
    """PIL code doing the official evaluation resize/crop (torchvision's arithmetic)."""
    from convnext_keras.preprocess import config_for

    config = config_for(ckpt.name)
    res, resample = ckpt.resolution, f"Image.{ckpt.interpolation.upper()}"
    if config.squash:
        return [f"image = image.resize(({res}, {res}), {resample})"]
    short = config.resize_size
    return [
        "w, h = image.size",
        f"size = ({short}, int({short} * h / w)) if w <= h else (int({short} * w / h), {short})",
        f"image = image.resize(size, {resample})",
        f"left, top = round((size[0] - {res}) / 2), round((size[1] - {res}) / 2)",
        f"image = image.crop((left, top, left + {res}, top + {res}))",
    ]


def _weights_line(weights: dict) -> str:
    line = f"Weights: {weights.get('description', 'unknown')}"
    return line + (f" (sha256 `{weights['sha256']}`)." if weights.get("sha256") else ".")


def _verification_section(manifest: dict, tolerance: dict) -> list[str]:
    lines = [
        "",
        "## Verification",
        "",
        _weights_line(manifest.get("weights", {})),
        "",
        "Every file was reloaded after export and compared with the Keras model on random "
        "inputs before it was kept:",
        "",
        "| file | loader and input | max abs diff | tolerance |",
        "|---|---|---|---|",
    ]
    for art in manifest.get("artifacts", {}).values():
        for check in art["checks"]:
            what, diff = check.rsplit(": max |diff| = ", 1)
            lines.append(f"| `{art['file']}` | {what} | {diff} | {tolerance[art['format']]:g} |")
    versions = manifest.get("versions", {})
    if versions:
        lines += ["", "Built with " + ", ".join(f"{k} {v}" for k, v in versions.items()) + "."]
    return lines


def index_markdown(manifests: list[dict], problems: dict[str, str] | None = None) -> str:
    """The collection's index page: one table row per built model, then what is missing."""
    order = list(registry.CHECKPOINTS)
    rows = sorted(manifests, key=lambda m: order.index(m["model"]))
    sources = ", ".join(
        f"[{f.original.removeprefix('https://github.com/')}]({f.original}) "
        f"([paper]({f.paper}); weights {f.licence})"
        for f in registry.FAMILIES.values()
    )
    lines = [
        "# ConvNeXt collection (Keras 3 / TensorFlow SavedModel)",
        "",
        f"Classifier and feature-extractor SavedModels of the official checkpoints of {sources}. "
        "Each model's card lists its input contract, usage for classification and "
        "fine-tuning, the weights' licence, and the verification of every file.",
        "",
        "| model | pre-training | resolution | params | acc@1 | licence | classifier "
        "| feature extractor | max abs diff |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for m in rows:
        ckpt = registry.CHECKPOINTS[m["model"]]
        cls_params, fe_params = _params(ckpt)
        acc = "-" if ckpt.reported_acc1 is None else f"{ckpt.reported_acc1:.1f}"
        arts = m["artifacts"]
        worst = max(a["max_abs_diff"] for a in arts.values())
        cls = arts.get("classifier_savedmodel", {}).get("file")
        fe = arts["feature_extractor_savedmodel"]["file"]
        cls_cell = f"[`{cls}`]({m['model']}/{cls})" if cls else "- (encoder)"
        params = (cls_params if ckpt.has_head else fe_params) / 1e6
        lines.append(
            f"| [{m['model']}]({m['model']}/{CARD}) | {ckpt.dataset} | {ckpt.resolution} "
            f"| {params:.1f}M | {acc} | {ckpt.licence} | {cls_cell} "
            f"| [`{fe}`]({m['model']}/{fe}) | {worst:.2g} |"
        )
    if not rows:
        lines.append("| (nothing built yet) | | | | | | | | |")
    if problems:
        lines += ["", "## Not built in the last run", ""]
        lines += [f"- `{name}`: {why}" for name, why in problems.items()]
    lines.append("")
    return "\n".join(lines)


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
    from convnext_keras.weights import cache as hub

    # A Hub row's file sits at hf/<repo>/<revision>/<file> (as `convnext fetch` puts it) and in
    # the Hugging Face cache.
    src = ckpt.source
    filename = src.cache_name if src.is_hub else ckpt.filename

    def cached_file():
        return hub.hub_cached_path(ckpt) if src.is_hub else hub.checkpoint_cache_path(ckpt)

    if weights_dir is not None:
        local = weights_dir / filename
        if local.is_file():
            return _Weights(str(local), f"`{filename}` from {weights_dir}", local)
        if hub.is_cached(ckpt):
            cached = cached_file()
            return _Weights(
                "official",
                f"`{ckpt.filename}` from the cache ({hub.cache_dir()})",
                cached if cached is not None and cached.is_file() else None,
            )
        return (
            f"no {filename} in {weights_dir} and not in the cache ({hub.cache_dir()}); "
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
    from convnext_keras.weights import cache as hub

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
            source = hub.hub_cached_path(ckpt)  # downloaded by load_model just now
        manifest = {
            "format": MANIFEST_FORMAT,
            "model": ckpt.name,
            "weights": {
                "description": weights.description,
                "file": ckpt.filename,
                "sha256": hub.file_sha256(source) if source else None,
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
    from convnext_keras.weights.cache import DownloadError

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
