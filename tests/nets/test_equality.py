"""Proof of equality with an independent PyTorch implementation, for every registry entry.

ConvNeXt: for each distinct architecture (variant, head size) of the registry, a Hugging Face
transformers ConvNext with random, well-spread weights is written in the official checkpoint
layout, in transformers' own layout and in timm's layout; each is converted by this library and
run on the same random input at 224x224 (a 224 and a 384 checkpoint of one architecture have
the same tensors and the same graph: ConvNeXt has no position-dependent part; a 384 checkpoint
is compared with PyTorch at 384 in test_export, other sizes, non-square ones included, below and
in test_runtime).

ConvNeXt V2: for each variant, a transformers ConvNextV2 (GRN scale and shift far from zero) is
written in the official, transformers, timm and FCMAE (sparse encoder) layouts: the classifier
rows (logits, pooled, pyramid) and the FCMAE encoder row (pyramid; pooled features through the
encoder's fresh final LayerNorm) of every size, on TensorFlow at the largest resolution any
checkpoint of the variant has (384; huge 512), on JAX and PyTorch at 224 (the same graph).

Logits, pooled features and the four pyramid outputs must agree within 1e-4 (float32).  Runs on
whichever Keras backend KERAS_BACKEND selects (`make test` runs it on TensorFlow, JAX and
PyTorch; the `slow` ones on TensorFlow only).
"""

from __future__ import annotations

import gc

import keras
import numpy as np
import pytest
import torch_reference as ref

import convnext_keras as ck
from convnext_keras import registry
from convnext_keras.nets.convnext import build_for_loading

TOLERANCE = 1e-4
LAYOUTS_SKIPPED_FOR = ("large", "xlarge")
pytestmark = pytest.mark.equality


def _architectures():
    """Distinct ConvNeXt (variant, classes) -> its registry entries, the smallest resolution
    first."""
    groups: dict[tuple, list[str]] = {}
    for c in registry.CHECKPOINTS.values():
        if c.family == "convnext" and not c.spec.isotropic:  # isotropic: test_families.py
            groups.setdefault((c.variant, c.num_classes), []).append(c.name)
    return {
        key: sorted(names, key=lambda n: (registry.CHECKPOINTS[n].resolution, n))
        for key, names in groups.items()
    }


ARCHITECTURES = _architectures()
_SIZE_ORDER = list(registry.VARIANTS)


def _params():
    for (variant, classes), names in sorted(
        ARCHITECTURES.items(), key=lambda kv: (_SIZE_ORDER.index(kv[0][0]), kv[0][1])
    ):
        res = registry.CHECKPOINTS[names[0]].resolution
        # `slow` runs on TensorFlow only (`make test`): large/xlarge are the base code at other
        # widths, and the 21841-class head is only a wider Dense (tiny's proves it per backend).
        slow = variant in ("large", "xlarge") or (classes != 1000 and variant != "tiny")
        marks = [pytest.mark.slow] if slow else []
        yield pytest.param(names, id=f"{variant}-{classes}-{res}", marks=marks)


def _v2_variants():
    """ConvNeXt V2 variant -> its registry entries (classifiers and the FCMAE encoder)."""
    groups: dict[str, list[str]] = {}
    for c in registry.CHECKPOINTS.values():
        if c.family == "convnextv2":
            groups.setdefault(c.variant, []).append(c.name)
    return groups


V2_VARIANTS = _v2_variants()


def test_every_registry_entry_is_covered():
    covered = {n for names in ARCHITECTURES.values() for n in names}
    covered |= {n for names in V2_VARIANTS.values() for n in names}
    # The segmentation rows: tests/tasks/test_segmentation.py (tiny and base against transformers'
    # UperNet, every row's conversion and parameter count).
    covered |= set(registry.families("upernet_convnext"))
    # The detection rows: tests/nets/test_detection.py (Mask R-CNN-T and Cascade-T against the
    # mmdetection reference, every row's layout and parameter count).
    covered |= {c.name for c in registry.CHECKPOINTS.values() if c.detection is not None}
    # test_families.py: isotropic (each size), DINOv3 (tiny; large), timm (each architecture)
    others = {
        c.name
        for c in registry.CHECKPOINTS.values()
        if c.spec.isotropic or c.family in ("dinov3", "timm")
    }
    assert covered | others == set(registry.CHECKPOINTS) and not covered & others
    assert len(registry.CHECKPOINTS) == 21 + 26 + 3 + 4 + 6 + 6 + 7  # ... UperNet, detection


def _max_diff(a, b):
    return float(np.max(np.abs(np.asarray(a, dtype=np.float64) - np.asarray(b, np.float64))))


def _run(model, images):
    out = model(images, training=False)
    if isinstance(out, dict):
        return {k: keras.ops.convert_to_numpy(v) for k, v in out.items()}
    return keras.ops.convert_to_numpy(out)


def _assert_outputs_equal(got: dict, expected: dict, resolution: int, dims, label=""):
    assert _max_diff(got["logits"], expected["logits"]) <= TOLERANCE, f"{label} logits"
    assert _max_diff(got["pooled"], expected["pooled"]) <= TOLERANCE, f"{label} pooled"
    for i in range(4):
        key, stride = f"stage{i + 1}", 4 * 2**i
        assert got[key].shape == (1, resolution // stride, resolution // stride, dims[i]), key
        assert _max_diff(got[key], expected[key]) <= TOLERANCE, f"{label} {key}"


@pytest.mark.parametrize("names", list(_params()))
def test_registry_architecture_matches_pytorch(names, tmp_path):
    """Logits, pooled features and pyramid of each layout's conversion equal transformers'."""
    entry = registry.CHECKPOINTS[names[0]]
    spec = entry.spec
    for name in names:  # every registry name of this architecture resolves to it
        assert ck.registry.resolve(name).variant is spec
        assert ck.registry.resolve(name).num_classes == entry.num_classes
    torch_model = ref.hf_model(spec.depths, spec.dims, entry.num_classes, seed=len(names))
    images = (
        np.random.default_rng(0)
        .standard_normal((1, entry.resolution, entry.resolution, 3))
        .astype(np.float32)
    )
    expected = ref.hf_outputs(torch_model, images)
    files = {"official": ref.save_official(torch_model, tmp_path / entry.filename)}
    # The renaming of the other layouts does not depend on the size; checking it up to base
    # keeps the gigabyte-sized large/xlarge files to one layout.
    if spec.name not in LAYOUTS_SKIPPED_FOR:
        files["huggingface"] = ref.save_hf(torch_model, tmp_path / "hf")
        files["timm"] = ref.save_timm(torch_model, tmp_path / "timm.safetensors")
    assert ck.count_params(spec, entry.num_classes) == sum(
        p.numel() for p in torch_model.parameters()
    )
    del torch_model
    gc.collect()

    # One model with every output; weights re-assigned per layout (building is the slow part).
    model = ck.load_model(names[0], weights=files["official"], features="all")
    assert model.count_params() == ck.count_params(spec, entry.num_classes)
    _assert_outputs_equal(_run(model, images), expected, entry.resolution, spec.dims, "official")
    for layout in sorted(set(files) - {"official"}):
        weights = ck.convert_state_dict(ck.read_state_dict(files[layout]), spec)
        ck.weights.convert.assign_weights(model, weights)
        _assert_outputs_equal(_run(model, images), expected, entry.resolution, spec.dims, layout)
    del model
    keras.backend.clear_session()
    gc.collect()


def test_named_heads_match_pytorch(tiny_reference):
    """The classifier, ``_fe`` and pyramid models users load by name give the same numbers."""
    torch_model, path = tiny_reference
    images = np.random.default_rng(3).standard_normal((2, 160, 192, 3)).astype(np.float32)
    expected = ref.hf_outputs(torch_model, images)
    classifier = ck.load_model("convnext_tiny_1k_224", weights=path)
    assert _max_diff(classifier.predict_on_batch(images), expected["logits"]) <= TOLERANCE
    fe = ck.load_model("convnext_tiny_1k_224_fe", weights=path)
    assert fe.output.shape == (None, 768)
    assert _max_diff(fe.predict_on_batch(images), expected["pooled"]) <= TOLERANCE
    pyramid = ck.load_model("convnext_tiny_22k_1k_224", weights=path, features="pyramid")
    got = pyramid.predict_on_batch(images)
    assert sorted(got) == ["stage1", "stage2", "stage3", "stage4"]
    for key, value in got.items():
        assert _max_diff(value, expected[key]) <= TOLERANCE, key


def test_equality_check_can_fail(tiny_reference, tmp_path):
    """A single wrong tensor (one block's layer scale) moves the logits far beyond tolerance."""
    import torch

    torch_model, _ = tiny_reference
    state = ref.official_state_dict(torch_model)
    state["stages.2.8.gamma"] = state["stages.2.8.gamma"] * 1.1
    bad = tmp_path / "bad.pth"
    torch.save({"model": state}, bad)
    images = np.random.default_rng(1).standard_normal((1, 224, 224, 3)).astype(np.float32)
    expected = ref.hf_outputs(torch_model, images)["logits"]
    model = ck.load_model("convnext_tiny_1k_224", weights=bad)
    assert _max_diff(model.predict_on_batch(images), expected) > 10 * TOLERANCE


@pytest.mark.parametrize("variant", ["atto", "nano"])
def test_edge_variants_match_pytorch(variant, tmp_path):
    """timm's small variants, stored timm-style with 1x1-conv MLPs, convert exactly too."""
    spec = registry.VARIANTS[variant]
    torch_model = ref.hf_model(spec.depths, spec.dims, 10, seed=3)
    path = ref.save_timm(torch_model, tmp_path / "model.safetensors", conv_mlp=True)
    images = np.random.default_rng(2).standard_normal((2, 96, 128, 3)).astype(np.float32)
    expected = ref.hf_outputs(torch_model, images)
    model = ck.load_model(f"convnext_{variant}", weights=path, num_classes=10)
    assert _max_diff(model.predict_on_batch(images), expected["logits"]) <= TOLERANCE


# ---------------------------------------------------------------------------------------------
# ConvNeXt V2

#: Sizes whose other layouts (transformers, timm) are checked: the renaming does not depend on
#: the size; large/huge files are 0.8-2.6 GB each.
V2_LAYOUTS_UP_TO = ("atto", "femto", "pico", "nano", "tiny", "base")


def _v2_params():
    for variant, names in V2_VARIANTS.items():
        size = registry.VARIANTS[variant].size
        # `slow` (TensorFlow only): femto, pico and nano are atto's code (conv-MLP timm files
        # included) at other widths and depths, large and huge base's.
        slow = size in ("femto", "pico", "nano", "large", "huge")
        marks = [pytest.mark.slow] if slow else []
        yield pytest.param(variant, names, id=f"v2-{size}", marks=marks)


def _layer_norm(x, eps=registry.LAYER_NORM_EPSILON):
    x = np.asarray(x, np.float64)
    mean = x.mean(-1, keepdims=True)
    return (x - mean) / np.sqrt(((x - mean) ** 2).mean(-1, keepdims=True) + eps)


@pytest.mark.parametrize(("variant", "names"), list(_v2_params()))
def test_v2_variant_matches_pytorch(variant, names, tmp_path):
    """Every ConvNeXt V2 checkpoint of a size, at the largest resolution the size has (on
    TensorFlow; the smallest on the other backends, where building and running at 384 costs a
    minute of CI for the same graph).

    The official file goes through ``load_model`` and is compared with PyTorch (logits, pooled,
    pyramid).  The transformers, timm and FCMAE layouts of the same weights must convert to
    exactly the same arrays (bit for bit, so to the same outputs; the FCMAE encoder without
    head, its final LayerNorm at scale 1 / shift 0, whose pooled output is checked too).
    """
    spec = registry.VARIANTS[variant]
    rows = [registry.CHECKPOINTS[n] for n in names]
    classifier = next(c for c in rows if c.has_head)
    pick = max if keras.backend.backend() == "tensorflow" else min
    resolution = pick(c.resolution for c in rows)
    for name in names:
        assert ck.registry.resolve(name).variant is spec
    torch_model = ref.hf_v2_model(spec.depths, spec.dims, 1000, seed=len(spec.size))
    torch_params = sum(p.numel() for p in torch_model.parameters())
    assert ck.count_params(spec, 1000) == torch_params
    head_params = torch_model.classifier.weight.numel() + torch_model.classifier.bias.numel()
    assert ck.count_params(spec) == torch_params - head_params
    images = np.random.default_rng(0).standard_normal((1, resolution, resolution, 3))
    images = images.astype(np.float32)
    expected = ref.hf_outputs(torch_model, images)
    # Up to base through a file and load_model; large/huge (0.8-2.6 GB) straight from memory.
    small = spec.size in V2_LAYOUTS_UP_TO
    path = ref.save_official(torch_model, tmp_path / classifier.filename) if small else None

    # The layouts, as arrays sharing the PyTorch model's memory.
    layouts = {"official": ref.official_state_dict(torch_model)}
    layouts["fcmae"] = ref.fcmae_state_dict(torch_model)
    if small:
        layouts["huggingface"] = torch_model.state_dict()
        # timm stores atto..nano's MLP as 1x1 convolutions (conv_mlp=True)
        conv_mlp = spec.size in ("atto", "femto", "pico", "nano")
        layouts["timm"] = ref.timm_state_dict(torch_model, conv_mlp)
    layouts = {k: {n: t.numpy() for n, t in v.items()} for k, v in layouts.items()}
    official = ck.convert_state_dict(layouts.pop("official"), spec)
    for layout, state in layouts.items():
        converted = ck.convert_state_dict(state, spec)
        if layout == "fcmae":
            assert "head_fc" not in converted
            norm = converted.pop("head_norm")
            np.testing.assert_array_equal(norm[0], np.ones(spec.num_features, "float32"))
            np.testing.assert_array_equal(norm[1], np.zeros(spec.num_features, "float32"))
        expected_layers = {k for k in official if layout != "fcmae" or not k.startswith("head")}
        assert set(converted) == expected_layers, layout
        for layer, arrays in converted.items():
            for a, b in zip(arrays, official[layer], strict=True):
                np.testing.assert_array_equal(a, b, err_msg=f"{layout} {layer}")
        del converted
    head_norm = official["head_norm"]
    del torch_model, layouts, state
    gc.collect()

    if small:
        del official
        model = ck.load_model(classifier.name, weights=path, features="all")
    else:
        model = build_for_loading(spec, head="all", name=classifier.name)
        ck.weights.convert.assign_weights(model, official)
        del official
    assert model.count_params() == torch_params
    got = _run(model, images)
    _assert_outputs_equal(got, expected, resolution, spec.dims, "official")
    # The encoder's pooled features: the backbone's, through LayerNorm(scale 1, shift 0).
    raw = (np.asarray(got["pooled"], np.float64) - head_norm[1]) / head_norm[0]
    np.testing.assert_allclose(raw, _layer_norm(got["stage4"].mean(axis=(1, 2))), atol=1e-4)
    del model
    keras.backend.clear_session()
    gc.collect()


def test_v2_equality_check_can_fail(tmp_path):
    """One block's GRN scale 10% off moves the logits far beyond tolerance (GRN is not the
    identity in the reference), and so does a transposed depthwise kernel in the FCMAE file."""
    import torch

    spec = registry.VARIANTS["convnextv2_atto"]
    torch_model = ref.hf_v2_model(spec.depths, spec.dims, 1000, seed=2)
    images = np.random.default_rng(1).standard_normal((1, 64, 64, 3)).astype(np.float32)
    expected = ref.hf_outputs(torch_model, images)
    state = ref.official_state_dict(torch_model)
    state["stages.2.3.grn.gamma"] = state["stages.2.3.grn.gamma"] * 1.1
    torch.save({"model": state}, tmp_path / "bad.pt")
    model = ck.load_model("convnextv2_atto_1k_224", weights=tmp_path / "bad.pt", features="all")
    assert _max_diff(_run(model, images)["logits"], expected["logits"]) > 10 * TOLERANCE
    sparse = ref.fcmae_state_dict(torch_model)
    kernel = sparse["encoder.stages.0.1.dwconv.kernel"]
    sparse["encoder.stages.0.1.dwconv.kernel"] = (
        kernel.reshape(7, 7, -1).transpose(0, 1).reshape(49, -1)
    )
    weights = ck.convert_state_dict({k: v.numpy() for k, v in sparse.items()}, spec)
    ck.weights.convert.assign_weights(model, weights, load_head=False)
    assert _max_diff(_run(model, images)["stage4"], expected["stage4"]) > 10 * TOLERANCE
