"""The registry: one row type for every family's checkpoints, names, aliases, sources, licences.

The ConvNeXt V2 rows are checked against the tables of facebookresearch/ConvNeXt-V2's README
(file paths, resolutions, reported acc@1) and its ``datasets.py`` (evaluation crop), the
isotropic rows against facebookresearch/ConvNeXt's README and ``convnext_isotropic.py``, the
timm rows against timm's ``default_cfgs`` and ``results/results-imagenet.csv``, written here
again by hand.
"""

from __future__ import annotations

import subprocess
import sys

import pytest

from convnext_keras import registry

V2_URL = "https://dl.fbaipublicfiles.com/convnext/convnextv2/"
#: Rows per family: ConvNeXt, ConvNeXt V2, isotropic (family "convnext"), DINOv3, timm, UperNet,
#: Mask R-CNN / Cascade Mask R-CNN.
COUNTS = {"convnext": 21 + 3, "convnextv2": 26, "dinov3": 4, "timm": 6, "upernet_convnext": 6}
COUNTS["mask_rcnn_convnext"] = 7
TOTAL = sum(COUNTS.values())
#: (name, file under V2_URL, resolution, classes, acc@1) from the ConvNeXt-V2 README.
V2_TABLE = [
    *(
        (f"convnextv2_{s}_fcmae", f"pt_only/convnextv2_{s}_1k_224_fcmae.pt", 224, None, None)
        for s in ("atto", "femto", "pico", "nano", "tiny", "base", "large", "huge")
    ),
    ("convnextv2_atto_1k_224", "im1k/convnextv2_atto_1k_224_ema.pt", 224, 1000, 76.7),
    ("convnextv2_femto_1k_224", "im1k/convnextv2_femto_1k_224_ema.pt", 224, 1000, 78.5),
    ("convnextv2_pico_1k_224", "im1k/convnextv2_pico_1k_224_ema.pt", 224, 1000, 80.3),
    ("convnextv2_nano_1k_224", "im1k/convnextv2_nano_1k_224_ema.pt", 224, 1000, 81.9),
    ("convnextv2_tiny_1k_224", "im1k/convnextv2_tiny_1k_224_ema.pt", 224, 1000, 83.0),
    ("convnextv2_base_1k_224", "im1k/convnextv2_base_1k_224_ema.pt", 224, 1000, 84.9),
    ("convnextv2_large_1k_224", "im1k/convnextv2_large_1k_224_ema.pt", 224, 1000, 85.8),
    ("convnextv2_huge_1k_224", "im1k/convnextv2_huge_1k_224_ema.pt", 224, 1000, 86.3),
    ("convnextv2_nano_21k_1k_224", "im22k/convnextv2_nano_22k_224_ema.pt", 224, 1000, 82.1),
    ("convnextv2_nano_21k_1k_384", "im22k/convnextv2_nano_22k_384_ema.pt", 384, 1000, 83.4),
    ("convnextv2_tiny_21k_1k_224", "im22k/convnextv2_tiny_22k_224_ema.pt", 224, 1000, 83.9),
    ("convnextv2_tiny_21k_1k_384", "im22k/convnextv2_tiny_22k_384_ema.pt", 384, 1000, 85.1),
    ("convnextv2_base_21k_1k_224", "im22k/convnextv2_base_22k_224_ema.pt", 224, 1000, 86.8),
    ("convnextv2_base_21k_1k_384", "im22k/convnextv2_base_22k_384_ema.pt", 384, 1000, 87.7),
    ("convnextv2_large_21k_1k_224", "im22k/convnextv2_large_22k_224_ema.pt", 224, 1000, 87.3),
    ("convnextv2_large_21k_1k_384", "im22k/convnextv2_large_22k_384_ema.pt", 384, 1000, 88.2),
    ("convnextv2_huge_21k_1k_384", "im22k/convnextv2_huge_22k_384_ema.pt", 384, 1000, 88.7),
    ("convnextv2_huge_21k_1k_512", "im22k/convnextv2_huge_22k_512_ema.pt", 512, 1000, 88.9),
]


def test_v2_rows_match_the_original_readme():
    rows = [c for c in registry.CHECKPOINTS.values() if c.family == "convnextv2"]
    assert len(rows) == 26 and len(registry.CHECKPOINTS) == TOTAL
    assert [c.name for c in rows] == [name for name, *_ in V2_TABLE]
    for name, path, res, classes, acc in V2_TABLE:
        c = registry.CHECKPOINTS[name]
        assert (c.url, c.resolution, c.num_classes, c.reported_acc1) == (
            V2_URL + path,
            res,
            classes,
            acc,
        )
        assert c.licence == "CC-BY-NC-4.0" and c.spec.block == "grn"
        # datasets.py: 224/256 centre crop below 384, warp (no crop) at 384 and 512
        assert c.crop_pct == (1.0 if res >= 384 else 224 / 256)
        assert c.interpolation == "bicubic"
    assert registry.CHECKPOINTS["convnextv2_huge_fcmae"].spec.dims == (352, 704, 1408, 2816)


def test_v1_rows_keep_their_names_licence_and_settings():
    rows = [
        c for c in registry.CHECKPOINTS.values() if c.family == "convnext" and not c.spec.isotropic
    ]
    assert len(rows) == 21
    assert all(c.licence == "MIT" and c.spec.block == "layer_scale" for c in rows)
    tiny = registry.CHECKPOINTS["convnext_tiny_1k_224"]
    assert tiny.url == "https://dl.fbaipublicfiles.com/convnext/convnext_tiny_1k_224_ema.pth"
    assert (tiny.crop_pct, registry.CHECKPOINTS["convnext_base_1k_384"].crop_pct) == (0.875, 1.0)
    assert registry.resolve("convnext_tiny").variant is registry.VARIANTS["tiny"]


def test_v1_and_v2_share_sizes_not_blocks():
    v1, v2 = registry.variant("tiny"), registry.variant("convnextv2_tiny")
    assert (v1.depths, v1.dims) == (v2.depths, v2.dims)
    assert (v1.block, v2.block) == ("layer_scale", "grn")
    assert registry.variant("convnext_tiny") is v1  # architecture names work too
    assert (v1.arch_name, v2.arch_name, v2.title) == (
        "convnext_tiny",
        "convnextv2_tiny",
        "ConvNeXt V2-tiny",
    )
    with pytest.raises(ValueError, match="Unknown ConvNeXt variant 'convnextv2_small'"):
        registry.variant("convnextv2_small")


@pytest.mark.parametrize(
    ("spelling", "name"),
    [
        ("convnextv2_tiny_22k_384", "convnextv2_tiny_21k_1k_384"),  # the file's spelling
        ("convnextv2_tiny_22k_384_ema", "convnextv2_tiny_21k_1k_384"),
        ("ConvNeXtV2-Tiny-22k-1k-384", "convnextv2_tiny_21k_1k_384"),
        ("convnextv2_huge_22k_512", "convnextv2_huge_21k_1k_512"),
        ("convnextv2_atto_1k_224_ema", "convnextv2_atto_1k_224"),
        ("convnextv2_atto_1k_224_fcmae", "convnextv2_atto_fcmae"),
        ("convnext_tiny_1k_224_ema", "convnext_tiny_1k_224"),
    ],
)
def test_file_name_spellings_resolve(spelling, name):
    resolved = registry.resolve(spelling)
    assert resolved.checkpoint.name == name and resolved.name == name
    fe = registry.resolve(spelling + "_fe")
    assert (fe.name, fe.head) == (name + "_fe", "pooled")


def test_encoders_have_no_head():
    enc = registry.resolve("convnextv2_large_fcmae")
    assert (enc.head, enc.num_classes, enc.checkpoint.has_head) == ("pyramid", None, False)
    assert registry.resolve("convnextv2_large_fcmae_fe").head == "pooled"
    assert registry.resolve("convnextv2_large").head == "classifier"
    assert registry.checkpoints_for("convnextv2_large", None) == ["convnextv2_large_fcmae"]


def test_model_names_and_unknown_names():
    names = registry.model_names()
    # segmentation and detection models: no _fe twin
    assert len(names) == 2 * TOTAL - COUNTS["upernet_convnext"] - COUNTS["mask_rcnn_convnext"]
    assert "convnextv2_huge_21k_1k_512_fe" in names and "convnextv2_atto_fcmae_fe" in names
    assert "convnextv2_huge" in registry.model_names(include_variants=True)
    with pytest.raises(registry.UnknownModelError, match="Did you mean convnextv2_tiny_1k_224"):
        registry.resolve("convnextv2_tiny_1k_244")
    # A file where a name belongs says so (not a list of every architecture).
    for path in ("/tmp/model.onnx", "exports/model", "convnext_tiny.pth"):
        with pytest.raises(registry.UnknownModelError, match="is a file, not a model name"):
            registry.resolve(path)


def test_sources():
    official = registry.Source("convnextv2/im1k/convnextv2_atto_1k_224_ema.pt")
    assert official.filename == "convnextv2_atto_1k_224_ema.pt"
    assert official.cache_name == official.path
    hub = registry.Source("model.safetensors", repo="org/name", revision="0123abc")
    assert hub.url == "https://huggingface.co/org/name/resolve/0123abc/model.safetensors"
    assert hub.cache_name == "hf/org/name/0123abc/model.safetensors"


def test_mirror_keeps_the_official_paths(monkeypatch):
    monkeypatch.setenv("CONVNEXT_BASE_URL", "http://mirror.example/convnext/")
    assert registry.CHECKPOINTS["convnextv2_tiny_fcmae"].url == (
        "http://mirror.example/convnext/convnextv2/pt_only/convnextv2_tiny_1k_224_fcmae.pt"
    )


def test_families_and_finetune_defaults():
    assert registry.FAMILIES["convnextv2"].licence == "CC-BY-NC-4.0"
    assert registry.FAMILIES["convnext"].licence == "MIT"
    # ConvNeXt-V2 TRAINING.md: atto, tiny ('single', 0.9) and base ('group', 0.6)
    atto, tiny, base = (registry.FINETUNE[f"convnextv2_{s}"] for s in ("atto", "tiny", "base"))
    assert (atto.layer_decay_type, atto.layer_decay, atto.drop_path, atto.base_lr) == (
        "single",
        0.9,
        0.1,
        2e-4,
    )
    assert (tiny.layer_decay_type, tiny.layer_decay, tiny.drop_path, tiny.base_lr) == (
        "single",
        0.9,
        0.2,
        8e-4,
    )
    assert (base.layer_decay_type, base.layer_decay, base.drop_path, base.base_lr) == (
        "group",
        0.6,
        0.1,
        6.25e-4,
    )
    assert registry.FINETUNE["convnextv2_large"].layer_decay_type == "group"
    assert "publishes no command" in registry.FINETUNE["convnextv2_nano"].source


def test_registry_imports_no_keras():
    """``convnext list`` reads the registry; it must not pull in Keras (nor a backend)."""
    code = (
        "import sys\n"
        "from convnext_keras import registry\n"
        "heavy = [m for m in ('keras', 'tensorflow', 'jax', 'torch') if m in sys.modules]\n"
        "print(len(registry.CHECKPOINTS), heavy)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == [str(TOTAL), "[]"]


#: facebookresearch/ConvNeXt README "ImageNet-1K trained models (isotropic)" and
#: models/convnext_isotropic.py / TRAINING.md: (size, depth, width, layer scale?, acc@1, params)
ISOTROPIC_TABLE = [
    ("small", 18, 384, False, 78.7, 22),
    ("base", 18, 768, False, 82.0, 87),
    ("large", 36, 1024, True, 82.6, 306),
]


def test_isotropic_rows_match_the_original():
    from convnext_keras.api import count_params

    for size, depth, dim, layer_scale, acc, params in ISOTROPIC_TABLE:
        c = registry.CHECKPOINTS[f"convnext_iso_{size}_1k_224"]
        assert (
            c.url == f"https://dl.fbaipublicfiles.com/convnext/convnext_iso_{size}_1k_224_ema.pth"
        )
        assert (c.spec.depths, c.spec.dims, c.spec.patch_size, c.spec.stem_norm) == (
            (depth,),
            (dim,),
            16,
            False,
        )
        assert c.spec.block == ("layer_scale" if layer_scale else "plain")
        assert (c.resolution, c.crop_pct, c.num_classes, c.reported_acc1) == (224, 0.875, 1000, acc)
        assert (c.licence, c.family, c.spec.isotropic, c.spec.min_input_size) == (
            "MIT",
            "convnext",
            True,
            16,
        )
        assert round(count_params(c.variant, 1000) / 1e6) == params
        assert registry.resolve(f"convnext_iso_{size}_1k_224_ema").name == c.name
    assert registry.resolve("convnext_iso_base").head == "classifier"
    assert registry.variant("convnext_iso_large").title == "ConvNeXt-large (isotropic)"


def test_dinov3_rows_are_gated_hub_encoders():
    for size, dims in (("tiny", 768), ("small", 768), ("base", 1024), ("large", 1536)):
        c = registry.CHECKPOINTS[f"dinov3_convnext_{size}_lvd1689m"]
        repo = f"facebook/dinov3-convnext-{size}-pretrain-lvd1689m"
        assert (c.source.repo, c.source.path, c.variant, c.spec.num_features) == (
            repo,
            "model.safetensors",
            size,
            dims,
        )
        assert c.url == f"https://huggingface.co/{repo}/resolve/main/model.safetensors"
        assert c.source.page == f"https://huggingface.co/{repo}"
        assert (c.num_classes, c.reported_acc1, c.licence) == (None, None, "LicenseRef-DINOv3")
        # transformers' DINOv3ViTImageProcessor: 224x224, bilinear, no crop
        assert (c.resolution, c.crop_mode, c.interpolation) == (224, "squash", "bilinear")
        assert registry.resolve(repo.split("/")[1]).name == c.name
        assert registry.resolve(c.name).head == "pyramid"
        assert registry.resolve(c.name + "_fe").head == "pooled"
    assert "DINOv3" in registry.FAMILIES["dinov3"].licence


#: timm models/convnext.py default_cfgs (input size, crop_pct; bicubic) and
#: results/results-imagenet.csv (top1 at that size): (name, timm name, res, crop, mode, acc@1)
TIMM_TABLE = [
    ("convnext_atto_1k_224", "convnext_atto.d2_in1k", 224, 0.875, None, 75.672),
    ("convnext_femto_1k_224", "convnext_femto.d1_in1k", 224, 0.875, None, 77.498),
    ("convnext_pico_1k_224", "convnext_pico.d1_in1k", 224, 0.875, None, 79.516),
    ("convnext_nano_1k_224", "convnext_nano.d1h_in1k", 224, 0.95, None, 80.762),
    ("convnext_nano_12k_1k_224", "convnext_nano.in12k_ft_in1k", 224, 0.95, None, 82.306),
    ("convnext_nano_12k_1k_384", "convnext_nano.r384_in12k_ft_in1k", 384, 1.0, "center", 83.334),
]


def test_timm_rows_match_timm():
    rows = [c.name for c in registry.CHECKPOINTS.values() if c.family == "timm"]
    assert rows == [name for name, *_ in TIMM_TABLE]
    for name, timm_name, res, crop, mode, acc in TIMM_TABLE:
        c = registry.CHECKPOINTS[name]
        assert c.url == f"https://huggingface.co/timm/{timm_name}/resolve/main/model.safetensors"
        assert (c.resolution, c.crop_pct, c.crop_mode, c.interpolation) == (
            res,
            crop,
            mode,
            "bicubic",
        )
        assert (c.reported_acc1, c.num_classes, c.licence) == (acc, 1000, "Apache-2.0")
        assert registry.resolve(timm_name).name == name
        assert c.spec is registry.VARIANTS[timm_name.split(".")[0].removeprefix("convnext_")]
    # timm's r384 tag centre-crops at 384, where the official transform squashes
    assert not registry.squashes(384, "center") and registry.squashes(384)
    assert registry.squashes(224, "squash") and not registry.squashes(224)
