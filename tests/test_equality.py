"""Proof of equality with an independent PyTorch implementation, for every registry entry.

For each distinct architecture (variant, head size) of the registry, a Hugging Face transformers
ConvNext with random, well-spread weights is written in the official checkpoint layout, in
transformers' own layout and in timm's layout; each is converted by this library and run on the
same random input at 224x224 (a 224 and a 384 checkpoint of one architecture have the same
tensors and the same graph: ConvNeXt has no position-dependent part; a 384 checkpoint is
compared with PyTorch at 384 in test_export, other sizes, non-square ones included, below and
in test_runtime).  Logits, pooled features and the four pyramid outputs must agree within
1e-4 (float32).  Runs on whichever Keras backend KERAS_BACKEND selects (`make test` runs it on
TensorFlow, JAX and PyTorch).
"""

from __future__ import annotations

import gc

import keras
import numpy as np
import pytest
import torch_reference as ref

import convnext_keras as ck
from convnext_keras import registry

TOLERANCE = 1e-4
LAYOUTS_SKIPPED_FOR = ("large", "xlarge")
pytestmark = pytest.mark.equality


def _architectures():
    """Distinct (variant, classes) -> its registry entries, the smallest resolution first."""
    groups: dict[tuple, list[str]] = {}
    for c in registry.CHECKPOINTS.values():
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


def test_every_registry_entry_is_covered():
    covered = {n for names in ARCHITECTURES.values() for n in names}
    assert covered == set(registry.CHECKPOINTS)
    assert len(registry.CHECKPOINTS) == 21


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
        ck.checkpoints.assign_weights(model, weights)
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
