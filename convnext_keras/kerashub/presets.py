"""This library's models as keras-hub presets: folders written, verified, cached, shared.

A keras-hub preset is a folder (``config.json`` + ``model.weights.h5``: the backbone;
``task.json`` + ``task.weights.h5``: the task's head; ``preprocessor.json``,
``image_converter.json``; ``metadata.json``).  This module writes one for any model name of
this library, its weights coming down the library's own load path
(:func:`convnext_keras.load_model`: download -> verify -> convert -> cache):

* a classifier (``convnext_tiny_1k_224``) -> :class:`ConvNeXtImageClassifier` with its head;
* an encoder without head (``dinov3_convnext_tiny_lvd1689m``, ``convnextv2_atto_fcmae``) or a
  ``_fe`` name -> the backbone and the classifier's preprocessor, no task (keras-hub then
  builds ``ImageClassifier.from_preset(name, num_classes=N)`` with a new head);
* a segmentation model (``upernet_convnext_tiny_ade20k_512``) ->
  :class:`ConvNeXtUperNetImageSegmenter`.

:func:`save_preset` writes one into a temporary folder, loads it back with keras-hub's own
``from_preset`` and compares it with the library's model (and the converter with the
library's transform) before moving it into place, adds a model card (``README.md``) and
``convnext_keras.json`` (provenance and each file's SHA-256).

:func:`register_presets` (run when keras-hub and ``convnext_keras.kerashub`` are imported)
makes every checkpoint name of the registry a keras-hub *built-in* preset:
``keras_hub.models.ImageClassifier.from_preset("convnextv2_tiny_1k_224")`` works, and
``ImageClassifier.presets`` lists the names.  keras-hub looks a built-in preset up in
``keras_hub``'s table and reads its ``kaggle_handle``; here that lookup builds the preset folder
in this library's cache (:func:`preset_path`, ``$CONVNEXT_HOME/keras-hub/NAME``) on first use
and answers with its path, so no network is used beyond what ``load_model`` does.  The folder
is checked against its SHA-256 record on every use and rebuilt if damaged, as the cache's
other files are.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import time
from collections.abc import Mapping
from pathlib import Path

import keras
import keras_hub
import numpy as np
from keras_hub.src.utils import preset_utils
from PIL import Image

from convnext_keras import api, registry
from convnext_keras.export.cards import _DATASETS, _eval_transform_text, _licence_text
from convnext_keras.export.exporter import staged
from convnext_keras.export.planning import ExportResult, VerificationError
from convnext_keras.interface import fix
from convnext_keras.kerashub.backbone import ConvNeXtBackbone
from convnext_keras.kerashub.classifier import (
    ConvNeXtImageClassifier,
    ConvNeXtImageClassifierPreprocessor,
)
from convnext_keras.kerashub.converter import ConvNeXtImageConverter, ConvNeXtUperNetImageConverter
from convnext_keras.kerashub.segmenter import (
    ConvNeXtUperNetImageSegmenter,
    ConvNeXtUperNetImageSegmenterPreprocessor,
)
from convnext_keras.nets.convnext import build_for_loading
from convnext_keras.preprocess.transforms import config_for, eval_transform
from convnext_keras.tasks.segment import test_image
from convnext_keras.weights import cache

logger = logging.getLogger("convnext_keras")

#: The ``--format`` name of a preset export.
FORMAT = "keras-hub"
#: Bumped when what a preset folder holds changes: cached folders of another format are rebuilt.
PRESET_FORMAT = "1"
#: This library's record in each preset folder: provenance, versions, every file's SHA-256.
MANIFEST = "convnext_keras.json"
CARD = "README.md"
#: Largest |reloaded preset - library model| accepted (the weights are copied, not recomputed:
#: the difference is 0 unless something is wrong).
TOLERANCE = 1e-5
#: Height and width of the random verification images.
_VERIFY_SIZE = 64
#: The kinds of preset and the keras-hub class that loads each.
KINDS = ("classifier", "backbone", "segmenter")


def preset_kind(name: str) -> str:
    """``"classifier"``, ``"backbone"`` (an encoder without head, or a ``_fe`` name) or
    ``"segmenter"`` for a model name (``UnknownModelError`` for an unknown one)."""
    resolved = registry.resolve(name)
    if resolved.head == "segmentation":
        return "segmenter"
    if resolved.head == "classifier" and resolved.num_classes:
        return "classifier"
    return "backbone"


# ---------------------------------------------------------------------------------------------
# Building the keras-hub objects of a name, with the library's weights


def _copy_weights(source, layers, skip=()) -> int:
    """Assign every weight-carrying layer in ``layers`` the weights of ``source``'s layer of the
    same name; ``RuntimeError`` if one is missing or a ``source`` layer with weights is left
    over (outside ``skip``).  Returns the number of layers copied."""
    by_name = {layer.name: layer for layer in source.layers if layer.weights}
    done = set()
    for layer in layers:
        if not layer.weights or isinstance(layer, keras.Model):  # models: by their layers
            continue
        if layer.name not in by_name:
            raise RuntimeError(f"keras-hub preset: no weights for layer {layer.name!r}")
        layer.set_weights(by_name[layer.name].get_weights())
        done.add(layer.name)
    left = set(by_name) - done - set(skip)
    if left:
        raise RuntimeError(f"keras-hub preset: weights of {sorted(left)[:3]} were not copied")
    return len(done)


def build(name: str, *, weights="official"):
    """The keras-hub objects of a model name with its weights, and the library's own model:
    ``(task, preprocessor, reference)``, where ``task`` is a :class:`ConvNeXtImageClassifier`
    or :class:`ConvNeXtUperNetImageSegmenter` (its ``preprocessor`` set), or a
    :class:`ConvNeXtBackbone` for a model without head; ``reference`` is
    ``ck.load_model(name, weights=weights, ...)`` (logits, pooled features or segmentation
    logits), which the task's outputs equal.

    ``weights``: as :func:`convnext_keras.load_model`'s (``"official"``, None, a checkpoint
    file or an ``hf://`` address).
    """
    kind = preset_kind(name)
    resolved = registry.resolve(name)
    spec = resolved.variant

    def backbone_builder(variant, **kwargs):
        return ConvNeXtBackbone.from_architecture(variant, **kwargs)

    if kind == "segmenter":
        row = resolved.checkpoint
        reference = api.load_model(name, weights=weights)
        # Kernels are not drawn only to be overwritten (build_for_loading): the copy follows.
        backbone = build_for_loading(spec, builder=backbone_builder, stage_norms=True)
        preprocessor = ConvNeXtUperNetImageSegmenterPreprocessor(
            ConvNeXtUperNetImageConverter.for_model(name)
        )
        task = ConvNeXtUperNetImageSegmenter(
            backbone,
            num_classes=row.num_classes,
            preprocessor=preprocessor,
            channels=row.segmentation.head.channels,
            pool_scales=row.segmentation.head.pool_scales,
        )
        _copy_weights(reference, [*backbone.layers, *backbone.stage_output_norms, *task.layers])
        return task, preprocessor, reference

    features = "all" if kind == "classifier" else "pooled"
    loaded = api.load_model(name, weights=weights, features=features)
    backbone = build_for_loading(spec, builder=backbone_builder)
    _copy_weights(loaded, [*backbone.layers, backbone.head_norm], skip=("head_fc",))
    preprocessor = ConvNeXtImageClassifierPreprocessor(ConvNeXtImageConverter.for_model(name))
    if kind == "backbone":
        return backbone, preprocessor, loaded
    task = ConvNeXtImageClassifier(
        backbone, num_classes=resolved.num_classes, preprocessor=preprocessor
    )
    task.output_dense.set_weights(loaded.get_layer("head_fc").get_weights())
    reference = keras.Model(loaded.inputs, loaded.output["logits"], name=loaded.name)
    return task, preprocessor, reference


# ---------------------------------------------------------------------------------------------
# Writing and verifying a preset folder


def _verify(folder: Path, kind: str, name: str, reference, seed: int = 0) -> tuple[float, list]:
    """Load ``folder`` with keras-hub's ``from_preset`` and compare it with ``reference`` on
    random images, and its image converter with this library's transform on a random photo-
    sized image.  Returns ``(max |difference|, one line per check)``."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((2, _VERIFY_SIZE, _VERIFY_SIZE, 3)).astype(np.float32)
    expected = np.asarray(reference.predict_on_batch(x))
    # Called, not predict(): a keras-hub task's predict() preprocesses raw images first.
    if kind == "classifier":
        loaded = keras_hub.models.ImageClassifier.from_preset(str(folder))
        what = "ImageClassifier.from_preset"
    elif kind == "segmenter":
        loaded = keras_hub.models.ImageSegmenter.from_preset(str(folder))
        what = "ImageSegmenter.from_preset"
    else:
        backbone = keras_hub.models.Backbone.from_preset(str(folder))
        loaded = keras.Model(backbone.inputs, backbone.pooled_output)
        what = "Backbone.from_preset (pooled)"
    got = np.asarray(keras.ops.convert_to_numpy(loaded(x, training=False)))
    diff = float(np.max(np.abs(got - expected))) if got.shape == expected.shape else np.inf
    lines = [f"{what} vs convnext_keras.load_model on {tuple(x.shape)}: max |diff| {diff:.3g}"]
    if not diff <= TOLERANCE:
        return diff, lines
    # The converter as saved, against the library's own transform, bit for bit.
    converter = keras_hub.layers.ImageConverter.from_preset(str(folder))
    image = rng.integers(0, 256, (97, 131, 3), dtype=np.uint8)
    converted = np.asarray(keras.ops.convert_to_numpy(converter(image)))
    if kind == "segmenter":
        row = registry.resolve(name).checkpoint
        transformed = test_image(image, row.segmentation.eval.image_scale)
    else:
        transformed = eval_transform(Image.fromarray(image), *config_for(name))
    same = converted.shape == transformed.shape and np.array_equal(converted, transformed)
    lines.append(
        f"{type(converter).__name__} vs this library's transform on a {image.shape[1]}x"
        f"{image.shape[0]} image: " + ("bit-equal" if same else "DIFFERENT")
    )
    return (diff if same else np.inf), lines


def _manifest(folder: Path, name: str, kind: str, source: str) -> dict:
    from convnext_keras import __version__

    files = {p.name: cache.file_sha256(p) for p in sorted(folder.iterdir()) if p.name != MANIFEST}
    return {
        "format": PRESET_FORMAT,
        "name": name,
        "kind": kind,
        "weights": source,
        "convnext_keras": __version__,
        "keras": keras.__version__,
        "keras_hub": keras_hub.__version__,
        "backend": keras.backend.backend(),
        "files": files,
    }


def _describe_weights(name: str, weights) -> str:
    """Where the weights came from, for the card and the manifest (both may be published): the
    official URL, the ``hf://`` address, or a local file by its name and SHA-256 (not its
    path on this machine)."""
    if weights is None:
        return "random initialisation"
    if isinstance(weights, str) and weights == api.OFFICIAL:
        ckpt = registry.resolve(name).checkpoint
        return ckpt.url if ckpt else api.OFFICIAL
    if isinstance(weights, str) and weights.startswith("hf://"):
        return weights
    path = Path(weights).expanduser()
    return f"the checkpoint file {path.name} (SHA-256 {cache.file_sha256(path)})"


def save_preset(
    name: str,
    path: str | os.PathLike,
    *,
    weights="official",
    overwrite: bool = False,
    card: bool = True,
) -> ExportResult:
    """Write model ``name`` as a keras-hub preset folder at ``path``, verified.

    The folder is written beside ``path`` under a temporary name, loaded back with keras-hub's
    ``from_preset`` and compared with ``ck.load_model(name, weights=weights)`` (within
    :data:`TOLERANCE`; the image converter bit for bit with this library's transform), and only
    then moved to ``path``; an existing ``path`` is replaced only with ``overwrite=True``.

    Args:
        name: a model name of this library (checkpoint, ``_fe`` twin, architecture,
            segmentation model).
        path: the preset folder to write.
        weights: as :func:`convnext_keras.load_model`'s.
        overwrite: replace an existing folder.
        card: write the model card ``README.md``.

    Raises:
        FileExistsError: ``path`` exists (without ``overwrite``).  VerificationError: the
        reloaded preset differs.  And whatever ``load_model`` raises for the name and weights.
    """
    path = Path(path)
    if path.exists() and not overwrite:
        raise FileExistsError(
            f"{path} exists; pass {fix('overwrite=True', '--overwrite')} to replace it."
        )
    start = time.time()
    kind = preset_kind(name)
    canonical = registry.resolve(name).name or registry.canonical_name(name)
    task, preprocessor, reference = build(name, weights=weights)
    source = _describe_weights(name, weights)
    with staged(path, overwrite) as tmp:
        task.save_to_preset(str(tmp))
        if kind == "backbone":
            preprocessor.save_to_preset(str(tmp))
        diff, checks = _verify(tmp, kind, canonical, reference)
        if not diff <= TOLERANCE:
            raise VerificationError(
                f"The keras-hub preset of {canonical} does not reproduce the model: "
                + "; ".join(checks),
                diff,
                TOLERANCE,
            )
        if card:
            (tmp / CARD).write_text(
                model_card(canonical, kind, source, task.count_params()), encoding="utf-8"
            )
        (tmp / MANIFEST).write_text(
            json.dumps(_manifest(tmp, canonical, kind, source), indent=2), encoding="utf-8"
        )
    result = ExportResult(
        path=path,
        format=FORMAT,
        input_shape=(None, None, None, 3),
        input_dtype="uint8",  # raw images, through the preset's preprocessor
        outputs=["logits" if kind != "backbone" else "features"],
        max_abs_diff=diff,
        tolerance=TOLERANCE,
        checks=checks,
        seconds=round(time.time() - start, 1),
    )
    result.random_weights = weights is None
    return result


def export_preset(
    name: str, out_dir: str | os.PathLike, *, weights="official", overwrite: bool = False
) -> ExportResult:
    """:func:`save_preset` to ``out_dir/NAME`` (NAME in the registry's spelling): what
    ``convnext export NAME --format keras-hub --out OUT_DIR`` does."""
    try:
        key = registry.resolve(name).name
    except registry.UnknownModelError:
        key = registry.canonical_name(name)
    return save_preset(name, Path(out_dir) / key, weights=weights, overwrite=overwrite)


# ---------------------------------------------------------------------------------------------
# The model card


_HF_LICENCES = {"MIT": "mit", "Apache-2.0": "apache-2.0", "CC-BY-NC-4.0": "cc-by-nc-4.0"}
_PIPELINES = {
    "classifier": "image-classification",
    "backbone": "image-feature-extraction",
    "segmenter": "image-segmentation",
}
_LOADERS = {
    "classifier": "keras_hub.models.ImageClassifier",
    "backbone": "keras_hub.models.Backbone",
    "segmenter": "keras_hub.models.ImageSegmenter",
}


def model_card(name: str, kind: str, source: str, params: int) -> str:
    """The preset's ``README.md``: what the model is, how to load it, its facts and licence
    (everything from the registry)."""
    resolved = registry.resolve(name)
    ckpt, spec = resolved.checkpoint, resolved.variant
    family = registry.FAMILIES[ckpt.family if ckpt else spec.family]
    licence = ckpt.licence if ckpt else None
    front = ["---", "library_name: keras-hub", f"pipeline_tag: {_PIPELINES[kind]}"]
    if licence in _HF_LICENCES:
        front.append(f"license: {_HF_LICENCES[licence]}")
    elif licence:
        front += [
            "license: other",
            f"license_name: {family.name}",
            f"license_link: {family.licence_url}",
        ]
    front += ["tags:", "- convnext", "- convnext_keras", "- keras", "---", ""]
    loader = _LOADERS[kind]
    lines = [
        *front,
        f"# {name}",
        "",
        f"{spec.title} as a [KerasHub](https://keras.io/keras_hub/) preset, written by "
        "convnext_keras (`convnext export "
        f"{name} --format keras-hub`) from {source}.",
        "",
        "## Use",
        "",
        "```python",
        "import convnext_keras, keras_hub   # convnext_keras registers its classes with Keras",
        f'model = {loader}.from_preset("hf://ORG/{name}")   # or this folder\'s path',
    ]
    if kind == "classifier":
        lines += ["logits = model.predict(images)   # raw RGB images, 0..255, any size"]
    elif kind == "segmenter":
        lines += ["logits = model.predict(images)   # raw RGB images: per-pixel logits"]
    else:
        lines += [
            "pooled = keras.Model(model.inputs, model.pooled_output)   # the pooled features",
            "# a classifier with a new head:",
            "clf = keras_hub.models.ImageClassifier.from_preset("
            f'"hf://ORG/{name}", num_classes=10)',
        ]
    lines += [
        "```",
        "",
        "Keras builds only registered classes from a preset (it never imports a module a file "
        "names), so `import convnext_keras` must come before `from_preset`; without it keras-hub "
        "stops with `no class registered with Keras for convnext_keras>ConvNeXtBackbone`. "
        "Install it with `pip install 'convnext-keras[keras-hub]'`.",
        "",
        "## Facts",
        "",
        "| | |",
        "|---|---|",
        f"| Architecture | {spec.title}: depths {'-'.join(map(str, spec.depths))}, widths "
        f"{'-'.join(map(str, spec.dims))} |",
        f"| Parameters | {params:,} |",
    ]
    if ckpt is not None:
        phrase = _DATASETS.get(ckpt.dataset, (ckpt.dataset,))[0]
        lines += [
            f"| Training | {phrase} |",
            f"| Resolution | {ckpt.resolution}x{ckpt.resolution} |",
        ]
        if ckpt.segmentation is not None:
            seg = ckpt.segmentation
            lines += [
                f"| ADE20K val mIoU | {seg.reported_miou} (single scale, reported; "
                "`ck.segment_files` runs that procedure) |",
                f"| Preprocessing | keep-ratio resize to fit {seg.eval.image_scale} (bilinear), "
                "ImageNet mean/std |",
            ]
        else:
            acc = ckpt.reported_acc1
            lines += [
                "| ImageNet-1k top-1 | "
                + (f"{acc:.1f}% (reported)" if acc else "not reported")
                + " |",
                f"| Preprocessing | {_eval_transform_text(ckpt)}, ImageNet mean/std (bit-equal "
                "to the original's PIL pipeline) |",
            ]
        lines += [f"| Weights licence | {_licence_text(ckpt)} |"]
    lines += [
        "",
        "## References",
        "",
        f"- {family.citation}. {family.paper}",
        f"- Original code: {family.original}.",
        "- convnext_keras: the conversion is proved numerically equal to the PyTorch original.",
        "",
    ]
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# The cache: registry names as built-in presets


def preset_dir(name: str) -> Path:
    """Where the cached preset folder of a model name lives (``$CONVNEXT_HOME/keras-hub/NAME``)."""
    return cache.cache_dir() / "keras-hub" / registry.resolve(name).name


def _intact(folder: Path) -> str | None:
    """None if ``folder`` holds a complete preset of this format matching its record, else
    what is wrong."""
    try:
        manifest = json.loads((folder / MANIFEST).read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        return f"no readable {MANIFEST} ({type(e).__name__})"
    if manifest.get("format") != PRESET_FORMAT:
        return "written by another version of this library"
    for file, digest in manifest.get("files", {}).items():
        try:
            if cache.file_sha256(folder / file) != digest:
                return f"{file} differs from its SHA-256 record"
        except OSError:
            return f"{file} is missing"
    return None


def preset_path(name: str) -> Path:
    """The cached keras-hub preset folder of a checkpoint name, built on first use (its
    weights through ``load_model``'s download -> verify -> convert -> cache) and checked against
    its record on every use; a damaged folder is moved aside (``NAME.corrupt-<time>``) and
    rebuilt, a folder of an older format rebuilt."""
    folder = preset_dir(name)
    with cache.locked(folder):
        if folder.is_dir():
            problem = _intact(folder)
            if problem is None:
                return folder
            aside = folder.with_name(f"{folder.name}.corrupt-{int(time.time())}")
            with contextlib.suppress(OSError):
                os.replace(folder, aside)
            if folder.exists():
                shutil.rmtree(folder, ignore_errors=True)
            logger.warning(f"convnext_keras: keras-hub preset {folder}: {problem}; rebuilding")
        save_preset(name, folder, overwrite=True)
    return folder


class LazyPreset(Mapping):
    """A keras-hub built-in preset entry (``{"metadata": ..., "kaggle_handle": ...}``) whose
    ``kaggle_handle`` is the path of this library's cached preset folder, built when keras-hub
    first reads it (:func:`preset_path`)."""

    def __init__(self, name: str):
        self.name = name

    def _metadata(self) -> dict:
        ckpt = registry.CHECKPOINTS[self.name]
        kind = preset_kind(self.name)
        if kind == "segmenter":
            params = api.count_segmentation_params(
                ckpt.variant, ckpt.segmentation.head, ckpt.num_classes
            )
        else:
            params = api.count_params(ckpt.variant, ckpt.num_classes)
        return {
            "description": f"{ckpt.spec.title}, {ckpt.dataset}, {ckpt.resolution}px "
            f"({kind}; convnext_keras, licence {ckpt.licence})",
            "params": params,
            "path": "convnext_keras",
        }

    def __getitem__(self, key):
        if key == "metadata":
            return self._metadata()
        if key == "kaggle_handle":
            return str(preset_path(self.name))
        raise KeyError(key)

    def __iter__(self):
        return iter(("metadata", "kaggle_handle"))

    def __len__(self) -> int:
        return 2

    def __repr__(self) -> str:
        return f"LazyPreset({self.name!r})"


def register_presets() -> list[str]:
    """Make every checkpoint name of the registry a keras-hub built-in preset of
    :class:`ConvNeXtBackbone` (names keras-hub itself already uses are left to it).  Returns
    the names registered."""
    taken = preset_utils.BUILTIN_PRESETS
    presets = {
        name: LazyPreset(name)
        for name in registry.CHECKPOINTS
        if name not in taken or isinstance(taken[name], LazyPreset)
    }
    preset_utils.register_presets(presets, ConvNeXtBackbone)
    return list(presets)


def upload_preset(uri: str, folder: str | os.PathLike) -> None:
    """``keras_hub.upload_preset(uri, folder)``, keeping the folder's model card.

    keras-hub writes a generic ``README.md`` of its own into a folder it uploads to a Hugging
    Face repository that has none, and deletes it afterwards - the card :func:`save_preset`
    wrote would be replaced on the Hub and lost locally.  For an ``hf://`` address this uploads
    the folder's ``README.md`` first (creating the repository), so keras-hub leaves the card
    alone; other addresses (``kaggle://``) go to keras-hub as they are.
    """
    folder = Path(folder)
    card = folder / CARD
    if str(uri).startswith("hf://") and card.is_file():
        import huggingface_hub

        repo = huggingface_hub.create_repo(repo_id=str(uri).removeprefix("hf://"), exist_ok=True)
        if not huggingface_hub.file_exists(repo_id=repo.repo_id, filename=CARD):
            huggingface_hub.upload_file(
                path_or_fileobj=str(card),
                path_in_repo=CARD,
                repo_id=repo.repo_id,
                commit_message="Add the model card",
            )
    keras_hub.upload_preset(str(uri), str(folder))
