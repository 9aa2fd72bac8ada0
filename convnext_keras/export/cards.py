"""The collection's Markdown: each model's card (:func:`model_card`, in the style of TF-Hub's
model pages) and the index page (:func:`index_markdown`).

Pure functions of the registry and, for a built model, its manifest (the weights used and every
verification); :mod:`convnext_keras.export.collection` writes them.
"""

from __future__ import annotations

from convnext_keras import registry

#: The model card's file name in each model directory.
CARD = "README.md"
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
    from convnext_keras.export.exporter import TOLERANCE
    from convnext_keras.export.planning import INPUT_CONTRACT

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
